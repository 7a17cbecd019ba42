// Reading documents' text from Parquet against JSONL.zst, the same documents in both, on one thread
// (data/reader.h's for_each_document: what `coil data prepare` and `coil tokenizer train` read
// through). The Parquet file has FineWeb's columns, snappy pages (pyarrow's default, as the Hub's
// files have) and row groups of --group rows; the JSONL.zst holds the same rows as JSON objects,
// at zstd level 3. With --tokenizer, the streaming loader (2 tokenizer threads) on both as well.
//   bench_parquet [--from GLOB] [--mb 200] [--group 10000] [--tokenizer MODEL]
// --from takes the documents of existing files (e.g. data/demo/fineweb/train-*), repeated up to
// --mb; by default they are made of random words. Both files are written to a temporary directory and read twice (the
// first pass warms the page cache); the figures are the second pass.
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/writer.h>
#include <unistd.h>
#include <zstd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "data/loader.h"
#include "data/reader.h"
#include "data/streaming.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace coil::data;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<std::string> make_documents(const std::string& from, int64_t bytes) {
  std::vector<std::string> docs;
  int64_t have = 0;
  if (!from.empty()) {  // the files' documents, again and again until there are `bytes` of text
    for_each_document(expand_inputs(from), {}, [&](std::string&& t) {
      if (have < bytes) have += static_cast<int64_t>(t.size()), docs.push_back(std::move(t));
    });
    COIL_CHECK(!docs.empty(), "no document in {}", from);
    for (size_t i = 0; have < bytes; ++i) have += static_cast<int64_t>(docs[i].size()), docs.push_back(docs[i]);
    return docs;
  }
  static const char* words[] = {"the", "model", "of", "state", "space", "selective", "scan", "and", "a", "is",
                                "to", "in", "that", "with", "for", "data", "train", "token", "caf\xc3\xa9", "\xe6\x97\xa5"};
  std::mt19937 rng(1);
  while (have < bytes) {
    std::string t;
    const int n = 100 + static_cast<int>(rng() % 1500);
    for (int i = 0; i < n; ++i) t += std::string(i ? (rng() % 15 ? " " : ".\n") : "") + words[rng() % 20];
    have += static_cast<int64_t>(t.size());
    docs.push_back(std::move(t));
  }
  return docs;
}

void check(const arrow::Status& s) { COIL_CHECK(s.ok(), "arrow: {}", s.ToString()); }

void write_parquet(const std::string& path, const std::vector<std::string>& docs, int64_t group) {
  arrow::StringBuilder text, id, url;
  arrow::Int64Builder count;
  for (size_t i = 0; i < docs.size(); ++i) {
    check(text.Append(docs[i]));
    check(id.Append(fmt::format("<urn:uuid:{:032d}>", i)));
    check(url.Append(fmt::format("https://example.org/page/{}", i)));
    check(count.Append(static_cast<int64_t>(docs[i].size() / 4)));
  }
  std::shared_ptr<arrow::Array> a, b, c, d;
  check(text.Finish(&a));
  check(id.Finish(&b));
  check(url.Finish(&c));
  check(count.Finish(&d));
  auto schema = arrow::schema({arrow::field("text", arrow::utf8()), arrow::field("id", arrow::utf8()),
                               arrow::field("url", arrow::utf8()), arrow::field("token_count", arrow::int64())});
  auto table = arrow::Table::Make(schema, {a, b, c, d});
  auto out = arrow::io::FileOutputStream::Open(path);
  check(out.status());
  check(parquet::arrow::WriteTable(*table, arrow::default_memory_pool(), *out, group,
                                   parquet::WriterProperties::Builder().compression(parquet::Compression::SNAPPY)->build()));
  check((*out)->Close());
}

