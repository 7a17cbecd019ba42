// The fused CUDA selective scan: forward and backward, with the delta bias, softplus, D skip and
// SiLU gate folded in. Math and layouts: scan_cuda.h. It computes what the CPU kernel
// (scan_cpu_kernel.inc) computes, in float32 whatever the input dtype.
//
// Two versions, side by side and tested against the same references (tests/test_scan_cuda.cpp;
// their indexing also in tests/python/test_scan_cuda_emulation.py for version 2):
//   version 1 (Kernel::kSequential), described here: parallel over batch rows and channels, each
//     thread walking the whole sequence;
//   version 2 (Kernel::kSegmented, the default), further down with its own description: time split
//     into segments across blocks as well, the next chunk prefetched, 4-16 threads a channel.
// plan() (at the end) picks the version and the segments; bench_scan --device cuda times both.
//
// Version 1. Work split. The layouts are channels last ([B, L, I], channel stride 1), so at one time step the
// channels of a block sit side by side in memory: threads run over channels and each thread walks
// time sequentially, like the CPU kernel. One channel alone is too little work for a thread (B*I
// threads would leave an H200 mostly idle), so each channel is served by 4 threads, each holding a
// quarter of the state h (NS = N/4 floats in registers). In a warp, lane = 4*j + q: channel j of
// the warp's 8, quarter q of the state. <h, C> and <g, B> are then sums over the 4 quarters (two
// shuffles); dB and dC are sums over the 8 channels of the warp (shuffles, then one atomicAdd per
// warp).
//
// A thread block is 16 channels (64 threads) of one batch row b; it walks the whole sequence in
// chunks of kChunk steps. Per chunk, the block first copies its tile of inputs ([kChunk, 16]
// elements of u, delta, z, dy: 64-byte rows, coalesced) and the chunk's B and C rows into shared
// memory, computing softplus and the gate once per element there; then each thread runs its
// sequential loop out of shared memory; then the block writes the output tiles.
//
// Memory: the forward pass stores h at the end of each chunk (states [B, I, L/kChunk, N]; nothing
// when no backward follows); the backward pass walks chunks last to first, recomputes the chunk's
// kChunk states from the previous chunk's end into shared memory, then sweeps the adjoint g back.
//
// Reductions and determinism: dA, dD and ddelta_bias are summed over time in registers and written
// once per (batch row, channel) to [B, ...] partials that the caller sums, so they are
// deterministic. dB and dC are sums over all I channels for every (b, t, n): each warp sums its 8
// channels with shuffles and adds the result to a float32 [B, L, N] buffer with atomicAdd (I/8
// atomic adds per element). Per-block partials would cost I/16 * B*L*N floats of memory traffic
// (as much as u itself at mamba-130m sizes); the price of atomics is that the order of the I/8
// additions varies between runs, so dB and dC vary in their last bits (as in mamba_ssm, which
// adds every channel atomically).
#include <algorithm>
#include <type_traits>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/cuda_kernel.cuh"
#include "model/scan_cuda.h"

