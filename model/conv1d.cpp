#include "model/conv1d.h"

#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "model/seq_idx.h"
#if defined(COIL_WITH_CUDA)
#include "model/conv1d_cuda.h"
#endif
#include "util/error.h"

namespace coil {

using torch::Tensor;

namespace {

constexpr int64_t kChannelBlock = 64;  // one task: a block of channels over all (b, t)

// All loops run innermost over channels, which are contiguous: the compiler vectorizes them.
// start [B, L] (may be null): the first position of t's document; taps at s < start read zero.
// init [B, K-1, I] (may be null: zeros): the K-1 inputs before position 0, oldest first; read by
// taps at s < 0 of positions in the row's first document (start == 0).
template <typename T>
void conv_forward(const T* x, int64_t xsb, int64_t xst, const T* wT, const T* bias, T* y, int64_t B,
                  int64_t L, int64_t I, int64_t K, int64_t i0, int64_t i1, const int64_t* start, const T* init) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) {
      T* yt = y + (b * L + t) * I;
      const int64_t lo = start ? start[b * L + t] : 0;
      for (int64_t i = i0; i < i1; ++i) yt[i] = bias ? bias[i] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = t - (K - 1) + k;
        const T* xs;
        if (s < 0) {
          if (!init || lo > 0) continue;
          xs = init + (b * (K - 1) + (K - 1 + s)) * I;
        } else {
          if (s < lo) continue;
          xs = x + b * xsb + s * xst;
        }
        const T* wk = wT + k * I;
        for (int64_t i = i0; i < i1; ++i) yt[i] += wk[i] * xs[i];
      }
    }
}

// dx[b,s,i] = sum_k w[i,k] dy[b, s + K-1-k, i];  dw[i,k] = sum_{b,t} dy[b,t,i] x[b, t-(K-1)+k, i]
// (the taps of conv_forward only: those that cross no boundary); dinit [B, K-1, I] likewise.
template <typename T>
void conv_backward(const T* x, int64_t xsb, int64_t xst, const T* wT, const T* dy, int64_t dsb,
                   int64_t dst, T* dx, T* dwT, T* dbias, int64_t B, int64_t L, int64_t I, int64_t K,
                   int64_t i0, int64_t i1, const int64_t* start, const T* init, T* dinit) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = i0; i < i1; ++i) dwT[k * I + i] = 0;
  for (int64_t i = i0; i < i1; ++i) dbias[i] = 0;
  if (dinit)
    for (int64_t r = 0; r < B * (K - 1); ++r)
      for (int64_t i = i0; i < i1; ++i) dinit[r * I + i] = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const T* dyt = dy + b * dsb + t * dst;
      T* dxt = dx + (b * L + t) * I;
      const int64_t lo = start ? start[b * L + t] : 0;
      for (int64_t i = i0; i < i1; ++i) dxt[i] = 0, dbias[i] += dyt[i];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = t - (K - 1) + k;  // dy at t reads x at s
        if (s >= lo) {
          const T* xs = x + b * xsb + s * xst;
          for (int64_t i = i0; i < i1; ++i) dwT[k * I + i] += dyt[i] * xs[i];
        } else if (s < 0 && init && lo == 0) {
          const int64_t r = b * (K - 1) + (K - 1 + s);
          const T* xs = init + r * I;
          const T* wk = wT + k * I;
          for (int64_t i = i0; i < i1; ++i) dwT[k * I + i] += dyt[i] * xs[i];
          if (dinit)
            for (int64_t i = i0; i < i1; ++i) dinit[r * I + i] += wk[i] * dyt[i];
        }
        const int64_t r = t + (K - 1) - k;  // x at t feeds dy at r
        if (r < L && (!start || start[b * L + r] <= t)) {
          const T* dyr = dy + b * dsb + r * dst;
          const T* wk = wT + k * I;
          for (int64_t i = i0; i < i1; ++i) dxt[i] += wk[i] * dyr[i];
        }
      }
    }
}

