// Packed documents (seq_idx) and a differentiable initial state, in the selective scan and the
// causal conv (issue 19 items 1, 2 and 7): the fused CPU kernels against the references, forward
// and every gradient (h0 and the conv's initial state included) on random shapes; bit-identical
// results without boundaries; the defining tests (two halves = the whole, a|b|c packed = each
// alone, at the mixer level); one-line errors for bad seq_idx and h0.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "model/config.h"
#include "model/conv1d.h"
#include "model/mamba.h"
#include "model/selective_scan.h"
#include "util/error.h"

namespace coil {
namespace {

using torch::Tensor;

void expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  ASSERT_TRUE(got.defined()) << what;
  ASSERT_TRUE(want.defined()) << what;
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double scale = want.abs().max().item<double>();
  const double worst = ((got - want).abs() - rtol * (want.abs() + scale)).max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |diff| = " << (got - want).abs().max().item<double>() << " at scale "
                        << scale;
}

// Document numbers for B rows of L: random starts (about one in `every`), plus starts forced at
// position 1, at the chunk boundary 64 and at L-1 in some rows (a one-token document at the end);
// none at `no_start_at`.
Tensor random_seq_idx(int64_t B, int64_t L, int64_t every, int64_t no_start_at = -1) {
  Tensor start = torch::rand({B, L}) < 1.0 / every;
  start.select(1, 0).fill_(false);
  if (L > 1) start[0][1] = true;
  if (L > 64) start[B - 1][64] = true;
  if (L > 2) start[B - 1][L - 1] = true;
  if (no_start_at >= 0) start.select(1, no_start_at).fill_(false);
  return torch::cumsum(start.to(torch::kInt), 1).to(torch::kInt);
}

struct Scan {
  Tensor u, delta, A, Bm, Cm, D, z, bias, h0;
  std::vector<Tensor> all() const { return {u, delta, A, Bm, Cm, D, z, bias, h0}; }
};
const char* kScanNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"};

Scan make_scan(int64_t B, int64_t L, int64_t I, int64_t N, torch::Dtype dtype, bool with_h0) {
  auto o = torch::TensorOptions().dtype(dtype);
  Scan x;
  x.u = torch::randn({B, L, I}, o);
  x.delta = torch::randn({B, L, I}, o) * 0.5;
  x.A = -torch::exp(torch::log(torch::rand({I, N}, o) * 15 + 1));
  x.Bm = torch::randn({B, L, N}, o);
  x.Cm = torch::randn({B, L, N}, o);
  x.D = torch::randn({I}, o);
  x.z = torch::randn({B, L, I}, o);
  x.bias = torch::rand({I}, o) - 2;
  if (with_h0) x.h0 = torch::randn({B, I, N}, o);
  for (Tensor* t : {&x.u, &x.delta, &x.A, &x.Bm, &x.Cm, &x.D, &x.z, &x.bias, &x.h0})
    if (t->defined()) t->requires_grad_(true);
  return x;
}

// y, the final state, and the gradients of sum(y * wy) + sum(final * wh) for every defined input.
std::vector<Tensor> run_scan(bool reference, const Scan& x, const Tensor& seq_idx, const Tensor& wy, const Tensor& wh) {
  for (const Tensor& t : x.all())
    if (t.defined() && t.grad().defined()) t.mutable_grad().reset();
  Tensor last;
  Tensor y = reference ? selective_scan_ref(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, seq_idx, x.h0, &last)
                       : selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, &last, seq_idx, x.h0);
  ((y * wy).sum() + (last * wh).sum()).backward();
  std::vector<Tensor> out{y.detach(), last.detach()};
  for (const Tensor& t : x.all()) out.push_back(t.defined() ? t.grad().clone() : Tensor());
  return out;
}

struct Shape {
  int64_t B, L, I, N;
};

