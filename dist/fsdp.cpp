#include "dist/fsdp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>

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

constexpr int64_t kAlign = 8;  // byte alignment of each parameter in a unit's flat buffer
int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
}  // namespace

int64_t FsdpMamba::gathered_numel() { return g_gathered.load(); }
int64_t FsdpMamba::gathered_peak() { return g_peak.load(); }
void FsdpMamba::reset_gathered_peak() { g_peak = g_gathered.load(); }

// An all-gather in flight (or done): the flat byte buffer of every rank's shards.
struct PendingGather {
  std::unique_ptr<Work> work;
  at::Tensor all;
  bool master = false;  // float32 shards as they are, not cast to the compute dtype
  Gathered counted;     // the elements it will hold, counted from the start
};

struct FsdpMamba::PendingReduce {
  size_t unit;
  std::unique_ptr<Work> work;
  at::Tensor mine;  // this rank's summed part, reduce_dtype
};

struct FsdpMamba::Unit {
  FsdpMamba* owner;
  size_t position;            // in units_ (the forward order)
  std::vector<size_t> index;  // the unit's parameters (into params_ / layouts_)
  std::function<at::Tensor(const at::Tensor& x, const std::vector<at::Tensor>& whole)> compute;
  std::vector<at::Tensor> kept;  // reshard_after_forward = false: gathered leaves of the step
  int64_t kept_numel = 0;
  std::unique_ptr<PendingGather> prefetched;

  int64_t flat_numel() const {
    int64_t n = 0;
    for (size_t i : index) n += owner->layouts_[i].local_numel();
    return n;
  }
  at::ScalarType dtype(size_t i, bool master) const {
    return master ? owner->params_[i].tensor.scalar_type() : owner->gather_dtype(i);
  }
  // Byte offset of each parameter in the flat buffer, and its size.
  std::vector<int64_t> offsets(bool master, int64_t* total) const {
    std::vector<int64_t> out;
    int64_t at = 0;
    for (size_t i : index) {
      out.push_back(at);
      at += aligned(owner->layouts_[i].local_numel() * static_cast<int64_t>(c10::elementSize(dtype(i, master))));
    }
    *total = at;
    return out;
  }

  // Queues the all-gather of the unit's shards (each cast to its gather dtype) in one collective
  // over a flat byte buffer.
  std::unique_ptr<PendingGather> start_gather(bool master) const {
    c10::NoGradGuard no_grad;
    int64_t bytes = 0;
    const std::vector<int64_t> off = offsets(master, &bytes);
    const auto bytes_opts = at::TensorOptions().dtype(at::kByte).device(owner->options_.device);
    at::Tensor flat = at::zeros({bytes}, bytes_opts);
    for (size_t k = 0; k < index.size(); ++k) {
      const at::Tensor piece = owner->params_[index[k]].tensor.detach().to(dtype(index[k], master)).contiguous().view({-1});
      flat.narrow(0, off[k], piece.numel() * static_cast<int64_t>(piece.element_size())).copy_(piece.view(at::kByte));
    }
    const int ranks = owner->comm_->size();
    auto g = std::make_unique<PendingGather>();
    g->master = master;
    g->all = at::empty({ranks * bytes}, bytes_opts);
    for (size_t i : index) g->counted.numel += c10::multiply_integers(owner->layouts_[i].shape);
    count_gathered(g->counted.numel);
    owner->stats_.all_gathers += 1;
    owner->stats_.all_gather_bytes += g->all.numel();
    if (owner->overlapping()) {
      g->work = owner->comm_->all_gather_async(flat, g->all);
    } else {
      owner->comm_->all_gather(flat, g->all);
    }
    return g;
  }

  // The whole tensors of a finished all-gather.
  Gathered finish_gather(PendingGather& g) const {
    c10::NoGradGuard no_grad;
    if (g.work) g.work->wait();
    int64_t bytes = 0;
    const std::vector<int64_t> off = offsets(g.master, &bytes);
    const int ranks = owner->comm_->size();
    const at::Tensor all = g.all.view({ranks, bytes});
    Gathered out;
    for (size_t k = 0; k < index.size(); ++k) {
      const ShardLayout& l = owner->layouts_[index[k]];
      const at::ScalarType t = dtype(index[k], g.master);
      const at::Tensor per_rank =
          all.narrow(1, off[k], l.local_numel() * static_cast<int64_t>(c10::elementSize(t))).contiguous().view(t);
      out.tensors.push_back(l.assemble(per_rank).contiguous());
    }
    std::swap(out.numel, g.counted.numel);  // the count moves over with the tensors
    return out;
  }

