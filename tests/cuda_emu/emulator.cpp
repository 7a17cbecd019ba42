// The CUDA emulator's scheduler: blocks one after another, their threads as fibers. The design, and
// what is strict, is in include/cuda_runtime.h.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

// Under AddressSanitizer (COIL_SANITIZE) every switch between fibers is announced, so ASan knows
// which stack is live (its fake stacks for use-after-return are per fiber).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define COIL_EMU_ASAN 1
#else
#define COIL_EMU_ASAN 0
#endif

uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
dim3 blockDim, gridDim;

namespace coil_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kRunnable, kBlockBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx{};
  void* fake_stack = nullptr;  // ASan's, while the fiber is switched out
  uint3 idx{};
  Wait wait = Wait::kRunnable;
  // A warp collective in progress: this lane's part, then its result.
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int src = 0;
  bool ballot = false;
};

struct Launch {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler{};
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;  // its bounds, for ASan (from the first switch into a fiber)
  size_t scheduler_stack_bytes = 0;
  int current = -1;
  int at_barrier = 0, done = 0;
  std::vector<float> smem;
  std::string error;  // set: the launch has failed, no fiber runs again
};

Launch* g_launch = nullptr;
Order g_order = Order::kAscending;
uint64_t g_seed = 0;
Counts g_counts;
cudaError_t g_last = cudaSuccess;
std::string g_message;
std::map<const void*, int> g_smem_limits;

// swapcontext(from, to), announced to ASan: `from_fake` keeps the leaving context's fake stack
// until it is resumed, `to_stack` is where the entered one's stack lies. (A fiber that ends tells
// ASan itself, at the end of fiber_main, with no fake stack to keep.)
void switch_context(ucontext_t* from, void** from_fake, ucontext_t* to, const void* to_stack, size_t to_bytes) {
#if COIL_EMU_ASAN
  __sanitizer_start_switch_fiber(from_fake, to_stack, to_bytes);
#else
  (void)from_fake, (void)to_stack, (void)to_bytes;
#endif
  swapcontext(from, to);
#if COIL_EMU_ASAN
  __sanitizer_finish_switch_fiber(from_fake ? *from_fake : nullptr, nullptr, nullptr);
#endif
}

// The current fiber hands control back to the scheduler until it is runnable again.
void yield() {
  Launch& l = *g_launch;
  Fiber& f = l.fibers[size_t(l.current)];
  switch_context(&f.ctx, &f.fake_stack, &l.scheduler, l.scheduler_stack, l.scheduler_stack_bytes);
}

// Thrown inside a fiber once its launch has failed: unwinds it to fiber_main (its temporaries
// destroyed), which returns to the scheduler; no fiber of the launch runs again.
struct LaunchFailed {};

