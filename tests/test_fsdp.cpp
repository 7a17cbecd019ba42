// FSDP-style sharding under mpirun (1 to 4 ranks): the same losses and final parameters as one
// process training the whole model on the same global batches, for the hybrid optimizer, Muon alone
// and AdamW alone, resharding after forward or not (ZeRO-3 / ZeRO-2), with activation checkpointing
// or not, in float32 and bfloat16; each unit's forward runs once per micro batch (twice with
// checkpointing); ZeRO-2 sums bf16 gradients in float32; Muon orthogonalizes whole matrices only,
// each once; a rank holds only its shards (plus one gathered unit at a time). HSDP (shard groups,
// replicas across them) equals one process and FSDP, and holds 1 / shard of the model per rank.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <functional>

#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
#include "model/mamba.h"
#include "optim/hybrid.h"
#include "util/cpu_memory.h"
#include "util/error.h"

using namespace coil;
using namespace coil::dist;

namespace {

MambaConfig tiny() {
  MambaConfig c = MambaConfig::preset("tiny");
  c.d_model = 32;
  c.n_layer = 2;
  c.vocab_size = 61;  // a prime: rows that neither 2, 3 nor 4 ranks divide (no padding to 8 here)
  c.pad_vocab_multiple = 1;
  return c;
}

constexpr int64_t kGlobal = 12, kSeq = 16, kSteps = 30;
constexpr double kClip = 0.5;  // below the gradient norms here: clipping is exercised

at::Tensor batch(int64_t step, int64_t rows = kGlobal) {  // the global batch of a step, the same on every rank
  at::Generator gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(step));
  return at::randint(61, {rows, kSeq + 1}, gen, at::kLong);
}

at::Tensor loss_sum(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}), {}, at::Reduction::Sum);
}

struct Outcome {
  std::vector<double> losses;
  std::vector<NamedTensor> params;
};

optim::HybridConfig optimizer(const std::string& kind) {
  optim::HybridConfig h;
  h.use_muon = kind != "adamw";
  h.adamw.weight_decay = 0.1;
  h.muon.weight_decay = 0.1;
  return h;
}
double lr_adamw(const std::string& kind) { return kind == "muon" ? 0.0 : 3e-3; }

// One process, the whole model and the whole global batch.
Outcome reference(const std::string& kind, at::ScalarType compute = at::kFloat, int64_t steps = kSteps) {
  MambaLM model(tiny(), 7);
  auto params = model.named_parameters();
  for (auto& p : params) p.tensor.requires_grad_(true);
  optim::HybridOptimizer opt(params, optimizer(kind));
  Outcome out;
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor t = batch(s);
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    at::Tensor loss = loss_sum(model.forward(t.narrow(1, 0, kSeq), compute), t.narrow(1, 1, kSeq)) / (kGlobal * kSeq);
    loss.backward();
    optim::clip_grads(params, std::sqrt(optim::grad_sq_norm(params)), kClip);
    opt.step(0.02, lr_adamw(kind));
    out.losses.push_back(loss.item<double>());
  }
  out.params = params;
  return out;
}

// This rank's part of a step: gradients cleared, forward and backward of `rows` in micro batches
// (the loss a mean over the global batch), gradients reduce-scattered. Returns this rank's loss.
// fused: the trainer's way, the head fused with the loss (FsdpMamba::loss_sum); else the logits
// (FsdpMamba::forward), then cross_entropy. The reference above always takes the second way.
double forward_backward(FsdpMamba& fsdp, const std::vector<NamedTensor>& params, const at::Tensor& rows, int64_t micro,
                        int64_t global = kGlobal, bool fused = true) {
  for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
  double loss = 0;
  for (int64_t m = 0; m < rows.size(0) / micro; ++m) {
    at::Tensor mb = rows.narrow(0, m * micro, micro);
    const at::Tensor inputs = mb.narrow(1, 0, kSeq), targets = mb.narrow(1, 1, kSeq);
    at::Tensor l = (fused ? fsdp.loss_sum(inputs, {}, targets) : loss_sum(fsdp.forward(inputs), targets)) / (global * kSeq);
    l.backward();
    loss += l.item<double>();
  }
  fsdp.finish_step();
  return loss;
}

// Muon on FSDP's shards: each matrix that Muon updates (none without Muon) is gathered whole over
// `comm`, the ranks that hold its rows, to be orthogonalized.
void orthogonalize_over(optim::HybridOptimizer& opt, const FsdpMamba& fsdp, bool use_muon, std::shared_ptr<Comm> comm) {
  const auto& params = fsdp.local_parameters();
  std::vector<ShardLayout> muon_layouts;
  for (size_t i = 0; i < params.size(); ++i)
    if (use_muon && optim::group_of(params[i].name, static_cast<int64_t>(fsdp.layout(i).shape.size())).muon)
      muon_layouts.push_back(fsdp.layout(i));
  opt.muon().set_orthogonalize(sharded_orthogonalize(std::move(comm), muon_layouts, 5));
}

// `steps` steps on this rank's shards: every rank of `all` its slice of each global batch, in micro
// batches; the loss and the squared gradient norm summed over `all` (the norm weighted 1 / replicas,
// since each replica group holds the same gradient shards), the gradients clipped to kClip.
// Returns the losses.
std::vector<double> train_steps(FsdpMamba& fsdp, optim::HybridOptimizer& opt, const std::string& kind, Comm& all,
                                int64_t micro, int64_t steps, int replicas = 1) {
  const auto& params = fsdp.local_parameters();
  std::vector<double> losses;
  const int64_t per_rank = kGlobal / all.size();
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor t = batch(s).narrow(0, all.rank() * per_rank, per_rank);
    const double loss = forward_backward(fsdp, params, t, micro);
    at::Tensor sums = at::tensor({loss, optim::grad_sq_norm(params) / replicas}, at::kDouble);
    all.all_reduce(sums);
    optim::clip_grads(params, std::sqrt(sums[1].item<double>()), kClip);
    opt.step(0.02, lr_adamw(kind));
    losses.push_back(sums[0].item<double>());
  }
  return losses;
}

