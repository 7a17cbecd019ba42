#include "data/sft.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <numeric>
#include <set>
#include <thread>
#include <tuple>

#include "data/tokenizer.h"
#include "util/error.h"

namespace coil::data {

const std::vector<std::string>& sft_markers() {
  static const std::vector<std::string> m = {"### Instruction:", "### Input:", "### Response:"};
  return m;
}

namespace {
const char* const kAlpaca =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n{response}";
const char* const kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}";
const char* const kSlots[] = {"instruction", "input", "response"};

bool name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Calls on_slot(name, at) for every "{name}" (a name of letters, digits and '_') in text; other
// braces are text.
template <typename F>
void for_each_slot(const std::string& text, F on_slot) {
  for (size_t i = text.find('{'); i != std::string::npos; i = text.find('{', i + 1)) {
    size_t j = i + 1;
    while (j < text.size() && name_char(text[j])) ++j;
    if (j > i + 1 && j < text.size() && text[j] == '}') on_slot(text.substr(i + 1, j - i - 1), i);
  }
}
}  // namespace

std::string SftTemplate::problem(const std::string& text, bool no_input) {
  std::map<std::string, int> count;
  std::string unknown;
  size_t response_at = std::string::npos;
  for_each_slot(text, [&](const std::string& name, size_t at) {
    if (std::find(std::begin(kSlots), std::end(kSlots), name) == std::end(kSlots)) {
      if (unknown.empty()) unknown = name;
      return;
    }
    ++count[name];
    if (name == "response") response_at = at;
  });
  if (!unknown.empty()) return fmt::format("has an unknown slot {{{}}} (slots: {{instruction}}, {{input}}, {{response}})", unknown);
  if (count["instruction"] != 1) return fmt::format("must have one {{instruction}} slot, not {}", count["instruction"]);
  if (count["response"] != 1) return fmt::format("must have one {{response}} slot, not {}", count["response"]);
  if (response_at + std::string("{response}").size() != text.size()) return "must end with {response}";
  if (no_input && count["input"] > 0) return "is for examples without an input: it must have no {input} slot";
  if (!no_input && count["input"] != 1) return fmt::format("must have one {{input}} slot, not {}", count["input"]);
  return "";
}

std::vector<SftTemplate::Piece> SftTemplate::parse(const std::string& text) {
  std::vector<Piece> out;
  size_t from = 0;
  for_each_slot(text, [&](const std::string& name, size_t at) {
    if (at < from) return;
    out.push_back({text.substr(from, at - from)});
    from = at + name.size() + 2;
    if (name != "response") out.push_back({"", name == "instruction" ? 0 : 1});
  });
  out.erase(std::remove_if(out.begin(), out.end(), [](const Piece& p) { return p.slot < 0 && p.text.empty(); }), out.end());
  return out;  // the text after {response} is empty: problem() saw to it
}

SftTemplate::SftTemplate() : SftTemplate(kAlpaca, kAlpacaNoInput) { id_.clear(); }

SftTemplate::SftTemplate(const std::string& prompt, const std::string& prompt_no_input) {
  if (const std::string p = problem(prompt, false); !p.empty()) fail("the SFT template {}", p);
  if (const std::string p = prompt_no_input.empty() ? "" : problem(prompt_no_input, true); !p.empty())
    fail("the SFT template for examples without an input {}", p);
  with_ = parse(prompt);
  without_ = parse(prompt_no_input.empty() ? prompt : prompt_no_input);
  uint64_t h = 1469598103934665603ull;  // FNV-1a of both texts, for the data's fingerprint
  for (char c : prompt + '\0' + prompt_no_input) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  id_ = fmt::format("{:016x}", h);
}

SftTemplate SftTemplate::from_config(const std::string& templ, const std::string& no_input) {
  if (templ != "alpaca") return {templ, no_input};
  COIL_CHECK(no_input.empty(), "data.sft_template_no_input is for a template of one's own (data.sft_template is \"alpaca\")");
  return {};
}