// The fused CPU kernel (vector path N = 8/16, scalar path odd N; float32 and float64) with
// seq_idx and h0 against the reference: y, the final state and all 9 gradients, 1e-5.
TEST(ScanBoundaries, FastMatchesReferenceWithSeqIdxAndH0) {
  torch::manual_seed(10);
  const std::vector<Shape> shapes = {{1, 1, 1, 1},   {2, 2, 3, 16},  {2, 9, 5, 5},     {2, 70, 9, 16},
                                     {3, 130, 17, 8}, {2, 129, 33, 7}, {1, 200, 4, 16}};
  for (const Shape& s : shapes)
    for (torch::Dtype dtype : {torch::kFloat, torch::kDouble})
      for (bool with_seq : {true, false})
        for (bool with_h0 : {true, false}) {
          if (!with_seq && !with_h0) continue;  // test_selective_scan covers it
          const Scan x = make_scan(s.B, s.L, s.I, s.N, dtype, with_h0);
          const Tensor seq = with_seq ? random_seq_idx(s.B, s.L, 9) : Tensor();
          const Tensor wy = torch::randn({s.B, s.L, s.I}, dtype), wh = torch::randn({s.B, s.I, s.N}, dtype);
          const auto want = run_scan(true, x, seq, wy, wh);
          const auto got = run_scan(false, x, seq, wy, wh);
          const std::string where = fmt::format("B={} L={} I={} N={} {} seq={} h0={}", s.B, s.L, s.I, s.N,
                                                c10::toString(dtype), with_seq, with_h0);
          expect_close(got[0], want[0], 1e-5, "y " + where);
          expect_close(got[1], want[1], 1e-5, "final state " + where);
          for (size_t k = 0; k < 9; ++k)
            if (want[k + 2].defined()) expect_close(got[k + 2], want[k + 2], 1e-5, std::string(kScanNames[k]) + " " + where);
        }
}

// No boundaries: an undefined seq_idx, or one with a single document per row, and an undefined h0
// or one of zeros, give today's results bit for bit (forward and gradients).
TEST(ScanBoundaries, NoBoundariesIsBitIdentical) {
  torch::manual_seed(11);
  for (const Shape& s : std::vector<Shape>{{2, 130, 17, 16}, {2, 67, 5, 5}}) {
    const Scan x = make_scan(s.B, s.L, s.I, s.N, torch::kFloat, false);
    const Tensor wy = torch::randn({s.B, s.L, s.I}), wh = torch::randn({s.B, s.I, s.N});
    const auto base = run_scan(false, x, Tensor(), wy, wh);
    const auto one_doc = run_scan(false, x, torch::full({s.B, s.L}, 3, torch::kInt), wy, wh);
    Scan xz = x;
    xz.h0 = torch::zeros({s.B, s.I, s.N}, torch::requires_grad());
    const auto zero_h0 = run_scan(false, xz, Tensor(), wy, wh);
    for (size_t k = 0; k < 10; ++k) {
      EXPECT_TRUE(torch::equal(one_doc[k], base[k])) << "seq_idx of one document, output " << k;
      EXPECT_TRUE(torch::equal(zero_h0[k], base[k])) << "zero h0, output " << k;
    }
  }
}

