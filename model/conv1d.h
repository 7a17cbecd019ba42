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

}  // namespace coil
