#include "model/selective_scan.h"

#include <ATen/Parallel.h>
#include <fmt/ranges.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "model/scan_cpu.h"
#include "model/seq_idx.h"
#if defined(COIL_WITH_CUDA)
#include "model/scan_cuda.h"
#endif
#include "util/error.h"

namespace coil {

using torch::Tensor;

namespace {

// Applies the parts of the scan that are plain elementwise ATen ops (vectorized, and differentiated
// by autograd): the delta bias and softplus before the core, the SiLU gate after it.
Tensor prepare_delta(const Tensor& delta, const Tensor& delta_bias, bool softplus) {
  Tensor d = delta_bias.defined() ? delta + delta_bias : delta;
  return softplus ? torch::softplus(d) : d;
}
Tensor apply_gate(const Tensor& y, const Tensor& z) { return z.defined() ? y * torch::silu(z) : y; }

void check_shapes(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm,
                  const Tensor& Cm, const Tensor& D, const Tensor& z, const Tensor& delta_bias) {
  COIL_CHECK(u.dim() == 3, "selective_scan: u must be [B, L, I], got {} dims", u.dim());
  const int64_t B = u.size(0), L = u.size(1), I = u.size(2);
  COIL_CHECK(B > 0 && L > 0 && I > 0, "selective_scan: empty input (B={}, L={}, I={})", B, L, I);
  COIL_CHECK(A.dim() == 2 && A.size(0) == I, "selective_scan: A must be [I={}, N]", I);
  const int64_t N = A.size(1);
  auto same = [](const Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
    COIL_CHECK(t.sizes().equals(shape), "selective_scan: {} has shape {}, expected {}", name,
               fmt::to_string(fmt::join(t.sizes(), "x")), fmt::to_string(fmt::join(shape, "x")));
  };
  same(delta, {B, L, I}, "delta");
  same(Bm, {B, L, N}, "B");
  same(Cm, {B, L, N}, "C");
  if (D.defined()) same(D, {I}, "D");
  if (z.defined()) same(z, {B, L, I}, "z");
  if (delta_bias.defined()) same(delta_bias, {I}, "delta_bias");
  COIL_CHECK(N <= scan_cpu::kMaxState, "selective_scan: state size {} exceeds {}", N,
             scan_cpu::kMaxState);
}

void check_h0(const Tensor& h0, int64_t B, int64_t I, int64_t N) {
  if (!h0.defined()) return;
  COIL_CHECK(h0.scalar_type() == torch::kFloat || h0.scalar_type() == torch::kDouble,
             "selective_scan: h0 must be float32 or float64, got {}", c10::toString(h0.scalar_type()));
  COIL_CHECK(h0.dim() == 3 && h0.size(0) == B && h0.size(1) == I && h0.size(2) == N,
             "selective_scan: h0 has shape {}, expected {}x{}x{}", fmt::to_string(fmt::join(h0.sizes(), "x")), B, I,
             N);
}

// Channels contiguous (stride 1 on the last dim) as the kernel needs; other strides are kept.
Tensor channels_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
scan_cpu::Args<T> make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm,
                            const Tensor& Cm, const Tensor& D) {
  scan_cpu::Args<T> a{};
  a.B = u.size(0), a.L = u.size(1), a.I = u.size(2), a.N = A.size(1);
  a.u = u.data_ptr<T>(), a.u_sb = u.stride(0), a.u_st = u.stride(1);
  a.delta = delta.data_ptr<T>(), a.delta_sb = delta.stride(0), a.delta_st = delta.stride(1);
  a.A = A.data_ptr<T>(), a.Bm = Bm.data_ptr<T>(), a.Cm = Cm.data_ptr<T>();
  a.D = D.defined() ? D.data_ptr<T>() : nullptr;
  return a;
}

// The fused core: y = scan(u, dt, A, B, C) + D * u, with dt already final. Inputs are float32 or
// float64, channels contiguous, A/B/C/D contiguous. Returns {y, final state h_{L-1} [B, I, N]}
// (the state is not differentiable).
struct ScanCore : public torch::autograd::Function<ScanCore> {
  // h0 [B, I, N] (absent: zero), reset [B, L] uint8 (absent: no document boundaries).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& u, const Tensor& dt,
                        const Tensor& A, const Tensor& Bm, const Tensor& Cm, const Tensor& D,
                        const std::optional<Tensor>& h0_opt, const std::optional<Tensor>& reset_opt) {
    const Tensor h0 = h0_opt.value_or(Tensor()), reset = reset_opt.value_or(Tensor());
    const int64_t B = u.size(0), L = u.size(1), I = u.size(2), N = A.size(1);
    Tensor y = torch::empty({B, L, I}, u.options());
    Tensor states = torch::empty({B, I, scan_cpu::num_chunks(L), N}, u.options());
    const auto& k = scan_cpu::best_kernels();
    const int64_t tasks = B * scan_cpu::num_channel_blocks(I);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
      auto a = make_args<scalar_t>(u, dt, A, Bm, Cm, D);
      a.y = y.data_ptr<scalar_t>(), a.states = states.data_ptr<scalar_t>();
      a.h0 = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
      a.reset = reset.defined() ? reset.data_ptr<uint8_t>() : nullptr;
      at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) { scan_cpu::forward(k, a, b, e); });
    });
    ctx->save_for_backward({u, dt, A, Bm, Cm, D, states, h0, reset});
    Tensor last = states.select(2, states.size(2) - 1).clone();  // differentiable: chunked training
    return {y, last};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &u = s[0], &dt = s[1], &A = s[2], &Bm = s[3], &Cm = s[4], &states = s[6];
    const Tensor& D = s[5];
    const Tensor &h0 = s[7], &reset = s[8];
    const Tensor dy = grads[0].defined() ? channels_contiguous(grads[0]) : torch::zeros_like(u);
    const Tensor dlast = grads[1].defined() ? grads[1].contiguous() : Tensor();
    Tensor dh0 = h0.defined() ? torch::empty_like(h0, at::MemoryFormat::Contiguous) : Tensor();
    const int64_t B = u.size(0), L = u.size(1), I = u.size(2), N = A.size(1);
    const int64_t blocks = scan_cpu::num_channel_blocks(I);
    Tensor du = torch::empty_like(u, at::MemoryFormat::Contiguous);
    Tensor ddt = torch::empty({B, L, I}, u.options());
    Tensor dA = torch::empty({I, N}, u.options());
    Tensor dD = torch::empty({I}, u.options());
    Tensor dB_part = torch::empty({blocks, B, L, N}, u.options());
    Tensor dC_part = torch::empty({blocks, B, L, N}, u.options());
    const auto& k = scan_cpu::best_kernels();
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
      auto a = make_args<scalar_t>(u, dt, A, Bm, Cm, D);
      a.states = states.data_ptr<scalar_t>();
      a.dy = dy.data_ptr<scalar_t>(), a.dy_sb = dy.stride(0), a.dy_st = dy.stride(1);
      a.du = du.data_ptr<scalar_t>(), a.ddelta = ddt.data_ptr<scalar_t>();
      a.dA = dA.data_ptr<scalar_t>(), a.dD = dD.data_ptr<scalar_t>();
      a.dB_part = dB_part.data_ptr<scalar_t>(), a.dC_part = dC_part.data_ptr<scalar_t>();
      a.h0 = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
      a.reset = reset.defined() ? reset.data_ptr<uint8_t>() : nullptr;
      a.dlast = dlast.defined() ? dlast.data_ptr<scalar_t>() : nullptr;
      a.dh0 = dh0.defined() ? dh0.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) { scan_cpu::backward(k, a, b, e); });
    });
    // Channel blocks were summed separately; adding them in block order keeps the result
    // independent of the number of threads.
    return {du, ddt, dA, dB_part.sum(0), dC_part.sum(0), dD, dh0, Tensor()};
  }
};

