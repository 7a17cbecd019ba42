// A weighted mixture of data sets (data.train naming several, data.train_weights their shares):
// FineWeb-Edu at 70% and code at 30%, or two SFT sets, read as one SampleSource, so that the
// global order, N-independence and exact resume of data/loader.h hold unchanged.
//
// Quotas: an epoch of the mixture has as many samples as its parts together, S = the sum of their
// sizes, and gives part k exactly n_k of them: S apportioned by the weights (largest remainders),
// or part k's size when no weights are given (then an epoch of the mixture is an epoch of each part).
//
// Interleaving (Interleave): the parts take turns evenly, as stride scheduling does. Part k's i-th
// sample (i = 0, 1, 2, ...) is due at time (i + 1/2) / n_k; the mixture is every part's samples in
// the order they fall due (ties: the lower part first). After any g samples part k has had
// g n_k / S of them within half a sample for two parts (within 1.5 in every test with up to eight),
// and exactly n_k in each mixture epoch. Position g of the mixture is found by a binary search over
// a window of a few samples per part: O(parts^2) integer operations, no table. Streamed mixtures
// (data/streaming.h) interleave their rows the same way.
//
// Each part's i-th sample is position i of that part's own order (its sample_at, with a seed of its
// own): every part walks its own epochs, each of its samples once per epoch of that part, whether
// its share exceeds its size (it repeats) or not. And since a part's positions come in order, where
// each part is at any step is known exactly, so the mixture can change within a run: a run resumed
// with other weights, or parts added or dropped (down to one data set), goes on from that step with
// the new quotas, each part from where it was (a new one from its start): continue_from. A segment
// (from, and per part its seed and offset) says where the current mixture started; it is in the
// fingerprint, which the loader state keeps.
// The order is a pure function of the data, the quotas and the segment: not of the number of ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"

namespace coil::data {

// n (> 0) apportioned by weights (each finite and > 0) by largest remainders: floor(n w_k / W),
// then one more for the largest fractional parts (the lower index first on ties); the result sums
// to n. A coil::Error when a weight's share is below one sample ("names" name the parts).
std::vector<int64_t> apportion(int64_t n, const std::vector<double>& weights, const std::vector<std::string>& names);

// The even interleaving of parts with quotas n_k (> 0) described above.
class Interleave {
 public:
  // Bounds that keep every product inside 128 bits and a part's offset plus its count inside 64:
  // the quotas' sum (2^40 samples an epoch), and the positions.
  static constexpr int64_t kMaxTotal = int64_t{1} << 40, kMaxPosition = int64_t{1} << 61;
  explicit Interleave(std::vector<int64_t> quotas);
  struct Place {
    size_t part;
    int64_t index;  // the part's index-th sample (from 0)
  };
  Place at(int64_t g) const;                  // the sample at position g (>= 0)
  int64_t rank(size_t part, int64_t i) const;  // the position of part's i-th sample
  int64_t before(size_t part, int64_t g) const;  // part's samples among positions [0, g)
  const std::vector<int64_t>& quotas() const { return n_; }

 private:
  std::vector<int64_t> n_;
  int64_t total_ = 0;
  int64_t small_ = 0;  // rank(k, i) with i below it needs no 128-bit arithmetic
};

class MixedSamples : public SampleSource {
 public:
  // The parts (at least two, of the same kind, columns, mask and seq_idx; one only as continue_from
  // makes it: a data set going on from a mixture's state), their names for messages (e.g. the
  // directories), weights (empty: each part's size) and the run's seed (each part's own order is
  // seeded from it, part_seed).
  MixedSamples(std::vector<std::shared_ptr<const SampleSource>> parts, std::vector<std::string> names,
               std::vector<double> weights, uint64_t seed);

  static uint64_t part_seed(uint64_t seed, size_t k);

  int64_t size() const override { return size_; }
  int64_t cols() const override { return parts_[0]->cols(); }
  int64_t target_tokens() const override { return target_tokens_; }
  bool has_mask() const override { return parts_[0]->has_mask(); }
  bool has_seq_idx() const override { return parts_[0]->has_seq_idx(); }
  // Sample i of the parts one after the other (part 0's samples, then part 1's, ...).
  void fill(int64_t i, int32_t* tokens, uint8_t* mask) const override;
  void fill_seq_idx(int64_t i, int32_t* seq_idx) const override;
  // `seed` is not used: the parts' seeds are the mixture's (set at construction, or the state's).
  void fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const override;
  std::string kind() const override { return parts_[0]->kind(); }
  // JSON: per part its data's fingerprint, quota, seed and offset, and where the segment starts.
  std::string fingerprint() const override;
  // The mixture that continues a saved state: this one's segment when the state is of the same
  // mixture, else a new segment from the state's next sample, each part that was in the saved
  // mixture (or was the saved single data set) from where it was there, with its seed.
  std::shared_ptr<const MixedSamples> for_state(const LoaderState& state) const;

  struct Place {
    size_t part;
    int64_t position;  // in that part's own order
  };
  Place locate(int64_t g) const;
  const std::vector<int64_t>& quotas() const { return mix_.quotas(); }
  // A line per part: its name, share, size and how many times an epoch of the mixture reads it.
  std::vector<std::string> describe(const std::string& unit) const;

 private:
  std::vector<std::shared_ptr<const SampleSource>> parts_;
  std::vector<std::string> names_;
  Interleave mix_;
  int64_t from_ = 0;                       // the segment's first position
  std::vector<uint64_t> seed_;             // each part's seed
  std::vector<int64_t> offset_;            // each part's position at from_
  std::vector<int64_t> start_;             // where part k's samples start in fill()'s numbering
  int64_t size_ = 0, target_tokens_ = 0;
};

// The source that reads on from a saved loader state (data/loader.h's restore): `source` itself when
// the state is its own, else a mixture's continuation (MixedSamples::for_state; a single data set
// after a mixture goes on as a mixture of one part, from where it was in it). A coil::Error when the
// state belongs to other data.
std::shared_ptr<const SampleSource> continue_from(std::shared_ptr<const SampleSource> source, const LoaderState& state);

// Where a saved (shards or SFT) loader state is, in lines (`coil ckpt inspect`): the next sample and
// its data, for a mixture each part's next position in its own order and share. (Streaming states:
// data/streaming.h's describe_streaming_state.)
std::vector<std::string> describe_state(const LoaderState& state);

}  // namespace coil::data
