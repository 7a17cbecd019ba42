// The fast CPU selective scan against the plain reference: forward and every gradient, on random
// shapes (L = 1, L across chunk boundaries, odd I and N), plus a float64 finite-difference check.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/selective_scan.h"
#include "util/error.h"

namespace coil {
namespace {

using torch::Tensor;

struct Inputs {
  Tensor u, delta, A, Bm, Cm, D, z, bias;
  std::vector<Tensor> all() const { return {u, delta, A, Bm, Cm, D, z, bias}; }
};
const char* kNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"};

// Inputs distributed as in a Mamba layer: A = -exp(A_log) with A_log = log(1..16), softplus(bias)
// in [0.001, 0.1].
Inputs make_inputs(int64_t B, int64_t L, int64_t I, int64_t N, torch::Dtype dtype, bool optional = true) {
  auto o = torch::TensorOptions().dtype(dtype);
  Inputs x;
  x.u = torch::randn({B, L, I}, o);
  x.delta = torch::randn({B, L, I}, o) * 0.5;
  x.A = -torch::exp(torch::log(torch::rand({I, N}, o) * 15 + 1));
  x.Bm = torch::randn({B, L, N}, o);
  x.Cm = torch::randn({B, L, N}, o);
  if (optional) {
    x.D = torch::randn({I}, o);
    x.z = torch::randn({B, L, I}, o);
    Tensor dt = torch::exp(torch::rand({I}, o) * (std::log(0.1) - std::log(0.001)) + std::log(0.001));
    x.bias = dt + torch::log(-torch::expm1(-dt));  // inverse softplus
  }
  for (Tensor* t : {&x.u, &x.delta, &x.A, &x.Bm, &x.Cm, &x.D, &x.z, &x.bias})
    if (t->defined()) t->requires_grad_(true);
  return x;
}

using ScanFn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const Tensor&, bool);
Tensor fast(const Tensor& u, const Tensor& d, const Tensor& A, const Tensor& B, const Tensor& C,
            const Tensor& D, const Tensor& z, const Tensor& b, bool sp) {
  return selective_scan(u, d, A, B, C, D, z, b, sp);
}
Tensor ref(const Tensor& u, const Tensor& d, const Tensor& A, const Tensor& B, const Tensor& C,
           const Tensor& D, const Tensor& z, const Tensor& b, bool sp) {
  return selective_scan_ref(u, d, A, B, C, D, z, b, sp);
}

// Output and gradients of sum(y * w) for every defined input.
std::vector<Tensor> run(ScanFn fn, const Inputs& x, const Tensor& w, bool softplus) {
  for (const Tensor& t : x.all())
    if (t.defined() && t.grad().defined()) t.mutable_grad().reset();
  Tensor y = fn(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, softplus);
  (y * w).sum().backward();
  std::vector<Tensor> out{y.detach()};
  for (const Tensor& t : x.all()) out.push_back(t.defined() ? t.grad().clone() : Tensor());
  return out;
}

// |got - want| <= rtol * (|want| + max|want|) elementwise: relative to each tensor's scale, so that
// entries that cancel to near zero are judged against the tensor's magnitude.
void expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double scale = want.abs().max().item<double>();
  const Tensor err = (got - want).abs() - rtol * (want.abs() + scale);
  const double worst = err.max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |diff| = " << (got - want).abs().max().item<double>()
                        << " at scale " << scale;
}

struct Shape { int64_t B, L, I, N; };

TEST(SelectiveScan, FastMatchesReferenceForwardAndGradients) {
  torch::manual_seed(0);
  const std::vector<Shape> shapes = {{1, 1, 1, 1},   {2, 1, 5, 16},  {1, 7, 3, 5},    {2, 64, 8, 16},
                                     {3, 65, 37, 16}, {2, 130, 17, 17}, {1, 200, 33, 4}, {2, 129, 64, 16}};
  for (const Shape& s : shapes) {
    for (bool optional : {true, false}) {
      const Inputs x = make_inputs(s.B, s.L, s.I, s.N, torch::kFloat, optional);
      const Tensor w = torch::randn({s.B, s.L, s.I});
      for (bool softplus : {true, false}) {
        if (!softplus) {  // a positive step without softplus
          x.delta.data().abs_();
          if (x.bias.defined()) x.bias.data().abs_();
        }
        auto want = run(&ref, x, w, softplus);
        auto got = run(&fast, x, w, softplus);
        const std::string where = fmt::format("B={} L={} I={} N={} optional={} softplus={}", s.B,
                                              s.L, s.I, s.N, optional, softplus);
        expect_close(got[0], want[0], 1e-5, "y " + where);
        for (size_t k = 0; k < 8; ++k)
          if (want[k + 1].defined()) expect_close(got[k + 1], want[k + 1], 1e-5, std::string(kNames[k]) + " " + where);
      }
    }
  }
}

