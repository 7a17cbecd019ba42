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

#include <array>
#include <cstdio>

#include "model/conv1d.h"
#include "model/mamba.h"
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

// ---- Packed documents (seq_idx) and initial states (h0; the final state's gradient) ----------------

// Document numbers [B, L] int32: row 0 one document (no start at all), row 1 starts at every chunk
// and segment boundary the kernels have near the start and the end (t = 1, 31, 32, 33, 64, 96, 128,
// 192 and L-1, where they fall inside the row: chunk ends and starts, the first step of a segment of
// 3 chunks, a one-token document at the end), further rows random starts (about one in `every`).
// None at `none_at`.
Tensor packed_seq_idx(int64_t B, int64_t L, int64_t every, int64_t none_at = -1) {
  Tensor start = torch::rand({B, L}) < 1.0 / every;
  start[0].fill_(false);
  if (B > 1) {
    start[1].fill_(false);
    for (int64_t t : {int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(64), int64_t(96), int64_t(128),
                      int64_t(192), L - 1})
      if (t > 0 && t < L) start[1][t] = true;
  } else if (L > 40) {
    start[0][32] = true;
  }
  start.select(1, 0).fill_(false);
  if (none_at >= 0) start.select(1, none_at).fill_(false);
  return torch::cumsum(start.to(torch::kInt), 1).to(torch::kInt);
}

// y, the final state and the gradients of sum(y * wy) + sum(final * wh) (wh undefined: y alone)
// with respect to the 8 inputs and h0, as float64 on CPU (undefined where the input is).
struct BRun {
  Tensor y, last;
  std::vector<Tensor> grads;
};
const char* kBNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"};
BRun run_boundaries(bool reference, const Inputs& x, const Tensor& h0, const Tensor& seq, const Tensor& wy,
                    const Tensor& wh) {
  BRun r;
  Tensor last;
  const Tensor y = reference
                       ? selective_scan_ref(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, seq, h0, &last)
                       : selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, x.D, x.z, x.bias, true, &last, seq, h0);
  Tensor loss = (y * wy.to(y.device(), y.scalar_type())).sum();
  if (wh.defined()) loss = loss + (last * wh.to(last.device(), last.scalar_type())).sum();
  loss.backward();
  r.y = y.detach().to(torch::kCPU, torch::kDouble);
  r.last = last.detach().to(torch::kCPU, torch::kDouble);
  auto all = x.all();
  all.push_back(h0);
  for (const Tensor& t : all)
    r.grads.push_back(t.defined() && t.grad().defined() ? t.grad().to(torch::kCPU, torch::kDouble) : Tensor());
  return r;
}
double compare_boundaries(const BRun& got, const BRun& want, double rtol, const std::string& where) {
  double worst = expect_close(got.y, want.y, rtol, "y " + where);
  worst = std::max(worst, expect_close(got.last, want.last, rtol, "final state " + where));
  for (size_t k = 0; k < want.grads.size(); ++k) {
    EXPECT_EQ(got.grads[k].defined(), want.grads[k].defined()) << kBNames[k] << " " << where;
    if (want.grads[k].defined() && got.grads[k].defined())
      worst = std::max(worst, expect_close(got.grads[k], want.grads[k], rtol, std::string(kBNames[k]) + " " + where));
  }
  return worst;
}
// h0 as a leaf: float64 on CPU for the reference, float32 on the GPU; the values rounded to float32.
Tensor h0_leaf(const Tensor& h0, torch::Device device) {
  return h0.to(device, device.is_cpu() ? torch::kDouble : torch::kFloat).detach().requires_grad_(true);
}