std::string where(const Launch& l, int t) {
  const uint3& i = l.fibers[size_t(t)].idx;
  return "thread (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ") of block (" +
         std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Ends the launch from inside a fiber: records why and unwinds the fiber.
[[noreturn]] void fail_in_fiber(const std::string& why) {
  g_launch->error = why;
  throw LaunchFailed{};
}

// Lanes of warp w that the block has, as a mask.
unsigned existing_lanes(const Launch& l, int warp) {
  const int n = int(l.fibers.size()) - 32 * warp;
  return n >= 32 ? 0xffffffffu : (1u << n) - 1;
}

// Completes the warp collective of the lanes in mask if all of them have arrived.
bool try_release_warp(Launch& l, int warp, unsigned mask) {
  Fiber* lane[32] = {};
  for (int k = 0; k < 32; ++k)
    if ((mask >> k) & 1u) {
      lane[k] = &l.fibers[size_t(32 * warp + k)];
      if (lane[k]->wait != Wait::kWarp) return false;
    }
  uint64_t votes = 0;
  for (int k = 0; k < 32; ++k)
    if (lane[k] && lane[k]->value) votes |= uint64_t(1) << k;
  for (int k = 0; k < 32; ++k) {
    if (!lane[k]) continue;
    Fiber& f = *lane[k];
    if (f.mask != mask || f.ballot != lane[__builtin_ctz(mask)]->ballot)
      fail_in_fiber(where(l, 32 * warp + k) + ": lanes of one warp collective disagree on its mask or kind");
    if (f.ballot) {
      f.result = votes;
    } else {
      if (!((mask >> f.src) & 1u))
        fail_in_fiber(where(l, 32 * warp + k) + ": shuffles from lane " + std::to_string(f.src) + ", outside the mask");
      f.result = lane[f.src]->value;
    }
  }
  for (int k = 0; k < 32; ++k)
    if (lane[k]) lane[k]->wait = Wait::kRunnable;
  return true;
}

// A thread leaves the kernel: an error if its block or its warp still waits for it.
void leave_kernel(Launch& l) {
  const int t = l.current;
  l.fibers[size_t(t)].wait = Wait::kDone;
  ++l.done;
  if (l.at_barrier > 0)
    fail_in_fiber(where(l, t) + " left the kernel while " + std::to_string(l.at_barrier) +
                  " threads of its block wait at __syncthreads");
  const int warp = t / 32;
  for (int k = 0; k < 32 && 32 * warp + k < int(l.fibers.size()); ++k) {
    const Fiber& f = l.fibers[size_t(32 * warp + k)];
    if (f.wait == Wait::kWarp && ((f.mask >> (t % 32)) & 1u))
      fail_in_fiber(where(l, t) + " left the kernel while its warp waits for it at a shuffle or ballot");
  }
}

// A fiber's whole life; returning resumes the scheduler (uc_link).
void fiber_main() {
  Launch& l = *g_launch;
#if COIL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  try {
    (*l.body)();
    leave_kernel(l);
  } catch (const LaunchFailed&) {
  }
#if COIL_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, l.scheduler_stack, l.scheduler_stack_bytes);
#endif
}

std::vector<int64_t> order_of(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  if (g_order == Order::kDescending) std::reverse(v.begin(), v.end());
  if (g_order == Order::kShuffled) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// A fiber that starts in fiber_main on `stack` and returns to `scheduler`. On its own, out of line:
// getcontext returns twice, which would leave the caller's locals "might be clobbered".
[[gnu::noinline]] void make_fiber(Fiber& f, char* stack, ucontext_t* scheduler) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = scheduler;
  makecontext(&f.ctx, fiber_main, 0);
}

// Runs one block to its end; false (with l.error set) if it failed.
bool run_block(Launch& l, std::mt19937_64& rng) {
  const int n = int(l.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = l.fibers[size_t(t)];
    f = Fiber{};
    f.idx = {unsigned(t) % blockDim.x, unsigned(t) / blockDim.x % blockDim.y, unsigned(t) / (blockDim.x * blockDim.y)};
    make_fiber(f, l.stacks.get() + size_t(t) * kStackBytes, &l.scheduler);
  }
  l.at_barrier = l.done = 0;
  std::fill(l.smem.begin(), l.smem.end(), std::numeric_limits<float>::quiet_NaN());
  while (l.done < n) {
    bool ran = false;
    for (const int64_t t : order_of(n, rng)) {
      Fiber& f = l.fibers[size_t(t)];
      if (f.wait != Wait::kRunnable) continue;
      l.current = int(t);
      threadIdx = f.idx;
      switch_context(&l.scheduler, &l.scheduler_fake_stack, &f.ctx, f.ctx.uc_stack.ss_sp, kStackBytes);
      ran = true;
      if (!l.error.empty()) return false;
    }
    if (!ran) {
      int warp_waits = 0;
      for (const Fiber& f : l.fibers) warp_waits += f.wait == Wait::kWarp;
      l.error = "deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                std::to_string(blockIdx.z) + "): " + std::to_string(l.at_barrier) + " threads wait at __syncthreads, " +
                std::to_string(warp_waits) + " at a shuffle or ballot, " + std::to_string(l.done) + " have left";
      return false;
    }
  }
  return true;
}

cudaError_t launch_error(const std::string& why) {
  g_message = why;
  g_last = cudaErrorLaunchFailure;
  return g_last;
}

}  // namespace

