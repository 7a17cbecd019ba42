// Batches for training: the geometry of a global batch across ranks, the loader interface the
// trainer reads, its resumable state, and the seeded permutation that orders samples.
//
// The order contract (pretraining shards and SFT): sample k of the global batch of step s is
//   sample[perm_e(g mod S)]  with  g = start + s * global_batch + k,  e = g div S,
// where S is the number of samples in an epoch and perm_e a seeded bijection of [0, S) that is
// different every epoch. It depends on (seed, s, k) only: rank r of N reads positions
// [r * G/N, (r+1) * G/N) of every global batch, in micro batches, so the global batch is the
// same whatever N is, and a run resumes on any number of ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace coil::data {

// A micro batch: rows x cols tokens (cols = seq_len + 1: the inputs are columns 0..seq_len-1, the
// targets columns 1..seq_len). mask[i] is 1 where token i is a target the loss counts; an empty
// mask means every target counts (pretraining).
//
// seq_idx (rows x cols, empty when off: data.document_masking, data.sft_packing) numbers the
// documents of each row: 0 for the document the row starts in, +1 at each document start, so it is
// non-decreasing within a row, and the model resets its SSM and conv state where it changes. A
// document's EOS belongs to it: the EOS that ends document a is a's last token (a's last input),
// and the position after it starts document b. SFT padding at a row's end gets a number of its own.
struct Batch {
  int64_t rows = 0, cols = 0;
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<int32_t> seq_idx;
};

// How a global batch (in sequences) splits over ranks and micro batches.
struct BatchGeometry {
  int64_t seq_len = 0;
  int64_t global_batch = 1;  // sequences per optimizer step, all ranks together
  int64_t micro_batch = 1;   // sequences per forward/backward on one rank
  int rank = 0, world = 1;
  int64_t per_rank() const { return global_batch / world; }
  int64_t accumulation() const { return per_rank() / micro_batch; }  // micro batches per step
  void validate() const;  // throws coil::Error unless global_batch = world * micro_batch * accumulation
};

// Everything needed to resume a loader exactly; small, and stored in checkpoints as JSON.
struct LoaderState {
  std::string kind;         // "shards", "sft" or "streaming"
  std::string fingerprint;  // the data (and seq_len) the state belongs to
  uint64_t seed = 0;
  int64_t next_sample = 0;  // shards, sft: global index of the first sample of the next global batch
                            // streaming: global index of the next step's first row
  // streaming: where the next row of this rank starts (see data/streaming.h)
  int64_t epoch = 0, record = 0, offset = 0;
  int rank = 0, world = 1;
  // streaming: the stream's data.train entry (empty in states saved before 2026-12-06): a single
  // stream and a streamed mixture's part resume as each other when their names match.
  std::string name;
  // A streaming mixture: each part's own streaming state (its next_sample: the mixture's).
  std::vector<LoaderState> parts;

  std::string to_json() const;
  static LoaderState from_json(const std::string& json);  // throws coil::Error on a bad state
  bool operator==(const LoaderState& o) const;
};

class Loader {
 public:
  virtual ~Loader() = default;
  virtual Batch next() = 0;  // the next micro batch of this rank
  // The state at the current step boundary (after a whole number of global batches).
  virtual LoaderState state() const = 0;
  virtual void restore(const LoaderState& state) = 0;
  // Sequences and (target) tokens in one epoch, all ranks together; 0 when unknown (streaming).
  virtual int64_t samples_per_epoch() const = 0;
  virtual int64_t tokens_per_epoch() const = 0;
};

// A seeded bijection of [0, n), evaluated in O(1) with no table: a balanced Feistel network on the
// next even power of two >= n, with cycle walking (apply it again until the value is < n: at most
// a few times on average, since the power of two is < 4n). Different keys give unrelated orders.
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  uint64_t encrypt(uint64_t x) const;
  uint64_t n_, half_bits_, half_mask_;
  uint64_t keys_[4];
};

// splitmix64: a strong 64-bit mixing function (Steele, Lea and Flood, 2014).
uint64_t mix64(uint64_t x);

// Samples addressed by index: the pretraining shards cut into sequences, or SFT examples.
class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;                 // samples in one epoch
  virtual int64_t cols() const = 0;                 // seq_len + 1
  virtual int64_t target_tokens() const = 0;        // tokens the loss counts in one epoch
  virtual bool has_mask() const = 0;
  // Writes sample i (cols tokens, and cols mask bytes when has_mask()).
  virtual void fill(int64_t i, int32_t* tokens, uint8_t* mask) const = 0;
  virtual std::string kind() const = 0;
  virtual std::string fingerprint() const = 0;
  // Whether the source numbers the documents of its samples (Batch::seq_idx), and sample i's numbers
  // (cols values).
  virtual bool has_seq_idx() const { return false; }
  virtual void fill_seq_idx(int64_t /*i*/, int32_t* /*seq_idx*/) const {}
  // The sample at global position g (all epochs) of the order of `seed`: by default sample
  // sample_at(g, size(), seed) through fill() and fill_seq_idx() (seq_idx null: not wanted). A source
  // that orders itself (packed SFT: its rows are a function of the epoch) overrides it.
  virtual void fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const;
};

// The sample at global position g: epoch e = g / samples, and within it perm_e(g mod samples).
int64_t sample_at(int64_t g, int64_t samples, uint64_t seed);

// The loader over any SampleSource, in the global order above, prefetching `prefetch` micro
// batches ahead in a background thread (0: none).
std::unique_ptr<Loader> make_indexed_loader(std::shared_ptr<const SampleSource> source, const BatchGeometry& geometry,
                                            uint64_t seed, int prefetch = 4);

// The global batch of `step` as one Batch, whatever the ranks: what rank r of N reads is rows
// [r G/N, (r+1) G/N) of it. For tests and tools.
Batch global_batch(const SampleSource& source, int64_t global_batch_size, uint64_t seed, int64_t step,
                   int64_t start = 0);

}  // namespace coil::data