// The defining test of the initial state, for the scan alone: two halves, the second from the
// first's final state (kept in the graph), give y and every gradient of the whole, h0 included;
// split at a chunk boundary and off one, with and without documents.
TEST(ScanBoundaries, TwoHalvesEqualTheWhole) {
  torch::manual_seed(12);
  for (auto [L, cut] : std::vector<std::pair<int64_t, int64_t>>{{130, 64}, {101, 37}, {9, 1}})
    for (bool with_seq : {false, true}) {
      const int64_t B = 2, I = 11, N = 16;
      const Scan x = make_scan(B, L, I, N, torch::kFloat, true);
      // No document starts at the cut: h0 continues the first document of the second half (a
      // caller that cuts at a document start passes a zero h0 for that row).
      const Tensor seq = with_seq ? random_seq_idx(B, L, 7, cut) : Tensor();
      const Tensor wy = torch::randn({B, L, I}), wh = torch::randn({B, I, N});
      const auto whole = run_scan(false, x, seq, wy, wh);
      for (const Tensor& t : x.all()) t.mutable_grad().reset();
      auto half = [&](const Tensor& t, int64_t a, int64_t n) { return t.narrow(1, a, n); };
      Tensor mid, last;
      const Tensor y1 = selective_scan(half(x.u, 0, cut), half(x.delta, 0, cut), x.A, half(x.Bm, 0, cut),
                                       half(x.Cm, 0, cut), x.D, half(x.z, 0, cut), x.bias, true, &mid,
                                       with_seq ? half(seq, 0, cut) : Tensor(), x.h0);
      const int64_t rest = L - cut;
      const Tensor y2 = selective_scan(half(x.u, cut, rest), half(x.delta, cut, rest), x.A, half(x.Bm, cut, rest),
                                       half(x.Cm, cut, rest), x.D, half(x.z, cut, rest), x.bias, true, &last,
                                       with_seq ? half(seq, cut, rest) : Tensor(), mid);
      const Tensor y = torch::cat({y1, y2}, 1);
      ((y * wy).sum() + (last * wh).sum()).backward();
      const std::string where = fmt::format("L={} cut={} seq={}", L, cut, with_seq);
      expect_close(y.detach(), whole[0], 1e-5, "y " + where);
      expect_close(last.detach(), whole[1], 1e-5, "final state " + where);
      const auto all = x.all();
      for (size_t k = 0; k < 9; ++k) expect_close(all[k].grad(), whole[k + 2], 1e-5, std::string(kScanNames[k]) + " " + where);
    }
}

// seq_idx and h0 together: a row of documents a|b|c gives, for each document, the outputs and the
// gradients of running it alone; h0 is the start state of a (the row's first document) only.
TEST(ScanBoundaries, PackedDocumentsEqualEachAlone) {
  torch::manual_seed(13);
  const int64_t I = 13, N = 16;
  const std::vector<int64_t> lens = {5, 70, 1};
  const int64_t L = 76;
  const Scan x = make_scan(1, L, I, N, torch::kFloat, true);
  Tensor seq = torch::cat({torch::zeros({1, 5}, torch::kInt), torch::ones({1, 70}, torch::kInt),
                           torch::full({1, 1}, 2, torch::kInt)}, 1);
  const Tensor wy = torch::randn({1, L, I});
  const auto packed = run_scan(false, x, seq, wy, torch::zeros({1, I, N}));
  int64_t at = 0;
  Tensor dA_sum = torch::zeros_like(x.A), dh0;
  for (size_t d = 0; d < lens.size(); ++d) {
    for (const Tensor& t : x.all()) t.mutable_grad().reset();
    auto cut = [&](const Tensor& t) { return t.narrow(1, at, lens[d]); };
    const Tensor y = selective_scan(cut(x.u), cut(x.delta), x.A, cut(x.Bm), cut(x.Cm), x.D, cut(x.z), x.bias, true,
                                    nullptr, Tensor(), d == 0 ? x.h0 : Tensor());
    (y * cut(wy)).sum().backward();
    const std::string where = "document " + std::to_string(d);
    expect_close(y.detach(), packed[0].narrow(1, at, lens[d]), 1e-5, "y " + where);
    expect_close(cut(x.u.grad()), cut(packed[2]), 1e-5, "du " + where);
    expect_close(cut(x.delta.grad()), cut(packed[3]), 1e-5, "ddelta " + where);
    expect_close(cut(x.Bm.grad()), cut(packed[5]), 1e-5, "dB " + where);
    expect_close(cut(x.z.grad()), cut(packed[8]), 1e-5, "dz " + where);
    dA_sum += x.A.grad();
    if (d == 0) dh0 = x.h0.grad().clone();
    at += lens[d];
  }
  expect_close(dA_sum, packed[4], 1e-5, "dA summed over documents");
  expect_close(dh0, packed[10], 1e-5, "dh0 (first document's)");
}

