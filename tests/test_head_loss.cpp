// The fused LM head + cross-entropy against its plain reference (linear, then cross_entropy): the
// loss and both gradients on random shapes, odd sizes and every chunking, rows that do not count,
// an incoming gradient other than 1, no-grad and one-input-only paths, 16-bit inputs, bad input;
// and its memory: no [T, V] tensor is kept for backward. MambaLM::loss_sum against the logits of
// forward() and cross_entropy: packed rows, masked targets, bfloat16, activation checkpointing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <tuple>
#include <vector>

#include "model/head_loss.h"
#include "model/mamba.h"
#include "util/cpu_memory.h"
#include "util/error.h"

namespace coil {
namespace {

using torch::Tensor;

struct Case {
  Tensor x, W, targets;
};

// Targets in [0, V), about a third of them -100 when `ignore`.
Case make_case(int64_t T, int64_t H, int64_t V, torch::Dtype dtype, bool ignore, uint64_t seed) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(dtype);
  Case c{torch::randn({T, H}, o), torch::randn({V, H}, o) * 0.5, torch::randint(0, V, {T}, torch::kLong)};
  if (ignore) c.targets.masked_fill_(torch::rand({T}) < 0.33, -100);
  return c;
}

// loss * scale, backward, then (loss, dx, dW) of either function.
template <typename Fn>
std::tuple<Tensor, Tensor, Tensor> run(Fn fn, const Case& c, double scale) {
  Tensor x = c.x.clone().requires_grad_(true), W = c.W.clone().requires_grad_(true);
  Tensor loss = fn(x, W, c.targets);
  (loss * scale).backward();
  return {loss.detach(), x.grad(), W.grad()};
}

void expect_close(const Tensor& a, const Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double err = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  const double ref = b.to(torch::kDouble).abs().max().item<double>();
  EXPECT_LE(err, tol * std::max(ref, 1e-30)) << what << ": max error " << err << " against max " << ref;
}

TEST(FusedLinearCrossEntropy, EqualsLinearThenCrossEntropyOnRandomShapes) {
  // (T, H, V, chunk): odd sizes, a chunk of one row, chunks that do not divide T, one chunk, auto.
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> shapes{
      {1, 1, 2, 0}, {7, 5, 11, 1}, {13, 8, 37, 4}, {33, 16, 101, 7}, {64, 24, 257, 64}, {50, 9, 3, 1000}, {129, 32, 500, 0}};
  uint64_t seed = 1;
  for (auto dtype : {torch::kFloat64, torch::kFloat32}) {
    for (const auto& [T, H, V, chunk] : shapes) {
      for (int ignore : {0, 1, 2}) {  // every row counts; rows that do not, skipped (CPU's way) or masked (CUDA's)
        const Case c = make_case(T, H, V, dtype, ignore > 0, seed++);
        const double scale = 0.37;  // an incoming gradient other than 1 (a mean's 1 / count, a loss scale)
        auto fused = [chunk = chunk, ignore](const Tensor& x, const Tensor& W, const Tensor& t) {
          return fused_linear_cross_entropy(x, W, t, chunk, ignore != 2);
        };
        const auto [l1, dx1, dW1] = run(fused, c, scale);
        const auto [l0, dx0, dW0] = run(linear_cross_entropy_ref, c, scale);
        const double tol = dtype == torch::kFloat64 ? 1e-12 : 2e-5;
        const std::string what = "T " + std::to_string(T) + " H " + std::to_string(H) + " V " + std::to_string(V) +
                                 " chunk " + std::to_string(chunk) + (ignore == 1 ? " rows skipped" : ignore == 2 ? " rows masked" : "") +
                                 (dtype == torch::kFloat64 ? " float64" : " float32");
        EXPECT_EQ(l1.scalar_type(), l0.scalar_type()) << what;
        expect_close(l1, l0, tol, what + " loss");
        expect_close(dx1, dx0, tol, what + " dx");
        expect_close(dW1, dW0, tol, what + " dW");
        EXPECT_EQ(dx1.scalar_type(), dtype);
        EXPECT_EQ(dW1.scalar_type(), dtype);
      }
    }
  }
}

TEST(FusedLinearCrossEntropy, RowsThatDoNotCountGiveNothing) {
  Case c = make_case(9, 6, 13, torch::kFloat64, false, 7);
  c.targets.fill_(-100);
  for (bool skip : {true, false}) {
    const auto [loss, dx, dW] =
        run([skip](auto& x, auto& W, auto& t) { return fused_linear_cross_entropy(x, W, t, 4, skip); }, c, 1.0);
    EXPECT_EQ(loss.item<double>(), 0.0);
    EXPECT_EQ(dx.sizes(), c.x.sizes());
    EXPECT_EQ(dx.abs().max().item<double>(), 0.0);
    EXPECT_EQ(dW.abs().max().item<double>(), 0.0);
  }
  // No rows at all: a zero loss, and gradients of the right shapes.
  const Case e{torch::zeros({0, 6}, torch::kFloat64), c.W, torch::zeros({0}, torch::kLong)};
  const auto [l0, dx0, dW0] = run([](auto& x, auto& W, auto& t) { return fused_linear_cross_entropy(x, W, t); }, e, 1.0);
  EXPECT_EQ(l0.item<double>(), 0.0);
  EXPECT_EQ(dx0.sizes(), (std::vector<int64_t>{0, 6}));
  EXPECT_EQ(dW0.abs().max().item<double>(), 0.0);
}

TEST(FusedLinearCrossEntropy, OneInputOnlyAndNoGradient) {
  const Case c = make_case(21, 10, 31, torch::kFloat64, true, 11);
  const Tensor ref = linear_cross_entropy_ref(c.x, c.W, c.targets);
  {
    torch::NoGradGuard no_grad;
    Tensor x = c.x.clone().requires_grad_(true);
    const Tensor l = fused_linear_cross_entropy(x, c.W, c.targets, 5);
    EXPECT_FALSE(l.requires_grad());
    expect_close(l, ref, 1e-12, "no-grad loss");
  }
  // Only W wants a gradient (a frozen input), then only x (a frozen head).
  Tensor W = c.W.clone().requires_grad_(true);
  fused_linear_cross_entropy(c.x, W, c.targets, 5).backward();
  Tensor W0 = c.W.clone().requires_grad_(true);
  linear_cross_entropy_ref(c.x, W0, c.targets).backward();
  expect_close(W.grad(), W0.grad(), 1e-12, "dW alone");
  Tensor x = c.x.clone().requires_grad_(true);
  fused_linear_cross_entropy(x, c.W, c.targets, 5).backward();
  Tensor x0 = c.x.clone().requires_grad_(true);
  linear_cross_entropy_ref(x0, c.W, c.targets).backward();
  expect_close(x.grad(), x0.grad(), 1e-12, "dx alone");
}

TEST(FusedLinearCrossEntropy, SixteenBitInputsComputeAsThePlainWay) {
  // bfloat16 / float16 products, float32 softmax: as linear in 16 bits, then cross_entropy in float32.
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    const Case c = make_case(40, 16, 97, torch::kFloat32, true, 13);
    const Case h{c.x.to(dtype), c.W.to(dtype), c.targets};
    const auto [l1, dx1, dW1] = run([](auto& x, auto& W, auto& t) { return fused_linear_cross_entropy(x, W, t, 6); }, h, 1.0);
    const auto [l0, dx0, dW0] = run(linear_cross_entropy_ref, h, 1.0);
    EXPECT_EQ(l1.scalar_type(), torch::kFloat32);
    EXPECT_EQ(dx1.scalar_type(), dtype);
    EXPECT_EQ(dW1.scalar_type(), dtype);
    expect_close(l1, l0, 1e-5, "16-bit loss");  // the same 16-bit logits, widened
    // The gradients round to 16 bits at other places (per chunk, not once over all rows).
    expect_close(dx1, dx0, 2e-2, "16-bit dx");
    expect_close(dW1, dW0, 2e-2, "16-bit dW");
  }
}

