#include "optim/adamw.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include <fmt/ranges.h>

#include "util/error.h"

namespace coil::optim {

void AdamW::add(const std::string& name, const at::Tensor& param, bool decay) {
  slots_.push_back({name, param, at::zeros_like(param), at::zeros_like(param), decay});
}

void adamw_reference(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, double lr, double wd,
                     const AdamWConfig& c, int64_t t) {
  c10::NoGradGuard no_grad;
  m.mul_(c.beta1).add_(g, 1 - c.beta1);
  v.mul_(c.beta2).addcmul_(g, g, 1 - c.beta2);
  const double bc1 = 1 - std::pow(c.beta1, static_cast<double>(t)), bc2 = 1 - std::pow(c.beta2, static_cast<double>(t));
  if (wd != 0) p.mul_(1 - lr * wd);
  at::Tensor denom = (v / bc2).sqrt_().add_(c.eps);
  p.addcdiv_(m, denom, -lr / bc1);
}

void AdamW::step(double lr) {
  c10::NoGradGuard no_grad;
  ++step_;
  const AdamWConfig c = config_;
  const double bc1 = 1 - std::pow(c.beta1, static_cast<double>(step_));
  const double bc2 = 1 - std::pow(c.beta2, static_cast<double>(step_));
  // The fused CPU pass: every float32 tensor split into chunks, all chunks in one parallel loop.
  struct Chunk {
    float *p, *m, *v;
    const float* g;
    int64_t n;
    float decay;  // 1 - lr wd, or 1
  };
  std::vector<Chunk> chunks;
  std::vector<at::Tensor> grads;  // keeps contiguous copies alive
  constexpr int64_t kChunk = 1 << 14;
  for (Slot& s : slots_) {
    const at::Tensor& grad = s.param.grad();
    if (!grad.defined()) continue;
    const double wd = s.decay ? c.weight_decay : 0.0;
    const bool fusable = s.param.device().is_cpu() && s.param.scalar_type() == at::kFloat &&
                         grad.scalar_type() == at::kFloat && s.param.is_contiguous();
    if (!fusable) {
      adamw_reference(s.param, grad, s.exp_avg, s.exp_avg_sq, lr, wd, c, step_);
      continue;
    }
    grads.push_back(grad.contiguous());
    const int64_t n = s.param.numel();
    for (int64_t i = 0; i < n; i += kChunk)
      chunks.push_back({s.param.data_ptr<float>() + i, s.exp_avg.data_ptr<float>() + i,
                        s.exp_avg_sq.data_ptr<float>() + i, grads.back().data_ptr<float>() + i,
                        std::min(kChunk, n - i), static_cast<float>(1 - lr * wd)});
  }
  const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2), eps = static_cast<float>(c.eps);
  const float step_size = static_cast<float>(lr / bc1), inv_bc2 = static_cast<float>(1 / bc2);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Chunk& ch = chunks[static_cast<size_t>(k)];
      for (int64_t i = 0; i < ch.n; ++i) {
        const float g = ch.g[i];
        const float m = b1 * ch.m[i] + (1 - b1) * g;
        const float v = b2 * ch.v[i] + (1 - b2) * g * g;
        ch.m[i] = m;
        ch.v[i] = v;
        ch.p[i] = ch.p[i] * ch.decay - step_size * m / (std::sqrt(v * inv_bc2) + eps);
      }
    }
  });
}

std::vector<NamedTensor> AdamW::state() const {
  std::vector<NamedTensor> out;
  for (const Slot& s : slots_) {
    out.push_back({s.name + ".exp_avg", s.exp_avg});
    out.push_back({s.name + ".exp_avg_sq", s.exp_avg_sq});
  }
  return out;
}

void AdamW::load_state(const std::vector<NamedTensor>& tensors, int64_t steps) {
  c10::NoGradGuard no_grad;
  for (Slot& s : slots_) {
    for (auto [suffix, dst] : {std::pair<const char*, at::Tensor*>{".exp_avg", &s.exp_avg}, {".exp_avg_sq", &s.exp_avg_sq}}) {
      const std::string name = s.name + suffix;
      auto it = std::find_if(tensors.begin(), tensors.end(), [&](const NamedTensor& t) { return t.name == name; });
      COIL_CHECK(it != tensors.end(), "optimizer state: no {}", name);
      COIL_CHECK(it->tensor.sizes() == dst->sizes(), "optimizer state: {} has shape [{}], expected [{}]", name,
                 fmt::join(it->tensor.sizes(), ", "), fmt::join(dst->sizes(), ", "));
      dst->copy_(it->tensor);
    }
  }
  step_ = steps;
}

}  // namespace coil::optim
