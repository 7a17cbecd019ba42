// Counts the ATen operators that a piece of code calls, through RecordFunction callbacks on the
// calling thread: the top-level ones (not called from inside another operator: on CUDA, about one
// kernel launch each at most) and the host syncs (aten::_local_scalar_dense, what .item() runs).
// The tests and bench_optim use it to show that an optimizer step's operators grow with the number
// of distinct shapes, not of parameters. Header-only; one counter per thread at a time.
#pragma once

#include <ATen/record_function.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>

namespace coil::optim {

struct OpCounts {
  int64_t top_level = 0, all = 0, host_syncs = 0;
  std::map<std::string, int64_t> top_level_by_name;
};

namespace detail {
inline thread_local OpCounts* g_op_counts = nullptr;
inline thread_local int g_op_depth = 0;
struct NoContext : at::ObserverContext {};

inline std::unique_ptr<at::ObserverContext> count_op_start(const at::RecordFunction& fn) {
  if (OpCounts* c = g_op_counts) {
    const char* name = fn.name();
    if (g_op_depth == 0) {
      ++c->top_level;
      ++c->top_level_by_name[name];
    }
    ++c->all;
    if (std::strcmp(name, "aten::_local_scalar_dense") == 0) ++c->host_syncs;
    ++g_op_depth;
  }
  return std::make_unique<NoContext>();
}
inline void count_op_end(const at::RecordFunction&, at::ObserverContext*) {
  if (g_op_counts && g_op_depth > 0) --g_op_depth;
}
}  // namespace detail

// Counts from construction to destruction (or counts()).
class OpCounter {
 public:
  OpCounter() {
    detail::g_op_counts = &counts_;
    detail::g_op_depth = 0;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(detail::count_op_start, detail::count_op_end).scopes({at::RecordScope::FUNCTION}));
  }
  ~OpCounter() {
    at::removeCallback(handle_);
    detail::g_op_counts = nullptr;
  }
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;
  const OpCounts& counts() const { return counts_; }

 private:
  OpCounts counts_;
  at::CallbackHandle handle_;
};

}  // namespace coil::optim