Tensor channels_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct CausalConv : public torch::autograd::Function<CausalConv> {
  // x [B, L, I] channels contiguous; wT [K, I] contiguous; bias [I] contiguous; start [B, L] int64
  // contiguous (absent: no boundaries); init [B, K-1, I] contiguous (absent: zeros).
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& wT,
                        const Tensor& bias, const std::optional<Tensor>& start_opt,
                        const std::optional<Tensor>& init_opt) {
    const Tensor start = start_opt.value_or(Tensor()), init = init_opt.value_or(Tensor());
    const int64_t B = x.size(0), L = x.size(1), I = x.size(2), K = wT.size(0);
    Tensor y = torch::empty({B, L, I}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_fwd", [&] {
      at::parallel_for(0, I, kChannelBlock, [&](int64_t i0, int64_t i1) {
        conv_forward<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wT.data_ptr<scalar_t>(),
                               bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), B, L, I, K, i0, i1,
                               start.defined() ? start.data_ptr<int64_t>() : nullptr,
                               init.defined() ? init.data_ptr<scalar_t>() : nullptr);
      });
    });
    ctx->save_for_backward({x, wT, start, init});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &wT = s[1], &start = s[2], &init = s[3];
    const Tensor dy = channels_contiguous(grads[0]);
    const int64_t B = x.size(0), L = x.size(1), I = x.size(2), K = wT.size(0);
    Tensor dx = torch::empty({B, L, I}, x.options()), dwT = torch::empty_like(wT),
           dbias = torch::empty({I}, x.options());
    Tensor dinit = init.defined() ? torch::empty({B, K - 1, I}, x.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_bwd", [&] {
      at::parallel_for(0, I, kChannelBlock, [&](int64_t i0, int64_t i1) {
        conv_backward<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wT.data_ptr<scalar_t>(),
                                dy.data_ptr<scalar_t>(), dy.stride(0), dy.stride(1), dx.data_ptr<scalar_t>(),
                                dwT.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), B, L, I, K, i0, i1,
                                start.defined() ? start.data_ptr<int64_t>() : nullptr,
                                init.defined() ? init.data_ptr<scalar_t>() : nullptr,
                                init.defined() ? dinit.data_ptr<scalar_t>() : nullptr);
      });
    });
    return {dx, dwT, dbias, Tensor(), dinit};
  }
};

#if defined(COIL_WITH_CUDA)
namespace kernels = conv_cuda;
#include "model/conv1d_cuda_autograd.inc"
#endif

// seq_idx [B, L] int32 non-decreasing (model/seq_idx.h says when the order is checked), initial_state [B, I, K-1] floating.
void check_boundaries(const Tensor& x, int64_t K, const Tensor& seq_idx, const Tensor& init) {
  const int64_t B = x.size(0), L = x.size(1), I = x.size(2);
  check_seq_idx(seq_idx, B, L, "causal_conv1d");
  if (init.defined()) {
    COIL_CHECK(at::isFloatingType(init.scalar_type()), "causal_conv1d: initial_state must be floating point, got {}",
               c10::toString(init.scalar_type()));
    COIL_CHECK(init.dim() == 3 && init.size(0) == B && init.size(1) == I && init.size(2) == K - 1,
               "causal_conv1d: initial_state has shape {}, expected [{}, {}, {}]", c10::str(init.sizes()), B, I, K - 1);
  }
}

// The first position of each position's document, [B, L] int64 (the running max of the
// positions where seq_idx changes).
Tensor document_starts(const Tensor& seq_idx) {
  const int64_t L = seq_idx.size(1);
  Tensor change = torch::zeros(seq_idx.sizes(), seq_idx.options().dtype(torch::kLong));
  if (L > 1) change.narrow(1, 1, L - 1).copy_(seq_idx.narrow(1, 1, L - 1) != seq_idx.narrow(1, 0, L - 1));
  const Tensor pos = torch::arange(L, change.options()).unsqueeze(0);
  return std::get<0>(torch::cummax(change * pos, 1)).contiguous();
}

Tensor weight_2d(const Tensor& w, int64_t I) {
  COIL_CHECK(((w.dim() == 3 && w.size(1) == 1) || w.dim() == 2) && w.size(0) == I,
             "causal_conv1d: weight must be [I={}, 1, K] or [I, K]", I);
  return w.reshape({I, w.size(-1)});
}

