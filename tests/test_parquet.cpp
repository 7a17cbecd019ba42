// Parquet input (data/parquet.h): files written here with Arrow's own writer, in the shapes the Hub
// has (FineWeb's columns, Alpaca's), read back row group by row group; every bad file is a one-line
// error naming it; a resumed stream starts at a row group and equals the unbroken one; progress
// lines (data/progress.h).
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <gtest/gtest.h>
#include <parquet/arrow/writer.h>
#include <parquet/file_reader.h>
#include <parquet/metadata.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <random>

#include "data/loader.h"
#include "data/parquet.h"
#include "data/progress.h"
#include "data/reader.h"
#include "data/streaming.h"
#include "data/tokenizer.h"
#include "tests/test_util.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace coil::data;
using namespace coil::test;

namespace {

using Strings = std::vector<std::optional<std::string>>;

std::shared_ptr<arrow::Array> string_array(const Strings& v) {
  arrow::StringBuilder b;
  for (const auto& s : v) EXPECT_TRUE((s ? b.Append(*s) : b.AppendNull()).ok());
  std::shared_ptr<arrow::Array> a;
  EXPECT_TRUE(b.Finish(&a).ok());
  return a;
}

std::shared_ptr<arrow::Array> int_array(size_t n) {
  arrow::Int64Builder b;
  for (size_t i = 0; i < n; ++i) EXPECT_TRUE(b.Append(static_cast<int64_t>(i * 7)).ok());
  std::shared_ptr<arrow::Array> a;
  EXPECT_TRUE(b.Finish(&a).ok());
  return a;
}

// Writes string columns (and `int_columns` int64 ones) with `group` rows per row group, snappy.
void write_parquet(const std::string& path, const std::vector<std::pair<std::string, Strings>>& columns,
                   int64_t group, const std::vector<std::string>& int_columns = {}) {
  std::vector<std::shared_ptr<arrow::Field>> fields;
  std::vector<std::shared_ptr<arrow::Array>> arrays;
  size_t rows = columns.empty() ? 0 : columns[0].second.size();
  for (const auto& [name, values] : columns) {
    fields.push_back(arrow::field(name, arrow::utf8()));
    arrays.push_back(string_array(values));
  }
  for (const auto& name : int_columns) {
    fields.push_back(arrow::field(name, arrow::int64()));
    arrays.push_back(int_array(rows));
  }
  auto table = arrow::Table::Make(arrow::schema(fields), arrays);
  auto out = arrow::io::FileOutputStream::Open(path);
  ASSERT_TRUE(out.ok());
  auto props = parquet::WriterProperties::Builder().compression(parquet::Compression::SNAPPY)->build();
  ASSERT_TRUE(parquet::arrow::WriteTable(*table, arrow::default_memory_pool(), *out, group, props).ok());
  ASSERT_TRUE((*out)->Close().ok());
}

// FineWeb's columns, with `texts` as text (the int64 column stands for token_count).
std::vector<std::pair<std::string, Strings>> fineweb(const Strings& texts) {
  Strings id, dump, url, date, file_path, language;
  for (size_t i = 0; i < texts.size(); ++i) {
    id.push_back(fmt::format("<urn:uuid:{}>", i));
    dump.push_back("CC-MAIN-2024-10");
    url.push_back(fmt::format("https://example.org/{}", i));
    date.push_back("2024-02-21T08:00:00Z");
    file_path.push_back("s3://commoncrawl/crawl-data/x.warc.gz");
    language.push_back("en");
  }
  return {{"text", texts}, {"id", id}, {"dump", dump}, {"url", url}, {"date", date},
          {"file_path", file_path}, {"language", language}};
}

std::vector<std::string> documents(const std::vector<std::string>& files, const ReadOptions& o = {},
                                   ReadStats* stats = nullptr) {
  std::vector<std::string> docs;
  for_each_document(files, o, [&](std::string&& t) { docs.push_back(t); }, stats);
  return docs;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

Strings numbered(int n, const std::string& what = "document") {
  Strings v;
  for (int i = 0; i < n; ++i) v.push_back(fmt::format("{} {} of the set", what, i));
  return v;
}

}  // namespace

TEST(Parquet, ReadsFineWebColumnsRowGroupByRowGroup) {
  ASSERT_TRUE(parquet_supported());
  TempDir dir;
  Strings texts = numbered(10);
  texts[4] = std::nullopt;  // a null text is an empty document
  texts[5] = "";
  texts[6] = "héllo wörld ✓ 日本語\nsecond line";
  write_parquet(dir / "f.parquet", fineweb(texts), 3, {"token_count"});
  ReadStats stats;
  std::vector<std::string> docs = documents({dir / "f.parquet"}, {}, &stats);
  std::vector<std::string> expected;
  for (const auto& t : texts)
    if (t && !t->empty()) expected.push_back(*t);
  EXPECT_EQ(docs, expected);
  EXPECT_EQ(stats.records, 10);
  EXPECT_EQ(stats.documents, 8);
  EXPECT_EQ(stats.empty, 2);
  // Other columns, by name; every row group decoded once.
  ParquetRows rows(dir / "f.parquet", {"url", "text"});
  EXPECT_EQ(rows.rows(), 10);
  EXPECT_EQ(rows.row_groups(), 4);
  std::vector<std::string_view> v;
  std::vector<bool> null;
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(rows.next(v, null));
    EXPECT_EQ(rows.row(), i);
    EXPECT_EQ(rows.row_group(), i / 3);
    EXPECT_EQ(v[0], fmt::format("https://example.org/{}", i));
    EXPECT_EQ(null[1], i == 4);
    if (texts[static_cast<size_t>(i)]) {
      EXPECT_EQ(v[1], *texts[static_cast<size_t>(i)]);
    }
  }
  EXPECT_FALSE(rows.next(v, null));
  EXPECT_EQ(rows.row_groups_read(), 4);
  // --text-field picks another column.
  ReadOptions o;
  o.text_field = "language";
  EXPECT_EQ(documents({dir / "f.parquet"}, o).size(), 10u);
}

