// y = x W^T (+ bias) for decoding's few rows on CUDA with W held in bfloat16 (internal to model/;
// the public entry is linear_cpu.h's decode_linear). Plain declarations with no LibTorch and no
// CUDA headers, as conv1d_cuda.h: linear_cuda_call.inc fills Params from tensors and linear_cuda.cu
// launches on the current stream of Params::device.
//
// Why a kernel: at 1-16 rows a projection is a matrix-vector product whose cost is reading W. For a
// bfloat16 W, at::linear wants x's dtype, and casting W to float32 each step reads 2 bytes and
// writes 4 per weight before cuBLAS reads the 4 again (10 bytes a weight, every token); casting x
// to bfloat16 instead would round the activations. This kernel reads each bfloat16 weight once
// (2 bytes) and widens it exactly in registers: all arithmetic float32, as on the CPU.
//
// Layouts:
//   x    [B, K]  float32, column stride 1, row stride x_sb
//   w    [N, K]  bfloat16 contiguous
//   bias [N]     float32 (null: none)
//   y    [B, N]  float32 contiguous
// Math: y[b, n] = bias[n] + sum_k x[b, k] w[n, k], each sum float32 in a fixed order (every run
// gives the same bits): lane j of a warp sums its k in increasing order (k = 8j..8j+7 mod 256 with
// 16-byte loads; k = j mod 32 one weight at a time), then the 32 lanes are added by a butterfly of
// shuffles.
#pragma once

#include <cstdint>

namespace coil::linear_cuda {

// Rows of x one launch takes (its accumulators are registers); more rows are more launches.
constexpr int64_t kMaxRows = 16;

struct Params {
  int device = 0;
  int64_t B = 0, K = 0, N = 0;
  const float* x = nullptr;
  int64_t x_sb = 0;
  const void* w = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
};

// Launch on the current CUDA stream of p.device; null, or CUDA's message.
const char* forward(const Params& p);

}  // namespace coil::linear_cuda
