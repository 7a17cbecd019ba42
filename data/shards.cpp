#include "data/shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/progress.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace coil::data {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

std::string shard_name(int64_t i, const char* ext) { return fmt::format("tokens-{:05d}.{}", i, ext); }

// Writes a file under a temporary name; commit() renames it into place.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".partial") {
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) fail("cannot write {}: {}", tmp_, std::strerror(errno));
  }
  ~AtomicFile() {
    if (f_) {
      std::fclose(f_);
      std::remove(tmp_.c_str());
    }
  }
  void write(const void* data, size_t bytes) {
    if (bytes && std::fwrite(data, 1, bytes, f_) != bytes) fail("cannot write {}: {}", tmp_, std::strerror(errno));
  }
  void commit() {
    bool ok = std::fflush(f_) == 0 && fsync(fileno(f_)) == 0;
    ok = std::fclose(f_) == 0 && ok;
    f_ = nullptr;
    if (!ok) fail("cannot write {}: {}", tmp_, std::strerror(errno));
    fs::rename(tmp_, path_);
  }

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
};

// The shard being written.
struct ShardWriter {
  std::string dir;
  int width = 2;
  int64_t index = 0;
  std::unique_ptr<AtomicFile> bin;
  std::vector<uint64_t> offsets{0};
  std::vector<uint16_t> narrow;
  json shards = json::array();

  void add(const std::vector<int32_t>& ids) {
    if (!bin) bin = std::make_unique<AtomicFile>(dir + "/" + shard_name(index, "bin"));
    if (width == 2) {
      narrow.assign(ids.begin(), ids.end());
      bin->write(narrow.data(), narrow.size() * 2);
    } else {
      bin->write(ids.data(), ids.size() * 4);
    }
    offsets.push_back(offsets.back() + ids.size());
  }
  void close() {
    if (!bin) return;
    bin->commit();
    bin.reset();
    AtomicFile idx(dir + "/" + shard_name(index, "idx"));
    idx.write(offsets.data(), offsets.size() * sizeof(uint64_t));
    idx.commit();
    shards.push_back({{"tokens_file", shard_name(index, "bin")},
                      {"index_file", shard_name(index, "idx")},
                      {"tokens", offsets.back()},
                      {"documents", offsets.size() - 1}});
    ++index;
    offsets.assign(1, 0);
  }
};

}  // namespace

bool is_prepared(const std::string& path) { return fs::exists(fs::path(path) / "manifest.json"); }

void check_prepared_with(const TokenShards& shards, const Tokenizer& tokenizer, const std::string& what) {
  COIL_CHECK(shards.tokenizer_sha256() == tokenizer.sha256(), "{} was prepared with another tokenizer (sha256 {}) than {} ({})",
             shards.dir(), shards.tokenizer_sha256().substr(0, 12), what, tokenizer.sha256().substr(0, 12));
}

PrepareResult prepare_shards(const PrepareOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  COIL_CHECK(!o.output.empty(), "no output directory given");
  COIL_CHECK(o.shard_tokens > 0, "shard_tokens must be positive");
  Tokenizer tokenizer(o.tokenizer);
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int width = tokenizer.vocab_size() <= 65536 ? 2 : 4;

  // The output directory: a previous data set is replaced only when asked, and its manifest goes
  // first, so that a crash in between never leaves a manifest that names missing shards.
  const std::string manifest_path = o.output + "/manifest.json";
  if (fs::exists(manifest_path)) {
    if (!o.force) fail("{} already holds a prepared data set; pass --force to replace it", o.output);
    fs::remove(manifest_path);
  }
  fs::create_directories(o.output);
  for (const auto& e : fs::directory_iterator(o.output)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("tokens-", 0) == 0) fs::remove(e.path());
  }

  ShardWriter writer;
  writer.dir = o.output;
  writer.width = width;
  PrepareResult result;
  json inputs = json::array();
  std::vector<std::string> batch;
  std::vector<std::vector<int32_t>> ids;
  size_t batch_bytes = 0;
  const int32_t vocab = tokenizer.vocab_size();
  // Documents, tokens and the share of the input bytes read, on stderr (data/progress.h).
  Progress progress("prepare", total_file_bytes(o.inputs), /*with_tokens=*/true);
  ReadOptions read = o.read;
  read.progress = &progress;

  // Tokenizes a batch of documents in parallel threads and appends them in their order.
  auto flush = [&] {
    ids.assign(batch.size(), {});
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (size_t i = static_cast<size_t>(t); i < batch.size(); i += static_cast<size_t>(threads)) {
          tokenizer.encode(batch[i], ids[i]);
          ids[i].push_back(tokenizer.eos());
        }
      });
    for (auto& th : pool) th.join();
    for (auto& doc : ids) {
      for (int32_t id : doc) COIL_CHECK(id >= 0 && id < vocab, "token id {} outside the vocabulary", id);
      writer.add(doc);
      result.tokens += static_cast<int64_t>(doc.size());
      progress.add_tokens(static_cast<int64_t>(doc.size()));
      ++result.documents;
      if (static_cast<int64_t>(writer.offsets.back()) >= o.shard_tokens) writer.close();
    }
    batch.clear();
    batch_bytes = 0;
  };

  for (const std::string& file : o.inputs) {
    ReadStats stats;
    for_each_document(
        {file}, read,
        [&](std::string&& text) {
          batch_bytes += text.size();
          batch.push_back(std::move(text));
          if (batch_bytes >= (size_t{4} << 20) * static_cast<size_t>(threads)) flush();
        },
        &stats);
    inputs.push_back({{"path", file}, {"records", stats.records}, {"documents", stats.documents},
                      {"skipped_empty", stats.empty}, {"skipped_malformed", stats.malformed},
                      {"skipped_too_long", stats.too_long}});
    result.stats.add(stats);
  }
  flush();
  writer.close();
  progress.finish();
  if (result.documents == 0) fail("no document in the {} input file(s) ({})", o.inputs.size(), result.stats.summary());

  json manifest = {{"format", "coil.tokens"},
                   {"version", 1},
                   {"dtype", width == 2 ? "uint16" : "uint32"},
                   {"eos_id", tokenizer.eos()},
                   {"vocab_size", vocab},
                   {"tokenizer", {{"file", fs::path(o.tokenizer).filename().string()}, {"sha256", tokenizer.sha256()}}},
                   {"tokens", result.tokens},
                   {"documents", result.documents},
                   {"shards", writer.shards},
                   {"inputs", inputs}};
  AtomicFile out(manifest_path);
  const std::string text = manifest.dump(2) + "\n";
  out.write(text.data(), text.size());
  out.commit();
  result.shards = writer.index;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