// One token of one row: y[i] = bias[i] + sum_{k < K-1} w[i, k] state[k, i] + w[i, K-1] x[i], then
// the state slides by one (its oldest row out, x in). Channels innermost; the restrict-qualified
// parameters (kept by not inlining) let the compiler vectorize without run-time overlap checks.
template <typename T>
__attribute__((noinline)) void conv_step_row(const T* __restrict x, T* __restrict state, const T* __restrict wT,
                                             const T* __restrict bias, T* __restrict y, int64_t I, int64_t K,
                                             bool silu) {
  for (int64_t i = 0; i < I; ++i) y[i] = bias[i] + wT[(K - 1) * I + i] * x[i];
  for (int64_t k = 0; k < K - 1; ++k)
    for (int64_t i = 0; i < I; ++i) y[i] += wT[k * I + i] * state[k * I + i];
  if (silu)
    for (int64_t i = 0; i < I; ++i) y[i] = y[i] / (T(1) + std::exp(-y[i]));
  if (K < 2) return;
  std::memmove(state, state + I, (K - 2) * I * sizeof(T));
  std::memcpy(state + (K - 2) * I, x, I * sizeof(T));
}

}  // namespace

Tensor causal_conv1d_step_ref(const Tensor& x, Tensor& state, const Tensor& w, const Tensor& bias, bool silu) {
  const int64_t I = x.size(1), K = state.size(1) + 1;
  const Tensor window = torch::cat({state, x.unsqueeze(1)}, 1);  // [B, K, I]
  state = window.narrow(1, 1, K - 1).contiguous();
  const Tensor y = (window * weight_2d(w, I).t()).sum(1) + bias;
  return silu ? torch::silu(y) : y;
}

