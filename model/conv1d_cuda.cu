// The CUDA causal conv with document boundaries and an initial state: math and layouts in
// conv1d_cuda.h. It computes what the CPU kernel of conv1d.cpp computes, in float32 whatever the
// input dtype.
//
// Work split. The layouts are channels last, so adjacent threads take adjacent channels of one
// (b, t): every load of x, dy, w and init is coalesced across a warp, and a tap's document test
// reads one seq_idx element that the whole warp shares (a broadcast).
//   forward, dx: one thread per output element (a grid-stride loop), K taps each;
//   dinit:       one thread per element of [B, K-1, I], the at most K taps that read it;
//   dw, dbias:   sums over all B x L rows per channel: a block is 32 channels x 8 row lanes over one
//                range of rows; each thread sums its rows in registers, the block adds its 8 lanes in
//                a fixed order through shared memory and writes one partial row, the caller sums
//                the R rows (no atomics, so the result does not vary between runs).
#include <algorithm>
#include <cmath>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/conv1d_cuda.h"
#include "model/cuda_kernel.cuh"

namespace coil::conv_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChannels = 32;                    // dw: channels per block
constexpr int kRowLanes = kThreads / kChannels;  // dw: row lanes per block
constexpr int64_t kMaxPartialRows = 64;

using cuda_kernel::error_text;
using cuda_kernel::from_f32;
using cuda_kernel::launch;
using cuda_kernel::to_f32;

// Does position s (s < 0: the initial state, which belongs to the row's first document) lie in the
// document of position t >= s? seq: the row's document numbers, or null (one document).
__device__ __forceinline__ bool same_document(const int32_t* seq, int64_t s, int64_t t) {
  return !seq || seq[s < 0 ? 0 : s] == seq[t];
}

// The grid-stride loop of the elementwise kernels: the first element of this thread, then the step.
__device__ __forceinline__ int64_t first_element() { return int64_t(blockIdx.x) * kThreads + threadIdx.x; }
__device__ __forceinline__ int64_t element_stride() { return int64_t(gridDim.x) * kThreads; }

// Element e of a contiguous channels-last [B, positions, channels] tensor:
// e = (b positions + t) channels + i.
struct Index {
  int64_t b, t, i;
};
__device__ __forceinline__ Index decode(int64_t e, int64_t positions, int64_t channels) {
  const int64_t bt = e / channels;
  return {bt / positions, bt % positions, e % channels};
}

// What tap k of position t of row b reads, s = t - (K-1) + k: x (already at row b, channel i) for
// s >= 0, the initial state for s < 0. Returns false where the tap reads nothing: s in another
// document than t, or s < 0 with no initial state.
template <typename T>
__device__ __forceinline__ bool tap_input(const Params& p, const T* x, const int32_t* seq, int64_t b, int64_t s,
                                          int64_t t, int64_t i, float& value) {
  if (!same_document(seq, s, t)) return false;
  if (s >= 0) {
    value = to_f32(x[s * p.x_st]);
    return true;
  }
  if (!p.init) return false;
  value = p.init[(b * (p.K - 1) + (p.K - 1 + s)) * p.I + i];
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p) {
  const int64_t n = p.B * p.L * p.I;
  const int K = int(p.K);
  for (int64_t e = first_element(); e < n; e += element_stride()) {
    const auto [b, t, i] = decode(e, p.L, p.I);  // y is contiguous
    const T* x = static_cast<const T*>(p.x) + b * p.x_sb + i;
    const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.L : nullptr;
    float acc = p.bias ? p.bias[i] : 0.f, v = 0.f;
    for (int k = 0; k < K; ++k)
      if (tap_input(p, x, seq, b, t - (K - 1) + k, t, i, v)) acc += p.w[k * p.I + i] * v;
    static_cast<T*>(p.y)[e] = from_f32<T>(acc);
  }
}

// dx[b,s,i]: the taps of the positions r = s + (K-1) - k that read s (r in s's document).
template <typename T>
__global__ void __launch_bounds__(kThreads) dx_kernel(const Params p) {
  const int64_t n = p.B * p.L * p.I;
  const int K = int(p.K);
  for (int64_t e = first_element(); e < n; e += element_stride()) {
    const auto [b, s, i] = decode(e, p.L, p.I);  // dx is contiguous
    const T* dy = static_cast<const T*>(p.dy) + b * p.dy_sb + i;
    const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.L : nullptr;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) {
      const int64_t r = s + (K - 1) - k;
      if (r < p.L && same_document(seq, s, r)) acc += p.w[k * p.I + i] * to_f32(dy[r * p.dy_st]);
    }
    static_cast<T*>(p.dx)[e] = from_f32<T>(acc);
  }
}

// dinit[b,j,i] (init row j = position j - (K-1)): read by tap k of position t = j - k, if t is in
// the row's first document.
template <typename T>
__global__ void __launch_bounds__(kThreads) dinit_kernel(const Params p) {
  const int64_t n = p.B * (p.K - 1) * p.I;
  const int K = int(p.K);
  for (int64_t e = first_element(); e < n; e += element_stride()) {
    const auto [b, j, i] = decode(e, p.K - 1, p.I);  // dinit is [B, K-1, I], contiguous
    const T* dy = static_cast<const T*>(p.dy) + b * p.dy_sb + i;
    const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.L : nullptr;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) {
      const int64_t t = j - k;
      if (t >= 0 && t < p.L && same_document(seq, -1, t)) acc += p.w[k * p.I + i] * to_f32(dy[t * p.dy_st]);
    }
    p.dinit[e] = acc;
  }
}