// The same on this rank's shards and slice of every global batch, in micro batches.
Outcome sharded(const std::string& kind, const FsdpOptions& o, int64_t micro, int64_t steps = kSteps) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  MambaLM model(tiny(), 7);
  FsdpMamba fsdp(model, comm, o);
  optim::HybridOptimizer opt(fsdp.local_parameters(), optimizer(kind), fsdp.whole_shapes());
  orthogonalize_over(opt, fsdp, optimizer(kind).use_muon, comm);
  Outcome out;
  out.losses = train_steps(fsdp, opt, kind, *comm, micro, steps);
  out.params = fsdp.gather_whole();
  return out;
}

double rel_error(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

FsdpOptions mode(bool reshard, ActivationCheckpointing ckpt, at::ScalarType compute = at::kFloat) {
  FsdpOptions o;
  o.reshard_after_forward = reshard;
  o.activation_checkpointing = ckpt;
  o.compute_dtype = compute;
  return o;
}
std::string describe(const FsdpOptions& o) {
  return std::string(o.reshard_after_forward ? "ZeRO-3" : "ZeRO-2") + " checkpointing " +
         to_string(o.activation_checkpointing) + " " + c10::toString(o.compute_dtype);
}
constexpr ActivationCheckpointing kNone = ActivationCheckpointing::none, kFull = ActivationCheckpointing::full;

}  // namespace

TEST(Fsdp, MatchesOneProcess) {
  const int n = world().size;
  for (const std::string kind : {"hybrid", "muon", "adamw"}) {
    Outcome ref = reference(kind);
    for (bool reshard : {true, false})
      for (ActivationCheckpointing ckpt : {kNone, kFull}) {
        if (kind != "hybrid" && (!reshard || ckpt == kFull)) continue;
        const int64_t per_rank = kGlobal / n, micro = per_rank % 2 == 0 ? per_rank / 2 : 1;  // with accumulation
        const FsdpOptions o = mode(reshard, ckpt);
        Outcome got = sharded(kind, o, micro);
        for (int64_t s = 0; s < kSteps; ++s)
          EXPECT_NEAR(got.losses[s], ref.losses[s], 1e-5 * std::abs(ref.losses[s])) << kind << " " << describe(o) << " step " << s;
        ASSERT_EQ(got.params.size(), ref.params.size());
        for (size_t i = 0; i < ref.params.size(); ++i)
          EXPECT_LT(rel_error(got.params[i].tensor, ref.params[i].tensor.detach()), 1e-5)
              << kind << " " << describe(o) << " " << ref.params[i].name;
      }
  }
}

TEST(Fsdp, MuonOrthogonalizesWholeMatricesOnceEach) {
  std::vector<std::vector<int64_t>> seen;
  optim::observe_newton_schulz([&](const at::Tensor& m) { seen.push_back(m.sizes().vec()); });
  sharded("hybrid", FsdpOptions{}, kGlobal / world().size);
  optim::observe_newton_schulz({});
  // The whole shapes of the Muon matrices: in_proj [128, 32], x_proj [34, 64], out_proj [32, 64].
  const std::vector<std::vector<int64_t>> whole = {{128, 32}, {34, 64}, {32, 64}};
  for (const auto& s : seen) EXPECT_NE(std::find(whole.begin(), whole.end(), s), whole.end()) << s[0] << "x" << s[1];
  auto comm = make_mpi_comm();
  at::Tensor count = at::tensor({static_cast<int64_t>(seen.size())}, at::kLong);
  comm->all_reduce(count);
  EXPECT_EQ(count.item<int64_t>(), kSteps * 3 * 2);  // 3 matrices x 2 blocks, once each per step
}

TEST(Fsdp, EachRankHoldsItsShardsAndOneUnitAtATime) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  const int n = comm->size();
  MambaLM model(tiny(), 7);
  FsdpMamba fsdp(model, comm, true);
  int64_t local = 0, whole = 0, largest_unit = 0, block = 0;
  for (size_t i = 0; i < fsdp.local_parameters().size(); ++i) {
    local += fsdp.local_parameters()[i].tensor.numel();
    whole += model.named_parameters()[i].tensor.numel();
    EXPECT_EQ(fsdp.local_parameters()[i].tensor.size(0), (model.named_parameters()[i].tensor.size(0) + n - 1) / n);
  }
  for (size_t i = 1; i <= 10; ++i) block += model.named_parameters()[i].tensor.numel();
  largest_unit = std::max(block, model.named_parameters()[0].tensor.numel() + model.named_parameters().back().tensor.numel());
  EXPECT_LE(local, whole / n + 4 * 64);  // padding: at most one row per tensor
  FsdpMamba::reset_gathered_peak();
  at::Tensor t = batch(0).narrow(0, 0, 2);
  at::Tensor l = loss_sum(fsdp.forward(t.narrow(1, 0, kSeq)), t.narrow(1, 1, kSeq));
  l.backward();
  EXPECT_EQ(FsdpMamba::gathered_numel(), 0);  // nothing gathered stays
  EXPECT_LE(FsdpMamba::gathered_peak(), 2 * largest_unit);  // a unit's weights and gradients, or gradients and send buffer
  EXPECT_GT(FsdpMamba::gathered_peak(), 0);
}

