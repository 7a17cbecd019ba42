// The CUDA selective scan against the float64 reference (selective_scan_ref on CPU, fed the same
// values) and against the fused CPU kernel: y, every gradient and the final state, in float32 and
// bfloat16, on shapes with odd sizes (L across chunk boundaries, I not a multiple of the block,
// every register layout of the state: N = 3, 5, 16, 17, 64), for both kernel versions of
// scan_cuda.h (the sequential one, and the segmented one with one and with several time segments).
// At Mamba sizes (L = 2048, I = 1536, B = 1 and 8, N = 16 and 64; strided u and z, a non-default
// stream) the reference is the fused CPU kernel in float64 (selective_scan_ref would materialize
// [B, L, I, N]). Every test needs a GPU and skips without one. Each comparison prints its worst
// error relative to the tensor's scale, so a GPU run shows the margins as well as the verdict.
// tests/python/test_scan_cuda_emulation.py checks the segmented kernel's indexing without a GPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>

#include "model/selective_scan.h"
#if defined(COIL_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/scan_cuda.h"
#endif
#include "util/error.h"

namespace coil {
namespace {

using torch::Tensor;

#define SKIP_WITHOUT_GPU()                                                                  \
  do {                                                                                      \
    if (!torch::cuda::is_available())                                                       \
      GTEST_SKIP() << "no CUDA device here: the CUDA scan is tested on a GPU machine";     \
  } while (0)

#if defined(COIL_WITH_CUDA)
// Runs the scope with the given kernel version and time segments (0: automatic), then restores.
struct TuningScope {
  scan_cuda::Tuning saved = scan_cuda::tuning();
  TuningScope(scan_cuda::Kernel k, int segments) { scan_cuda::set_tuning({k, segments}); }
  ~TuningScope() { scan_cuda::set_tuning(saved); }
};
struct Version {
  scan_cuda::Kernel kernel;
  int segments;
  const char* name;
};
// The first kernel; the segmented one as plan() picks (one segment at these small sizes); and
// with 3 segments forced (the local, combine and full passes; fewer where L has fewer chunks).
const Version kVersions[] = {{scan_cuda::Kernel::kSequential, 0, "sequential"},
                             {scan_cuda::Kernel::kSegmented, 0, "segmented auto"},
                             {scan_cuda::Kernel::kSegmented, 3, "segmented S=3"}};
#endif

// Runs f once per kernel version (once, as it comes, in a build without the CUDA kernels).
template <typename F>
void for_each_version(F&& f) {
#if defined(COIL_WITH_CUDA)
  for (const Version& v : kVersions) {
    SCOPED_TRACE(v.name);
    std::printf("%s:\n", v.name);
    TuningScope scope(v.kernel, v.segments);
    f();
  }
#else
  f();
#endif
}

struct Inputs {
  Tensor u, delta, A, Bm, Cm, D, z, bias;
  std::vector<Tensor> all() const { return {u, delta, A, Bm, Cm, D, z, bias}; }
};
const char* kNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"};
bool is_param(size_t k) { return k == 2 || k == 5 || k == 7; }  // A, D, delta_bias: float32 params

struct Shape { int64_t B, L, I, N; };
std::string str(const Shape& s) { return fmt::format("B={} L={} I={} N={}", s.B, s.L, s.I, s.N); }

// Float64 values on CPU, distributed as in a Mamba layer (A = -(1..16), softplus(bias) in
// [0.001, 0.1]), already rounded to what the kernel will see: the inputs u, delta, B, C, z to
// `io`, the parameters A, D, delta_bias to float32. So the reference, the CPU kernel and the CUDA
// kernel all start from the same numbers, and only the computation differs.
Inputs make_values(const Shape& s, torch::Dtype io, bool optional, bool softplus) {
  auto o = torch::TensorOptions().dtype(torch::kDouble);
  auto round = [](const Tensor& t, torch::Dtype d) { return t.to(d).to(torch::kDouble); };
  Inputs x;
  x.u = round(torch::randn({s.B, s.L, s.I}, o), io);
  x.delta = round(torch::randn({s.B, s.L, s.I}, o) * 0.5, io);
  x.A = round(-torch::exp(torch::log(torch::rand({s.I, s.N}, o) * 15 + 1)), torch::kFloat);
  x.Bm = round(torch::randn({s.B, s.L, s.N}, o), io);
  x.Cm = round(torch::randn({s.B, s.L, s.N}, o), io);
  if (optional) {
    x.D = round(torch::randn({s.I}, o), torch::kFloat);
    x.z = round(torch::randn({s.B, s.L, s.I}, o), io);
    Tensor dt = torch::exp(torch::rand({s.I}, o) * (std::log(0.1) - std::log(0.001)) + std::log(0.001));
    x.bias = round(dt + torch::log(-torch::expm1(-dt)), torch::kFloat);  // inverse softplus
  }
  if (!softplus) {  // a positive step without softplus
    x.delta = x.delta.abs();
    if (x.bias.defined()) x.bias = x.bias.abs();
  }
  return x;
}

// Leaf copies on `device`: inputs in `io`, parameters in float32 (float64 for the reference).
Inputs leaves(const Inputs& v, torch::Device device, torch::Dtype io) {
  Inputs x;
  Tensor* dst[] = {&x.u, &x.delta, &x.A, &x.Bm, &x.Cm, &x.D, &x.z, &x.bias};
  const auto src = v.all();
  for (size_t k = 0; k < src.size(); ++k) {
    if (!src[k].defined()) continue;
    const auto dtype = io == torch::kDouble ? torch::kDouble : is_param(k) ? torch::kFloat : io;
    *dst[k] = src[k].to(device, dtype).requires_grad_(true);
  }
  return x;
}

// y, the final state and the gradients of sum(y * w) for every defined input, as float64 on CPU.
struct Result {
  Tensor y, state;
  std::vector<Tensor> grads;
};
Result run_fast(const Inputs& x, const Tensor& w, bool softplus) {
  Result r;
  Tensor y = selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, softplus, &r.state);
  (y * w.to(y.device(), y.scalar_type())).sum().backward();
  r.y = y.detach().to(torch::kCPU, torch::kDouble);
  r.state = r.state.to(torch::kCPU, torch::kDouble);
  for (const Tensor& t : x.all()) r.grads.push_back(t.defined() ? t.grad().to(torch::kCPU, torch::kDouble) : Tensor());
  return r;
}
Result run_ref(const Inputs& x, const Tensor& w, bool softplus) {
  Result r;
  Tensor y = selective_scan_ref(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, softplus);
  (y * w).sum().backward();
  r.y = y.detach();
  for (const Tensor& t : x.all()) r.grads.push_back(t.defined() ? t.grad().clone() : Tensor());
  // h after the last step, by the recurrence written out.
  torch::NoGradGuard ng;
  Tensor d = x.bias.defined() ? x.delta + x.bias : x.delta;
  if (softplus) d = torch::softplus(d);
  Tensor h = torch::zeros({x.u.size(0), x.u.size(2), x.A.size(1)}, torch::kDouble);
  for (int64_t t = 0; t < x.u.size(1); ++t) {
    Tensor dt = d.select(1, t).unsqueeze(-1);
    h = torch::exp(dt * x.A) * h + dt * x.u.select(1, t).unsqueeze(-1) * x.Bm.select(1, t).unsqueeze(1);
  }
  r.state = h;
  return r;
}

// |got - want| <= rtol * (|want| + max|want|) elementwise (as in test_selective_scan.cpp); returns
// the worst max|got - want| / max|want| for the printed summary.
double expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  EXPECT_EQ(got.sizes(), want.sizes()) << what;
  if (got.sizes() != want.sizes()) return 1e30;
  const double scale = std::max(want.abs().max().item<double>(), 1e-30);
  const double worst = ((got - want).abs() - rtol * (want.abs() + scale)).max().item<double>();
  const double diff = (got - want).abs().max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |diff| = " << diff << " at scale " << scale;
  EXPECT_FALSE(torch::isnan(got).any().item<bool>()) << what << " has NaN";
  return diff / scale;
}

