// Optimizers: Newton-Schulz, Muon's momentum and scaling, AdamW against hand computations and
// torch::optim::AdamW, the Mamba grouping table, schedules, clipping.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "model/mamba.h"
#include "optim/adamw.h"
#include "optim/hybrid.h"
#include "optim/muon.h"
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