// dw and dbias over the rows [y * rows_per, (y+1) * rows_per) of the flattened (b, t), y = blockIdx.y,
// for the channels blockIdx.x * 32 + (0..31): partial row y. acc[k] for tap k, acc[kMaxTaps] for the
// bias (indices known at compile time, so the sums stay in registers).
template <typename T>
__global__ void __launch_bounds__(kThreads) dw_kernel(const Params p, int64_t rows_per) {
  __shared__ float lanes[kMaxTaps + 1][kRowLanes][kChannels];
  const int64_t I = p.I, L = p.L, rows = p.B * p.L;
  const int K = int(p.K);
  const int c = int(threadIdx.x) % kChannels, lane = int(threadIdx.x) / kChannels;
  const int64_t i = int64_t(blockIdx.x) * kChannels + c;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per, r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
  float acc[kMaxTaps + 1];
#pragma unroll
  for (int k = 0; k <= kMaxTaps; ++k) acc[k] = 0.f;
  if (i < I) {
    for (int64_t r = r0 + lane; r < r1; r += kRowLanes) {
      const int64_t b = r / L, t = r % L;
      const T* x = static_cast<const T*>(p.x) + b * p.x_sb + i;
      const int32_t* seq = p.seq_idx ? p.seq_idx + b * L : nullptr;
      const float g = to_f32(static_cast<const T*>(p.dy)[b * p.dy_sb + t * p.dy_st + i]);
      acc[kMaxTaps] += g;
#pragma unroll
      for (int k = 0; k < kMaxTaps; ++k) {
        if (k >= K) break;
        float v = 0.f;
        if (tap_input(p, x, seq, b, t - (K - 1) + k, t, i, v)) acc[k] += g * v;
      }
    }
  }
#pragma unroll
  for (int k = 0; k <= kMaxTaps; ++k) lanes[k][lane][c] = acc[k];
  __syncthreads();
  if (lane != 0 || i >= I) return;
#pragma unroll
  for (int k = 0; k <= kMaxTaps; ++k) {
    if (k < K || k == kMaxTaps) {
      float sum = 0.f;
#pragma unroll
      for (int l = 0; l < kRowLanes; ++l) sum += lanes[k][l][c];
      if (k == kMaxTaps)
        p.dbias_part[int64_t(blockIdx.y) * I + i] = sum;
      else
        p.dw_part[(int64_t(blockIdx.y) * K + k) * I + i] = sum;
    }
  }
}

// Decoding: one thread per (b, i), which reads and rewrites its own column of the state (coalesced
// across the warp's adjacent channels), in the CPU kernel's order of additions.
__global__ void __launch_bounds__(kThreads) step_kernel(const StepParams p) {
  const int K = int(p.K);
  for (int64_t e = first_element(); e < p.B * p.I; e += element_stride()) {
    const int64_t b = e / p.I, i = e % p.I;
    const float* w = p.w + i * K;
    float* state = p.state + b * (K - 1) * p.I + i;
    const float x = p.x[b * p.x_sb + i];
    float acc = (p.bias ? p.bias[i] : 0.f) + w[K - 1] * x;
    for (int k = 0; k < K - 1; ++k) acc += w[k] * state[k * p.I];
    for (int k = 0; k + 1 < K - 1; ++k) state[k * p.I] = state[(k + 1) * p.I];
    if (K > 1) state[(K - 2) * p.I] = x;
    p.y[e] = p.silu ? acc / (1.f + expf(-acc)) : acc;
  }
}

unsigned grid_for(int64_t n) { return cuda_kernel::grid_stride_blocks(n, kThreads); }

template <typename T>
const char* launch_passes(const Params& p, bool backward) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  const int64_t n = p.B * p.L * p.I;
  if (n == 0) return nullptr;
  if (!backward) return error_text(launch(forward_kernel<T>, grid_for(n), kThreads, 0, stream, p));
  if (const char* err = error_text(launch(dx_kernel<T>, grid_for(n), kThreads, 0, stream, p))) return err;
  const int64_t n_init = p.B * (p.K - 1) * p.I;
  if (p.dinit && n_init > 0) {
    if (const char* err = error_text(launch(dinit_kernel<T>, grid_for(n_init), kThreads, 0, stream, p))) return err;
  }
  const int64_t R = partial_rows(p), rows_per = (p.B * p.L + R - 1) / R;
  const dim3 grid(unsigned((p.I + kChannels - 1) / kChannels), unsigned(R));
  return error_text(launch(dw_kernel<T>, grid, kThreads, 0, stream, p, rows_per));
}

const char* run(const Params& p, bool backward) {
  if (p.K < 1 || p.K > kMaxTaps) return "taps outside [1, kMaxTaps]";
  if ((p.I + kChannels - 1) / kChannels > 2147483647) return "too many channels";
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  return p.dtype == DType::kBFloat16 ? launch_passes<__nv_bfloat16>(p, backward) : launch_passes<float>(p, backward);
}

}  // namespace

// About 64 rows of (b, t) per partial row, at most kMaxPartialRows partial rows (with I / 32 channel
// blocks beside them, enough blocks to fill the GPU at Mamba sizes).
int64_t partial_rows(const Params& p) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxPartialRows, (p.B * p.L + 63) / 64));
}

const char* forward(const Params& p) { return run(p, false); }
const char* backward(const Params& p) { return run(p, true); }

const char* step(const StepParams& p) {
  if (p.K < 1 || p.K > kMaxTaps) return "taps outside [1, kMaxTaps]";
  const int64_t n = p.B * p.I;
  if (n == 0) return nullptr;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  return error_text(launch(step_kernel, grid_for(n), kThreads, 0, stream, p));
}

}  // namespace coil::conv_cuda
