// The CUDA emulator's stand-in for <cuda_runtime.h>: compiles Coil's .cu kernels as plain C++ and
// runs them on the CPU, so the kernel source itself (not a transcription of it) is checked against
// the references on a machine without a GPU. What it is, and what it is not:
//
//   * Each launch runs its blocks one after another, in grid order or reversed (set_schedule). The
//     threads of a block are fibers (ucontext) on the calling thread: a fiber runs until it reaches
//     __syncthreads, a warp shuffle or ballot, or its end; then the next runnable one runs, in
//     ascending, descending or seeded random order of thread index. A barrier releases when every
//     thread it waits for has arrived. Shared memory written without a barrier between the writer
//     and the reader gives a different result under another order, so tests run every order.
//   * Strict where CUDA is undefined: a thread that leaves the kernel while others of its block
//     wait at __syncthreads, a shuffle whose mask names a lane that left or that never comes, and
//     a block whose threads all wait (a deadlock) end the launch with an error that says so. So do
//     launch shapes outside CUDA's limits and more than 48 KiB of dynamic shared memory without
//     cudaFuncSetAttribute (or above the H100/H200 limit of 227 KiB).
//   * Dynamic shared memory starts as NaN, so a kernel reading what it did not write sees NaNs.
//   * Under AddressSanitizer (scripts/test --sanitize) every fiber switch is announced to it, and
//     every access is bounds-checked: global memory is LibTorch's heap tensors, static __shared__
//     arrays are globals, dynamic shared memory is a heap vector of exactly the launch's bytes.
//   * Not emulated: timing, the memory model beyond barriers, register limits, __launch_bounds__.
//     Atomics are plain additions (one OS thread). Math is the host's libm in float32.
#pragma once

#define COIL_CUDA_EMULATION 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>

#include "coil_emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function's static array is its block's shared memory.
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};

// Set by the emulator before it resumes a thread.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace coil_emu {

// The emulated device: an H200's SM count and limits.
constexpr int kSMs = 132;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;

void syncthreads();
// The warp collectives: every lane in mask calls with its value and source lane; each gets back
// the value of its source lane (shuffles) or the mask of lanes whose value was non-zero (ballot).
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, bool ballot);
float* dynamic_shared_floats();

const char* error_string(cudaError_t err);
cudaError_t take_last_error();
cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes);
int occupancy(int threads, size_t dynamic_smem);
// Runs body on every thread of every block of grid (see the header comment); the launch's error
// is also the last error (cudaGetLastError).
cudaError_t run(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

// What `kernel<<<grid, block, smem, stream>>>(args...)` is in model/cuda_kernel.cuh.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  run(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { kernel(static_cast<P>(args)...); });
  return take_last_error();
}

}  // namespace coil_emu

inline void __syncthreads() { coil_emu::syncthreads(); }

inline int coil_emu_lane() {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return int(t % 32);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const int lane = coil_emu_lane();
  const int src = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
  bits = coil_emu::warp_exchange(mask, bits, src, false);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return unsigned(coil_emu::warp_exchange(mask, predicate != 0, coil_emu_lane(), true));
}
inline float atomicAdd(float* address, float v) {
  const float old = *address;
  *address = old + v;
  return old;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }  // (the TU is built with -ffp-contract=off)

inline const char* cudaGetErrorString(cudaError_t err) { return coil_emu::error_string(err); }
inline cudaError_t cudaGetLastError() { return coil_emu::take_last_error(); }
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return coil_emu::set_dynamic_smem_limit(reinterpret_cast<const void*>(kernel), value);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int threads, size_t smem) {
  *n = coil_emu::occupancy(threads, smem);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = coil_emu::kSMs;
  return cudaSuccess;
}