double compare(const Result& got, const Result& want, double rtol, const std::string& where) {
  double worst = expect_close(got.y, want.y, rtol, "y " + where);
  worst = std::max(worst, expect_close(got.state, want.state, rtol, "final state " + where));
  for (size_t k = 0; k < want.grads.size(); ++k) {
    EXPECT_EQ(got.grads[k].defined(), want.grads[k].defined()) << kNames[k] << " " << where;
    if (want.grads[k].defined() && got.grads[k].defined())
      worst = std::max(worst, expect_close(got.grads[k], want.grads[k], rtol, std::string(kNames[k]) + " " + where));
  }
  return worst;
}

// float32: within 1e-4 of the float64 reference and of the CPU kernel (float32 arithmetic over a
// few hundred steps, and the GPU's exp2 differs from the CPU's exp by an ulp or two).
// bfloat16: y and the input gradients are rounded to bfloat16 (half an ulp is 2^-8 relative);
// the parameter gradients and the state are float32.
constexpr double kRtolF32 = 1e-4, kRtolBF16 = 1e-2;

void check_shape(const Shape& s, torch::Dtype io, bool optional, bool softplus) {
  const std::string where = fmt::format("{} {} optional={} softplus={}", str(s), c10::toString(io),
                                        optional, softplus);
  const Inputs v = make_values(s, io, optional, softplus);
  const Tensor w = torch::randn({s.B, s.L, s.I}, torch::kDouble).to(io).to(torch::kDouble);  // dy, exact in io
  const Result ref = run_ref(leaves(v, torch::kCPU, torch::kDouble), w, softplus);
  const Result cpu = run_fast(leaves(v, torch::kCPU, torch::kFloat), w, softplus);
  const double rtol = io == torch::kFloat ? kRtolF32 : kRtolBF16;
  for_each_version([&] {  // the references once, every kernel version against them
    const Result gpu = run_fast(leaves(v, torch::kCUDA, io), w, softplus);
    const double vs_ref = compare(gpu, ref, rtol, "(CUDA vs reference) " + where);
    const double vs_cpu = compare(gpu, cpu, rtol, "(CUDA vs CPU kernel) " + where);
    std::printf("  %-60s worst |diff|/scale: %.2e vs reference, %.2e vs CPU kernel\n", where.c_str(), vs_ref, vs_cpu);
  });
}