TEST(Parquet, SkipPassesWholeRowGroupsUnread) {
  TempDir dir;
  write_parquet(dir / "f.parquet", fineweb(numbered(10)), 3);
  std::vector<std::string_view> v;
  std::vector<bool> null;
  {
    ParquetRows rows(dir / "f.parquet", {"text"});
    EXPECT_EQ(rows.skip(7), 7);  // rows 0-5 are row groups 0 and 1; row 7 is in group 2
    EXPECT_EQ(rows.row_groups_read(), 1);
    ASSERT_TRUE(rows.next(v, null));
    EXPECT_EQ(rows.row(), 7);
    EXPECT_EQ(v[0], "document 7 of the set");
    EXPECT_EQ(rows.skip(100), 2);  // rows 8 and 9
    EXPECT_FALSE(rows.next(v, null));
  }
  {
    ParquetRows rows(dir / "f.parquet", {"text"});
    EXPECT_EQ(rows.skip(9), 9);  // groups 0-2 whole
    EXPECT_EQ(rows.row_groups_read(), 0);
    ASSERT_TRUE(rows.next(v, null));
    EXPECT_EQ(v[0], "document 9 of the set");
  }
  // Through the record reader, with the row numbers as lines.
  RecordReader reader(dir / "f.parquet", {});
  EXPECT_EQ(reader.skip(4), 4);
  Record r;
  ASSERT_TRUE(reader.next(r));
  EXPECT_EQ(r.line, 5);
  EXPECT_EQ(r.bytes, "document 4 of the set");
  EXPECT_FALSE(reader.is_json());
}

