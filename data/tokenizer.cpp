#include "data/tokenizer.h"

#include <openssl/evp.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "data/bpe.h"
#include "data/progress.h"
#include "data/sft.h"
#include "util/error.h"

namespace coil::data {
namespace fs = std::filesystem;

namespace {

// Feeds sentencepiece's trainer one line of a document at a time, straight from the files.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  LineIterator(const std::vector<std::string>& files, const ReadOptions& options) : files_(files), options_(options) {
    Next();
  }
  bool done() const override { return done_; }
  void Next() override {
    while (true) {
      // The next non-empty line of the current document.
      while (pos_ < text_.size()) {
        size_t nl = text_.find('\n', pos_);
        if (nl == std::string::npos) nl = text_.size();
        std::string_view line = std::string_view(text_).substr(pos_, nl - pos_);
        pos_ = nl + 1;
        if (line.find_first_not_of(" \t\r") != std::string_view::npos) {
          value_.assign(line);
          return;
        }
      }
      if (!next_document()) {
        done_ = true;
        if (options_.progress) options_.progress->finish();  // reading is over; training starts
        return;
      }
    }
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }
  const ReadStats& stats() const { return stats_; }

 private:
  bool next_document() {
    std::string why;
    while (true) {
      if (!reader_) {
        if (file_ >= files_.size()) return false;
        reader_ = std::make_unique<RecordReader>(files_[file_], options_);
      }
      Record r;
      if (!reader_->next(r)) {
        reader_.reset();
        ++file_;
        continue;
      }
      ++stats_.records;
      if (r.too_long) {
        skip_record(files_[file_], r.line, "record too long", options_, stats_, true);
      } else if (!document_text(r, reader_->is_json(), options_, text_, why)) {
        skip_record(files_[file_], r.line, why, options_, stats_);
      } else if (text_.empty()) {
        ++stats_.empty;
      } else {
        ++stats_.documents;
        if (options_.progress) options_.progress->add_documents(1);
        pos_ = 0;
        return true;
      }
    }
  }

  std::vector<std::string> files_;
  ReadOptions options_;
  size_t file_ = 0;
  std::unique_ptr<RecordReader> reader_;
  std::string text_, value_;
  size_t pos_ = 0;
  bool done_ = false;
  ReadStats stats_;
};

}  // namespace

void train_tokenizer(const TokenizerTrainOptions& o) {
  COIL_CHECK(o.vocab_size >= 300, "--vocab-size {} is too small: byte fallback alone takes 256 ids", o.vocab_size);
  COIL_CHECK(o.model_type == "unigram" || o.model_type == "bpe", "--model-type must be unigram or bpe, not '{}'",
             o.model_type);
  COIL_CHECK(!o.output_prefix.empty(), "no output prefix given");
  fs::path prefix(o.output_prefix);
  if (prefix.has_parent_path()) fs::create_directories(prefix.parent_path());
  // The markers of the SFT template become single tokens. sentencepiece matches user-defined
  // symbols after whitespace is escaped, so their spaces are written as U+2581.
  std::string markers;
  for (const std::string& m : sft_markers()) {
    std::string escaped;
    for (char c : m) escaped += c == ' ' ? std::string("\xe2\x96\x81") : std::string(1, c);
    markers += (markers.empty() ? "" : ",") + escaped;
  }
  const std::string tmp = o.output_prefix + ".tmp";
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  LineIterator lines(o.inputs, o.read);
  if (lines.done()) fail("no text to train a tokenizer on in {} input file(s)", o.inputs.size());
  auto status = sentencepiece::SentencePieceTrainer::Train(
      {{"model_prefix", tmp},
       {"vocab_size", std::to_string(o.vocab_size)},
       {"model_type", o.model_type},
       {"byte_fallback", "true"},
       {"character_coverage", "0.9995"},
       {"normalization_rule_name", "identity"},
       {"remove_extra_whitespaces", "false"},
       {"add_dummy_prefix", "false"},
       {"allow_whitespace_only_pieces", "true"},
       {"split_digits", "true"},
       {"max_sentence_length", "16384"},
       {"input_sentence_size", std::to_string(o.max_sentences)},
       {"shuffle_input_sentence", "true"},
       {"num_threads", std::to_string(threads)},
       {"unk_id", "0"},
       {"bos_id", "1"},
       {"eos_id", "2"},
       {"pad_id", "3"},
       {"user_defined_symbols", markers},
       {"minloglevel", "1"}},
      &lines);
  if (!status.ok()) {
    std::error_code ec;
    fs::remove(tmp + ".model", ec);
    fs::remove(tmp + ".vocab", ec);
    fail("tokenizer training failed: {}", status.message());
  }
  fs::rename(tmp + ".vocab", o.output_prefix + ".vocab");
  fs::rename(tmp + ".model", o.output_prefix + ".model");  // the model last: its presence means done
  fmt::print("tokenizer: {} ({} {}, {} ids), trained on {}\n", o.output_prefix + ".model", o.model_type,
             "byte fallback", o.vocab_size, lines.stats().summary());
}

// The two kinds behind Tokenizer.
struct Tokenizer::Impl {
  virtual ~Impl() = default;
  virtual void encode(std::string_view text, std::vector<int32_t>& out) const = 0;
  virtual void encode_with_specials(std::string_view text, std::vector<int32_t>& out) const { encode(text, out); }
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual std::string piece(int32_t id) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual bool bpe_json() const = 0;
  int32_t bos = -1, eos = -1, pad = -1;
};