Tensor causal_conv1d_step(const Tensor& x, Tensor& state, const Tensor& w, const Tensor& bias, bool silu) {
  COIL_CHECK(x.dim() == 2 && state.dim() == 3 && state.size(0) == x.size(0) && state.size(2) == x.size(1),
             "causal_conv1d_step: x [B, I] and state [B, K-1, I], got {} and {}", c10::str(x.sizes()),
             c10::str(state.sizes()));
  const int64_t B = x.size(0), I = x.size(1), K = state.size(1) + 1;
  COIL_CHECK(bias.defined() && bias.numel() == I, "causal_conv1d_step: bias must be [I={}]", I);
  const Tensor w2d = weight_2d(w, I);
  COIL_CHECK(w2d.size(1) == K, "causal_conv1d_step: weight has {} taps, the state {} + 1", w2d.size(1), K - 1);
  const auto t = x.scalar_type();
#if defined(COIL_WITH_CUDA)
  if (x.is_cuda() && t == torch::kFloat && state.scalar_type() == t && state.is_contiguous() &&
      K <= conv_cuda::kMaxTaps)
    return causal_conv1d_step_cuda(x, state, w2d, bias, silu);
#endif
  const bool fused = x.is_cpu() && state.is_cpu() && (t == torch::kFloat || t == torch::kDouble) &&
                     state.scalar_type() == t && state.is_contiguous();
  if (!fused) return causal_conv1d_step_ref(x, state, w, bias, silu);
  const Tensor xc = channels_contiguous(x), w2 = w2d.to(t).contiguous(), bc = bias.to(t).contiguous();
  Tensor y = torch::empty({B, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES(t, "causal_conv1d_step", [&] {
    // w transposed to [K, I] here: a plain loop over 4 x I values costs less than LibTorch's copy
    // of a transposed view (~30 us for I = 1536).
    std::vector<scalar_t> wT(K * I);
    const scalar_t* wp = w2.data_ptr<scalar_t>();
    for (int64_t i = 0; i < I; ++i)
      for (int64_t k = 0; k < K; ++k) wT[k * I + i] = wp[i * K + k];
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* sp = state.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      conv_step_row<scalar_t>(xp + b * xc.stride(0), sp + b * (K - 1) * I, wT.data(), bc.data_ptr<scalar_t>(),
                              yp + b * I, I, K, silu);
  });
  return y;
}

Tensor causal_conv1d_ref(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& seq_idx,
                         const Tensor& initial_state) {
  const int64_t B = x.size(0), L = x.size(1), I = x.size(2);
  const Tensor w2 = weight_2d(w, I);
  const int64_t K = w2.size(-1);
  if (!seq_idx.defined() && !initial_state.defined()) {
    const Tensor w3 = w2.unsqueeze(1);
    return torch::conv1d(x.transpose(1, 2), w3, bias, 1, K - 1, 1, I).narrow(2, 0, L).transpose(1, 2);
  }
  check_boundaries(x, K, seq_idx, initial_state);
  // The window written out: xp = [initial state | x] along time; tap k of position t reads
  // xp[t + k], masked to zero where it lies in another document than t.
  const Tensor head = initial_state.defined() ? initial_state.transpose(1, 2).to(x.scalar_type())
                                              : torch::zeros({B, K - 1, I}, x.options());
  const Tensor xp = torch::cat({head, x}, 1);  // [B, L + K - 1, I]
  Tensor doc;                                  // the document of every window position
  if (seq_idx.defined()) doc = torch::cat({seq_idx.narrow(1, 0, 1).expand({B, K - 1}), seq_idx}, 1);
  Tensor y = bias.view({1, 1, I}).expand({B, L, I});
  for (int64_t k = 0; k < K; ++k) {
    Tensor tap = xp.narrow(1, k, L) * w2.select(1, k);
    if (doc.defined()) tap = tap * (doc.narrow(1, k, L) == seq_idx).unsqueeze(-1).to(x.scalar_type());
    y = y + tap;
  }
  return y;
}

Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& seq_idx,
                     const Tensor& initial_state) {
  COIL_CHECK(x.dim() == 3, "causal_conv1d: x must be [B, L, I], got {} dims", x.dim());
  const int64_t I = x.size(2);
  COIL_CHECK(bias.defined() && bias.numel() == I, "causal_conv1d: bias must be [I={}]", I);
  // Not on CPU (CUDA): the library's grouped conv1d (cuDNN), in x's dtype; with boundaries or an
  // initial state, the CUDA kernel of conv1d_cuda.h (float32 arithmetic; x in float32 or bfloat16,
  // other dtypes through float32), or, in a build without it or for more than kMaxTaps taps, the
  // masked reference in LibTorch ops.
  if (!x.is_cpu()) {
    const auto t = x.scalar_type();
#if defined(COIL_WITH_CUDA)
    const int64_t K = weight_2d(w, I).size(1);
    if (x.is_cuda() && (seq_idx.defined() || initial_state.defined()) && K <= conv_cuda::kMaxTaps) {
      check_boundaries(x, K, seq_idx, initial_state);
      return causal_conv1d_cuda(x, weight_2d(w, I), bias, seq_idx, initial_state);
    }
#endif
    return causal_conv1d_ref(x, w.to(t), bias.to(t), seq_idx,
                             initial_state.defined() ? initial_state.to(t) : initial_state);
  }
  // The CPU kernel computes in float32 or float64; bfloat16 (mixed precision) goes through float32.
  if (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble)
    return causal_conv1d(x.to(torch::kFloat), w.to(torch::kFloat), bias.to(torch::kFloat), seq_idx,
                         initial_state.defined() ? initial_state.to(torch::kFloat) : initial_state)
        .to(x.scalar_type());
  const Tensor wT = weight_2d(w, I).t().contiguous().to(x.scalar_type());
  check_boundaries(x, wT.size(0), seq_idx, initial_state);
  auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  const Tensor start = seq_idx.defined() ? document_starts(seq_idx) : Tensor();
  const Tensor init = initial_state.defined()
                          ? initial_state.to(x.scalar_type()).transpose(1, 2).contiguous()  // [B, K-1, I]
                          : Tensor();
  return CausalConv::apply(channels_contiguous(x), wT, bias.to(x.scalar_type()).contiguous(), opt(start), opt(init));
}

Tensor causal_conv1d_final_state(const Tensor& x, int64_t K, const Tensor& initial_state) {
  const int64_t B = x.size(0), L = x.size(1), I = x.size(2);
  const Tensor head = initial_state.defined() ? initial_state.transpose(1, 2).to(x.scalar_type())
                                              : torch::zeros({B, K - 1, I}, x.options());
  return torch::cat({head, x}, 1).narrow(1, L, K - 1).transpose(1, 2);  // [B, I, K-1]
}

}  // namespace coil