namespace coil::scan_cuda {
namespace {

constexpr int kQuarters = 4;                               // threads per channel
constexpr int kThreads = kChannelsPerBlock * kQuarters;    // 64 threads per block
constexpr int kTile = kChunk * kChannelsPerBlock;          // elements of one [kChunk, 16] tile
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

static_assert(kThreads % 32 == 0, "whole warps");
static_assert(32 % kQuarters == 0, "a channel's threads share a warp");

// Loads and stores of the input dtype, converted to and from float32; launches.
using cuda_kernel::dynamic_shared_floats;
using cuda_kernel::error_text;
using cuda_kernel::from_f32;
using cuda_kernel::launch;
using cuda_kernel::to_f32;

// softplus(x) = log(1 + e^x), and x itself above 20 (as ATen's softplus with threshold 20).
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
// Its derivative, sigmoid(x) (1 above the threshold, as ATen's softplus_backward).
__device__ __forceinline__ float softplus_grad(float x) {
  if (x > 20.f) return 1.f;
  const float e = expf(x);
  return e / (e + 1.f);
}
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The per-element step of the input tiles: x = delta + bias, dt = softplus(x) (or x).
__device__ __forceinline__ float step_size(float x, bool softplus_on) { return softplus_on ? softplus(x) : x; }

// exp(dt * A) as 2^(dt * A log2 e): A arrives pre-multiplied by log2 e, so this is one multiply
// and one hardware exp2. The forward and backward kernels use this same expression, so the
// backward recomputes bit-identical states.
__device__ __forceinline__ float decay(float dt, float A_log2e) { return exp2f(dt * A_log2e); }

// Sum over the 4 quarter-state threads of a channel (lanes 4j .. 4j+3); all lanes get the sum.
__device__ __forceinline__ float sum_quarters(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  v += __shfl_xor_sync(kFullMask, v, 2);
  return v;
}

// One level of the sum over the 8 channels of a warp (lane bits 2, 3, 4, i.e. xor offsets 4, 8, 16),
// done as a reduce-scatter: with K > 1 values live, a lane keeps one half of them and sends the other
// half to its partner (lane ^ offset), which keeps the opposite half; both add what they receive. So
// the number of shuffles halves at each level instead of staying K. With one value left, partners
// simply exchange and add (then both hold the same sum, and only one of them writes it).
template <int K>
__device__ __forceinline__ void channel_sum_level(float* v, int lane, int offset, int& first, bool& writer) {
  if constexpr (K == 1) {
    v[0] += __shfl_xor_sync(kFullMask, v[0], offset);
    writer = writer && !(lane & offset);
  } else {
    const bool upper = lane & offset;  // this lane keeps the upper half
#pragma unroll
    for (int m = 0; m < K / 2; ++m) {
      const float send = upper ? v[m] : v[m + K / 2];
      const float keep = upper ? v[m + K / 2] : v[m];
      v[m] = keep + __shfl_xor_sync(kFullMask, send, offset);
    }
    if (upper) first += K / 2;
  }
}

// Sums v[0..NS) (one value per state index k of this thread's quarter) over the 8 channels of the
// warp. Afterwards, the lane holds in v[0..R) (R = max(NS/8, 1)) the sums for state indices
// first .. first+R-1 of its quarter, and `writer` says whether it is the one lane that should store
// them (lanes that only exchanged at the last levels hold copies).
template <int NS>
__device__ __forceinline__ int sum_channels(float (&v)[NS], int lane, bool& writer) {
  constexpr int K1 = NS, K2 = NS > 1 ? NS / 2 : 1, K3 = NS > 2 ? NS / 4 : 1;
  int first = 0;
  writer = true;
  channel_sum_level<K1>(v, lane, 16, first, writer);
  channel_sum_level<K2>(v, lane, 8, first, writer);
  channel_sum_level<K3>(v, lane, 4, first, writer);
  return first;
}
template <int NS> constexpr int channel_sum_width() { return NS >= 8 ? NS / 8 : 1; }

// Copies a thread's NS consecutive floats of a B or C row out of shared memory, 16 bytes per load
// when NS is a multiple of 4 (rows and quarters then start on 16-byte boundaries).
template <int NS>
__device__ __forceinline__ void load_quarter(const float* src, float (&dst)[NS]) {
  if constexpr (NS % 4 == 0) {
#pragma unroll
    for (int m = 0; m < NS / 4; ++m) {
      const float4 v = reinterpret_cast<const float4*>(src)[m];
      dst[4 * m] = v.x, dst[4 * m + 1] = v.y, dst[4 * m + 2] = v.z, dst[4 * m + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < NS; ++k) dst[k] = src[k];
  }
}

// Document starts (Params::reset) of the chunk [t0, t0 + len) of row b as a bit mask, bit t = a
// document starts at t0 + t: lane t reads one flag, a ballot gathers them (kChunk = warp size).
// Called by every lane of the warp (the callers' branch on p.reset is uniform); 0 without resets.
static_assert(kChunk == 32, "one reset flag per lane");
__device__ __forceinline__ unsigned reset_mask(const Params& p, int64_t b, int64_t t0, int len) {
  if (!p.reset) return 0u;
  const int lane = int(threadIdx.x) % 32;
  return __ballot_sync(kFullMask, lane < len && p.reset[b * p.L + t0 + lane] != 0);
}
__device__ __forceinline__ bool starts(unsigned mask, int t) { return (mask >> t) & 1u; }

// Where a thread sits: its batch row, channel, quarter of the state.
struct Place {
  int tid, lane, j, q;  // thread in block, lane, channel in block (0..15), quarter (0..3)
  int64_t b, i0, i;     // batch row, first channel of the block, this thread's channel
  bool valid;           // i < I (the last block may run past the end)
};
__device__ __forceinline__ Place place(int64_t I) {
  Place p;
  p.tid = threadIdx.x;
  p.lane = p.tid % 32;
  p.j = (p.tid / 32) * (32 / kQuarters) + p.lane / kQuarters;
  p.q = p.lane % kQuarters;
  p.b = blockIdx.y;
  p.i0 = int64_t(blockIdx.x) * kChannelsPerBlock;
  p.i = p.i0 + p.j;
  p.valid = p.i < I;
  return p;
}

// Copies the chunk's rows of B and C ([len, N] each, contiguous) into [kChunk, NP] shared tiles,
// zero-padded to NP = 4*NS columns and kChunk rows (padded states have B = C = 0 and stay 0).
template <typename T, int NP>
__device__ __forceinline__ void load_bc(const Params& p, int64_t b, int64_t t0, int len, float* Bs, float* Cs) {
  const T* Bm = static_cast<const T*>(p.Bm) + (b * p.L + t0) * p.N;
  const T* Cm = static_cast<const T*>(p.Cm) + (b * p.L + t0) * p.N;
  for (int e = threadIdx.x; e < kChunk * NP; e += kThreads) {
    const int t = e / NP, n = e % NP;
    const bool in = t < len && n < p.N;
    Bs[e] = in ? to_f32(Bm[t * p.N + n]) : 0.f;
    Cs[e] = in ? to_f32(Cm[t * p.N + n]) : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward. Per thread: h and A (times log2 e) for its quarter of the state, in registers.
template <typename T, int NS>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p) {
  constexpr int NP = kQuarters * NS;  // the padded state size
  __shared__ float u_s[kTile], dt_s[kTile], gate_s[kTile], y_s[kTile];
  __shared__ __align__(16) float B_s[kChunk * NP];
  __shared__ __align__(16) float C_s[kChunk * NP];

  const Place w = place(p.I);
  const int64_t I = p.I, L = p.L, N = p.N, n_chunks = (L + kChunk - 1) / kChunk;
  float A2[NS], h[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = w.q * NS + k;
    A2[k] = (w.valid && n < N) ? p.A[w.i * N + n] * kLog2e : 0.f;
    h[k] = (p.h0 && w.valid && n < N) ? p.h0[(w.b * I + w.i) * N + n] : 0.f;
  }
  const float Dv = (w.valid && p.D) ? p.D[w.i] : 0.f;
  const T* u = static_cast<const T*>(p.u) + w.b * p.u_sb;
  const T* delta = static_cast<const T*>(p.delta) + w.b * p.delta_sb;
  const T* z = p.z ? static_cast<const T*>(p.z) + w.b * p.z_sb : nullptr;
  T* y = static_cast<T*>(p.y) + w.b * L * I;

  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    __syncthreads();  // the previous chunk's tiles are read and written out
    // Input tiles: element e is time t0 + e/16, channel i0 + e%16. Outside [0, L) x [0, I) the tile
    // holds u = dt = 0, so those lanes compute h = 0 and write nothing.
    for (int e = w.tid; e < kTile; e += kThreads) {
      const int t = e / kChannelsPerBlock;
      const int64_t i = w.i0 + e % kChannelsPerBlock;
      const bool in = t < len && i < I;
      float uu = 0.f, dt = 0.f, gate = 1.f;
      if (in) {
        uu = to_f32(u[(t0 + t) * p.u_st + i]);
        const float x = to_f32(delta[(t0 + t) * p.delta_st + i]) + (p.delta_bias ? p.delta_bias[i] : 0.f);
        dt = step_size(x, p.softplus);
        if (z) {
          const float zz = to_f32(z[(t0 + t) * p.z_st + i]);
          gate = zz * sigmoid(zz);  // silu(z)
        }
      }
      u_s[e] = uu, dt_s[e] = dt, gate_s[e] = gate;
    }
    load_bc<T, NP>(p, w.b, t0, len, B_s, C_s);
    const unsigned rmask = reset_mask(p, w.b, t0, len);
    __syncthreads();

    // The recurrence, one step at a time: h = exp(dt A) h + dt u B, then y = (<h, C> + D u) silu(z).
    for (int t = 0; t < len; ++t) {
      const int x = t * kChannelsPerBlock + w.j;
      const float dt = dt_s[x], uu = u_s[x], dtu = dt * uu;
      float Bt[NS], Ct[NS];
      load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
      load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
      if (starts(rmask, t))  // a document starts: h_{t-1} reads as 0
#pragma unroll
        for (int k = 0; k < NS; ++k) h[k] = 0.f;
      float hc = 0.f;
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        h[k] = decay(dt, A2[k]) * h[k] + dtu * Bt[k];
        hc += h[k] * Ct[k];
      }
      hc = sum_quarters(hc);
      if (w.q == 0) y_s[x] = (hc + Dv * uu) * gate_s[x];
    }
    if (p.states && w.valid) {
      float* st = p.states + ((w.b * I + w.i) * n_chunks + c) * N;
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (w.q * NS + k < N) st[w.q * NS + k] = h[k];
    }
    __syncthreads();
    for (int e = w.tid; e < kTile; e += kThreads) {
      const int t = e / kChannelsPerBlock;
      const int64_t i = w.i0 + e % kChannelsPerBlock;
      if (t < len && i < I) y[(t0 + t) * I + i] = from_f32<T>(y_s[e]);
    }
  }
  if (p.final_state && w.valid) {
    float* st = p.final_state + (w.b * I + w.i) * N;
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (w.q * NS + k < N) st[w.q * NS + k] = h[k];
  }
}

// ------------------------------------------------------------------------------------------------
// Backward. Shared memory (dynamic, floats): eight [kChunk, 16] tiles, B and C of the chunk, and the
// recomputed states of the chunk, hist[t][k][thread] (thread fastest: no bank conflicts).
template <int NS>
constexpr size_t backward_smem_floats() {
  return size_t(8) * kTile + size_t(2) * kChunk * kQuarters * NS + size_t(kChunk) * NS * kThreads;
}

template <typename T, int NS>
__global__ void __launch_bounds__(kThreads) backward_kernel(const Params p) {
  constexpr int NP = kQuarters * NS;
  float* const smem = dynamic_shared_floats();
  float* u_s = smem;                // u
  float* dt_s = u_s + kTile;        // dt = softplus(delta + bias)
  float* dsig_s = dt_s + kTile;     // d dt / d delta: sigmoid(x), or 1 without softplus
  float* ds_s = dsig_s + kTile;     // ds = dy * silu(z): the gradient of the pre-gate output s
  float* dyg_s = ds_s + kTile;      // dy * silu'(z), so that dz = dyg * s (0 without z)
  float* du_s = dyg_s + kTile;      // outputs: du, ddelta, dz
  float* ddelta_s = du_s + kTile;
  float* dz_s = ddelta_s + kTile;
  float* B_s = dz_s + kTile;
  float* C_s = B_s + kChunk * NP;
  float* hist = C_s + kChunk * NP;  // [kChunk][NS][kThreads]

  const Place w = place(p.I);
  const int64_t I = p.I, L = p.L, N = p.N, n_chunks = (L + kChunk - 1) / kChunk;
  float A[NS], A2[NS], g[NS], dA[NS], h0[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = w.q * NS + k;
    A[k] = (w.valid && n < N) ? p.A[w.i * N + n] : 0.f;
    A2[k] = A[k] * kLog2e;
    // carries exp(dt_{t+1} A) g_{t+1} from step t+1 to step t (after the last step: dlast, or 0)
    g[k] = (p.dlast && w.valid && n < N) ? p.dlast[(w.b * I + w.i) * N + n] : 0.f;
    dA[k] = 0.f;
  }
  const float Dv = (w.valid && p.D) ? p.D[w.i] : 0.f;
  float dD = 0.f, dbias = 0.f;  // summed by the q == 0 thread of each channel
  const T* u = static_cast<const T*>(p.u) + w.b * p.u_sb;
  const T* delta = static_cast<const T*>(p.delta) + w.b * p.delta_sb;
  const T* z = p.z ? static_cast<const T*>(p.z) + w.b * p.z_sb : nullptr;
  const T* dy = static_cast<const T*>(p.dy) + w.b * p.dy_sb;
  T* du = static_cast<T*>(p.du) + w.b * L * I;
  T* ddelta = static_cast<T*>(p.ddelta) + w.b * L * I;
  T* dz = p.dz ? static_cast<T*>(p.dz) + w.b * L * I : nullptr;

  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    __syncthreads();  // the previous (later) chunk's tiles are read and written out
    for (int e = w.tid; e < kTile; e += kThreads) {
      const int t = e / kChannelsPerBlock;
      const int64_t i = w.i0 + e % kChannelsPerBlock;
      const bool in = t < len && i < I;
      float uu = 0.f, dt = 0.f, dsig = 0.f, ds = 0.f, dyg = 0.f;
      if (in) {
        const int64_t tt = t0 + t;
        uu = to_f32(u[tt * p.u_st + i]);
        const float x = to_f32(delta[tt * p.delta_st + i]) + (p.delta_bias ? p.delta_bias[i] : 0.f);
        dt = step_size(x, p.softplus);
        dsig = p.softplus ? softplus_grad(x) : 1.f;
        const float gy = to_f32(dy[tt * p.dy_st + i]);
        if (z) {
          const float zz = to_f32(z[tt * p.z_st + i]), sg = sigmoid(zz);
          ds = gy * zz * sg;                         // dy * silu(z)
          dyg = gy * sg * (1.f + zz * (1.f - sg));   // dy * silu'(z)
        } else {
          ds = gy;
        }
      }
      u_s[e] = uu, dt_s[e] = dt, dsig_s[e] = dsig, ds_s[e] = ds, dyg_s[e] = dyg;
    }
    load_bc<T, NP>(p, w.b, t0, len, B_s, C_s);
    const unsigned rmask = reset_mask(p, w.b, t0, len);
    __syncthreads();

    // 1. Recompute the chunk's states from h at the end of the previous chunk (h0 or 0 before the
    //    first), exactly as the forward pass did, keeping h_t in hist; and the pre-gate output
    //    s_t = <h_t, C_t> + D u_t, which dz needs.
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      const int64_t n = w.q * NS + k;
      h0[k] = !(w.valid && n < N) ? 0.f
              : c > 0             ? p.states[((w.b * I + w.i) * n_chunks + c - 1) * N + n]
              : p.h0              ? p.h0[(w.b * I + w.i) * N + n]
                                  : 0.f;
    }
    {
      float h[NS];
#pragma unroll
      for (int k = 0; k < NS; ++k) h[k] = h0[k];
      for (int t = 0; t < len; ++t) {
        const int x = t * kChannelsPerBlock + w.j;
        const float dt = dt_s[x], dtu = dt * u_s[x];
        float Bt[NS], Ct[NS];
        load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
        load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
        if (starts(rmask, t))
#pragma unroll
          for (int k = 0; k < NS; ++k) h[k] = 0.f;
        float hc = 0.f;
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          h[k] = decay(dt, A2[k]) * h[k] + dtu * Bt[k];
          hist[(t * NS + k) * kThreads + w.tid] = h[k];
          hc += h[k] * Ct[k];
        }
        hc = sum_quarters(hc);
        if (w.q == 0) dz_s[x] = dyg_s[x] * (hc + Dv * u_s[x]);
      }
    }

