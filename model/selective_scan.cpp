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

// 1 where a document starts at t > 0 (seq_idx changes), as uint8 [B, L]; undefined without seq_idx.
Tensor reset_flags(const Tensor& seq_idx) {
  if (!seq_idx.defined()) return Tensor();
  const int64_t L = seq_idx.size(1);
  Tensor r = torch::zeros(seq_idx.sizes(), seq_idx.options().dtype(torch::kByte));
  if (L > 1) r.narrow(1, 1, L - 1).copy_(seq_idx.narrow(1, 1, L - 1) != seq_idx.narrow(1, 0, L - 1));
  return r.contiguous();
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
// The fused CUDA kernel (scan_cuda.cu) as an autograd function: the whole scan, delta bias, softplus,
// D skip and SiLU gate included. u, delta, z, B, C share one dtype, float32 or bfloat16 (y and their
// gradients come back in it); A, D, delta_bias are float32 (and so are their gradients). D, z and
// delta_bias may be absent. h0 [B, I, N] float32 contiguous and reset [B, L] uint8 contiguous (the
// document starts, reset_flags()) may be absent too: a zero start state, one document per row.
// keep_states: store each chunk's final state for the backward pass (false when no gradient will
// be asked for). Returns {y, final state [B, I, N] float32}; the final state is differentiable
// (its gradient seeds the adjoint, for chunked training), and h0's gradient comes back.
struct ScanCuda : public torch::autograd::Function<ScanCuda> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& u,
                                                const Tensor& delta, const Tensor& A, const Tensor& Bm,
                                                const Tensor& Cm, const std::optional<Tensor>& D,
                                                const std::optional<Tensor>& z,
                                                const std::optional<Tensor>& delta_bias,
                                                const std::optional<Tensor>& h0,
                                                const std::optional<Tensor>& reset, bool softplus,
                                                bool keep_states) {
    const int64_t B = u.size(0), L = u.size(1), I = u.size(2), N = A.size(1);
    const auto f32 = u.options().dtype(torch::kFloat);
    Tensor y = torch::empty({B, L, I}, u.options());
    Tensor states = keep_states ? torch::empty({B, I, scan_cuda::num_chunks(L), N}, f32) : Tensor();
    Tensor last = torch::empty({B, I, N}, f32);
    const Tensor Dt = D.value_or(Tensor()), zt = z.value_or(Tensor()), bt = delta_bias.value_or(Tensor());
    const Tensor h0t = h0.value_or(Tensor()), rt = reset.value_or(Tensor());
    scan_cuda::Params p = make_params(u, delta, A, Bm, Cm, Dt, zt, bt, h0t, rt, softplus);
    p.y = y.data_ptr(), p.final_state = last.data_ptr<float>();
    p.states = keep_states ? states.data_ptr<float>() : nullptr;
    const Tensor scratch = plan(p, false, f32);
    if (const char* err = scan_cuda::forward(p)) fail("selective_scan: CUDA forward failed: {}", err);
    ctx->save_for_backward({u, delta, A, Bm, Cm, Dt, zt, bt, states, h0t, rt});
    ctx->saved_data["softplus"] = softplus;
    // Unused outputs bring undefined gradients (no dlast: the kernel's null pointer, not zeros).
    ctx->set_materialize_grads(false);
    return {y, last};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &u = s[0], &delta = s[1], &A = s[2], &Bm = s[3], &Cm = s[4];
    const Tensor &D = s[5], &z = s[6], &bias = s[7], &states = s[8], &h0 = s[9], &reset = s[10];
    COIL_CHECK(states.defined(), "selective_scan: backward through a CUDA scan run without gradients");
    const int64_t B = u.size(0), L = u.size(1), I = u.size(2), N = A.size(1);
    const Tensor dy = grads[0].defined() ? channels_contiguous(grads[0].to(u.scalar_type()))
                                         : torch::zeros({B, L, I}, u.options());
    const auto f32 = u.options().dtype(torch::kFloat);
    Tensor du = torch::empty({B, L, I}, u.options()), ddelta = torch::empty({B, L, I}, u.options());
    Tensor dz = z.defined() ? torch::empty({B, L, I}, u.options()) : Tensor();
    Tensor dB = torch::zeros({B, L, N}, f32), dC = torch::zeros({B, L, N}, f32);
    const Tensor dlast = grads[1].defined() ? grads[1].to(torch::kFloat).contiguous() : Tensor();
    Tensor dh0 = h0.defined() ? torch::empty({B, I, N}, f32) : Tensor();
    scan_cuda::Params p = make_params(u, delta, A, Bm, Cm, D, z, bias, h0, reset, ctx->saved_data["softplus"].toBool());
    p.dlast = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
    p.dh0 = h0.defined() ? dh0.data_ptr<float>() : nullptr;
    const Tensor scratch = plan(p, true, f32);
    // One partial row per (batch row, time segment).
    const int64_t rows = scan_cuda::partial_rows(p);
    Tensor dA_part = torch::empty({rows, I, N}, f32), dD_part = torch::empty({rows, I}, f32);
    Tensor dbias_part = torch::empty({rows, I}, f32);
    p.states = states.data_ptr<float>();
    p.dy = dy.data_ptr(), p.dy_sb = dy.stride(0), p.dy_st = dy.stride(1);
    p.du = du.data_ptr(), p.ddelta = ddelta.data_ptr(), p.dz = z.defined() ? dz.data_ptr() : nullptr;
    p.dA_part = dA_part.data_ptr<float>(), p.dD_part = dD_part.data_ptr<float>();
    p.dbias_part = dbias_part.data_ptr<float>();
    p.dB = dB.data_ptr<float>(), p.dC = dC.data_ptr<float>();
    if (const char* err = scan_cuda::backward(p)) fail("selective_scan: CUDA backward failed: {}", err);
    // dA, dD and ddelta_bias come per (batch row, segment); summing the rows here (a reduction of a
    // fixed shape, no atomics) keeps them deterministic.
    return {du,
            ddelta,
            dA_part.sum(0),
            dB.to(Bm.scalar_type()),
            dC.to(Cm.scalar_type()),
            D.defined() ? dD_part.sum(0) : Tensor(),
            dz,
            bias.defined() ? dbias_part.sum(0) : Tensor(),
            dh0,
            Tensor(),
            Tensor(),
            Tensor()};
  }

  // Picks the kernel and its time segments (scan_cuda::plan) and allocates its scratch.
  static Tensor plan(scan_cuda::Params& p, bool backward, const torch::TensorOptions& f32) {
    if (const char* err = scan_cuda::plan(p, backward)) fail("selective_scan: CUDA launch plan failed: {}", err);
    const int64_t n = scan_cuda::scratch_floats(p);
    Tensor scratch = n > 0 ? torch::empty({n}, f32) : Tensor();
    p.scratch = n > 0 ? scratch.data_ptr<float>() : nullptr;
    return scratch;
  }

  // Pointers, strides and sizes of the (already converted and laid out) inputs.
  static scan_cuda::Params make_params(const Tensor& u, const Tensor& delta, const Tensor& A,
                                       const Tensor& Bm, const Tensor& Cm, const Tensor& D,
                                       const Tensor& z, const Tensor& bias, const Tensor& h0,
                                       const Tensor& reset, bool softplus) {
    scan_cuda::Params p;
    p.device = u.device().index();
    p.dtype = u.scalar_type() == torch::kBFloat16 ? scan_cuda::DType::kBFloat16 : scan_cuda::DType::kFloat32;
    p.B = u.size(0), p.L = u.size(1), p.I = u.size(2), p.N = A.size(1);
    p.softplus = softplus;
    p.u = u.data_ptr(), p.u_sb = u.stride(0), p.u_st = u.stride(1);
    p.delta = delta.data_ptr(), p.delta_sb = delta.stride(0), p.delta_st = delta.stride(1);
    if (z.defined()) p.z = z.data_ptr(), p.z_sb = z.stride(0), p.z_st = z.stride(1);
    p.Bm = Bm.data_ptr(), p.Cm = Cm.data_ptr();
    p.A = A.data_ptr<float>();
    p.D = D.defined() ? D.data_ptr<float>() : nullptr;
    p.delta_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.h0 = h0.defined() ? h0.data_ptr<float>() : nullptr;
    p.reset = reset.defined() ? reset.data_ptr<uint8_t>() : nullptr;
    return p;
  }
};

