#include "launch/watchdog.h"

#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "dist/world.h"

namespace coil {
namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Watchdog::Watchdog(double timeout_s) : timeout_s_(timeout_s) {
  last_ns_ = now_ns();
  if (timeout_s_ > 0) thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::mark(const char* operation, int64_t step) {
  operation_ = operation;
  if (step >= 0) step_ = step;
  last_ns_ = now_ns();
}

void Watchdog::run() {
  const auto poll = std::chrono::duration<double>(std::min(1.0, timeout_s_ / 10));
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, poll, [this] { return stop_; })) {
    const double idle = static_cast<double>(now_ns() - last_ns_.load()) * 1e-9;
    if (idle < timeout_s_) continue;
    const std::string message =
        fmt::format("no progress for {:.0f} s (train.watchdog_timeout = {:g}) at step {}; last operation: {}; "
                    "ending the job so that it can be restarted",
                    idle, timeout_s_, step_.load(), operation_.load());
    if (dist::launched_by_mpi() && dist::world().size > 1) dist::abort_all(message, 3);  // MPI_Abort: every rank
    fmt::print(stderr, "coil: error: {}\n", message);
    std::fflush(stderr);
    std::_Exit(3);  // the training thread is stuck: no clean exit to wait for
  }
}

}  // namespace coil
