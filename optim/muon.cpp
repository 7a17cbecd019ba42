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

at::Tensor newton_schulz_batched(const at::Tensor& stack, int steps) {
  COIL_CHECK(stack.dim() == 3, "batched Newton-Schulz needs a stack of matrices, got {} dimensions", stack.dim());
  c10::NoGradGuard no_grad;
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const auto dtype = stack.is_cuda() ? at::kBFloat16 : at::kFloat;
  at::Tensor x = stack.to(dtype);
  const bool tall = x.size(1) > x.size(2);
  if (tall) x = x.transpose(1, 2);
  x = x / (at::norm(x, 2, {1, 2}, /*keepdim=*/true) + 1e-7);  // each matrix by its own Frobenius norm
  for (int i = 0; i < steps; ++i) {
    at::Tensor A = at::bmm(x, x.transpose(1, 2));
    at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);  // b A + c A A
    x = at::baddbmm(x, B, x, /*beta=*/a);                           // a X + B X
  }
  if (tall) x = x.transpose(1, 2);
  return x.to(stack.scalar_type()).contiguous();
}

std::vector<at::Tensor> newton_schulz_many(const std::vector<at::Tensor>& updates, int steps, int64_t max_batch_numel) {
  // Groups of one shape, dtype and device, in order of first appearance.
  struct Group {
    std::vector<size_t> members;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < updates.size(); ++i) {
    const at::Tensor& u = updates[i];
    COIL_CHECK(u.dim() == 2, "Newton-Schulz needs a matrix, got {} dimensions (update {})", u.dim(), i);
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      const at::Tensor& v = updates[g.members[0]];
      return v.sizes() == u.sizes() && v.scalar_type() == u.scalar_type() && v.device() == u.device();
    });
    if (it == groups.end()) it = groups.insert(groups.end(), Group{});
    it->members.push_back(i);
  }
  std::vector<at::Tensor> out(updates.size());
  for (const Group& g : groups) {
    if (g.members.size() == 1) {
      out[g.members[0]] = newton_schulz(updates[g.members[0]], steps);
      continue;
    }
    // Batches of at most max_batch_numel elements bound the stack's extra memory.
    const int64_t numel = std::max<int64_t>(1, updates[g.members[0]].numel());
    const int64_t per_batch = std::max<int64_t>(1, max_batch_numel / numel);
    for (size_t begin = 0; begin < g.members.size(); begin += static_cast<size_t>(per_batch)) {
      const size_t end = std::min(g.members.size(), begin + static_cast<size_t>(per_batch));
      std::vector<at::Tensor> stack;
      for (size_t k = begin; k < end; ++k) {
        if (observer()) observer()(updates[g.members[k]]);
        stack.push_back(updates[g.members[k]]);
      }
      std::vector<at::Tensor> done = newton_schulz_batched(at::stack(stack), steps).unbind(0);
      for (size_t k = begin; k < end; ++k) out[g.members[k]] = done[k - begin];
    }
  }
  return out;
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
  if (reference_) return step_reference(lr);
  c10::NoGradGuard no_grad;
  ++step_;
  const double beta = config_.momentum;
  std::vector<size_t> slots;
  std::vector<at::Tensor> grads, moms;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const at::Tensor& g = slots_[i].param.grad();
    if (!g.defined()) continue;
    slots.push_back(i);
    grads.push_back(g);
    moms.push_back(slots_[i].momentum);
  }
  if (slots.empty()) return;
  // The reference's ops, each over every matrix at once.
  at::_foreach_mul_(moms, beta);
  at::_foreach_add_(moms, grads, 1 - beta);
  std::vector<at::Tensor> updates = moms;
  if (config_.nesterov) {
    updates = at::_foreach_mul(grads, 1 - beta);
    at::_foreach_add_(updates, at::_foreach_mul(moms, beta));
  }
  const std::vector<at::Tensor> ortho = orthogonalized(slots, updates, /*batched=*/true);
  // Decay, then p += -lr s O: one foreach add per distinct scale s (one per whole shape, at most).
  std::vector<at::Tensor> decayed;
  std::vector<std::pair<double, std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>>> by_alpha;
  for (size_t k = 0; k < slots.size(); ++k) {
    const Slot& s = slots_[slots[k]];
    if (s.decay) decayed.push_back(s.param);
    const double alpha = -lr * muon_scale(config_.scale, s.rows, s.cols);
    auto it = std::find_if(by_alpha.begin(), by_alpha.end(), [&](const auto& e) { return e.first == alpha; });
    if (it == by_alpha.end()) it = by_alpha.insert(by_alpha.end(), {alpha, {}});
    it->second.first.push_back(s.param);
    it->second.second.push_back(ortho[k]);
  }
  if (config_.weight_decay != 0 && !decayed.empty()) at::_foreach_mul_(decayed, 1 - lr * config_.weight_decay);
  for (auto& [alpha, lists] : by_alpha) at::_foreach_add_(lists.first, lists.second, alpha);
}

std::vector<at::Tensor> Muon::orthogonalized(const std::vector<size_t>& slots, const std::vector<at::Tensor>& updates,
                                             bool batched) const {
  if (orthogonalize_) {
    std::vector<at::Tensor> ortho = orthogonalize_(slots, updates);
    COIL_CHECK(ortho.size() == updates.size(), "the orthogonalization returned {} tensors for {}", ortho.size(),
               updates.size());
    return ortho;
  }
  if (batched) return newton_schulz_many(updates, config_.ns_steps);
  std::vector<at::Tensor> ortho;
  for (const auto& u : updates) ortho.push_back(newton_schulz(u, config_.ns_steps));
  return ortho;
}

void Muon::step_reference(double lr) {
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
  const std::vector<at::Tensor> ortho = orthogonalized(slots, updates, /*batched=*/false);
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