// One backward and one optimizer step, sharded and not: the same gradients, clipped gradients and
// parameters.
TEST(Fsdp, GradientsAndOneStepMatch) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  MambaLM model(tiny(), 7);
  auto params = model.named_parameters();
  for (auto& p : params) p.tensor.requires_grad_(true);
  at::Tensor t = batch(0);
  at::Tensor loss = loss_sum(model.forward(t.narrow(1, 0, kSeq)), t.narrow(1, 1, kSeq)) / (kGlobal * kSeq);
  loss.backward();
  MambaLM model2(tiny(), 7);
  FsdpMamba fsdp(model2, comm, true);
  const int r = comm->rank(), per_rank = kGlobal / comm->size();
  at::Tensor mine = t.narrow(0, r * per_rank, per_rank);
  at::Tensor l2 = loss_sum(fsdp.forward(mine.narrow(1, 0, kSeq)), mine.narrow(1, 1, kSeq)) / (kGlobal * kSeq);
  l2.backward();
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LT(rel_error(fsdp.local_parameters()[i].tensor.grad(), fsdp.layout(i).slice(params[i].tensor.grad(), r)), 1e-6) << params[i].name;
  at::Tensor norm = at::tensor({optim::grad_sq_norm(fsdp.local_parameters())}, at::kDouble);
  comm->all_reduce(norm);
  EXPECT_NEAR(optim::grad_sq_norm(params), norm.item<double>(), 1e-6 * norm.item<double>());
  optim::clip_grads(params, std::sqrt(optim::grad_sq_norm(params)), 0.1);
  optim::clip_grads(fsdp.local_parameters(), std::sqrt(norm.item<double>()), 0.1);
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LT(rel_error(fsdp.local_parameters()[i].tensor.grad(), fsdp.layout(i).slice(params[i].tensor.grad(), r)), 1e-6) << "clipped " << params[i].name;
  optim::HybridOptimizer a(params, optimizer("hybrid")), b(fsdp.local_parameters(), optimizer("hybrid"), fsdp.whole_shapes());
  orthogonalize_over(b, fsdp, true, comm);
  a.step(0.02, 3e-3);
  b.step(0.02, 3e-3);
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LT(rel_error(fsdp.local_parameters()[i].tensor.detach(), fsdp.layout(i).slice(params[i].tensor.detach(), r)), 1e-6) << "after step " << params[i].name;
}

// bfloat16 compute in every mode tracks one process's bfloat16 training (MambaLM::forward with
// the weights cast), and activation checkpointing changes nothing at all: the recompute runs the
// same operations on the same values.
TEST(Fsdp, EveryModeMatchesOneProcessInBfloat16) {
  const int n = world().size;
  constexpr int64_t steps = 8;
  const Outcome ref = reference("hybrid", at::kBFloat16, steps);
  const int64_t per_rank = kGlobal / n, micro = per_rank % 2 == 0 ? per_rank / 2 : 1;
  double worst_loss = 0, worst_param = 0;
  for (bool reshard : {true, false}) {
    const Outcome plain = sharded("hybrid", mode(reshard, kNone, at::kBFloat16), micro, steps);
    const Outcome ckpt = sharded("hybrid", mode(reshard, kFull, at::kBFloat16), micro, steps);
    for (int64_t s = 0; s < steps; ++s) {
      // Rows split over ranks and micro batches round the bf16 products' sums differently.
      EXPECT_NEAR(plain.losses[s], ref.losses[s], 2e-3 * ref.losses[s]) << "reshard " << reshard << " step " << s;
      EXPECT_EQ(ckpt.losses[s], plain.losses[s]) << "reshard " << reshard << " step " << s;
      worst_loss = std::max(worst_loss, std::abs(plain.losses[s] - ref.losses[s]) / ref.losses[s]);
    }
    for (size_t i = 0; i < ref.params.size(); ++i) {
      const double e = rel_error(plain.params[i].tensor, ref.params[i].tensor.detach());
      EXPECT_LT(e, 2e-2) << "reshard " << reshard << " " << ref.params[i].name;
      worst_param = std::max(worst_param, e);
      EXPECT_TRUE(at::equal(ckpt.params[i].tensor, plain.params[i].tensor)) << "reshard " << reshard << " " << ref.params[i].name;
    }
  }
  if (world().rank == 0)
    std::printf("[ fsdp bf16 vs one process ] %d rank(s): worst loss difference %.4f%%, worst parameter difference %.4f%%\n",
                n, 100 * worst_loss, 100 * worst_param);
}

// Without checkpointing each unit's function runs once per micro batch (the backward uses the saved
// activations); with it, each block runs twice (the recompute), the embedding and head once.
// Without gradients (evaluation), once either way. The all-gathers a step takes, per mode.
TEST(Fsdp, EachUnitRunsOncePerMicroBatchTwiceWhenCheckpointed) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  const int r = comm->rank(), n = comm->size();
  const int64_t per_rank = kGlobal / n, micro = per_rank % 2 == 0 ? per_rank / 2 : per_rank, m = per_rank / micro;
  const at::Tensor rows = batch(0).narrow(0, r * per_rank, per_rank);
  for (bool fused : {true, false}) {
    for (bool reshard : {true, false})
      for (ActivationCheckpointing ckpt : {kNone, kFull}) {
        MambaLM model(tiny(), 7);
        FsdpMamba fsdp(model, comm, mode(reshard, ckpt));
        forward_backward(fsdp, fsdp.local_parameters(), rows, micro, kGlobal, fused);
        const std::vector<int64_t>& runs = fsdp.stats().unit_forwards;
        ASSERT_EQ(runs.size(), static_cast<size_t>(tiny().n_layer + 2));
        const int64_t block = ckpt == kFull ? 2 * m : m;
        EXPECT_EQ(runs.front(), m) << describe(fsdp.options());
        EXPECT_EQ(runs.back(), m) << describe(fsdp.options());
        for (size_t b = 1; b + 1 < runs.size(); ++b) EXPECT_EQ(runs[b], block) << describe(fsdp.options()) << " block " << b - 1;
        // All-gathers: ZeRO-3 every unit before its forward and, but the embedding (its backward needs
        // only the token ids) and the head fused with the loss (its forward made its gradients),
        // again before its backward, per micro batch; ZeRO-2 every unit once.
        const int64_t units = tiny().n_layer + 2, again = fused ? units - 2 : units - 1;
        EXPECT_EQ(fsdp.stats().all_gathers, reshard ? m * (units + again) : units) << describe(fsdp.options()) << " fused " << fused;
        fsdp.reset_stats();
        {
          at::NoGradGuard no_grad;
          fsdp.forward(rows.narrow(1, 0, kSeq));
        }
        for (int64_t k : fsdp.stats().unit_forwards) EXPECT_EQ(k, 1) << describe(fsdp.options()) << " without gradients";
        EXPECT_EQ(FsdpMamba::gathered_numel(), 0);
      }
  }
}