// The causal conv on the GPU (x a strided view into [B, L, 2I], in `io`) with seq_idx and/or an
// initial state against the float64 masked reference on CPU: y and the gradients of x, w, bias and
// the initial state. bfloat16: every output is rounded to bfloat16 (half an ulp is 2^-9).
struct ConvShape {
  int64_t B, L, I, K;
};
void conv_against_reference(const ConvShape& s, torch::Dtype io, bool with_seq, bool with_init) {
  const std::string where = fmt::format("B={} L={} I={} K={} {} seq_idx={} init={}", s.B, s.L, s.I, s.K,
                                        c10::toString(io), with_seq, with_init);
  auto rounded = [&](std::initializer_list<int64_t> shape) {
    return torch::randn(shape, torch::kDouble).to(io).to(torch::kDouble);
  };
  const Tensor x = rounded({s.B, s.L, s.I}), w = rounded({s.I, 1, s.K}), b = rounded({s.I});
  const Tensor init = with_init ? rounded({s.B, s.I, s.K - 1}) : Tensor();
  const Tensor seq = with_seq ? packed_seq_idx(s.B, s.L, 3) : Tensor();
  const Tensor dy = rounded({s.B, s.L, s.I});
  auto run = [&](torch::Device dev, torch::Dtype dt) {
    std::vector<Tensor> in{torch::cat({x, x}, 2).to(dev, dt).narrow(2, 0, s.I).detach().requires_grad_(true),
                           w.to(dev, dt).requires_grad_(true), b.to(dev, dt).requires_grad_(true)};
    if (with_init) in.push_back(init.to(dev, dt).requires_grad_(true));
    const Tensor y = dev.is_cpu() ? causal_conv1d_ref(in[0], in[1], in[2], seq, with_init ? in[3] : Tensor())
                                  : causal_conv1d(in[0], in[1], in[2], with_seq ? seq.to(dev) : Tensor(),
                                                  with_init ? in[3] : Tensor());
    auto g = torch::autograd::grad({y}, in, {dy.to(dev, y.scalar_type())});
    std::vector<Tensor> out{y.detach().to(torch::kCPU, torch::kDouble)};
    for (const Tensor& t : g) out.push_back(t.to(torch::kCPU, torch::kDouble));
    return out;
  };
  const auto want = run(torch::kCPU, torch::kDouble), got = run(torch::kCUDA, io);
  const char* names[] = {"y", "dx", "dw", "dbias", "dinit"};
  ASSERT_EQ(got.size(), want.size()) << where;
  const double rtol = io == torch::kFloat ? 1e-5 : 2e-2;
  for (size_t k = 0; k < want.size(); ++k) expect_close(got[k], want[k], rtol, std::string(names[k]) + " " + where);
}

#if defined(COIL_WITH_CUDA)

// Small and fast (a few ms on a GPU): the segmented kernel with 2 segments, forward and backward,
// against the float64 reference; then with document boundaries, h0 and the final state's gradient,
// in both kernel versions (so the sanitizer sees the reset flags, the segments' flags in scratch,
// h0, dlast and dh0 too); and the causal conv's CUDA kernel with seq_idx and an initial state.
// scripts/gpu-check runs it under compute-sanitizer.
TEST(ScanCuda, ForwardBackwardSmall) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(15);
  for (const Shape s : {Shape{2, 100, 20, 16}, Shape{1, 70, 18, 40}}) {  // N = 40: 16 threads a channel, two halves
    TuningScope scope(scan_cuda::Kernel::kSegmented, 2);
    const Inputs v = make_values(s, torch::kFloat, true, true);
    const Tensor w = torch::randn({s.B, s.L, s.I}, torch::kDouble).to(torch::kFloat).to(torch::kDouble);
    const Result ref = run_ref(leaves(v, torch::kCPU, torch::kDouble), w, true);
    const Result gpu = run_fast(leaves(v, torch::kCUDA, torch::kFloat), w, true);
    std::printf("  %-30s worst |diff|/scale: %.2e vs reference\n", str(s).c_str(),
                compare(gpu, ref, kRtolF32, "(segmented, 2 segments, vs reference) " + str(s)));
  }
  for (const Shape s : {Shape{2, 100, 20, 16}, Shape{1, 70, 18, 40}}) {
    const Inputs v = make_values(s, torch::kFloat, true, true);
    const Tensor seq = packed_seq_idx(s.B, s.L, 9);
    const Tensor h0 = torch::randn({s.B, s.I, s.N}, torch::kDouble).to(torch::kFloat).to(torch::kDouble);
    const Tensor wy = torch::randn({s.B, s.L, s.I}, torch::kDouble), wh = torch::randn({s.B, s.I, s.N}, torch::kDouble);
    const BRun want = run_boundaries(true, leaves(v, torch::kCPU, torch::kDouble), h0_leaf(h0, torch::kCPU), seq, wy, wh);
    for (const Version& version : {Version{scan_cuda::Kernel::kSegmented, 2, "segmented S=2"},
                                   Version{scan_cuda::Kernel::kSequential, 0, "sequential"}}) {
      TuningScope scope(version.kernel, version.segments);
      const std::string where = str(s) + " seq_idx, h0, " + version.name;
      const BRun got = run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), h0_leaf(h0, torch::kCUDA),
                                      seq.to(torch::kCUDA), wy, wh);
      std::printf("  %-50s worst |diff|/scale: %.2e vs reference\n", where.c_str(),
                  compare_boundaries(got, want, kRtolF32, where));
    }
  }
  conv_against_reference({2, 70, 40, 4}, torch::kFloat, true, true);
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

