// Optimizers: Newton-Schulz, Muon's momentum and scaling, AdamW against hand computations and
// torch::optim::AdamW, the Mamba grouping table, schedules, clipping; the multi-tensor paths
// (foreach ops, LibTorch's fused AdamW, batched Newton-Schulz, the one-pass norm) against the
// per-tensor references, on CPU and (suites named *Cuda, skipped without a GPU) on CUDA; and the
// operator count of a whole step, which must not grow with the number of parameters.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "model/mamba.h"
#include "optim/adamw.h"
#include "optim/hybrid.h"
#include "optim/muon.h"
#include "optim/op_count.h"
#include "optim/schedule.h"
#include "util/error.h"

using namespace coil;
using namespace coil::optim;

TEST(NewtonSchulz, SingularValuesLandNearOne) {
  torch::manual_seed(0);
  // Shapes like the model's matrices (in_proj 2I x H, x_proj (R + 2N) x I, out_proj H x I), odd ones too.
  for (auto [r, c] : {std::pair<int64_t, int64_t>{256, 64}, {36, 128}, {64, 128}, {45, 17}, {17, 45}, {100, 7}}) {
    torch::Tensor g = torch::randn({r, c});
    torch::Tensor o = newton_schulz(g);
    ASSERT_EQ(o.sizes(), g.sizes());
    torch::Tensor s = torch::linalg_svdvals(o);
    EXPECT_GT(s.min().item<double>(), 0.5) << r << "x" << c;
    EXPECT_LT(s.max().item<double>(), 1.5) << r << "x" << c;
    // The tall case runs on the transpose: the same as orthogonalizing G^T and transposing back.
    EXPECT_TRUE(torch::allclose(newton_schulz(g.t()).t(), o, 1e-5, 1e-6));
    // The polar factor's direction: <O, G> > 0 and O's left singular vectors match G's.
    EXPECT_GT((o * g).sum().item<double>(), 0);
  }
  EXPECT_THROW(newton_schulz(torch::randn({3})), coil::Error);
}

TEST(Muon, MomentumNesterovDecayAndScaleByHand) {
  torch::Tensor p = torch::full({4, 2}, 1.0);
  MuonConfig c;
  c.weight_decay = 0.5;
  Muon muon(c);
  muon.add("w", p, /*decay=*/true);
  muon.set_orthogonalize([](const std::vector<size_t>&, const std::vector<at::Tensor>& u) { return u; });  // identity
  const double lr = 0.1, s = std::sqrt(4.0 / 2.0);  // keller: sqrt(max(1, rows / cols))
  torch::Tensor g1 = torch::full({4, 2}, 2.0), g2 = torch::full({4, 2}, -1.0);
  p.mutable_grad() = g1;
  muon.step(lr);
  // m = 0.05 * 2 = 0.1; u = 0.05 * 2 + 0.95 * 0.1 = 0.195; p = 1 * (1 - 0.05) - 0.1 * s * 0.195
  double m = 0.1, expected = 0.95 - lr * s * 0.195;
  EXPECT_NEAR(p[0][0].item<double>(), expected, 1e-6);
  p.mutable_grad() = g2;
  muon.step(lr);
  m = 0.95 * m + 0.05 * -1.0;
  const double u = 0.05 * -1.0 + 0.95 * m;
  expected = expected * 0.95 - lr * s * u;
  EXPECT_NEAR(p[3][1].item<double>(), expected, 1e-6);
  EXPECT_NEAR(muon.state()[0].tensor[0][0].item<double>(), m, 1e-7);
  EXPECT_EQ(muon.state()[0].name, "w.momentum");

  // Without Nesterov, the update is the momentum; with the default orthogonalization, NS of it.
  torch::manual_seed(1);
  torch::Tensor q = torch::randn({6, 10}), q0 = q.clone(), g = torch::randn({6, 10});
  MuonConfig plain;
  plain.nesterov = false;
  plain.weight_decay = 0;
  plain.scale = "moonlight";
  Muon m2(plain);
  m2.add("q", q, false);
  q.mutable_grad() = g;
  m2.step(0.01);
  torch::Tensor want = q0 - 0.01 * 0.2 * std::sqrt(10.0) * newton_schulz(g * 0.05);
  EXPECT_TRUE(torch::allclose(q, want, 1e-5, 1e-6));
  EXPECT_THROW(Muon(MuonConfig{0.95, true, 5, 0.1, "bogus"}), coil::Error);
  EXPECT_THROW(m2.add("v", torch::zeros({3}), false), coil::Error);
}

