// Decoding (model/generate.h): top-k / top-p filtering by hand, sampling frequencies, greedy
// batches equal to single prompts, EOS, streaming order, bad input.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <array>
#include <cmath>

#include "model/generate.h"
#include "model/linear_cpu.h"
#include "model/mamba.h"
#include "util/error.h"

namespace coil {
namespace {

using torch::Tensor;

Tensor probs_of(std::vector<double> p) { return torch::tensor(p, torch::kDouble); }

TEST(Sampling, TopPKeepsTheNucleusInOrder) {
  // Sorted: 0.4 (idx 2), 0.3 (idx 0), 0.2 (idx 3), 0.1 (idx 1). Mass before each: 0, .4, .7, .9.
  const Tensor p = probs_of({0.3, 0.1, 0.4, 0.2});
  EXPECT_TRUE(torch::allclose(filter_probs(p, 0, 0.5), probs_of({0.3 / 0.7, 0, 0.4 / 0.7, 0})));
  EXPECT_TRUE(torch::allclose(filter_probs(p, 0, 0.35), probs_of({0, 0, 1, 0})));  // 0.4 alone reaches 0.35
  EXPECT_TRUE(torch::allclose(filter_probs(p, 0, 0.75), probs_of({0.3 / 0.9, 0, 0.4 / 0.9, 0.2 / 0.9})));
  EXPECT_TRUE(torch::allclose(filter_probs(p, 0, 1.0), p));
  EXPECT_TRUE(torch::allclose(filter_probs(p, 0, 1e-9), probs_of({0, 0, 1, 0})));  // the top token stays
  EXPECT_TRUE(torch::allclose(filter_probs(p, 2, 1.0), probs_of({0.3 / 0.7, 0, 0.4 / 0.7, 0})));
  EXPECT_TRUE(torch::allclose(filter_probs(p, 3, 0.5), probs_of({0.3 / 0.7, 0, 0.4 / 0.7, 0})));
  EXPECT_TRUE(torch::allclose(filter_probs(p, 10, 1.0), p));
  // Ties: the lower index comes first.
  EXPECT_TRUE(torch::allclose(filter_probs(probs_of({0.25, 0.25, 0.25, 0.25}), 1, 1.0), probs_of({1, 0, 0, 0})));
}

TEST(Sampling, BadOptionsAreErrors) {
  const Tensor p = probs_of({0.5, 0.5});
  EXPECT_THROW(filter_probs(p, 0, 0.0), Error);
  EXPECT_THROW(filter_probs(p, 0, 1.5), Error);
  EXPECT_THROW(filter_probs(p, -1, 1.0), Error);
}

TEST(Sampling, GreedyIsArgmaxAndIgnoresPaddingColumns) {
  at::Generator gen = at::detail::createCPUGenerator(0);
  const Tensor logits = torch::tensor({{0.1f, 2.0f, 0.3f, 9.0f}, {5.0f, 1.0f, 0.0f, 9.0f}});
  // Column 3 is embedding padding (vocab 3): never produced.
  EXPECT_TRUE(torch::equal(sample_next(logits, 3, {}, gen), torch::tensor({1, 0}, torch::kLong)));
  SamplingOptions top1{1.0, 1, 1.0};
  EXPECT_TRUE(torch::equal(sample_next(logits, 3, top1, gen), torch::tensor({1, 0}, torch::kLong)));
}

TEST(Sampling, FrequenciesFollowTheFilteredDistribution) {
  at::Generator gen = at::detail::createCPUGenerator(7);
  const Tensor probs = torch::tensor({0.05, 0.5, 0.3, 0.15});
  const Tensor logits = probs.log().to(torch::kFloat).unsqueeze(0);
  const SamplingOptions s{1.0, 0, 0.9};  // nucleus: 0.5, 0.3, 0.15 (mass before 0.05's turn: 0.95)
  std::vector<int> counts(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[static_cast<size_t>(sample_next(logits, 4, s, gen).item<int64_t>())]++;
  EXPECT_EQ(counts[0], 0);
  EXPECT_NEAR(counts[1] / double(n), 0.5 / 0.95, 0.015);
  EXPECT_NEAR(counts[2] / double(n), 0.3 / 0.95, 0.015);
  EXPECT_NEAR(counts[3] / double(n), 0.15 / 0.95, 0.015);
}

// The decoding matmul against at::linear on random shapes: rows of x 1..17 and 64 (odd counts
// included: 1 takes the matrix-vector path, more than 4 the widen-once path for bfloat16), K with
// and without a multiple of 8 and of 64, N with and without a multiple of 3, with a bias, W in
// float32 and bfloat16 (against at::linear on W widened to float32), on transposed
// (non-contiguous) input; more than 64 rows and other dtypes take at::linear itself.
TEST(DecodeLinear, MatchesATenLinear) {
  if (!decode_linear_has_kernel()) GTEST_SKIP() << "no AVX2/FMA here: decode_linear is at::linear";
  torch::manual_seed(11);
  for (auto wtype : {torch::kFloat, torch::kBFloat16})
    for (int64_t B : {1, 2, 3, 5, 16, 17, 64})
      for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{
               {1, 1}, {3, 7}, {4, 8}, {37, 13}, {257, 768}, {130, 47}, {11, 100}, {5, 136}}) {
        const Tensor x = torch::randn({B, K}), w = torch::randn({N, K}).to(wtype), bias = torch::randn({N});
        const Tensor wf = w.to(torch::kFloat);
        const Tensor want = torch::linear(x, wf), got = decode_linear(x, w);
        ASSERT_EQ(got.sizes(), want.sizes());
        ASSERT_EQ(got.scalar_type(), torch::kFloat);
        EXPECT_TRUE(torch::allclose(got, want, 1e-4, 1e-4)) << B << "x" << K << " . " << N << "x" << K << " "
                                                            << c10::toString(wtype) << ": max diff "
                                                            << (got - want).abs().max().item<float>();
        EXPECT_TRUE(torch::allclose(decode_linear(x, w, bias), torch::linear(x, wf, bias), 1e-4, 1e-4));
      }
  const Tensor xt = torch::randn({40, 3}).t(), w = torch::randn({9, 40});  // x [3, 40], not contiguous
  EXPECT_TRUE(torch::allclose(decode_linear(xt, w), torch::linear(xt, w), 1e-4, 1e-4));
  const Tensor big = torch::randn({65, 16}), w2 = torch::randn({5, 16});
  EXPECT_TRUE(torch::equal(decode_linear(big, w2), torch::linear(big, w2)));
  const Tensor w2b = w2.to(torch::kBFloat16);  // the fallback widens a bfloat16 W to x's dtype
  EXPECT_TRUE(torch::equal(decode_linear(big, w2b), torch::linear(big, w2b.to(torch::kFloat))));
  const Tensor xd = torch::randn({2, 16}, torch::kDouble), wd = torch::randn({5, 16}, torch::kDouble);
  EXPECT_TRUE(torch::equal(decode_linear(xd, wd), torch::linear(xd, wd)));
}

MambaLM random_model() {
  MambaConfig c = MambaConfig::preset("tiny");
  c.vocab_size = 61;  // odd, so the padded embedding has rows that must never be produced
  c = c.padded();
  MambaLM m(c, 5);
  torch::NoGradGuard ng;
  torch::manual_seed(5);
  for (auto& p : m.named_parameters()) p.tensor.add_(torch::randn_like(p.tensor) * 0.3);
  return m;
}

// Greedy decoding written out with the full forward: the reference the recurrent path must equal.
std::vector<int32_t> greedy_by_forward(const MambaLM& m, std::vector<int32_t> ids, int64_t n, int64_t vocab) {
  torch::NoGradGuard ng;
  std::vector<int32_t> out;
  for (int64_t t = 0; t < n; ++t) {
    const Tensor x = torch::tensor(std::vector<int64_t>(ids.begin(), ids.end())).unsqueeze(0);
    const auto next = static_cast<int32_t>(m.forward(x)[0][-1].narrow(0, 0, vocab).argmax().item<int64_t>());
    ids.push_back(next), out.push_back(next);
  }
  return out;
}

TEST(Generate, GreedyBatchEqualsEachPromptAloneAndTheFullForward) {
  const MambaLM m = random_model();
  GenerateRequest r;
  r.prompts = {{5}, {1, 2, 3, 4, 5, 6, 7}, {40, 2}, {60, 59, 3}};
  r.max_new_tokens = 12;
  r.vocab = 61;
  std::vector<std::pair<size_t, int32_t>> streamed;
  const auto batch = generate(m, r, [&](size_t i, int32_t t) { streamed.emplace_back(i, t); });
  ASSERT_EQ(batch.size(), 4u);
  size_t total = 0;
  for (size_t i = 0; i < r.prompts.size(); ++i) {
    GenerateRequest one = r;
    one.prompts = {r.prompts[i]};
    EXPECT_EQ(generate(m, one)[0], batch[i]) << "prompt " << i;
    const auto want = greedy_by_forward(m, r.prompts[i], r.max_new_tokens, r.vocab);
    EXPECT_EQ(batch[i], want) << "prompt " << i;
    for (int32_t t : batch[i]) EXPECT_LT(t, 61);
    total += batch[i].size();
  }
  // Streaming: every token reported once, each prompt's in order.
  ASSERT_EQ(streamed.size(), total);
  std::vector<std::vector<int32_t>> again(4);
  for (auto [i, t] : streamed) again[i].push_back(t);
  EXPECT_EQ(again, batch);
}

TEST(Generate, EosEndsOneSequenceAndTheOthersGoOn) {
  const MambaLM m = random_model();
  GenerateRequest r;
  r.prompts = {{5}, {1, 2, 3}};
  r.max_new_tokens = 10;
  r.vocab = 61;
  const auto free_run = generate(m, r);
  // EOS = the first prompt's third token: it stops after two (EOS not returned) ...
  r.eos = free_run[0][2];
  const auto stopped = generate(m, r);
  EXPECT_EQ(stopped[0], std::vector<int32_t>(free_run[0].begin(), free_run[0].begin() + 2));
  // ... and the second sequence is unchanged up to its own first EOS, if any.
  const auto cut = std::find(free_run[1].begin(), free_run[1].end(), r.eos);
  EXPECT_EQ(stopped[1], std::vector<int32_t>(free_run[1].begin(), cut));
}

TEST(Generate, SamplingIsReproducibleWithItsSeed) {
  const MambaLM m = random_model();
  GenerateRequest r;
  r.prompts = {{5, 6}, {7}};
  r.max_new_tokens = 20;
  r.vocab = 61;
  r.sampling = {1.0, 20, 0.9};
  r.seed = 3;
  const auto a = generate(m, r), b = generate(m, r);
  EXPECT_EQ(a, b);
  r.seed = 4;
  EXPECT_NE(generate(m, r), a);
}

// The prompts' prefill, then 8 greedy steps, on the CPU and on the GPU: the logits agree (1e-4).
void expect_cuda_decodes_as_cpu(const MambaLM& cpu, const MambaLM& gpu, const Tensor& prompt) {
  torch::NoGradGuard ng;
  MambaCache cc = cpu.new_cache(prompt.size(0)), gc = gpu.new_cache(prompt.size(0));
  Tensor a = cpu.prefill(prompt, cc), b = gpu.prefill(prompt.cuda(), gc);
  EXPECT_TRUE(b.is_cuda());
  EXPECT_TRUE(torch::allclose(b.cpu(), a, 1e-4, 1e-4));
  for (int t = 0; t < 8; ++t) {
    const Tensor token = a.argmax(1);
    a = cpu.step(token, cc);
    b = gpu.step(token.cuda(), gc);
    EXPECT_TRUE(torch::allclose(b.cpu(), a, 1e-4, 1e-4)) << "step " << t;
  }
}

// On a GPU (MambaLM::to): prefill and every step give the CPU's logits within 1e-4, and greedy
// decoding, with a sequence leaving the batch at EOS, gives the CPU's tokens.
TEST(GenerateCuda, MatchesTheCpu) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no GPU";
  const MambaLM cpu = random_model();
  MambaLM gpu = random_model();
  gpu.to(at::Device(at::kCUDA, 0));
  expect_cuda_decodes_as_cpu(cpu, gpu, torch::tensor(std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7}).unsqueeze(0));
  GenerateRequest r;
  r.prompts = {{5}, {1, 2, 3, 4, 5, 6, 7}, {40, 2}};
  r.max_new_tokens = 12;
  r.vocab = 61;
  const auto free_run = generate(cpu, r);
  EXPECT_EQ(generate(gpu, r), free_run);
  r.eos = free_run[0][2];  // the first sequence leaves the batch after two tokens
  EXPECT_EQ(generate(gpu, r), generate(cpu, r));
}