// ---- Packed documents and initial states on the GPU (helpers above) --------------------------------

// The CUDA kernel with seq_idx and h0, and the final state in the loss, against the float64
// reference: y, the final state and all 9 gradients (dh0 included), every kernel version, shapes
// with odd sizes and every state layout (N = 3, 5, 16, 17, 40, 64), float32 and bfloat16; seq_idx
// alone, h0 alone and both.
TEST(ScanCuda, BoundariesAndH0MatchReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(40);
  const std::vector<Shape> shapes = {{3, 200, 37, 16}, {2, 130, 20, 5}, {3, 97, 17, 3}, {2, 70, 18, 40},
                                     {1, 1, 1, 16},    {2, 33, 16, 17}, {2, 300, 9, 64}};
  for (const Shape& s : shapes)
    for (torch::Dtype io : {torch::kFloat, torch::kBFloat16})
      for (int mode = 0; mode < 3; ++mode) {  // 0: seq_idx and h0, 1: seq_idx alone, 2: h0 alone
        if (io == torch::kBFloat16 && mode > 0) continue;
        const bool with_seq = mode != 2, with_h0 = mode != 1;
        const std::string where = fmt::format("{} {} seq_idx={} h0={}", str(s), c10::toString(io), with_seq, with_h0);
        const Inputs v = make_values(s, io, true, true);
        const Tensor seq = with_seq ? packed_seq_idx(s.B, s.L, 9) : Tensor();
        const Tensor h0 = with_h0 ? torch::randn({s.B, s.I, s.N}, torch::kDouble).to(torch::kFloat).to(torch::kDouble)
                                  : Tensor();
        const Tensor wy = torch::randn({s.B, s.L, s.I}, torch::kDouble).to(io).to(torch::kDouble);
        const Tensor wh = torch::randn({s.B, s.I, s.N}, torch::kDouble).to(torch::kFloat).to(torch::kDouble);
        const BRun want = run_boundaries(true, leaves(v, torch::kCPU, torch::kDouble),
                                         with_h0 ? h0_leaf(h0, torch::kCPU) : Tensor(), seq, wy, wh);
        for_each_version([&] {
          const BRun got = run_boundaries(false, leaves(v, torch::kCUDA, io),
                                          with_h0 ? h0_leaf(h0, torch::kCUDA) : Tensor(),
                                          with_seq ? seq.to(torch::kCUDA) : Tensor(), wy, wh);
          std::printf("  %-60s worst |diff|/scale: %.2e vs reference\n", where.c_str(),
                      compare_boundaries(got, want, io == torch::kFloat ? kRtolF32 : kRtolBF16, where));
        });
      }
}

