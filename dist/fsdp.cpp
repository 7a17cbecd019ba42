#include "dist/fsdp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>

#include "util/error.h"

namespace coil::dist {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- Layout -------------------------------------------------------------------------------------

ShardLayout::ShardLayout(std::vector<int64_t> s, int ranks) : shape(std::move(s)) {
  COIL_CHECK(!shape.empty(), "cannot shard a scalar");
  rows_per_rank = (shape[0] + ranks - 1) / ranks;
  for (size_t d = 1; d < shape.size(); ++d) row_numel *= shape[d];
}

at::Tensor ShardLayout::slice(const at::Tensor& whole, int rank) const {
  std::vector<int64_t> local_shape = shape;
  local_shape[0] = rows_per_rank;
  at::Tensor out = at::zeros(local_shape, whole.options());
  const int64_t begin = std::min<int64_t>(rank * rows_per_rank, shape[0]);
  const int64_t n = std::min<int64_t>(rows_per_rank, shape[0] - begin);
  if (n > 0) out.narrow(0, 0, n).copy_(whole.narrow(0, begin, n));
  return out;
}

at::Tensor ShardLayout::assemble(const at::Tensor& per_rank) const {
  std::vector<int64_t> padded = shape;
  padded[0] = rows_per_rank * per_rank.size(0);
  return per_rank.reshape(padded).narrow(0, 0, shape[0]);
}

// ---- Units --------------------------------------------------------------------------------------

namespace {
std::atomic<int64_t> g_gathered{0}, g_peak{0};

void count_gathered(int64_t n) {
  const int64_t now = g_gathered += n;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

// Whole weights gathered for a unit; counted while alive.
struct Gathered {
  std::vector<at::Tensor> tensors;
  int64_t numel = 0;
  Gathered() = default;
  Gathered(const Gathered&) = delete;
  Gathered(Gathered&& o) noexcept : tensors(std::move(o.tensors)), numel(o.numel) { o.numel = 0; }
  ~Gathered() { count_gathered(-numel); }
};
}  // namespace

int64_t FsdpMamba::gathered_numel() { return g_gathered.load(); }
int64_t FsdpMamba::gathered_peak() { return g_peak.load(); }
void FsdpMamba::reset_gathered_peak() { g_peak = g_gathered.load(); }

struct FsdpMamba::Unit {
  FsdpMamba* owner;
  std::vector<size_t> index;  // the unit's parameters (into params_ / layouts_)
  std::function<at::Tensor(const at::Tensor& x, const std::vector<at::Tensor>& whole)> compute;
  std::vector<at::Tensor> kept;  // reshard_after_forward = false: gathered leaves of the step
  int64_t kept_numel = 0;

  int64_t flat_numel() const {
    int64_t n = 0;
    for (size_t i : index) n += owner->layouts_[i].local_numel();
    return n;
  }

  // All-gathers the unit's shards in one collective over a flat buffer.
  Gathered gather() const {
    std::vector<at::Tensor> pieces;
    for (size_t i : index) pieces.push_back(owner->params_[i].tensor.detach().reshape({-1}));
    const at::Tensor flat = at::cat(pieces);
    const int ranks = owner->comm_->size();
    at::Tensor all = at::empty({ranks * flat.numel()}, flat.options());
    owner->comm_->all_gather(flat, all);
    all = all.view({ranks, flat.numel()});
    Gathered g;
    int64_t offset = 0;
    for (size_t i : index) {
      const ShardLayout& l = owner->layouts_[i];
      g.tensors.push_back(l.assemble(all.narrow(1, offset, l.local_numel()).contiguous()).contiguous());
      offset += l.local_numel();
      g.numel += g.tensors.back().numel();
    }
    count_gathered(g.numel);
    return g;
  }