TEST(ScanBoundaries, BadSeqIdxAndH0AreErrors) {
  const Scan x = make_scan(2, 5, 3, 4, torch::kFloat, false);
  auto scan = [&](const Tensor& seq, const Tensor& h0) {
    return selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, nullptr, seq, h0);
  };
  auto ref = [&](const Tensor& seq, const Tensor& h0) {
    return selective_scan_ref(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, seq, h0);
  };
  const Tensor decreasing = torch::tensor({0, 1, 1, 0, 2}, torch::kInt).repeat({2, 1});
  for (auto fn : {std::function<Tensor(const Tensor&, const Tensor&)>(scan), std::function<Tensor(const Tensor&, const Tensor&)>(ref)}) {
    for (const Tensor& bad : {torch::zeros({2, 5}, torch::kLong), torch::zeros({2, 4}, torch::kInt),
                              torch::zeros({5}, torch::kInt), decreasing}) {
      try {
        fn(bad, Tensor());
        ADD_FAILURE() << "no error for seq_idx " << bad.sizes();
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("seq_idx"), std::string::npos) << e.what();
        EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      }
    }
    for (const Tensor& bad : {torch::zeros({2, 3, 5}), torch::zeros({3, 4}), torch::zeros({2, 3, 4}, torch::kInt),
                              torch::zeros({2, 3, 4}, torch::kBFloat16)}) {
      try {
        fn(Tensor(), bad);
        ADD_FAILURE() << "no error for h0 " << bad.sizes();
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("h0"), std::string::npos) << e.what();
      }
    }
  }
}

// ---- the causal conv ----

struct Conv {
  Tensor x, w, b, init;
  std::vector<Tensor> all() const { return {x, w, b, init}; }
};

std::vector<Tensor> run_conv(bool reference, const Conv& c, const Tensor& seq, const Tensor& dy) {
  std::vector<Tensor> in{c.x, c.w, c.b};
  if (c.init.defined()) in.push_back(c.init);
  const Tensor y = reference ? causal_conv1d_ref(c.x, c.w, c.b, seq, c.init) : causal_conv1d(c.x, c.w, c.b, seq, c.init);
  auto g = torch::autograd::grad({y}, in, {dy});
  g.insert(g.begin(), y.detach());
  return std::vector<Tensor>(g.begin(), g.end());
}

Conv make_conv(int64_t B, int64_t L, int64_t I, int64_t K, torch::Dtype dtype, bool with_init) {
  auto o = torch::TensorOptions().dtype(dtype);
  Conv c;
  c.x = torch::randn({B, L, 2 * I}, o).narrow(2, 0, I).detach().requires_grad_(true);  // strided, as in the model
  c.w = torch::randn({I, 1, K}, o).requires_grad_(true);
  c.b = torch::randn({I}, o).requires_grad_(true);
  if (with_init) c.init = torch::randn({B, I, K - 1}, o).requires_grad_(true);
  return c;
}

