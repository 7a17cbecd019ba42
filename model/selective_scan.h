// Selective scan (the S6 recurrence of Mamba-1): a plain reference and a fast fused CPU kernel.
//
// Layouts are channels-last, as the projections produce them (no transposes in the model):
//   u, delta, z : [B, L, I]        A : [I, N]        Bm, Cm : [B, L, N]        D, delta_bias : [I]
// With dt = softplus(delta + delta_bias) (or delta + delta_bias when delta_softplus is false):
//   h_t = exp(dt_t * A) (.) h_{t-1} + dt_t * u_t * B_t,   h_{-1} = 0           (per b, i; h in R^N)
//   y_t = (<h_t, C_t> + D * u_t) * silu(z_t)
// D, z and delta_bias may be undefined tensors (no skip, no gate, no bias). Returns y [B, L, I].
//
// Packed documents and a differentiable initial state (optional; undefined = today's scan, bit for bit):
//   seq_idx [B, L] int32: the document number of each position, non-decreasing within a row (as
//     mamba_ssm's Mamba-2 and causal_conv1d take it). Where seq_idx[b, t] != seq_idx[b, t-1] a
//     document starts: h_{t-1} reads as zero there, so no state crosses the boundary. The kernels
//     get it as one flag per position (1 = restart), a branch per (t, channel) that costs nothing
//     measurable when absent. Checked: int32, [B, L], and non-decreasing on CPU (on CUDA
//     the order is checked once per forward by the model: model/seq_idx.h).
//   h0 [B, I, N] float32 or float64: the state before position 0 (instead of zero); with seq_idx it
//     is the start state of the row's first document only. Its gradient comes out of backward.
//     (Continuing rows in chunks: a chunk whose position 0 starts a new document takes a zero h0
//     for that row; seq_idx of a chunk alone cannot tell.)
//   final_state (selective_scan, selective_scan_ref): h after the last step, differentiable,
//     so that a sequence run in two halves, the second from the first's final state, gives the
//     outputs and every gradient of running it whole (the basis of chunked long-sequence training
//     and of sequence parallelism).
// seq_idx and h0 run in the reference and in both fused kernels (CPU and CUDA; scan_cuda.h says how
// the CUDA kernel's chunks and time segments handle them); their absence costs nothing there.
#pragma once

#include <ATen/core/Tensor.h>

namespace coil {

// The reference: ATen ops, sequential over L, materializes [B, L, I, N]; differentiated by autograd.
// Kept for tests, as mamba_ssm keeps selective_scan_ref beside its CUDA kernel.
at::Tensor selective_scan_ref(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                              const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                              const at::Tensor& seq_idx = {}, const at::Tensor& h0 = {},
                              at::Tensor* final_state = nullptr);

// The fast path, as a custom autograd function. CPU tensors: the fused CPU kernel (scan_cpu.h),
// float32 and float64 (other dtypes compute in float32). CUDA tensors: the fused CUDA kernel
// (scan_cuda.h), bias, softplus, D skip and gate included; inputs in float32 or bfloat16 (other
// dtypes go through float32), state and arithmetic in float32, N <= 64; a build without CUDA
// kernels throws coil::Error. Neither materializes [B, L, I, N]: only each chunk's final state is
// kept, and backward recomputes states chunk by chunk. If final_state is given, it receives h
// after the last step, [B, I, N] (for recurrent decoding after a prompt, and for chunked training:
// differentiable on CPU and on CUDA, float32 on CUDA).
at::Tensor selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                          const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                          at::Tensor* final_state = nullptr, const at::Tensor& seq_idx = {},
                          const at::Tensor& h0 = {});

// One step of the recurrence for decoding, without autograd: u, delta, z [B, I], Bm, Cm [B, N];
// `state` [B, I, N] becomes the state after the step: overwritten in place by the fused CPU kernel
// (CPU float32 inputs, contiguous state) or the CUDA one (CUDA float32, contiguous state; one
// launch, scan_cuda.h), else replaced by a new tensor. Returns y [B, I]. Equal to selective_scan
// over the whole sequence, step after step.
at::Tensor selective_scan_step(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                               const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                               at::Tensor& state);

// The name of the kernel in use ("avx2" or "generic").
const char* selective_scan_cpu_isa();

}  // namespace coil