const std::vector<Shape> kShapes = {{1, 1, 1, 16},   {3, 65, 37, 16}, {1, 200, 33, 5}, {3, 97, 17, 3},
                                    {2, 130, 64, 17}, {1, 70, 20, 64},  {2, 33, 16, 16}};

TEST(ScanCuda, Float32MatchesReferenceAndCpuKernel) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(10);
  for (const Shape& s : kShapes)
    for (bool optional : {true, false})
      for (bool softplus : {true, false}) check_shape(s, torch::kFloat, optional, softplus);
}

TEST(ScanCuda, BFloat16MatchesReferenceAndCpuKernel) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(11);
  for (const Shape& s : kShapes)
    for (bool optional : {true, false}) check_shape(s, torch::kBFloat16, optional, true);
}

#if defined(COIL_WITH_CUDA)

// Small and fast (a few ms on a GPU): the segmented kernel with 2 segments, forward and backward,
// against the float64 reference. scripts/gpu-check runs it under compute-sanitizer.
TEST(ScanCuda, ForwardBackwardSmall) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(15);
  TuningScope scope(scan_cuda::Kernel::kSegmented, 2);
  for (const Shape s : {Shape{2, 100, 20, 16}, Shape{1, 70, 18, 40}}) {  // N = 40: 16 threads a channel, two halves
    const Inputs v = make_values(s, torch::kFloat, true, true);
    const Tensor w = torch::randn({s.B, s.L, s.I}, torch::kDouble).to(torch::kFloat).to(torch::kDouble);
    const Result ref = run_ref(leaves(v, torch::kCPU, torch::kDouble), w, true);
    const Result gpu = run_fast(leaves(v, torch::kCUDA, torch::kFloat), w, true);
    std::printf("  %-30s worst |diff|/scale: %.2e vs reference\n", str(s).c_str(),
                compare(gpu, ref, kRtolF32, "(segmented, 2 segments, vs reference) " + str(s)));
  }
}