// No boundaries: an undefined seq_idx, one of a single document per row, an undefined h0 and one of
// zeros give the same y, final state and gradients bit for bit (dB and dC within their atomic adds'
// rounding), every kernel version; so the kernels' new inputs cost nothing when they are absent.
TEST(ScanCuda, NoBoundariesIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(41);
  for (const Shape& s : std::vector<Shape>{{2, 200, 37, 16}, {1, 130, 20, 40}}) {
    const Inputs v = make_values(s, torch::kFloat, true, true);
    const Tensor wy = torch::randn({s.B, s.L, s.I}, torch::kDouble);
    for_each_version([&] {
      const BRun base = run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), Tensor(), Tensor(), wy, Tensor());
      const Tensor one_doc = torch::full({s.B, s.L}, 7, torch::TensorOptions().dtype(torch::kInt).device(torch::kCUDA));
      const Tensor zero_h0 = torch::zeros({s.B, s.I, s.N}, torch::kCUDA).requires_grad_(true);
      const BRun variants[] = {
          run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), Tensor(), one_doc, wy, Tensor()),
          run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), zero_h0, Tensor(), wy, Tensor()),
          run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), zero_h0, one_doc, wy, Tensor())};
      for (const BRun& r : variants) {
        EXPECT_TRUE(torch::equal(r.y, base.y)) << str(s);
        EXPECT_TRUE(torch::equal(r.last, base.last)) << str(s);
        for (size_t k : {0, 1, 2, 5, 6, 7}) EXPECT_TRUE(torch::equal(r.grads[k], base.grads[k])) << kBNames[k] << " " << str(s);
        for (size_t k : {3, 4}) expect_close(r.grads[k], base.grads[k], 1e-6, std::string(kBNames[k]) + " " + str(s));
      }
    });
  }
}

// The defining test, on the GPU: a sequence run in two halves, the second from the first's final
// state (kept in the graph: its gradient flows back through the first half), gives y, the final
// state and every gradient (h0 included) of running it whole; cuts at a chunk boundary, off one,
// after one step; with and without documents (none starting at the cut).
TEST(ScanCuda, TwoHalvesEqualTheWhole) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(42);
  for (auto [L, cut] : std::vector<std::pair<int64_t, int64_t>>{{200, 96}, {130, 64}, {101, 37}, {9, 1}})
    for (bool with_seq : {false, true}) {
      const Shape s{3, L, 21, 16};
      const Inputs v = make_values(s, torch::kFloat, true, true);
      const Tensor seq = with_seq ? packed_seq_idx(s.B, L, 7, cut).to(torch::kCUDA) : Tensor();
      const Tensor h0v = torch::randn({s.B, s.I, s.N});
      const Tensor wy = torch::randn({s.B, L, s.I}, torch::kCUDA), wh = torch::randn({s.B, s.I, s.N}, torch::kCUDA);
      const std::string where = fmt::format("L={} cut={} seq_idx={}", L, cut, with_seq);
      for_each_version([&] {
        const Inputs x = leaves(v, torch::kCUDA, torch::kFloat);
        const Tensor h0 = h0_leaf(h0v, torch::kCUDA);
        const BRun whole = run_boundaries(false, x, h0, seq, wy, wh);
        const Inputs xs = leaves(v, torch::kCUDA, torch::kFloat);
        const Tensor h0s = h0_leaf(h0v, torch::kCUDA);
        auto part = [](const Tensor& t, int64_t a, int64_t n) { return t.defined() ? t.narrow(1, a, n) : t; };
        Tensor mid, last;
        const Tensor y1 = selective_scan(part(xs.u, 0, cut), part(xs.delta, 0, cut), xs.A, part(xs.Bm, 0, cut),
                                         part(xs.Cm, 0, cut), xs.D, part(xs.z, 0, cut), xs.bias, true, &mid,
                                         part(seq, 0, cut), h0s);
        const int64_t rest = L - cut;
        const Tensor y2 = selective_scan(part(xs.u, cut, rest), part(xs.delta, cut, rest), xs.A,
                                         part(xs.Bm, cut, rest), part(xs.Cm, cut, rest), xs.D, part(xs.z, cut, rest),
                                         xs.bias, true, &last, part(seq, cut, rest), mid);
        const Tensor y = torch::cat({y1, y2}, 1);
        ((y * wy).sum() + (last * wh).sum()).backward();
        BRun halves;
        halves.y = y.detach().to(torch::kCPU, torch::kDouble);
        halves.last = last.detach().to(torch::kCPU, torch::kDouble);
        auto all = xs.all();
        all.push_back(h0s);
        for (const Tensor& t : all) halves.grads.push_back(t.grad().to(torch::kCPU, torch::kDouble));
        std::printf("  %-40s worst |diff|/scale: %.2e halves vs whole\n", where.c_str(),
                    compare_boundaries(halves, whole, kRtolF32, "(halves vs whole) " + where));
      });
    }
}

