#include "data/mixture.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.h"

namespace coil::data {

std::vector<int64_t> apportion(int64_t n, const std::vector<double>& weights, const std::vector<std::string>& names) {
  COIL_CHECK(n > 0 && !weights.empty() && weights.size() == names.size(), "apportion: {} samples, {} weights, {} names",
             n, weights.size(), names.size());
  long double total = 0;
  for (size_t k = 0; k < weights.size(); ++k) {
    COIL_CHECK(std::isfinite(weights[k]) && weights[k] > 0, "the weight of {} must be a finite number > 0, not {}",
               names[k], weights[k]);
    total += weights[k];
  }
  std::vector<int64_t> out(weights.size());
  std::vector<long double> rest(weights.size());
  int64_t given = 0;
  for (size_t k = 0; k < weights.size(); ++k) {
    const long double exact = static_cast<long double>(n) * weights[k] / total;
    out[k] = static_cast<int64_t>(std::floor(exact));
    rest[k] = exact - static_cast<long double>(out[k]);
    given += out[k];
  }
  std::vector<size_t> order(weights.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rest[a] > rest[b]; });
  for (size_t i = 0; given < n; ++i, ++given) ++out[order[i % order.size()]];
  for (size_t k = 0; k < weights.size(); ++k)
    COIL_CHECK(out[k] > 0, "the weight {} of {} is less than one sample in an epoch of the mixture ({} samples): raise it",
               weights[k], names[k], n);
  return out;
}

MixedSamples::MixedSamples(std::vector<std::shared_ptr<const SampleSource>> parts, std::vector<std::string> names,
                           std::vector<double> weights)
    : parts_(std::move(parts)), names_(std::move(names)) {
  COIL_CHECK(parts_.size() >= 2 && names_.size() == parts_.size(), "a mixture needs two or more parts, with a name each");
  COIL_CHECK(weights.empty() || weights.size() == parts_.size(), "a mixture of {} parts was given {} weights",
             parts_.size(), weights.size());
  for (size_t k = 0; k < parts_.size(); ++k) {
    const SampleSource& p = *parts_[k];
    COIL_CHECK(p.size() > 0, "{} has no sample", names_[k]);
    COIL_CHECK(p.kind() == parts_[0]->kind(), "{} is {} data and {} is {} data: a mixture's parts are of one kind",
               names_[k], p.kind(), names_[0], parts_[0]->kind());
    COIL_CHECK(p.cols() == parts_[0]->cols() && p.has_mask() == parts_[0]->has_mask() &&
                   p.has_seq_idx() == parts_[0]->has_seq_idx(),
               "{} and {} give samples of another shape: a mixture's parts share seq_len and settings", names_[k],
               names_[0]);
    start_.push_back(size_);
    size_ += p.size();
  }
  if (weights.empty())
    for (const auto& p : parts_) quota_.push_back(p->size());
  else
    quota_ = apportion(size_, weights, names_);
  long double tokens = 0;
  for (size_t k = 0; k < parts_.size(); ++k) {
    first_.push_back(k ? first_[k - 1] + quota_[k - 1] : 0);
    tokens += static_cast<long double>(quota_[k]) * parts_[k]->target_tokens() / parts_[k]->size();
  }
  target_tokens_ = static_cast<int64_t>(std::llround(tokens));
}

uint64_t MixedSamples::part_seed(uint64_t seed, size_t k) {
  return mix64(seed ^ mix64(0x6d69787475726570ULL + k));  // "mixturep" + k
}

MixedSamples::Place MixedSamples::locate(int64_t g, uint64_t seed) const {
  COIL_CHECK(g >= 0, "sample position {} is negative", g);
  const int64_t epoch = g / size_;
  const Permutation slots(static_cast<uint64_t>(size_),
                          mix64(seed ^ 0x6d69787475726573ULL) ^ mix64(static_cast<uint64_t>(epoch) * 0x632be59bd9b4e019ULL));
  const auto p = static_cast<int64_t>(slots(static_cast<uint64_t>(g % size_)));
  const size_t k = static_cast<size_t>(std::upper_bound(first_.begin(), first_.end(), p) - first_.begin()) - 1;
  return {k, epoch * quota_[k] + (p - first_[k])};
}

void MixedSamples::fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const {
  const Place at = locate(g, seed);
  parts_[at.part]->fill_at(at.position, part_seed(seed, at.part), tokens, mask, seq_idx);
}

void MixedSamples::fill(int64_t i, int32_t* tokens, uint8_t* mask) const {
  COIL_CHECK(i >= 0 && i < size_, "sample {} is outside the mixture's {}", i, size_);
  const size_t k = static_cast<size_t>(std::upper_bound(start_.begin(), start_.end(), i) - start_.begin()) - 1;
  parts_[k]->fill(i - start_[k], tokens, mask);
}

void MixedSamples::fill_seq_idx(int64_t i, int32_t* seq_idx) const {
  COIL_CHECK(i >= 0 && i < size_, "sample {} is outside the mixture's {}", i, size_);
  const size_t k = static_cast<size_t>(std::upper_bound(start_.begin(), start_.end(), i) - start_.begin()) - 1;
  parts_[k]->fill_seq_idx(i - start_[k], seq_idx);
}

std::string MixedSamples::fingerprint() const {
  std::string f = "mix";
  for (size_t k = 0; k < parts_.size(); ++k) f += fmt::format("[{}x{}]", quota_[k], parts_[k]->fingerprint());
  return f;
}

std::vector<std::string> MixedSamples::describe(const std::string& unit) const {
  std::vector<std::string> out;
  for (size_t k = 0; k < parts_.size(); ++k)
    out.push_back(fmt::format("part {} {}: {:.2f}% ({} of the {} {} of an epoch: its {} {:.3g}x)", k, names_[k],
                              100.0 * static_cast<double>(quota_[k]) / static_cast<double>(size_), quota_[k], size_,
                              unit, parts_[k]->size(),
                              static_cast<double>(quota_[k]) / static_cast<double>(parts_[k]->size())));
  return out;
}

}  // namespace coil::data
