// The fused CUDA selective-scan kernels (internal to model/; the public entry is selective_scan.h).
// Plain declarations with no LibTorch and no CUDA headers: selective_scan.cpp fills Params from
// tensors, calls plan() to pick the kernel and its work split, allocates what plan() asks for
// (scratch, partial rows), and scan_cuda.cu launches the kernels on the current stream of
// Params::device.
//
// Two versions side by side (the llm.c habit; both are tested against the same reference):
//   kSequential: the first kernel. One thread block per 16 channels of one batch row walks the whole
//     sequence: parallel over B x I only (at B = 1, I = 1536: 96 blocks for 132 SMs).
//   kSegmented: the time axis is also split into S segments (whole chunks) handled by different
//     blocks, so small batches fill the GPU; the chunk-end states are combined by a short pass over
//     the segments (scan_cuda.cu explains the three passes), the next chunk's inputs are loaded
//     while the current one is computed, and a channel's state is spread over 4, 8 or 16 threads so
//     that N = 64 keeps the registers and shared memory of N = 16 per thread.
//
// Layouts (channels last, as in scan_cpu.h; element (b,t,i) of a [B, L, I] tensor at b*sb + t*st + i):
//   u, delta, z, dy          : [B, L, I]  strided (channel stride 1), dtype `dtype`
//   y, du, ddelta, dz        : [B, L, I]  contiguous, dtype `dtype`
//   Bm, Cm                   : [B, L, N]  contiguous, dtype `dtype`
//   A [I, N], D [I], delta_bias [I]      : float32 contiguous (D, delta_bias may be null)
//   states                   : [B, I, n_chunks, N] float32: h after the last step of each chunk
//   dB, dC                   : [B, L, N] float32, zeroed by the caller: sums over channels, added
//                              to with atomicAdd (see scan_cuda.cu on determinism)
//   dA_part [R, I, N], dD_part [R, I], dbias_part [R, I]     : float32: partial sums per row
//                              r = b * S + s (batch row, time segment; R = partial_rows()), each
//                              element written by one thread (the caller sums the R rows: no atomics)
//   scratch                  : scratch_floats() floats (segment-end states and step sums; S > 1)
//   reset [B, L] uint8, h0 / dlast / dh0 [B, I, N] float32, all contiguous and optional (below)
//
// Math, per batch row b and channel i (everything in float32, whatever `dtype`):
//   x_t  = delta_t + delta_bias                dt_t = softplus(x_t) (or x_t without softplus)
//   h_t  = exp(dt_t A) (.) h_{t-1} + dt_t u_t B_t           h_{-1} = 0, h_t in R^N
//   s_t  = <h_t, C_t> + D u_t                                (the scan with the D skip)
//   y_t  = s_t * silu(z_t)                                   (or y_t = s_t without z)
// Backward, with ds_t = dy_t * silu(z_t) and the adjoint g_t = dLoss/dh_t, swept from t = L-1 down:
//   g_t      = ds_t C_t + exp(dt_{t+1} A) (.) g_{t+1}
//   du_t     = ds_t D + dt_t <g_t, B_t>
//   ddt_t    = <g_t, A (.) exp(dt_t A) (.) h_{t-1}> + u_t <g_t, B_t>
//   ddelta_t = ddt_t * sigmoid(x_t) (softplus' = sigmoid; 1 without softplus)
//   dz_t     = dy_t * s_t * silu'(z_t),   silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
//   dA      += dt_t g_t (.) exp(dt_t A) (.) h_{t-1}      dD += ds_t u_t      ddelta_bias += ddelta_t
//   dB_t    += dt_t u_t g_t   and   dC_t += ds_t h_t      (summed over the channels i)
//
// Packed documents and initial states (all optional; with every pointer null the kernels compute
// exactly what they did before they had them, bit for bit: the only extra work is a test of a null
// pointer per chunk and of a zero mask bit per step):
//   reset[b, t] = 1 where a document starts (t > 0; reset[b, 0] is 0): h_{t-1} reads as 0 there,
//     so h_t = dt_t u_t B_t. Read per chunk of 32 steps as one bit mask (a warp ballot).
//   h0 [B, I, N]: h_{-1} (instead of 0); with resets, the start state of the row's first document.
//   dlast [B, I, N] (backward): the gradient of the final state h_{L-1}, added to g_{L-1}.
//   dh0 [B, I, N] (backward, written when not null): dLoss/dh_{-1} = exp(dt_0 A) (.) g_0.
// In backward, at a reset the carry exp(dt_t A) g_t into step t-1 is 0 (no gradient crosses a
// document start) and so are the h_{t-1} terms of dA and ddelta. With time segments (kSegmented,
// S > 1) a segment holding a reset has P = 0 in the combine pass (its end state does not depend on
// its start state, nor its start carry on its end carry): the local passes write one flag per
// (b, segment) after the step sums in scratch; the combine passes start from h0 and from dlast.
//
// Decoding (step): one token per row, float32, the state updated in place (selective_scan.h's
// selective_scan_step on CUDA tensors; one launch instead of the reference's dozen LibTorch ops):
//   u, delta, z [B, I] and Bm, Cm [B, N] (last dim contiguous, row strides *_sb), A [I, N], D,
//   delta_bias [I] contiguous (D, z, delta_bias may be null), state [B, I, N] contiguous, y [B, I]
//   contiguous: the recurrence above for one t, from h_{t-1} = state, which becomes h_t.
#pragma once