namespace {

struct SentencepieceImpl : Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string origin;
  // The byte-fallback ids of U+2581 ("\xe2\x96\x81"), when the model has them: sentencepiece writes
  // spaces as that character, so a U+2581 in the text itself would decode as a space. encode()
  // gives each such character as its three bytes instead (found by fuzzing: tests/fuzz/
  // corpus/tokenizer_text/meta-space.txt), which keeps decode(encode(text)) == text.
  std::vector<int> meta_space_bytes;
  SentencepieceImpl(const std::string& bytes, const std::string& origin_) : origin(origin_) {
    // A malformed model is a status from sentencepiece, except when its pieces break the trie
    // builder (darts_clone), which throws instead (found by fuzzing, e.g. an empty piece).
    sentencepiece::util::Status status;
    try {
      status = sp.LoadFromSerializedProto(bytes);
    } catch (const std::exception& e) {
      fail("{}: not a sentencepiece model ({})", origin, e.what());
    }
    if (!status.ok()) fail("{}: not a sentencepiece model or a tokenizer.json ({})", origin, status.message());
    COIL_CHECK(sp.eos_id() >= 0, "{}: the tokenizer has no EOS token", origin);
    bos = sp.bos_id();
    eos = sp.eos_id();
    pad = sp.pad_id();
    for (const char* byte : {"<0xE2>", "<0x96>", "<0x81>"}) {
      const int id = sp.PieceToId(byte);
      if (id < 0 || id == sp.unk_id() || !sp.IsByte(id)) {
        meta_space_bytes.clear();
        break;
      }
      meta_space_bytes.push_back(id);
    }
  }
  void encode(std::string_view text, std::vector<int32_t>& out) const override {
    thread_local std::vector<int> ids;
    auto piece = [&](std::string_view part) {
      auto status = sp.Encode(part, &ids);
      if (!status.ok()) fail("tokenizer {}: {}", origin, status.message());
      out.insert(out.end(), ids.begin(), ids.end());
    };
    static constexpr std::string_view kMetaSpace = "\xe2\x96\x81";
    size_t at = meta_space_bytes.empty() ? std::string_view::npos : text.find(kMetaSpace);
    while (at != std::string_view::npos) {
      if (at > 0) piece(text.substr(0, at));
      out.insert(out.end(), meta_space_bytes.begin(), meta_space_bytes.end());
      text.remove_prefix(at + kMetaSpace.size());
      at = text.find(kMetaSpace);
    }
    if (!text.empty()) piece(text);
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> v(ids.begin(), ids.end());
    const int n = sp.GetPieceSize();
    for (int id : v) COIL_CHECK(id >= 0 && id < n, "token id {} is outside the vocabulary (0..{})", id, n - 1);
    std::string text;
    auto status = sp.Decode(v, &text);
    if (!status.ok()) fail("tokenizer {}: {}", origin, status.message());
    return text;
  }
  std::string piece(int32_t id) const override { return sp.IdToPiece(id); }
  int32_t vocab_size() const override { return sp.GetPieceSize(); }
  bool bpe_json() const override { return false; }
};

struct BpeImpl : Tokenizer::Impl {
  std::unique_ptr<BpeTokenizer> bpe;
  BpeImpl(const std::string& bytes, const std::string& origin) : bpe(BpeTokenizer::parse(bytes, origin)) {
    COIL_CHECK(bpe->eos() >= 0, "{}: the tokenizer.json names no EOS token (see data/bpe.h for the names Coil looks for)",
               origin);
    bos = bpe->bos();
    eos = bpe->eos();
    pad = bpe->pad();
  }
  void encode(std::string_view text, std::vector<int32_t>& out) const override { bpe->encode(text, out); }
  void encode_with_specials(std::string_view text, std::vector<int32_t>& out) const override {
    bpe->encode_with_specials(text, out);
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return bpe->decode(ids); }
  std::string piece(int32_t id) const override { return bpe->piece(id); }
  int32_t vocab_size() const override { return bpe->vocab_size(); }
  bool bpe_json() const override { return true; }
};

bool looks_like_json(const std::string& bytes) {
  const size_t i = bytes.find_first_not_of(" \t\r\n");
  return i != std::string::npos && bytes[i] == '{';
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  if (!fs::exists(model_path)) fail("no tokenizer at {}", model_path);
  std::ifstream in(model_path, std::ios::binary);
  if (!in) fail("cannot read {}", model_path);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  load(bytes);
}

Tokenizer Tokenizer::from_bytes(const std::string& model, const std::string& origin) {
  Tokenizer t;
  t.path_ = origin;
  t.load(model);
  return t;
}

void Tokenizer::load(const std::string& bytes) {
  if (looks_like_json(bytes)) impl_ = std::make_unique<BpeImpl>(bytes, path_);
  else impl_ = std::make_unique<SentencepieceImpl>(bytes, path_);
  bos_ = impl_->bos;
  eos_ = impl_->eos;
  pad_ = impl_->pad >= 0 ? impl_->pad : eos_;
  sha256_ = sha256_bytes(bytes);
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& out) const { impl_->encode(text, out); }

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  encode(text, out);
  return out;
}

std::vector<int32_t> Tokenizer::encode_with_specials(std::string_view text) const {
  std::vector<int32_t> out;
  impl_->encode_with_specials(text, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const { return impl_->decode(ids); }

std::string Tokenizer::piece(int32_t id) const { return impl_->piece(id); }

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size(); }

bool Tokenizer::is_bpe_json() const { return impl_->bpe_json(); }

std::string sha256_bytes(const std::string& bytes) {
  unsigned char digest[32];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

void check_vocab_fits(int64_t vocab_size, int64_t model_vocab, const std::string& tokenizer_path) {
  COIL_CHECK(vocab_size <= model_vocab,
             "the tokenizer {} has {} ids but the model's vocabulary has {} rows: set model.vocab_size >= {}",
             tokenizer_path, vocab_size, model_vocab, vocab_size);
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), buf.size());
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char digest[32];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest, &len);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

}  // namespace coil::data