void write_jsonl_zst(const std::string& path, const std::vector<std::string>& docs) {
  std::string jsonl;
  for (size_t i = 0; i < docs.size(); ++i)
    jsonl += nlohmann::json{{"text", docs[i]}, {"id", fmt::format("<urn:uuid:{:032d}>", i)},
                            {"url", fmt::format("https://example.org/page/{}", i)},
                            {"token_count", docs[i].size() / 4}}
                 .dump() +
             "\n";
  std::string z(ZSTD_compressBound(jsonl.size()), '\0');
  z.resize(ZSTD_compress(z.data(), z.size(), jsonl.data(), jsonl.size(), 3));
  std::ofstream(path, std::ios::binary) << z;
}

// Seconds to read every document's text (one thread), second of two passes; and the bytes of text.
std::pair<double, int64_t> read_time(const std::string& path) {
  double best = 0;
  int64_t bytes = 0;
  for (int pass = 0; pass < 2; ++pass) {
    bytes = 0;
    const double t0 = now();
    for_each_document({path}, {}, [&](std::string&& t) { bytes += static_cast<int64_t>(t.size()); });
    best = now() - t0;
  }
  return {best, bytes};
}

double stream_rate(const std::string& path, const std::string& tokenizer, double seconds) {
  StreamingOptions o;
  o.files = {path};
  o.tokenizer = tokenizer;
  o.threads = 2;
  o.geometry = BatchGeometry{2048, 8, 8, 0, 1};
  auto loader = make_streaming_loader(o);
  loader->next();
  int64_t tokens = 0;
  const double t0 = now();
  while (now() - t0 < seconds) tokens += loader->next().rows * 2048;
  return tokens / (now() - t0);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"reading text from Parquet against JSONL.zst (the same documents), one thread"};
  std::string from, tokenizer;
  int64_t mb = 200, group = 10000;
  double seconds = 5;
  app.add_option("--from", from, "documents from these files (default: random words)");
  app.add_option("--mb", mb, "megabytes of text")->capture_default_str();
  app.add_option("--group", group, "rows per Parquet row group")->capture_default_str();
  app.add_option("--tokenizer", tokenizer, "also time the streaming loader with this .model");
  app.add_option("--seconds", seconds, "time per streaming measurement")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const std::vector<std::string> docs = make_documents(from, mb << 20);
    const fs::path dir = fs::temp_directory_path() / fmt::format("coil-bench-parquet-{}", getpid());
    fs::create_directories(dir);
    const std::string pq = (dir / "t.parquet").string(), zs = (dir / "t.jsonl.zst").string();
    write_parquet(pq, docs, group);
    write_jsonl_zst(zs, docs);
    const auto [t_pq, bytes] = read_time(pq);
    const auto [t_zs, bytes_zs] = read_time(zs);
    COIL_CHECK(bytes == bytes_zs, "the two files gave different text ({} and {} bytes)", bytes, bytes_zs);
    fmt::print("{} documents, {:.1f} MB of text; files: Parquet {:.1f} MB (snappy, {} rows per row group), JSONL.zst "
               "{:.1f} MB\n",
               docs.size(), bytes / 1e6, fs::file_size(pq) / 1e6, group, fs::file_size(zs) / 1e6);
    fmt::print("read text, 1 thread: Parquet {:.0f} MB/s ({:.0f}k docs/s), JSONL.zst {:.0f} MB/s ({:.0f}k docs/s): "
               "Parquet = {:.2f}x JSONL.zst\n",
               bytes / t_pq / 1e6, docs.size() / t_pq / 1e3, bytes / t_zs / 1e6, docs.size() / t_zs / 1e3, t_zs / t_pq);
    if (!tokenizer.empty()) {
      const double r_pq = stream_rate(pq, tokenizer, seconds), r_zs = stream_rate(zs, tokenizer, seconds);
      fmt::print("streaming, 2 tokenizer threads: Parquet {:.2f}M tokens/s, JSONL.zst {:.2f}M tokens/s: {:.2f}x\n",
                 r_pq / 1e6, r_zs / 1e6, r_pq / r_zs);
    }
    fs::remove(pq);
    fs::remove(zs);
    fs::remove(dir);
  } catch (const coil::Error& e) {
    fmt::print(stderr, "bench_parquet: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