// The meaning of seq_idx, on the GPU: a row of documents packed together gives, for each document,
// the outputs and the input gradients of running it alone (h0 is the first document's start state
// only; the others start from zero), the parameter gradients summed over the documents, and the
// final state of the last document. Documents start at a chunk boundary (32), inside a chunk, and
// one is a single token.
TEST(ScanCuda, PackedDocumentsEqualEachAlone) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(43);
  const std::vector<int64_t> lens = {32, 70, 1, 25};
  const Shape s{1, 128, 19, 16};
  std::vector<Tensor> ids;
  for (size_t d = 0; d < lens.size(); ++d) ids.push_back(torch::full({1, lens[d]}, int(d), torch::kInt));
  const Tensor seq = torch::cat(ids, 1).to(torch::kCUDA);
  const Inputs v = make_values(s, torch::kFloat, true, true);
  const Tensor h0v = torch::randn({1, s.I, s.N});
  const Tensor wy = torch::randn({1, s.L, s.I}, torch::kCUDA);
  for_each_version([&] {
    const BRun packed = run_boundaries(false, leaves(v, torch::kCUDA, torch::kFloat), h0_leaf(h0v, torch::kCUDA),
                                       seq, wy, Tensor());
    std::vector<Tensor> param_sums(8);
    int64_t at = 0;
    for (size_t d = 0; d < lens.size(); ++d) {
      const Inputs x = leaves(v, torch::kCUDA, torch::kFloat);
      const Tensor h0 = d == 0 ? h0_leaf(h0v, torch::kCUDA) : Tensor();
      auto cut = [&](const Tensor& t) { return t.narrow(1, at, lens[d]); };
      Tensor last;
      const Tensor y = selective_scan(cut(x.u), cut(x.delta), x.A, cut(x.Bm), cut(x.Cm), x.D, cut(x.z), x.bias, true,
                                      &last, Tensor(), h0);
      (y * cut(wy)).sum().backward();
      const std::string where = "document " + std::to_string(d);
      auto cpu = [](const Tensor& t) { return t.to(torch::kCPU, torch::kDouble); };
      expect_close(cpu(y.detach()), cut(packed.y), kRtolF32, "y " + where);
      for (size_t k : {0, 1, 3, 4, 6})  // u, delta, B, C, z: per position
        expect_close(cut(cpu(x.all()[k].grad())), cut(packed.grads[k]), kRtolF32, std::string(kBNames[k]) + " " + where);
      for (size_t k : {2, 5, 7})  // A, D, delta_bias: summed over the documents
        param_sums[k] = d == 0 ? cpu(x.all()[k].grad()) : param_sums[k] + cpu(x.all()[k].grad());
      if (d == 0) expect_close(cpu(h0.grad()), packed.grads[8], kRtolF32, "dh0 (the first document's)");
      if (d + 1 == lens.size()) expect_close(cpu(last.detach()), packed.last, kRtolF32, "final state (the last document's)");
      at += lens[d];
    }
    for (size_t k : {2, 5, 7})
      expect_close(param_sums[k], packed.grads[k], kRtolF32, std::string(kBNames[k]) + " summed over the documents");
  });
}