  // The unit's whole weights: the prefetched ones if there are, else gathered now.
  Gathered gather(bool master = false) {
    std::unique_ptr<PendingGather> g = std::move(prefetched);
    if (!g || g->master != master) g = start_gather(master);
    return finish_gather(*g);
  }
};

at::ScalarType FsdpMamba::gather_dtype(size_t i) const {
  return MambaLM::keeps_float32(params_[i].name) ? params_[i].tensor.scalar_type() : options_.compute_dtype;
}

bool FsdpMamba::overlapping() const { return options_.overlap && comm_->asynchronous(); }

void FsdpMamba::prefetch(size_t unit) {
  if (!overlapping() || unit >= units_.size() || units_[unit]->prefetched) return;
  units_[unit]->prefetched = units_[unit]->start_gather(false);
}

void FsdpMamba::drop_prefetches() {
  for (auto& u : units_)
    if (u->prefetched) {
      if (u->prefetched->work) u->prefetched->work->wait();
      u->prefetched.reset();
    }
}

void FsdpMamba::accumulate(size_t i, const at::Tensor& grad) {
  at::Tensor& p = params_[i].tensor;
  if (p.grad().defined()) p.mutable_grad().add_(grad.to(p.scalar_type()));
  else p.mutable_grad() = grad.to(p.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

// Reduce-scatters whole gradients (one per parameter of the unit; undefined = zero), cast to
// reduce_dtype, into this rank's part; queued when overlapping, else accumulated at once.
void FsdpMamba::reduce_scatter(size_t unit, const std::vector<at::Tensor>& whole_grads) {
  c10::NoGradGuard no_grad;
  const Unit& u = *units_[unit];
  const int ranks = comm_->size();
  const int64_t n = u.flat_numel();
  at::Tensor send = at::zeros({ranks, n}, at::TensorOptions().dtype(options_.reduce_dtype).device(options_.device));
  int64_t offset = 0;
  for (size_t k = 0; k < u.index.size(); ++k) {
    const ShardLayout& l = layouts_[u.index[k]];
    if (whole_grads[k].defined()) {
      // [rows, ...] padded to ranks * rows_per_rank rows, then rank r's rows go to send[r].
      at::Tensor g = whole_grads[k].reshape({l.shape[0], l.row_numel});
      const int64_t pad = ranks * l.rows_per_rank - l.shape[0];
      if (pad > 0) g = at::cat({g, at::zeros({pad, l.row_numel}, g.options())});
      send.narrow(1, offset, l.local_numel()).copy_(g.reshape({ranks, l.local_numel()}));
    }
    offset += l.local_numel();
  }
  auto r = std::make_unique<PendingReduce>();
  r->unit = unit;
  r->mine = at::empty({n}, send.options());
  stats_.reduce_scatters += 1;
  stats_.reduce_scatter_bytes += send.numel() * static_cast<int64_t>(send.element_size());
  if (overlapping()) {
    r->work = comm_->reduce_scatter_async(send.view({-1}), r->mine);
    reduces_.push_back(std::move(r));
    return;
  }
  comm_->reduce_scatter(send.view({-1}), r->mine);
  reduces_.push_back(std::move(r));
  finish_reduces();
}

void FsdpMamba::finish_reduces() {
  c10::NoGradGuard no_grad;
  while (!reduces_.empty()) {
    std::unique_ptr<PendingReduce> r = std::move(reduces_.front());
    reduces_.pop_front();
    if (r->work) r->work->wait();
    int64_t offset = 0;
    for (size_t i : units_[r->unit]->index) {
      const int64_t n = layouts_[i].local_numel();
      accumulate(i, r->mine.narrow(0, offset, n).view(params_[i].tensor.sizes()));
      offset += n;
    }
  }
}

namespace {

// One unit as an autograd node: forward gathers, computes and frees; backward gathers again,
// recomputes the unit's forward from its saved input, and reduce-scatters the weight gradients
// into the shards' .grad itself (the node returns no gradient for the shards).
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, int64_t unit, at::TensorList shards) {
    auto* u = reinterpret_cast<FsdpMamba::Unit*>(unit);
    ctx->saved_data["unit"] = unit;
    ctx->save_for_backward({x});
    Gathered whole = u->gather();
    u->owner->prefetch(u->position + 1);  // runs while this unit computes
    return {u->compute(x, whole.tensors)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto* u = reinterpret_cast<FsdpMamba::Unit*>(ctx->saved_data["unit"].toInt());
    FsdpMamba& owner = *u->owner;
    const at::Tensor x = ctx->get_saved_variables()[0];
    Gathered whole = u->gather();
    if (u->position > 0) owner.prefetch(u->position - 1);  // the unit whose backward comes next
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
    // The reduce-scatter of the unit after this one has run beside this unit's backward: finish
    // it, then queue this unit's (finished by the next unit's backward, or at the end).
    owner.finish_reduces();
    owner.reduce_scatter(u->position, weight_grads);
    owner.finish_reduces_when_backward_ends();
    variable_list out{dx ? grads.back() : at::Tensor(), at::Tensor()};
    out.resize(out.size() + u->index.size());  // no gradient for the shards: accumulated above
    return out;
  }
};

}  // namespace

// ---- The model ------------------------------------------------------------------------------------

namespace {
FsdpOptions with_reshard(bool reshard) {
  FsdpOptions o;
  o.reshard_after_forward = reshard;
  return o;
}
}  // namespace

FsdpMamba::FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, bool reshard_after_forward)
    : FsdpMamba(model, std::move(comm), with_reshard(reshard_after_forward)) {}

