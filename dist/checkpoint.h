// Distributed checkpoints in HDF5 (format version 2), readable by anyone with h5py.
//
// A checkpoint is a directory, e.g. checkpoints/step-00001000/:
//   rank-00000-of-00004.h5 ... rank-00003-of-00004.h5     one file per rank, written by that rank:
//       /model/<Hugging Face name>, /optimizer/<state name>   the rank's rows of each tensor: rows
//                                   [r k, min((r + 1) k, rows)) of dim 0, k = ceil(rows / N), as
//                                   FSDP shards them (a rank past the last row holds 0 rows);
//                                   HSDP (shard degree S < N): ranks r < S hold k = ceil(rows / S)
//                                   rows each, the other replicas' ranks none
//       /rng/cpu                    the rank's CPU generator state
//       attributes                  rank, world_size, step, loader_state (the rank's, JSON)
//   index.h5                        written last, by rank 0:
//       /model/..., /optimizer/...  one virtual dataset per tensor with its global shape, stitched
//                                   from the rank files (relative names: the folder can move), so
//                                   h5py.File("index.h5")["model/<name>"][:] is the whole tensor
//       /tokenizer/model            the sentencepiece model the run trained with (bytes)
//       attributes on /             format = "coil.checkpoint", version = 2, step, world_size,
//                                   shard_degree (HSDP only: absent means world_size),
//                                   files (JSON: name, bytes and CRC-32 of every rank file), and
//                                   the run's strings: config (TOML), tokens_seen, ...
// A consolidated checkpoint (`coil ckpt consolidate`) is one .h5 file laid out as index.h5 but
// with ordinary datasets, each with its CRC-32 as an attribute, and the ranks' strings as
// attributes "rank<r>.<key>".
//
// Why this design (docs/CHECKPOINTS.md argues it): one file per rank needs no MPI-IO (which fails
// on NFS) and writes at full speed on every rank; the virtual datasets give the global view that
// h5py users and resharding need. A virtual dataset reads a missing source as fill values without
// any error, so a checkpoint is only read after every rank file was found whole (size and CRC-32
// as recorded in the index); the fill value is NaN, never 0, in case.
//
// Safety: a checkpoint is written into <name>.tmp/ (every rank file fsynced, then checksummed as
// read back), the index last, then the folder is renamed into place and `latest` re-pointed by a
// rename of a symlink: an interrupted save never becomes a checkpoint.
//
// No damaged byte reaches HDF5 (whose 1.10 parser crashes on some damaged files, docs/RELIABILITY.md
// finding 7): every file is checked against its recorded size and CRC-32 before HDF5 opens it.
//   index.h5.crc32   one line "<crc32, 8 hex digits> <bytes> index.h5", the index's own checksum
//                    (outside it: a checksum cannot cover itself), written and fsynced in <name>.tmp/
//                    before the folder's rename, so it is committed with the checkpoint, atomically;
//   rank files       their sizes and CRC-32s are in the index (`files`), checked once the index is;
//   a consolidated   an HDF5 user block of 512 bytes (which HDF5 and h5py skip) opening the file
//   file             with the line "COIL-CRC32 <crc32> <bytes>": the CRC-32 of the bytes after the
//                    block, and the file's size (one file stays self-contained when copied).
// A checkpoint of an older Coil (no index.h5.crc32, or a consolidated file starting with HDF5's
// signature) still loads, unchecked before HDF5 opens it (index_checked() says which).
// A mismatch is one line naming the file: "<file>: checksum mismatch (the file is damaged; ...)".
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/mamba.h"