// seq_idx on another device than u is a one-line error, not a crash.
TEST(ScanCuda, SeqIdxOnAnotherDeviceIsAnError) {
  SKIP_WITHOUT_GPU();
  const Inputs x = leaves(make_values({1, 4, 2, 16}, torch::kFloat, false, true), torch::kCUDA, torch::kFloat);
  try {
    selective_scan(x.u, x.delta, x.A, x.Bm, x.Cm, {}, {}, {}, true, nullptr, torch::zeros({1, 4}, torch::kInt));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
}

// ---- The causal conv on CUDA with seq_idx and an initial state ---------------------------------------

// causal_conv1d on CUDA tensors with seq_idx and an initial state (the kernel of conv1d_cuda.h)
// against the float64 masked reference on CPU (itself checked against each document alone in
// test_boundaries.cpp): y and the gradients of x, w, bias and the initial state; K = 2..5, odd
// channel counts (129: a partial block of 32), short documents (every few tokens), B x L rows
// across several partial rows of dw, x a strided view (as the model passes it), float32 and
// bfloat16.
TEST(ConvCuda, BoundariesAndInitialStateMatchReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(44);
  for (ConvShape s : {ConvShape{1, 1, 1, 4}, ConvShape{2, 3, 5, 4}, ConvShape{3, 37, 67, 4}, ConvShape{2, 130, 129, 2},
                      ConvShape{1, 9, 20, 5}, ConvShape{4, 600, 40, 4}})
    for (torch::Dtype io : {torch::kFloat, torch::kBFloat16})
      for (int mode = 0; mode < 3; ++mode) conv_against_reference(s, io, mode != 2, mode != 1);  // both, seq_idx, init
  // One document per row is no boundary: the kernel gives what torch's conv1d (the path without
  // seq_idx, unchanged) gives, to float32 rounding.
  const Tensor x = torch::randn({2, 70, 33}, torch::kCUDA), w = torch::randn({33, 1, 4}, torch::kCUDA);
  const Tensor b = torch::randn({33}, torch::kCUDA);
  const Tensor one_doc = torch::zeros({2, 70}, torch::TensorOptions().dtype(torch::kInt).device(torch::kCUDA));
  expect_close(causal_conv1d(x, w, b, one_doc).cpu().to(torch::kDouble), causal_conv1d(x, w, b).cpu().to(torch::kDouble),
               1e-6, "one document against no seq_idx");
}

// The defining test for the conv and the scan together, on the GPU: conv -> SiLU -> scan run as
// two halves, the second from the first's final states (the conv's last K-1 inputs and the scan's h,
// both in the graph), gives the outputs and every gradient (x, the conv's weights, both initial
// states, the scan's inputs) of running the whole.
TEST(ConvCuda, MixerTwoHalvesFromFinalStatesEqualTheWhole) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(45);
  for (auto [L, cut] : std::vector<std::pair<int64_t, int64_t>>{{130, 64}, {50, 2}, {9, 7}}) {
    const int64_t B = 2, I = 19, N = 16, K = 4;
    auto leaf = [](const Tensor& t) { return t.to(torch::kCUDA).detach().requires_grad_(true); };
    const Tensor x = leaf(torch::randn({B, L, I})), cw = leaf(torch::randn({I, 1, K})), cb = leaf(torch::randn({I}));
    const Tensor cinit = leaf(torch::randn({B, I, K - 1}));
    const Inputs v = make_values({B, L, I, N}, torch::kFloat, true, true);
    const Inputs s = leaves(v, torch::kCUDA, torch::kFloat);
    const Tensor h0 = leaf(torch::randn({B, I, N}));
    const Tensor wy = torch::randn({B, L, I}, torch::kCUDA), wh = torch::randn({B, I, N}, torch::kCUDA);
    const Tensor wc = torch::randn({B, I, K - 1}, torch::kCUDA);
    const std::vector<Tensor> params{x, cw, cb, cinit, s.delta, s.A, s.Bm, s.Cm, s.D, s.z, s.bias, h0};
    const char* names[] = {"x", "conv w", "conv b", "conv init", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"};
    auto mixer = [&](int64_t a, int64_t n, const Tensor& ci, const Tensor& hi, Tensor* c_last, Tensor* h_last) {
      const Tensor xs = x.narrow(1, a, n);
      const Tensor u = torch::silu(causal_conv1d(xs, cw, cb, {}, ci));
      *c_last = causal_conv1d_final_state(xs, K, ci);
      auto part = [&](const Tensor& t) { return t.narrow(1, a, n); };
      return selective_scan(u, part(s.delta), s.A, part(s.Bm), part(s.Cm), s.D, part(s.z), s.bias, true, h_last, {},
                            hi);
    };
    auto loss = [&](const Tensor& y, const Tensor& h, const Tensor& c) {
      return (y * wy).sum() + (h * wh).sum() + (c * wc).sum();
    };
    Tensor c_whole, h_whole, c_mid, h_mid, c_last, h_last;
    const Tensor y_whole = mixer(0, L, cinit, h0, &c_whole, &h_whole);
    const auto g_whole = torch::autograd::grad({loss(y_whole, h_whole, c_whole)}, params);
    const Tensor y1 = mixer(0, cut, cinit, h0, &c_mid, &h_mid);
    const Tensor y2 = mixer(cut, L - cut, c_mid, h_mid, &c_last, &h_last);
    const Tensor y = torch::cat({y1, y2}, 1);
    const auto g = torch::autograd::grad({loss(y, h_last, c_last)}, params);
    auto cpu = [](const Tensor& t) { return t.detach().to(torch::kCPU, torch::kDouble); };
    const std::string where = fmt::format("L={} cut={}", L, cut);
    expect_close(cpu(y), cpu(y_whole), kRtolF32, "y " + where);
    expect_close(cpu(h_last), cpu(h_whole), kRtolF32, "final h " + where);
    expect_close(cpu(c_last), cpu(c_whole), 0, "final conv state " + where);
    for (size_t k = 0; k < params.size(); ++k)
      expect_close(cpu(g[k]), cpu(g_whole[k]), kRtolF32, std::string(names[k]) + " " + where);
  }
}

// On CUDA the kernels do not check seq_idx's order (a device sync per call: model/seq_idx.h): a
// decreasing seq_idx whose numbers do not come back gives what the same starts numbered upwards
// give, bit for bit; the model checks the order once per forward and names itself.
TEST(ScanCuda, SeqIdxOrderIsCheckedByTheModelNotByEachKernel) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(46);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const Tensor down = torch::tensor({3, 1, 1, 0, 0, 2, 6, 6, 4}, torch::kInt).repeat({2, 1}).to(torch::kCUDA);
  const Tensor up = torch::tensor({0, 1, 1, 2, 2, 3, 4, 4, 5}, torch::kInt).repeat({2, 1}).to(torch::kCUDA);
  const int64_t B = 2, L = 9, I = 12, N = 16;
  const Tensor u = torch::randn({B, L, I}, cuda), delta = torch::randn({B, L, I}, cuda) * 0.5;
  const Tensor A = -torch::rand({I, N}, cuda) * 8 - 1, Bm = torch::randn({B, L, N}, cuda), Cm = torch::randn({B, L, N}, cuda);
  const Tensor D = torch::randn({I}, cuda), z = torch::randn({B, L, I}, cuda), bias = torch::randn({I}, cuda) * 0.1;
  EXPECT_TRUE(torch::equal(selective_scan(u, delta, A, Bm, Cm, D, z, bias, true, nullptr, down),
                           selective_scan(u, delta, A, Bm, Cm, D, z, bias, true, nullptr, up)));
  const Tensor w = torch::randn({I, 1, 4}, cuda), b = torch::randn({I}, cuda);
  EXPECT_TRUE(torch::equal(causal_conv1d(u, w, b, down), causal_conv1d(u, w, b, up)));
  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.n_layer = 2;
  MambaLM m(cfg, 3);
  m.to(torch::kCUDA);
  const Tensor tokens = torch::randint(cfg.vocab_size, {B, L}, cuda.dtype(torch::kLong));
  torch::NoGradGuard ng;
  try {
    m.forward(tokens, down);
    ADD_FAILURE() << "no error for a decreasing seq_idx on CUDA";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("MambaLM::forward: seq_idx decreases within a row", 0), 0u) << e.what();
  }
  EXPECT_EQ(m.forward(tokens, up).sizes(), (std::vector<int64_t>{B, L, cfg.vocab_size}));
}