TEST(Parquet, MemoryIsBoundedByARowGroupNotTheFile) {
  TempDir dir;
  // 8 row groups of about 1 MB of text each (random letters: snappy cannot shrink them away).
  std::mt19937 rng(5);
  Strings texts;
  for (int i = 0; i < 160; ++i) {
    std::string t(50'000, ' ');
    for (char& c : t) c = static_cast<char>('a' + rng() % 26);
    texts.push_back(t);
  }
  write_parquet(dir / "big.parquet", {{"text", texts}}, 20);
  ASSERT_GT(fs::file_size(dir / "big.parquet"), 7'000'000u);
  arrow::MemoryPool* pool = arrow::default_memory_pool();  // the pool parquet.cpp reads into
  const int64_t before = pool->bytes_allocated();
  int64_t peak = 0, rows = 0;
  {
    ParquetRows reader(dir / "big.parquet", {"text"});
    std::vector<std::string_view> v;
    std::vector<bool> null;
    while (reader.next(v, null)) {
      ++rows;
      peak = std::max(peak, pool->bytes_allocated() - before);
    }
    EXPECT_EQ(reader.row_groups_read(), 8);
  }
  EXPECT_EQ(rows, 160);
  // One row group decoded (1 MB of text) plus its compressed pages, never the 8 MB of the file.
  EXPECT_GT(peak, 1'000'000);
  EXPECT_LT(peak, 3'500'000) << "peak " << peak;
}

TEST(Parquet, BadFilesAreOneLineErrorsNamingTheFile) {
  TempDir dir;
  write_parquet(dir / "good.parquet", fineweb(numbered(30)), 10, {"token_count"});
  const std::string good = read_bytes(dir / "good.parquet");
  auto one_line = [](const std::string& e) { return e.find('\n') == std::string::npos; };

  // Not Parquet at all (JSONL under the name), and an empty file.
  write_file(dir / "json.parquet", "{\"text\": \"hello\"}\n");
  write_file(dir / "empty.parquet", "");
  for (const char* name : {"json.parquet", "empty.parquet"}) {
    const std::string e = error_of([&] { documents({dir / name}); });
    EXPECT_TRUE(has(e, dir / name) && has(e, "not a Parquet file")) << e;
    EXPECT_TRUE(one_line(e)) << e;
  }
  // Truncated: the footer is gone (a download cut short).
  for (size_t keep : {good.size() / 2, good.size() - 3, size_t{8}}) {
    write_file(dir / "cut.parquet", good.substr(0, keep));
    const std::string e = error_of([&] { documents({dir / "cut.parquet"}); });
    EXPECT_TRUE(has(e, dir / "cut.parquet") && has(e, "damaged or truncated Parquet file")) << keep << ": " << e;
    EXPECT_TRUE(one_line(e)) << e;
  }
  // A missing column, and one that does not hold strings.
  ReadOptions o;
  o.text_field = "content";
  std::string e = error_of([&] { documents({dir / "good.parquet"}, o); });
  EXPECT_TRUE(has(e, dir / "good.parquet") && has(e, "no column \"content\"") && has(e, "text, id, dump")) << e;
  o.text_field = "token_count";
  e = error_of([&] { documents({dir / "good.parquet"}, o); });
  EXPECT_TRUE(has(e, dir / "good.parquet") && has(e, "column \"token_count\" holds int64, not strings")) << e;
  EXPECT_TRUE(one_line(e)) << e;

  // Row group 1's first page header overwritten: group 0 reads, then the error names group 1; a
  // reader that skips past group 1 never decodes it.
  std::string damaged = good;
  {
    auto meta = parquet::ReadMetaData(*arrow::io::ReadableFile::Open(dir / "good.parquet"));
    auto chunk = meta->RowGroup(1)->ColumnChunk(0);  // "text": its first page (the dictionary's)
    const int64_t at = chunk->has_dictionary_page() ? chunk->dictionary_page_offset() : chunk->data_page_offset();
    for (int64_t i = 0; i < 12; ++i) damaged[static_cast<size_t>(at + i)] = '\xff';
  }
  write_file(dir / "bad_group.parquet", damaged);
  std::vector<std::string> seen;
  e = error_of([&] { for_each_document({dir / "bad_group.parquet"}, {}, [&](std::string&& t) { seen.push_back(t); }); });
  EXPECT_TRUE(has(e, dir / "bad_group.parquet") && has(e, "row group 1 of 3")) << e;
  EXPECT_TRUE(one_line(e)) << e;
  EXPECT_EQ(seen.size(), 10u);
  ParquetRows rows(dir / "bad_group.parquet", {"text"});
  EXPECT_EQ(rows.skip(20), 20);
  std::vector<std::string_view> v;
  std::vector<bool> null;
  ASSERT_TRUE(rows.next(v, null));
  EXPECT_EQ(v[0], "document 20 of the set");
}

TEST(Parquet, AlpacaColumnsReadAsTheirJsonDoes) {
  TempDir dir;
  Strings ins, input, out, text;
  std::string jsonl;
  for (int i = 0; i < 7; ++i) {
    ins.push_back(fmt::format("Say {} in words.", i));
    input.push_back(i % 3 == 0 ? std::nullopt : std::optional<std::string>(i % 3 == 1 ? "" : "plainly"));
    out.push_back(fmt::format("Number {}, \"quoted\".", i));
    text.push_back("### Instruction: ...");
    jsonl += fmt::format("{{\"instruction\": \"Say {} in words.\", \"input\": {}, \"output\": \"Number {}, \\\"quoted\\\".\"}}\n",
                         i, i % 3 == 0 ? "null" : (i % 3 == 1 ? "\"\"" : "\"plainly\""), i);
  }
  write_parquet(dir / "alpaca.parquet", {{"instruction", ins}, {"input", input}, {"output", out}, {"text", text}}, 3);
  write_file(dir / "alpaca.jsonl", jsonl);
  ReadStats s1, s2;
  auto a = read_alpaca({dir / "alpaca.parquet"}, {}, &s1);
  auto b = read_alpaca({dir / "alpaca.jsonl"}, {}, &s2);
  ASSERT_EQ(a.size(), 7u);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].instruction, b[i].instruction) << i;
    EXPECT_EQ(a[i].input, b[i].input) << i;
    EXPECT_EQ(a[i].output, b[i].output) << i;
  }
  EXPECT_EQ(a[2].input, "plainly");
  EXPECT_EQ(s1.documents, 7);
  // No input column at all is fine; no output column is an error naming the file.
  write_parquet(dir / "no_input.parquet", {{"instruction", ins}, {"output", out}}, 4);
  EXPECT_EQ(read_alpaca({dir / "no_input.parquet"}, {}).size(), 7u);
  write_parquet(dir / "no_output.parquet", {{"instruction", ins}, {"input", input}}, 4);
  const std::string e = error_of([&] { read_alpaca({dir / "no_output.parquet"}, {}); });
  EXPECT_TRUE(has(e, dir / "no_output.parquet") && has(e, "no column \"output\"")) << e;
  // A null output is a malformed record, reported with its row, and fatal past the limit.
  out[5] = std::nullopt;
  write_parquet(dir / "null_output.parquet", {{"instruction", ins}, {"output", out}}, 4);
  ReadStats s3;
  EXPECT_EQ(read_alpaca({dir / "null_output.parquet"}, {}, &s3).size(), 6u);
  EXPECT_EQ(s3.malformed, 1);
  ReadOptions strict;
  strict.max_bad_records = 0;
  const std::string e2 = error_of([&] { read_alpaca({dir / "null_output.parquet"}, strict); });
  EXPECT_TRUE(has(e2, dir / "null_output.parquet: row 5: \"output\" is null")) << e2;
}

