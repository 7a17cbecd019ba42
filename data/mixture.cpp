#include "data/mixture.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
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

// ---- Interleave -----------------------------------------------------------------------------------

namespace {
using i128 = __int128;
int64_t floor_div(i128 a, i128 b) { return static_cast<int64_t>(a >= 0 ? a / b : -((-a + b - 1) / b)); }
}  // namespace

Interleave::Interleave(std::vector<int64_t> quotas) : n_(std::move(quotas)) {
  COIL_CHECK(!n_.empty(), "an interleaving of no part");
  for (int64_t n : n_) {
    COIL_CHECK(n > 0, "a part's quota must be > 0, not {}", n);
    COIL_CHECK(n <= kMaxTotal - total_, "a mixture of more than 2^40 samples an epoch");
    total_ += n;
  }
  small_ = (std::numeric_limits<int64_t>::max() / 2 - total_) / *std::max_element(n_.begin(), n_.end()) / 2;
}

// Samples due strictly before (2i + 1) / (2 n_k), plus those due at the same time of lower parts.
// With t = (2i + 1) n_j, part j has floor(ceil(t / n_k) / 2) samples due before (i itself for
// j = k), and one at that very time when t / n_k is an odd integer.
// In 64-bit arithmetic while (2i + 1) n_j fits (any run of fewer than 2^61 / max n_k samples), else
// in 128-bit.
template <typename Int>
int64_t rank_in(const std::vector<int64_t>& n, size_t k, int64_t i) {
  const Int due = 2 * static_cast<Int>(i) + 1, nk = n[k];
  Int r = 0;
  for (size_t j = 0; j < n.size(); ++j) {
    const Int t = due * n[j], q = (t + nk - 1) / nk;
    r += q / 2;
    if (j < k && q * nk == t && q % 2 == 1) ++r;
  }
  return static_cast<int64_t>(r);
}

int64_t Interleave::rank(size_t k, int64_t i) const {
  return i < small_ ? rank_in<int64_t>(n_, k, i) : rank_in<i128>(n_, k, i);
}

// The first i with rank(k, i) >= g. (i + 1/2) S / n_k - K / 2 <= rank(k, i) < (i + 1/2) S / n_k + 3K / 2
// (K parts), so it lies in a window of about 3K n_k / S + 3 samples.
int64_t Interleave::before(size_t k, int64_t g) const {
  COIL_CHECK(g >= 0 && g <= kMaxPosition, "sample position {} is outside [0, 2^61]", g);
  const auto K = static_cast<i128>(n_.size());
  int64_t lo = std::max<int64_t>(0, floor_div((static_cast<i128>(g) - 2 * K) * n_[k], total_) - 1);
  int64_t hi = floor_div((static_cast<i128>(g) + K) * n_[k], total_) + 1;  // rank(k, hi) >= g
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (rank(k, mid) >= g) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

Interleave::Place Interleave::at(int64_t g) const {
  COIL_CHECK(g >= 0 && g <= kMaxPosition, "sample position {} is outside [0, 2^61]", g);
  for (size_t k = 0; k < n_.size(); ++k)
    if (const int64_t i = before(k, g); rank(k, i) == g) return {k, i};
  fail("interleave: no part has position {} (quotas {})", g, n_.size());
}

// ---- MixedSamples ---------------------------------------------------------------------------------

MixedSamples::MixedSamples(std::vector<std::shared_ptr<const SampleSource>> parts, std::vector<std::string> names,
                           std::vector<double> weights, uint64_t seed)
    : parts_(std::move(parts)), names_(std::move(names)), mix_({1}) {
  COIL_CHECK(!parts_.empty() && names_.size() == parts_.size(), "a mixture needs parts, with a name each");
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
    seed_.push_back(part_seed(seed, k));
    offset_.push_back(0);
  }
  std::vector<int64_t> quotas;
  if (weights.empty())
    for (const auto& p : parts_) quotas.push_back(p->size());
  else
    quotas = apportion(size_, weights, names_);
  mix_ = Interleave(quotas);
  long double tokens = 0;
  for (size_t k = 0; k < parts_.size(); ++k)
    tokens += static_cast<long double>(quotas[k]) * parts_[k]->target_tokens() / parts_[k]->size();
  target_tokens_ = static_cast<int64_t>(std::llround(tokens));
}

uint64_t MixedSamples::part_seed(uint64_t seed, size_t k) {
  return mix64(seed ^ mix64(0x6d69787475726570ULL + k));  // "mixturep" + k
}

MixedSamples::Place MixedSamples::locate(int64_t g) const {
  COIL_CHECK(g >= from_, "sample position {} is before this mixture's first ({})", g, from_);
  const Interleave::Place p = mix_.at(g - from_);
  return {p.part, offset_[p.part] + p.index};
}