TEST(FusedLinearCrossEntropy, KeepsNoLogitsForBackward) {
  // What stays alive between forward and backward: the plain way keeps [T, V] tensors, the fused
  // one only its two gradients ([T, H] and [V, H]).
  CpuMemory& mem = CpuMemory::install();
  const int64_t T = 512, H = 16, V = 2000;
  const Case c = make_case(T, H, V, torch::kFloat32, true, 17);
  auto kept = [&](auto fn) {
    Tensor x = c.x.clone().requires_grad_(true), W = c.W.clone().requires_grad_(true);
    const int64_t before = mem.bytes();
    Tensor loss = fn(x, W, c.targets);
    const int64_t after = mem.bytes() - before;
    loss.backward();
    return after;
  };
  const int64_t fused = kept([](auto& x, auto& W, auto& t) { return fused_linear_cross_entropy(x, W, t, 64); });
  const int64_t plain = kept(linear_cross_entropy_ref);
  EXPECT_LE(fused, (T * H + V * H) * 4 + 4096);
  EXPECT_GE(plain, T * V * 4);
}

TEST(FusedLinearCrossEntropy, BadInputIsAOneLineError) {
  const Case c = make_case(4, 3, 5, torch::kFloat32, false, 19);
  auto expect_error = [](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one containing: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { fused_linear_cross_entropy(c.x, c.W.t(), c.targets); }, "x must be [T, H] and W [V, H]");
  expect_error([&] { fused_linear_cross_entropy(c.x, c.W.to(torch::kDouble), c.targets); }, "x is Float but W is Double");
  expect_error([&] { fused_linear_cross_entropy(c.x, c.W, c.targets.narrow(0, 0, 3)); }, "targets must be [T] = [4] int64");
  expect_error([&] { fused_linear_cross_entropy(c.x, c.W, c.targets.to(torch::kInt)); }, "targets must be [T] = [4] int64");
  Tensor W = c.W.clone().requires_grad_(true);
  Tensor loss = fused_linear_cross_entropy(c.x, W, c.targets);
  loss.backward({}, /*retain_graph=*/true);
  expect_error([&] { loss.backward(); }, "its backward ran twice (retain_graph)");
}

