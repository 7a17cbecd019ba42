#include "data/reader.h"

#include <glob.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "data/parquet.h"
#include "data/progress.h"
#include "util/error.h"

namespace coil::data {
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ---- Byte sources: a file, decompressed on the fly ------------------------------------------------

class Source {
 public:
  virtual ~Source() = default;
  // Reads up to n bytes; 0 at the end. Throws on a read error or a corrupt or truncated stream.
  virtual size_t read(char* out, size_t n) = 0;
  virtual int64_t consumed() const = 0;  // bytes of the file read so far (compressed ones)
};

class FileSource : public Source {
 public:
  explicit FileSource(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "rb")) {
    if (!f_) fail("cannot open {}: {}", path, std::strerror(errno));
  }
  ~FileSource() override { std::fclose(f_); }
  size_t read(char* out, size_t n) override {
    size_t got = std::fread(out, 1, n, f_);
    if (got < n && std::ferror(f_)) fail("cannot read {}: {}", path_, std::strerror(errno));
    consumed_ += static_cast<int64_t>(got);
    return got;
  }
  int64_t consumed() const override { return consumed_; }

 private:
  std::string path_;
  FILE* f_;
  int64_t consumed_ = 0;
};

constexpr size_t kChunk = size_t{1} << 18;

// gzip, including files made of several concatenated gzip members (as `cat a.gz b.gz` makes).
class GzipSource : public Source {
 public:
  explicit GzipSource(const std::string& path) : path_(path), file_(path), in_(kChunk) {
    std::memset(&z_, 0, sizeof z_);
    if (inflateInit2(&z_, 15 + 32) != Z_OK) fail("{}: cannot start zlib", path);
  }
  ~GzipSource() override { inflateEnd(&z_); }
  size_t read(char* out, size_t n) override {
    z_.next_out = reinterpret_cast<Bytef*>(out);
    z_.avail_out = static_cast<uInt>(n);
    while (z_.avail_out == n) {
      if (z_.avail_in == 0) {
        z_.avail_in = static_cast<uInt>(file_.read(in_.data(), in_.size()));
        z_.next_in = reinterpret_cast<Bytef*>(in_.data());
        if (z_.avail_in == 0) {
          if (!at_member_end_) fail("{}: truncated gzip stream (the file ends inside compressed data)", path_);
          break;
        }
      }
      int rc = inflate(&z_, Z_NO_FLUSH);
      at_member_end_ = rc == Z_STREAM_END;
      if (rc == Z_STREAM_END) {
        inflateReset(&z_);  // another member may follow
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        fail("{}: corrupt gzip stream ({})", path_, z_.msg ? z_.msg : "inflate failed");
      }
    }
    return n - z_.avail_out;
  }
  int64_t consumed() const override { return file_.consumed(); }

 private:
  std::string path_;
  FileSource file_;
  std::vector<char> in_;
  z_stream z_;
  bool at_member_end_ = false;
};

class ZstdSource : public Source {
 public:
  explicit ZstdSource(const std::string& path)
      : path_(path), file_(path), in_(ZSTD_DStreamInSize()), ctx_(ZSTD_createDStream()) {
    input_ = {in_.data(), 0, 0};
  }
  ~ZstdSource() override { ZSTD_freeDStream(ctx_); }
  size_t read(char* out, size_t n) override {
    ZSTD_outBuffer output{out, n, 0};
    while (output.pos == 0) {
      if (input_.pos == input_.size) {
        input_.size = file_.read(in_.data(), in_.size());
        input_.pos = 0;
        if (input_.size == 0) {
          if (last_ != 0) fail("{}: truncated zstd stream (the file ends inside a frame)", path_);
          break;
        }
      }
      last_ = ZSTD_decompressStream(ctx_, &output, &input_);
      if (ZSTD_isError(last_)) fail("{}: corrupt zstd stream ({})", path_, ZSTD_getErrorName(last_));
    }
    return output.pos;
  }
  int64_t consumed() const override { return file_.consumed(); }

 private:
  std::string path_;
  FileSource file_;
  std::vector<char> in_;
  ZSTD_DStream* ctx_;
  ZSTD_inBuffer input_;
  size_t last_ = 0;  // 0 once a frame is complete
};

std::unique_ptr<Source> open_source(const std::string& path) {
  if (ends_with(path, ".gz")) return std::make_unique<GzipSource>(path);
  if (ends_with(path, ".zst") || ends_with(path, ".zstd")) return std::make_unique<ZstdSource>(path);
  return std::make_unique<FileSource>(path);
}