void MixedSamples::fill_at(int64_t g, uint64_t /*seed*/, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const {
  const Place at = locate(g);
  parts_[at.part]->fill_at(at.position, seed_[at.part], tokens, mask, seq_idx);
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
  nlohmann::json parts = nlohmann::json::array();
  for (size_t k = 0; k < parts_.size(); ++k)
    parts.push_back({{"data", parts_[k]->fingerprint()}, {"quota", quotas()[k]}, {"seed", seed_[k]}, {"offset", offset_[k]}});
  return nlohmann::json{{"mixture", parts}, {"from", from_}}.dump();
}

namespace {

// The parts of a saved state: a mixture's segment, or a single data set as a mixture of one.
struct Saved {
  std::string data;
  int64_t quota = 1;
  uint64_t seed = 0;
  int64_t offset = 0;
};

bool is_mixture(const std::string& fingerprint) {
  const nlohmann::json j = nlohmann::json::parse(fingerprint, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.contains("mixture");
}

std::vector<Saved> saved_parts(const LoaderState& state, int64_t& from) {
  std::vector<Saved> saved;
  from = 0;
  if (!is_mixture(state.fingerprint)) return {{state.fingerprint, 1, state.seed, 0}};
  try {
    const nlohmann::json j = nlohmann::json::parse(state.fingerprint);
    for (const auto& p : j.at("mixture"))
      saved.push_back({p.at("data").get<std::string>(), p.at("quota").get<int64_t>(), p.at("seed").get<uint64_t>(),
                       p.at("offset").get<int64_t>()});
    from = j.at("from").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    fail("the saved loader state's mixture is damaged ({}): {}", e.what(), state.fingerprint.substr(0, 200));
  }
  COIL_CHECK(!saved.empty() && state.next_sample >= from, "bad loader state: next sample {} before its mixture's start {}",
             state.next_sample, from);
  COIL_CHECK(state.next_sample <= Interleave::kMaxPosition, "bad loader state: next sample {}", state.next_sample);
  for (const Saved& s : saved)
    COIL_CHECK(s.quota > 0 && s.offset >= 0 && s.offset <= Interleave::kMaxPosition,
               "bad loader state: a mixture part with quota {} and offset {}", s.quota, s.offset);
  return saved;
}

// Where each saved part is in its own order at the state's next sample.
std::vector<int64_t> positions(const std::vector<Saved>& saved, int64_t from, int64_t next_sample) {
  std::vector<int64_t> quotas;
  for (const Saved& s : saved) quotas.push_back(s.quota);
  const Interleave mix(quotas);
  std::vector<int64_t> out;
  for (size_t k = 0; k < saved.size(); ++k) out.push_back(saved[k].offset + mix.before(k, next_sample - from));
  return out;
}

}  // namespace

std::shared_ptr<const MixedSamples> MixedSamples::for_state(const LoaderState& state) const {
  int64_t from = 0;
  const std::vector<Saved> saved = saved_parts(state, from);
  bool same = saved.size() == parts_.size();
  for (size_t k = 0; same && k < parts_.size(); ++k) same = saved[k].data == parts_[k]->fingerprint() && saved[k].quota == quotas()[k];
  auto next = std::make_shared<MixedSamples>(*this);
  if (same) {  // this mixture: its segment as saved
    next->from_ = from;
    for (size_t k = 0; k < parts_.size(); ++k) next->seed_[k] = saved[k].seed, next->offset_[k] = saved[k].offset;
    return next;
  }
  // Another mixture (or a single set) before: each part that was there goes on from where it was.
  const std::vector<int64_t> at = positions(saved, from, state.next_sample);
  std::vector<bool> taken(saved.size(), false);
  bool any = false;
  next->from_ = state.next_sample;
  for (size_t k = 0; k < parts_.size(); ++k) {
    next->offset_[k] = 0;  // a new part starts at its beginning, in its own order
    for (size_t s = 0; s < saved.size(); ++s)
      if (!taken[s] && saved[s].data == parts_[k]->fingerprint()) {
        taken[s] = any = true;
        next->seed_[k] = saved[s].seed;
        next->offset_[k] = at[s];
        break;
      }
  }
  COIL_CHECK(any, "the saved loader state belongs to other data (none of its parts is in this run's data): {}",
             state.fingerprint.substr(0, 200));
  return next;
}

std::shared_ptr<const SampleSource> continue_from(std::shared_ptr<const SampleSource> source, const LoaderState& state) {
  if (auto mixture = std::dynamic_pointer_cast<const MixedSamples>(source)) return mixture->for_state(state);
  if (state.fingerprint == source->fingerprint()) return source;
  COIL_CHECK(is_mixture(state.fingerprint), "the saved loader state belongs to other data ({}), not to this run's ({})",
             state.fingerprint, source->fingerprint());
  const MixedSamples alone({source}, {"the data"}, {}, state.seed);
  return alone.for_state(state);
}

std::vector<std::string> describe_state(const LoaderState& state) {
  COIL_CHECK(state.kind != "streaming", "describe_state: a streaming state (data/streaming.h describes those)");
  if (!is_mixture(state.fingerprint))
    return {fmt::format("{}, next sample {} (seed {}; data {})", state.kind, state.next_sample, state.seed, state.fingerprint)};
  int64_t from = 0;
  const std::vector<Saved> saved = saved_parts(state, from);
  const std::vector<int64_t> at = positions(saved, from, state.next_sample);
  int64_t total = 0;
  for (const Saved& s : saved) total += s.quota;
  std::vector<std::string> out = {fmt::format("{}, next sample {}: a mixture of {} parts, as it is since sample {}", state.kind,
                                              state.next_sample, saved.size(), from)};
  for (size_t k = 0; k < saved.size(); ++k)
    out.push_back(fmt::format("part {}: next sample {} of its own order, {:.2f}% (data {})", k, at[k],
                              100.0 * static_cast<double>(saved[k].quota) / static_cast<double>(total), saved[k].data));
  return out;
}

std::vector<std::string> MixedSamples::describe(const std::string& unit) const {
  std::vector<std::string> out;
  for (size_t k = 0; k < parts_.size(); ++k)
    out.push_back(fmt::format("part {} {}: {:.2f}% ({} of the {} {} of an epoch: its {} {:.3g}x)", k, names_[k],
                              100.0 * static_cast<double>(quotas()[k]) / static_cast<double>(size_), quotas()[k], size_,
                              unit, parts_[k]->size(),
                              static_cast<double>(quotas()[k]) / static_cast<double>(parts_[k]->size())));
  return out;
}

}  // namespace coil::data
