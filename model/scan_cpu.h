// The fused CPU selective-scan kernel (internal to model/; the public entry is selective_scan.h).
// Plain C++ with no LibTorch, so that it can be compiled once per instruction set (scan_cpu_avx2.cpp
// with AVX2+FMA, scan_cpu_generic.cpp for any x86-64/ARM) and picked at run time.
//
// Layouts (channels last, as Mamba's projections produce them; t = time step, i = channel):
//   u, delta, y, du, ddelta, dy : [B, L, I]   element (b,t,i) at b*sb + t*st + i  (i contiguous)
//   A, dA                       : [I, N]      contiguous
//   Bm, Cm, dB, dC              : [B, L, N]   contiguous
//   D, dD                       : [I]         (D may be null: no skip connection)
//   states                      : [B, I, n_chunks, N]  the state h after the last step of each chunk
//   h0, dh0, dlast              : [B, I, N]   contiguous (each may be null: a zero start state /
//                                             no gradient of h0 asked / no gradient of the final h)
//   reset                       : [B, L]      uint8, contiguous; 1 where a document starts (null: none)
//
// Math, per batch b and channel i (delta already has softplus and bias applied by the caller):
//   h_t = exp(delta_t * A) (.) h_{t-1} + delta_t * u_t * B_t          h_{-1} = h0 (or 0),  h_t in R^N
//   where reset[t] (a document starts at t > 0), h_{t-1} reads as 0: the state restarts.
//   y_t = <h_t, C_t> + D * u_t
// Only each chunk's final state is kept, never the [B, L, I, N] states: the backward pass recomputes
// a chunk's states from the previous chunk's final state, then runs the adjoint scan backwards:
//   g_t = dy_t * C_t + exp(delta_{t+1} A) (.) g_{t+1}          (g = dLoss/dh)
//   du_t     = dy_t * D + delta_t * <g_t, B_t>
//   ddelta_t = <g_t, A (.) exp(delta_t A) (.) h_{t-1}> + u_t * <g_t, B_t>
//   dA      += delta_t * g_t (.) exp(delta_t A) (.) h_{t-1}
//   dB_t    += g_t * delta_t * u_t        (summed over channels)
//   dC_t    += dy_t * h_t                 (summed over channels)
//   dD      += dy_t * u_t
// with g_{L-1} seeded by dlast (the gradient of the final state), the carried term and the decay
// terms (dA, the first part of ddelta) dropped at a reset, and dh0 = exp(delta_0 A) (.) g_0.
#pragma once

#include <cstdint>

namespace coil::scan_cpu {

// Time steps per chunk: a chunk's recomputed states and decay factors (2 x kChunk x N floats)
// stay in L1 during the backward pass.
constexpr int64_t kChunk = 64;
constexpr int64_t kMaxState = 256;

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

// Channels are processed in blocks; the backward pass reduces dB and dC over blocks in a fixed
// order, so results do not depend on the number of threads. At most 32 blocks.
inline int64_t channel_block(int64_t I) { return (I + 31) / 32; }
inline int64_t num_channel_blocks(int64_t I) { return (I + channel_block(I) - 1) / channel_block(I); }

template <typename T>
struct Args {
  int64_t B, L, I, N;
  // inputs
  const T *u, *delta, *A, *Bm, *Cm, *D;
  int64_t u_sb, u_st, delta_sb, delta_st;
  // forward outputs: y [B,L,I] contiguous, states [B,I,n_chunks,N]
  T *y, *states;
  // backward: dy (strided like u), outputs du, ddelta [B,L,I] contiguous, dA [I,N], dD [I],
  // and per-block partial sums dB_part, dC_part [n_blocks, B, L, N].
  const T* dy;
  int64_t dy_sb, dy_st;
  T *du, *ddelta, *dA, *dD, *dB_part, *dC_part;
  // document boundaries and the initial state (see the layouts above; all optional)
  const uint8_t* reset;
  const T *h0, *dlast;
  T* dh0;
};

// One decoding step (L = 1) from the state, updated in place; u, delta, z [B, I] and Bm, Cm [B, N]
// rows at their own strides (elements), channels / state contiguous inside a row:
//   dt = softplus(delta + delta_bias)   (or without softplus; no bias: 0)
//   h = exp(dt A) (.) h + dt u B;    y = (<h, C> + D u) * silu(z)     (z null: no gate; D null: 0)
struct StepArgs {
  int64_t B, I, N;
  const float *u, *delta, *delta_bias, *A, *Bm, *Cm, *D, *z;  // delta_bias, D, z may be null
  int64_t u_sb, delta_sb, B_sb, C_sb, z_sb;
  bool softplus;
  float* state;  // [B, I, N] contiguous, read and overwritten
  float* y;      // [B, I] contiguous
};

// Forward over the tasks [task_begin, task_end) of B x n_blocks (task = b * n_blocks + block).
using ForwardFn = void (*)(const Args<float>&, int64_t task_begin, int64_t task_end);
using BackwardFn = void (*)(const Args<float>&, int64_t block_begin, int64_t block_end);
using ForwardFn64 = void (*)(const Args<double>&, int64_t, int64_t);
using BackwardFn64 = void (*)(const Args<double>&, int64_t, int64_t);
using StepFn = void (*)(const StepArgs&, int64_t task_begin, int64_t task_end);  // tasks as forward's

struct Kernels {
  const char* isa;
  ForwardFn forward;
  BackwardFn backward;
  ForwardFn64 forward64;
  BackwardFn64 backward64;
  StepFn step;
};

// Overloads that pick the float32 or float64 entry.
inline void forward(const Kernels& k, const Args<float>& a, int64_t b, int64_t e) { k.forward(a, b, e); }
inline void forward(const Kernels& k, const Args<double>& a, int64_t b, int64_t e) { k.forward64(a, b, e); }
inline void backward(const Kernels& k, const Args<float>& a, int64_t b, int64_t e) { k.backward(a, b, e); }
inline void backward(const Kernels& k, const Args<double>& a, int64_t b, int64_t e) { k.backward64(a, b, e); }

Kernels generic_kernels();
Kernels avx2_kernels();  // defined only when the compiler can target AVX2+FMA
// The best kernels this processor runs.
const Kernels& best_kernels();

}  // namespace coil::scan_cpu