    // 2. The adjoint sweep, from the chunk's last step to its first:
    //    gn = g_t = ds_t C_t + (carried exp(dt_{t+1} A) g_{t+1});  q = g_t exp(dt_t A) h_{t-1}.
    //    Where a document starts at t, h_{t-1} reads as 0 and nothing is carried into step t-1.
    for (int t = len - 1; t >= 0; --t) {
      const int x = t * kChannelsPerBlock + w.j;
      const float dt = dt_s[x], uu = u_s[x], ds = ds_s[x], dtu = dt * uu;
      const bool restart = starts(rmask, t);
      float Bt[NS], Ct[NS];
      load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
      load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
      float gB = 0.f, gAh = 0.f, dBv[NS], dCv[NS], hprev[NS];
#pragma unroll
      for (int k = 0; k < NS; ++k) hprev[k] = t > 0 ? hist[((t - 1) * NS + k) * kThreads + w.tid] : h0[k];
      if (restart)  // (a branch, uniform over the warp, not a select per element)
#pragma unroll
        for (int k = 0; k < NS; ++k) hprev[k] = 0.f;
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        const float gn = g[k] + ds * Ct[k];
        const float e = decay(dt, A2[k]);
        const float qv = gn * e * hprev[k];
        dA[k] += dt * qv;
        gAh += qv * A[k];
        gB += gn * Bt[k];
        dBv[k] = gn * dtu;                                     // this channel's part of dB_t
        dCv[k] = ds * hist[(t * NS + k) * kThreads + w.tid];   // this channel's part of dC_t
        g[k] = e * gn;
      }
      if (restart)
#pragma unroll
        for (int k = 0; k < NS; ++k) g[k] = 0.f;
      gB = sum_quarters(gB);
      gAh = sum_quarters(gAh);
      if (w.q == 0) {
        const float ddt = gAh + uu * gB;
        const float dd = ddt * dsig_s[x];
        du_s[x] = ds * Dv + dt * gB;
        ddelta_s[x] = dd;
        dD += ds * uu;
        dbias += dd;
      }
      // dB_t and dC_t: sum over the warp's 8 channels, then one atomic add per state element.
      bool wB, wC;
      const int fB = sum_channels<NS>(dBv, w.lane, wB);
      const int fC = sum_channels<NS>(dCv, w.lane, wC);
      const int64_t row = (w.b * L + t0 + t) * N;
#pragma unroll
      for (int m = 0; m < channel_sum_width<NS>(); ++m) {
        const int64_t nB = w.q * NS + fB + m, nC = w.q * NS + fC + m;
        if (wB && nB < N) atomicAdd(p.dB + row + nB, dBv[m]);
        if (wC && nC < N) atomicAdd(p.dC + row + nC, dCv[m]);
      }
    }
    __syncthreads();
    for (int e = w.tid; e < kTile; e += kThreads) {
      const int t = e / kChannelsPerBlock;
      const int64_t i = w.i0 + e % kChannelsPerBlock;
      if (t < len && i < I) {
        const int64_t o = (t0 + t) * I + i;
        du[o] = from_f32<T>(du_s[e]);
        ddelta[o] = from_f32<T>(ddelta_s[e]);
        if (dz) dz[o] = from_f32<T>(dz_s[e]);
      }
    }
  }
  if (w.valid) {
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (w.q * NS + k < N) {
        p.dA_part[(w.b * I + w.i) * N + w.q * NS + k] = dA[k];
        if (p.dh0) p.dh0[(w.b * I + w.i) * N + w.q * NS + k] = g[k];  // the carry out of step 0
      }
    if (w.q == 0) {
      p.dD_part[w.b * I + w.i] = dD;
      p.dbias_part[w.b * I + w.i] = dbias;
    }
  }
}