std::string SftTemplate::prompt(const AlpacaExample& e) const {
  std::string out;
  for (const Piece& p : e.input.empty() ? without_ : with_) out += p.slot < 0 ? p.text : p.slot == 0 ? e.instruction : e.input;
  return out;
}

std::string alpaca_prompt(const AlpacaExample& e) {
  static const SftTemplate alpaca;
  return alpaca.prompt(e);
}

bool make_sft_sample(const Tokenizer& tokenizer, const AlpacaExample& example, int64_t seq_len, SftSample& out,
                     const SftTemplate& templ) {
  const size_t cols = static_cast<size_t>(seq_len + 1);
  out.tokens.clear();
  tokenizer.encode(templ.prompt(example), out.tokens);
  const size_t prompt = out.tokens.size();
  tokenizer.encode(example.output, out.tokens);
  out.tokens.push_back(tokenizer.eos());
  if (prompt >= cols) return false;  // not one response token fits
  out.tokens.resize(std::min(out.tokens.size(), cols));
  out.length = static_cast<int64_t>(out.tokens.size());
  out.mask.assign(cols, 0);
  std::fill(out.mask.begin() + static_cast<ptrdiff_t>(prompt), out.mask.begin() + static_cast<ptrdiff_t>(out.tokens.size()), 1);
  out.tokens.resize(cols, tokenizer.pad());
  return true;
}

SftDataset::SftDataset(const std::vector<std::string>& files, const Tokenizer& tokenizer, int64_t seq_len,
                       const ReadOptions& options, int threads, const SftTemplate& templ)
    : seq_len_(seq_len), pad_(tokenizer.pad()) {
  COIL_CHECK(seq_len >= 1, "seq_len must be >= 1, not {}", seq_len);
  std::vector<AlpacaExample> examples = read_alpaca(files, options, &stats_);
  if (examples.empty()) fail("no Alpaca example in {} ({})", files.empty() ? "" : files[0], stats_.summary());
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<SftSample> all(examples.size());
  std::vector<uint8_t> kept(examples.size());
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < examples.size(); i += static_cast<size_t>(threads))
        kept[i] = make_sft_sample(tokenizer, examples[i], seq_len, all[i], templ);
    });
  for (auto& w : workers) w.join();
  for (size_t i = 0; i < all.size(); ++i) {
    if (!kept[i]) {
      ++dropped_;
      continue;
    }
    response_tokens_ += std::count(all[i].mask.begin(), all[i].mask.end(), 1);
    samples_.push_back(std::move(all[i]));
  }
  if (samples_.empty())
    fail("every one of the {} SFT examples was dropped: no response token fits in seq_len {}", examples.size(),
         seq_len);
  fingerprint_ = fmt::format("sft:{}:{}:{}:{}", samples_.size(), response_tokens_, seq_len, tokenizer.sha256().substr(0, 16));
  if (!templ.id().empty()) fingerprint_ += ":template-" + templ.id();  // Alpaca's: as before templates
}

void SftDataset::fill(int64_t i, int32_t* tokens, uint8_t* mask) const {
  const SftSample& s = samples_[static_cast<size_t>(i)];
  std::copy(s.tokens.begin(), s.tokens.end(), tokens);
  if (mask) std::copy(s.mask.begin(), s.mask.end(), mask);
}

// ---- Packing ------------------------------------------------------------------------------------

PackedSftSamples::PackedSftSamples(std::shared_ptr<const SftDataset> examples, uint64_t seed)
    : examples_(std::move(examples)), seed_(seed) {
  COIL_CHECK(examples_->size() > 0, "the SFT data set has no example");
  for (int64_t i = 0; i < examples_->size(); ++i) {
    const SftSample& s = (*examples_)[i];
    target_tokens_ += std::count(s.mask.begin() + 1, s.mask.begin() + s.length, 1);
  }
  rows0_ = rows_in_epoch(seed, 0);
}