#if defined(COIL_WITH_CUDA)
namespace kernels = scan_cuda;
#include "model/scan_cuda_autograd.inc"
#endif

}  // namespace

Tensor selective_scan_ref(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm,
                          const Tensor& Cm, const Tensor& D, const Tensor& z,
                          const Tensor& delta_bias, bool delta_softplus, const Tensor& seq_idx,
                          const Tensor& h0, Tensor* final_state) {
  check_shapes(u, delta, A, Bm, Cm, D, z, delta_bias);
  const int64_t L = u.size(1);
  check_seq_idx(seq_idx, u.size(0), L, "selective_scan");
  check_h0(h0, u.size(0), u.size(2), A.size(1));
  // keep[t]: 0 where a document starts (the state restarts from zero), else 1; [B, 1, 1] per t.
  const Tensor reset = reset_flags(seq_idx);
  std::vector<Tensor> keeps;
  if (reset.defined()) keeps = (1 - reset.to(u.scalar_type())).view({u.size(0), L, 1, 1}).unbind(1);
  const Tensor dt = prepare_delta(delta, delta_bias, delta_softplus);   // [B, L, I]
  const Tensor decay = torch::exp(dt.unsqueeze(-1) * A);                // [B, L, I, N]
  const Tensor drive = (dt * u).unsqueeze(-1) * Bm.unsqueeze(2);        // [B, L, I, N]
  // unbind, not select(1, t): the backward of a select would build a zero [B, L, I, N] per step.
  const auto decays = decay.unbind(1), drives = drive.unbind(1), Cs = Cm.unsqueeze(2).unbind(1);
  Tensor h = h0.defined() ? h0.to(u.scalar_type()) : torch::zeros({u.size(0), u.size(2), A.size(1)}, u.options());
  std::vector<Tensor> ys;
  ys.reserve(L);
  for (int64_t t = 0; t < L; ++t) {
    if (!keeps.empty() && t > 0) h = h * keeps[t];
    h = decays[t] * h + drives[t];
    ys.push_back((h * Cs[t]).sum(-1));  // [B, I]
  }
  if (final_state) *final_state = h;
  Tensor y = torch::stack(ys, 1);
  if (D.defined()) y = y + u * D;
  return apply_gate(y, z);
}