#include <cstdint>

namespace coil::scan_cuda {

// Time steps per chunk. The forward pass keeps h only at chunk ends; the backward pass recomputes a
// chunk's 32 states from the previous chunk's end into shared memory (version 2 for N > 16: 16 at a
// time), then sweeps the adjoint back. Version 2's time segments are whole chunks.
constexpr int kChunk = 32;
// The largest state size the kernels take (mamba uses 16).
constexpr int kMaxState = 64;
// Channels per thread block. Version 1: each channel is served by 4 threads, one quarter of the
// state each, so a block is 64 threads (two warps of 8 channels). Version 2: 4, 8 or 16 threads a
// channel (N <= 16, 32, 64), blocks of 64, 128 or 256 threads.
constexpr int kChannelsPerBlock = 16;

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }
inline int64_t num_channel_blocks(int64_t I) { return (I + kChannelsPerBlock - 1) / kChannelsPerBlock; }

enum class DType { kFloat32, kBFloat16 };
enum class Kernel { kSequential, kSegmented };

struct Params {
  int device = 0;  // the CUDA device of every tensor
  DType dtype = DType::kFloat32;
  int64_t B = 0, L = 0, I = 0, N = 0;
  bool softplus = true;
  // Inputs.
  const void *u = nullptr, *delta = nullptr, *z = nullptr, *Bm = nullptr, *Cm = nullptr;
  int64_t u_sb = 0, u_st = 0, delta_sb = 0, delta_st = 0, z_sb = 0, z_st = 0;
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr;
  // Forward outputs. With states null only the final state is written (no backward will follow).
  void* y = nullptr;
  float* states = nullptr;
  float* final_state = nullptr;  // [B, I, N], or null
  // Backward: dy and the gradients.
  const void* dy = nullptr;
  int64_t dy_sb = 0, dy_st = 0;
  void *du = nullptr, *ddelta = nullptr, *dz = nullptr;  // dz null when there is no z
  float *dA_part = nullptr, *dD_part = nullptr, *dbias_part = nullptr;
  float *dB = nullptr, *dC = nullptr;
  // Document starts and initial states (see the header comment; null: none).
  const uint8_t* reset = nullptr;  // [B, L]
  const float* h0 = nullptr;       // [B, I, N]
  const float* dlast = nullptr;    // [B, I, N], backward
  float* dh0 = nullptr;            // [B, I, N], backward
  // Set by plan(): the kernel version, its number of time segments, and its scratch buffer.
  Kernel kernel = Kernel::kSegmented;
  int segments = 1;
  float* scratch = nullptr;
};

struct StepParams {
  int device = 0;
  int64_t B = 0, I = 0, N = 0;
  bool softplus = true;
  const float *u = nullptr, *delta = nullptr, *z = nullptr, *Bm = nullptr, *Cm = nullptr;
  int64_t u_sb = 0, delta_sb = 0, z_sb = 0, B_sb = 0, C_sb = 0;
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr;
  float* state = nullptr;
  float* y = nullptr;
};

// Which kernel to run and how finely to split time: automatic (the default) unless set here, for
// tests and benchmarks. segments = 0: chosen from B*I, the SM count and the kernel's occupancy.
struct Tuning {
  Kernel kernel = Kernel::kSegmented;
  int segments = 0;
};
void set_tuning(const Tuning& t);
Tuning tuning();

// Fills p.kernel and p.segments for a forward or a backward launch on p's shape and device; null,
// or CUDA's message.
const char* plan(Params& p, bool backward);
// What the caller allocates for a planned launch: the scratch floats (0 when S = 1; B * S more
// with resets, for the segments' flags) and the rows of the dA/dD/dbias partials (B * S).
int64_t scratch_floats(const Params& p);
int64_t partial_rows(const Params& p);

// Launch on the current CUDA stream of p.device. Return null, or CUDA's message for a failed launch
// (the caller turns it into a coil::Error).
const char* forward(const Params& p);
const char* backward(const Params& p);
const char* step(const StepParams& p);

}  // namespace coil::scan_cuda
