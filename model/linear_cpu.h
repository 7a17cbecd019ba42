// y = x W^T (+ bias) for the few rows of decoding, on CPU. At one token per sequence per step the
// projections and the LM head are matrix-vector products: their cost is reading W from memory
// (516 MB per token at 130m, float32), and BLAS's GEMM paths are far from that for 1-16 rows on
// small machines. This kernel streams W once: each block of W rows meets every row of x while in
// L1, with x (B x K, at most 64 x 4 KB) held in L2; threads split the rows of W.
//   x [B, K], W [N, K], bias [N] or undefined -> y [B, N]; float32, CPU, contiguous.
// Larger batches, other dtypes or devices go to at::linear, which is also the reference the
// tests compare with.
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = {});

// Whether decode_linear uses its own kernel here (x86-64 with AVX2 and FMA), or at::linear.
bool decode_linear_has_kernel();

}  // namespace coil