TEST(AdamW, HandComputation) {
  torch::Tensor p = torch::tensor({1.0f, -2.0f}), g = torch::tensor({0.5f, 0.25f});
  AdamWConfig c;
  c.beta1 = 0.9, c.beta2 = 0.95, c.eps = 1e-8, c.weight_decay = 0.1;
  AdamW opt(c);
  opt.add("p", p, true);
  p.mutable_grad() = g;
  opt.step(0.01);
  // Step 1: m = 0.1 g, v = 0.05 g^2; m^ = g, v^ = g^2: the update is lr * sign(g) (up to eps).
  EXPECT_NEAR(p[0].item<double>(), 1.0 * (1 - 0.001) - 0.01, 1e-6);
  EXPECT_NEAR(p[1].item<double>(), -2.0 * (1 - 0.001) - 0.01, 1e-6);
  opt.step(0.01);  // the same gradient again: m^ = g, v^ = g^2 still
  EXPECT_NEAR(p[0].item<double>(), (0.999 - 0.01) * 0.999 - 0.01, 1e-6);
}

TEST(AdamW, MatchesTorchAndTheReference) {
  torch::manual_seed(2);
  // Sizes across the fused pass's chunk boundary (16384) and odd ones.
  std::vector<torch::Tensor> ours, theirs, ref;
  for (int64_t n : {1, 7, 16385, 40000}) {
    torch::Tensor t = torch::randn({n});
    ours.push_back(t.clone());
    theirs.push_back(t.clone().requires_grad_(true));
    ref.push_back(t.clone());
  }
  AdamWConfig c;
  c.weight_decay = 0.1;
  AdamW opt(c);
  for (size_t i = 0; i < ours.size(); ++i) opt.add(std::to_string(i), ours[i], i != 1);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{theirs[0], theirs[2], theirs[3]},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.003).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{theirs[1]},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.003).betas({0.9, 0.95}).eps(1e-8).weight_decay(0)));
  torch::optim::AdamW torch_opt(groups, torch::optim::AdamWOptions(0.003));
  std::vector<torch::Tensor> m, v;
  for (auto& t : ref) m.push_back(torch::zeros_like(t)), v.push_back(torch::zeros_like(t));
  for (int step = 1; step <= 5; ++step) {
    for (size_t i = 0; i < ours.size(); ++i) {
      torch::Tensor g = torch::randn_like(ours[i]);
      ours[i].mutable_grad() = g.clone();
      theirs[i].mutable_grad() = g.clone();
      adamw_reference(ref[i], g, m[i], v[i], 0.003, i != 1 ? 0.1 : 0.0, c, step);
    }
    opt.step(0.003);
    torch_opt.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_TRUE(torch::allclose(ours[i], theirs[i].detach(), 1e-5, 1e-6)) << i;
    EXPECT_TRUE(torch::allclose(ours[i], ref[i], 1e-5, 1e-6)) << i;
  }
  // State round trip.
  AdamW again(c);
  std::vector<torch::Tensor> copies;
  for (size_t i = 0; i < ours.size(); ++i) copies.push_back(ours[i].clone()), again.add(std::to_string(i), copies[i], i != 1);
  again.load_state(opt.state(), opt.steps());
  for (size_t i = 0; i < ours.size(); ++i) {
    torch::Tensor g = torch::randn_like(ours[i]);
    ours[i].mutable_grad() = g.clone();
    copies[i].mutable_grad() = g.clone();
  }
  opt.step(0.001);
  again.step(0.001);
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_TRUE(torch::equal(ours[i], copies[i])) << i;
  EXPECT_THROW(again.load_state({}, 1), coil::Error);
}

TEST(Hybrid, GroupingOfTheMambaParameters) {
  MambaLM model(MambaConfig::preset("tiny"), 0);
  const std::string table = grouping_table(model.named_parameters());
  auto line = [&](const std::string& name) {
    size_t at = table.find(name + " ");
    EXPECT_NE(at, std::string::npos) << name;
    std::string l = table.substr(at, table.find('\n', at) - at);
    std::istringstream in(l);
    std::string n, shape, opt, decay;
    in >> n >> shape >> opt >> decay;
    return shape + " " + opt + " " + decay;
  };
  EXPECT_EQ(line("backbone.embeddings.weight"), "512x64 adamw yes");
  EXPECT_EQ(line("backbone.layers.0.norm.weight"), "64 adamw no");
  EXPECT_EQ(line("backbone.layers.0.mixer.in_proj.weight"), "256x64 muon yes");
  EXPECT_EQ(line("backbone.layers.0.mixer.conv1d.weight"), "128x1x4 adamw yes");
  EXPECT_EQ(line("backbone.layers.0.mixer.conv1d.bias"), "128 adamw no");
  EXPECT_EQ(line("backbone.layers.0.mixer.x_proj.weight"), "36x128 muon yes");
  EXPECT_EQ(line("backbone.layers.0.mixer.dt_proj.weight"), "128x4 adamw yes");
  EXPECT_EQ(line("backbone.layers.0.mixer.dt_proj.bias"), "128 adamw no");
  EXPECT_EQ(line("backbone.layers.1.mixer.A_log"), "128x16 adamw no");
  EXPECT_EQ(line("backbone.layers.1.mixer.D"), "128 adamw no");
  EXPECT_EQ(line("backbone.layers.1.mixer.out_proj.weight"), "64x128 muon yes");
  EXPECT_EQ(line("backbone.norm_f.weight"), "64 adamw no");
  // Muon gets exactly the 3 matrices of each block.
  HybridOptimizer opt(model.named_parameters(), HybridConfig{});
  int muon = 0, adamw = 0;
  for (auto& s : opt.state()) (s.name.rfind("muon.", 0) == 0 ? muon : adamw) += 1;
  EXPECT_EQ(muon, 3 * 2);
  EXPECT_EQ(adamw, 2 * (static_cast<int>(model.named_parameters().size()) - 6));
}