SftPacking pack_best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t cols, int64_t window, uint64_t key) {
  COIL_CHECK(window > 0 && cols > 0, "packing window {} and row length {}", window, cols);
  const int64_t n = static_cast<int64_t>(lengths.size());
  SftPacking p;
  p.order.reserve(static_cast<size_t>(n));
  p.row_start.reserve(static_cast<size_t>(n / 2 + 2));
  std::vector<int64_t> by_length, row_of, count, start;
  std::set<std::pair<int64_t, int64_t>> room;  // (free tokens, row) of the rows with room left
  for (int64_t w = 0, from = 0; from < n; ++w, from += window) {
    const int64_t to = std::min(n, from + window);
    by_length.resize(static_cast<size_t>(to - from));
    std::iota(by_length.begin(), by_length.end(), from);
    std::sort(by_length.begin(), by_length.end(), [&](int64_t x, int64_t y) {
      const int64_t lx = lengths[static_cast<size_t>(x)], ly = lengths[static_cast<size_t>(y)];
      return lx != ly ? lx > ly : x < y;
    });
    row_of.assign(static_cast<size_t>(to - from), 0);
    room.clear();
    int64_t rows = 0;
    for (const int64_t k : by_length) {
      const int64_t len = lengths[static_cast<size_t>(k)];
      COIL_CHECK(len >= 1 && len <= cols, "an example of {} tokens for rows of {}", len, cols);
      auto it = room.lower_bound({len, -1});  // the least room that fits; the row opened first
      int64_t row = rows, free = cols;
      if (it == room.end()) {
        ++rows;
      } else {
        std::tie(free, row) = *it;
        room.erase(it);
      }
      row_of[static_cast<size_t>(k - from)] = row;
      if (free - len > 0) room.emplace(free - len, row);
    }
    // Each row's positions in the epoch's order (a counting sort by row), the rows shuffled.
    count.assign(static_cast<size_t>(rows) + 1, 0);
    for (const int64_t r : row_of) ++count[static_cast<size_t>(r) + 1];
    std::partial_sum(count.begin(), count.end(), count.begin());  // count[r]: where row r starts
    start = count;
    std::vector<int64_t> grouped(row_of.size());
    for (int64_t k = from; k < to; ++k) grouped[static_cast<size_t>(start[static_cast<size_t>(row_of[static_cast<size_t>(k - from)])]++)] = k;
    const Permutation shuffle(static_cast<uint64_t>(rows), mix64(key ^ mix64(static_cast<uint64_t>(w) + 1)));
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t src = shuffle(static_cast<uint64_t>(r));
      p.row_start.push_back(static_cast<int64_t>(p.order.size()));
      p.order.insert(p.order.end(), grouped.begin() + count[src], grouped.begin() + count[src + 1]);
    }
  }
  p.row_start.push_back(n);
  return p;
}

std::shared_ptr<const PackedSftSamples::Packing> PackedSftSamples::packing(uint64_t seed, int64_t epoch) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find({seed, epoch});
    if (it != cache_.end()) return it->second;
  }
  const int64_t n = examples_->size();
  std::vector<int64_t> examples(static_cast<size_t>(n)), lengths(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    examples[static_cast<size_t>(k)] = sample_at(epoch * n + k, n, seed);
    lengths[static_cast<size_t>(k)] = (*examples_)[examples[static_cast<size_t>(k)]].length;
  }
  auto p = std::make_shared<Packing>(pack_best_fit_decreasing(
      lengths, examples_->cols(), kPackWindow, mix64(seed) ^ mix64(static_cast<uint64_t>(epoch) * 0x9e3779b97f4a7c15ULL + 1)));
  for (int64_t& k : p->order) k = examples[static_cast<size_t>(k)];  // positions -> examples
  std::lock_guard<std::mutex> lock(mu_);
  if (cache_.size() >= 4) cache_.erase(cache_.begin());  // the lowest (seed, epoch): training moves forward
  cache_[{seed, epoch}] = p;
  return p;
}

