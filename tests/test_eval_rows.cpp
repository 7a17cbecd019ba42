// data::EvalRows (`coil eval`'s rows): against the stream built here, EOS + each document + EOS,
// every token after the first is a target exactly once, in order; rows overlap by one; only the
// last row is padded (masked out); seq_idx restarts at each document and is what the training
// loaders would give; the rows do not depend on when they are taken.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "data/eval_rows.h"
#include "util/error.h"

namespace coil::data {
namespace {

constexpr int32_t kEos = 2;

std::vector<std::vector<int32_t>> random_documents(int n, int max_len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> docs(static_cast<size_t>(n));
  for (auto& d : docs) {
    d.resize(rng() % static_cast<uint32_t>(max_len + 1));  // empty ones too
    for (auto& t : d) t = 3 + static_cast<int32_t>(rng() % 1000);
  }
  return docs;
}

// Every batch, taking rows after each document (eager) or only at the end.
std::vector<Batch> all_batches(const std::vector<std::vector<int32_t>>& docs, int64_t seq_len, int64_t rows,
                               bool masking, bool eager, int64_t* targets = nullptr) {
  EvalRows er(seq_len, rows, kEos, masking);
  std::vector<Batch> out;
  Batch b;
  for (const auto& d : docs) {
    er.add(d);
    while (eager && er.next(b)) out.push_back(b);
  }
  while (er.next(b)) out.push_back(b);
  while (er.finish(b)) out.push_back(b);
  if (targets) *targets = er.targets();
  return out;
}

TEST(EvalRows, EveryTokenIsATargetOnceInOrderAndSeqIdxRestartsAtEachDocument) {
  for (const int64_t seq_len : {1, 2, 7, 16, 64}) {
    for (const bool masking : {false, true}) {
      const auto docs = random_documents(23, 40, static_cast<uint32_t>(seq_len * 2 + masking));
      // The stream and each token's document (the leading EOS is document 0).
      std::vector<int32_t> stream{kEos}, doc_of{0};
      for (size_t i = 0; i < docs.size(); ++i) {
        stream.insert(stream.end(), docs[i].begin(), docs[i].end());
        stream.push_back(kEos);
        doc_of.resize(stream.size(), static_cast<int32_t>(i + 1));
      }
      int64_t targets = 0;
      const auto batches = all_batches(docs, seq_len, 3, masking, /*eager=*/true, &targets);
      EXPECT_EQ(targets, static_cast<int64_t>(stream.size()) - 1);
      std::vector<int32_t> got{batches.at(0).tokens.at(0)};  // the first input, then every target
      int64_t position = 0;  // the stream position of the current row's first token
      for (size_t k = 0; k < batches.size(); ++k) {
        const Batch& b = batches[k];
        const bool last = k + 1 == batches.size();
        ASSERT_EQ(b.cols, seq_len + 1);
        if (!last) EXPECT_EQ(b.rows, 3);
        if (!last) EXPECT_TRUE(b.mask.empty()) << "only the last batch is padded";
        EXPECT_EQ(b.seq_idx.empty(), !masking);
        for (int64_t r = 0; r < b.rows; ++r) {
          const int32_t* row = b.tokens.data() + r * b.cols;
          const int32_t* s = masking ? b.seq_idx.data() + r * b.cols : nullptr;
          EXPECT_EQ(row[0], stream.at(static_cast<size_t>(position))) << "rows overlap by one";
          for (int64_t j = 0; j < b.cols; ++j) {
            const bool real = b.mask.empty() || b.mask[static_cast<size_t>(r * b.cols + j)];
            const auto p = static_cast<size_t>(position + j);
            if (real) {
              ASSERT_LT(p, stream.size());
              EXPECT_EQ(row[j], stream[p]);
              if (j > 0) got.push_back(row[j]);
              if (s) EXPECT_EQ(s[j], doc_of[p] - doc_of[static_cast<size_t>(position)]) << "row position " << j;
            } else {
              EXPECT_TRUE(last && r + 1 == b.rows) << "padding only in the last row";
              EXPECT_GE(p, stream.size());
              if (s) EXPECT_EQ(s[j], doc_of.back() - doc_of[static_cast<size_t>(position)] + 1) << "padding: its own";
            }
          }
          position += seq_len;
        }
      }
      EXPECT_EQ(got, stream) << "seq_len " << seq_len;
      // Taken only at the end, the same batches.
      const auto lazy = all_batches(docs, seq_len, 3, masking, /*eager=*/false);
      ASSERT_EQ(lazy.size(), batches.size());
      for (size_t k = 0; k < lazy.size(); ++k) {
        EXPECT_EQ(lazy[k].tokens, batches[k].tokens);
        EXPECT_EQ(lazy[k].mask, batches[k].mask);
        EXPECT_EQ(lazy[k].seq_idx, batches[k].seq_idx);
      }
    }
  }
}

TEST(EvalRows, AStreamThatFillsItsLastRowHasNoPaddingAndNoEmptyRow) {
  // EOS a b c EOS: 5 tokens, one row of seq_len 4, whole.
  auto batches = all_batches({{5, 6, 7}}, 4, 2, true, true);
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].rows, 1);
  EXPECT_TRUE(batches[0].mask.empty());
  EXPECT_EQ(batches[0].tokens, (std::vector<int32_t>{kEos, 5, 6, 7, kEos}));
  EXPECT_EQ(batches[0].seq_idx, (std::vector<int32_t>{0, 1, 1, 1, 1}));
  // One token more: a second row, EOS then padding.
  batches = all_batches({{5, 6, 7, 8}}, 4, 2, false, true);
  ASSERT_EQ(batches.size(), 1u);
  ASSERT_EQ(batches[0].rows, 2);
  EXPECT_EQ(batches[0].tokens, (std::vector<int32_t>{kEos, 5, 6, 7, 8, 8, kEos, kEos, kEos, kEos}));
  EXPECT_EQ(batches[0].mask, (std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 0, 0, 0}));
  // No documents: nothing to score.
  EXPECT_TRUE(all_batches({}, 4, 2, false, true).empty());
}

TEST(EvalRows, BadGeometryIsAnError) {
  EXPECT_THROW(EvalRows(0, 1, kEos, false), coil::Error);
  EXPECT_THROW(EvalRows(8, 0, kEos, false), coil::Error);
}

}  // namespace
}  // namespace coil::data
