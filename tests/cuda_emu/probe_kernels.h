// Small kernels with and without the mistakes the emulator exists to catch, compiled for it (as the
// model's kernels are) and run by tests/test_cuda_emulation.cpp: they show that each check can
// fail. Plain C++ on the test's side: no CUDA header is seen there.
#pragma once

#include <string>
#include <vector>

namespace coil_emu::probe {

enum class Kernel {
  kWarpSums,              // per warp: the sum of lane values by xor shuffles, and a ballot
  kSharedWithBarrier,     // out[t] = shared[t + 1], written before a __syncthreads
  kSharedWithoutBarrier,  // the same without it: what a thread reads depends on the order
  kExitBeforeBarrier,     // thread 5 returns, the others reach __syncthreads
  kShuffleWithExitedLane, // lane 3 returns, its warp shuffles with it
  kDeadlock,              // lane 0 shuffles, its warp waits at __syncthreads
  kBigSharedNoAttribute,  // 64 KiB of dynamic shared memory, never allowed
  kBigSharedAllowed,      // the same after cudaFuncSetAttribute
  kSharedAboveDevice,     // cudaFuncSetAttribute for 300 KiB
};

struct Outcome {
  std::vector<float> out;  // one value per thread (2 blocks of 64)
  std::string error;       // empty: the launch succeeded
};
Outcome run(Kernel kernel);

}  // namespace coil_emu::probe