TEST(Schedule, ExactValues) {
  Schedule cos{"cosine", 10, 110, 0.1, 0.2};
  EXPECT_DOUBLE_EQ(cos.factor(0), 0.1);
  EXPECT_DOUBLE_EQ(cos.factor(4), 0.5);
  EXPECT_DOUBLE_EQ(cos.factor(9), 1.0);
  EXPECT_DOUBLE_EQ(cos.factor(10), 1.0);
  EXPECT_NEAR(cos.factor(59) + cos.factor(60), 1.1, 0.02);  // the midpoint (59.5) is 0.55
  EXPECT_NEAR(cos.factor(109), 0.1, 1e-12);
  EXPECT_NEAR(cos.factor(500), 0.1, 1e-12);
  Schedule wsd{"wsd", 10, 100, 0.1, 0.2};  // decay over the last 20 steps: 79 -> 99
  EXPECT_DOUBLE_EQ(wsd.factor(50), 1.0);
  EXPECT_DOUBLE_EQ(wsd.factor(79), 1.0);
  EXPECT_NEAR(wsd.factor(89), 0.55, 1e-12);
  EXPECT_NEAR(wsd.factor(99), 0.1, 1e-12);
  Schedule constant{"constant", 0, 10, 0.1, 0.2};
  EXPECT_DOUBLE_EQ(constant.factor(0), 1.0);
  EXPECT_THROW((Schedule{"linear", 0, 10, 0.1, 0.2}.validate()), coil::Error);
  EXPECT_THROW((Schedule{"cosine", 0, 0, 0.1, 0.2}.validate()), coil::Error);
}

TEST(Hybrid, GlobalNormClipping) {
  torch::Tensor a = torch::zeros({1}), b = torch::zeros({1});
  a.mutable_grad() = torch::tensor({3.0f});
  b.mutable_grad() = torch::tensor({4.0f});
  std::vector<NamedTensor> ps = {{"a", a}, {"b", b}};
  const double norm = std::sqrt(grad_sq_norm(ps));
  EXPECT_DOUBLE_EQ(norm, 5.0);
  clip_grads(ps, norm, 10.0);
  EXPECT_FLOAT_EQ(a.grad().item<float>(), 3.0f);
  clip_grads(ps, norm, 1.0);
  EXPECT_NEAR(a.grad().item<float>(), 0.6f, 1e-6);
  EXPECT_NEAR(b.grad().item<float>(), 0.8f, 1e-6);
}

namespace {
// max |a - b| / max |b|: the relative error of a tensor as a whole.
double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

// Matrices of shapes met several times (some tall, some wide, odd sizes) and once.
std::vector<torch::Tensor> random_matrices(torch::TensorOptions o = {}) {
  std::vector<torch::Tensor> out;
  for (auto [r, c, k] : {std::tuple<int64_t, int64_t, int>{45, 17, 3}, {17, 45, 2}, {64, 128, 4}, {100, 7, 1},
                         {33, 33, 2}})
    for (int i = 0; i < k; ++i) out.push_back(torch::randn({r, c}, o));
  std::swap(out[1], out[5]);  // shapes interleaved
  return out;
}
}  // namespace