// plan() splits time when the batch is too small to fill the device, and not when it is large.
TEST(ScanCuda, PlanSplitsTimeAtSmallBatchesOnly) {
  SKIP_WITHOUT_GPU();
  TuningScope scope(scan_cuda::Kernel::kSegmented, 0);
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  for (bool backward : {false, true})
    for (int64_t N : {16, 64}) {
      scan_cuda::Params p;
      p.B = 1, p.L = 2048, p.I = 1536, p.N = N;
      ASSERT_EQ(scan_cuda::plan(p, backward), nullptr);
      const int64_t blocks = p.B * scan_cuda::num_channel_blocks(p.I) * p.segments;
      EXPECT_GT(p.segments, 1) << "N=" << N << " backward=" << backward;
      EXPECT_GE(blocks, sms) << "B=1 leaves SMs idle: N=" << N << " backward=" << backward;
      EXPECT_EQ(scan_cuda::partial_rows(p), p.segments);
      EXPECT_EQ(scan_cuda::scratch_floats(p), p.segments * p.I * (N + 1));
      std::printf("  B=1 L=2048 I=1536 N=%ld %s: %d segments, %ld blocks on %d SMs\n", long(N),
                  backward ? "backward" : "forward", p.segments, long(blocks), sms);
      p.B = 64;
      ASSERT_EQ(scan_cuda::plan(p, backward), nullptr);
      EXPECT_EQ(p.segments, 1) << "B=64: N=" << N << " backward=" << backward;
    }
  // A forced count is kept as far as it leaves no segment empty: 129 steps are 5 chunks (5
  // segments), 128 steps 4 chunks (4 segments).
  scan_cuda::set_tuning({scan_cuda::Kernel::kSegmented, 5});
  scan_cuda::Params p;
  p.B = 1, p.L = 64 * 2 + 1, p.I = 16, p.N = 16;
  ASSERT_EQ(scan_cuda::plan(p, false), nullptr);
  EXPECT_EQ(p.segments, 5);  // 5 chunks: one each
  p.L = 4 * 32;
  ASSERT_EQ(scan_cuda::plan(p, false), nullptr);
  EXPECT_EQ(p.segments, 4);
}

// Mamba sizes: L = 2048, I = 1536, B = 1 and 8, N = 16 and 64, u and z strided views into one
// [B, L, 2I] tensor (as the model passes them), gradients through the views, all on a stream other
// than the default one; against the fused CPU kernel in float64, and the segmented kernel against
// the sequential one.
TEST(ScanCuda, MambaSizesOnASideStreamThroughStridedViews) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(16);
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  ASSERT_NE(side.stream(), c10::cuda::getDefaultCUDAStream().stream());
  for (const Shape s : {Shape{1, 2048, 1536, 16}, Shape{1, 2048, 1536, 64}, Shape{8, 2048, 1536, 16},
                        Shape{8, 2048, 1536, 64}}) {
    const std::string where = str(s);
    SCOPED_TRACE(where);
    const Inputs v = make_values(s, torch::kFloat, true, true);
    const Tensor w = torch::randn({s.B, s.L, s.I}, torch::kDouble).to(torch::kFloat).to(torch::kDouble);
    const Result want = run_fast(leaves(v, torch::kCPU, torch::kDouble), w, true);  // fused CPU, float64
    Result got[2];
    for (int k = 0; k < 2; ++k) {
      TuningScope scope(k == 0 ? scan_cuda::Kernel::kSegmented : scan_cuda::Kernel::kSequential, 0);
      c10::cuda::CUDAStreamGuard guard(side);
      Inputs g = leaves(v, torch::kCUDA, torch::kFloat);
      Tensor xz = torch::cat({v.u, v.z}, 2).to(torch::kCUDA, torch::kFloat).requires_grad_(true);  // [B, L, 2I]
      Tensor y = selective_scan(xz.narrow(2, 0, s.I), g.delta, g.A, g.Bm, g.Cm, g.D, xz.narrow(2, s.I, s.I), g.bias,
                                true, &got[k].state);
      (y * w.to(torch::kCUDA, torch::kFloat)).sum().backward();
      side.synchronize();
      got[k].y = y.detach().to(torch::kCPU, torch::kDouble);
      got[k].state = got[k].state.to(torch::kCPU, torch::kDouble);
      const Tensor gxz = xz.grad().to(torch::kCPU, torch::kDouble);
      got[k].grads = {gxz.narrow(2, 0, s.I), g.delta.grad().to(torch::kCPU, torch::kDouble),
                      g.A.grad().to(torch::kCPU, torch::kDouble), g.Bm.grad().to(torch::kCPU, torch::kDouble),
                      g.Cm.grad().to(torch::kCPU, torch::kDouble), g.D.grad().to(torch::kCPU, torch::kDouble),
                      gxz.narrow(2, s.I, s.I), g.bias.grad().to(torch::kCPU, torch::kDouble)};
    }
    const double vs_ref = compare(got[0], want, kRtolF32, "(segmented vs CPU float64) " + where);
    const double vs_seq = compare(got[0], got[1], kRtolF32, "(segmented vs sequential) " + where);
    std::printf("  %-40s worst |diff|/scale: %.2e vs CPU float64, %.2e vs the sequential kernel\n", where.c_str(),
                vs_ref, vs_seq);
  }
}
#endif

