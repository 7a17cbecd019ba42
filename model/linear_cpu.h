// y = x W^T (+ bias) for the few rows of decoding, on CPU. At one token per sequence per step the
// projections and the LM head are matrix-vector products: their cost is reading W from memory
// (516 MB per token at 130m in float32, 258 MB in bfloat16), and BLAS's GEMM paths are far from
// that for 1-16 rows on small machines. This kernel streams W once: one row of x meets W row after
// row (one stream, 8 accumulators); more rows of x meet blocks of 3 rows of W while they are in L1
// (3 x 4 accumulators); threads split W's rows.
//   x [B, K] float32, W [N, K] float32 or bfloat16, bias [N] float32 or undefined -> y [B, N] float32.
// A bfloat16 W is widened to float32 as it is loaded (exactly: bf16 is float32's top half), so
// all arithmetic is float32 whatever W's dtype: y equals at::linear(x, W.to(float32)) up to the
// order of the sums. On CUDA, a bfloat16 W beside float32 x (up to 64 rows, no gradient) goes to
// linear_cuda.h's kernel, which reads W once as stored instead of casting it every step. Larger
// batches, other dtypes or devices go to at::linear (W cast to x's dtype), which is also the
// reference the tests compare with.
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = {});

// Whether decode_linear uses its own kernel here (x86-64 with AVX2 and FMA), or at::linear.
bool decode_linear_has_kernel();

}  // namespace coil
