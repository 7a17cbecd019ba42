#include "dist/fsdp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>

#include <atomic>

#include <ATen/core/ivalue.h>
#include <c10/core/StorageImpl.h>

#include "model/seq_idx.h"
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

constexpr int64_t kAlign = 8;  // byte alignment of each parameter in a unit's flat buffer
int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// A tensor's storage emptied (0 bytes) and allocated again by the allocator it came from (CPU or
// CUDA caching). The TensorImpls on it stay, so autograd's saved tensors keep pointing at it: what
// is written there before their backward is what backward reads. The version counter is not
// touched (nothing is modified through autograd), so the saved tensors pass its check.
void free_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  s->set_data_ptr_noswap(at::DataPtr(nullptr, s->device()));
  s->set_nbytes(0);
}

void allocate_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  s->set_data_ptr_noswap(s->allocator()->allocate(bytes));
  s->set_nbytes(bytes);
}

// The whole tensor from every rank's rows (per_rank [ranks, rows_per_rank x row_numel]), padding
// dropped, written into `whole` (contiguous): at most two copies.
void assemble_into(const ShardLayout& l, const at::Tensor& per_rank, const at::Tensor& whole) {
  const int64_t ranks = per_rank.size(0), k = l.rows_per_rank, rows = l.shape[0], rn = l.row_numel;
  const at::Tensor out = whole.view({rows, rn});
  const int64_t full = std::min(ranks, rows / k);  // ranks whose rows are all real
  if (full > 0) out.narrow(0, 0, full * k).view({full, k * rn}).copy_(per_rank.narrow(0, 0, full));
  const int64_t rest = rows - full * k;
  if (rest > 0) out.narrow(0, full * k, rest).view({rest * rn}).copy_(per_rank[full].narrow(0, 0, rest * rn));
}
}  // namespace

int64_t FsdpMamba::gathered_numel() { return g_gathered.load(); }
int64_t FsdpMamba::gathered_peak() { return g_peak.load(); }
void FsdpMamba::reset_gathered_peak() { g_peak = g_gathered.load(); }

// A unit's whole weights for one forward and its backward (ZeRO-2: for a step), one storage per
// tensor. release() frees the bytes and keeps the tensors; the next gather_into() fills the same
// storage again. Counted (gathered_numel) while resident. Held by the unit's autograd node and by
// its pre-backward hook (an IValue capsule), so it lives as long as the graph does.
struct FsdpMamba::WholeWeights : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors;
  int64_t numel = 0;
  bool resident = false;
  void release() {
    if (!resident) return;
    for (auto& t : tensors) free_storage(t);
    count_gathered(-numel);
    resident = false;
  }
  ~WholeWeights() override {
    if (resident) count_gathered(-numel);
  }
};

// An all-gather in flight (or done): the flat byte buffer of every rank's shards.
struct PendingGather {
  std::unique_ptr<Work> work;
  at::Tensor all;
  bool master = false;  // float32 shards as they are, not cast to the compute dtype
  int64_t numel = 0;    // the whole elements it will give, counted from the start
  PendingGather() = default;
  PendingGather(const PendingGather&) = delete;
  ~PendingGather() { count_gathered(-numel); }
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
  // x: the unit's input; seq_idx: the forward's document numbers (undefined: none; the blocks read it).
  std::function<at::Tensor(const at::Tensor& x, const std::vector<at::Tensor>& whole, const at::Tensor& seq_idx)> compute;
  bool block = false;                          // a Mamba block: activation checkpointing applies
  // Whether its backward reads the weights: the embedding's does not (its gradient needs only the
  // token ids and the row count), so it is not gathered again for backward.
  bool weights_in_backward = true;
  c10::intrusive_ptr<WholeWeights> kept;       // reshard_after_forward = false: the step's weights
  std::unique_ptr<PendingGather> prefetched;

