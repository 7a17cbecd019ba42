// Rows for scoring a held-out set (`coil eval`), made as the documents come, one micro batch at a
// time. The stream is an EOS, then each document followed by its EOS, back to back; it is cut into
// rows of seq_len + 1 tokens that overlap by one, as the pretraining shards are (data/shards.h). So
// every token of every document, and its EOS, is a target exactly once: the first document's first
// token is predicted from an EOS, as every other document's first token is (from the EOS before it).
// Unlike training, nothing is dropped: the last row ends in padding, masked out (Batch::mask).
//
// With document_masking a row numbers its documents (Batch::seq_idx, as the training loaders do: 0
// for the document the row starts in, +1 at each document start; the leading EOS is a document of
// its own, and the padding gets a number of its own), so that the model resets its state at each
// document start. Memory: the documents not yet cut into rows, and one batch.
#pragma once

#include <cstdint>
#include <vector>

#include "data/loader.h"

namespace coil::data {

class EvalRows {
 public:
  // rows: rows per batch; eos ends each document, starts the stream and pads the last row.
  EvalRows(int64_t seq_len, int64_t rows, int32_t eos, bool document_masking);

  // Appends a document's tokens (without its EOS; EvalRows adds it).
  void add(const std::vector<int32_t>& document);
  // A batch of `rows` whole rows, when the documents added so far fill that many (call until false).
  bool next(Batch& batch);
  // After the last document: the rows left, at most `rows` a call (call until false), the last one
  // padded; false when every target is already in a batch.
  bool finish(Batch& batch);

  int64_t targets() const { return targets_; }  // targets added: document tokens and their EOS

 private:
  void emit(Batch& batch, int64_t rows);

  int64_t seq_len_, rows_;
  int32_t eos_;
  bool masking_;
  // The stream not yet emitted, from the last token of the last row (the overlap), and each token's
  // document number; `first_` is where it begins (compacted as rows are taken).
  std::vector<int32_t> tokens_, docs_;
  size_t first_ = 0;
  int32_t next_doc_ = 1;
  int64_t targets_ = 0;
};

}  // namespace coil::data