  // Reduce-scatters whole gradients (one per parameter; undefined = zero) into local ones.
  std::vector<at::Tensor> reduce_scatter(const std::vector<at::Tensor>& whole_grads) const {
    const int ranks = owner->comm_->size();
    const int64_t n = flat_numel();
    at::Tensor send = at::zeros({ranks, n}, owner->params_[index[0]].tensor.options());
    int64_t offset = 0;
    for (size_t k = 0; k < index.size(); ++k) {
      const ShardLayout& l = owner->layouts_[index[k]];
      if (whole_grads[k].defined())
        for (int r = 0; r < ranks; ++r)
          send[r].narrow(0, offset, l.local_numel()).copy_(l.slice(whole_grads[k], r).reshape({-1}));
      offset += l.local_numel();
    }
    at::Tensor mine = at::empty({n}, send.options());
    owner->comm_->reduce_scatter(send.view({-1}), mine);
    std::vector<at::Tensor> out;
    offset = 0;
    for (size_t i : index) {
      const at::Tensor& p = owner->params_[i].tensor;
      out.push_back(mine.narrow(0, offset, owner->layouts_[i].local_numel()).view(p.sizes()));
      offset += owner->layouts_[i].local_numel();
    }
    return out;
  }
};

namespace {

// One unit as an autograd node: forward gathers, computes and frees; backward gathers again,
// recomputes the unit's forward from its saved input, and reduce-scatters the weight gradients.
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, int64_t unit, at::TensorList shards) {
    auto* u = reinterpret_cast<FsdpMamba::Unit*>(unit);
    ctx->saved_data["unit"] = unit;
    ctx->save_for_backward({x});
    Gathered whole = u->gather();
    return {u->compute(x, whole.tensors)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto* u = reinterpret_cast<FsdpMamba::Unit*>(ctx->saved_data["unit"].toInt());
    const at::Tensor x = ctx->get_saved_variables()[0];
    Gathered whole = u->gather();
    c10::AutoGradMode grad_on(true);
    std::vector<at::Tensor> inputs;
    for (auto& t : whole.tensors) inputs.push_back(t.requires_grad_(true));
    const bool dx = x.is_floating_point();
    at::Tensor xin = dx ? x.detach().requires_grad_(true) : x;
    if (dx) inputs.push_back(xin);
    at::Tensor y = u->compute(xin, whole.tensors);
    variable_list grads = torch::autograd::grad({y}, inputs, {grad_out[0]}, false, false, /*allow_unused=*/true);
    std::vector<at::Tensor> weight_grads(grads.begin(), grads.begin() + static_cast<ptrdiff_t>(u->index.size()));
    // The whole weights go before the reduce-scatter; the whole gradients and its send buffer are
    // what is alive then (counted as whole-unit memory).
    const int64_t n = whole.numel;
    y.reset();
    inputs.clear();
    whole.tensors.clear();
    count_gathered(-n);
    whole.numel = 0;
    Gathered transient;
    transient.numel = 2 * n;
    count_gathered(transient.numel);
    std::vector<at::Tensor> local = u->reduce_scatter(weight_grads);
    variable_list out{dx ? grads.back() : at::Tensor(), at::Tensor()};
    out.insert(out.end(), local.begin(), local.end());
    return out;
  }
};

}  // namespace

// ---- The model ------------------------------------------------------------------------------------

FsdpMamba::FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, bool reshard_after_forward)
    : config_(model.config()), comm_(std::move(comm)), reshard_(reshard_after_forward) {
  c10::NoGradGuard no_grad;
  for (const NamedTensor& p : model.named_parameters()) {
    layouts_.emplace_back(p.tensor.sizes().vec(), comm_->size());
    params_.push_back({p.name, layouts_.back().slice(p.tensor.detach(), comm_->rank()).requires_grad_(true)});
  }
  const size_t last = params_.size() - 1;  // norm_f
  const MambaConfig cfg = config_;
  // Units: the embedding (used by embed and by the tied head), one per block, the head.
  auto unit = [&](std::vector<size_t> index, auto compute) {
    units_.push_back(std::make_unique<Unit>(Unit{this, std::move(index), compute, {}}));
  };
  unit({0}, [](const at::Tensor& tokens, const std::vector<at::Tensor>& w) { return MambaLM::embed(w[0], tokens); });
  for (int64_t b = 0; b < config_.n_layer; ++b) {
    std::vector<size_t> index;
    for (size_t k = 0; k < 10; ++k) index.push_back(1 + static_cast<size_t>(b) * 10 + k);
    unit(index, [cfg](const at::Tensor& h, const std::vector<at::Tensor>& w) {
      return MambaLM::block(MambaLM::block_weights(w), cfg, h);
    });
  }
  unit({0, last}, [cfg](const at::Tensor& h, const std::vector<at::Tensor>& w) {
    return MambaLM::head(w[0], w[1], cfg, h);
  });
}

FsdpMamba::~FsdpMamba() = default;

std::vector<std::vector<int64_t>> FsdpMamba::whole_shapes() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& l : layouts_) out.push_back(l.shape);
  return out;
}

at::Tensor FsdpMamba::forward(const at::Tensor& tokens) {
  if (reshard_ || !c10::GradMode::is_enabled()) {
    at::Tensor h = tokens;
    for (auto& u : units_) {
      std::vector<at::Tensor> shards;
      for (size_t i : u->index) shards.push_back(params_[i].tensor);
      h = UnitFunction::apply(h, reinterpret_cast<int64_t>(u.get()), at::TensorList(shards))[0];
    }
    return h;
  }
  // ZeRO-2: every parameter gathered once per step, kept as a leaf until finish_step().
  std::vector<at::Tensor> whole(params_.size());
  for (auto& u : units_) {
    if (u->kept.empty()) {
      Gathered g = u->gather();
      for (auto& t : g.tensors) u->kept.push_back(t.requires_grad_(true));
      u->kept_numel = g.numel;  // still counted until finish_step()
      g.numel = 0;
    }
    // The tied embedding is used as gathered by the first unit that has it (its gradient is taken
    // from there in finish_step()).
    for (size_t k = 0; k < u->index.size(); ++k)
      if (!whole[u->index[k]].defined()) whole[u->index[k]] = u->kept[k];
  }
  at::Tensor h = units_.front()->compute(tokens, {whole[0]});
  for (size_t b = 1; b + 1 < units_.size(); ++b) {
    std::vector<at::Tensor> w;
    for (size_t i : units_[b]->index) w.push_back(whole[i]);
    h = units_[b]->compute(h, w);
  }
  return units_.back()->compute(h, {whole[0], whole.back()});
}