  // The unit's function, counted (FsdpStats::unit_forwards).
  at::Tensor run(const at::Tensor& x, const std::vector<at::Tensor>& whole, const at::Tensor& seq_idx) const {
    auto& n = owner->stats_.unit_forwards;
    if (n.size() < owner->units_.size()) n.resize(owner->units_.size(), 0);
    n[position] += 1;
    return compute(x, whole, seq_idx);
  }

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
    for (size_t i : index) g->numel += c10::multiply_integers(owner->layouts_[i].shape);
    count_gathered(g->numel);
    owner->stats_.all_gathers += 1;
    owner->stats_.all_gather_bytes += g->all.numel();
    if (owner->overlapping()) {
      g->work = owner->comm_->all_gather_async(flat, g->all);
    } else {
      owner->comm_->all_gather(flat, g->all);
    }
    return g;
  }

  // Fills `w` with the unit's whole weights, the prefetched ones if there are, else gathered now:
  // into new tensors the first time, into the same storage after a release().
  void gather_into(WholeWeights& w, bool master = false) {
    c10::NoGradGuard no_grad;
    COIL_CHECK(!w.resident, "FSDP: unit {}'s whole weights are gathered already", position);
    std::unique_ptr<PendingGather> g = std::move(prefetched);
    if (!g || g->master != master) g = start_gather(master);
    if (g->work) g->work->wait();
    int64_t bytes = 0;
    const std::vector<int64_t> off = offsets(g->master, &bytes);
    const int ranks = owner->comm_->size();
    const at::Tensor all = g->all.view({ranks, bytes});
    const bool fresh = w.tensors.empty();
    for (size_t k = 0; k < index.size(); ++k) {
      const ShardLayout& l = owner->layouts_[index[k]];
      const at::ScalarType t = dtype(index[k], g->master);
      const at::Tensor per_rank = all.narrow(1, off[k], l.local_numel() * static_cast<int64_t>(c10::elementSize(t))).view(t);
      if (fresh) w.tensors.push_back(at::empty(l.shape, all.options().dtype(t)));
      else allocate_storage(w.tensors[k]);
      // Written through a handle of its own: the tensors' version counter stays as autograd saw it.
      const at::Tensor& dst = w.tensors[k];
      assemble_into(l, per_rank, at::from_blob(dst.data_ptr(), dst.sizes(), dst.options()));
    }
    std::swap(w.numel, g->numel);  // the count moves over with the tensors
    g->numel = 0;
    w.resident = true;
  }
};

at::ScalarType FsdpMamba::gather_dtype(size_t i) const {
  return MambaLM::keeps_float32(params_[i].name) ? params_[i].tensor.scalar_type() : options_.compute_dtype;
}

bool FsdpMamba::overlapping() const { return options_.overlap && comm_->asynchronous(); }

void FsdpMamba::prefetch(size_t unit) {
  if (!overlapping() || unit >= units_.size() || units_[unit]->prefetched || units_[unit]->kept) return;
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
    if (options_.replicate && options_.replicate->size() > 1) {
      stats_.all_reduces += 1;
      stats_.all_reduce_bytes += r->mine.numel() * static_cast<int64_t>(r->mine.element_size());
      options_.replicate->all_reduce(r->mine);
    }
    int64_t offset = 0;
    for (size_t i : units_[r->unit]->index) {
      const int64_t n = layouts_[i].local_numel();
      accumulate(i, r->mine.narrow(0, offset, n).view(params_[i].tensor.sizes()));
      offset += n;
    }
  }
}

// Before a unit's backward (a hook on its output's gradient): its weights gathered again into the
// storage its saved tensors point at (w: null when its backward does not read them); the unit
// before it is prefetched.
void FsdpMamba::before_unit_backward(size_t unit, WholeWeights* w) {
  if (w) units_[unit]->gather_into(*w);
  if (unit > 0 && units_[unit - 1]->weights_in_backward) prefetch(unit - 1);
}

// After a unit's backward, with the whole gradients of its weights (in their compute dtype).
// ZeRO-3: the weights' bytes go, then the gradients are reduce-scattered (the one of the unit after
// it, queued beside this unit's backward, is finished first). ZeRO-2: they are added, in float32,
// into the step's whole gradients (the tied embedding's two uses too: two units, one sum).
void FsdpMamba::after_unit_backward(size_t unit, WholeWeights& w, const std::vector<at::Tensor>& grads) {
  c10::NoGradGuard no_grad;
  Unit& u = *units_[unit];
  if (u.kept.get() == &w) {
    for (size_t k = 0; k < u.index.size(); ++k) {
      if (!grads[k].defined()) continue;
      at::Tensor& acc = accum_[u.index[k]];
      if (acc.defined()) {
        acc.add_(grads[k]);  // bf16 + float32 -> float32: the sum is exact of the bf16 terms' values
      } else {
        acc = grads[k].to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
        count_gathered(acc.numel());
      }
    }
    return;
  }
  // The whole gradients and the reduce-scatter's send buffer are what is alive now (counted as
  // whole-unit memory).
  const int64_t n = w.numel;
  w.release();
  count_gathered(2 * n);
  finish_reduces();
  reduce_scatter(unit, grads);
  finish_reduces_when_backward_ends();
  count_gathered(-2 * n);
}