// A model whose matrices are stored in bfloat16 decodes on CUDA (decode_linear's bfloat16 kernel,
// model/linear_cuda.h) as on the CPU (its AVX2 kernel or at::linear on the widened W).
TEST(GenerateCuda, Bf16MatricesMatchTheCpu) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no GPU";
  MambaLM cpu = random_model(), gpu = random_model();
  cpu.store_matrices(torch::kBFloat16);
  gpu.store_matrices(torch::kBFloat16);
  gpu.to(at::Device(at::kCUDA, 0));
  expect_cuda_decodes_as_cpu(cpu, gpu, torch::tensor(std::vector<int64_t>{3, 1, 4, 1, 5}).unsqueeze(0).repeat({3, 1}));
}

// decode_linear on CUDA with a bfloat16 W (its own kernel) against the float64 product, on odd
// shapes, strided and unaligned x, 1 to 40 rows.
TEST(LinearCuda, Bf16MatchesTheFloat64Product) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no GPU";
  torch::NoGradGuard ng;
  torch::manual_seed(3);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  for (const auto& [B, K, N] : std::vector<std::array<int64_t, 3>>{
           {1, 768, 3072}, {16, 1536, 768}, {3, 48, 1536}, {5, 13, 11}, {40, 264, 50}, {1, 768, 50280}}) {
    for (const int64_t offset : {0, 1}) {
      const Tensor xs = torch::randn({offset + B * K}, cuda);
      const Tensor x = xs.narrow(0, offset, B * K).view({B, K});
      const Tensor w = (torch::randn({N, K}, cuda) / std::sqrt(double(K))).to(torch::kBFloat16);
      const Tensor bias = torch::randn({N}, cuda);
      const Tensor want = (torch::matmul(x.to(torch::kDouble), w.to(torch::kDouble).t()) + bias.to(torch::kDouble));
      const Tensor got = decode_linear(x, w, bias);
      ASSERT_EQ(got.device(), x.device());
      const double err = (got.to(torch::kDouble) - want).abs().max().item<double>();
      EXPECT_LT(err, 1e-5 * (1 + want.abs().max().item<double>())) << B << " " << K << " " << N << " " << offset;
    }
  }
}