int64_t PackedSftSamples::rows_in_epoch(uint64_t seed, int64_t epoch) const {
  return static_cast<int64_t>(packing(seed, epoch)->row_start.size()) - 1;
}

std::pair<int64_t, int64_t> PackedSftSamples::locate(uint64_t seed, int64_t g) const {
  COIL_CHECK(g >= 0, "row {} of the packed SFT data", g);
  std::vector<int64_t> before;
  {
    std::lock_guard<std::mutex> lock(mu_);
    before = rows_before_[seed];  // R(0) = 0, R(1), ...: rows before each epoch
  }
  if (before.empty()) before.push_back(0);
  // Packs epochs until one ends past g (each epoch has at least one row).
  while (before.back() <= g) before.push_back(before.back() + rows_in_epoch(seed, static_cast<int64_t>(before.size()) - 1));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (rows_before_[seed].size() < before.size()) rows_before_[seed] = before;
  }
  const int64_t e = static_cast<int64_t>(std::upper_bound(before.begin(), before.end(), g) - before.begin()) - 1;
  return {e, g - before[static_cast<size_t>(e)]};
}

void PackedSftSamples::write_row(const Packing& p, int64_t row, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const {
  const int64_t cols = examples_->cols();
  int64_t at = 0;
  int32_t number = 0;
  for (int64_t k = p.row_start[static_cast<size_t>(row)]; k < p.row_start[static_cast<size_t>(row) + 1]; ++k, ++number) {
    const SftSample& s = (*examples_)[p.order[static_cast<size_t>(k)]];
    std::copy(s.tokens.begin(), s.tokens.begin() + s.length, tokens + at);
    if (mask) {
      std::copy(s.mask.begin(), s.mask.begin() + s.length, mask + at);
      mask[at] = 0;  // an example's first token is no target of the one before
    }
    if (seq_idx) std::fill_n(seq_idx + at, s.length, number);
    at += s.length;
  }
  std::fill(tokens + at, tokens + cols, examples_->pad());
  if (mask) std::fill(mask + at, mask + cols, uint8_t{0});
  if (seq_idx) std::fill(seq_idx + at, seq_idx + cols, number);
}

void PackedSftSamples::fill(int64_t i, int32_t* tokens, uint8_t* mask) const {
  write_row(*packing(seed_, 0), i, tokens, mask, nullptr);
}

void PackedSftSamples::fill_seq_idx(int64_t i, int32_t* seq_idx) const {
  std::vector<int32_t> tokens(static_cast<size_t>(cols()));
  write_row(*packing(seed_, 0), i, tokens.data(), nullptr, seq_idx);
}

void PackedSftSamples::fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const {
  const auto [epoch, row] = locate(seed, g);
  write_row(*packing(seed, epoch), row, tokens, mask, seq_idx);
}

std::vector<int64_t> PackedSftSamples::row_examples(uint64_t seed, int64_t epoch, int64_t row) const {
  auto p = packing(seed, epoch);
  COIL_CHECK(row >= 0 && row + 1 < static_cast<int64_t>(p->row_start.size()), "epoch {} has no row {}", epoch, row);
  return {p->order.begin() + p->row_start[static_cast<size_t>(row)], p->order.begin() + p->row_start[static_cast<size_t>(row) + 1]};
}

int64_t sft_template_tokens(const Tokenizer& tokenizer, const SftTemplate& templ) {
  std::vector<int32_t> ids;
  tokenizer.encode(templ.prompt(AlpacaExample{}), ids);
  return static_cast<int64_t>(ids.size());
}

void check_sft_packing(const Tokenizer& tokenizer, const SftTemplate& templ, int64_t seq_len) {
  const int64_t t = sft_template_tokens(tokenizer, templ);
  COIL_CHECK(seq_len >= t, "data.sft_packing: train.seq_len {} is shorter than the SFT template itself ({} tokens)",
             seq_len, t);
}

}  // namespace coil::data