namespace {

// A unit's whole weights as the outputs of one autograd node (handles on the unit's storage): its
// backward gets their gradients together, once the unit's backward is done, and hands them to
// the owner; the shards get no gradient through autograd (the owner accumulates into their .grad).
struct GatherFunction : public torch::autograd::Function<GatherFunction> {
  static variable_list forward(AutogradContext* ctx, int64_t unit, c10::intrusive_ptr<FsdpMamba::WholeWeights> w,
                               at::TensorList shards) {
    (void)shards;  // inputs for autograd's edges only
    ctx->saved_data["unit"] = unit;
    variable_list out;
    for (const auto& t : w->tensors) out.push_back(t.detach());
    ctx->saved_data["whole"] = c10::IValue::make_capsule(std::move(w));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* u = reinterpret_cast<FsdpMamba::Unit*>(ctx->saved_data["unit"].toInt());
    const auto w = c10::static_intrusive_pointer_cast<FsdpMamba::WholeWeights>(ctx->saved_data["whole"].toCapsule());
    u->owner->after_unit_backward(u->position, *w, grads);
    return variable_list(2 + u->index.size());
  }
};

}  // namespace

at::Tensor FsdpMamba::run_unit(Unit& u, const at::Tensor& x, const at::Tensor& seq_idx) {
  const bool grad = c10::GradMode::is_enabled();
  const bool keep = grad && !options_.reshard_after_forward;  // ZeRO-2: gathered once per step
  c10::intrusive_ptr<WholeWeights> w = keep ? u.kept : c10::intrusive_ptr<WholeWeights>();
  if (!w) {
    w = c10::make_intrusive<WholeWeights>();
    u.gather_into(*w);
    if (keep) u.kept = w;
  }
  prefetch(u.position + 1);  // runs while this unit computes
  if (!grad) {
    at::Tensor y = u.run(x, w->tensors, seq_idx);
    w->release();
    return y;
  }
  std::vector<at::Tensor> shards;
  for (size_t i : u.index) shards.push_back(params_[i].tensor);
  const variable_list whole = GatherFunction::apply(reinterpret_cast<int64_t>(&u), w, at::TensorList(shards));
  at::Tensor y;
  if (u.block && options_.activation_checkpointing == ActivationCheckpointing::full) {
    std::vector<at::Tensor> inputs{x};
    inputs.insert(inputs.end(), whole.begin(), whole.end());
    // seq_idx (not differentiable) is captured: the recompute sees this forward's, whichever ran since.
    const Unit* unit = &u;
    y = checkpointed(
        [unit, seq_idx](const std::vector<at::Tensor>& in) { return unit->run(in[0], {in.begin() + 1, in.end()}, seq_idx); },
        inputs);
  } else {
    y = u.run(x, whole, seq_idx);
  }
  if (keep) return y;
  // ZeRO-3: the weights' bytes go now; the activations (and the handles on the weights) stay.
  w->release();
  if (y.requires_grad()) {
    const size_t unit = u.position;
    const c10::intrusive_ptr<WholeWeights> again = u.weights_in_backward ? w : c10::intrusive_ptr<WholeWeights>();
    y.register_hook([this, unit, again](const at::Tensor&) { before_unit_backward(unit, again.get()); });
  }
  return y;
}

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
  accum_.resize(params_.size());
  const size_t last = params_.size() - 1;  // norm_f
  const MambaConfig cfg = config_;
  // Units: the embedding (used by embed and by the tied head), one per block, the head.
  auto unit = [&](std::vector<size_t> index, bool block, auto compute) {
    auto u = std::make_unique<Unit>();
    u->owner = this;
    u->position = units_.size();
    u->index = std::move(index);
    u->compute = compute;
    u->block = block;
    units_.push_back(std::move(u));
  };
  unit({0}, false, [](const at::Tensor& tokens, const std::vector<at::Tensor>& w, const at::Tensor&) {
    return MambaLM::embed(w[0], tokens);
  });
  units_.back()->weights_in_backward = false;
  for (int64_t b = 0; b < config_.n_layer; ++b) {
    std::vector<size_t> index;
    for (size_t k = 0; k < 10; ++k) index.push_back(1 + static_cast<size_t>(b) * 10 + k);
    unit(index, true, [cfg](const at::Tensor& h, const std::vector<at::Tensor>& w, const at::Tensor& seq_idx) {
      return MambaLM::block(MambaLM::block_weights(w), cfg, h, nullptr, nullptr, seq_idx);
    });
  }
  // The head: logits (forward), or the fused head and loss against targets_ (loss_sum). The fused
  // head's backward does not read the embedding, so its whole weights are not gathered again;
  // norm_f's backward reads norm_f: it gets a copy (H floats) that outlives the release.
  unit({0, last}, false, [this, cfg](const at::Tensor& h, const std::vector<at::Tensor>& w, const at::Tensor&) {
    if (!targets_.defined()) return MambaLM::head(w[0], w[1], cfg, h);
    return MambaLM::head_loss(w[0], w[1].clone(), cfg, h, targets_);
  });
}

