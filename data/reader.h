// Reading text corpora from files: FineWeb-style JSONL (plain, .gz or .zst) or Parquet, plain text,
// and Alpaca instruction sets (a JSON array, JSONL or Parquet of {instruction, input, output}).
//
// A file is read as a sequence of records:
//   *.jsonl, *.jsonl.gz, *.jsonl.zst, *.json.gz, *.json.zst  one JSON object per line
//   *.json                                                     a JSON array of objects (Alpaca's
//                                                              alpaca_data.json), or JSONL
//   *.parquet                                                  one row per record: the text_field
//                                                              column (data/parquet.h), a row group
//                                                              at a time; `line` is the row + 1
//   anything else (*.txt, *.md, ...)                           the whole file is one record
// A record that cannot be used (not JSON, no such field, not a string, invalid UTF-8, longer than
// max_record_bytes) is reported with file:line and skipped, and counted; past max_bad_records
// skipped records the read fails. Empty documents are skipped and counted, and never fatal.
// A truncated or corrupt .gz, .zst or .parquet file is always an error, as is a Parquet file without
// the column (or with one that does not hold strings); a null in the column is an empty document.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace coil::data {

class Progress;  // data/progress.h

struct ReadOptions {
  std::string text_field = "text";          // the JSON field that holds a document's text
  int64_t max_bad_records = 1000;           // skipped malformed records allowed before failing (0: fail at once)
  int64_t max_record_bytes = int64_t{64} << 20;  // longer lines are skipped (and counted), never buffered
  Progress* progress = nullptr;  // when set, readers add the input bytes they consume, and documents
};

// What was skipped, so that a run can report it (and a test can check it).
struct ReadStats {
  int64_t records = 0;    // records seen (lines of JSONL, elements of a JSON array, text files)
  int64_t documents = 0;  // records that gave a usable, non-empty document
  int64_t empty = 0;      // usable but empty documents (skipped)
  int64_t malformed = 0;  // bad JSON, missing or non-string field, invalid UTF-8 (skipped)
  int64_t too_long = 0;   // records longer than max_record_bytes (skipped)
  int64_t bad() const { return malformed + too_long; }
  void add(const ReadStats& o);
  std::string summary() const;  // "12 documents from 14 records; skipped: 1 empty, 1 malformed"
};

// One raw record of a file, before its JSON (if any) is parsed. `line` counts from 1.
struct Record {
  std::string_view bytes;
  int64_t line = 0;
  bool too_long = false;  // bytes is empty; the record was longer than max_record_bytes
};

// Reads a file record by record, decompressing .gz and .zst on the fly; memory stays bounded by
// max_record_bytes whatever the file holds.
class RecordReader {
 public:
  RecordReader(const std::string& path, const ReadOptions& options);
  ~RecordReader();
  RecordReader(RecordReader&&) noexcept;
  // The next record, or false at the end of the file. Throws coil::Error on I/O or a corrupt stream.
  bool next(Record& record);
  // Passes over the next n records (a Parquet file's whole row groups without decoding them);
  // returns how many were passed, fewer at the end of the file.
  int64_t skip(int64_t n);
  bool is_json() const;  // records are JSON objects (JSONL or a JSON array)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// True when `bytes` is valid UTF-8; otherwise `bad_offset` is where the first bad byte is.
bool valid_utf8(std::string_view bytes, size_t* bad_offset = nullptr);

// The text of a pretraining document, from one record: the `text_field` of a JSON object, or the
// raw bytes of a text file. On a malformed record returns false and says why in `why`.
bool document_text(const Record& record, bool json, const ReadOptions& options, std::string& text,
                   std::string& why);

// An Alpaca instruction example.
struct AlpacaExample {
  std::string instruction, input, output;
};
bool alpaca_example(const Record& record, AlpacaExample& example, std::string& why);

// Calls `fn(text)` for every document of the files, in order, skipping and counting what the
// options say. Reports skipped records on stderr with file:line (the first few of each file).
void for_each_document(const std::vector<std::string>& files, const ReadOptions& options,
                       const std::function<void(std::string&& text)>& fn, ReadStats* stats = nullptr);
// The same until `fn` returns false (no record after that one is read).
void for_each_document_while(const std::vector<std::string>& files, const ReadOptions& options,
                             const std::function<bool(std::string&& text)>& fn, ReadStats* stats = nullptr);

// Reads every Alpaca example of the files, in order.
std::vector<AlpacaExample> read_alpaca(const std::vector<std::string>& files, const ReadOptions& options,
                                       ReadStats* stats = nullptr);

// "file:line", or "file: row N" (from 0) for a Parquet file: where a record is, in messages.
std::string record_place(const std::string& file, int64_t line);

// Counts a skipped record, warns with file:line, and fails past options.max_bad_records.
// Shared by every reader so that the policy is the same everywhere.
void skip_record(const std::string& file, int64_t line, const std::string& why, const ReadOptions& options,
                 ReadStats& stats, bool too_long = false);

// Expands a comma-separated list of globs, files and directories (a directory stands for the
// files in it) into a sorted list of files. Throws coil::Error when a pattern matches nothing.
std::vector<std::string> expand_inputs(const std::string& patterns);

}  // namespace coil::data