Tensor selective_scan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm,
                      const Tensor& Cm, const Tensor& D, const Tensor& z, const Tensor& delta_bias,
                      bool delta_softplus, Tensor* final_state, const Tensor& seq_idx, const Tensor& h0) {
  check_shapes(u, delta, A, Bm, Cm, D, z, delta_bias);
  check_seq_idx(seq_idx, u.size(0), u.size(1), "selective_scan");
  check_h0(h0, u.size(0), u.size(2), A.size(1));
  if (u.is_cuda()) {
#if defined(COIL_WITH_CUDA)
    return selective_scan_cuda(u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, final_state, seq_idx, h0);
#else
    fail("selective_scan: got a tensor on {}, but this build of Coil has no CUDA kernels (LibTorch "
         "without CUDA, or no nvcc when it was configured)", u.device().str());
#endif
  }
  COIL_CHECK(u.is_cpu(), "selective_scan: the fused kernels run on CPU or CUDA tensors, got {}", u.device().str());
  const auto dtype = u.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto prep = [&](const Tensor& t) { return t.defined() ? t.to(dtype) : t; };
  const Tensor dt = channels_contiguous(prep(prepare_delta(delta, delta_bias, delta_softplus)));
  // Autograd functions take defined tensors only: no skip is a D of zeros (its gradient unused).
  const Tensor D_or_zero = D.defined() ? prep(D).contiguous() : torch::zeros({A.size(0)}, dt.options());
  auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  auto out = ScanCore::apply(channels_contiguous(prep(u)), dt, prep(A).contiguous(),
                             prep(Bm).contiguous(), prep(Cm).contiguous(), D_or_zero,
                             opt(h0.defined() ? prep(h0).contiguous() : h0), opt(reset_flags(seq_idx)));
  if (final_state) *final_state = out[1];
  return apply_gate(out[0], z).to(u.scalar_type());
}

