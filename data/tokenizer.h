// Tokenizers: sentencepiece models, trained by `coil tokenizer train` and used everywhere else.
//
// Coil's tokenizers are lossless: identity normalization, no dummy prefix, whitespace kept, and
// byte fallback, so decode(encode(text)) == text for any valid UTF-8. The ids of the special
// tokens of the models it trains are fixed: <unk> 0, <s> (BOS) 1, </s> (EOS) 2, <pad> 3, then the
// markers of the SFT template (data/sft.h) as single tokens. Other sentencepiece models load too
// (their EOS and PAD ids are read from the model), as long as they have an EOS.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/reader.h"

namespace coil::data {

struct SpecialTokens {
  static constexpr int32_t kUnk = 0, kBos = 1, kEos = 2, kPad = 3;
};

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;  // files, read as pretraining documents (data/reader.h)
  ReadOptions read;
  std::string output_prefix;        // writes PREFIX.model and PREFIX.vocab
  int vocab_size = 8192;
  std::string model_type = "unigram";  // or "bpe"
  int64_t max_sentences = 2'000'000;   // lines sampled for training (sentencepiece's input_sentence_size)
  int threads = 0;                     // 0: all cores
};

// Trains a sentencepiece model on the documents of the inputs (each line of a document is one
// training sentence). Writes PREFIX.model and PREFIX.vocab, whole or not at all.
void train_tokenizer(const TokenizerTrainOptions& options);

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);
  // A model held in memory (the copy a checkpoint keeps); `origin` names it in errors.
  static Tokenizer from_bytes(const std::string& model, const std::string& origin);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Appends the ids of `text` to `out`. Safe to call from several threads at once.
  void encode(std::string_view text, std::vector<int32_t>& out) const;
  std::vector<int32_t> encode(std::string_view text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;

  int32_t vocab_size() const;
  int32_t eos() const { return eos_; }
  int32_t pad() const { return pad_; }  // EOS when the model has no <pad>
  const std::string& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }  // of the .model file, as sha256sum prints it

 private:
  Tokenizer();
  void init();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_, sha256_;
  int32_t eos_ = SpecialTokens::kEos, pad_ = SpecialTokens::kPad;
};

// Throws coil::Error unless every id of a tokenizer (vocab_size ids) is a row of the model's
// embedding (model_vocab rows).
void check_vocab_fits(int64_t vocab_size, int64_t model_vocab, const std::string& tokenizer_path);

// SHA-256 of a file's bytes, as lowercase hex.
std::string sha256_file(const std::string& path);

}  // namespace coil::data
