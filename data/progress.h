// Progress of long data jobs (`coil data prepare`, `coil tokenizer train`, on JSONL or Parquet):
// documents, tokens and tokens/s (or MB/s when the job makes no tokens) and, when the size of the
// input is known, the share read and an ETA.
//
// On a terminal it is one line, rewritten in place four times a second (or every interval, if
// shorter) and ended when the job ends; otherwise (a log file, a pipe, a batch job) a whole line
// every few seconds, as the training loop logs: COIL_PROGRESS_INTERVAL_S seconds, 10 by default
// (0: at every update, for tests).
// Whatever the mode, finish() writes the final line.
//
// The share read is in input bytes: readers (data/reader.h) add the bytes of the files they have
// consumed, compressed bytes for .gz/.zst and, for Parquet, the file's size in proportion to the
// rows passed (its row count comes from the footer). Counters are atomic: any thread may add.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

namespace coil::data {

class Progress {
 public:
  // `what` starts each line ("prepare", "tokenizer"); total_bytes 0: unknown (no share, no ETA).
  // with_tokens: show tokens and tokens/s, else MB/s of input. out null: counts only, prints nothing
  // (the ranks other than the first of a data-parallel job).
  Progress(std::string what, int64_t total_bytes, bool with_tokens, std::FILE* out = stderr);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void add_documents(int64_t n);
  void add_tokens(int64_t n);
  void add_bytes(int64_t n);  // input bytes consumed
  void finish();              // the last line (once)

  // The current line, without a line end (what a test compares).
  std::string line() const;
  bool terminal() const { return tty_; }
  double interval_s() const { return interval_; }

 private:
  void maybe_print();
  void print(bool last);

  std::string what_;
  int64_t total_;
  bool with_tokens_;
  std::FILE* out_;
  bool tty_;
  double interval_;
  std::chrono::steady_clock::time_point t0_;
  std::atomic<int64_t> documents_{0}, tokens_{0}, bytes_{0};
  std::atomic<int64_t> next_due_ns_{0};
  std::mutex print_mu_;
  bool finished_ = false;
};

// Sum of the sizes of the files (0 when one cannot be read: the total is then unknown).
int64_t total_file_bytes(const std::vector<std::string>& files);

}  // namespace coil::data
