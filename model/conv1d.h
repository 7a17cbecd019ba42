// Causal depthwise conv1d in channels-last layout (Mamba's short convolution before the scan).
//   x : [B, L, I] (channels contiguous; other strides free)   w : [I, 1, K] or [I, K]   bias : [I]
//   y[b, t, i] = bias[i] + sum_k w[i, k] * x[b, t - (K - 1) + k, i]     (x = 0 before t = 0)
// This is what torch's conv1d(x^T, w, bias, padding=K-1, groups=I)[..., :L] computes, without the
// two transposes to and from [B, I, L].
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

// The reference: torch's conv1d on the transposed input (tests compare against it).
at::Tensor causal_conv1d_ref(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);
// The fast path: a channels-last CPU kernel with its own backward (float32 and float64).
at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

// Decoding: the conv advanced by one token per sequence, without autograd. x [B, I] (the new
// inputs), state [B, K-1, I] (the previous K-1 inputs, oldest first) -> y [B, I], the conv's output
// at the new token; `state` becomes the last K-1 inputs: shifted in place on CPU (float32/64,
// contiguous: one pass, no allocation but y), else replaced by a new tensor (the reference below).
at::Tensor causal_conv1d_step(const at::Tensor& x, at::Tensor& state, const at::Tensor& w, const at::Tensor& bias);
// The reference, in LibTorch ops: window = cat(state, x); y = sum_k w[:, k] * window[k] + bias.
at::Tensor causal_conv1d_step_ref(const at::Tensor& x, at::Tensor& state, const at::Tensor& w, const at::Tensor& bias);

}  // namespace coil
