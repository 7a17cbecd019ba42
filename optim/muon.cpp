#include "optim/muon.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "util/error.h"

namespace coil::optim {

namespace {
std::function<void(const at::Tensor&)>& observer() {
  static std::function<void(const at::Tensor&)> fn;
  return fn;
}
}  // namespace

void observe_newton_schulz(std::function<void(const at::Tensor&)> fn) { observer() = std::move(fn); }

at::Tensor newton_schulz(const at::Tensor& update, int steps) {
  COIL_CHECK(update.dim() == 2, "Newton-Schulz needs a matrix, got {} dimensions", update.dim());
  if (observer()) observer()(update);
  c10::NoGradGuard no_grad;
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const auto dtype = update.is_cuda() ? at::kBFloat16 : at::kFloat;
  at::Tensor x = update.to(dtype);
  const bool tall = x.size(0) > x.size(1);
  if (tall) x = x.t();
  x = x / (x.norm() + 1e-7);
  for (int i = 0; i < steps; ++i) {
    at::Tensor A = at::matmul(x, x.t());
    at::Tensor B = at::addmm(A, A, A, /*beta=*/b, /*alpha=*/c);  // b A + c A A
    x = at::addmm(x, B, x, /*beta=*/a);                           // a X + B X
  }
  if (tall) x = x.t();
  return x.to(update.scalar_type()).contiguous();
}

double muon_scale(const std::string& rule, int64_t rows, int64_t cols) {
  if (rule == "keller") return std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
  if (rule == "moonlight") return 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
  fail("unknown Muon scale rule '{}' (keller or moonlight)", rule);
}

Muon::Muon(const MuonConfig& config) : config_(config) {
  muon_scale(config.scale, 1, 1);  // validates the rule
  COIL_CHECK(config.ns_steps >= 1, "optim.muon_ns_steps must be >= 1");
}

void Muon::add(const std::string& name, const at::Tensor& param, bool decay, int64_t rows, int64_t cols) {
  COIL_CHECK(param.dim() == 2, "Muon takes matrices; {} has {} dimensions", name, param.dim());
  slots_.push_back({name, param, at::zeros_like(param), decay, rows < 0 ? param.size(0) : rows,
                    cols < 0 ? param.size(1) : cols});
}

void Muon::step(double lr) {
  c10::NoGradGuard no_grad;
  ++step_;
  const double beta = config_.momentum;
  // Momentum and the Nesterov update on every local tensor first, then all orthogonalizations
  // together (so that a sharded orthogonalization can spread the matrices over the ranks).
  std::vector<size_t> slots;
  std::vector<at::Tensor> updates;
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    const at::Tensor& g = s.param.grad();
    if (!g.defined()) continue;
    s.momentum.mul_(beta).add_(g, 1 - beta);
    slots.push_back(i);
    updates.push_back(config_.nesterov ? g * (1 - beta) + s.momentum * beta : s.momentum.clone());
  }
  std::vector<at::Tensor> ortho;
  if (orthogonalize_) {
    ortho = orthogonalize_(slots, updates);
    COIL_CHECK(ortho.size() == updates.size(), "the orthogonalization returned {} tensors for {}", ortho.size(),
               updates.size());
  } else {
    for (const auto& u : updates) ortho.push_back(newton_schulz(u, config_.ns_steps));
  }
  for (size_t k = 0; k < slots.size(); ++k) {
    Slot& s = slots_[slots[k]];
    if (s.decay && config_.weight_decay != 0) s.param.mul_(1 - lr * config_.weight_decay);
    s.param.add_(ortho[k], -lr * muon_scale(config_.scale, s.rows, s.cols));
  }
}

std::vector<NamedTensor> Muon::state() const {
  std::vector<NamedTensor> out;
  for (const Slot& s : slots_) out.push_back({s.name + ".momentum", s.momentum});
  return out;
}

void Muon::load_state(const std::vector<NamedTensor>& tensors, int64_t steps) {
  c10::NoGradGuard no_grad;
  for (Slot& s : slots_) {
    const std::string name = s.name + ".momentum";
    auto it = std::find_if(tensors.begin(), tensors.end(), [&](const NamedTensor& t) { return t.name == name; });
    COIL_CHECK(it != tensors.end(), "optimizer state: no {}", name);
    COIL_CHECK(it->tensor.sizes() == s.momentum.sizes(), "optimizer state: {} has shape [{}], expected [{}]", name,
               fmt::join(it->tensor.sizes(), ", "), fmt::join(s.momentum.sizes(), ", "));
    s.momentum.copy_(it->tensor);
  }
  step_ = steps;
}

}  // namespace coil::optim