TEST(Parquet, StreamingFromParquetEqualsJsonlAndResumesAtARowGroup) {
  TempDir dir;
  // A tokenizer of its own, trained on the same rows.
  std::mt19937 rng(11);
  const char* words[] = {"the", "scan", "state", "space", "model", "coil", "gate", "token", "shard", "row"};
  Strings a, b;
  std::string ja, jb;
  auto json_line = [](const std::string& t) { return "{\"text\": \"" + t + "\"}\n"; };
  for (int i = 0; i < 120; ++i) {
    std::string t;
    const int n = 3 + static_cast<int>(rng() % 20);
    for (int w = 0; w < n; ++w) {
      if (w) t += ' ';
      t += words[rng() % 10];
    }
    (i < 70 ? a : b).push_back(t);
    (i < 70 ? ja : jb) += json_line(t);
  }
  write_file(dir / "a.jsonl", ja);
  write_file(dir / "b.jsonl", jb);
  write_parquet(dir / "a.parquet", fineweb(a), 8);
  write_parquet(dir / "b.parquet", fineweb(b), 8);
  TokenizerTrainOptions t;
  t.inputs = {dir / "a.parquet", dir / "b.parquet"};
  t.output_prefix = dir / "tok";
  t.vocab_size = 300;
  t.threads = 1;
  train_tokenizer(t);

  auto drain = [](Loader& l, int n) {
    std::vector<std::vector<int32_t>> rows;
    for (int i = 0; i < n; ++i) {
      Batch x = l.next();
      for (int64_t r = 0; r < x.rows; ++r)
        rows.emplace_back(x.tokens.begin() + r * x.cols, x.tokens.begin() + (r + 1) * x.cols);
    }
    return rows;
  };
  for (int world : {1, 2}) {
    for (int rank = 0; rank < world; ++rank) {
      StreamingOptions o;
      o.files = {dir / "a.parquet", dir / "b.parquet"};
      o.tokenizer = dir / "tok.model";
      o.geometry = BatchGeometry{16, 2 * world, 2, rank, world};
      auto pq = make_streaming_loader(o);
      StreamingOptions oj = o;
      oj.files = {dir / "a.jsonl", dir / "b.jsonl"};
      auto js = make_streaming_loader(oj);
      // The same rows as from the JSONL of the same documents (the fingerprints differ only in name).
      auto first = drain(*pq, 10);
      EXPECT_EQ(first, drain(*js, 10)) << world << " " << rank;
      LoaderState saved = LoaderState::from_json(pq->state().to_json());
      EXPECT_GT(saved.record, 8);  // past the first row group
      auto more = drain(*pq, 60);  // into later epochs
      auto resumed = make_streaming_loader(o);
      resumed->restore(saved);
      EXPECT_EQ(drain(*resumed, 60), more) << world << " " << rank;
      EXPECT_EQ(drain(*js, 60), more) << world << " " << rank;
    }
  }
}

