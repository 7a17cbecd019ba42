// Supervised fine-tuning data: Alpaca examples in a prompt template (Alpaca's, or one of the
// config's: data.sft_template), tokenized with a loss mask that is on for the response only.
//
// The default template (Stanford Alpaca's, so that models and users trained on it feel at home):
//
//   Below is an instruction that describes a task, paired with an input that provides further
//   context. Write a response that appropriately completes the request.
//
//   ### Instruction:
//   {instruction}
//
//   ### Input:
//   {input}
//
//   ### Response:
//   {output}</s>
//
// Without an input, the first sentence reads "Below is an instruction that describes a task." and
// the "### Input:" block is left out.
//
// A template of one's own is text with the slots {instruction}, {input} and {response}:
// each once, {response} last; any other {name} is an error (other braces are text). An optional
// variant for examples without an input (no {input} slot) is used for those; without one, such an
// example's {input} is empty. The prompt is the template up to {response}, filled in.
//
// A sample is tokens(prompt) + tokens(output) + EOS: the prompt and the response are tokenized
// apart, so the boundary is exact whatever the markers tokenize to. The mask is 1 on the response
// tokens and the EOS (the tokens the model learns to produce) and 0 on the prompt and the padding. A sample longer than seq_len + 1 is cut at the end, which keeps the prompt and the start
// of the response; a sample left without any response token is dropped (and counted).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/reader.h"

namespace coil::data {

class Tokenizer;

// "### Instruction:", "### Input:", "### Response:" (single tokens in Coil's tokenizers).
const std::vector<std::string>& sft_markers();

// The prompt of an example: everything up to and including "### Response:\n".
std::string alpaca_prompt(const AlpacaExample& example);

// A prompt template: Alpaca's, or one given as text with {instruction}, {input}, {response} slots.
class SftTemplate {
 public:
  SftTemplate();  // Alpaca's
  // prompt_no_input "": examples without an input use `prompt` with an empty {input}. A bad
  // template is a coil::Error naming the problem (e.g. "has no {response} slot").
  SftTemplate(const std::string& prompt, const std::string& prompt_no_input);
  // data.sft_template and data.sft_template_no_input: "alpaca" (and ""), or a template's texts.
  static SftTemplate from_config(const std::string& templ, const std::string& no_input);
  // What is wrong with a template text, or "" (no_input: the variant, which must have no {input}).
  static std::string problem(const std::string& text, bool no_input);
  // The example's prompt: the template up to {response}, its slots filled in.
  std::string prompt(const AlpacaExample& example) const;
  // "" for Alpaca's, else a hash of the texts (part of the SFT data's fingerprint).
  const std::string& id() const { return id_; }

 private:
  struct Piece {
    std::string text;  // literal text, or
    int slot = -1;     // 0: instruction, 1: input
  };
  static std::vector<Piece> parse(const std::string& text);
  std::vector<Piece> with_, without_;
  std::string id_;
};

// tokens and mask of one sample, both seq_len + 1 long, padded with PAD (mask 0).
struct SftSample {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
};

// Tokenizes one example; false when no response token fits (the example is dropped).
bool make_sft_sample(const Tokenizer& tokenizer, const AlpacaExample& example, int64_t seq_len, SftSample& out,
                     const SftTemplate& templ = {});

// Every example of the files, tokenized (in parallel threads), the dropped ones counted; the
// samples of make_indexed_loader (data/loader.h), one example per row.
class SftDataset : public SampleSource {
 public:
  SftDataset(const std::vector<std::string>& files, const Tokenizer& tokenizer, int64_t seq_len,
             const ReadOptions& options = {}, int threads = 0, const SftTemplate& templ = {});
  int64_t size() const override { return static_cast<int64_t>(samples_.size()); }
  int64_t cols() const override { return seq_len_ + 1; }
  int64_t target_tokens() const override { return response_tokens_; }
  bool has_mask() const override { return true; }
  void fill(int64_t i, int32_t* tokens, uint8_t* mask) const override;
  std::string kind() const override { return "sft"; }
  std::string fingerprint() const override { return fingerprint_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t dropped() const { return dropped_; }          // examples with no response token left
  int64_t response_tokens() const { return response_tokens_; }
  const ReadStats& read_stats() const { return stats_; }
  const SftSample& operator[](int64_t i) const { return samples_[static_cast<size_t>(i)]; }

 private:
  int64_t seq_len_;
  std::vector<SftSample> samples_;
  int64_t dropped_ = 0, response_tokens_ = 0;
  ReadStats stats_;
  std::string fingerprint_;
};

}  // namespace coil::data
