#include "data/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "util/error.h"

namespace coil::data {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// 1234567 -> "1.23M"; below 10000 as is.
std::string count(double x) {
  if (x >= 1e9) return fmt::format("{:.2f}G", x / 1e9);
  if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
  if (x >= 1e4) return fmt::format("{:.1f}k", x / 1e3);
  return fmt::format("{:.0f}", x);
}

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

double interval_from_env() {
  const char* v = std::getenv("COIL_PROGRESS_INTERVAL_S");
  if (!v || !*v) return 10.0;
  char* end = nullptr;
  const double s = std::strtod(v, &end);
  COIL_CHECK(end && *end == '\0' && std::isfinite(s) && s >= 0,
             "COIL_PROGRESS_INTERVAL_S={} is not a number of seconds >= 0", v);
  return s;
}

}  // namespace

Progress::Progress(std::string what, int64_t total_bytes, bool with_tokens, std::FILE* out)
    : what_(std::move(what)),
      total_(total_bytes),
      with_tokens_(with_tokens),
      out_(out),
      tty_(out && isatty(fileno(out)) != 0),
      interval_(interval_from_env()),
      t0_(std::chrono::steady_clock::now()) {
  // A terminal is redrawn a few times a second; a log gets a line per interval.
  const double first = tty_ ? std::min(0.25, interval_) : interval_;
  next_due_ns_ = static_cast<int64_t>(first * 1e9);
}

Progress::~Progress() {
  // A job that failed leaves its terminal line ended, so the error starts a line of its own.
  std::lock_guard<std::mutex> lock(print_mu_);
  if (tty_ && !finished_ && next_due_ns_.load() < 0) std::fputc('\n', out_);
}

void Progress::add_documents(int64_t n) {
  documents_ += n;
  maybe_print();
}
void Progress::add_tokens(int64_t n) {
  tokens_ += n;
  maybe_print();
}
void Progress::add_bytes(int64_t n) {
  bytes_ += n;
  maybe_print();
}

void Progress::maybe_print() {
  const int64_t now =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count();
  int64_t due = next_due_ns_.load(std::memory_order_relaxed);
  if (now < std::abs(due)) return;
  const double step = tty_ ? std::min(0.25, interval_) : interval_;
  // Negative once something was drawn on a terminal (the destructor then ends the line).
  const int64_t next = now + static_cast<int64_t>(step * 1e9);
  if (!next_due_ns_.compare_exchange_strong(due, tty_ ? -next : next)) return;  // another thread prints
  print(false);
}

std::string Progress::line() const {
  const double dt = std::max(seconds_since(t0_), 1e-9);
  const auto docs = documents_.load(), toks = tokens_.load(), bytes = bytes_.load();
  std::string s = fmt::format("{}: {} documents", what_, count(static_cast<double>(docs)));
  if (with_tokens_)
    s += fmt::format(", {} tokens, {} tokens/s", count(static_cast<double>(toks)),
                     count(static_cast<double>(toks) / dt));
  else
    s += fmt::format(", {:.1f} MB/s", static_cast<double>(bytes) / dt / 1e6);
  if (total_ > 0) {
    const double share = std::min(1.0, static_cast<double>(bytes) / static_cast<double>(total_));
    s += fmt::format(", {:.1f}% of {:.1f} MB", 100 * share, static_cast<double>(total_) / 1e6);
    s += share >= 1.0 ? fmt::format(", {} elapsed", duration(dt))
                      : fmt::format(", ETA {}", share > 0 ? duration(dt * (1 - share) / share) : "?");
  } else {
    s += fmt::format(", {} elapsed", duration(dt));
  }
  return s;
}

void Progress::print(bool last) {
  std::lock_guard<std::mutex> lock(print_mu_);
  if (finished_ || !out_) return;
  const std::string s = line();
  if (tty_)
    fmt::print(out_, "\r{}\x1b[K{}", s, last ? "\n" : "");
  else
    fmt::print(out_, "{}\n", s);
  std::fflush(out_);
}

void Progress::finish() {
  print(true);
  std::lock_guard<std::mutex> lock(print_mu_);
  finished_ = true;
}

int64_t total_file_bytes(const std::vector<std::string>& files) {
  int64_t total = 0;
  for (const auto& f : files) {
    std::error_code ec;
    const auto n = std::filesystem::file_size(f, ec);
    if (ec) return 0;
    total += static_cast<int64_t>(n);
  }
  return total;
}

}  // namespace coil::data