TEST(NewtonSchulz, BatchedEqualsPerMatrix) {
  torch::manual_seed(3);
  // LibTorch's CPU bmm/baddbmm take a plain loop below 400 multiply-adds per product and MKL's
  // batched GEMM above it, whose rounding may depend on the batch (on AVX-512 Xeons 64 x 128
  // matrices in batches of 4 differ from one at a time by ~3e-6; on the AMD CI machine they did
  // not): equal to the per-matrix iteration within float32 rounding as Newton-Schulz amplifies it,
  // and deterministic, a stack giving the same bits every time.
  for (auto [k, r, c] : {std::tuple<int64_t, int64_t, int64_t>{1, 45, 17}, {3, 45, 17}, {2, 17, 45}, {4, 64, 128},
                         {5, 7, 100}, {2, 33, 33}, {3, 1, 9}, {3, 100, 8}}) {
    torch::Tensor stack = torch::randn({k, r, c});
    torch::Tensor batched = newton_schulz_batched(stack, 5);
    ASSERT_EQ(batched.sizes(), stack.sizes());
    ASSERT_TRUE(batched.is_contiguous());
    EXPECT_TRUE(torch::equal(newton_schulz_batched(stack, 5), batched)) << k << "x" << r << "x" << c;
    for (int64_t i = 0; i < k; ++i)
      EXPECT_LE(rel_err(batched[i], newton_schulz(stack[i], 5)), 2e-5) << k << "x" << r << "x" << c << " matrix " << i;
  }
  // A wrong batched iteration is far outside that tolerance: one step fewer is ~1e-1 away.
  torch::Tensor stack = torch::randn({3, 45, 17});
  EXPECT_GT(rel_err(newton_schulz_batched(stack, 4)[1], newton_schulz(stack[1], 5)), 1e-2);
  EXPECT_THROW(newton_schulz_batched(torch::randn({4, 4})), coil::Error);
}

TEST(NewtonSchulz, ManyBatchesByShapeAndObservesEachMatrixOnce) {
  torch::manual_seed(4);
  std::vector<torch::Tensor> ms = random_matrices();
  std::vector<std::vector<int64_t>> seen;
  observe_newton_schulz([&](const at::Tensor& m) { seen.push_back(m.sizes().vec()); });
  std::vector<torch::Tensor> out = newton_schulz_many(ms, 5);
  observe_newton_schulz({});
  ASSERT_EQ(out.size(), ms.size());
  ASSERT_EQ(seen.size(), ms.size());
  std::map<std::vector<int64_t>, int> want, got;
  for (auto& m : ms) ++want[m.sizes().vec()];
  for (auto& s : seen) ++got[s];
  EXPECT_EQ(got, want);
  // Each matrix is its shape's stack's row (bit for bit), a shape met once newton_schulz itself.
  std::map<std::vector<int64_t>, std::vector<size_t>> members;
  for (size_t i = 0; i < ms.size(); ++i) members[ms[i].sizes().vec()].push_back(i);
  for (const auto& [shape, idx] : members) {
    std::vector<torch::Tensor> stack;
    for (size_t i : idx) stack.push_back(ms[i]);
    const torch::Tensor want = idx.size() == 1 ? newton_schulz(ms[idx[0]], 5).unsqueeze(0)
                                               : newton_schulz_batched(torch::stack(stack), 5);
    for (size_t k = 0; k < idx.size(); ++k) {
      ASSERT_EQ(out[idx[k]].sizes(), ms[idx[k]].sizes()) << idx[k];
      EXPECT_TRUE(torch::equal(out[idx[k]], want[int64_t(k)])) << idx[k];
    }
  }
  // Batches capped at 3 matrices of 64 x 128 (and below one 45 x 17 matrix: one at a time).
  seen.clear();
  observe_newton_schulz([&](const at::Tensor& m) { seen.push_back(m.sizes().vec()); });
  std::vector<torch::Tensor> capped = newton_schulz_many(ms, 5, 3 * 64 * 128);
  observe_newton_schulz({});
  EXPECT_EQ(seen.size(), ms.size());
  for (size_t i = 0; i < ms.size(); ++i) EXPECT_LE(rel_err(capped[i], out[i]), 2e-5) << i;
  // The four 64 x 128 matrices (ms[1], ms[6..8]) as a batch of 3 and a batch of 1.
  const torch::Tensor first3 = newton_schulz_batched(torch::stack({ms[1], ms[6], ms[7]}), 5);
  EXPECT_TRUE(torch::equal(capped[1], first3[0]) && torch::equal(capped[6], first3[1]) && torch::equal(capped[7], first3[2]));
  EXPECT_TRUE(torch::equal(capped[8], newton_schulz_batched(ms[8].unsqueeze(0), 5)[0]));
  EXPECT_TRUE(newton_schulz_many({}, 5).empty());
  EXPECT_THROW(newton_schulz_many({torch::randn({4, 4}), torch::randn({4})}, 5), coil::Error);
}