namespace coil::dist {

class Comm;

// One tensor as one rank holds it: rows [row_begin, row_begin + rows.size(0)) of a global tensor.
struct TensorRows {
  std::string name;              // "model/<HF name>" or "optimizer/<state name>"
  std::vector<int64_t> shape;    // the global shape
  int64_t row_begin = 0;
  at::Tensor rows;               // float32, contiguous, on the CPU
};

// Rank r's rows of a global tensor of `shape` on `world` ranks: [begin, end). HSDP (shard degree
// `shard` < world, ranks r = replica x shard + position): the ranks of replica 0 hold the rows of
// their position among `shard` ranks, the others none (each row is written once).
std::pair<int64_t, int64_t> rank_rows(int64_t rows, int rank, int world, int shard = 0);
std::string rank_file_name(int rank, int world);

// What one rank writes.
struct RankPart {
  int rank = 0, world = 1;
  int shard = 0;  // HSDP's shard degree (0: world)
  int64_t step = 0;
  std::vector<TensorRows> tensors;
  std::map<std::string, std::string> strings;  // e.g. loader_state
  at::Tensor rng;                              // uint8; undefined: none
};

// A written rank file, or why it could not be written.
struct FileRecord {
  std::string name, error;
  int64_t bytes = 0;
  uint32_t crc32 = 0;
  std::string to_json() const;
  static FileRecord from_json(const std::string& text);
};

// Writes rank_file_name(part.rank, part.world) into dir, fsyncs it and computes its CRC-32 from
// the bytes read back. Never throws: a failure is returned in FileRecord::error.
FileRecord write_rank_file(const std::string& dir, const RankPart& part) noexcept;

// What the index records besides the tensors (whose names, shapes and rank files it takes from
// `layout`: any rank's part).
struct IndexInfo {
  int64_t step = 0;
  int world = 1;
  int shard = 0;  // HSDP's shard degree (0: world): recorded as the attribute shard_degree
  std::vector<FileRecord> files;               // one per rank, in rank order
  std::map<std::string, std::string> strings;  // config, tokens_seen, ...
  std::string tokenizer;                       // the sentencepiece model's bytes (may be empty)
};
void write_index(const std::string& dir, const RankPart& layout, const IndexInfo& info);

// Renames dir `from` to `to` (replacing a checkpoint of that name only once the new one is in
// place) and fsyncs the parent directory.
void commit_directory(const std::string& from, const std::string& to);
// Points <parent>/<link> at <target> (a sibling directory name), atomically (a relative symlink).
void point_link(const std::string& parent, const std::string& link, const std::string& target);

struct TensorInfo {
  std::string name;  // "model/<HF name>", "optimizer/<state>"
  std::vector<int64_t> shape;
  std::string dtype;  // "float32", ...
};

// A checkpoint opened for reading: a checkpoint directory (with index.h5) or a consolidated .h5.
// Opening reads the index only; verify() before trusting the data.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& path);  // throws coil::Error: not there, not a checkpoint
  ~Checkpoint();
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  const std::string& path() const { return path_; }
  int64_t step() const { return step_; }
  int world_size() const { return world_; }  // of the run that saved it
  int shard_degree() const { return shard_; }  // its ranks holding rows (HSDP: < world_size)
  bool consolidated() const { return consolidated_; }
  // The index's (or consolidated file's) bytes were checked against their recorded CRC-32 before
  // HDF5 opened it; false for a checkpoint of an older Coil, which recorded none.
  bool index_checked() const { return index_checked_; }
  const std::map<std::string, std::string>& strings() const { return strings_; }
  std::string string(const std::string& key) const;  // throws when missing, naming the key
  const std::vector<FileRecord>& files() const { return files_; }
  std::vector<TensorInfo> tensors() const;  // every tensor under model/ and optimizer/
  int64_t total_bytes() const;              // on disk

  // Problems that make the checkpoint unusable, one line each (empty: intact): for a checkpoint
  // directory, rank files i with i % parts == part (missing, of another size, another CRC-32);
  // for a consolidated file, every dataset's CRC-32.
  std::vector<std::string> verify(int part = 0, int parts = 1) const;

  // Reads rows [row_begin, row_begin + dst.size(0)) of tensor `name` into dst (float32 or the
  // tensor's dtype), from the rank files that hold them (not through the virtual datasets: the
  // same bytes, faster, and a missing file is an error, never fill values); rows past the
  // tensor's end are set to 0 (FSDP's padding). dst's other dims must be the tensor's: an error
  // names the tensor and both shapes.
  void read(const std::string& name, at::Tensor dst, int64_t row_begin = 0) const;
  bool has(const std::string& name) const;
  std::string rank_string(int rank, const std::string& key) const;  // a rank's string (loader_state)
  at::Tensor rank_rng(int rank) const;                              // undefined when none
  std::string tokenizer() const;                                    // the model's bytes, or ""

 private:
  std::string path_, index_;  // the checkpoint, and the HDF5 file holding the global view
  int64_t step_ = 0;
  int world_ = 1, shard_ = 1;
  bool consolidated_ = false, index_checked_ = false;
  std::map<std::string, std::string> strings_;
  std::vector<FileRecord> files_;
  int64_t file_id_ = -1;  // hid_t of index_
  mutable std::vector<int64_t> rank_files_;  // hid_t of each rank file, opened when first read
  int64_t rank_file(int rank) const;         // opened only once its size and CRC-32 are as recorded
  // Rank file i against its record, checksummed once per Checkpoint (by whichever thread asks
  // first: verify() or a read): "" when intact, else the one-line problem.
  struct FileCheck;
  mutable std::vector<std::unique_ptr<FileCheck>> checks_;
  std::string check_rank_file(size_t i) const;
};

