// A hang watchdog for the training loop: the loop marks its progress (and names what it does next);
// when no mark comes for `timeout_s` seconds (a collective that never completes, a stalled reader),
// the watchdog ends the whole job with a message naming this rank and its last operation, so that
// a launcher (coil launch, Slurm's requeue) can start it again instead of it hanging forever.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace coil {

class Watchdog {
 public:
  explicit Watchdog(double timeout_s);  // <= 0: off
  ~Watchdog();
  // Progress: `operation` (a string literal) is what the loop does from now on, at `step`.
  void mark(const char* operation, int64_t step = -1);

 private:
  void run();
  double timeout_s_;
  std::atomic<int64_t> last_ns_{0}, step_{0};
  std::atomic<const char*> operation_{"starting"};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace coil
