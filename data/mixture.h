// A weighted mixture of data sets (data.train naming several, data.train_weights their shares):
// FineWeb-Edu at 70% and code at 30%, or two SFT sets, read as one SampleSource, so that the
// global order, N-independence and exact resume of data/loader.h hold unchanged.
//
// An epoch of the mixture has as many samples as its parts together, S = sum of their sizes, and
// gives part k exactly n_k of them: n_k is S apportioned by the weights (largest remainders), or
// part k's size when no weights are given (then an epoch of the mixture is one epoch of each part).
// Global position g of the order of `seed` lies in mixture epoch b = g / S; within it the S slots
// are shuffled by a seeded permutation pi_b (data/loader.h's Feistel bijection), and slot
// p = pi_b(g mod S) belongs to part k where first_k <= p < first_k + n_k. It is position
//   g_k = b * n_k + (p - first_k)
// of part k's own order, the part's sample_at(g_k) with a seed of its own: each part walks through
// its own epochs (a part whose share exceeds its size repeats, one below it reaches its next epoch
// in a later mixture epoch), every sample of a part once per epoch of that part. All of it is O(1)
// per sample, with no table, a pure function of (seed, g).
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

class MixedSamples : public SampleSource {
 public:
  // The parts (at least two, of the same kind, columns, mask and seq_idx), their names for
  // messages (e.g. the directories) and weights (empty: each part's size).
  MixedSamples(std::vector<std::shared_ptr<const SampleSource>> parts, std::vector<std::string> names,
               std::vector<double> weights);

  // The seed of part k's own order, from the run's.
  static uint64_t part_seed(uint64_t seed, size_t k);

  int64_t size() const override { return size_; }
  int64_t cols() const override { return parts_[0]->cols(); }
  int64_t target_tokens() const override { return target_tokens_; }
  bool has_mask() const override { return parts_[0]->has_mask(); }
  bool has_seq_idx() const override { return parts_[0]->has_seq_idx(); }
  // Sample i of the parts one after the other (part 0's samples, then part 1's, ...).
  void fill(int64_t i, int32_t* tokens, uint8_t* mask) const override;
  void fill_seq_idx(int64_t i, int32_t* seq_idx) const override;
  void fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const override;
  std::string kind() const override { return parts_[0]->kind(); }
  // The parts' fingerprints and quotas: a run resumes only into the same mixture.
  std::string fingerprint() const override;

  // The part of global position g and the position in that part's own order.
  struct Place {
    size_t part;
    int64_t position;
  };
  Place locate(int64_t g, uint64_t seed) const;
  const std::vector<int64_t>& quotas() const { return quota_; }  // n_k: part k's samples an epoch
  size_t parts() const { return parts_.size(); }
  // A line per part: its name, share, size and how many times an epoch of the mixture reads it.
  std::vector<std::string> describe(const std::string& unit) const;

 private:
  std::vector<std::shared_ptr<const SampleSource>> parts_;
  std::vector<std::string> names_;
  std::vector<int64_t> quota_, first_;  // n_k, and first_k = n_0 + ... + n_{k-1}
  std::vector<int64_t> start_;          // where part k's samples start in fill()'s numbering
  int64_t size_ = 0, target_tokens_ = 0;
};

}  // namespace coil::data
