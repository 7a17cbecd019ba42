// The probe kernels of probe_kernels.h, written as CUDA and compiled for the emulator.
#include "probe_kernels.h"

#include <cuda_runtime.h>

#include "model/cuda_kernel.cuh"

namespace coil_emu::probe {
namespace {

using coil::cuda_kernel::dynamic_shared_floats;
using coil::cuda_kernel::launch;

constexpr int kThreads = 64, kBlocks = 2;
constexpr unsigned kFull = 0xffffffffu;

__global__ void warp_sums(float* out) {
  const int t = int(threadIdx.x), lane = t % 32;
  float v = float(t + 1);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  const unsigned odd = __ballot_sync(kFull, lane % 2);
  out[blockIdx.x * kThreads + t] = v + float(__builtin_popcount(odd)) / 100.f;
}

template <bool kBarrier>
__global__ void shared_neighbour(float* out) {
  float* s = dynamic_shared_floats();
  const int t = int(threadIdx.x);
  s[t] = float(blockIdx.x * kThreads + t);
  if (kBarrier) __syncthreads();
  out[blockIdx.x * kThreads + t] = s[(t + 1) % kThreads];
}

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = 1.f;
}

__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x % 32 == 3) return;
  out[blockIdx.x * kThreads + threadIdx.x] = __shfl_xor_sync(kFull, 1.f, 1);
}

__global__ void deadlock(float* out) {
  float v = 1.f;
  if (threadIdx.x == 0) v = __shfl_xor_sync(kFull, v, 1);
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = v;
}

__global__ void big_shared(float* out) {
  dynamic_shared_floats()[threadIdx.x] = 2.f;
  out[blockIdx.x * kThreads + threadIdx.x] = dynamic_shared_floats()[threadIdx.x];
}

std::string message(cudaError_t err) { return err == cudaSuccess ? "" : cudaGetErrorString(err); }

}  // namespace

Outcome run(Kernel kernel) {
  Outcome o;
  o.out.assign(kThreads * kBlocks, -1.f);
  float* out = o.out.data();
  const size_t row = kThreads * sizeof(float), big = 64 * 1024;
  cudaError_t err = cudaSuccess;
  switch (kernel) {
    case Kernel::kWarpSums: err = launch(warp_sums, kBlocks, kThreads, 0, nullptr, out); break;
    case Kernel::kSharedWithBarrier: err = launch(shared_neighbour<true>, kBlocks, kThreads, row, nullptr, out); break;
    case Kernel::kSharedWithoutBarrier:
      err = launch(shared_neighbour<false>, kBlocks, kThreads, row, nullptr, out);
      break;
    case Kernel::kExitBeforeBarrier: err = launch(exit_before_barrier, kBlocks, kThreads, 0, nullptr, out); break;
    case Kernel::kShuffleWithExitedLane:
      err = launch(shuffle_with_exited_lane, kBlocks, kThreads, 0, nullptr, out);
      break;
    case Kernel::kDeadlock: err = launch(deadlock, kBlocks, kThreads, 0, nullptr, out); break;
    case Kernel::kBigSharedNoAttribute: err = launch(big_shared, kBlocks, kThreads, big, nullptr, out); break;
    case Kernel::kBigSharedAllowed:
      err = cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, int(big));
      if (err == cudaSuccess) err = launch(big_shared, kBlocks, kThreads, big, nullptr, out);
      break;
    case Kernel::kSharedAboveDevice:
      err = cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024);
      break;
  }
  o.error = message(err);
  cudaGetLastError();
  return o;
}

}  // namespace coil_emu::probe