// Reshard after forward frees every whole weight once the forward is done (the activations stay:
// the CPU allocator holds more after forward, most of it without checkpointing), and a backward
// holds one unit at a time; ZeRO-2 keeps every unit's until finish_step(). The bytes the
// activations take after forward, per mode, are printed (docs/PERFORMANCE.md).
TEST(Fsdp, WholeWeightsFreedAfterForwardActivationsKept) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  CpuMemory& mem = CpuMemory::install();
  MambaLM probe(tiny(), 7);
  const auto named = probe.named_parameters();
  int64_t all_units = named[0].tensor.numel(), block = 0;  // the head unit gathers the embedding again
  for (const auto& p : named) all_units += p.tensor.numel();
  for (size_t i = 1; i <= 10; ++i) block += named[i].tensor.numel();
  const int64_t largest = std::max(block, named[0].tensor.numel() + named.back().tensor.numel());
  const at::Tensor t = batch(0).narrow(0, 0, 4);
  int64_t activations[2][2] = {};
  for (bool reshard : {true, false})
    for (ActivationCheckpointing ckpt : {kNone, kFull}) {
      MambaLM model(tiny(), 7);
      FsdpMamba fsdp(model, comm, mode(reshard, ckpt));
      FsdpMamba::reset_gathered_peak();
      const int64_t before = mem.bytes();
      at::Tensor l = loss_sum(fsdp.forward(t.narrow(1, 0, kSeq)), t.narrow(1, 1, kSeq));
      activations[reshard][ckpt == kFull] = mem.bytes() - before - (reshard ? 0 : 4 * FsdpMamba::gathered_numel());
      EXPECT_EQ(FsdpMamba::gathered_numel(), reshard ? 0 : all_units) << describe(fsdp.options());
      l.backward();
      if (reshard) {
        EXPECT_EQ(FsdpMamba::gathered_numel(), 0) << describe(fsdp.options());
        EXPECT_LE(FsdpMamba::gathered_peak(), 2 * largest) << describe(fsdp.options());
      } else {
        EXPECT_GT(FsdpMamba::gathered_numel(), all_units) << describe(fsdp.options());  // + float32 whole gradients
      }
      fsdp.finish_step();
      EXPECT_EQ(FsdpMamba::gathered_numel(), 0) << describe(fsdp.options());
    }
  // ZeRO-3 holds after forward what ZeRO-2 holds beyond its kept weights: the freed storage's bytes
  // did go back to the allocator.
  EXPECT_EQ(activations[1][0], activations[0][0]);
  EXPECT_EQ(activations[1][1], activations[0][1]);
  for (bool reshard : {true, false}) {
    EXPECT_GT(activations[reshard][0], 0);
    EXPECT_LT(activations[reshard][1], activations[reshard][0] / 2) << "reshard " << reshard;
  }
  if (comm->rank() == 0)
    std::printf("[ fsdp activations ] %d rank(s), 4 x %lld tokens: bytes held after forward: ZeRO-3 %lld (checkpointing "
                "full: %lld), ZeRO-2 %lld (full: %lld)\n",
                comm->size(), static_cast<long long>(kSeq), static_cast<long long>(activations[1][0]),
                static_cast<long long>(activations[1][1]), static_cast<long long>(activations[0][0]),
                static_cast<long long>(activations[0][1]));
}

// ---- Mixed precision and overlap ----------------------------------------------------------------

namespace {

// `steps` steps of the hybrid optimizer on this rank's shards, with the given FSDP options.
struct TrainRun {
  std::vector<double> losses;
  std::vector<NamedTensor> whole;  // the master weights at the end
  FsdpStats stats;
  std::vector<at::ScalarType> shard_dtypes, grad_dtypes, state_dtypes;
};

// fixed: the same global batch every step (the loss falls as it is memorized).
// micro_batches (0: two where the rows divide) of per_rank rows (0: kGlobal / ranks).
TrainRun train_sharded(std::shared_ptr<Comm> comm, const FsdpOptions& o, int64_t steps, bool fixed = false,
                       int64_t micro_batches = 0, int64_t per_rank_rows = 0) {
  const int r = comm->rank(), n = comm->size();
  MambaLM model(tiny(), 7);
  FsdpMamba fsdp(model, comm, o);
  const auto& params = fsdp.local_parameters();
  optim::HybridOptimizer opt(params, optimizer("hybrid"), fsdp.whole_shapes());
  orthogonalize_over(opt, fsdp, true, comm);
  auto mpi = std::shared_ptr<Comm>(make_mpi_comm());  // the loss sums, on CPU
  TrainRun out;
  const int64_t per_rank = per_rank_rows > 0 ? per_rank_rows : kGlobal / n,
                micro = micro_batches > 0 ? per_rank / micro_batches : per_rank % 2 == 0 ? per_rank / 2 : per_rank;
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor t = batch(fixed ? 0 : s, n * per_rank).narrow(0, r * per_rank, per_rank).to(o.device);
    const double loss = forward_backward(fsdp, params, t, micro, n * per_rank);
    if (s == 0)
      for (const auto& p : params) out.grad_dtypes.push_back(p.tensor.grad().scalar_type());
    at::Tensor sums = at::tensor({loss, optim::grad_sq_norm(params)}, at::kDouble);
    mpi->all_reduce(sums);
    optim::clip_grads(params, std::sqrt(sums[1].item<double>()), kClip);
    opt.step(0.02, 3e-3);
    out.losses.push_back(sums[0].item<double>());
  }
  out.stats = fsdp.stats();
  for (const auto& p : params) out.shard_dtypes.push_back(p.tensor.scalar_type());
  for (const auto& st : opt.state()) out.state_dtypes.push_back(st.tensor.scalar_type());
  out.whole = fsdp.gather_whole();
  return out;
}