FsdpMamba::FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, const FsdpOptions& options)
    : config_(model.config()), comm_(std::move(comm)), options_(options) {
  COIL_CHECK(options.compute_dtype == at::kFloat || options.compute_dtype == at::kBFloat16 || options.compute_dtype == at::kHalf,
             "FSDP: the compute dtype must be float32, bfloat16 or float16, not {}", c10::toString(options.compute_dtype));
  COIL_CHECK(options.reduce_dtype == at::kFloat || options.reduce_dtype == at::kBFloat16,
             "FSDP: the reduce dtype must be float32 or bfloat16, not {}", c10::toString(options.reduce_dtype));
  c10::NoGradGuard no_grad;
  for (const NamedTensor& p : model.named_parameters()) {
    layouts_.emplace_back(p.tensor.sizes().vec(), comm_->size());
    at::Tensor shard = layouts_.back().slice(p.tensor.detach(), comm_->rank()).to(options.device, at::kFloat);
    params_.push_back({p.name, shard.requires_grad_(true)});
  }
  const size_t last = params_.size() - 1;  // norm_f
  const MambaConfig cfg = config_;
  // Units: the embedding (used by embed and by the tied head), one per block, the head.
  auto unit = [&](std::vector<size_t> index, auto compute) {
    units_.push_back(std::make_unique<Unit>(Unit{this, units_.size(), std::move(index), compute, {}, 0, nullptr}));
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

FsdpMamba::~FsdpMamba() {
  try {
    drop_prefetches();
    for (auto& r : reduces_)
      if (r->work) r->work->wait();
  } catch (...) {
  }
}

void FsdpMamba::finish_reduces_when_backward_ends() {
  if (reduces_.empty() || flush_queued_) return;
  flush_queued_ = true;
  torch::autograd::Engine::get_default_engine().queue_callback([this] {
    flush_queued_ = false;
    finish_reduces();
  });
}

std::vector<std::vector<int64_t>> FsdpMamba::whole_shapes() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& l : layouts_) out.push_back(l.shape);
  return out;
}

at::Tensor FsdpMamba::forward(const at::Tensor& tokens) {
  drop_prefetches();  // none are left as a rule; one left by an error would hold stale weights
  finish_reduces();
  if (options_.reshard_after_forward || !c10::GradMode::is_enabled()) {
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
  finish_reduces();
  if (options_.reshard_after_forward) return;
  c10::NoGradGuard no_grad;
  // The embedding appears in two units; its gradient is taken once, from the first (the head
  // unit's copy of it is another leaf with no gradient). When overlapping, every unit's
  // reduce-scatter is queued before the first is waited for.
  std::vector<bool> done(params_.size(), false);
  for (auto& u : units_) {
    if (u->kept.empty()) continue;
    std::vector<at::Tensor> grads;
    for (size_t k = 0; k < u->index.size(); ++k) {
      grads.push_back(done[u->index[k]] ? at::Tensor() : u->kept[k].grad());
      done[u->index[k]] = true;
    }
    reduce_scatter(u->position, grads);
    u->kept.clear();
    count_gathered(-u->kept_numel);
    u->kept_numel = 0;
  }
  finish_reduces();
}

std::vector<NamedTensor> FsdpMamba::gather_whole() {
  c10::NoGradGuard no_grad;
  std::vector<NamedTensor> out(params_.size());
  for (size_t u = 0; u + 1 < units_.size(); ++u) {  // the head unit repeats the embedding
    Gathered g = units_[u]->gather(/*master=*/true);
    for (size_t k = 0; k < units_[u]->index.size(); ++k)
      out[units_[u]->index[k]] = {params_[units_[u]->index[k]].name, g.tensors[k]};
  }
  Gathered g = units_.back()->gather(/*master=*/true);
  out.back() = {params_.back().name, g.tensors[1]};
  return out;
}

}  // namespace coil::dist
