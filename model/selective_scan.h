// Selective scan (the S6 recurrence of Mamba-1): a plain reference and a fast fused CPU kernel.
//
// Layouts are channels-last, as the projections produce them (no transposes in the model):
//   u, delta, z : [B, L, I]        A : [I, N]        Bm, Cm : [B, L, N]        D, delta_bias : [I]
// With dt = softplus(delta + delta_bias) (or delta + delta_bias when delta_softplus is false):
//   h_t = exp(dt_t * A) (.) h_{t-1} + dt_t * u_t * B_t,   h_{-1} = 0           (per b, i; h in R^N)
//   y_t = (<h_t, C_t> + D * u_t) * silu(z_t)
// D, z and delta_bias may be undefined tensors (no skip, no gate, no bias). Returns y [B, L, I].
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

// The reference: ATen ops, sequential over L, materializes [B, L, I, N]; differentiated by autograd.
// Kept for tests, as mamba_ssm keeps selective_scan_ref beside its CUDA kernel.
at::Tensor selective_scan_ref(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                              const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus);

// The fast path, as a custom autograd function. CPU tensors: the fused CPU kernel (scan_cpu.h),
// float32 and float64 (other dtypes compute in float32). CUDA tensors: the fused CUDA kernel
// (scan_cuda.h), bias, softplus, D skip and gate included; inputs in float32 or bfloat16 (other
// dtypes go through float32), state and arithmetic in float32, N <= 64; a build without CUDA
// kernels throws coil::Error. Neither materializes [B, L, I, N]: only each chunk's final state is
// kept, and backward recomputes states chunk by chunk. If final_state is given, it receives h
// after the last step, [B, I, N] (for recurrent decoding after a prompt; float32 on CUDA).
at::Tensor selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                          const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                          at::Tensor* final_state = nullptr);

// One step of the recurrence for decoding, without autograd: u, delta, z [B, I], Bm, Cm [B, N];
// `state` [B, I, N] becomes the state after the step: overwritten in place by the fused CPU kernel
// (CPU float32 inputs, contiguous state), else replaced by a new tensor. Returns y [B, I]. Equal
// to selective_scan over the whole sequence, step after step.
at::Tensor selective_scan_step(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                               const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                               at::Tensor& state);

// The name of the kernel in use ("avx2" or "generic").
const char* selective_scan_cpu_isa();

}  // namespace coil