void FsdpMamba::finish_step() {
  if (reshard_) return;
  c10::NoGradGuard no_grad;
  // The embedding appears in two units; its gradient is taken once, from the first.
  std::vector<bool> done(params_.size(), false);
  for (auto& u : units_) {
    if (u->kept.empty()) continue;
    std::vector<at::Tensor> grads;
    for (size_t k = 0; k < u->index.size(); ++k) grads.push_back(done[u->index[k]] ? at::Tensor() : u->kept[k].grad());
    std::vector<at::Tensor> local = u->reduce_scatter(grads);
    for (size_t k = 0; k < u->index.size(); ++k) {
      at::Tensor p = params_[u->index[k]].tensor;
      if (done[u->index[k]]) continue;
      done[u->index[k]] = true;
      if (p.grad().defined()) p.mutable_grad().add_(local[k]);
      else p.mutable_grad() = local[k].clone();
    }
    u->kept.clear();
    count_gathered(-u->kept_numel);
    u->kept_numel = 0;
  }
}

std::vector<NamedTensor> FsdpMamba::gather_whole() const {
  c10::NoGradGuard no_grad;
  std::vector<NamedTensor> out(params_.size());
  for (size_t u = 0; u + 1 < units_.size(); ++u) {  // the head unit repeats the embedding
    Gathered g = units_[u]->gather();
    for (size_t k = 0; k < units_[u]->index.size(); ++k)
      out[units_[u]->index[k]] = {params_[units_[u]->index[k]].name, g.tensors[k]};
  }
  Gathered g = units_.back()->gather();
  out.back() = {params_.back().name, g.tensors[1]};
  return out;
}

// ---- Muon on whole matrices, each on one owner rank ---------------------------------------------

optim::Muon::Orthogonalize sharded_orthogonalize(std::shared_ptr<Comm> comm, std::vector<ShardLayout> layouts,
                                                 int ns_steps) {
  // Owners: the costliest matrices first, each to the least loaded rank (the same on every rank).
  const int ranks = comm->size();
  std::vector<int> owner(layouts.size());
  std::vector<size_t> order(layouts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto cost = [&](size_t i) {
    const double r = static_cast<double>(layouts[i].shape[0]), c = static_cast<double>(layouts[i].row_numel);
    return r * c * std::min(r, c);  // Newton-Schulz: matmuls of min x max by max
  };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost(a) > cost(b); });
  std::vector<double> load(static_cast<size_t>(ranks), 0.0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[static_cast<size_t>(r)] += cost(i);
  }
  return [comm, layouts, owner, ns_steps](const std::vector<size_t>& slots, const std::vector<at::Tensor>& updates) {
    const int me = comm->rank(), ranks = comm->size();
    // 1. Every matrix's rows go to its owner.
    std::vector<at::Tensor> whole(slots.size());
    for (size_t k = 0; k < slots.size(); ++k) {
      const ShardLayout& l = layouts[slots[k]];
      const int o = owner[slots[k]];
      at::Tensor buf = o == me ? at::empty({ranks * l.local_numel()}, updates[k].options()) : at::Tensor();
      comm->gather(updates[k].contiguous().view({-1}), buf, o);
      whole[k] = buf;
    }
    // 2. Each owner orthogonalizes its matrices, once, whole.
    for (size_t k = 0; k < slots.size(); ++k) {
      const ShardLayout& l = layouts[slots[k]];
      if (owner[slots[k]] != me) continue;
      at::Tensor m = l.assemble(whole[k].view({ranks, l.local_numel()}));
      at::Tensor o = optim::newton_schulz(m, ns_steps);
      at::Tensor padded = at::zeros({ranks * l.rows_per_rank, l.row_numel}, o.options());
      padded.narrow(0, 0, l.shape[0]).copy_(o);
      whole[k] = padded.view({-1});
    }
    // 3. Every rank gets its rows back.
    std::vector<at::Tensor> out;
    for (size_t k = 0; k < slots.size(); ++k) {
      at::Tensor mine = at::empty_like(updates[k]).contiguous();
      comm->scatter(whole[k], mine, owner[slots[k]]);
      out.push_back(mine);
    }
    return out;
  };
}

}  // namespace coil::dist
