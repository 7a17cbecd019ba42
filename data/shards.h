// Prepared token shards: `coil data prepare` tokenizes a corpus once into flat binary files that
// the pretraining loader reads at random, memory-mapped.
//
// Layout of a prepared directory (all integers little-endian):
//   manifest.json         what is there: format "coil.tokens" version 1, dtype ("uint16" when the
//                         vocabulary fits, else "uint32"), eos_id, vocab_size, the tokenizer's file
//                         name and SHA-256, total tokens and documents, per shard its files and
//                         counts, the inputs and what was skipped in them. Written last.
//   tokens-NNNNN.bin      the token ids of whole documents, each followed by EOS, back to back.
//   tokens-NNNNN.idx      uint64 offsets (in tokens) of each document's start in the .bin, plus
//                         the end: documents + 1 values.
// Documents keep the order of the inputs (files in sorted order, records in file order); a shard
// closes after the document that takes it past shard_tokens. The output depends on the inputs and
// the tokenizer only (not on the number of threads), so re-running gives byte-identical files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/reader.h"

namespace coil::data {

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::string tokenizer;  // a sentencepiece .model
  std::string output;     // a directory
  ReadOptions read;
  int threads = 0;                        // 0: all cores
  int64_t shard_tokens = int64_t{1} << 28;  // tokens per shard (about 512 MB of uint16)
  bool force = false;                     // replace a prepared directory
};

struct PrepareResult {
  int64_t tokens = 0, documents = 0, shards = 0;
  ReadStats stats;
  double seconds = 0;
};

PrepareResult prepare_shards(const PrepareOptions& options);

// Whether `path` is a prepared directory (it holds a manifest.json), rather than text files.
bool is_prepared(const std::string& path);

class Tokenizer;   // data/tokenizer.h
class TokenShards;
// A coil::Error unless `shards` were prepared with `tokenizer` (the same SHA-256); `what` names the
// tokenizer in the message (e.g. "data.tokenizer tok.model").
void check_prepared_with(const TokenShards& shards, const Tokenizer& tokenizer, const std::string& what);

// A prepared directory, memory-mapped: the concatenation of its shards is one token stream.
class TokenShards {
 public:
  explicit TokenShards(const std::string& dir);
  ~TokenShards();
  TokenShards(const TokenShards&) = delete;
  TokenShards& operator=(const TokenShards&) = delete;

  int64_t tokens() const { return total_tokens_; }
  int64_t documents() const { return total_documents_; }
  int32_t vocab_size() const { return vocab_size_; }
  int32_t eos() const { return eos_; }
  const std::string& tokenizer_sha256() const { return tokenizer_sha256_; }
  const std::string& dir() const { return dir_; }
  // Tokens [start, start + count) of the stream, as int32.
  void read(int64_t start, int64_t count, int32_t* out) const;
  // For positions [start, start + count): the document each lies in, numbered from 0 for the
  // document of `start` (a document's EOS is its own last position). From the .idx offsets read at
  // open: no token is looked at.
  void document_numbers(int64_t start, int64_t count, int32_t* out) const;
  // Document i as token ids (without its EOS).
  std::vector<int32_t> document(int64_t i) const;

 private:
  struct Shard {
    const void* data = nullptr;
    size_t bytes = 0;
    int64_t first = 0, tokens = 0;  // position in the stream, length
    std::vector<uint64_t> doc_offsets;
    int64_t first_doc = 0;
  };
  std::string dir_;
  std::vector<Shard> shards_;
  int width_ = 2;  // bytes per token
  int64_t total_tokens_ = 0, total_documents_ = 0;
  int32_t vocab_size_ = 0, eos_ = 0;
  std::string tokenizer_sha256_;
};

// Pretraining samples: the stream cut into sequences of seq_len + 1 tokens that overlap by one
// (sample i is tokens [i seq_len, (i + 1) seq_len]), so every token is a target exactly once.
// Documents are packed back to back, separated by their EOS. With document_masking
// (data.document_masking) a sample also numbers its documents (Batch::seq_idx), from the shards'
// document index (the .idx offsets that prepare writes; no scanning for EOS), so that the model
// resets its state at each document start. The fingerprint does not depend on it: a run may resume
// with it switched.
class PackedSamples : public SampleSource {
 public:
  PackedSamples(std::shared_ptr<const TokenShards> shards, int64_t seq_len, bool document_masking = false);
  int64_t size() const override { return samples_; }
  int64_t cols() const override { return seq_len_ + 1; }
  int64_t target_tokens() const override { return samples_ * seq_len_; }
  bool has_mask() const override { return false; }
  void fill(int64_t i, int32_t* tokens, uint8_t* mask) const override;
  std::string kind() const override { return "shards"; }
  std::string fingerprint() const override;
  bool has_seq_idx() const override { return document_masking_; }
  void fill_seq_idx(int64_t i, int32_t* seq_idx) const override;

 private:
  std::shared_ptr<const TokenShards> shards_;
  int64_t seq_len_, samples_;
  bool document_masking_;
};

}  // namespace coil::data