TEST(Muon, ForeachStepEqualsTheReference) {
  for (bool nesterov : {true, false})
    for (const char* scale : {"keller", "moonlight"}) {
      torch::manual_seed(5);
      std::vector<torch::Tensor> init = random_matrices();
      MuonConfig c;
      c.nesterov = nesterov;
      c.scale = scale;
      Muon fast(c), ref(c);
      ref.set_reference(true);
      std::vector<torch::Tensor> a, b;
      for (size_t i = 0; i < init.size(); ++i) {
        a.push_back(init[i].clone());
        b.push_back(init[i].clone());
        fast.add(std::to_string(i), a[i], i % 3 != 0);
        ref.add(std::to_string(i), b[i], i % 3 != 0);
      }
      for (int step = 0; step < 3; ++step) {
        for (size_t i = 0; i < init.size(); ++i) {
          if (step == 1 && i == 2) {  // a parameter without a gradient this step
            a[i].mutable_grad() = torch::Tensor();
            b[i].mutable_grad() = torch::Tensor();
            continue;
          }
          torch::Tensor g = torch::randn_like(init[i]);
          a[i].mutable_grad() = g.clone();
          b[i].mutable_grad() = g.clone();
        }
        fast.step(0.02);
        ref.step(0.02);
      }
      for (size_t i = 0; i < init.size(); ++i) {
        // The momentum: the same ops grouped, bit for bit. The parameters: batched Newton-Schulz is
        // the per-matrix one within float32 rounding (NewtonSchulz.BatchedEqualsPerMatrix), the
        // rest bit for bit (Muon.ForeachStepWithAnIdentityOrthogonalizationIsBitForBit).
        EXPECT_TRUE(torch::equal(fast.state()[i].tensor, ref.state()[i].tensor)) << i << " " << scale;
        EXPECT_LE(rel_err(a[i], b[i]), 1e-6) << i << " " << scale << " " << nesterov;
        EXPECT_GT(rel_err(a[i], init[i]), 1e-4) << i << ": the step moved the parameter";
      }
    }
}

TEST(Muon, ForeachStepWithAnIdentityOrthogonalizationIsBitForBit) {
  // Without Newton-Schulz in between, every op of the step is the reference's.
  torch::manual_seed(6);
  std::vector<torch::Tensor> init = random_matrices();
  auto identity = [](const std::vector<size_t>&, const std::vector<at::Tensor>& u) { return u; };
  Muon fast(MuonConfig{}), ref(MuonConfig{});
  ref.set_reference(true);
  fast.set_orthogonalize(identity);
  ref.set_orthogonalize(identity);
  std::vector<torch::Tensor> a, b;
  for (size_t i = 0; i < init.size(); ++i) {
    a.push_back(init[i].clone()), b.push_back(init[i].clone());
    fast.add(std::to_string(i), a[i], i % 2 == 0);
    ref.add(std::to_string(i), b[i], i % 2 == 0);
  }
  for (int step = 0; step < 3; ++step) {
    for (size_t i = 0; i < init.size(); ++i) {
      torch::Tensor g = torch::randn_like(init[i]);
      a[i].mutable_grad() = g.clone(), b[i].mutable_grad() = g.clone();
    }
    fast.step(0.02);
    ref.step(0.02);
  }
  for (size_t i = 0; i < init.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << i;
}

namespace {
// Runs AdamW with each kernel on copies of the same tensors and gradients; returns the parameters
// and state of each, in AdamWKernel order.
struct AdamWRun {
  std::vector<torch::Tensor> params;
  std::vector<NamedTensor> state;
};
std::vector<AdamWRun> run_adamw_kernels(const std::vector<torch::Tensor>& init, int steps) {
  const std::vector<AdamWKernel> kernels = {AdamWKernel::automatic, AdamWKernel::reference, AdamWKernel::foreach,
                                            AdamWKernel::torch_fused};
  std::vector<AdamWRun> runs(kernels.size());
  std::vector<std::unique_ptr<AdamW>> opts;
  for (size_t k = 0; k < kernels.size(); ++k) {
    opts.push_back(std::make_unique<AdamW>(AdamWConfig{}));
    opts[k]->set_kernel(kernels[k]);
    for (size_t i = 0; i < init.size(); ++i) {
      runs[k].params.push_back(init[i].clone());
      opts[k]->add(std::to_string(i), runs[k].params[i], i % 3 != 1);
    }
  }
  for (int step = 1; step <= steps; ++step) {
    for (size_t i = 0; i < init.size(); ++i) {
      // Drawn on CPU: the same gradients whatever the device.
      torch::Tensor g = step == 2 && i == 0 ? torch::Tensor() : torch::randn(init[i].sizes()).to(init[i].options());
      for (auto& r : runs) r.params[i].mutable_grad() = g.defined() ? g.clone() : g;
    }
    for (auto& o : opts) o->step(1e-3 * step);
  }
  for (size_t k = 0; k < kernels.size(); ++k) runs[k].state = opts[k]->state();
  return runs;
}
}  // namespace

TEST(AdamW, ForeachAndTorchFusedEqualTheReference) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> init;
  for (auto shape : {std::vector<int64_t>{1}, {7}, {16385}, {33, 5}, {3, 1, 4}, {40000}})
    init.push_back(torch::randn(shape));
  std::vector<AdamWRun> runs = run_adamw_kernels(init, 4);
  const AdamWRun &cpu_pass = runs[0], &ref = runs[1], &foreach_ = runs[2], &fused = runs[3];
  for (size_t i = 0; i < init.size(); ++i) {
    // The foreach ops on CPU are the reference's ops: bit for bit.
    EXPECT_TRUE(torch::equal(foreach_.params[i], ref.params[i])) << i;
    // Our CPU pass and LibTorch's fused kernel round differently: 1e-6 relative.
    EXPECT_LE(rel_err(cpu_pass.params[i], ref.params[i]), 1e-6) << i;
    EXPECT_LE(rel_err(fused.params[i], ref.params[i]), 1e-6) << i;
    EXPECT_FALSE(torch::equal(fused.params[i], init[i])) << i;
  }
  for (size_t j = 0; j < ref.state.size(); ++j) {
    EXPECT_TRUE(torch::equal(foreach_.state[j].tensor, ref.state[j].tensor)) << ref.state[j].name;
    EXPECT_LE(rel_err(fused.state[j].tensor, ref.state[j].tensor), 1e-6) << ref.state[j].name;
    EXPECT_LE(rel_err(cpu_pass.state[j].tensor, ref.state[j].tensor), 1e-6) << ref.state[j].name;
  }
}