// Decoding's residual add + norm: h += delta in place, then rms_norm; shapes checked. On CUDA
// (its kernel, model/norm_cuda.h, NormCuda below) the same within float32 rounding.
TEST(AddRmsNorm, AddsInPlaceThenNorms) {
  torch::manual_seed(2);
  const Tensor h0 = torch::randn({3, 40}), delta = torch::randn({3, 40}), w = torch::randn({40});
  Tensor h = h0.clone();
  const Tensor y = add_rms_norm_(h, delta, w, 1e-5);
  EXPECT_TRUE(torch::equal(h, h0 + delta));
  EXPECT_TRUE(torch::equal(y, rms_norm(h0 + delta, w, 1e-5)));
  Tensor g = h0.clone();
  EXPECT_TRUE(torch::equal(add_rms_norm_(g, {}, w, 1e-5), rms_norm(h0, w, 1e-5)));
  EXPECT_TRUE(torch::equal(g, h0));
  EXPECT_THROW(add_rms_norm_(g, torch::randn({3, 41}), w, 1e-5), Error);
  EXPECT_THROW(add_rms_norm_(g, {}, torch::randn({39}), 1e-5), Error);
}

TEST(NormCuda, AddRmsNormMatchesTheCpu) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no GPU";
  torch::manual_seed(2);
  for (const int64_t H : {1, 40, 768, 2560}) {
    const Tensor h0 = torch::randn({5, H}), delta = torch::randn({5, H}), w = torch::randn({H});
    Tensor h = h0.clone(), hc = h0.cuda();
    const Tensor y = add_rms_norm_(h, delta, w, 1e-5), yc = add_rms_norm_(hc, delta.cuda(), w.cuda(), 1e-5);
    EXPECT_TRUE(torch::equal(hc.cpu(), h)) << H;
    EXPECT_TRUE(torch::allclose(yc.cpu(), y, 1e-5, 1e-6)) << H;
  }
}

TEST(Generate, BadRequestsAreErrors) {
  const MambaLM m = random_model();
  GenerateRequest r;
  r.vocab = 61;
  r.prompts = {{}};
  EXPECT_THROW(generate(m, r), Error);
  r.prompts = {{64}};
  EXPECT_THROW(generate(m, r), Error);
  r.prompts = {{1}};
  r.vocab = 65;
  EXPECT_THROW(generate(m, r), Error);
}

}  // namespace
}  // namespace coil
