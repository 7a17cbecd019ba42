#include "data/sft.h"

#include <algorithm>
#include <thread>

#include "data/tokenizer.h"
#include "util/error.h"

namespace coil::data {

const std::vector<std::string>& sft_markers() {
  static const std::vector<std::string> m = {"### Instruction:", "### Input:", "### Response:"};
  return m;
}

std::string alpaca_prompt(const AlpacaExample& e) {
  if (e.input.empty())
    return "Below is an instruction that describes a task. Write a response that appropriately completes "
           "the request.\n\n### Instruction:\n" +
           e.instruction + "\n\n### Response:\n";
  return "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
         e.instruction + "\n\n### Input:\n" + e.input + "\n\n### Response:\n";
}

bool make_sft_sample(const Tokenizer& tokenizer, const AlpacaExample& example, int64_t seq_len, SftSample& out) {
  const size_t cols = static_cast<size_t>(seq_len + 1);
  out.tokens.clear();
  tokenizer.encode(alpaca_prompt(example), out.tokens);
  const size_t prompt = out.tokens.size();
  tokenizer.encode(example.output, out.tokens);
  out.tokens.push_back(tokenizer.eos());
  if (prompt >= cols) return false;  // not one response token fits
  out.tokens.resize(std::min(out.tokens.size(), cols));
  out.mask.assign(cols, 0);
  std::fill(out.mask.begin() + static_cast<ptrdiff_t>(prompt), out.mask.begin() + static_cast<ptrdiff_t>(out.tokens.size()), 1);
  out.tokens.resize(cols, tokenizer.pad());
  return true;
}

SftDataset::SftDataset(const std::vector<std::string>& files, const Tokenizer& tokenizer, int64_t seq_len,
                       const ReadOptions& options, int threads)
    : seq_len_(seq_len) {
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
        kept[i] = make_sft_sample(tokenizer, examples[i], seq_len, all[i]);
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
}

void SftDataset::fill(int64_t i, int32_t* tokens, uint8_t* mask) const {
  const SftSample& s = samples_[static_cast<size_t>(i)];
  std::copy(s.tokens.begin(), s.tokens.end(), tokens);
  if (mask) std::copy(s.mask.begin(), s.mask.end(), mask);
}

}  // namespace coil::data
