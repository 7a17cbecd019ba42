#include "data/eval_rows.h"

#include <algorithm>

#include "util/error.h"

namespace coil::data {

EvalRows::EvalRows(int64_t seq_len, int64_t rows, int32_t eos, bool document_masking)
    : seq_len_(seq_len), rows_(rows), eos_(eos), masking_(document_masking), tokens_{eos}, docs_{0} {
  COIL_CHECK(seq_len >= 1 && rows >= 1, "eval rows: seq_len and rows must be >= 1, got {} and {}", seq_len, rows);
}

void EvalRows::add(const std::vector<int32_t>& document) {
  tokens_.insert(tokens_.end(), document.begin(), document.end());
  tokens_.push_back(eos_);
  docs_.resize(tokens_.size(), next_doc_++);
  targets_ += static_cast<int64_t>(document.size()) + 1;
}

bool EvalRows::next(Batch& batch) {
  const auto left = static_cast<int64_t>(tokens_.size() - first_) - 1;  // targets not yet in a row
  if (left / seq_len_ < rows_) return false;
  emit(batch, rows_);
  return true;
}

bool EvalRows::finish(Batch& batch) {
  const auto left = static_cast<int64_t>(tokens_.size() - first_) - 1;
  if (left <= 0) return false;
  emit(batch, std::min(rows_, (left + seq_len_ - 1) / seq_len_));
  return true;
}

void EvalRows::emit(Batch& b, int64_t rows) {
  const int64_t cols = seq_len_ + 1;
  const auto size = static_cast<int64_t>(tokens_.size());
  const bool padded = static_cast<int64_t>(first_) + (rows - 1) * seq_len_ + cols > size;
  b.rows = rows;
  b.cols = cols;
  b.tokens.assign(static_cast<size_t>(rows * cols), eos_);
  b.mask.assign(padded ? static_cast<size_t>(rows * cols) : 0, 0);
  b.seq_idx.assign(masking_ ? static_cast<size_t>(rows * cols) : 0, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = static_cast<int64_t>(first_) + r * seq_len_;
    const int64_t n = std::min(cols, size - start);  // real tokens of the row
    std::copy_n(tokens_.begin() + start, n, b.tokens.begin() + r * cols);
    if (padded) std::fill_n(b.mask.begin() + r * cols, n, uint8_t{1});
    if (!masking_) continue;
    int32_t* s = b.seq_idx.data() + r * cols;
    for (int64_t j = 0; j < n; ++j) s[j] = docs_[static_cast<size_t>(start + j)] - docs_[static_cast<size_t>(start)];
    std::fill(s + n, s + cols, s[n - 1] + 1);  // the padding: a document of its own
  }
  // The next row starts at the last token of this batch's last row; nothing is left after padding.
  first_ = static_cast<size_t>(std::min(static_cast<int64_t>(first_) + rows * seq_len_, size - 1));
  if (first_ > (size_t{1} << 16) && 2 * first_ > tokens_.size()) {
    tokens_.erase(tokens_.begin(), tokens_.begin() + static_cast<std::ptrdiff_t>(first_));
    docs_.erase(docs_.begin(), docs_.begin() + static_cast<std::ptrdiff_t>(first_));
    first_ = 0;
  }
}

}  // namespace coil::data