std::string strip_compression(const std::string& path) {
  for (const char* ext : {".gz", ".zst", ".zstd"})
    if (ends_with(path, ext)) return path.substr(0, path.size() - std::strlen(ext));
  return path;
}

// nlohmann's messages start with "[json.exception.parse_error.101] parse error at line 1, ...".
std::string json_reason(const std::exception& e) {
  std::string what = e.what();
  if (auto p = what.find("] "); what.rfind("[json.exception", 0) == 0 && p != std::string::npos)
    what = what.substr(p + 2);
  return what;
}

}  // namespace

// ---- RecordReader ---------------------------------------------------------------------------------

struct RecordReader::Impl {
  enum class Mode { kLines, kArray, kWhole, kParquet } mode = Mode::kLines;
  std::string path;
  ReadOptions options;
  std::unique_ptr<Source> source;
  // A Parquet file: its text column, row by row.
  std::unique_ptr<ParquetRows> parquet;
  std::vector<std::string_view> values;
  std::vector<bool> nulls;
  // Progress: the file's size and the bytes of it reported so far.
  int64_t file_bytes = 0, reported = 0;

  void report(bool at_end) {
    if (!options.progress) return;
    int64_t now = at_end ? file_bytes
                 : parquet ? static_cast<int64_t>(parquet->fraction() * static_cast<double>(file_bytes))
                           : std::min(file_bytes, source->consumed());
    if (now > reported) {
      options.progress->add_bytes(now - reported);
      reported = now;
    }
  }

  bool next_row(Record& r) {
    if (!parquet->next(values, nulls)) return false;
    line = parquet->row() + 1;
    // A null is no text: an empty document (skipped and counted as empty).
    const std::string_view text = nulls[0] ? std::string_view() : values[0];
    if (static_cast<int64_t>(text.size()) > options.max_record_bytes)
      r = Record{{}, line, true};
    else
      r = Record{text, line, false};
    return true;
  }
  std::string buf;       // bytes read but not yet returned
  size_t begin = 0;      // start of the unreturned bytes in buf
  bool eof = false;
  int64_t line = 0;
  // A JSON array file, parsed once; its items are returned one by one as text.
  nlohmann::json array;
  size_t item = 0;
  std::string item_text;

  bool fill() {
    if (eof) return false;
    if (begin > 0) {
      buf.erase(0, begin);
      begin = 0;
    }
    size_t old = buf.size();
    buf.resize(old + kChunk);
    size_t got = source->read(buf.data() + old, kChunk);
    buf.resize(old + got);
    eof = got == 0;
    return got > 0;
  }

  bool next_line(Record& r) {
    size_t scanned = 0;  // bytes after `begin` known to hold no newline (fill() keeps them)
    for (;;) {
      size_t nl = buf.find('\n', begin + scanned);
      if (nl != std::string::npos) {
        ++line;
        // A long line that happened to arrive within one chunk is as long as one that did not.
        const bool too_long = static_cast<int64_t>(nl - begin) > options.max_record_bytes;
        r = too_long ? Record{{}, line, true} : Record{std::string_view(buf).substr(begin, nl - begin), line, false};
        begin = nl + 1;
        return true;
      }
      scanned = buf.size() - begin;
      if (static_cast<int64_t>(scanned) > options.max_record_bytes) {
        skip_long_line();
        r = Record{{}, line, true};
        return true;
      }
      if (!fill()) break;
    }
    if (begin < buf.size()) {  // the last line has no newline
      ++line;
      const bool too_long = static_cast<int64_t>(buf.size() - begin) > options.max_record_bytes;
      r = too_long ? Record{{}, line, true} : Record{std::string_view(buf).substr(begin), line, false};
      begin = buf.size();
      return true;
    }
    return false;
  }

  // Drops the rest of an over-long line without keeping it in memory.
  void skip_long_line() {
    ++line;
    for (;;) {
      size_t nl = buf.find('\n', begin);
      if (nl != std::string::npos) {
        begin = nl + 1;
        return;
      }
      buf.clear();
      begin = 0;
      if (!fill()) return;
    }
  }

  bool next_whole(Record& r) {
    if (line > 0) return false;
    while (fill()) {
      if (static_cast<int64_t>(buf.size()) > options.max_record_bytes) {
        while (true) {
          buf.clear();
          begin = 0;
          if (!fill()) break;
        }
        line = 1;
        r = Record{{}, 1, true};
        return true;
      }
    }
    line = 1;
    r = Record{std::string_view(buf), 1, false};
    return true;
  }