TEST(AdamW, AutomaticTakesForeachForWhatTheCpuPassCannotFuse) {
  // bfloat16 and non-contiguous tensors: automatic == foreach == reference, bit for bit on CPU.
  torch::manual_seed(8);
  std::vector<torch::Tensor> init = {torch::randn({9, 5}).to(torch::kBFloat16), torch::randn({6, 11}).t(),
                                     torch::randn({13})};
  std::vector<AdamWRun> runs = run_adamw_kernels(init, 3);
  for (size_t i = 0; i < init.size(); ++i) {
    EXPECT_TRUE(torch::equal(runs[2].params[i], runs[1].params[i])) << i;
    if (i < 2) {
      EXPECT_TRUE(torch::equal(runs[0].params[i], runs[1].params[i])) << i;
    }
  }
  // LibTorch's fused kernel wants contiguous tensors, each gradient of its parameter's dtype.
  AdamWLists bad;
  bad.params = {torch::zeros({3})};
  bad.grads = {torch::zeros({3}, torch::kDouble)};
  bad.exp_avgs = {torch::zeros({3})};
  bad.exp_avg_sqs = {torch::zeros({3})};
  bad.weight_decays = {0.0};
  EXPECT_THROW(adamw_torch_fused(bad, 1e-3, AdamWConfig{}, 1), coil::Error);
  bad.grads = {torch::zeros({3})};
  bad.weight_decays.clear();  // lists of unequal lengths
  EXPECT_THROW(adamw_torch_fused(bad, 1e-3, AdamWConfig{}, 1), coil::Error);
  EXPECT_THROW(adamw_foreach(bad, 1e-3, AdamWConfig{}, 1), coil::Error);
}

TEST(Hybrid, OnePassNormAndClipEqualTheReference) {
  torch::manual_seed(9);
  std::vector<NamedTensor> ps, qs;
  int i = 0;
  for (auto shape : {std::vector<int64_t>{1}, {7}, {16385}, {33, 5}, {3, 1, 4}, {50000}, {2, 2}}) {
    torch::Tensor p = torch::zeros(shape), q = torch::zeros(shape);
    if (i != 3) {  // one parameter without a gradient
      torch::Tensor g = torch::randn(shape) * std::pow(10.0, i - 3);  // magnitudes 1e-3 .. 1e3
      p.mutable_grad() = g.clone(), q.mutable_grad() = g.clone();
    }
    ps.push_back({"p" + std::to_string(i), p});
    qs.push_back({"p" + std::to_string(i), q});
    ++i;
  }
  const double want = grad_sq_norm_reference(ps);
  EXPECT_NEAR(grad_sq_norm(ps), want, 1e-12 * want);
  EXPECT_EQ(grad_sq_norm_tensor(ps).scalar_type(), torch::kDouble);
  EXPECT_EQ(grad_sq_norm({}), 0.0);
  {
    OpCounter counter;
    grad_sq_norm(ps);
    EXPECT_EQ(counter.counts().host_syncs, 1);
  }
  const double norm = std::sqrt(want);
  clip_grads(ps, norm, norm / 3);
  clip_grads_reference(qs, norm, norm / 3);
  for (size_t k = 0; k < ps.size(); ++k)
    if (k != 3) {
      EXPECT_TRUE(torch::equal(ps[k].tensor.grad(), qs[k].tensor.grad())) << k;
    }
  torch::Tensor before = ps[0].tensor.grad().clone();
  clip_grads(ps, norm, 0);  // no clipping
  clip_grads(ps, norm, norm * 2);
  EXPECT_TRUE(torch::equal(ps[0].tensor.grad(), before));
}