// A Comm whose *_async collectives run only when waited for (MPI underneath): code that read a
// result before wait() would read an unfilled buffer, so the overlap path's ordering is tested on
// CPU. The blocking collectives pass straight through.
class DeferredComm : public Comm {
 public:
  explicit DeferredComm(std::shared_ptr<Comm> inner) : inner_(std::move(inner)) {
    rank_ = inner_->rank();
    size_ = inner_->size();
  }
  void all_gather(const at::Tensor& in, at::Tensor& out) override { inner_->all_gather(in, out); }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out) override { inner_->reduce_scatter(in, out); }
  void all_reduce(at::Tensor& t) override { inner_->all_reduce(t); }
  void broadcast(at::Tensor& t, int root) override { inner_->broadcast(t, root); }
  void gather(const at::Tensor& in, at::Tensor& out, int root) override { inner_->gather(in, out, root); }
  void scatter(const at::Tensor& in, at::Tensor& out, int root) override { inner_->scatter(in, out, root); }
  void barrier() override { inner_->barrier(); }
  bool asynchronous() const override { return true; }
  std::unique_ptr<Work> all_gather_async(const at::Tensor& in, at::Tensor& out) override {
    out.fill_(0xAB);  // garbage until waited for
    return std::make_unique<Later>([this, in, out]() mutable { inner_->all_gather(in, out); }, this);
  }
  std::unique_ptr<Work> reduce_scatter_async(const at::Tensor& in, at::Tensor& out) override {
    out.fill_(12345);
    return std::make_unique<Later>([this, in, out]() mutable { inner_->reduce_scatter(in, out); }, this);
  }
  int in_flight = 0, max_in_flight = 0;

 private:
  struct Later : Work {
    std::function<void()> run;
    DeferredComm* owner;
    Later(std::function<void()> f, DeferredComm* o) : run(std::move(f)), owner(o) {
      owner->max_in_flight = std::max(owner->max_in_flight, ++owner->in_flight);
    }
    void wait() override {
      if (!run) return;
      run();
      run = nullptr;
      --owner->in_flight;
    }
    ~Later() override { wait(); }
  };
  std::shared_ptr<Comm> inner_;
};

}  // namespace

// bf16 compute weights over float32 master shards: the loss tracks float32 training, the
// all-gathers move about half the bytes, the shards, their gradients and the optimizer state stay
// float32; a bf16 reduce-scatter halves its bytes and still tracks.
TEST(Fsdp, MixedPrecisionTracksFloat32) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  constexpr int64_t steps = 8;
  FsdpOptions f32;
  FsdpOptions bf16 = f32;
  bf16.compute_dtype = at::kBFloat16;
  FsdpOptions bf16_reduce = bf16;
  bf16_reduce.reduce_dtype = at::kBFloat16;
  const TrainRun a = train_sharded(comm, f32, steps, true), b = train_sharded(comm, bf16, steps, true),
                 c = train_sharded(comm, bf16_reduce, steps, true);
  double worst = 0;
  for (int64_t s = 0; s < steps; ++s) {
    // bf16 has 8 bits of mantissa: the losses agree to within 0.5% here.
    EXPECT_NEAR(b.losses[s], a.losses[s], 0.005 * a.losses[s]) << "step " << s;
    EXPECT_NEAR(c.losses[s], a.losses[s], 0.005 * a.losses[s]) << "bf16 reduce, step " << s;
    worst = std::max(worst, std::abs(b.losses[s] - a.losses[s]) / a.losses[s]);
  }
  EXPECT_GT(worst, 0.0);  // bf16 did compute in bf16
  EXPECT_LT(a.losses.back(), a.losses.front() - 0.05);  // it trains
  EXPECT_LT(b.losses.back(), b.losses.front() - 0.05);
  // All-gather bytes: the matrices in bf16, the few float32 parameters (norms, A_log, D, dt bias)
  // as they are; padding to 8 bytes per parameter. The expected count from the shard layouts:
  MambaLM model(tiny(), 7);
  FsdpMamba probe(model, comm, bf16);
  const auto named = model.named_parameters();
  double f32_bytes = 0, bf16_bytes = 0;
  for (size_t i = 0; i < named.size(); ++i) {
    const double local = static_cast<double>(probe.layout(i).local_numel());
    f32_bytes += 4 * local;
    bf16_bytes += (MambaLM::keeps_float32(named[i].name) ? 4 : 2) * local;
  }
  const double ratio = static_cast<double>(b.stats.all_gather_bytes) / static_cast<double>(a.stats.all_gather_bytes);
  EXPECT_EQ(a.stats.all_gathers, b.stats.all_gathers);
  EXPECT_NEAR(ratio, bf16_bytes / f32_bytes, 0.01);
  EXPECT_LT(ratio, 0.6);
  EXPECT_GT(ratio, 0.5);
  EXPECT_EQ(b.stats.reduce_scatter_bytes, a.stats.reduce_scatter_bytes);
  EXPECT_EQ(2 * c.stats.reduce_scatter_bytes, a.stats.reduce_scatter_bytes);
  if (comm->rank() == 0)
    std::printf("[ fsdp bf16 ] %d rank(s): all-gather bytes per step %lld (float32) -> %lld (bfloat16), ratio %.3f; "
                "reduce-scatter %lld -> %lld (reduce_dtype bfloat16); loss %.4f -> %.4f (float32), %.4f -> %.4f (bfloat16), "
                "worst difference %.3f%%\n",
                comm->size(), static_cast<long long>(a.stats.all_gather_bytes / steps),
                static_cast<long long>(b.stats.all_gather_bytes / steps), ratio,
                static_cast<long long>(a.stats.reduce_scatter_bytes / steps),
                static_cast<long long>(c.stats.reduce_scatter_bytes / steps), a.losses.front(), a.losses.back(),
                b.losses.front(), b.losses.back(), 100 * worst);
  for (const TrainRun* r : {&b, &c}) {
    for (auto t : r->shard_dtypes) EXPECT_EQ(t, at::kFloat);
    for (auto t : r->grad_dtypes) EXPECT_EQ(t, at::kFloat);
    ASSERT_FALSE(r->state_dtypes.empty());
    for (auto t : r->state_dtypes) EXPECT_EQ(t, at::kFloat);
    for (const auto& w : r->whole) EXPECT_EQ(w.tensor.scalar_type(), at::kFloat) << w.name;
  }
  // The master weights moved like float32 training's, not bit for bit.
  for (size_t i = 0; i < a.whole.size(); ++i) EXPECT_LT(rel_error(b.whole[i].tensor, a.whole[i].tensor), 0.05) << a.whole[i].name;
}