  bool next_item(Record& r) {
    if (item >= array.size()) return false;
    item_text = array[item].dump();
    ++item;
    r = Record{item_text, static_cast<int64_t>(item), false};
    return true;
  }
};

RecordReader::RecordReader(const std::string& path, const ReadOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.path = path;
  m.options = options;
  if (fs::is_directory(path)) fail("{} is a directory, not a data file", path);
  if (options.progress) {
    std::error_code ec;
    m.file_bytes = static_cast<int64_t>(fs::file_size(path, ec));
    if (ec) m.file_bytes = 0;
  }
  if (is_parquet_path(path)) {
    m.mode = Impl::Mode::kParquet;
    m.parquet = std::make_unique<ParquetRows>(path, std::vector<std::string>{options.text_field});
    return;
  }
  m.source = open_source(path);
  const std::string base = strip_compression(path);
  if (ends_with(base, ".jsonl") || ends_with(base, ".ndjson")) {
    m.mode = Impl::Mode::kLines;
  } else if (ends_with(base, ".json")) {
    // A JSON array (Alpaca's alpaca_data.json) or, despite the name, JSONL: look at the first byte.
    while (m.buf.find_first_not_of(" \t\r\n\xef\xbb\xbf") == std::string::npos && m.fill()) {
    }
    size_t first = m.buf.find_first_not_of(" \t\r\n\xef\xbb\xbf");
    if (first != std::string::npos && m.buf[first] == '[') {
      while (m.fill()) {
      }
      try {
        m.array = nlohmann::json::parse(m.buf);
      } catch (const nlohmann::json::parse_error& e) {
        int64_t line = 1 + std::count(m.buf.begin(), m.buf.begin() + std::min(e.byte, m.buf.size()), '\n');
        fail("{}:{}: not a valid JSON array: {}", path, line, json_reason(e));
      } catch (const nlohmann::json::exception& e) {  // out_of_range: a number too large for a double
        fail("{}: not a valid JSON array: {}", path, json_reason(e));
      }
      m.buf.clear();
      m.buf.shrink_to_fit();
      m.mode = Impl::Mode::kArray;
    }
  } else {
    m.mode = Impl::Mode::kWhole;
  }
}

RecordReader::~RecordReader() = default;
RecordReader::RecordReader(RecordReader&&) noexcept = default;

bool RecordReader::is_json() const { return impl_->mode == Impl::Mode::kLines || impl_->mode == Impl::Mode::kArray; }

bool RecordReader::next(Record& record) {
  bool got = false;
  switch (impl_->mode) {
    case Impl::Mode::kLines: got = impl_->next_line(record); break;
    case Impl::Mode::kArray: got = impl_->next_item(record); break;
    case Impl::Mode::kWhole: got = impl_->next_whole(record); break;
    case Impl::Mode::kParquet: got = impl_->next_row(record); break;
  }
  impl_->report(!got);
  return got;
}

int64_t RecordReader::skip(int64_t n) {
  if (impl_->mode == Impl::Mode::kParquet) {
    const int64_t done = impl_->parquet->skip(n);
    impl_->line = impl_->parquet->row() + 1;
    impl_->report(false);
    return done;
  }
  int64_t done = 0;
  Record r;
  while (done < n && next(r)) ++done;
  return done;
}

// ---- Records to documents -------------------------------------------------------------------------

namespace {

// A record as a JSON object, or false with the reason.
bool parse_object(const Record& record, nlohmann::json& j, std::string& why) {
  try {
    j = nlohmann::json::parse(record.bytes);
  } catch (const nlohmann::json::exception& e) {
    why = json_reason(e);
    return false;
  }
  if (!j.is_object()) {
    why = "not a JSON object";
    return false;
  }
  return true;
}

}  // namespace

bool valid_utf8(std::string_view s, size_t* bad_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned min;
    if ((c & 0xE0) == 0xC0) len = 2, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, min = 0x10000;
    else break;
    if (i + len > n) break;
    unsigned cp = c & (0x7F >> len);
    size_t k = 1;
    for (; k < len && (p[i + k] & 0xC0) == 0x80; ++k) cp = (cp << 6) | (p[i + k] & 0x3F);
    // Overlong forms, surrogates and code points past U+10FFFF are invalid too.
    if (k < len || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) break;
    i += len;
  }
  if (i < n && bad_offset) *bad_offset = i;
  return i == n;
}

