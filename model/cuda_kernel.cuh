// What the CUDA kernels (scan_cuda.cu, conv1d_cuda.cu) share: float32 arithmetic on float32 or
// bfloat16 storage, the launch, and the block's dynamic shared memory. Under the CPU emulator of
// tests/cuda_emu (COIL_CUDA_EMULATION) the launch and the shared memory are the emulator's; the
// kernels themselves are compiled unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace coil::cuda_kernel {
namespace {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);  // round to nearest even
}

// Blocks of a grid-stride launch over n elements, `threads` each: enough to cover them, at most 2^20.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  return unsigned(std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20));
}

// An error's text, or null for cudaSuccess (what the launch functions return).
inline const char* error_text(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

#if defined(COIL_CUDA_EMULATION)
using coil_emu::launch;
__device__ __forceinline__ float* dynamic_shared_floats() { return coil_emu::dynamic_shared_floats(); }
#else
// kernel<<<grid, block, smem, stream>>>(args...), then the launch's error.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  return cudaGetLastError();
}
// The block's dynamic shared memory (the launch's smem bytes), 16-byte aligned.
__device__ __forceinline__ float* dynamic_shared_floats() {
  extern __shared__ __align__(16) float coil_dynamic_smem[];
  return coil_dynamic_smem;
}
#endif

}  // namespace
}  // namespace coil::cuda_kernel
