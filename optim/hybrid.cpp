#include "optim/hybrid.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "util/error.h"

namespace coil::optim {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

Grouping group_of(const std::string& name, int64_t dim) {
  for (const char* m : {"mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.out_proj.weight"})
    if (ends_with(name, m)) {
      COIL_CHECK(dim == 2, "{} should be a matrix, has {} dimensions", name, dim);
      return {true, true};
    }
  const bool no_decay = ends_with(name, ".bias") || ends_with(name, "A_log") || ends_with(name, ".D") ||
                        ends_with(name, "norm.weight") || ends_with(name, "norm_f.weight");
  return {false, !no_decay};
}

std::string grouping_table(const std::vector<NamedTensor>& params) {
  std::string out = fmt::format("{:<48} {:>12} {:>9} {:>13}\n", "parameter", "shape", "optimizer", "weight decay");
  for (const auto& p : params) {
    Grouping g = group_of(p.name, p.tensor.dim());
    out += fmt::format("{:<48} {:>12} {:>9} {:>13}\n", p.name, fmt::format("{}", fmt::join(p.tensor.sizes(), "x")),
                       g.muon ? "muon" : "adamw", g.decay ? "yes" : "no");
  }
  return out;
}

HybridOptimizer::HybridOptimizer(const std::vector<NamedTensor>& params, const HybridConfig& config,
                                 const std::vector<std::vector<int64_t>>& shapes)
    : config_(config), muon_(config.muon), adamw_(config.adamw) {
  COIL_CHECK(shapes.empty() || shapes.size() == params.size(), "one whole shape per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    std::vector<int64_t> shape = shapes.empty() ? p.tensor.sizes().vec() : shapes[i];
    Grouping g = group_of(p.name, static_cast<int64_t>(shape.size()));
    if (g.muon && config.use_muon)
      muon_.add(p.name, p.tensor, g.decay, shape[0], shape[1]);
    else
      adamw_.add(p.name, p.tensor, g.decay);
  }
}

void HybridOptimizer::step(double lr_muon, double lr_adamw) {
  // Under Moonlight's rule Muon's updates are scaled to AdamW's RMS and share AdamW's lr.
  muon_.step(config_.muon.scale == "moonlight" ? lr_adamw : lr_muon);
  adamw_.step(lr_adamw);
}

std::vector<NamedTensor> HybridOptimizer::state() const {
  std::vector<NamedTensor> out;
  for (auto& t : muon_.state()) out.push_back({"muon." + t.name, t.tensor});
  for (auto& t : adamw_.state()) out.push_back({"adamw." + t.name, t.tensor});
  return out;
}

void HybridOptimizer::load_state(const std::vector<NamedTensor>& tensors, int64_t steps) {
  std::vector<NamedTensor> m, a;
  for (const auto& t : tensors) {
    if (t.name.rfind("muon.", 0) == 0) m.push_back({t.name.substr(5), t.tensor});
    if (t.name.rfind("adamw.", 0) == 0) a.push_back({t.name.substr(6), t.tensor});
  }
  muon_.load_state(m, steps);
  adamw_.load_state(a, steps);
}

namespace {
std::vector<at::Tensor> defined_grads(const std::vector<NamedTensor>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params) {
    const at::Tensor& g = p.tensor.grad();
    if (!g.defined()) continue;
    COIL_CHECK(grads.empty() || g.device() == grads[0].device(), "gradient norm: {} is on {}, the others on {}",
               p.name, g.device().str(), grads[0].device().str());
    grads.push_back(g);
  }
  return grads;
}
}  // namespace

at::Tensor grad_sq_norm_tensor(const std::vector<NamedTensor>& params) {
  c10::NoGradGuard no_grad;
  const std::vector<at::Tensor> grads = defined_grads(params);
  if (grads.empty()) return at::zeros({}, at::kDouble);
  // Each gradient's 2-norm in float64, then the sum of their squares.
  return at::stack(at::_foreach_norm(grads, 2, at::kDouble)).square().sum();
}

double grad_sq_norm(const std::vector<NamedTensor>& params) { return grad_sq_norm_tensor(params).item<double>(); }

void clip_grads(const std::vector<NamedTensor>& params, double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return;
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> grads = defined_grads(params);
  if (!grads.empty()) at::_foreach_mul_(grads, max_norm / (norm + 1e-6));
}

double grad_sq_norm_reference(const std::vector<NamedTensor>& params) {
  double sum = 0;
  for (const auto& p : params) {
    const at::Tensor& g = p.tensor.grad();
    if (g.defined()) sum += g.to(at::kDouble).pow(2).sum().item<double>();
  }
  return sum;
}

void clip_grads_reference(const std::vector<NamedTensor>& params, double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return;
  c10::NoGradGuard no_grad;
  const double scale = max_norm / (norm + 1e-6);
  for (const auto& p : params) {
    at::Tensor g = p.tensor.grad();
    if (g.defined()) g.mul_(scale);
  }
}

}  // namespace coil::optim