// ================================================================================================
// Version 2, kSegmented: parallel over time as well.
//
// Threads. A channel's state is spread over Q threads (NS = N/Q states each, NS <= 4): Q = 4 up to
// N = 16, 8 up to 32, 16 up to 64, so registers and shared memory per thread are those of N = 16
// whatever N. A block is 16 channels (Q * 16 threads) of one batch row and one time segment; in a
// warp, lane = Q*j + q (channel j of the warp's 32/Q, part q of the state).
//
// Segments. Time is split into S segments of whole chunks, blockIdx.z = segment. The recurrence is
// linear in its start state: over a segment, h_end = P (.) h_start + h_local, where P = prod_t
// exp(dt_t A) = exp(A sum_t dt_t) and h_local is the end state from h_start = 0. So, when S > 1:
//   1. local pass (grid B x I/16 x S): each block runs its segment from 0, writes h_local and
//      sum dt to scratch (no outputs);
//   2. combine (one thread per (b, i, n), S steps): h_start(s+1) = P_s h_start(s) + h_local(s),
//      written over h_local in place;
//   3. full pass (same grid): each block runs its segment from its true start state, writing y,
//      the chunk-end states, and the final state (last segment).
// The backward pass mirrors it in reverse time for the adjoint: the carry c_t = exp(dt_t A) g_t
// passed from step t to t-1 obeys c_start = P (.) c_end + c_local, so a local pass from c = 0 at
// each segment's end, a reverse combine, and the full backward pass from the true carry. S = 1 is
// the full pass alone. S is chosen by plan(): 1 when B*I/16 blocks already fill half the GPU's
// resident slots, else about twice the slots over, at least 4 chunks (128 steps) per segment.
//
// Overlap. Each thread loads its share of the next chunk's inputs (u, delta, z, dy, B, C rows) into
// registers (raw dtype) right after the current chunk's tile is in shared memory, so the loads are
// in flight while the chunk is computed; only the conversion and the shared-memory store wait.
//
// Backward shared memory. The recomputed states of a chunk (hist) are kept per thread in shared
// memory; for N > 16 a chunk is swept in two halves of 16 steps (the upper half first: its start
// state is recomputed through the lower half in registers, then the lower half is recomputed and
// swept), so hist holds 16 steps: 1.25x the recompute for half the memory. Per block: 8 tiles of
// 32 x 16 floats, B and C rows of the chunk, hist: 52 KiB (N <= 16: 4 resident blocks, 8 warps per
// SM), 56 KiB (N <= 32: 4 blocks, 16 warps), 100 KiB (N <= 64: 2 blocks, 16 warps; the first
// kernel: 1 block, 2 warps).
//
// Arithmetic. The step h = e h + dt u B is written with explicit __fmaf_rn / __fmul_rn (no
// contraction choices by the compiler), so the backward recomputes the forward's states bit for
// bit. Reductions and determinism as in version 1; the dA/dD/dbias partial rows are per (batch row,
// segment), summed by the caller (a fixed-shape reduction, no atomics).

