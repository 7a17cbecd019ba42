#include "model/head_loss.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "util/error.h"

namespace coil {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Sums {
  at::Tensor loss;  // scalar, in the accumulation dtype
  at::Tensor gx;    // [T, H] in the accumulation dtype, undefined unless asked for
  at::Tensor gW;    // [V, H] likewise
};

// The pass over the rows, chunk by chunk; the gradients are those of the plain sum.
Sums pass(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets, int64_t chunk, bool want_x,
          bool want_W) {
  c10::NoGradGuard no_grad;
  const int64_t T = x.size(0), V = W.size(0);
  const at::ScalarType acc = at::promote_types(x.scalar_type(), at::kFloat);
  const auto opts = x.options().dtype(acc);
  if (chunk <= 0) chunk = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(V, 1));
  Sums s{at::zeros({}, opts), want_x ? at::empty({T, x.size(1)}, opts) : at::Tensor(),
         want_W ? at::zeros(W.sizes(), opts) : at::Tensor()};
  const at::Tensor Wt = W.t();
  for (int64_t r = 0; r < T; r += chunk) {
    const int64_t n = std::min(chunk, T - r);
    const at::Tensor xc = x.narrow(0, r, n), tc = targets.narrow(0, r, n);
    at::Tensor logits = at::mm(xc, Wt).to(acc);  // [n, V], a fresh tensor: changed in place below
    const at::Tensor lse = at::logsumexp(logits, {1});
    const at::Tensor valid = tc.ne(-100);
    const at::Tensor col = tc.clamp_min(0).unsqueeze(1);  // a row that does not count reads column 0
    s.loss.add_(at::where(valid, lse - logits.gather(1, col).squeeze(1), 0).sum());
    if (!want_x && !want_W) continue;
    // d(lse - logit[target]) / d logits = softmax - one_hot(target); zero for rows that do not count.
    const at::Tensor keep = valid.to(acc).unsqueeze(1);
    logits.sub_(lse.unsqueeze(1)).exp_();
    logits.scatter_add_(1, col, keep.neg());
    logits.mul_(keep);
    const at::Tensor g = logits.to(W.scalar_type());
    // In the accumulation dtype the products write into the sums (no [V, H] temporary per chunk);
    // 16-bit products are widened as they are added.
    const bool same = W.scalar_type() == acc;
    if (want_x) {
      at::Tensor out = s.gx.narrow(0, r, n);
      same ? (void)at::mm_out(out, g, W) : (void)out.copy_(at::mm(g, W));
    }
    if (want_W) same ? (void)s.gW.addmm_(g.t(), xc) : (void)s.gW.add_(at::mm(g.t(), xc));
  }
  return s;
}

// skip: rows that do not count (an SFT prompt, a packed row's padding) are left out of the
// products (their input gradient is zero); else pass() masks them.
Sums compact_pass(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets, int64_t chunk, bool want_x,
                  bool want_W, bool skip) {
  if (!skip) return pass(x, W, targets, chunk, want_x, want_W);
  const at::Tensor rows = targets.ne(-100).nonzero().squeeze(1);
  if (rows.size(0) == targets.size(0)) return pass(x, W, targets, chunk, want_x, want_W);
  Sums s = pass(x.index_select(0, rows), W, targets.index_select(0, rows), chunk, want_x, want_W);
  if (want_x) s.gx = at::zeros({x.size(0), x.size(1)}, s.gx.options()).index_copy_(0, rows, s.gx);
  return s;
}

struct FusedLinearCrossEntropy : public torch::autograd::Function<FusedLinearCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets,
                            int64_t chunk, bool want_x, bool want_W, bool skip) {
    Sums s = compact_pass(x, W, targets, chunk, want_x, want_W, skip);
    ctx->saved_data["gx"] = s.gx;
    ctx->saved_data["gW"] = s.gW;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["W_dtype"] = W.scalar_type();
    return s.loss;
  }

  // The stored gradients are scaled in place (no second [V, H] copy), so backward runs once.
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    COIL_CHECK(!ctx->saved_data.count("used"),
               "fused_linear_cross_entropy: its backward ran twice (retain_graph), which it does not support");
    ctx->saved_data["used"] = true;
    const at::Tensor g = grad_out[0];
    auto scaled = [&](const char* name, const char* dtype) {
      at::Tensor t = ctx->saved_data[name].toTensor();
      ctx->saved_data[name] = at::Tensor();
      return t.defined() ? t.mul_(g).to(ctx->saved_data[dtype].toScalarType()) : at::Tensor();
    };
    return {scaled("gx", "x_dtype"), scaled("gW", "W_dtype"), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets) {
  COIL_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1),
             "fused_linear_cross_entropy: x must be [T, H] and W [V, H], got x {} and W {}", c10::str(x.sizes()), c10::str(W.sizes()));
  COIL_CHECK(x.scalar_type() == W.scalar_type(), "fused_linear_cross_entropy: x is {} but W is {}",
             c10::toString(x.scalar_type()), c10::toString(W.scalar_type()));
  COIL_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0) && targets.scalar_type() == at::kLong,
             "fused_linear_cross_entropy: targets must be [T] = [{}] int64, got {} {}", x.size(0), c10::str(targets.sizes()),
             c10::toString(targets.scalar_type()));
  COIL_CHECK(x.device() == W.device() && targets.device() == x.device(),
             "fused_linear_cross_entropy: x, W and targets must be on one device");
}

}  // namespace

at::Tensor fused_linear_cross_entropy(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets,
                                      int64_t chunk, std::optional<bool> skip_uncounted) {
  check(x, W, targets);
  const bool skip = skip_uncounted.value_or(!x.is_cuda());
  const bool grad = c10::GradMode::is_enabled();
  const bool want_x = grad && x.requires_grad(), want_W = grad && W.requires_grad();
  if (!want_x && !want_W) return compact_pass(x, W, targets, chunk, false, false, skip).loss;
  return FusedLinearCrossEntropy::apply(x, W, targets, chunk, want_x, want_W, skip);
}

at::Tensor linear_cross_entropy_ref(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets) {
  const at::Tensor logits = at::linear(x, W);
  return at::cross_entropy_loss(logits.to(at::promote_types(logits.scalar_type(), at::kFloat)), targets, {},
                                at::Reduction::Sum, -100);
}

}  // namespace coil