// The CPU kernel with seq_idx and an initial state against the masked reference: y and the
// gradients of x, w, bias and the initial state; K = 2..5, odd channel counts, short documents.
TEST(ConvBoundaries, FastMatchesReferenceWithSeqIdxAndInitialState) {
  torch::manual_seed(20);
  struct S { int64_t B, L, I, K; };
  for (S s : {S{1, 1, 1, 4}, S{2, 3, 5, 4}, S{2, 37, 67, 4}, S{3, 130, 129, 2}, S{1, 9, 20, 5}})
    for (torch::Dtype dtype : {torch::kFloat, torch::kDouble})
      for (bool with_seq : {true, false})
        for (bool with_init : {true, false}) {
          if (!with_seq && !with_init) continue;
          const Conv c = make_conv(s.B, s.L, s.I, s.K, dtype, with_init);
          const Tensor seq = with_seq ? random_seq_idx(s.B, s.L, 3) : Tensor();
          const Tensor dy = torch::randn({s.B, s.L, s.I}, dtype);
          const auto want = run_conv(true, c, seq, dy), got = run_conv(false, c, seq, dy);
          const std::string where = fmt::format("B={} L={} I={} K={} {} seq={} init={}", s.B, s.L, s.I, s.K,
                                                c10::toString(dtype), with_seq, with_init);
          ASSERT_EQ(got.size(), want.size());
          for (size_t k = 0; k < want.size(); ++k) expect_close(got[k], want[k], 1e-5, "output " + std::to_string(k) + " " + where);
        }
}

// The masked reference itself against torch's conv1d run on each document alone (the meaning of
// seq_idx), and the kernel without boundaries: a one-document seq_idx changes nothing, bit for bit.
TEST(ConvBoundaries, DocumentsAloneAndNoBoundariesBitIdentical) {
  torch::manual_seed(21);
  const int64_t I = 7, K = 4;
  const Conv c = make_conv(1, 12, I, K, torch::kFloat, false);
  const Tensor seq = torch::tensor({0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2}, torch::kInt).unsqueeze(0);
  const Tensor y = causal_conv1d(c.x, c.w, c.b, seq);
  for (auto [a, n] : std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {5, 1}, {6, 6}})
    expect_close(y.narrow(1, a, n), causal_conv1d_ref(c.x.narrow(1, a, n), c.w, c.b), 1e-6, "document at " + std::to_string(a));
  const Conv d = make_conv(2, 70, 33, K, torch::kFloat, false);
  const Tensor dy = torch::randn({2, 70, 33});
  const auto base = run_conv(false, d, Tensor(), dy), one = run_conv(false, d, torch::zeros({2, 70}, torch::kInt), dy);
  for (size_t k = 0; k < base.size(); ++k) EXPECT_TRUE(torch::equal(one[k], base[k])) << "output " << k;
}

TEST(ConvBoundaries, BadSeqIdxAndInitialStateAreErrors) {
  const Conv c = make_conv(2, 5, 3, 4, torch::kFloat, false);
  for (bool reference : {false, true}) {
    auto conv = [&](const Tensor& seq, const Tensor& init) {
      return reference ? causal_conv1d_ref(c.x, c.w, c.b, seq, init) : causal_conv1d(c.x, c.w, c.b, seq, init);
    };
    EXPECT_THROW(conv(torch::zeros({2, 5}, torch::kLong), {}), Error);
    EXPECT_THROW(conv(torch::zeros({2, 6}, torch::kInt), {}), Error);
    EXPECT_THROW(conv(torch::tensor({0, 1, 0, 1, 1}, torch::kInt).repeat({2, 1}), {}), Error);
    EXPECT_THROW(conv({}, torch::zeros({2, 3, 4})), Error);
    EXPECT_THROW(conv({}, torch::zeros({2, 3, 3}, torch::kInt)), Error);
  }
}

// ---- the mixer ----

// The conv and the scan as the mixer chains them (conv -> SiLU -> scan), from initial states.
Tensor mixer(const Conv& c, const Scan& s, int64_t a, int64_t n, const Tensor& conv_init, const Tensor& h0,
             Tensor* conv_last, Tensor* h_last) {
  const Tensor x = c.x.narrow(1, a, n);
  const Tensor u = torch::silu(causal_conv1d(x, c.w, c.b, {}, conv_init));
  if (conv_last) *conv_last = causal_conv1d_final_state(x, c.w.size(-1), conv_init);
  auto cut = [&](const Tensor& t) { return t.narrow(1, a, n); };
  return selective_scan(u, cut(s.delta), s.A, cut(s.Bm), cut(s.Cm), s.D, cut(s.z), s.bias, true, h_last, {}, h0);
}

