// Decoding's residual add and RMSNorm: math and layouts in norm_cuda.h. A block of 256 threads per
// row of h (a grid of B blocks); each thread adds, writes back and squares the elements i = t,
// t + 256, ... of its row, so it reads back only what it wrote itself (no barrier needed for h).
#include <cmath>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/cuda_kernel.cuh"
#include "model/norm_cuda.h"

namespace coil::norm_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using cuda_kernel::error_text;
using cuda_kernel::launch;

__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(const Params p) {
  __shared__ float warp_sums[kWarps];
  __shared__ float scale;
  const int t = int(threadIdx.x), lane = t % 32, warp = t / 32;
  const int64_t b = blockIdx.x;
  float* h = p.h + b * p.H;
  const float* delta = p.delta ? p.delta + b * p.H : nullptr;
  float ss = 0.f;
  for (int64_t i = t; i < p.H; i += kThreads) {
    const float v = delta ? h[i] + delta[i] : h[i];
    if (delta) h[i] = v;
    ss = __fmaf_rn(v, v, ss);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (t == 0) {
    float total = 0.f;
    for (int k = 0; k < kWarps; ++k) total += warp_sums[k];
    scale = 1.f / sqrtf(total / float(p.H) + p.eps);
  }
  __syncthreads();
  const float r = scale;
  float* y = p.y + b * p.H;
  for (int64_t i = t; i < p.H; i += kThreads) y[i] = p.w[i] * (h[i] * r);
}

}  // namespace

const char* add_rms_norm(const Params& p) {
  if (p.B < 0 || p.B > 2147483647 || p.H < 1) return "sizes: 0 <= B < 2^31 rows of H >= 1";
  if (p.B == 0) return nullptr;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  return error_text(launch(add_rms_norm_kernel, unsigned(p.B), kThreads, 0, stream, p));
}

}  // namespace coil::norm_cuda