// On a GPU: the masked rows (CUDA's default) and the skipped ones, float32 and bfloat16, against
// the reference on the same GPU. Skipped without one.
TEST(FusedLinearCrossEntropyCuda, EqualsTheReferenceOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (bool skip : {false, true}) {
      const Case h = make_case(300, 64, 1001, torch::kFloat32, true, 29);
      const Case c{h.x.to(torch::kCUDA, dtype), h.W.to(torch::kCUDA, dtype), h.targets.to(torch::kCUDA)};
      const auto [l1, dx1, dW1] =
          run([skip](auto& x, auto& W, auto& t) { return fused_linear_cross_entropy(x, W, t, 77, skip); }, c, 0.5);
      const auto [l0, dx0, dW0] = run(linear_cross_entropy_ref, c, 0.5);
      const double tol = dtype == torch::kFloat32 ? 2e-5 : 2e-2;
      const std::string what = std::string(c10::toString(dtype)) + (skip ? " skipped" : " masked");
      EXPECT_TRUE(dx1.is_cuda() && dW1.is_cuda()) << what;
      expect_close(l1.cpu(), l0.cpu(), dtype == torch::kFloat32 ? 1e-6 : 1e-4, what + " loss");
      expect_close(dx1.cpu(), dx0.cpu(), tol, what + " dx");
      expect_close(dW1.cpu(), dW0.cpu(), tol, what + " dW");
    }
}

TEST(FusedLinearCrossEntropy, ModelLossSumEqualsItsLogitsCrossEntropy) {
  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.d_model = 32;
  cfg.n_layer = 2;
  cfg.vocab_size = 97;
  cfg.pad_vocab_multiple = 1;
  const int64_t B = 3, L = 19;
  torch::manual_seed(23);
  const Tensor tokens = torch::randint(0, 97, {B, L}, torch::kLong);
  Tensor targets = torch::randint(0, 97, {B, L}, torch::kLong);
  targets.masked_fill_(torch::rand({B, L}) < 0.3, -100);
  const Tensor seq_idx = torch::tensor({0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2}, torch::kInt).repeat({B, 1});
  for (auto compute : {torch::kFloat32, torch::kBFloat16})
    for (auto ckpt : {ActivationCheckpointing::none, ActivationCheckpointing::full})
      for (bool packed : {false, true}) {
        const std::string what = std::string(c10::toString(compute)) + " checkpointing " + to_string(ckpt) +
                                 (packed ? " packed" : "");
        auto grads = [&](bool fused) {
          MambaLM m(cfg, 5);
          m.set_activation_checkpointing(ckpt);
          auto params = m.named_parameters();
          for (auto& p : params) p.tensor.requires_grad_(true);
          const Tensor s = packed ? seq_idx : Tensor();
          Tensor loss = fused ? m.loss_sum(tokens, compute, s, targets)
                              : at::cross_entropy_loss(m.forward(tokens, compute, s).reshape({B * L, -1}),
                                                       targets.reshape({-1}), {}, at::Reduction::Sum, -100);
          (loss * 0.25).backward();
          std::vector<Tensor> out{loss.detach()};
          for (auto& p : params) out.push_back(p.tensor.grad());
          return out;
        };
        const auto fused = grads(true), plain = grads(false);
        const double tol = compute == torch::kFloat32 ? 2e-5 : 2e-2;
        expect_close(fused[0], plain[0], compute == torch::kFloat32 ? 1e-6 : 1e-4, what + " loss");
        for (size_t i = 1; i < fused.size(); ++i) expect_close(fused[i], plain[i], tol, what + " gradient " + std::to_string(i));
      }
  MambaLM m(cfg, 5);
  try {
    m.loss_sum(tokens, torch::kFloat32, {}, targets.narrow(1, 0, L - 1));
    ADD_FAILURE() << "no error for targets of the wrong shape";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the loss's targets have shape [3, 18]"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace coil