// ZeRO-2 with bf16 compute adds each micro batch's whole gradients, and the tied embedding's two
// uses, in float32: over 4 micro batches its gradients equal ZeRO-3's (which reduces each bf16
// gradient and sums in the float32 shards) to float32 rounding, and its training tracks float32
// as closely as ZeRO-3's does.
TEST(Fsdp, Zero2Bfloat16AccumulatesInFloat32) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  const int r = comm->rank(), n = comm->size();
  constexpr int64_t rows = 4;  // per rank: 4 micro batches of one sequence
  const at::Tensor t = batch(0, n * rows).narrow(0, r * rows, rows);
  std::vector<at::Tensor> grads[2];
  for (bool reshard : {true, false}) {
    MambaLM model(tiny(), 7);
    FsdpMamba fsdp(model, comm, mode(reshard, kNone, at::kBFloat16));
    forward_backward(fsdp, fsdp.local_parameters(), t, 1, n * rows);
    for (const auto& p : fsdp.local_parameters()) grads[reshard].push_back(p.tensor.grad().clone());
  }
  const auto named = MambaLM(tiny(), 7).named_parameters();
  for (size_t i = 0; i < named.size(); ++i) {
    EXPECT_EQ(grads[0][i].scalar_type(), at::kFloat);
    EXPECT_LT(rel_error(grads[0][i], grads[1][i]), 1e-5) << named[i].name;  // bf16 sums would differ by ~1e-3
  }
  constexpr int64_t steps = 6;
  double worst[2] = {0, 0};
  for (bool reshard : {true, false}) {
    const TrainRun f32 = train_sharded(comm, mode(reshard, kNone), steps, false, 4, rows);
    const TrainRun bf16 = train_sharded(comm, mode(reshard, kNone, at::kBFloat16), steps, false, 4, rows);
    for (int64_t s = 0; s < steps; ++s)
      worst[reshard] = std::max(worst[reshard], std::abs(bf16.losses[s] - f32.losses[s]) / f32.losses[s]);
  }
  EXPECT_GT(worst[1], 0.0);
  EXPECT_LE(worst[0], 1.1 * worst[1] + 1e-6);
  if (r == 0)
    std::printf("[ fsdp bf16, 4 micro batches ] %d rank(s): worst loss difference from float32: ZeRO-3 %.4f%%, ZeRO-2 %.4f%%\n",
                n, 100 * worst[1], 100 * worst[0]);
}

// The overlap path (prefetched all-gathers, reduce-scatters finished a unit later or at the end of
// backward) computes exactly what the synchronous path does, with collectives that complete only
// when waited for; more than one collective is in flight at times.
TEST(Fsdp, OverlapMatchesSynchronousOnDeferredComm) {
  auto mpi = std::shared_ptr<Comm>(make_mpi_comm());
  auto deferred = std::make_shared<DeferredComm>(mpi);
  for (bool reshard : {true, false})
    for (ActivationCheckpointing ckpt : {kNone, kFull}) {
      FsdpOptions o = mode(reshard, ckpt, at::kBFloat16);
      o.overlap = false;
      const TrainRun sync = train_sharded(mpi, o, 3);
      o.overlap = true;
      const TrainRun over = train_sharded(deferred, o, 3);
      for (size_t s = 0; s < sync.losses.size(); ++s) EXPECT_EQ(over.losses[s], sync.losses[s]) << describe(o) << " step " << s;
      for (size_t i = 0; i < sync.whole.size(); ++i)
        EXPECT_TRUE(at::equal(over.whole[i].tensor, sync.whole[i].tensor)) << describe(o) << " " << sync.whole[i].name;
      EXPECT_EQ(over.stats.all_gather_bytes, sync.stats.all_gather_bytes);
    }
  EXPECT_EQ(deferred->in_flight, 0);
  EXPECT_GE(deferred->max_in_flight, 2);  // a prefetch beside a queued reduce-scatter, at least
}

