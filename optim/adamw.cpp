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

namespace {
// The fused CPU pass: every float32 tensor split into chunks, all chunks in one parallel loop.
void adamw_cpu_fused(AdamWLists& l, double lr, const AdamWConfig& c, int64_t t) {
  const double bc1 = 1 - std::pow(c.beta1, static_cast<double>(t));
  const double bc2 = 1 - std::pow(c.beta2, static_cast<double>(t));
  struct Chunk {
    float *p, *m, *v;
    const float* g;
    int64_t n;
    float decay;  // 1 - lr wd, or 1
  };
  std::vector<Chunk> chunks;
  constexpr int64_t kChunk = 1 << 14;
  for (size_t k = 0; k < l.params.size(); ++k) {
    l.grads[k] = l.grads[k].contiguous();  // keeps a contiguous copy alive (usually the grad itself)
    const int64_t n = l.params[k].numel();
    for (int64_t i = 0; i < n; i += kChunk)
      chunks.push_back({l.params[k].data_ptr<float>() + i, l.exp_avgs[k].data_ptr<float>() + i,
                        l.exp_avg_sqs[k].data_ptr<float>() + i, l.grads[k].data_ptr<float>() + i,
                        std::min(kChunk, n - i), static_cast<float>(1 - lr * l.weight_decays[k])});
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

void push(AdamWLists& l, const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
          double wd) {
  l.params.push_back(p);
  l.grads.push_back(g);
  l.exp_avgs.push_back(m);
  l.exp_avg_sqs.push_back(v);
  l.weight_decays.push_back(wd);
}

void check_lists(const AdamWLists& l, const char* where) {
  const size_t n = l.params.size();
  COIL_CHECK(l.grads.size() == n && l.exp_avgs.size() == n && l.exp_avg_sqs.size() == n && l.weight_decays.size() == n,
             "{}: {} params but {} grads, {} exp_avgs, {} exp_avg_sqs, {} weight decays", where, n, l.grads.size(),
             l.exp_avgs.size(), l.exp_avg_sqs.size(), l.weight_decays.size());
}

bool torch_fusable(const at::Tensor& p, const at::Tensor& g) {
  return at::isFloatingType(p.scalar_type()) && g.scalar_type() == p.scalar_type() && g.device() == p.device() &&
         p.is_contiguous() && g.is_contiguous() && p.layout() == at::kStrided && g.layout() == at::kStrided;
}
}  // namespace

void adamw_foreach(AdamWLists& l, double lr, const AdamWConfig& c, int64_t t) {
  check_lists(l, "adamw_foreach");
  if (l.params.empty()) return;
  const double bc1 = 1 - std::pow(c.beta1, static_cast<double>(t)), bc2 = 1 - std::pow(c.beta2, static_cast<double>(t));
  at::_foreach_mul_(l.exp_avgs, c.beta1);
  at::_foreach_add_(l.exp_avgs, l.grads, 1 - c.beta1);
  at::_foreach_mul_(l.exp_avg_sqs, c.beta2);
  at::_foreach_addcmul_(l.exp_avg_sqs, l.grads, l.grads, 1 - c.beta2);
  std::vector<at::Tensor> decayed;
  std::vector<at::Scalar> factors;
  for (size_t k = 0; k < l.params.size(); ++k)
    if (l.weight_decays[k] != 0) decayed.push_back(l.params[k]), factors.emplace_back(1 - lr * l.weight_decays[k]);
  if (!decayed.empty()) at::_foreach_mul_(decayed, factors);
  std::vector<at::Tensor> denom = at::_foreach_div(l.exp_avg_sqs, bc2);
  at::_foreach_sqrt_(denom);
  at::_foreach_add_(denom, c.eps);
  at::_foreach_addcdiv_(l.params, l.exp_avgs, denom, -lr / bc1);
}

void adamw_torch_fused(AdamWLists& l, double lr, const AdamWConfig& c, int64_t t) {
  // Groups of one device, dtype and weight decay (the kernel takes one of each).
  struct Group {
    c10::Device device;
    at::ScalarType dtype;
    double wd;
    AdamWLists lists;
  };
  check_lists(l, "adamw_torch_fused");
  std::vector<Group> groups;
  for (size_t k = 0; k < l.params.size(); ++k) {
    const at::Tensor& p = l.params[k];
    COIL_CHECK(torch_fusable(p, l.grads[k]), "adamw_torch_fused: tensor {} is not fusable ({} {}, grad {} {})", k,
               c10::toString(p.scalar_type()), p.device().str(), c10::toString(l.grads[k].scalar_type()),
               l.grads[k].device().str());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.device == p.device() && g.dtype == p.scalar_type() && g.wd == l.weight_decays[k];
    });
    if (it == groups.end())
      it = groups.insert(groups.end(), Group{p.device(), p.scalar_type(), l.weight_decays[k], {}});
    push(it->lists, p, l.grads[k], l.exp_avgs[k], l.exp_avg_sqs[k], l.weight_decays[k]);
  }
  for (Group& g : groups) {
    // The kernel reads the step from a float tensor per parameter (it only reads them: one will do).
    const at::Tensor step =
        at::full({}, static_cast<double>(t), at::TensorOptions().dtype(at::kFloat).device(g.device));
    const std::vector<at::Tensor> steps(g.lists.params.size(), step);
    at::_fused_adamw_(g.lists.params, g.lists.grads, g.lists.exp_avgs, g.lists.exp_avg_sqs, /*max_exp_avg_sqs=*/{},
                      steps, lr, c.beta1, c.beta2, g.wd, c.eps, /*amsgrad=*/false, /*maximize=*/false);
  }
}

void AdamW::step(double lr) {
  c10::NoGradGuard no_grad;
  ++step_;
  AdamWLists own, fused, foreach_;
  for (Slot& s : slots_) {
    const at::Tensor& grad = s.param.grad();
    if (!grad.defined()) continue;
    const double wd = s.decay ? config_.weight_decay : 0.0;
    AdamWLists* to = &foreach_;
    switch (kernel_) {
      case AdamWKernel::reference:
        adamw_reference(s.param, grad, s.exp_avg, s.exp_avg_sq, lr, wd, config_, step_);
        continue;
      case AdamWKernel::foreach: break;
      case AdamWKernel::torch_fused:  // what it cannot take goes through the foreach ops
        if (torch_fusable(s.param, grad)) to = &fused;
        break;
      case AdamWKernel::automatic:
        if (s.param.device().is_cpu() && s.param.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat &&
            s.param.is_contiguous())
          to = &own;
        else if (s.param.is_cuda() && torch_fusable(s.param, grad))
          to = &fused;
        break;
    }
    push(*to, s.param, grad, s.exp_avg, s.exp_avg_sq, wd);
  }
  if (!own.params.empty()) adamw_cpu_fused(own, lr, config_, step_);
  if (!fused.params.empty()) adamw_torch_fused(fused, lr, config_, step_);
  adamw_foreach(foreach_, lr, config_, step_);
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