TEST(Progress, LinesCountDocumentsTokensAndTheShareRead) {
  setenv("COIL_PROGRESS_INTERVAL_S", "0", 1);
  FILE* f = std::tmpfile();
  {
    Progress p("prepare", 2'000'000, true, f);
    EXPECT_FALSE(p.terminal());
    EXPECT_EQ(p.interval_s(), 0.0);
    p.add_documents(3);
    p.add_tokens(12345);
    p.add_bytes(500'000);
    EXPECT_TRUE(has(p.line(), "prepare: 3 documents, 12.3k tokens, ")) << p.line();
    EXPECT_TRUE(has(p.line(), "tokens/s, 25.0% of 2.0 MB, ETA ")) << p.line();
    p.add_bytes(1'500'000);
    EXPECT_TRUE(has(p.line(), "100.0% of 2.0 MB, ")) << p.line();
    p.finish();
    p.add_documents(1);  // after finish: nothing more is written
  }
  std::rewind(f);
  std::string all;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) all.append(buf, n);
  std::fclose(f);
  // Not a terminal, interval 0: a whole line per update, then the final one.
  EXPECT_EQ(std::count(all.begin(), all.end(), '\n'), 5) << all;
  EXPECT_EQ(all.find('\r'), std::string::npos);
  EXPECT_TRUE(has(all.substr(all.rfind("prepare:")), "prepare: 3 documents, 12.3k tokens")) << all;
  // Bad settings are one-line errors.
  setenv("COIL_PROGRESS_INTERVAL_S", "soon", 1);
  EXPECT_THROW(Progress("x", 0, false, stderr), coil::Error);
  unsetenv("COIL_PROGRESS_INTERVAL_S");
  Progress unknown("tokenizer", 0, false, stderr);
  unknown.add_bytes(1000);
  EXPECT_TRUE(has(unknown.line(), "tokenizer: 0 documents, ")) << unknown.line();
  EXPECT_TRUE(has(unknown.line(), " MB/s, ")) << unknown.line();
  EXPECT_TRUE(has(unknown.line(), " elapsed")) << unknown.line();
  // No stream (the other ranks of a data-parallel eval): it counts and prints nothing.
  Progress silent("eval", 0, true, nullptr);
  EXPECT_FALSE(silent.terminal());
  silent.add_tokens(7);
  silent.finish();
  EXPECT_TRUE(has(silent.line(), "eval: 0 documents, 7 tokens, ")) << silent.line();
}

// Found by fuzz_parquet (tests/fuzz/corpus/parquet/footer-row-count.parquet, docs/RELIABILITY.md):
// a footer whose row count (-7) is not its row groups' (4 + 2) was taken at its word, so rows(), the
// progress share and resume positions were wrong; now a one-line error naming the file.
TEST(Parquet, AFooterWhoseRowCountIsNotItsRowGroupsIsAnError) {
  const std::string path = COIL_FUZZ_CORPUS "/parquet/footer-row-count.parquet";
  try {
    ParquetRows rows(path, {"text"});
    FAIL() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_EQ(std::string(e.what()), path + ": a damaged Parquet footer (it says -7 rows, its row groups hold 6)");
  }
}