// Sum over the Q threads of a channel (lanes Q*j .. Q*j+Q-1); every lane gets the same sum.
template <int Q>
__device__ __forceinline__ float sum_group(float v) {
#pragma unroll
  for (int o = 1; o < Q; o <<= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The levels of the sum over the channels of a warp: xor offsets 16, 8, .. down to Q (lane bits
// above the part index q), each a channel_sum_level.
template <int K, int OFF, int Q>
__device__ __forceinline__ void channel_levels(float* v, int lane, int& first, bool& writer) {
  if constexpr (OFF >= Q) {
    channel_sum_level<K>(v, lane, OFF, first, writer);
    channel_levels<(K > 1 ? K / 2 : 1), OFF / 2, Q>(v, lane, first, writer);
  }
}
// How many sums a lane holds afterwards.
template <int NS, int Q>
constexpr int group_channel_width() {
  int k = NS;
  for (int off = 16; off >= Q; off /= 2) k = k > 1 ? k / 2 : 1;
  return k;
}
template <int NS, int Q>
__device__ __forceinline__ int sum_group_channels(float (&v)[NS], int lane, bool& writer) {
  int first = 0;
  writer = true;
  channel_levels<NS, 16, Q>(v, lane, first, writer);
  return first;
}

// One step of the recurrence for one state element, in the fixed order both passes use.
__device__ __forceinline__ float scan_step(float e, float h, float dtu, float b) {
  return __fmaf_rn(e, h, __fmul_rn(dtu, b));
}

template <int Q>
struct Group {
  int tid, lane, j, q;  // thread in block, lane, channel in block (0..15), part of the state
  int64_t b, i0, i;     // batch row, first channel of the block, this thread's channel
  int s;                // time segment
  bool valid;           // i < I
};
template <int Q>
__device__ __forceinline__ Group<Q> group_place(int64_t I) {
  Group<Q> w;
  w.tid = threadIdx.x;
  w.lane = w.tid % 32;
  w.j = (w.tid / 32) * (32 / Q) + w.lane / Q;
  w.q = w.lane % Q;
  w.b = blockIdx.y;
  w.i0 = int64_t(blockIdx.x) * kChannelsPerBlock;
  w.i = w.i0 + w.j;
  w.s = blockIdx.z;
  w.valid = w.i < I;
  return w;
}

// The chunks [begin, end) of segment s: S segments of ceil(n_chunks / S) chunks (plan() makes S
// such that none is empty).
struct Span {
  int64_t begin, end;
};
__device__ __forceinline__ Span segment_chunks(int64_t n_chunks, int S, int s) {
  const int64_t per = (n_chunks + S - 1) / S;
  const int64_t begin = s * per;
  return {begin, begin + per < n_chunks ? begin + per : n_chunks};
}

// Register prefetch of one [kChunk, 16] tile of a [L, I] tensor (row stride st): element m of the
// thread is e = tid + m*NT, time t0 + e/16 = t0 + tid/16 + m*NT/16, channel i0 + e%16 = i0 + tid%16;
// outside [0, len) x [0, I): 0. The addresses are a pointer into this chunk advanced by a fixed step
// (nothing loop-invariant across chunks for the compiler to hoist and keep live: only the loaded
// values stay in registers while the chunk before is computed).
template <typename T, int NT>
__device__ __forceinline__ void prefetch_tile(const T* base, int64_t st, int64_t t0, int len, int64_t i0,
                                              int64_t I, T (&r)[kTile / NT]) {
  constexpr int R = NT / kChannelsPerBlock;  // time rows per step of m
  const int row = int(threadIdx.x) / kChannelsPerBlock, col = int(threadIdx.x) % kChannelsPerBlock;
  const bool col_in = i0 + col < I;
  const T* ptr = base + (t0 + row) * st + i0 + col;
#pragma unroll
  for (int m = 0; m < kTile / NT; ++m, ptr += R * st)
    r[m] = (col_in && row + m * R < len) ? *ptr : from_f32<T>(0.f);
}
// The same for the chunk's rows of B or C ([len, N] of a contiguous [B, L, N]) as a [kChunk, NP]
// tile: element e = tid + m*NT at row e/NP = tid/NP + m*NT/NP, column e%NP = tid%NP; 0 beyond len
// rows and N columns.
template <typename T, int NT, int NP>
__device__ __forceinline__ void prefetch_rows(const T* base, int64_t N, int64_t row0, int len,
                                              T (&r)[kChunk * NP / NT]) {
  constexpr int R = NT / NP;
  const int row = int(threadIdx.x) / NP, n = int(threadIdx.x) % NP;
  const T* ptr = base + (row0 + row) * N + n;
#pragma unroll
  for (int m = 0; m < kChunk * NP / NT; ++m, ptr += R * N)
    r[m] = (n < N && row + m * R < len) ? *ptr : from_f32<T>(0.f);
}
template <typename T, int NT, int NP>
__device__ __forceinline__ void store_rows(const T (&r)[kChunk * NP / NT], float* dst) {
#pragma unroll
  for (int m = 0; m < kChunk * NP / NT; ++m) dst[int(threadIdx.x) + m * NT] = to_f32(r[m]);
}

// The scratch of a segmented launch: per (b, s, i) the segment's N-vector (h_local, then h_start;
// or the adjoint's carry), then per (b, s, i) the segment's sum of dt.
__device__ __forceinline__ int64_t seg_row(const Params& p, int64_t b, int s, int64_t i) {
  return (b * p.segments + s) * p.I + i;
}
__device__ __forceinline__ float* seg_sdt(const Params& p) { return p.scratch + p.B * p.segments * p.I * p.N; }
// With resets, then per (b, s): 1 where a document starts inside segment s of row b (P = 0), else 0.
__device__ __forceinline__ float* seg_cut(const Params& p) { return seg_sdt(p) + p.B * p.segments * p.I; }

// ------------------------------------------------------------------------------------------------
// Forward, version 2. kLocal: the local pass (from h = 0; writes h_local and sum dt to scratch).
// Resident blocks per SM that the register budget must allow (__launch_bounds__' second argument):
// forward, 16 warps (at most 128 registers a thread); backward, what its shared memory allows anyway
// (6, 4, 2 blocks: 12 or 16 warps).
template <int Q> constexpr int fwd_min_blocks() { return 16 * 32 / (kChannelsPerBlock * Q); }
template <int Q> constexpr int bwd_min_blocks() { return Q == 4 ? 6 : Q == 8 ? 4 : 2; }

template <typename T, int NS, int Q, bool kLocal>
__global__ void __launch_bounds__(kChannelsPerBlock * Q, fwd_min_blocks<Q>()) seg_forward_kernel(const Params p) {
  constexpr int NT = kChannelsPerBlock * Q, NP = Q * NS, PER = kTile / NT, PBC = kChunk * NP / NT;
  static_assert(kTile % NT == 0 && (kChunk * NP) % NT == 0, "whole tiles per thread");
  __shared__ float u_s[kTile], dt_s[kTile];
  __shared__ float gate_s[kLocal ? 1 : kTile], y_s[kLocal ? 1 : kTile];
  __shared__ __align__(16) float B_s[kChunk * NP];
  __shared__ __align__(16) float C_s[kLocal ? 4 : kChunk * NP];

  const Group<Q> w = group_place<Q>(p.I);
  const int64_t I = p.I, L = p.L, N = p.N, n_chunks = (L + kChunk - 1) / kChunk;
  const Span span = segment_chunks(n_chunks, p.segments, w.s);
  const bool from_scratch = !kLocal && p.segments > 1;  // start from the combined h_start
  float A2[NS], h[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = w.q * NS + k;
    const bool in = w.valid && n < N;
    A2[k] = in ? p.A[w.i * N + n] * kLog2e : 0.f;
    // The segment's start state: the combined one (S > 1, which starts from h0); else h0 or 0.
    h[k] = !in               ? 0.f
           : from_scratch    ? p.scratch[seg_row(p, w.b, w.s, w.i) * N + n]
           : !kLocal && p.h0 ? p.h0[(w.b * I + w.i) * N + n]
                             : 0.f;
  }
  const float Dv = (!kLocal && w.valid && p.D) ? p.D[w.i] : 0.f;
  // Tile element e = tid + m*NT has channel i0 + e%16 = i0 + tid%16 for every m (NT is a multiple of 16).
  const int64_t i_e = w.i0 + int(threadIdx.x) % kChannelsPerBlock;
  const float bias_j = (p.delta_bias && i_e < I) ? p.delta_bias[i_e] : 0.f;
  const T* u = static_cast<const T*>(p.u) + w.b * p.u_sb;
  const T* delta = static_cast<const T*>(p.delta) + w.b * p.delta_sb;
  const T* z = (!kLocal && p.z) ? static_cast<const T*>(p.z) + w.b * p.z_sb : nullptr;
  const T* Bm = static_cast<const T*>(p.Bm) + w.b * L * N;
  const T* Cm = static_cast<const T*>(p.Cm) + w.b * L * N;
  T* y = kLocal ? nullptr : static_cast<T*>(p.y) + w.b * L * I;

  T ru[PER], rd[PER], rz[PER], rB[PBC], rC[PBC];
  auto prefetch = [&](int64_t c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    prefetch_tile<T, NT>(u, p.u_st, t0, len, w.i0, I, ru);
    prefetch_tile<T, NT>(delta, p.delta_st, t0, len, w.i0, I, rd);
    if (z) prefetch_tile<T, NT>(z, p.z_st, t0, len, w.i0, I, rz);
    prefetch_rows<T, NT, NP>(Bm, N, t0, len, rB);
    if constexpr (!kLocal) prefetch_rows<T, NT, NP>(Cm, N, t0, len, rC);
  };
  float sdt = 0.f;  // the local pass: sum of dt over the segment
  bool cut = false;  // the local pass: a document starts inside the segment
  prefetch(span.begin);
  for (int64_t c = span.begin; c < span.end; ++c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    // The tile from the registers: u, dt = softplus(delta + bias), silu(z). Outside the sequence
    // and the channels, u = dt = 0 (h stays 0 there and nothing is written).
#pragma unroll
    for (int m = 0; m < PER; ++m) {
      const int e = w.tid + m * NT;
      const bool in = e / kChannelsPerBlock < len && i_e < I;
      u_s[e] = in ? to_f32(ru[m]) : 0.f;
      dt_s[e] = in ? step_size(to_f32(rd[m]) + bias_j, p.softplus) : 0.f;
      if constexpr (!kLocal) {
        float gate = 1.f;
        if (z && in) {
          const float zz = to_f32(rz[m]);
          gate = zz * sigmoid(zz);
        }
        gate_s[e] = gate;
      }
    }
    store_rows<T, NT, NP>(rB, B_s);
    if constexpr (!kLocal) store_rows<T, NT, NP>(rC, C_s);
    const unsigned rmask = reset_mask(p, w.b, t0, len);
    cut = cut || rmask != 0u;
    if (c + 1 < span.end) prefetch(c + 1);  // in flight during the compute below
    __syncthreads();

    for (int t = 0; t < len; ++t) {
      const int x = t * kChannelsPerBlock + w.j;
      const float dt = dt_s[x], uu = u_s[x], dtu = __fmul_rn(dt, uu);
      float Bt[NS];
      load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
      if (starts(rmask, t))  // a document starts: h_{t-1} reads as 0
#pragma unroll
        for (int k = 0; k < NS; ++k) h[k] = 0.f;
      if constexpr (kLocal) {
#pragma unroll
        for (int k = 0; k < NS; ++k) h[k] = scan_step(decay(dt, A2[k]), h[k], dtu, Bt[k]);
        sdt += dt;
      } else {
        float Ct[NS];
        load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
        float hc = 0.f;
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          h[k] = scan_step(decay(dt, A2[k]), h[k], dtu, Bt[k]);
          hc += h[k] * Ct[k];
        }
        hc = sum_group<Q>(hc);
        if (w.q == 0) y_s[x] = (hc + Dv * uu) * gate_s[x];
      }
    }
    if (!kLocal && p.states && w.valid) {
      float* st = p.states + ((w.b * I + w.i) * n_chunks + c) * N;
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (w.q * NS + k < N) st[w.q * NS + k] = h[k];
    }
    __syncthreads();  // y_s complete; and every thread is done with this chunk's tiles
    if constexpr (!kLocal) {
#pragma unroll
      for (int m = 0; m < PER; ++m) {
        const int e = w.tid + m * NT;
        const int t = e / kChannelsPerBlock;
        const int64_t i = w.i0 + e % kChannelsPerBlock;
        if (t < len && i < I) y[(t0 + t) * I + i] = from_f32<T>(y_s[e]);
      }
    }
  }
  // Every channel block of (b, s) sees the same flags: the first one writes them.
  if (kLocal && p.reset && blockIdx.x == 0 && threadIdx.x == 0) seg_cut(p)[w.b * p.segments + w.s] = cut ? 1.f : 0.f;
  if (!w.valid) return;
  float* out = nullptr;
  if (kLocal) out = p.scratch + seg_row(p, w.b, w.s, w.i) * N;
  else if (p.final_state && span.end == n_chunks) out = p.final_state + (w.b * I + w.i) * N;
  if (out) {
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (w.q * NS + k < N) out[w.q * NS + k] = h[k];
  }
  if (kLocal && w.q == 0) seg_sdt(p)[seg_row(p, w.b, w.s, w.i)] = sdt;
}

// The combine pass over the segments, one thread per (b, i, n): forward (kReverse false), v holds
// h_local and becomes h_start: h_start(0) = h0 (or 0), h_start(s+1) = P_s h_start(s) + h_local(s);
// reverse, v holds the adjoint's local carry and becomes the carry into the segment's last step:
// c(S-1) = dlast (or 0), c(s-1) = P_s c(s) + c_local(s). P_s = exp(A sum dt over segment s), or 0
// where a document starts inside segment s (then h_local, c_local are the true values already).
template <bool kReverse>
__global__ void __launch_bounds__(256) combine_kernel(const Params p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.B * p.I * p.N) return;
  const int64_t n = idx % p.N, i = (idx / p.N) % p.I, b = idx / (p.N * p.I);
  const int S = p.segments;
  const float A2 = p.A[i * p.N + n] * kLog2e;
  const float* sdt = seg_sdt(p);
  const float* init = kReverse ? p.dlast : p.h0;  // [B, I, N]: idx is its element (b, i, n)
  float c = init ? init[idx] : 0.f;
  for (int r = 0; r < S; ++r) {
    const int s = kReverse ? S - 1 - r : r;
    const int64_t row = seg_row(p, b, s, i);
    float* v = p.scratch + row * p.N + n;
    const float local = *v;
    *v = c;
    c = (p.reset && seg_cut(p)[b * S + s] != 0.f) ? local : __fmaf_rn(decay(sdt[row], A2), c, local);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, version 2. kLocal: the adjoint's local pass (carry from 0 at the segment's end; writes
// the carry out of the segment's first step and sum dt to scratch; no gradients).
template <int NS, int Q>
constexpr int bwd_halves() { return Q * NS > 16 ? 2 : 1; }
// At 16 threads a channel registers are tightest: there the start state of a half, h_{lo-1}, is kept
// in hist (slot 0, the half's states in slots 1..KH) rather than in registers.
template <int Q>
constexpr int bwd_hist_start_slots() { return Q == 16 ? 1 : 0; }
template <int NS, int Q, bool kLocal>
constexpr size_t seg_backward_smem_floats() {
  constexpr int NT = kChannelsPerBlock * Q, NP = Q * NS, KH = kChunk / bwd_halves<NS, Q>();
  return kLocal ? size_t(2) * kTile + size_t(kChunk) * NP
                : size_t(8) * kTile + size_t(2) * kChunk * NP + size_t(KH + bwd_hist_start_slots<Q>()) * NS * NT;
}

// `#pragma unroll kRolled` with kRolled = 0 (leave the choice to the compiler) is what is meant;
// nvcc says so with warning 20168, silenced for this kernel only.
#pragma nv_diag_suppress 20168
template <typename T, int NS, int Q, bool kLocal>
__global__ void __launch_bounds__(kChannelsPerBlock * Q, bwd_min_blocks<Q>()) seg_backward_kernel(const Params p) {
  constexpr int NT = kChannelsPerBlock * Q, NP = Q * NS, PER = kTile / NT, PBC = kChunk * NP / NT;
  constexpr int H = bwd_halves<NS, Q>(), KH = kChunk / H, S0 = bwd_hist_start_slots<Q>();
  constexpr bool kStartInHist = S0 > 0;
  // At 16 threads a channel the time loops below also stay rolled (unroll count 1; 0 leaves the
  // choice to the compiler): their bodies have NS-fold independent work, and it keeps the kernel
  // within 128 registers without spills.
  constexpr int kRolled = Q == 16 ? 1 : 0;
  static_assert(kTile % NT == 0 && (kChunk * NP) % NT == 0, "whole tiles per thread");
  float* const smem = dynamic_shared_floats();
  // Local pass: dt, ds, C. Full pass: the layout of version 1, hist for KH steps.
  float* dt_s = smem;
  float* ds_s = dt_s + kTile;
  float* C_s = ds_s + kTile;
  float* u_s = C_s + kChunk * NP;    // (full pass only, from here)
  float* dsig_s = u_s + kTile;
  float* dyg_s = dsig_s + kTile;
  float* du_s = dyg_s + kTile;
  float* ddelta_s = du_s + kTile;
  float* dz_s = ddelta_s + kTile;
  float* B_s = dz_s + kTile;
  float* hist = B_s + kChunk * NP;  // [S0 + KH][NS][NT]: each thread its own column

  const Group<Q> w = group_place<Q>(p.I);
  const int64_t I = p.I, L = p.L, N = p.N, n_chunks = (L + kChunk - 1) / kChunk;
  const Span span = segment_chunks(n_chunks, p.segments, w.s);
  const bool from_scratch = !kLocal && p.segments > 1;
  float A[NS], A2[NS], g[NS], dA[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = w.q * NS + k;
    const bool in = w.valid && n < N;
    A[k] = in ? p.A[w.i * N + n] : 0.f;
    A2[k] = A[k] * kLog2e;
    // The carry exp(dt_{t+1} A) g_{t+1} into the segment's last step: the combined one (S > 1);
    // else after the sequence's end, dlast or 0.
    g[k] = !in                  ? 0.f
           : from_scratch       ? p.scratch[seg_row(p, w.b, w.s, w.i) * N + n]
           : !kLocal && p.dlast ? p.dlast[(w.b * I + w.i) * N + n]
                                : 0.f;
    dA[k] = 0.f;
  }
  const float Dv = (w.valid && p.D) ? p.D[w.i] : 0.f;
  const int64_t i_e = w.i0 + int(threadIdx.x) % kChannelsPerBlock;  // the channel of each tile element
  const float bias_j = (p.delta_bias && i_e < I) ? p.delta_bias[i_e] : 0.f;
  float dD = 0.f, dbias = 0.f, sdt = 0.f;
  bool cut = false;  // the local pass: a document starts inside the segment
  const T* u = static_cast<const T*>(p.u) + w.b * p.u_sb;
  const T* delta = static_cast<const T*>(p.delta) + w.b * p.delta_sb;
  const T* z = p.z ? static_cast<const T*>(p.z) + w.b * p.z_sb : nullptr;
  const T* dy = static_cast<const T*>(p.dy) + w.b * p.dy_sb;
  const T* Bm = static_cast<const T*>(p.Bm) + w.b * L * N;
  const T* Cm = static_cast<const T*>(p.Cm) + w.b * L * N;

  T ru[PER], rd[PER], rz[PER], rg[PER], rB[PBC], rC[PBC];
  auto prefetch = [&](int64_t c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
    if constexpr (!kLocal) prefetch_tile<T, NT>(u, p.u_st, t0, len, w.i0, I, ru);
    prefetch_tile<T, NT>(delta, p.delta_st, t0, len, w.i0, I, rd);
    if (z) prefetch_tile<T, NT>(z, p.z_st, t0, len, w.i0, I, rz);
    prefetch_tile<T, NT>(dy, p.dy_st, t0, len, w.i0, I, rg);
    if constexpr (!kLocal) prefetch_rows<T, NT, NP>(Bm, N, t0, len, rB);
    prefetch_rows<T, NT, NP>(Cm, N, t0, len, rC);
  };
  prefetch(span.end - 1);
  for (int64_t c = span.end - 1; c >= span.begin; --c) {
    const int64_t t0 = c * kChunk;
    const int len = int(L - t0 < kChunk ? L - t0 : kChunk);
#pragma unroll
    for (int m = 0; m < PER; ++m) {
      const int e = w.tid + m * NT;
      const bool in = e / kChannelsPerBlock < len && i_e < I;
      float uu = 0.f, dt = 0.f, dsig = 0.f, ds = 0.f, dyg = 0.f;
      if (in) {
        const float x = to_f32(rd[m]) + bias_j;
        dt = step_size(x, p.softplus);
        const float gy = to_f32(rg[m]);
        if (z) {
          const float zz = to_f32(rz[m]), sg = sigmoid(zz);
          ds = gy * zz * sg;                         // dy * silu(z)
          dyg = gy * sg * (1.f + zz * (1.f - sg));   // dy * silu'(z)
        } else {
          ds = gy;
        }
        if constexpr (!kLocal) {
          uu = to_f32(ru[m]);
          dsig = p.softplus ? softplus_grad(x) : 1.f;
        }
      }
      dt_s[e] = dt, ds_s[e] = ds;
      if constexpr (!kLocal) u_s[e] = uu, dsig_s[e] = dsig, dyg_s[e] = dyg;
    }
    store_rows<T, NT, NP>(rC, C_s);
    if constexpr (!kLocal) store_rows<T, NT, NP>(rB, B_s);
    const unsigned rmask = reset_mask(p, w.b, t0, len);
    cut = cut || rmask != 0u;
    if (c - 1 >= span.begin) prefetch(c - 1);  // in flight during the compute below
    __syncthreads();

    if constexpr (kLocal) {
      // The adjoint alone: g_t = ds_t C_t + carry, carry = exp(dt_t A) g_t (0 at a document start).
      for (int t = len - 1; t >= 0; --t) {
        const int x = t * kChannelsPerBlock + w.j;
        const float dt = dt_s[x], ds = ds_s[x];
        float Ct[NS];
        load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
#pragma unroll
        for (int k = 0; k < NS; ++k) g[k] = decay(dt, A2[k]) * (g[k] + ds * Ct[k]);
        if (starts(rmask, t))
#pragma unroll
          for (int k = 0; k < NS; ++k) g[k] = 0.f;
        sdt += dt;
      }
    } else {
      float h0[NS];  // h at the end of the previous chunk (before the first: h0, or 0)
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        const int64_t n = w.q * NS + k;
        h0[k] = !(w.valid && n < N) ? 0.f
                : c > 0             ? p.states[((w.b * I + w.i) * n_chunks + c - 1) * N + n]
                : p.h0              ? p.h0[(w.b * I + w.i) * N + n]
                                    : 0.f;
      }
      for (int half = H - 1; half >= 0; --half) {
        const int lo = half * KH;
        if (lo >= len) continue;
        const int hi = lo + KH < len ? lo + KH : len;
        // 1. h_{lo-1}, through the steps below this half (registers only), then this half's states
        //    into hist, and the pre-gate output s_t = <h_t, C_t> + D u_t for dz.
        float h[NS], hs[NS];
#pragma unroll
        for (int k = 0; k < NS; ++k) h[k] = h0[k];
#pragma unroll kRolled
        for (int t = 0; t < lo; ++t) {
          const int x = t * kChannelsPerBlock + w.j;
          const float dt = dt_s[x], dtu = __fmul_rn(dt, u_s[x]);
          float Bt[NS];
          load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
          if (starts(rmask, t))
#pragma unroll
            for (int k = 0; k < NS; ++k) h[k] = 0.f;
#pragma unroll
          for (int k = 0; k < NS; ++k) h[k] = scan_step(decay(dt, A2[k]), h[k], dtu, Bt[k]);
        }
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          if constexpr (kStartInHist) hist[k * NT + w.tid] = h[k];
          else hs[k] = h[k];
        }
#pragma unroll kRolled
        for (int t = lo; t < hi; ++t) {
          const int x = t * kChannelsPerBlock + w.j;
          const float dt = dt_s[x], dtu = __fmul_rn(dt, u_s[x]);
          float Bt[NS], Ct[NS];
          load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
          load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
          if (starts(rmask, t))
#pragma unroll
            for (int k = 0; k < NS; ++k) h[k] = 0.f;
          float hc = 0.f;
#pragma unroll
          for (int k = 0; k < NS; ++k) {
            h[k] = scan_step(decay(dt, A2[k]), h[k], dtu, Bt[k]);
            hist[((t - lo + S0) * NS + k) * NT + w.tid] = h[k];
            hc += h[k] * Ct[k];
          }
          hc = sum_group<Q>(hc);
          if (w.q == 0) dz_s[x] = dyg_s[x] * (hc + Dv * u_s[x]);
        }
        // 2. The adjoint sweep over the half, last step first (as version 1, resets included).
#pragma unroll kRolled
        for (int t = hi - 1; t >= lo; --t) {
          const int x = t * kChannelsPerBlock + w.j;
          const float dt = dt_s[x], uu = u_s[x], ds = ds_s[x], dtu = __fmul_rn(dt, uu);
          const bool restart = starts(rmask, t);
          float Bt[NS], Ct[NS];
          load_quarter<NS>(B_s + t * NP + w.q * NS, Bt);
          load_quarter<NS>(C_s + t * NP + w.q * NS, Ct);
          float gB = 0.f, gAh = 0.f, dBv[NS], dCv[NS];
#pragma unroll
          for (int k = 0; k < NS; ++k) {
            const float gn = g[k] + ds * Ct[k];
            const float e = decay(dt, A2[k]);
            // (selects here: the branch form of version 1 spills at 16 threads a channel)
            const float hprev = restart                  ? 0.f
                                : (kStartInHist || t > lo) ? hist[((t - 1 - lo + S0) * NS + k) * NT + w.tid]
                                                           : hs[k];
            const float qv = gn * e * hprev;
            dA[k] += dt * qv;
            gAh += qv * A[k];
            gB += gn * Bt[k];
            dBv[k] = gn * dtu;
            dCv[k] = ds * hist[((t - lo + S0) * NS + k) * NT + w.tid];
            g[k] = restart ? 0.f : e * gn;
          }
          gB = sum_group<Q>(gB);
          gAh = sum_group<Q>(gAh);
          if (w.q == 0) {
            const float dd = (gAh + uu * gB) * dsig_s[x];
            du_s[x] = ds * Dv + dt * gB;
            ddelta_s[x] = dd;
            dD += ds * uu;
            dbias += dd;
          }
          bool wB, wC;
          const int fB = sum_group_channels<NS, Q>(dBv, w.lane, wB);
          const int fC = sum_group_channels<NS, Q>(dCv, w.lane, wC);
          const int64_t row = (w.b * L + t0 + t) * N;
#pragma unroll
          for (int m = 0; m < group_channel_width<NS, Q>(); ++m) {
            const int64_t nB = w.q * NS + fB + m, nC = w.q * NS + fC + m;
            if (wB && nB < N) atomicAdd(p.dB + row + nB, dBv[m]);
            if (wC && nC < N) atomicAdd(p.dC + row + nC, dCv[m]);
          }
        }
      }
    }
    __syncthreads();  // the output tiles are complete; every thread is done with the input tiles
    if constexpr (!kLocal) {
      T* du = static_cast<T*>(p.du) + w.b * L * I;
      T* ddelta = static_cast<T*>(p.ddelta) + w.b * L * I;
      T* dz = p.dz ? static_cast<T*>(p.dz) + w.b * L * I : nullptr;
#pragma unroll
      for (int m = 0; m < PER; ++m) {
        const int e = w.tid + m * NT;
        const int t = e / kChannelsPerBlock;
        if (t < len && i_e < I) {
          const int64_t o = (t0 + t) * I + i_e;
          du[o] = from_f32<T>(du_s[e]);
          ddelta[o] = from_f32<T>(ddelta_s[e]);
          if (dz) dz[o] = from_f32<T>(dz_s[e]);
        }
      }
    }
  }
  if (kLocal && p.reset && blockIdx.x == 0 && threadIdx.x == 0) seg_cut(p)[w.b * p.segments + w.s] = cut ? 1.f : 0.f;
  if (!w.valid) return;
  const int64_t r = w.b * p.segments + w.s;  // the partial row
  if constexpr (kLocal) {
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (w.q * NS + k < N) p.scratch[seg_row(p, w.b, w.s, w.i) * N + w.q * NS + k] = g[k];
    if (w.q == 0) seg_sdt(p)[seg_row(p, w.b, w.s, w.i)] = sdt;
  } else {
    // The first segment's carry out of step 0 is dLoss/dh0.
    const bool write_dh0 = p.dh0 && span.begin == 0;
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (w.q * NS + k < N) {
        p.dA_part[(r * I + w.i) * N + w.q * NS + k] = dA[k];
        if (write_dh0) p.dh0[(w.b * I + w.i) * N + w.q * NS + k] = g[k];
      }
    if (w.q == 0) {
      p.dD_part[r * I + w.i] = dD;
      p.dbias_part[r * I + w.i] = dbias;
    }
  }
}
#pragma nv_diag_default 20168

// ================================================================================================
// Launch.
Tuning g_tuning;  // set by tests and benchmarks only (not thread-safe)

cudaStream_t current_stream(const Params& p) { return c10::cuda::getCurrentCUDAStream(p.device).stream(); }

// Version 1: NS = N/4 rounded up to a power of two (N <= 64), and the input dtype.
template <typename T, int NS>
const char* launch_sequential(const Params& p, bool backward) {
  const dim3 grid(unsigned(num_channel_blocks(p.I)), unsigned(p.B));
  cudaStream_t stream = current_stream(p);
  if (!backward) return error_text(launch(forward_kernel<T, NS>, grid, kThreads, 0, stream, p));
  const size_t bytes = backward_smem_floats<NS>() * sizeof(float);
  // Above 48 KiB a kernel must ask for its dynamic shared memory explicitly.
  if (const char* err = error_text(cudaFuncSetAttribute(backward_kernel<T, NS>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes))))
    return err;
  return error_text(launch(backward_kernel<T, NS>, grid, kThreads, bytes, stream, p));
}

