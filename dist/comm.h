// The collectives Coil uses, behind one small interface, on flat contiguous tensors of one dtype.
// Two backends: MPI on CPU tensors, NCCL on CUDA tensors (its unique id broadcast over MPI, its own
// stream). Every dtype can be all-gathered (a copy of bytes); sums take float32, float64, integers
// and bfloat16 (MPI: a user-defined sum that adds in float32 and rounds to bfloat16).
// An error of either becomes a coil::Error naming the rank and the operation.
//
// NCCL failures: a dead peer or a broken connection surfaces as an asynchronous NCCL error while the
// GPU waits in the collective. The NCCL backend polls ncclCommGetAsyncError (on every wait() and
// from a thread of its own while it lives), aborts the communicator on an error (ncclCommAbort: the
// GPU leaves the collective, so a host blocked on it returns), and the next call on this rank throws
// the coil::Error. Teardown on a failure path (an error seen, or the destructor run by an exception)
// aborts too: ncclCommDestroy waits for the peers, which may never come.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace coil::dist {

// A collective in flight. wait() orders what comes after it on this process after the collective:
// on CUDA the current stream waits for it (the host does not block); elsewhere it completes the
// collective. The Work keeps its tensors alive until then. Destroying an unwaited Work waits.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};

class Comm {
 public:
  virtual ~Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }

  // out (size x in.numel()) = every rank's `in`, rank after rank.
  virtual void all_gather(const at::Tensor& in, at::Tensor& out) = 0;
  // in holds size equal chunks; out (one chunk) = the sum over ranks of this rank's chunk.
  virtual void reduce_scatter(const at::Tensor& in, at::Tensor& out) = 0;
  virtual void all_reduce(at::Tensor& t) = 0;  // sum, in place
  virtual void broadcast(at::Tensor& t, int root) = 0;
  // root's out (size x in.numel()) = every rank's `in`; out is ignored on other ranks.
  virtual void gather(const at::Tensor& in, at::Tensor& out, int root) = 0;
  // out = chunk `rank` of root's `in` (size equal chunks); in is ignored on other ranks.
  virtual void scatter(const at::Tensor& in, at::Tensor& out, int root) = 0;
  virtual void barrier() = 0;

  // Whether the *_async collectives below run beside the caller's work (NCCL on its own stream).
  // When false they run at once and return a finished Work (MPI on CPU).
  virtual bool asynchronous() const { return false; }
  // The same collectives, queued: `in` and `out` must not be touched until wait().
  virtual std::unique_ptr<Work> all_gather_async(const at::Tensor& in, at::Tensor& out);
  virtual std::unique_ptr<Work> reduce_scatter_async(const at::Tensor& in, at::Tensor& out);

 protected:
  int rank_ = 0, size_ = 1;
};

// Every rank's `text`, in rank order (collective over CPU tensors; {text} when comm is null).
std::vector<std::string> all_gather_strings(Comm* comm, const std::string& text);

// MPI over MPI_COMM_WORLD (a duplicate of it), for CPU tensors. With a color >= 0: over the ranks
// of the same color only (MPI_Comm_split, ordered by global rank): HSDP's shard and replicate
// groups. Collective over every rank.
std::unique_ptr<Comm> make_mpi_comm(int color = -1);
// NCCL for CUDA tensors of this rank's device; throws coil::Error when Coil was built without CUDA.
// A color as for make_mpi_comm (its unique id broadcast within the group).
std::unique_ptr<Comm> make_nccl_comm(int color = -1);
// The backend for tensors on `device_type` ("cpu" or "cuda").
std::unique_ptr<Comm> make_comm(bool cuda);

// The NCCL backend's checks and messages, apart so that tests reach them without a GPU.
namespace nccl_detail {
// Why this build has no NCCL backend ("" when it has one): the build facts as given.
std::string unavailable_reason(bool cuda_built, bool nccl_disabled);
std::string unavailable_reason();  // this build's
// The coil::Error text of an NCCL result code (ncclResult_t's value) in `op` on `rank`; `detail` is
// NCCL's own last message, if any.
std::string error_message(int rank, const char* op, int code, const std::string& detail);
// How `out` relates to `in`: the same tensor (all_reduce, broadcast), size x in (all_gather,
// gather on root), in = size x out (reduce_scatter, scatter on root).
enum class Sizes { kSame, kOutIsSizeTimesIn, kInIsSizeTimesOut };
// Throws a coil::Error naming rank and op unless `in` (and `out`, when given) are contiguous,
// on `device`, of one dtype and of the sizes `sizes` says for a world of `size` ranks.
void check_tensors(int rank, int size, at::Device device, const char* op, const at::Tensor& in,
                   const at::Tensor* out, Sizes sizes);
}  // namespace nccl_detail

}  // namespace coil::dist
