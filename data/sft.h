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
#include <map>
#include <memory>
#include <mutex>
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
  int64_t length = 0;  // tokens before the padding
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
  int32_t pad() const { return pad_; }
  int64_t dropped() const { return dropped_; }          // examples with no response token left
  int64_t response_tokens() const { return response_tokens_; }
  const ReadStats& read_stats() const { return stats_; }
  const SftSample& operator[](int64_t i) const { return samples_[static_cast<size_t>(i)]; }

 private:
  int64_t seq_len_;
  int32_t pad_ = 0;
  std::vector<SftSample> samples_;
  int64_t dropped_ = 0, response_tokens_ = 0;
  ReadStats stats_;
  std::string fingerprint_;
};

// ---- Packing (data.sft_packing) ------------------------------------------------------------------
//
// Examples packed several to a row of seq_len + 1 tokens instead of one per padded row, by best fit
// decreasing (BFD, as TRL's default packing_strategy="bfd"). In epoch e the examples are taken in
// the order of the indexed loader's permutation of that epoch (sample_at(e S + k, S, seed),
// data/loader.h) and cut into windows of kPackWindow examples (the last one shorter); within a
// window they are sorted by length, longest first (ties: the earlier in that order first), and each
// (its tokens, cut as in make_sft_sample, ending with its EOS) goes into the open row with the least
// room that still fits it (ties: the row opened first), else into a new row: an ordered set keyed
// by free space, O(n log n). A row keeps its examples in the epoch's order. The window's rows are
// then shuffled by a permutation keyed by (seed, epoch, window), so that rows do not come sorted by
// length, and the windows' rows follow one another. On Alpaca-like lengths at seq_len 512 this
// leaves 1.0% of padding, 3.00x the examples a row of padded SFT (no packing of whole examples can
// pass 3.03x there), where first fit over the 16 rows opened last (before 2026-12-01) left 4.3%
// (2.90x); on the demo's short examples 8.41x (docs/PERFORMANCE.md). An epoch of 20k examples
// packs in ~13 ms of CPU. So an epoch's rows are a pure function of (seed, epoch), never of the number
// of ranks, and the loader's order contract holds with rows in place of samples: global row g is
// row g - R(e) of epoch e, R(e) being the rows of the epochs before e (they vary a little from
// epoch to epoch). N-independence, exact resume and resharding hold as for the padded loader; the
// state's next_sample counts rows.
//
// In a row, seq_idx numbers the examples 0, 1, 2, ... and the padding gets the next number; the
// mask is each example's own (response and EOS), 0 on the padding, and 0 on each example's first
// token (which would otherwise be a target predicted from the previous example's EOS).

// An epoch's packing: positions into the epoch's order, row after row.
struct SftPacking {
  std::vector<int64_t> order;      // positions k (the k-th example of the epoch's order)
  std::vector<int64_t> row_start;  // row r holds order[row_start[r], row_start[r + 1]); rows + 1 entries
  int64_t rows() const { return static_cast<int64_t>(row_start.size()) - 1; }
};

// Best fit decreasing of lengths[k] (the k-th example's tokens, each 1..cols) into rows of cols,
// in windows of `window` positions, each window's rows shuffled by a permutation keyed by
// mix64(key ^ mix64(window index + 1)): the packing PackedSftSamples uses (key: of seed and epoch).
SftPacking pack_best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t cols, int64_t window, uint64_t key);

class PackedSftSamples : public SampleSource {
 public:
  // Examples per BFD window. On Alpaca-like lengths (20k examples) windows of 1,024 / 4,096 /
  // 32,768 make 6,683 / 6,670 / 6,669 rows (docs/PERFORMANCE.md): past a few thousand the window
  // hardly matters, and a large one costs only memory (two int64 a example). Stanford Alpaca's 52k
  // examples are 2 windows.
  static constexpr int64_t kPackWindow = 32768;
  // seed: the run's (size() is the row count of its epoch 0).
  PackedSftSamples(std::shared_ptr<const SftDataset> examples, uint64_t seed);
  int64_t size() const override { return rows0_; }  // rows of epoch 0 (others differ a little)
  int64_t cols() const override { return examples_->cols(); }
  int64_t target_tokens() const override { return target_tokens_; }
  bool has_mask() const override { return true; }
  bool has_seq_idx() const override { return true; }
  // Row i of epoch 0 of the run's seed.
  void fill(int64_t i, int32_t* tokens, uint8_t* mask) const override;
  void fill_seq_idx(int64_t i, int32_t* seq_idx) const override;
  void fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const override;
  std::string kind() const override { return "sft"; }
  // ":packed-bfd": the state of a run packed first-fit (before 2026-12-01, ":packed") counts other rows,
  // so it is refused rather than resumed into other examples.
  std::string fingerprint() const override { return examples_->fingerprint() + ":packed-bfd"; }
  // The examples of row `row` of epoch `epoch` (indices into the SftDataset), in order.
  std::vector<int64_t> row_examples(uint64_t seed, int64_t epoch, int64_t row) const;
  int64_t rows_in_epoch(uint64_t seed, int64_t epoch) const;

 private:
  using Packing = SftPacking;  // here order holds the examples (indices into the SftDataset)
  std::shared_ptr<const Packing> packing(uint64_t seed, int64_t epoch) const;
  // The epoch of global row g and the row within it.
  std::pair<int64_t, int64_t> locate(uint64_t seed, int64_t g) const;
  void write_row(const Packing& p, int64_t row, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const;

  std::shared_ptr<const SftDataset> examples_;
  uint64_t seed_;
  int64_t rows0_ = 0, target_tokens_ = 0;
  mutable std::mutex mu_;
  mutable std::map<uint64_t, std::vector<int64_t>> rows_before_;  // per seed: R(0), R(1), ...
  mutable std::map<std::pair<uint64_t, int64_t>, std::shared_ptr<const Packing>> cache_;  // a few recent epochs
};

// The tokens of the template itself (its prompt with every slot empty).
int64_t sft_template_tokens(const Tokenizer& tokenizer, const SftTemplate& templ);
// data.sft_packing with a train.seq_len shorter than the template itself is a one-line coil::Error
// naming both keys.
void check_sft_packing(const Tokenizer& tokenizer, const SftTemplate& templ, int64_t seq_len);

}  // namespace coil::data