// ---- On GPUs (skipped without CUDA). Test names with "Cuda" run in scripts/gpu-check. ----------

// FSDP over NCCL, bf16 compute: overlapping the collectives with compute (prefetch, deferred
// reduce-scatter on NCCL's stream) gives what the synchronous order gives, with activation
// checkpointing too; bf16 tracks float32.
TEST(FsdpCuda, OverlapMatchesSynchronous) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no CUDA device";
  if (world().size > static_cast<int>(at::getNumGPUs())) GTEST_SKIP() << "more ranks than GPUs";
  try {  // the model on CUDA needs the CUDA selective scan
    MambaLM probe(tiny(), 7);
    probe.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(world().local_rank)));
    probe.forward(batch(0).narrow(0, 0, 1).to(at::kCUDA));
  } catch (const std::exception& e) {
    GTEST_SKIP() << "the model does not run on CUDA in this build: " << e.what();
  }
  std::shared_ptr<Comm> nccl;
  try {
    nccl = std::shared_ptr<Comm>(make_nccl_comm());
  } catch (const std::exception& e) {
    FAIL() << "a GPU is visible and the NCCL backend is not: " << e.what();  // a failure, not a skip
  }
  ASSERT_TRUE(nccl->asynchronous());
  FsdpOptions o;
  o.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(world().local_rank));
  o.compute_dtype = at::kBFloat16;
  o.overlap = false;
  const TrainRun sync = train_sharded(nccl, o, 4);
  o.overlap = true;
  const TrainRun over = train_sharded(nccl, o, 4);
  FsdpOptions f32 = o;
  f32.compute_dtype = at::kFloat;
  const TrainRun full = train_sharded(nccl, f32, 4);
  FsdpOptions recompute = o;  // whole weights freed on CUDA and gathered again for the recompute
  recompute.activation_checkpointing = ActivationCheckpointing::full;
  const TrainRun ckpt = train_sharded(nccl, recompute, 4);
  for (size_t s = 0; s < sync.losses.size(); ++s) {
    EXPECT_NEAR(over.losses[s], sync.losses[s], 1e-4 * sync.losses[s]) << "step " << s;
    EXPECT_NEAR(ckpt.losses[s], over.losses[s], 1e-4 * over.losses[s]) << "checkpointing full, step " << s;
    EXPECT_NEAR(sync.losses[s], full.losses[s], 0.01 * full.losses[s]) << "bf16 vs float32, step " << s;
  }
  for (size_t i = 0; i < sync.whole.size(); ++i)
    EXPECT_LT(rel_error(over.whole[i].tensor, sync.whole[i].tensor), 1e-3) << sync.whole[i].name;
  for (auto t : over.state_dtypes) EXPECT_EQ(t, at::kFloat);
}

// ---- HSDP: shard groups of consecutive ranks, replicas across them ---------------------------------

namespace {
struct Hybrid {
  Outcome outcome;
  int64_t local_numel = 0, predicted_numel = 0, whole_numel = 0;
  FsdpStats stats;
};

// Training as sharded() does, but sharded over `shard` consecutive ranks and replicated over the
// world / shard groups: the shard group's collectives for the model and Muon, the replicate
// group's all-reduce for the gradients; the squared gradient norm weighted 1 / replicas in the sum.
Hybrid hybrid(const std::string& kind, int shard, int64_t steps = kSteps) {
  const int g = world().rank, n = world().size, replicas = n / shard;
  auto shard_comm = std::shared_ptr<Comm>(make_mpi_comm(g / shard));
  auto replicate_comm = std::shared_ptr<Comm>(make_mpi_comm(g % shard));
  auto all = std::shared_ptr<Comm>(make_mpi_comm());
  EXPECT_EQ(shard_comm->size(), shard);
  EXPECT_EQ(shard_comm->rank(), g % shard);
  EXPECT_EQ(replicate_comm->size(), replicas);
  MambaLM model(tiny(), 7);
  FsdpOptions o;
  o.replicate = replicate_comm;
  FsdpMamba fsdp(model, shard_comm, o);
  const auto& params = fsdp.local_parameters();
  optim::HybridOptimizer opt(params, optimizer(kind), fsdp.whole_shapes());
  orthogonalize_over(opt, fsdp, optimizer(kind).use_muon, shard_comm);
  Hybrid out;
  const int64_t per_rank = kGlobal / n, micro = per_rank % 2 == 0 ? per_rank / 2 : 1;
  out.outcome.losses = train_steps(fsdp, opt, kind, *all, micro, steps, replicas);  // every global rank its own rows
  for (size_t i = 0; i < params.size(); ++i) {
    out.local_numel += params[i].tensor.numel();
    const ShardLayout& l = fsdp.layout(i);
    out.predicted_numel += (l.shape[0] + shard - 1) / shard * l.row_numel;
    out.whole_numel += l.shape[0] * l.row_numel;
  }
  out.stats = fsdp.stats();
  out.outcome.params = fsdp.gather_whole();
  return out;
}
}  // namespace