// selective_scan on CUDA tensors: converts the inputs to what the kernel takes (see ScanCuda).
Tensor selective_scan_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm,
                           const Tensor& Cm, const Tensor& D, const Tensor& z, const Tensor& delta_bias,
                           bool delta_softplus, Tensor* final_state, const Tensor& seq_idx, const Tensor& h0) {
  for (const Tensor* t : {&delta, &A, &Bm, &Cm, &D, &z, &delta_bias, &seq_idx, &h0})
    COIL_CHECK(!t->defined() || t->device() == u.device(), "selective_scan: inputs on {} and {}",
               u.device().str(), t->device().str());
  COIL_CHECK(A.size(1) <= scan_cuda::kMaxState, "selective_scan: the CUDA kernel takes a state size up to {}, got {}",
             scan_cuda::kMaxState, A.size(1));
  const auto dtype = u.scalar_type() == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
  auto in = [&](const Tensor& t) { return t.defined() ? channels_contiguous(t.to(dtype)) : t; };
  auto param = [](const Tensor& t) { return t.defined() ? t.to(torch::kFloat).contiguous() : t; };
  auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  bool needs_grad = false;
  for (const Tensor* t : {&u, &delta, &A, &Bm, &Cm, &D, &z, &delta_bias, &h0})
    needs_grad = needs_grad || (t->defined() && t->requires_grad());
  needs_grad = needs_grad && torch::GradMode::is_enabled();
  auto out = ScanCuda::apply(in(u), in(delta), param(A), in(Bm).contiguous(), in(Cm).contiguous(),
                             opt(param(D)), opt(in(z)), opt(param(delta_bias)), opt(param(h0)),
                             opt(reset_flags(seq_idx)), delta_softplus, needs_grad);
  if (final_state) *final_state = out[1];
  return out[0].to(u.scalar_type());
}
#endif  // COIL_WITH_CUDA

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
  if (!fused) {
    // Off the fused kernel (CUDA, other dtypes): the recurrence written out.
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
