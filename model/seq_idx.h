// seq_idx, the document numbers of packed rows: [B, L] int32, non-decreasing within each row, as
// the causal conv (conv1d.h), the selective scan (selective_scan.h) and the model (mamba.h) take it.
//
// Checking its order reads every value: nothing on CPU, but a device-to-host sync on CUDA, which
// per layer, per kernel and again in each recompute would stall the GPU's queue dozens of times a
// step. So the kernels check dtype and shape on every call and the order of CPU tensors only; on
// CUDA the order is checked once per forward by the model (MambaLM::forward, FsdpMamba::forward).
// A CUDA kernel called directly with a decreasing seq_idx says nothing and computes something
// defined (the scan restarts wherever the number changes, the conv skips taps of other numbers).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace coil {

// A coil::Error naming `who` unless seq_idx (if defined) is int32 [B, L] and, when it is on the CPU
// or `order_on_device` is set, non-decreasing along each row.
void check_seq_idx(const at::Tensor& seq_idx, int64_t B, int64_t L, const char* who,
                   bool order_on_device = false);

// 1 where a document starts at t > 0 (seq_idx changes), as uint8 [B, L] contiguous; undefined
// without seq_idx. What the scan kernels take: where the state restarts from zero.
at::Tensor reset_flags(const at::Tensor& seq_idx);

}  // namespace coil
