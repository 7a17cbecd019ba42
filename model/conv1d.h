// Causal depthwise conv1d in channels-last layout (Mamba's short convolution before the scan).
//   x : [B, L, I] (channels contiguous; other strides free)   w : [I, 1, K] or [I, K]   bias : [I]
//   y[b, t, i] = bias[i] + sum_k w[i, k] * x[b, t - (K - 1) + k, i]     (x = 0 before t = 0)
// This is what torch's conv1d(x^T, w, bias, padding=K-1, groups=I)[..., :L] computes, without the
// two transposes to and from [B, I, L].
//
// Packed documents and an initial state (optional; undefined = the conv above, bit for bit):
//   seq_idx [B, L] int32, document numbers non-decreasing within a row (as in selective_scan.h):
//     a tap of position t that reaches a position of another document reads zero, so no token
//     of the previous document is seen. The kernel gets each position's document start
//     (a running max, computed once) and skips the taps before it.
//   initial_state [B, I, K-1]: the K-1 inputs before position 0, oldest first (instead of zeros),
//     read by the first document of the row only. Its gradient comes out of backward.
// Checked (coil::Error naming the tensor): seq_idx int32 [B, L] (non-decreasing: on CPU; on CUDA
// once per forward by the model, model/seq_idx.h), initial_state floating point [B, I, K-1].
// On CUDA: without seq_idx and initial_state, torch's grouped conv1d (cuDNN) as before; with either,
// the kernel of conv1d_cuda.h (one thread per output element, float32 arithmetic, x in float32 or
// bfloat16; dw and dbias as deterministic partial sums), the initial state's gradient included.
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

// The reference: torch's conv1d on the transposed input (tests compare against it).
// With seq_idx or initial_state: the window written out in LibTorch ops, the taps masked.
at::Tensor causal_conv1d_ref(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                             const at::Tensor& seq_idx = {}, const at::Tensor& initial_state = {});
// The fast path: a channels-last CPU kernel with its own backward (float32 and float64). On CUDA,
// cuDNN's conv1d without boundaries, the CUDA kernel with them (up to conv_cuda::kMaxTaps = 8 taps;
// more, or a build without CUDA kernels: the masked reference).
at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                         const at::Tensor& seq_idx = {}, const at::Tensor& initial_state = {});
// The conv state after x: its last K-1 inputs (initial_state, then x), [B, I, K-1], differentiable;
// the initial_state of the next chunk when a sequence is run in pieces.
at::Tensor causal_conv1d_final_state(const at::Tensor& x, int64_t K, const at::Tensor& initial_state = {});

// Decoding: the conv advanced by one token per sequence, without autograd. x [B, I] (the new
// inputs), state [B, K-1, I] (the previous K-1 inputs, oldest first) -> y [B, I], the conv's output
// at the new token; `state` becomes the last K-1 inputs: shifted in place on CPU (float32/64,
// contiguous: one pass, no allocation but y) and on CUDA (float32, contiguous: one kernel,
// conv1d_cuda.h), else replaced by a new tensor (the reference below). silu: y = silu(conv), Mamba's
// activation, in the same pass (the fused CPU loop, the CUDA kernel) rather than one more op.
at::Tensor causal_conv1d_step(const at::Tensor& x, at::Tensor& state, const at::Tensor& w, const at::Tensor& bias,
                              bool silu = false);
// The reference, in LibTorch ops: window = cat(state, x); y = sum_k w[:, k] * window[k] + bias
// (then torch::silu if asked).
at::Tensor causal_conv1d_step_ref(const at::Tensor& x, at::Tensor& state, const at::Tensor& w, const at::Tensor& bias,
                                  bool silu = false);

}  // namespace coil