TEST(ScanCuda, StridedChannelsLastViews) {
  // The model passes u and z as views into the in_proj output ([B, L, 2I], stride 2I on L).
  SKIP_WITHOUT_GPU();
  torch::manual_seed(12);
  const Shape s{2, 70, 24, 16};
  for (torch::Dtype io : {torch::kFloat, torch::kBFloat16}) {
    const Inputs v = make_values(s, io, true, true);
    const Tensor xz = torch::cat({v.u, v.z}, 2).to(torch::kCUDA, io);  // [B, L, 2I]
    const Inputs g = leaves(v, torch::kCUDA, io);
    Tensor want = selective_scan_ref(v.u, v.delta, v.A, v.Bm, v.Cm, v.D, v.z, v.bias, true);
    for_each_version([&] {  // (S = 3: the 3 chunks of L = 70 in 3 segments)
      Tensor got = selective_scan(xz.narrow(2, 0, s.I), g.delta, g.A, g.Bm, g.Cm, g.D, xz.narrow(2, s.I, s.I),
                                  g.bias, true);
      expect_close(got.to(torch::kCPU, torch::kDouble), want, io == torch::kFloat ? kRtolF32 : kRtolBF16,
                   "strided y " + std::string(c10::toString(io)));
    });
  }
}

TEST(ScanCuda, ForwardWithoutGradientsGivesTheSameOutputAndState) {
  // Without gradients the kernel keeps no chunk states, only the final one.
  SKIP_WITHOUT_GPU();
  torch::manual_seed(13);
  const Inputs v = make_values({3, 100, 40, 16}, torch::kFloat, true, true);
  const Inputs g = leaves(v, torch::kCUDA, torch::kFloat);
  for_each_version([&] {
    Tensor s1, s2;
    Tensor y1 = selective_scan(g.u, g.delta, g.A, g.Bm, g.Cm, g.D, g.z, g.bias, true, &s1);
    Tensor y2;
    {
      torch::NoGradGuard ng;
      y2 = selective_scan(g.u, g.delta, g.A, g.Bm, g.Cm, g.D, g.z, g.bias, true, &s2);
    }
    EXPECT_TRUE(y1.requires_grad());
    EXPECT_FALSE(y2.requires_grad());
    EXPECT_TRUE(torch::equal(y1.detach(), y2));
    EXPECT_TRUE(torch::equal(s1, s2));
  });
}

TEST(ScanCuda, GradientsOtherThanBAndCAreDeterministic) {
  // dA, dD, ddelta_bias are summed in a fixed order; dB and dC by atomic adds (last bits may vary).
  SKIP_WITHOUT_GPU();
  torch::manual_seed(14);
  const Shape s{2, 300, 70, 16};
  const Inputs v = make_values(s, torch::kFloat, true, true);
  const Tensor w = torch::randn({s.B, s.L, s.I}, torch::kDouble);
  for_each_version([&] {
    const Result a = run_fast(leaves(v, torch::kCUDA, torch::kFloat), w, true);
    const Result b = run_fast(leaves(v, torch::kCUDA, torch::kFloat), w, true);
    EXPECT_TRUE(torch::equal(a.y, b.y));
    for (size_t k : {0, 1, 2, 5, 6, 7}) EXPECT_TRUE(torch::equal(a.grads[k], b.grads[k])) << kNames[k];
    for (size_t k : {3, 4}) expect_close(a.grads[k], b.grads[k], 1e-6, kNames[k]);
  });
}

TEST(ScanCuda, RejectsAStateAbove64AndMixedDevices) {
  SKIP_WITHOUT_GPU();
#if defined(COIL_WITH_CUDA)
  const Inputs big = leaves(make_values({1, 4, 2, 65}, torch::kFloat, false, true), torch::kCUDA, torch::kFloat);
  EXPECT_THROW(selective_scan(big.u, big.delta, big.A, big.Bm, big.Cm, {}, {}, {}, true), Error);
  const Inputs x = leaves(make_values({1, 4, 2, 16}, torch::kFloat, false, true), torch::kCUDA, torch::kFloat);
  EXPECT_THROW(selective_scan(x.u, x.delta, x.A.cpu(), x.Bm, x.Cm, {}, {}, {}, true), Error);
#else
  // A build without the kernels says so instead of failing somewhere inside.
  const Inputs x = leaves(make_values({1, 4, 2, 16}, torch::kFloat, false, true), torch::kCUDA, torch::kFloat);
  try {
    selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, {}, {}, {}, true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA kernels"), std::string::npos) << e.what();
  }
#endif
}

}  // namespace
}  // namespace coil