Tensor selective_scan_step(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                           const Tensor& D, const Tensor& z, const Tensor& delta_bias, bool delta_softplus,
                           Tensor& state) {
  COIL_CHECK(u.dim() == 2 && state.dim() == 3, "selective_scan_step: u [B, I] and state [B, I, N], got {} and {} dims",
             u.dim(), state.dim());
  const Tensor u3 = u.unsqueeze(1);
  check_shapes(u3, delta.unsqueeze(1), A, Bm.unsqueeze(1), Cm.unsqueeze(1), D, z.defined() ? z.unsqueeze(1) : z,
               delta_bias);
  const int64_t B = u.size(0), I = u.size(1), N = A.size(1);
  COIL_CHECK(state.size(0) == B && state.size(1) == I && state.size(2) == N,
             "selective_scan_step: state must be [{}, {}, {}]", B, I, N);
  c10::NoGradGuard no_grad;
  auto f32 = [](const Tensor& t) { return !t.defined() || (t.is_cpu() && t.scalar_type() == torch::kFloat); };
  const bool fused = u.is_cpu() && f32(u) && f32(delta) && f32(Bm) && f32(Cm) && f32(z) && f32(delta_bias) && f32(state);
#if defined(COIL_WITH_CUDA)
  auto cuda_f32 = [](const Tensor& t) { return !t.defined() || (t.is_cuda() && t.scalar_type() == torch::kFloat); };
  if (u.is_cuda() && cuda_f32(u) && cuda_f32(delta) && cuda_f32(Bm) && cuda_f32(Cm) && cuda_f32(z) &&
      cuda_f32(state) && state.is_contiguous())
    return selective_scan_step_cuda(u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, state);
#endif
  if (!fused) {
    // Off the fused kernels (other dtypes; CUDA in a build without its kernels): the recurrence written out.
    const Tensor dt = prepare_delta(delta, delta_bias, delta_softplus).to(state.scalar_type());
    state = torch::exp(dt.unsqueeze(-1) * A) * state + (dt * u).unsqueeze(-1) * Bm.unsqueeze(1);
    Tensor y = (state * Cm.unsqueeze(1)).sum(-1);
    if (D.defined()) y = y + D * u;
    return apply_gate(y, z).to(u.scalar_type());
  }
  // The fused kernel: one pass over the state [B, I, N], in place, with the delta bias, softplus,
  // D skip and gate.
  auto rows = [](const Tensor& t) { return !t.defined() || t.stride(1) == 1 ? t : t.contiguous(); };  // channels contiguous
  const Tensor uc = rows(u), dc = rows(delta), zc = rows(z), Bc = rows(Bm), Cc = rows(Cm);
  const Tensor Ac = A.to(torch::kFloat).contiguous();
  const Tensor Dc = D.defined() ? D.to(torch::kFloat).contiguous() : Tensor();
  const Tensor bc = delta_bias.defined() ? delta_bias.contiguous() : Tensor();
  if (!state.is_contiguous()) state = state.contiguous();
  Tensor y = torch::empty({B, I}, uc.options());
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const scan_cpu::StepArgs a{B, I, N, ptr(uc), ptr(dc), ptr(bc), ptr(Ac), ptr(Bc), ptr(Cc), ptr(Dc), ptr(zc),
                             uc.stride(0), dc.stride(0), Bc.stride(0), Cc.stride(0), zc.defined() ? zc.stride(0) : 0,
                             delta_softplus, state.data_ptr<float>(), y.data_ptr<float>()};
  const auto& k = scan_cpu::best_kernels();
  at::parallel_for(0, B * scan_cpu::num_channel_blocks(I), 1, [&](int64_t b, int64_t e) { k.step(a, b, e); });
  return y;
}

const char* selective_scan_cpu_isa() { return scan_cpu::best_kernels().isa; }

}  // namespace coil