// The defining test of item 2 at the mixer level: the conv and the scan run as two halves, the
// second from the first half's final states (the scan's h and the conv's last K-1 inputs, both
// kept in the graph), give the outputs and all gradients (inputs, weights, both initial states)
// of running the whole, which itself starts from given initial states.
TEST(MixerBoundaries, TwoHalvesFromFinalStatesEqualTheWhole) {
  torch::manual_seed(30);
  for (auto [L, cut] : std::vector<std::pair<int64_t, int64_t>>{{130, 64}, {50, 2}, {9, 7}}) {
    const int64_t B = 2, I = 19, N = 16, K = 4;
    const Conv c = make_conv(B, L, I, K, torch::kFloat, true);
    Scan s = make_scan(B, L, I, N, torch::kFloat, true);
    const Tensor wy = torch::randn({B, L, I}), wh = torch::randn({B, I, N}), wc = torch::randn({B, I, K - 1});
    std::vector<Tensor> params{c.x, c.w, c.b, c.init, s.delta, s.A, s.Bm, s.Cm, s.D, s.z, s.bias, s.h0};
    const char* names[] = {"x", "conv w", "conv b", "conv init", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"};
    auto loss = [&](const Tensor& y, const Tensor& h, const Tensor& cs) {
      return (y * wy).sum() + (h * wh).sum() + (cs * wc).sum();
    };
    Tensor h_whole, c_whole;
    const Tensor y_whole = mixer(c, s, 0, L, c.init, s.h0, &c_whole, &h_whole);
    const auto g_whole = torch::autograd::grad({loss(y_whole, h_whole, c_whole)}, params);
    Tensor h_mid, c_mid, h_last, c_last;
    const Tensor y1 = mixer(c, s, 0, cut, c.init, s.h0, &c_mid, &h_mid);
    const Tensor y2 = mixer(c, s, cut, L - cut, c_mid, h_mid, &c_last, &h_last);
    const Tensor y = torch::cat({y1, y2}, 1);
    const auto g = torch::autograd::grad({loss(y, h_last, c_last)}, params);
    const std::string where = fmt::format("L={} cut={}", L, cut);
    expect_close(y, y_whole, 1e-5, "y " + where);
    expect_close(h_last, h_whole, 1e-5, "final h " + where);
    expect_close(c_last, c_whole, 1e-6, "final conv state " + where);
    for (size_t k = 0; k < params.size(); ++k) expect_close(g[k], g_whole[k], 1e-5, std::string(names[k]) + " " + where);
  }
}

// The mixer-level version of issue 19 item 5: MambaLM::block over a row of documents a|b|c with
// seq_idx gives, per document, the output and the input gradient of running the block on it
// alone, and the weights' gradients are the sum over the documents; MambaLM::forward with seq_idx
// gives each document's logits alone.
TEST(MixerBoundaries, PackedBlockEqualsEachDocumentAlone) {
  torch::manual_seed(31);
  MambaConfig cfg = MambaConfig::preset("tiny");
  MambaLM m(cfg, 3);
  const std::vector<int64_t> lens = {6, 70, 1, 3};
  int64_t L = 0;
  std::vector<Tensor> ids;
  for (size_t d = 0; d < lens.size(); ++d) ids.push_back(torch::full({1, lens[d]}, int(d), torch::kInt)), L += lens[d];
  const Tensor seq = torch::cat(ids, 1);
  const Tensor hidden = torch::randn({1, L, cfg.d_model}, torch::requires_grad());
  const Tensor wy = torch::randn({1, L, cfg.d_model});
  MambaBlockWeights w = m.layers[0];
  for (Tensor* t : {&w.norm, &w.in_proj, &w.conv_w, &w.conv_b, &w.x_proj, &w.dt_w, &w.dt_b, &w.A_log, &w.D, &w.out_proj})
    *t = t->detach().clone().requires_grad_(true);
  const std::vector<Tensor> weights{w.norm, w.in_proj, w.conv_w, w.conv_b, w.x_proj, w.dt_w, w.dt_b, w.A_log, w.D, w.out_proj};
  std::vector<Tensor> wrt{hidden};
  wrt.insert(wrt.end(), weights.begin(), weights.end());
  const Tensor y = MambaLM::block(w, cfg, hidden, nullptr, nullptr, seq);
  const auto g = torch::autograd::grad({(y * wy).sum()}, wrt);
  std::vector<Tensor> sums(weights.size());
  int64_t at = 0;
  for (size_t d = 0; d < lens.size(); ++d) {
    const Tensor h = hidden.narrow(1, at, lens[d]);
    const Tensor yd = MambaLM::block(w, cfg, h);
    const auto gd = torch::autograd::grad({(yd * wy.narrow(1, at, lens[d])).sum()}, wrt, {}, false, false, true);
    const std::string where = "document " + std::to_string(d);
    expect_close(y.narrow(1, at, lens[d]), yd, 1e-5, "y " + where);
    expect_close(g[0].narrow(1, at, lens[d]), gd[0].narrow(1, at, lens[d]), 1e-5, "d hidden " + where);
    for (size_t k = 0; k < weights.size(); ++k) sums[k] = d == 0 ? gd[k + 1] : sums[k] + gd[k + 1];
    at += lens[d];
  }
  for (size_t k = 0; k < weights.size(); ++k) expect_close(g[k + 1], sums[k], 1e-5, "weight " + std::to_string(k));

  const Tensor tokens = torch::randint(cfg.vocab_size, {1, L}, torch::kLong);
  torch::NoGradGuard ng;
  const Tensor logits = m.forward(tokens, seq);
  at = 0;
  for (size_t d = 0; d < lens.size(); ++d) {
    expect_close(logits.narrow(1, at, lens[d]), m.forward(tokens.narrow(1, at, lens[d])), 1e-5,
                 "logits of document " + std::to_string(d));
    at += lens[d];
  }
  EXPECT_TRUE(torch::equal(m.forward(tokens, torch::zeros({1, L}, torch::kInt)), m.forward(tokens)));
}

// seq_idx's order is checked once per forward by the model (model/seq_idx.h): the error names
// MambaLM::forward, before any layer's kernel sees the tensor; dtype and shape too.
TEST(MixerBoundaries, ModelChecksSeqIdxAtForward) {
  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.n_layer = 2;
  MambaLM m(cfg, 3);
  const Tensor tokens = torch::randint(cfg.vocab_size, {2, 5}, torch::kLong);
  torch::NoGradGuard ng;
  const Tensor decreasing = torch::tensor({0, 1, 1, 0, 2}, torch::kInt).repeat({2, 1});
  const std::pair<Tensor, std::string> cases[] = {
      {decreasing, "MambaLM::forward: seq_idx decreases within a row"},
      {torch::zeros({2, 4}, torch::kInt), "MambaLM::forward: seq_idx has shape 2x4, expected 2x5"},
      {torch::zeros({2, 5}, torch::kLong), "MambaLM::forward: seq_idx must be int32"}};
  for (const auto& [bad, message] : cases) {
    try {
      m.forward(tokens, bad);
      ADD_FAILURE() << "no error for " << message;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(message, 0), 0u) << e.what();
    }
  }
  EXPECT_TRUE(torch::equal(m.forward(tokens, torch::tensor({0, 0, 1, 1, 1}, torch::kInt).repeat({2, 1})),
                           m.forward(tokens, torch::tensor({3, 3, 7, 7, 7}, torch::kInt).repeat({2, 1}))));
}

}  // namespace
}  // namespace coil