// Decoding on CUDA: L steps of causal_conv1d_step and selective_scan_step (the fused step kernels,
// which update both states in place) on views strided as the model's narrows, against the same
// steps on the CPU (its fused step kernels), step by step: y, the conv state and the SSM state.
TEST(ScanCuda, DecodeStepsMatchTheCpuSteps) {
  SKIP_WITHOUT_GPU();
  for (const auto& shape : std::vector<std::array<int64_t, 4>>{{1, 1536, 16, 4}, {3, 37, 5, 3}, {16, 65, 64, 2}}) {
    const int64_t B = shape[0], I = shape[1], N = shape[2], K = shape[3];
    SCOPED_TRACE(fmt::format("B={} I={} N={} K={}", B, I, N, K));
    torch::manual_seed(uint64_t(B * 100 + I + N + K));
    const int64_t L = 7;
    const Tensor xz = torch::randn({B, L, 2 * I}), u = torch::randn({B, L, I}), delta = torch::randn({B, L, I}) * 0.5;
    const Tensor x_dbl = torch::randn({B, L, 3 + 2 * N});
    const Tensor w = torch::randn({I, 1, K}), bias = torch::randn({I}), A = -(torch::rand({I, N}) * 15 + 1);
    const Tensor D = torch::randn({I}), dbias = torch::rand({I}) - 4;
    Tensor conv_cpu = torch::randn({B, K - 1, I}), h_cpu = torch::randn({B, I, N});
    Tensor conv_gpu = conv_cpu.cuda(), h_gpu = h_cpu.cuda();
    const void* conv_at = conv_gpu.data_ptr();
    const void* h_at = h_gpu.data_ptr();
    auto run = [&](const Tensor& xz_, const Tensor& u_, const Tensor& d_, const Tensor& xd, const Tensor& w_,
                   const Tensor& b_, const Tensor& A_, const Tensor& D_, const Tensor& db_, Tensor& conv, Tensor& h,
                   int64_t t) {
      const Tensor x = xz_.select(1, t).narrow(1, 0, I), z = xz_.select(1, t).narrow(1, I, I);
      const Tensor c = causal_conv1d_step(x, conv, w_, b_, /*silu=*/t % 2 == 1);
      const Tensor Bm = xd.select(1, t).narrow(1, 3, N), Cm = xd.select(1, t).narrow(1, 3 + N, N);
      const Tensor y = selective_scan_step(u_.select(1, t), d_.select(1, t), A_, Bm, Cm, D_, z, db_, true, h);
      return std::make_pair(c, y);
    };
    const Tensor xz_g = xz.cuda(), u_g = u.cuda(), d_g = delta.cuda(), xd_g = x_dbl.cuda(), w_g = w.cuda(),
                 b_g = bias.cuda(), A_g = A.cuda(), D_g = D.cuda(), db_g = dbias.cuda();
    for (int64_t t = 0; t < L; ++t) {
      const auto [c_cpu, y_cpu] = run(xz, u, delta, x_dbl, w, bias, A, D, dbias, conv_cpu, h_cpu, t);
      const auto [c_gpu, y_gpu] = run(xz_g, u_g, d_g, xd_g, w_g, b_g, A_g, D_g, db_g, conv_gpu, h_gpu, t);
      expect_close(c_gpu.cpu(), c_cpu, 1e-5, fmt::format("conv y, step {}", t));
      expect_close(y_gpu.cpu(), y_cpu, 1e-5, fmt::format("scan y, step {}", t));
    }
    expect_close(conv_gpu.cpu(), conv_cpu, 0, "conv state");
    expect_close(h_gpu.cpu(), h_cpu, 1e-5, "scan state");
    EXPECT_EQ(conv_gpu.data_ptr(), conv_at) << "the conv state is updated in place (the CUDA step kernel)";
    EXPECT_EQ(h_gpu.data_ptr(), h_at) << "the SSM state is updated in place (the CUDA step kernel)";
  }
}

}  // namespace
}  // namespace coil