template <typename T>
const char* launch_ns(const Params& p, bool backward) {
  if (p.N <= 4) return launch_sequential<T, 1>(p, backward);
  if (p.N <= 8) return launch_sequential<T, 2>(p, backward);
  if (p.N <= 16) return launch_sequential<T, 4>(p, backward);
  if (p.N <= 32) return launch_sequential<T, 8>(p, backward);
  if (p.N <= kMaxState) return launch_sequential<T, 16>(p, backward);
  return "state size above kMaxState";
}

// Version 2: the (dtype, NS, Q) instantiation for p, passed to f as tag values.
template <int V> using Int = std::integral_constant<int, V>;
template <typename T, typename F>
const char* with_state_layout(const Params& p, F&& f) {
  if (p.N <= 4) return f(T{}, Int<1>{}, Int<4>{});
  if (p.N <= 8) return f(T{}, Int<2>{}, Int<4>{});
  if (p.N <= 16) return f(T{}, Int<4>{}, Int<4>{});
  if (p.N <= 32) return f(T{}, Int<4>{}, Int<8>{});
  if (p.N <= kMaxState) return f(T{}, Int<4>{}, Int<16>{});
  return "state size above kMaxState";
}
template <typename F>
const char* with_config(const Params& p, F&& f) {
  return p.dtype == DType::kBFloat16 ? with_state_layout<__nv_bfloat16>(p, f) : with_state_layout<float>(p, f);
}