bool document_text(const Record& record, bool json, const ReadOptions& options, std::string& text,
                   std::string& why) {
  if (!json) {
    size_t bad = 0;
    if (!valid_utf8(record.bytes, &bad)) {
      why = fmt::format("invalid UTF-8 at byte {}", bad);
      return false;
    }
    text.assign(record.bytes);
    return true;
  }
  // JSON strings are checked for valid UTF-8 by the parser.
  nlohmann::json j;
  if (!parse_object(record, j, why)) return false;
  auto it = j.find(options.text_field);
  if (it == j.end() || !it->is_string()) {
    why = it == j.end() ? fmt::format("no \"{}\" field", options.text_field)
                        : fmt::format("field \"{}\" is not a string", options.text_field);
    return false;
  }
  text = std::move(it->get_ref<std::string&>());
  return true;
}

bool alpaca_example(const Record& record, AlpacaExample& example, std::string& why) {
  nlohmann::json j;
  if (!parse_object(record, j, why)) return false;
  std::string* fields[] = {&example.instruction, &example.input, &example.output};
  const char* names[] = {"instruction", "input", "output"};
  for (int i = 0; i < 3; ++i) {
    auto it = j.find(names[i]);
    if (it == j.end() || it->is_null()) {
      if (i == 1) {  // "input" is optional
        fields[i]->clear();
        continue;
      }
      why = fmt::format("no \"{}\" field", names[i]);
      return false;
    }
    if (!it->is_string()) {
      why = fmt::format("field \"{}\" is not a string", names[i]);
      return false;
    }
    *fields[i] = it->get<std::string>();
  }
  return true;
}

void ReadStats::add(const ReadStats& o) {
  records += o.records;
  documents += o.documents;
  empty += o.empty;
  malformed += o.malformed;
  too_long += o.too_long;
}

std::string ReadStats::summary() const {
  std::string s = fmt::format("{} documents from {} records", documents, records);
  if (empty + malformed + too_long > 0)
    s += fmt::format("; skipped: {} empty, {} malformed, {} too long", empty, malformed, too_long);
  return s;
}

std::string record_place(const std::string& file, int64_t line) {
  return is_parquet_path(file) ? fmt::format("{}: row {}", file, line - 1) : fmt::format("{}:{}", file, line);
}

void skip_record(const std::string& file, int64_t line, const std::string& why, const ReadOptions& options,
                 ReadStats& stats, bool too_long) {
  (too_long ? stats.too_long : stats.malformed) += 1;
  const std::string where = record_place(file, line);
  if (stats.bad() > options.max_bad_records)
    fail("{}: {} (more than {} malformed records; raise data.max_bad_records to go on)", where, why,
         options.max_bad_records);
  if (stats.bad() <= 10) fmt::print(stderr, "coil: warning: {}: skipped: {}\n", where, why);
  if (stats.bad() == 10) fmt::print(stderr, "coil: warning: further skipped records are counted, not shown\n");
}

void for_each_document(const std::vector<std::string>& files, const ReadOptions& options,
                       const std::function<void(std::string&& text)>& fn, ReadStats* stats_out) {
  for_each_document_while(files, options, [&](std::string&& text) {
    fn(std::move(text));
    return true;
  }, stats_out);
}

void for_each_document_while(const std::vector<std::string>& files, const ReadOptions& options,
                             const std::function<bool(std::string&& text)>& fn, ReadStats* stats_out) {
  ReadStats stats;
  std::string text, why;
  bool more = true;
  for (size_t f = 0; f < files.size() && more; ++f) {
    const std::string& file = files[f];
    RecordReader reader(file, options);
    Record r;
    while (more && reader.next(r)) {
      ++stats.records;
      if (r.too_long) {
        skip_record(file, r.line, fmt::format("record longer than {} bytes", options.max_record_bytes), options,
                    stats, true);
      } else if (!document_text(r, reader.is_json(), options, text, why)) {
        skip_record(file, r.line, why, options, stats);
      } else if (text.empty()) {
        ++stats.empty;
      } else {
        ++stats.documents;
        if (options.progress) options.progress->add_documents(1);
        more = fn(std::move(text));
      }
    }
  }
  if (stats_out) stats_out->add(stats);
}