// ---- Reading --------------------------------------------------------------------------------------

namespace {

std::pair<const void*, size_t> map_file(const std::string& path, size_t expected_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open {}: {}", path, std::strerror(errno));
  struct stat st {};
  fstat(fd, &st);
  if (static_cast<size_t>(st.st_size) != expected_bytes) {
    ::close(fd);
    fail("{} holds {} bytes, its manifest says {}: the data set is damaged (prepare it again)", path, st.st_size,
         expected_bytes);
  }
  void* p = expected_bytes ? mmap(nullptr, expected_bytes, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
  ::close(fd);
  if (p == MAP_FAILED) fail("cannot map {}: {}", path, std::strerror(errno));
  return {p, expected_bytes};
}

}  // namespace

TokenShards::TokenShards(const std::string& dir) : dir_(dir) {
  const std::string path = dir + "/manifest.json";
  std::ifstream in(path);
  if (!in) fail("{} is not a prepared data set: no manifest.json (run coil data prepare)", dir);
  json m;
  try {
    m = json::parse(in);
    COIL_CHECK(m.at("format") == "coil.tokens", "{}: format is {}, not coil.tokens", path, m.at("format").dump());
    COIL_CHECK(m.at("version") == 1, "{}: version {} is not supported", path, m.at("version").dump());
    const std::string dtype = m.at("dtype").get<std::string>();
    COIL_CHECK(dtype == "uint16" || dtype == "uint32", "{}: unknown dtype {}", path, dtype);
    width_ = dtype == "uint16" ? 2 : 4;
    vocab_size_ = m.at("vocab_size").get<int32_t>();
    eos_ = m.at("eos_id").get<int32_t>();
    tokenizer_sha256_ = m.at("tokenizer").at("sha256").get<std::string>();
    for (const auto& s : m.at("shards")) {
      Shard shard;
      shard.tokens = s.at("tokens").get<int64_t>();
      const int64_t docs = s.at("documents").get<int64_t>();
      shard.first = total_tokens_;
      shard.first_doc = total_documents_;
      std::tie(shard.data, shard.bytes) =
          map_file(dir + "/" + s.at("tokens_file").get<std::string>(), static_cast<size_t>(shard.tokens * width_));
      shard.doc_offsets.resize(static_cast<size_t>(docs + 1));
      std::ifstream idx(dir + "/" + s.at("index_file").get<std::string>(), std::ios::binary | std::ios::ate);
      COIL_CHECK(idx && idx.tellg() == static_cast<std::streamoff>((docs + 1) * 8), "{}/{}: missing or damaged index",
                 dir, s.at("index_file").get<std::string>());
      idx.seekg(0);
      idx.read(reinterpret_cast<char*>(shard.doc_offsets.data()), (docs + 1) * 8);
      // Every document holds at least its EOS: the offsets rise from 0 to the shard's length.
      bool ok = shard.doc_offsets.front() == 0 && shard.doc_offsets.back() == static_cast<uint64_t>(shard.tokens);
      for (size_t k = 1; ok && k < shard.doc_offsets.size(); ++k) ok = shard.doc_offsets[k] > shard.doc_offsets[k - 1];
      COIL_CHECK(ok, "{}/{}: the document offsets do not rise from 0 to the shard's {} tokens", dir,
                 s.at("index_file").get<std::string>(), shard.tokens);
      total_tokens_ += shard.tokens;
      total_documents_ += docs;
      shards_.push_back(std::move(shard));
    }
    COIL_CHECK(total_tokens_ == m.at("tokens").get<int64_t>(), "{}: the shards' token counts do not add up", path);
  } catch (const json::exception& e) {
    fail("{}: not a valid manifest ({})", path, e.what());
  }
  COIL_CHECK(total_tokens_ > 0, "{}: the data set holds no token", dir);
}

TokenShards::~TokenShards() {
  for (auto& s : shards_)
    if (s.data) munmap(const_cast<void*>(s.data), s.bytes);
}

void TokenShards::read(int64_t start, int64_t count, int32_t* out) const {
  COIL_CHECK(start >= 0 && count >= 0 && start + count <= total_tokens_, "tokens [{}, {}) are outside the data ({})",
             start, start + count, total_tokens_);
  // The shard holding `start`: the last one that begins at or before it.
  auto it = std::upper_bound(shards_.begin(), shards_.end(), start,
                             [](int64_t pos, const Shard& s) { return pos < s.first; });
  for (--it; count > 0; ++it) {
    const int64_t from = start - it->first, n = std::min(count, it->tokens - from);
    if (width_ == 2) {
      const auto* p = static_cast<const uint16_t*>(it->data) + from;
      std::copy(p, p + n, out);
    } else {
      const auto* p = static_cast<const int32_t*>(it->data) + from;
      std::copy(p, p + n, out);
    }
    out += n;
    start += n;
    count -= n;
  }
}

void TokenShards::document_numbers(int64_t start, int64_t count, int32_t* out) const {
  COIL_CHECK(start >= 0 && count >= 0 && start + count <= total_tokens_, "tokens [{}, {}) are outside the data ({})",
             start, start + count, total_tokens_);
  auto it = std::upper_bound(shards_.begin(), shards_.end(), start,
                             [](int64_t pos, const Shard& s) { return pos < s.first; });
  --it;
  // k: the document of position `start` within its shard (the last offset <= it).
  size_t k = static_cast<size_t>(std::upper_bound(it->doc_offsets.begin(), it->doc_offsets.end(),
                                                  static_cast<uint64_t>(start - it->first)) -
                                 it->doc_offsets.begin()) - 1;
  int32_t number = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t pos = start + j;
    while (pos >= it->first + it->tokens) ++it, k = 0, ++number;  // a shard ends with a whole document
    while (pos >= it->first + static_cast<int64_t>(it->doc_offsets[k + 1])) ++k, ++number;
    out[j] = number;
  }
}