namespace {
// The top-level operators and host syncs of one hybrid step (norm, clip, Muon, AdamW) of a tiny
// model with `layers` blocks.
OpCounts count_hybrid_step(int layers, bool reference, torch::Device device = torch::kCPU) {
  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.n_layer = layers;
  MambaLM model(cfg, 0);
  model.to(device);
  std::vector<NamedTensor> params = model.named_parameters();
  HybridOptimizer opt(params, HybridConfig{});
  opt.muon().set_reference(reference);
  opt.adamw().set_kernel(reference ? AdamWKernel::reference : AdamWKernel::automatic);
  for (auto& p : params) p.tensor.mutable_grad() = torch::randn_like(p.tensor);
  OpCounter counter;
  const double norm = std::sqrt(reference ? grad_sq_norm_reference(params) : grad_sq_norm(params));
  reference ? clip_grads_reference(params, norm, 0.01) : clip_grads(params, norm, 0.01);
  opt.step(0.02, 1e-3);
  return counter.counts();
}
}  // namespace

TEST(Hybrid, StepOperatorsDoNotGrowWithTheParameters) {
  torch::manual_seed(10);
  const OpCounts two = count_hybrid_step(2, false), six = count_hybrid_step(6, false);
  EXPECT_EQ(two.top_level, six.top_level);
  EXPECT_EQ(six.host_syncs, 1);
  // The references grow with every layer (a host sync per gradient among others).
  const OpCounts ref_two = count_hybrid_step(2, true), ref_six = count_hybrid_step(6, true);
  EXPECT_GT(ref_six.top_level, ref_two.top_level + 4 * 10);
  EXPECT_EQ(ref_six.host_syncs, 6 * 10 + 2);  // 10 parameters a block, the embedding and norm_f
}

// ---- CUDA (skipped without a GPU) ---------------------------------------------------------------

namespace {
// ||a - b|| / ||b|| (Frobenius): bfloat16 Newton-Schulz's differences are spread over every entry.
double rel_fro(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor x = a.to(torch::kCPU, torch::kDouble), y = b.to(torch::kCPU, torch::kDouble);
  return (x - y).norm().item<double>() / y.norm().item<double>();
}
}  // namespace

TEST(AdamWCuda, FusedAndForeachMatchTheReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  std::vector<torch::Tensor> cpu;
  torch::manual_seed(11);
  for (auto shape : {std::vector<int64_t>{1}, {7}, {16385}, {33, 5}, {3, 1, 4}, {40000}})
    cpu.push_back(torch::randn(shape));
  std::vector<torch::Tensor> gpu;
  for (auto& t : cpu) gpu.push_back(t.to(torch::kCUDA));
  torch::manual_seed(12);
  std::vector<AdamWRun> on_cpu = run_adamw_kernels(cpu, 4);
  torch::manual_seed(12);
  std::vector<AdamWRun> on_gpu = run_adamw_kernels(gpu, 4);
  for (size_t i = 0; i < cpu.size(); ++i) {
    const torch::Tensor& ref = on_gpu[1].params[i];
    EXPECT_LE(rel_err(ref.cpu(), on_cpu[1].params[i]), 1e-6) << i;           // CUDA reference == CPU's
    EXPECT_LE(rel_err(on_gpu[0].params[i].cpu(), ref.cpu()), 1e-6) << i;     // automatic: _fused_adamw_
    EXPECT_LE(rel_err(on_gpu[2].params[i].cpu(), ref.cpu()), 1e-6) << i;     // foreach
    EXPECT_LE(rel_err(on_gpu[3].params[i].cpu(), ref.cpu()), 1e-6) << i;     // torch_fused
    EXPECT_FALSE(torch::equal(on_gpu[0].params[i].cpu(), cpu[i])) << i;
  }
  for (size_t j = 0; j < on_gpu[1].state.size(); ++j) {
    EXPECT_LE(rel_err(on_gpu[0].state[j].tensor.cpu(), on_gpu[1].state[j].tensor.cpu()), 1e-6) << j;
    EXPECT_LE(rel_err(on_gpu[2].state[j].tensor.cpu(), on_gpu[1].state[j].tensor.cpu()), 1e-6) << j;
  }
  // On CUDA automatic is LibTorch's fused kernel: one call per weight decay, no host sync.
  std::vector<torch::Tensor> ps = {gpu[0].clone(), gpu[1].clone(), gpu[2].clone()};
  AdamW opt(AdamWConfig{});
  for (size_t i = 0; i < ps.size(); ++i) {
    opt.add(std::to_string(i), ps[i], i != 1);
    ps[i].mutable_grad() = torch::randn_like(ps[i]);
  }
  OpCounter counter;
  opt.step(1e-3);
  EXPECT_EQ(counter.counts().top_level_by_name.at("aten::_fused_adamw_"), 2);
  EXPECT_EQ(counter.counts().host_syncs, 0);
}