// The backward kernels' dynamic shared memory, allowed above 48 KiB.
template <typename T, int NS, int Q, bool kLocal>
const char* backward_attributes(size_t& bytes) {
  bytes = seg_backward_smem_floats<NS, Q, kLocal>() * sizeof(float);
  return error_text(cudaFuncSetAttribute(seg_backward_kernel<T, NS, Q, kLocal>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <typename T, int NS, int Q>
const char* launch_segmented(const Params& p, bool backward) {
  constexpr int NT = kChannelsPerBlock * Q;
  const dim3 grid(unsigned(num_channel_blocks(p.I)), unsigned(p.B), unsigned(p.segments));
  const unsigned combine_blocks = unsigned((p.B * p.I * p.N + 255) / 256);
  cudaStream_t stream = current_stream(p);
  const char* err = nullptr;
  if (!backward) {
    if (p.segments > 1) {
      if ((err = error_text(launch(seg_forward_kernel<T, NS, Q, true>, grid, NT, 0, stream, p)))) return err;
      if ((err = error_text(launch(combine_kernel<false>, combine_blocks, 256, 0, stream, p)))) return err;
    }
    return error_text(launch(seg_forward_kernel<T, NS, Q, false>, grid, NT, 0, stream, p));
  }
  size_t bytes = 0;
  if (p.segments > 1) {
    if ((err = backward_attributes<T, NS, Q, true>(bytes))) return err;
    if ((err = error_text(launch(seg_backward_kernel<T, NS, Q, true>, grid, NT, bytes, stream, p)))) return err;
    if ((err = error_text(launch(combine_kernel<true>, combine_blocks, 256, 0, stream, p)))) return err;
  }
  if ((err = backward_attributes<T, NS, Q, false>(bytes))) return err;
  return error_text(launch(seg_backward_kernel<T, NS, Q, false>, grid, NT, bytes, stream, p));
}

// Resident blocks per SM of the full pass (the one that bounds the choice of S).
template <typename T, int NS, int Q>
const char* blocks_per_sm(bool backward, int& n) {
  constexpr int NT = kChannelsPerBlock * Q;
  if (!backward)
    return error_text(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, seg_forward_kernel<T, NS, Q, false>, NT, 0));
  size_t bytes = 0;
  if (const char* e = backward_attributes<T, NS, Q, false>(bytes)) return e;
  return error_text(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, seg_backward_kernel<T, NS, Q, false>, NT, bytes));
}

// A segment is at least this many chunks (128 steps): shorter ones would make the local and
// combine passes' scratch traffic (S N-vectors per channel) a sizeable share of the inputs'.
constexpr int64_t kMinSegmentChunks = 4;

const char* run(const Params& p, bool backward) {
  if (p.B > 65535) return "batch size above 65535 (the grid's y dimension)";
  if (p.segments < 1 || p.segments > 65535) return "segments outside [1, 65535] (plan() not called?)";
  if (p.kernel == Kernel::kSegmented && p.segments > 1 && !p.scratch) return "segmented launch without scratch";
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  if (p.kernel == Kernel::kSequential) {
    if (p.segments != 1) return "the sequential kernel takes one segment";
    return p.dtype == DType::kBFloat16 ? launch_ns<__nv_bfloat16>(p, backward) : launch_ns<float>(p, backward);
  }
  return with_config(p, [&](auto t, auto ns, auto q) {
    return launch_segmented<decltype(t), decltype(ns)::value, decltype(q)::value>(p, backward);
  });
}

// Decoding: one step of one token (StepParams), one thread per (b, i) with its N states in a loop
// (read once and written once, as the CPU step kernel; B_t and C_t are the same for the warp's
// channels: broadcast loads).
constexpr int kStepThreads = 128;
__global__ void __launch_bounds__(kStepThreads) step_kernel(const StepParams p) {
  const int64_t n = p.B * p.I;
  for (int64_t e = int64_t(blockIdx.x) * kStepThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kStepThreads) {
    const int64_t b = e / p.I, i = e % p.I;
    const float u = p.u[b * p.u_sb + i];
    const float dt = step_size(p.delta[b * p.delta_sb + i] + (p.delta_bias ? p.delta_bias[i] : 0.f), p.softplus);
    const float du = dt * u;
    const float* A = p.A + i * p.N;
    const float* Bm = p.Bm + b * p.B_sb;
    const float* Cm = p.Cm + b * p.C_sb;
    float* h = p.state + e * p.N;
    float y = 0.f;
    for (int64_t k = 0; k < p.N; ++k) {
      const float hk = expf(dt * A[k]) * h[k] + du * Bm[k];
      h[k] = hk;
      y += hk * Cm[k];
    }
    if (p.D) y += p.D[i] * u;
    if (p.z) {
      const float zz = p.z[b * p.z_sb + i];
      y *= zz * sigmoid(zz);
    }
    p.y[e] = y;
  }
}

}  // namespace