// Writes a consolidated single-file checkpoint of `ck` to out (atomically).
void consolidate(const Checkpoint& ck, const std::string& out);

// ---- Saving during training ---------------------------------------------------------------------

struct SaveRequest {
  std::string name;                            // "step-00001000"
  RankPart part;                               // this rank's state: host copies, owned from now on
  std::map<std::string, std::string> strings;  // the run's (rank 0's are written)
  std::string tokenizer;                       // rank 0's is written
  bool best = false, final = false;            // also point `best` / `final` at it
  bool last = false;  // the run ends after it: a failure is not warned about (the caller reports error())
};

// Saves checkpoints into a run's checkpoints/ folder. Every call is collective (all ranks, in the
// same order, from the training thread). A save goes in three stages:
//   save()    this rank's state, already copied to host memory (stage()), is written to its rank
//             file by a background thread (async) while training goes on;
//   commit()  once every rank's file is written (busy() summed over the ranks in the step's
//             all-reduce is 0): the ranks exchange their file records, and rank 0 writes the index,
//             renames the folder into place, re-points latest (and best / final) and deletes step
//             folders beyond keep_last_k (never one a link points to), in the background;
//   finish()  waits for all of it; returns whether the checkpoint was saved.
// At most one save is in flight: save() finishes the one before. A failed save is reported (a
// warning naming the rank and the error), its .tmp removed, and the run goes on: the next
// checkpoint saves again. Every failure of the file system (a full disk, a read-only or vanished
// folder, a refused rename) is such a failure, one line: the file, the tensor, the system's reason.
// Without async every stage runs on the calling thread.
class CheckpointSaver {
 public:
  CheckpointSaver(std::string dir, std::shared_ptr<Comm> comm, bool async, int64_t keep_last_k);
  ~CheckpointSaver();  // waits for the threads; a save not committed stays a .tmp

  // A host copy of `src` in a buffer kept for the next saves under `name` (no save may be in
  // flight: finish() first); pinned memory when src is on a GPU.
  at::Tensor stage(const std::string& name, const at::Tensor& src);
  void save(SaveRequest request);
  double busy() const;           // 1 while this rank's writer is busy, else 0
  bool awaiting_commit() const;  // a save is in flight and not yet committed
  void commit();
  bool finish();
  // Why the last save that finish() found failed, the same on every rank ("" when it was saved).
  const std::string& error() const { return error_; }
  // Seconds the calling (training) thread spent in stage(), save(), commit() and finish(), summed.
  double stall_seconds() const { return stall_s_; }

 private:
  struct Pending;
  std::string dir_;
  std::shared_ptr<Comm> comm_;
  bool async_;
  int64_t keep_last_k_;
  std::unique_ptr<Pending> pending_;
  std::map<std::string, at::Tensor> staging_;
  double stall_s_ = 0;
  std::string error_;
};

// Reads a checkpoint with `read` (which reads what it needs, e.g. this rank's rows of every tensor)
// while this rank's share of its files is verified on another thread. Returns the problems found
// on all ranks, "" when the checkpoint is intact and `read` succeeded (an error of `read` on an
// intact checkpoint, such as another model's shapes, is thrown). Collective.
std::string read_verified(const Checkpoint& ck, const std::shared_ptr<Comm>& comm,
                          const std::function<void(const Checkpoint&)>& read);

// Resuming: the newest intact checkpoint of checkpoints folder `dir` (latest first, then the step
// folders newest first), read with `read`; "" when it holds none. A damaged checkpoint is reported
// in `warnings` and, once an older intact one is found, moved aside to <name>.damaged and latest
// re-pointed (by rank 0). Collective.
std::string find_intact_checkpoint(const std::string& dir, const std::shared_ptr<Comm>& comm,
                                   std::vector<std::string>* warnings,
                                   const std::function<void(const Checkpoint&)>& read = {});

// Removes *.tmp folders that interrupted saves left (rank 0, before a run starts saving).
void remove_interrupted_saves(const std::string& dir);

}  // namespace coil::dist