TEST(SelectiveScan, StridedChannelsLastViews) {
  // The model passes u and z as views into the in_proj output ([B, L, 2I], stride 2I on L).
  torch::manual_seed(1);
  const int64_t B = 2, L = 70, I = 24, N = 16;
  Tensor xz = torch::randn({B, L, 2 * I});
  Inputs x = make_inputs(B, L, I, N, torch::kFloat);
  Tensor u = xz.narrow(2, 0, I), z = xz.narrow(2, I, I);
  Tensor want = selective_scan_ref(u, x.delta, x.A, x.Bm, x.Cm, x.D, z, x.bias, true);
  Tensor got = selective_scan(u, x.delta, x.A, x.Bm, x.Cm, x.D, z, x.bias, true);
  expect_close(got, want, 1e-5, "strided y");
}

TEST(SelectiveScan, FinalStateIsTheLastStep) {
  torch::manual_seed(2);
  const int64_t B = 2, L = 67, I = 5, N = 16;
  Inputs x = make_inputs(B, L, I, N, torch::kDouble, false);
  Tensor state;
  selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, {}, {}, {}, true, &state);
  // h_{L-1} by the recurrence written out, in float64.
  torch::NoGradGuard ng;
  Tensor dt = torch::softplus(x.delta);
  Tensor h = torch::zeros({B, I, N}, torch::kDouble);
  for (int64_t t = 0; t < L; ++t) {
    Tensor d = dt.select(1, t).unsqueeze(-1);
    h = torch::exp(d * x.A) * h + d * x.u.select(1, t).unsqueeze(-1) * x.Bm.select(1, t).unsqueeze(1);
  }
  ASSERT_EQ(state.sizes(), h.sizes());
  EXPECT_TRUE(torch::allclose(state, h, 1e-12, 1e-12));
}

// Decoding: selective_scan_step from a state, step after step, gives the whole scan's outputs and
// final state; float32 on the fused step kernel (N = 16: vector packs; N = 5: scalar), with D, the
// gate and the delta bias; float64 on the written-out path.
TEST(SelectiveScan, StepAfterStepEqualsTheWholeScan) {
  for (auto [N, dtype] : std::vector<std::pair<int64_t, torch::Dtype>>{{16, torch::kFloat}, {5, torch::kFloat}, {16, torch::kDouble}}) {
    torch::manual_seed(N);
    const int64_t B = 3, L = 9, I = 37;
    Inputs x = make_inputs(B, L, I, N, dtype, false);
    const Tensor D = torch::randn({I}, dtype), z = torch::randn({B, L, I}, dtype), bias = torch::randn({I}, dtype);
    Tensor final_state;
    const Tensor want = selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, D, z, bias, true, &final_state);
    Tensor state = torch::zeros({B, I, N}, dtype);
    for (int64_t t = 0; t < L; ++t) {
      const Tensor y = selective_scan_step(x.u.select(1, t), x.delta.select(1, t), x.A, x.Bm.select(1, t),
                                           x.Cm.select(1, t), D, z.select(1, t), bias, true, state);
      EXPECT_TRUE(torch::allclose(y, want.select(1, t), 1e-5, 1e-5)) << "N " << N << " t " << t << " max diff "
                                                                     << (y - want.select(1, t)).abs().max().item<double>();
    }
    EXPECT_TRUE(torch::allclose(state, final_state, 1e-5, 1e-5)) << "N " << N;
  }
  // The fused float32 step against the written-out recurrence in float64 on the same values, with
  // delta and z over a wide range (the kernel's own softplus and SiLU: both signs, large and tiny
  // exp), odd channel counts, strided B/C rows; the state is overwritten in place.
  for (int64_t N : {16, 5}) {
    torch::manual_seed(100 + N);
    const int64_t B = 3, I = 21;
    const Tensor u = torch::randn({B, I}), delta = torch::rand({B, I}) * 60 - 30, A = -torch::rand({I, N}) * 2;
    const Tensor BC = torch::randn({B, 2 * N + 3}), Bm = BC.narrow(1, 0, N), Cm = BC.narrow(1, N + 3, N);
    const Tensor D = torch::randn({I}), z = torch::rand({B, I}) * 40 - 20, bias = torch::randn({I});
    Tensor state = torch::randn({B, I, N});
    Tensor ref_state = state.to(torch::kDouble);
    auto d = [](const Tensor& t) { return t.to(torch::kDouble); };
    const void* storage = state.data_ptr();
    for (int t = 0; t < 3; ++t) {
      const Tensor y = selective_scan_step(u, delta, A, Bm, Cm, D, z, bias, true, state);
      const Tensor want = selective_scan_step(d(u), d(delta), d(A), d(Bm), d(Cm), d(D), d(z), d(bias), true, ref_state);
      EXPECT_TRUE(torch::allclose(y.to(torch::kDouble), want, 1e-5, 1e-5))
          << "N " << N << " max diff " << (y.to(torch::kDouble) - want).abs().max().item<double>();
      EXPECT_TRUE(torch::allclose(state.to(torch::kDouble), ref_state, 1e-5, 1e-5)) << "N " << N;
    }
    EXPECT_EQ(state.data_ptr(), storage);
  }
  Tensor wrong = torch::zeros({2, 3, 4});
  EXPECT_THROW(selective_scan_step(torch::zeros({1, 3}), torch::zeros({1, 3}), torch::zeros({3, 4}), torch::zeros({1, 4}),
                                   torch::zeros({1, 4}), {}, {}, {}, true, wrong),
               Error);
}