namespace {

// The instruction, input (optional, a null or missing column is no input) and output columns of a
// Parquet file, as Hugging Face's Alpaca sets have them (their "text" column is not read).
void read_alpaca_parquet(const std::string& file, const ReadOptions& options, ReadStats& stats,
                         std::vector<AlpacaExample>& out) {
  static const std::vector<std::string> names = {"instruction", "input", "output"};
  ParquetRows rows(file, names, {false, true, false});
  std::vector<std::string_view> v;
  std::vector<bool> null;
  while (rows.next(v, null)) {
    ++stats.records;
    const int64_t line = rows.row() + 1;
    if (null[0] || null[2]) {
      skip_record(file, line, fmt::format("\"{}\" is null", null[0] ? "instruction" : "output"), options, stats);
      continue;
    }
    if (static_cast<int64_t>(v[0].size() + v[1].size() + v[2].size()) > options.max_record_bytes) {
      skip_record(file, line, fmt::format("record longer than {} bytes", options.max_record_bytes), options, stats,
                  true);
      continue;
    }
    size_t bad = 0;
    int invalid = -1;
    for (int i = 0; i < 3 && invalid < 0; ++i)
      if (!valid_utf8(v[static_cast<size_t>(i)], &bad)) invalid = i;
    if (invalid >= 0) {
      skip_record(file, line, fmt::format("\"{}\": invalid UTF-8 at byte {}", names[static_cast<size_t>(invalid)], bad),
                  options, stats);
      continue;
    }
    ++stats.documents;
    out.push_back(AlpacaExample{std::string(v[0]), null[1] ? std::string() : std::string(v[1]), std::string(v[2])});
  }
}

}  // namespace

std::vector<AlpacaExample> read_alpaca(const std::vector<std::string>& files, const ReadOptions& options,
                                       ReadStats* stats_out) {
  ReadStats stats;
  std::vector<AlpacaExample> out;
  std::string why;
  for (const auto& file : files) {
    if (is_parquet_path(file)) {
      read_alpaca_parquet(file, options, stats, out);
      continue;
    }
    RecordReader reader(file, options);
    if (!reader.is_json()) fail("{}: an Alpaca file must be JSON (an array), JSONL or Parquet", file);
    Record r;
    AlpacaExample ex;
    while (reader.next(r)) {
      ++stats.records;
      if (r.too_long) {
        skip_record(file, r.line, fmt::format("record longer than {} bytes", options.max_record_bytes), options,
                    stats, true);
      } else if (r.bytes.find_first_not_of(" \t\r") == std::string_view::npos) {
        ++stats.empty;  // a blank line
      } else if (!alpaca_example(r, ex, why)) {
        skip_record(file, r.line, why, options, stats);
      } else {
        ++stats.documents;
        out.push_back(std::move(ex));
      }
    }
  }
  if (stats_out) stats_out->add(stats);
  return out;
}

// ---- Inputs ---------------------------------------------------------------------------------------

std::vector<std::string> expand_inputs(const std::string& patterns) {
  std::vector<std::string> files;
  size_t start = 0;
  if (patterns.find_first_not_of(", ") == std::string::npos) fail("no input given");
  while (start <= patterns.size()) {
    size_t comma = patterns.find(',', start);
    if (comma == std::string::npos) comma = patterns.size();
    std::string pattern = patterns.substr(start, comma - start);
    start = comma + 1;
    if (pattern.empty()) continue;
    std::error_code ec;
    if (fs::is_directory(pattern, ec)) {
      std::vector<std::string> in_dir;
      for (const auto& e : fs::directory_iterator(pattern))
        if (e.is_regular_file() && e.path().filename().string()[0] != '.') in_dir.push_back(e.path().string());
      if (in_dir.empty()) fail("input directory {} holds no files", pattern);
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
      continue;
    }
    glob_t g;
    int rc = glob(pattern.c_str(), 0, nullptr, &g);
    if (rc == GLOB_NOMATCH) {
      globfree(&g);
      if (pattern.find_first_of("*?[") == std::string::npos) fail("no such file: {}", pattern);
      fail("no file matches {}", pattern);
    }
    if (rc != 0) {
      globfree(&g);
      fail("cannot expand {}", pattern);
    }
    for (size_t i = 0; i < g.gl_pathc; ++i)
      if (!fs::is_directory(g.gl_pathv[i])) files.emplace_back(g.gl_pathv[i]);  // glob sorts its matches
    globfree(&g);
  }
  if (files.empty()) fail("no input file in {}", patterns);
  return files;
}

}  // namespace coil::data