std::vector<int32_t> TokenShards::document(int64_t i) const {
  COIL_CHECK(i >= 0 && i < total_documents_, "document {} is outside the data ({} documents)", i, total_documents_);
  auto it = std::upper_bound(shards_.begin(), shards_.end(), i,
                             [](int64_t d, const Shard& s) { return d < s.first_doc; });
  --it;
  const size_t k = static_cast<size_t>(i - it->first_doc);
  const int64_t begin = it->first + static_cast<int64_t>(it->doc_offsets[k]);
  const int64_t end = it->first + static_cast<int64_t>(it->doc_offsets[k + 1]) - 1;  // without the EOS
  std::vector<int32_t> out(static_cast<size_t>(end - begin));
  read(begin, end - begin, out.data());
  return out;
}

PackedSamples::PackedSamples(std::shared_ptr<const TokenShards> shards, int64_t seq_len, bool document_masking)
    : shards_(std::move(shards)), seq_len_(seq_len), document_masking_(document_masking) {
  COIL_CHECK(seq_len >= 1, "seq_len must be >= 1, not {}", seq_len);
  samples_ = (shards_->tokens() - 1) / seq_len;
  COIL_CHECK(samples_ > 0, "{} holds {} tokens: not enough for one sequence of {} + 1", shards_->dir(),
             shards_->tokens(), seq_len);
}

void PackedSamples::fill(int64_t i, int32_t* tokens, uint8_t*) const { shards_->read(i * seq_len_, seq_len_ + 1, tokens); }

void PackedSamples::fill_seq_idx(int64_t i, int32_t* seq_idx) const {
  shards_->document_numbers(i * seq_len_, seq_len_ + 1, seq_idx);
}

std::string PackedSamples::fingerprint() const {
  return fmt::format("shards:{}:{}:{}", shards_->tokens(), seq_len_, shards_->tokenizer_sha256().substr(0, 16));
}

}  // namespace coil::data
