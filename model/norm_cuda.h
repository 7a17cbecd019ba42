// Decoding's residual add and RMSNorm in one CUDA kernel (internal to model/; the public entry is
// mamba.h's add_rms_norm_). Plain declarations with no LibTorch and no CUDA headers, as
// conv1d_cuda.h: norm_cuda_call.inc fills Params from tensors, norm_cuda.cu launches on the current
// stream of Params::device.
//
// Why: a decoding step is host-bound on a GPU at small batches (each LibTorch op costs a dispatch
// and a launch of a few microseconds, against microseconds of work). The reference add and RMSNorm
// are seven ops (add, pow, mean, add, rsqrt, mul, mul), 25 times a token at 130m; this is one.
//
// Layouts: h [B, H] float32 contiguous (updated in place), delta [B, H] float32 contiguous (null:
// no add), w [H] float32, y [B, H] float32 contiguous. Math, float32:
//   h[b] += delta[b];  y[b, i] = w[i] * (h[b, i] * r_b),  r_b = 1 / sqrt(sum_i h[b, i]^2 / H + eps)
// One block per row (B < 2^31); the squares summed per thread, then per warp by shuffles, then the
// warps' sums in warp order (a fixed order: every run gives the same bits).
#pragma once

#include <cstdint>

namespace coil::norm_cuda {

struct Params {
  int device = 0;
  int64_t B = 0, H = 0;
  float* h = nullptr;
  const float* delta = nullptr;
  const float* w = nullptr;
  float eps = 0.f;
  float* y = nullptr;
};

// Launch on the current CUDA stream of p.device; null, or CUDA's message.
const char* add_rms_norm(const Params& p);

}  // namespace coil::norm_cuda