TEST(SelectiveScan, Float64GradientsMatchFiniteDifferences) {
  torch::manual_seed(3);
  const int64_t B = 2, L = 67, I = 3, N = 5;  // L crosses a chunk boundary
  Inputs x = make_inputs(B, L, I, N, torch::kDouble);
  Tensor w = torch::randn({B, L, I}, torch::kDouble);
  auto grads = run(&fast, x, w, true);
  torch::NoGradGuard ng;
  auto loss = [&] {
    return (selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true) * w).sum().item<double>();
  };
  const double eps = 1e-6;
  const auto inputs = x.all();
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor p = inputs[k].data().view(-1);
    Tensor g = grads[k + 1].view(-1);
    // Every element of the small tensors, a strided sample of the large ones.
    const int64_t n = p.numel(), stride = n > 64 ? n / 61 : 1;
    for (int64_t j = 0; j < n; j += stride) {
      const double v = p[j].item<double>();
      p[j] = v + eps;
      const double up = loss();
      p[j] = v - eps;
      const double down = loss();
      p[j] = v;
      const double numeric = (up - down) / (2 * eps), analytic = g[j].item<double>();
      EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::abs(numeric))) << kNames[k] << "[" << j << "]";
    }
  }
}

TEST(SelectiveScan, GradientsDoNotDependOnThreadCount) {
  torch::manual_seed(4);
  Inputs x = make_inputs(2, 100, 70, 16, torch::kFloat);
  Tensor w = torch::randn({2, 100, 70});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  auto one = run(&fast, x, w, true);
  at::set_num_threads(std::max(2, threads));
  auto many = run(&fast, x, w, true);
  at::set_num_threads(threads);
  for (size_t k = 0; k < one.size(); ++k)
    EXPECT_TRUE(torch::equal(one[k], many[k])) << (k == 0 ? "y" : kNames[k - 1]);
}

TEST(SelectiveScan, RejectsInconsistentShapes) {
  Inputs x = make_inputs(2, 8, 4, 16, torch::kFloat);
  Tensor badB = torch::randn({2, 8, 15});
  try {
    selective_scan(x.u, x.delta, x.A, badB, x.Cm, x.D, x.z, x.bias, true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("B has shape 2x8x15, expected 2x8x16"), std::string::npos) << e.what();
  }
  EXPECT_THROW(selective_scan(x.u, x.delta.narrow(1, 0, 7), x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true), Error);
  EXPECT_THROW(selective_scan(x.u.narrow(1, 0, 0), x.delta.narrow(1, 0, 0), x.A, x.Bm.narrow(1, 0, 0),
                              x.Cm.narrow(1, 0, 0), x.D, {}, x.bias, true), Error);
}

}  // namespace
}  // namespace coil
