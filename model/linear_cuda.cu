// decoding's y = x W^T (+ bias) on CUDA with a bfloat16 W: math and layouts in linear_cuda.h.
//
// Work split: one warp per row n of W (a grid-stride loop over rows, the same for all 32 lanes, so
// every shuffle has its whole warp). Each lane reads 8 consecutive weights in one 16-byte load
// (a warp: 512 contiguous bytes of W per load), widens them exactly (bfloat16 is a float32's top
// half) and multiplies them into ROWS accumulators, one per row of x; x (at most 16 x K floats)
// is read from L1/L2, where every warp finds it. Where K is not a multiple of 8 or a pointer is not
// 16-byte aligned, lanes take one weight at a time instead (the same sums in another grouping).
#include <algorithm>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/cuda_kernel.cuh"
#include "model/linear_cuda.h"

namespace coil::linear_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using cuda_kernel::error_text;
using cuda_kernel::launch;
using cuda_kernel::to_f32;

// Eight bfloat16 weights of one 16-byte load as float32: element 2j is word j's low half.
__device__ __forceinline__ void widen8(const uint4 v, float out[8]) {
  const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = __uint_as_float(u[j] << 16);
    out[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
  }
}

template <int ROWS, bool VEC>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const Params p) {
  const int lane = int(threadIdx.x % 32);
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const auto* W = static_cast<const __nv_bfloat16*>(p.w);
  for (int64_t n = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; n < p.N; n += warps) {
    const __nv_bfloat16* w = W + n * p.K;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
    if (VEC) {
      for (int64_t k = 8 * lane; k < p.K; k += 8 * 32) {
        float wv[8];
        widen8(*reinterpret_cast<const uint4*>(w + k), wv);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r >= p.B) break;
          const float4 a = *reinterpret_cast<const float4*>(p.x + r * p.x_sb + k);
          const float4 b = *reinterpret_cast<const float4*>(p.x + r * p.x_sb + k + 4);
          float s = acc[r];
          s = __fmaf_rn(a.x, wv[0], s), s = __fmaf_rn(a.y, wv[1], s), s = __fmaf_rn(a.z, wv[2], s);
          s = __fmaf_rn(a.w, wv[3], s), s = __fmaf_rn(b.x, wv[4], s), s = __fmaf_rn(b.y, wv[5], s);
          s = __fmaf_rn(b.z, wv[6], s), s = __fmaf_rn(b.w, wv[7], s);
          acc[r] = s;
        }
      }
    } else {
      for (int64_t k = lane; k < p.K; k += 32) {
        const float wk = to_f32(w[k]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r >= p.B) break;
          acc[r] = __fmaf_rn(p.x[r * p.x_sb + k], wk, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= p.B) break;
      float s = acc[r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) p.y[r * p.N + n] = p.bias ? s + p.bias[n] : s;
    }
  }
}

template <int ROWS>
const char* launch_rows(const Params& p, bool vec, cudaStream_t stream) {
  const unsigned blocks = cuda_kernel::grid_stride_blocks(p.N, kWarps);
  return error_text(vec ? launch(gemv_kernel<ROWS, true>, blocks, kThreads, 0, stream, p)
                        : launch(gemv_kernel<ROWS, false>, blocks, kThreads, 0, stream, p));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

const char* forward(const Params& p) {
  if (p.B < 0 || p.K < 0 || p.N < 0) return "negative sizes";
  if (p.B == 0 || p.N == 0) return nullptr;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  const bool vec = p.K % 8 == 0 && p.x_sb % 4 == 0 && aligned16(p.x) && aligned16(p.w);
  // Rows of x in launches of at most kMaxRows, each with the fewest accumulators that hold them.
  for (int64_t b0 = 0; b0 < p.B; b0 += kMaxRows) {
    Params q = p;
    q.B = std::min(kMaxRows, p.B - b0);
    q.x = p.x + b0 * p.x_sb;
    q.y = p.y + b0 * p.N;
    const char* err = q.B == 1   ? launch_rows<1>(q, vec, stream)
                      : q.B <= 2 ? launch_rows<2>(q, vec, stream)
                      : q.B <= 4 ? launch_rows<4>(q, vec, stream)
                      : q.B <= 8 ? launch_rows<8>(q, vec, stream)
                                 : launch_rows<16>(q, vec, stream);
    if (err) return err;
  }
  return nullptr;
}

}  // namespace coil::linear_cuda