void set_schedule(Order order, uint64_t seed) { g_order = order, g_seed = seed; }
Counts take_counts() { return std::exchange(g_counts, Counts{}); }

void syncthreads() {
  Launch& l = *g_launch;
  Fiber& f = l.fibers[size_t(l.current)];
  if (l.done > 0)
    fail_in_fiber(where(l, l.current) + " reached __syncthreads after " + std::to_string(l.done) +
                  " threads of its block left the kernel");
  f.wait = Wait::kBlockBarrier;
  if (++l.at_barrier == int(l.fibers.size())) {
    for (Fiber& o : l.fibers) o.wait = Wait::kRunnable;
    l.at_barrier = 0;
    return;
  }
  yield();
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, bool ballot) {
  Launch& l = *g_launch;
  const int t = l.current, warp = t / 32, lane = t % 32;
  if (!((mask >> lane) & 1u)) fail_in_fiber(where(l, t) + ": a shuffle or ballot whose mask leaves out its own lane");
  if (mask & ~existing_lanes(l, warp))
    fail_in_fiber(where(l, t) + ": a shuffle or ballot whose mask names lanes the block does not have");
  for (int k = 0; k < 32; ++k)
    if (((mask >> k) & 1u) && l.fibers[size_t(32 * warp + k)].wait == Wait::kDone)
      fail_in_fiber(where(l, t) + ": a shuffle or ballot with lane " + std::to_string(k) + ", which left the kernel");
  Fiber& f = l.fibers[size_t(t)];
  f.wait = Wait::kWarp, f.mask = mask, f.value = value, f.src = src_lane, f.ballot = ballot;
  if (!try_release_warp(l, warp, mask)) yield();
  return f.result;
}

float* dynamic_shared_floats() { return g_launch->smem.data(); }

const char* error_string(cudaError_t err) { return err == cudaSuccess ? "no error" : g_message.c_str(); }
cudaError_t take_last_error() { return std::exchange(g_last, cudaSuccess); }

cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes) {
  if (bytes < 0 || size_t(bytes) > kMaxDynamicSmem) {
    g_message = "cudaFuncSetAttribute: " + std::to_string(bytes) + " bytes of dynamic shared memory, above the " +
                std::to_string(kMaxDynamicSmem) + " an H100/H200 block can have";
    return cudaErrorInvalidValue;
  }
  g_smem_limits[kernel] = bytes;
  return cudaSuccess;
}

int occupancy(int threads, size_t dynamic_smem) {
  // Per SM: 2048 threads, 32 blocks, 228 KiB of shared memory with 1 KiB reserved per block.
  int n = std::min(32, 2048 / std::max(threads, 1));
  if (dynamic_smem > 0) n = std::min<int>(n, int(228 * 1024 / (dynamic_smem + 1024)));
  return std::max(n, 0);
}

cudaError_t run(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    return launch_error("launch of " + std::to_string(threads) + " threads a block: outside [1, 1024]");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return launch_error("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                        std::to_string(grid.z) + ") outside CUDA's limits");
  if (dynamic_smem > kDefaultDynamicSmem) {
    const auto it = g_smem_limits.find(kernel);
    if (it == g_smem_limits.end() || size_t(it->second) < dynamic_smem)
      return launch_error(std::to_string(dynamic_smem) +
                          " bytes of dynamic shared memory, above 48 KiB without cudaFuncSetAttribute allowing it");
  }
  Launch l;
  l.body = &body;
  l.fibers.resize(size_t(threads));
  l.stacks.reset(new char[size_t(threads) * kStackBytes]);
  l.smem.resize((dynamic_smem + sizeof(float) - 1) / sizeof(float));
  blockDim = block, gridDim = grid;
  std::mt19937_64 rng(g_seed);
  Launch* outer = std::exchange(g_launch, &l);
  ++g_counts.launches;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  for (const int64_t b : order_of(blocks, rng)) {
    blockIdx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (int64_t(grid.x) * grid.y))};
    ++g_counts.blocks;
    if (!run_block(l, rng)) {
      g_launch = outer;
      return launch_error(l.error);
    }
  }
  g_launch = outer;
  return cudaSuccess;
}

}  // namespace coil_emu