// HSDP over an even number of ranks (4: 2 x 2; 2: 1 x 2) equals one process (1e-5) and plain FSDP
// over every rank; each rank holds 1 / shard of the model (its shard group's rows, padding apart).
TEST(Hsdp, MatchesOneProcessAndFsdp) {
  const int n = world().size;
  if (n < 2 || n % 2 != 0) GTEST_SKIP() << "HSDP needs an even number of ranks here";
  const int shard = n / 2;
  for (const std::string kind : {"hybrid"}) {  // Muon on the matrices, AdamW on the rest
    const Outcome ref = reference(kind);
    const Outcome fsdp = sharded(kind, mode(true, kNone), kGlobal / n % 2 == 0 ? kGlobal / n / 2 : 1);
    const Hybrid got = hybrid(kind, shard);
    for (int64_t s = 0; s < kSteps; ++s) {
      EXPECT_NEAR(got.outcome.losses[s], ref.losses[s], 1e-5 * std::abs(ref.losses[s])) << kind << " step " << s;
      EXPECT_NEAR(got.outcome.losses[s], fsdp.losses[s], 1e-5 * std::abs(ref.losses[s])) << kind << " step " << s;
    }
    ASSERT_EQ(got.outcome.params.size(), ref.params.size());
    for (size_t i = 0; i < ref.params.size(); ++i) {
      EXPECT_LT(rel_error(got.outcome.params[i].tensor, ref.params[i].tensor.detach()), 1e-5) << kind << " " << ref.params[i].name;
      EXPECT_LT(rel_error(got.outcome.params[i].tensor, fsdp.params[i].tensor), 1e-5) << kind << " " << ref.params[i].name;
    }
    // Memory: the model state of a rank is its shard group's part, 1 / shard of the model.
    EXPECT_EQ(got.local_numel, got.predicted_numel);
    EXPECT_GE(got.local_numel * shard, got.whole_numel);
    EXPECT_LE(static_cast<double>(got.local_numel * shard), 1.05 * static_cast<double>(got.whole_numel));
    // Gradients: one all-reduce over the replicas per unit and backward, of the reduce-scattered shard.
    EXPECT_EQ(got.stats.all_reduces, got.stats.reduce_scatters);
    EXPECT_EQ(got.stats.all_reduce_bytes * shard, got.stats.reduce_scatter_bytes);
  }
}

// Issue 19's defining test of packing, through the sharded model: rows packed with several documents
// each (seq_idx numbering them, the SSM and conv state reset at each start) give, on 1 to 4 ranks and
// with activation checkpointing or not, the logits and the parameter gradients that one process
// running every document alone gives (1e-5 relative, float32). Several forwards, then one backward.
TEST(Fsdp, PackedRowsEqualEachDocumentAlone) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  const int r = comm->rank(), n = comm->size();
  constexpr int64_t kRows = 12, kLen = 24;
  at::Generator gen = at::detail::createCPUGenerator(4242);
  const at::Tensor tokens = at::randint(61, {kRows, kLen}, gen, at::kLong);
  const at::Tensor weights = at::randn({kRows, kLen, 61}, gen, at::kFloat);  // loss = sum(logits * weights)
  // Each row's documents: lengths drawn at random (1 to 12 tokens; some rows a single document).
  at::Tensor seq_idx = at::zeros({kRows, kLen}, at::kInt);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> docs(kRows);  // (start, length)
  for (int64_t row = 0; row < kRows; ++row) {
    int64_t start = 0, number = 0;
    while (start < kLen) {
      int64_t len = row % 5 == 4 ? kLen : 1 + at::randint(12, {1}, gen, at::kLong).item<int64_t>();
      len = std::min(len, kLen - start);
      seq_idx[row].narrow(0, start, len).fill_(number++);
      docs[row].push_back({start, len});
      start += len;
    }
  }
  // One process, each document alone.
  MambaLM model(tiny(), 7);
  auto params = model.named_parameters();
  for (auto& p : params) p.tensor.requires_grad_(true);
  std::vector<at::Tensor> alone_logits(kRows);
  for (int64_t row = 0; row < kRows; ++row) {
    std::vector<at::Tensor> parts;
    for (auto [start, len] : docs[row]) {
      at::Tensor logits = model.forward(tokens[row].narrow(0, start, len).unsqueeze(0));
      (logits[0] * weights[row].narrow(0, start, len)).sum().backward();
      parts.push_back(logits[0].detach());
    }
    alone_logits[row] = at::cat(parts, 0);
  }
  for (auto ac : {ActivationCheckpointing::none, ActivationCheckpointing::full}) {
    MambaLM model2(tiny(), 7);
    FsdpOptions o;
    o.activation_checkpointing = ac;
    FsdpMamba fsdp(model2, comm, o);
    const int64_t per_rank = kRows / n;
    for (auto& p : fsdp.local_parameters()) p.tensor.mutable_grad() = at::Tensor();
    // Every row's forward (one row each, its own seq_idx), then one backward of them all: each
    // checkpointed block's recompute must see its own forward's seq_idx, not the last one's.
    at::Tensor loss = at::zeros({}, at::kFloat);
    for (int64_t row = r * per_rank; row < (r + 1) * per_rank; ++row) {
      at::Tensor logits = fsdp.forward(tokens.narrow(0, row, 1), seq_idx.narrow(0, row, 1));
      EXPECT_LT(rel_error(logits[0].detach(), alone_logits[row]), 1e-5) << "row " << row;
      loss = loss + (logits[0] * weights[row]).sum();
    }
    loss.backward();
    fsdp.finish_step();
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_LT(rel_error(fsdp.local_parameters()[i].tensor.grad(), fsdp.layout(i).slice(params[i].tensor.grad(), r)), 1e-5)
          << params[i].name << (ac == ActivationCheckpointing::full ? " (checkpointed)" : "");
  }
  // seq_idx's order is checked once, at the sharded model's forward, before any collective: every
  // rank gets the one-line error and none waits for the others (model/seq_idx.h).
  MambaLM model3(tiny(), 7);
  FsdpMamba fsdp3(model3, comm, true);
  try {
    fsdp3.forward(tokens.narrow(0, 0, 1), seq_idx.narrow(0, 0, 1).flip(1).contiguous());
    ADD_FAILURE() << "no error for a decreasing seq_idx";
  } catch (const coil::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("FsdpMamba::forward: seq_idx decreases within a row", 0), 0u) << e.what();
  }
}
