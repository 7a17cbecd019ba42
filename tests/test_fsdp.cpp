// FSDP-style sharding under mpirun (1 to 4 ranks): the same losses and final parameters as one
// process training the whole model on the same global batches, for the hybrid optimizer, Muon alone
// and AdamW alone, resharding after forward or not; Muon orthogonalizes whole matrices only, each
// once; a rank holds only its shards (plus one gathered unit at a time).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
#include "model/mamba.h"
#include "optim/hybrid.h"

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

at::Tensor batch(int64_t step) {  // the global batch of a step, the same on every rank
  at::Generator gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(step));
  return at::randint(61, {kGlobal, kSeq + 1}, gen, at::kLong);
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
Outcome reference(const std::string& kind) {
  MambaLM model(tiny(), 7);
  auto params = model.named_parameters();
  for (auto& p : params) p.tensor.requires_grad_(true);
  optim::HybridOptimizer opt(params, optimizer(kind));
  Outcome out;
  for (int64_t s = 0; s < kSteps; ++s) {
    at::Tensor t = batch(s);
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    at::Tensor loss = loss_sum(model.forward(t.narrow(1, 0, kSeq)), t.narrow(1, 1, kSeq)) / (kGlobal * kSeq);
    loss.backward();
    optim::clip_grads(params, std::sqrt(optim::grad_sq_norm(params)), kClip);
    opt.step(0.02, lr_adamw(kind));
    out.losses.push_back(loss.item<double>());
  }
  out.params = params;
  return out;
}

// The same on this rank's shards and slice of every global batch, in micro batches.
Outcome sharded(const std::string& kind, bool reshard, int64_t micro) {
  auto comm = std::shared_ptr<Comm>(make_mpi_comm());
  const int r = comm->rank(), n = comm->size();
  MambaLM model(tiny(), 7);
  FsdpMamba fsdp(model, comm, reshard);
  const auto& params = fsdp.local_parameters();
  optim::HybridOptimizer opt(params, optimizer(kind), fsdp.whole_shapes());
  std::vector<ShardLayout> muon_layouts;
  for (size_t i = 0; i < params.size(); ++i)
    if (optimizer(kind).use_muon && optim::group_of(params[i].name, static_cast<int64_t>(fsdp.layout(i).shape.size())).muon)
      muon_layouts.push_back(fsdp.layout(i));
  opt.muon().set_orthogonalize(sharded_orthogonalize(comm, muon_layouts, 5));
  Outcome out;
  const int64_t per_rank = kGlobal / n;
  for (int64_t s = 0; s < kSteps; ++s) {
    at::Tensor t = batch(s).narrow(0, r * per_rank, per_rank);
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    double loss = 0;
    for (int64_t m = 0; m < per_rank / micro; ++m) {
      at::Tensor mb = t.narrow(0, m * micro, micro);
      at::Tensor l = loss_sum(fsdp.forward(mb.narrow(1, 0, kSeq)), mb.narrow(1, 1, kSeq)) / (kGlobal * kSeq);
      l.backward();
      loss += l.item<double>();
    }
    fsdp.finish_step();
    at::Tensor sums = at::tensor({loss, optim::grad_sq_norm(params)}, at::kDouble);
    comm->all_reduce(sums);
    optim::clip_grads(params, std::sqrt(sums[1].item<double>()), kClip);
    opt.step(0.02, lr_adamw(kind));
    out.losses.push_back(sums[0].item<double>());
  }
  out.params = fsdp.gather_whole();
  return out;
}

double rel_error(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

}  // namespace

TEST(Fsdp, MatchesOneProcess) {
  const int n = world().size;
  for (const std::string kind : {"hybrid", "muon", "adamw"}) {
    Outcome ref = reference(kind);
    for (bool reshard : {true, false}) {
      if (kind != "hybrid" && !reshard) continue;
      const int64_t per_rank = kGlobal / n, micro = per_rank % 2 == 0 ? per_rank / 2 : 1;  // with accumulation
      Outcome got = sharded(kind, reshard, micro);
      for (int64_t s = 0; s < kSteps; ++s)
        EXPECT_NEAR(got.losses[s], ref.losses[s], 1e-5 * std::abs(ref.losses[s])) << kind << " step " << s;
      ASSERT_EQ(got.params.size(), ref.params.size());
      for (size_t i = 0; i < ref.params.size(); ++i)
        EXPECT_LT(rel_error(got.params[i].tensor, ref.params[i].tensor.detach()), 1e-5)
            << kind << " reshard " << reshard << " " << ref.params[i].name;
    }
  }
}

TEST(Fsdp, MuonOrthogonalizesWholeMatricesOnceEach) {
  std::vector<std::vector<int64_t>> seen;
  optim::observe_newton_schulz([&](const at::Tensor& m) { seen.push_back(m.sizes().vec()); });
  sharded("hybrid", true, kGlobal / world().size);
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
  std::vector<ShardLayout> muon_layouts;
  for (size_t i = 0; i < params.size(); ++i)
    if (optim::group_of(params[i].name, static_cast<int64_t>(fsdp.layout(i).shape.size())).muon) muon_layouts.push_back(fsdp.layout(i));
  b.muon().set_orthogonalize(sharded_orthogonalize(comm, muon_layouts, 5));
  a.step(0.02, 3e-3);
  b.step(0.02, 3e-3);
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LT(rel_error(fsdp.local_parameters()[i].tensor.detach(), fsdp.layout(i).slice(params[i].tensor.detach(), r)), 1e-6) << "after step " << params[i].name;
}
