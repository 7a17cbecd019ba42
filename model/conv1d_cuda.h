// The CUDA causal conv with document boundaries and an initial state (internal to model/; the public
// entry is conv1d.h). Plain declarations with no LibTorch and no CUDA headers, as scan_cuda.h:
// conv1d.cpp fills Params from tensors, allocates what partial_rows() asks for, and conv1d_cuda.cu
// launches the kernels on the current stream of Params::device.
//
// conv1d.cpp runs it only where there are boundaries or an initial state; without them the CUDA path
// stays torch's grouped conv1d (cuDNN), bit for bit what it was.
//
// Layouts (channels last; element (b, t, i) of a [B, L, I] tensor at b*sb + t*st + i):
//   x, dy           : [B, L, I]  strided (channel stride 1), dtype `dtype`
//   y, dx           : [B, L, I]  contiguous, dtype `dtype`
//   w               : [K, I]     float32 contiguous (tap-major: one tap of adjacent channels is one
//                                coalesced load)
//   bias            : [I]        float32 (may be null: no bias)
//   seq_idx         : [B, L]     int32 contiguous, document numbers non-decreasing along a row (null:
//                                one document per row)
//   init, dinit     : [B, K-1, I] float32 contiguous: the K-1 inputs before position 0, oldest first
//                                (null: zeros / no gradient asked)
//   dw_part [R, K, I], dbias_part [R, I]: float32 partial sums, one row per block of the flattened
//                                (b, t) rows (R = partial_rows()); each element written once, summed by
//                                the caller (no atomics: deterministic)
//
// Math (float32 whatever `dtype`): with x_s for s < 0 read from init (K-1+s), and a tap valid when
// its position s lies in t's document (seq[b, s] == seq[b, t]; for s < 0: t in the row's first
// document, seq[b, 0] == seq[b, t], and init given):
//   y[b,t,i]    = bias[i] + sum_{k valid} w[k,i] x[b, t-(K-1)+k, i]
//   dx[b,s,i]   = sum_k w[k,i] dy[b, r, i],  r = s+(K-1)-k < L, seq[b, r] == seq[b, s]
//   dinit[b,j,i]= sum_k w[k,i] dy[b, j-k, i], 0 <= j-k < L, seq[b, j-k] == seq[b, 0]
//   dw[k,i]     = sum_{b,t, tap k valid} dy[b,t,i] x[b, t-(K-1)+k, i],   dbias[i] = sum_{b,t} dy[b,t,i]
//
// Decoding (step): one token per row, float32, the state updated in place (conv1d.h's
// causal_conv1d_step on CUDA tensors; one launch instead of the reference's six LibTorch ops):
//   x [B, I] (channel stride 1, row stride x_sb), state [B, K-1, I] contiguous (oldest input first),
//   w [I, K] contiguous (as the parameter is stored), bias [I] (may be null), y [B, I] contiguous:
//   y[b,i] = bias[i] + w[i,K-1] x[b,i] + sum_{k<K-1} w[i,k] state[b,k,i], then state[b,k,i] =
//   state[b,k+1,i] for k < K-2 and state[b,K-2,i] = x[b,i]; with silu, y[b,i] = silu(that sum)
#pragma once

#include <cstdint>

namespace coil::conv_cuda {

// The most taps the kernels take (Mamba uses 4); more go to the reference.
constexpr int kMaxTaps = 8;

enum class DType { kFloat32, kBFloat16 };

struct Params {
  int device = 0;
  DType dtype = DType::kFloat32;
  int64_t B = 0, L = 0, I = 0, K = 0;
  const void* x = nullptr;
  int64_t x_sb = 0, x_st = 0;
  const float *w = nullptr, *bias = nullptr;
  const int32_t* seq_idx = nullptr;
  const float* init = nullptr;
  void* y = nullptr;
  // Backward.
  const void* dy = nullptr;
  int64_t dy_sb = 0, dy_st = 0;
  void* dx = nullptr;
  float* dinit = nullptr;
  float *dw_part = nullptr, *dbias_part = nullptr;
};

struct StepParams {
  int device = 0;
  int64_t B = 0, I = 0, K = 0;
  const float* x = nullptr;
  int64_t x_sb = 0;
  float* state = nullptr;
  const float *w = nullptr, *bias = nullptr;
  float* y = nullptr;
  bool silu = false;
};

// Rows of dw_part / dbias_part a backward launch writes.
int64_t partial_rows(const Params& p);

// Launch on the current CUDA stream of p.device; null, or CUDA's message.
const char* forward(const Params& p);
const char* backward(const Params& p);
const char* step(const StepParams& p);

}  // namespace coil::conv_cuda