void set_tuning(const Tuning& t) { g_tuning = t; }
Tuning tuning() { return g_tuning; }

const char* plan(Params& p, bool backward) {
  p.kernel = g_tuning.kernel;
  p.segments = 1;
  if (p.kernel == Kernel::kSequential) return nullptr;
  const int64_t n_chunks = num_chunks(p.L);
  int64_t S = g_tuning.segments;
  if (S <= 0) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
    int sms = 0, per_sm = 0;
    if (const char* err = error_text(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device)))
      return err;
    if (const char* err = with_config(p, [&](auto t, auto ns, auto q) {
          return blocks_per_sm<decltype(t), decltype(ns)::value, decltype(q)::value>(backward, per_sm);
        }))
      return err;
    // Without segments the grid is B * I/16 blocks; past half the resident slots S = 1 (S > 1 costs
    // a second pass over the inputs), else about two waves of blocks.
    const int64_t blocks = p.B * num_channel_blocks(p.I), slots = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
    S = 2 * blocks >= slots ? 1 : (2 * slots + blocks - 1) / blocks;
    S = std::min<int64_t>(S, std::max<int64_t>(1, n_chunks / kMinSegmentChunks));
  }
  // No empty segment: S segments of ceil(n_chunks / S) chunks.
  S = std::max<int64_t>(1, std::min<int64_t>({S, n_chunks, 65535}));
  const int64_t per = (n_chunks + S - 1) / S;
  p.segments = int((n_chunks + per - 1) / per);
  return nullptr;
}

int64_t scratch_floats(const Params& p) {
  if (p.segments <= 1) return 0;
  return p.B * p.segments * p.I * (p.N + 1) + (p.reset ? p.B * p.segments : 0);  // (+ the segments' flags)
}
int64_t partial_rows(const Params& p) { return p.B * p.segments; }

const char* forward(const Params& p) { return run(p, false); }
const char* backward(const Params& p) { return run(p, true); }

const char* step(const StepParams& p) {
  const int64_t n = p.B * p.I;
  if (n == 0) return nullptr;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  return error_text(launch(step_kernel, cuda_kernel::grid_stride_blocks(n, kStepThreads), kStepThreads, 0, stream, p));
}

}  // namespace coil::scan_cuda
