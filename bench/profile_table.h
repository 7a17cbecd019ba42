// A profiler table for the benchmarks: runs a function once under LibTorch's Kineto profiler
// (torch/csrc/autograd/profiler_kineto.h, what torch.profiler drives) and prints the entries that
// took the most time. On CUDA: the GPU's kernels, copies and memsets, by name, their total device
// time (kernels do not nest). On CPU: the operators by self time (an operator's time less the time
// of the operators it called on the same thread, found by nesting the intervals per thread), as
// torch.profiler's "self CPU" column.
#pragma once

#include <fmt/core.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace coil::bench {

struct ProfileRow {
  std::string name;
  double total_ms = 0;
  int64_t calls = 0;
};

// The rows of `events`, largest total first: GPU activity when `gpu`, else CPU operators' self time.
inline std::vector<ProfileRow> profile_rows(const std::vector<torch::autograd::profiler::KinetoEvent>& events,
                                            bool gpu) {
  // libkineto::ActivityType: CPU_OP 0, GPU_MEMCPY 3, GPU_MEMSET 4, CONCURRENT_KERNEL 5.
  auto is_gpu = [](uint8_t t) { return t == 3 || t == 4 || t == 5; };
  std::map<std::string, ProfileRow> by_name;
  if (gpu) {
    for (const auto& e : events)
      if (is_gpu(e.activityType())) {
        ProfileRow& r = by_name[e.name()];
        r.total_ms += e.durationNs() / 1e6;
        ++r.calls;
      }
  } else {
    // Self time: per thread, in start order (the enclosing one first), each event's duration is
    // taken off its innermost enclosing event.
    std::vector<size_t> ops;
    for (size_t i = 0; i < events.size(); ++i)
      if (events[i].activityType() == 0 && events[i].endNs() >= events[i].startNs()) ops.push_back(i);
    std::sort(ops.begin(), ops.end(), [&](size_t a, size_t b) {
      const auto &x = events[a], &y = events[b];
      if (x.startThreadId() != y.startThreadId()) return x.startThreadId() < y.startThreadId();
      if (x.startNs() != y.startNs()) return x.startNs() < y.startNs();
      return x.endNs() > y.endNs();
    });
    std::vector<double> self(events.size(), 0);
    std::vector<size_t> open;
    uint64_t thread = 0;
    for (size_t i : ops) {
      const auto& e = events[i];
      if (open.empty() || e.startThreadId() != thread) open.clear(), thread = e.startThreadId();
      while (!open.empty() && events[open.back()].endNs() <= e.startNs()) open.pop_back();
      self[i] += e.durationNs() / 1e6;
      if (!open.empty()) self[open.back()] -= e.durationNs() / 1e6;
      open.push_back(i);
    }
    for (size_t i : ops) {
      ProfileRow& r = by_name[events[i].name()];
      r.total_ms += self[i];
      ++r.calls;
    }
  }
  std::vector<ProfileRow> rows;
  for (auto& [name, r] : by_name) {
    r.name = name;
    rows.push_back(r);
  }
  std::sort(rows.begin(), rows.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.total_ms > b.total_ms; });
  return rows;
}

// Runs `run` once under the profiler (`run` synchronizes the device itself) and prints the `top`
// largest rows with their share of the whole.
inline void print_profile(const std::function<void()>& run, bool cuda, int top) {
  namespace tp = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  std::set<ActivityType> activities{ActivityType::CPU};
  if (cuda) activities.insert(ActivityType::CUDA);
  tp::prepareProfiler(config, activities);
  tp::enableProfiler(config, activities);
  run();
  const std::unique_ptr<tp::ProfilerResult> result = tp::disableProfiler();
  const std::vector<ProfileRow> rows = profile_rows(result->events(), cuda);
  double all = 0;
  for (const auto& r : rows) all += r.total_ms;
  fmt::print("profile of one step: top {} {} of {} ({:.2f} ms in all)\n", std::min<size_t>(top, rows.size()),
             cuda ? "GPU kernels/copies by device time" : "CPU operators by self time", rows.size(), all);
  fmt::print("  {:>9} {:>6} {:>6}  {}\n", "ms", "share", "calls", "name");
  for (size_t i = 0; i < rows.size() && i < static_cast<size_t>(top); ++i) {
    std::string name = rows[i].name;
    if (name.size() > 100) name = name.substr(0, 97) + "...";
    fmt::print("  {:9.3f} {:5.1f}% {:6}  {}\n", rows[i].total_ms, all > 0 ? 100.0 * rows[i].total_ms / all : 0.0,
               rows[i].calls, name);
  }
}

}  // namespace coil::bench
