// Tokenizers: sentencepiece models, trained by `coil tokenizer train`, and Hugging Face's
// tokenizer.json files (BPE, byte-level: GPT-2, GPT-NeoX, Llama-3 style; character-level with byte
// fallback: Llama-2, Mistral, Gemma style; and Unigram; data/bpe.h), behind one interface:
// the loaders, SFT, prepare, generate and chat do not know which. The kind is chosen by content
// (a file or bytes that begin with '{' are a tokenizer.json), so a checkpoint's copy works too.
//
// Coil's tokenizers are lossless: identity normalization, no dummy prefix, whitespace kept, and
// byte fallback, so decode(encode(text)) == text for any valid UTF-8. The ids of the special
// tokens of the models it trains are fixed: <unk> 0, <s> (BOS) 1, </s> (EOS) 2, <pad> 3, then the
// markers of the SFT template (data/sft.h) as single tokens. Other sentencepiece models load too
// (their EOS and PAD ids are read from the model), as long as they have an EOS. A tokenizer.json
// names its BOS, EOS and PAD as data/bpe.h says; without a PAD, EOS pads (masked out). The SFT
// template's markers are single tokens in Coil's sentencepiece models; a tokenizer.json tokenizes
// them as text (unless it has them as added tokens), which keeps the loss mask exact because the
// prompt and the response are tokenized apart (data/sft.h).
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
  // A sentencepiece .model or a tokenizer.json.
  explicit Tokenizer(const std::string& model_path);
  // A model held in memory (the copy a checkpoint keeps), either kind; `origin` names it in errors.
  static Tokenizer from_bytes(const std::string& model, const std::string& origin);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Appends the ids of `text` to `out`. Safe to call from several threads at once.
  void encode(std::string_view text, std::vector<int32_t>& out) const;
  std::vector<int32_t> encode(std::string_view text) const;
  // The same with the file's post-processor around it (a tokenizer.json's template BOS/EOS, as
  // `tokenizers`' add_special_tokens=True); sentencepiece models add nothing.
  std::vector<int32_t> encode_with_specials(std::string_view text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;

  int32_t vocab_size() const;
  int32_t bos() const { return bos_; }  // -1 when there is none
  int32_t eos() const { return eos_; }
  int32_t pad() const { return pad_; }  // EOS when the model has no <pad>
  bool is_bpe_json() const;             // a tokenizer.json (else sentencepiece)

  struct Impl;  // the interface of the two kinds (tokenizer.cpp)
  const std::string& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }  // of the .model file, as sha256sum prints it

 private:
  Tokenizer();
  void load(const std::string& bytes);
  std::unique_ptr<Impl> impl_;
  std::string path_, sha256_;
  int32_t bos_ = -1, eos_ = SpecialTokens::kEos, pad_ = SpecialTokens::kPad;
};

// Throws coil::Error unless every id of a tokenizer (vocab_size ids) is a row of the model's
// embedding (model_vocab rows).
void check_vocab_fits(int64_t vocab_size, int64_t model_vocab, const std::string& tokenizer_path);

// SHA-256 of a file's bytes, as lowercase hex.
std::string sha256_file(const std::string& path);
// SHA-256 of bytes in memory, as lowercase hex.
std::string sha256_bytes(const std::string& bytes);

}  // namespace coil::data