FsdpMamba::~FsdpMamba() {
  try {
    drop_prefetches();
    for (auto& r : reduces_)
      if (r->work) r->work->wait();
    for (auto& a : accum_)
      if (a.defined()) count_gathered(-a.numel());
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

at::Tensor FsdpMamba::forward(const at::Tensor& tokens, const at::Tensor& seq_idx) {
  // Once here, not per layer (on CUDA the order check is a sync: model/seq_idx.h).
  if (seq_idx.defined()) check_seq_idx(seq_idx, tokens.size(0), tokens.size(-1), "FsdpMamba::forward", true);
  drop_prefetches();  // none are left as a rule; one left by an error would hold stale weights
  finish_reduces();
  targets_ = at::Tensor();
  units_.back()->weights_in_backward = true;
  at::Tensor h = tokens;
  for (auto& u : units_) h = run_unit(*u, h, seq_idx);
  return h;
}

at::Tensor FsdpMamba::loss_sum(const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets) {
  if (seq_idx.defined()) check_seq_idx(seq_idx, tokens.size(0), tokens.size(-1), "FsdpMamba::loss_sum", true);
  drop_prefetches();
  finish_reduces();
  // The fused head's backward only scales the gradients its forward computed: no gather for it.
  targets_ = targets;
  units_.back()->weights_in_backward = false;
  at::Tensor h = tokens;
  for (auto& u : units_) h = run_unit(*u, h, seq_idx);
  return h;
}

void FsdpMamba::finish_step() {
  finish_reduces();
  if (options_.reshard_after_forward) return;
  c10::NoGradGuard no_grad;
  // The float32 whole gradients of the step, each parameter's once (the embedding's sums both of
  // its units). When overlapping, every unit's reduce-scatter is queued before the first is
  // waited for.
  std::vector<bool> done(params_.size(), false);
  for (auto& u : units_) {
    if (!u->kept) continue;
    std::vector<at::Tensor> grads;
    for (size_t i : u->index) {
      grads.push_back(done[i] ? at::Tensor() : accum_[i]);
      done[i] = true;
    }
    reduce_scatter(u->position, grads);
    u->kept->release();
    u->kept.reset();
  }
  finish_reduces();
  for (auto& a : accum_)
    if (a.defined()) {
      count_gathered(-a.numel());
      a.reset();
    }
}

std::vector<NamedTensor> FsdpMamba::gather_whole() {
  c10::NoGradGuard no_grad;
  std::vector<NamedTensor> out(params_.size());
  for (size_t u = 0; u + 1 < units_.size(); ++u) {  // the head unit repeats the embedding
    WholeWeights g;
    units_[u]->gather_into(g, /*master=*/true);
    for (size_t k = 0; k < units_[u]->index.size(); ++k)
      out[units_[u]->index[k]] = {params_[units_[u]->index[k]].name, g.tensors[k]};
  }
  WholeWeights g;
  units_.back()->gather_into(g, /*master=*/true);
  out.back() = {params_.back().name, g.tensors[1]};
  return out;
}

}  // namespace coil::dist