TEST(MuonCuda, BatchedMatchesPerMatrix) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(13);
  // Rectangular Gaussian matrices only: their smallest singular values stay away from 0, where
  // Newton-Schulz would amplify bfloat16's rounding (by up to 3.4445 per iteration).
  std::vector<torch::Tensor> cpu, gpu;
  for (auto [r, c, k] : {std::tuple<int64_t, int64_t, int>{45, 17, 3}, {17, 45, 2}, {64, 128, 4}, {100, 7, 1},
                         {96, 40, 2}})
    for (int i = 0; i < k; ++i) cpu.push_back(torch::randn({r, c}));
  for (auto& m : cpu) gpu.push_back(m.to(torch::kCUDA));
  std::vector<torch::Tensor> batched = newton_schulz_many(gpu, 5);
  for (size_t i = 0; i < gpu.size(); ++i) {
    ASSERT_EQ(batched[i].sizes(), gpu[i].sizes());
    EXPECT_EQ(batched[i].scalar_type(), torch::kFloat);
    // bfloat16 on CUDA: batched == per-matrix up to bfloat16 rounding, and near CPU's float32.
    EXPECT_LE(rel_fro(batched[i], newton_schulz(gpu[i], 5)), 2e-2) << i;
    EXPECT_LE(rel_fro(batched[i], newton_schulz(cpu[i], 5)), 5e-2) << i;
  }
  // A whole step: the momentum is float32 foreach ops (== the per-tensor ops), the update bf16.
  Muon fast(MuonConfig{}), ref(MuonConfig{});
  ref.set_reference(true);
  std::vector<torch::Tensor> a, b;
  for (size_t i = 0; i < gpu.size(); ++i) {
    a.push_back(gpu[i].clone()), b.push_back(gpu[i].clone());
    fast.add(std::to_string(i), a[i], true);
    ref.add(std::to_string(i), b[i], true);
  }
  for (int step = 0; step < 2; ++step) {
    for (size_t i = 0; i < gpu.size(); ++i) {
      torch::Tensor g = torch::randn_like(gpu[i]);
      a[i].mutable_grad() = g.clone(), b[i].mutable_grad() = g.clone();
    }
    fast.step(0.02);
    ref.step(0.02);
  }
  for (size_t i = 0; i < gpu.size(); ++i) {
    EXPECT_LE(rel_err(fast.state()[i].tensor.cpu(), ref.state()[i].tensor.cpu()), 1e-6) << i;
    EXPECT_LE(rel_fro(a[i] - gpu[i], b[i] - gpu[i]), 2e-2) << i;
  }
}

TEST(HybridCuda, OnePassNormAndAStepOfConstantOperators) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(14);
  std::vector<NamedTensor> ps;
  for (auto shape : {std::vector<int64_t>{1}, {7}, {16385}, {33, 5}, {3, 1, 4}, {500000}}) {
    torch::Tensor p = torch::zeros(shape, torch::kCUDA);
    p.mutable_grad() = torch::randn(shape, torch::kCUDA) * 10;
    ps.push_back({"p" + std::to_string(ps.size()), p});
  }
  const double want = grad_sq_norm_reference(ps);
  {
    OpCounter counter;
    EXPECT_NEAR(grad_sq_norm(ps), want, 1e-6 * want);
    EXPECT_EQ(counter.counts().host_syncs, 1);
  }
  const OpCounts two = count_hybrid_step(2, false, torch::kCUDA), six = count_hybrid_step(6, false, torch::kCUDA);
  EXPECT_EQ(two.top_level, six.top_level);
  EXPECT_EQ(six.host_syncs, 1);
}
