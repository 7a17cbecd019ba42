// The CUDA kernels run on the CPU: model/scan_cuda.cu, conv1d_cuda.cu, linear_cuda.cu and
// norm_cuda.cu, compiled unchanged for the emulator of tests/cuda_emu, with their glue
// (model/*_cuda_autograd.inc and *_cuda_call.inc, the code selective_scan.cpp, conv1d.cpp,
// linear_cpu.cpp and mamba.cpp run on a GPU) on CPU tensors. Against the float64 references: y,
// the final state and every gradient (inputs, parameters, h0, the initial conv state), float32 and
// bfloat16, with and without document boundaries, both scan versions and several time segments,
// on odd shapes that cover every register layout of the state (N = 3, 5, 16, 17, 33, 64). Each
// case runs with the block's threads in ascending, descending and random order, and the results
// must be equal bit for bit (a missing __syncthreads shows as a difference) except for dB and dC,
// which the kernel sums with atomics. The decoding kernels too: the conv and scan steps for L steps
// against the references over the whole sequence, the bfloat16 matrix-vector product and the
// residual add + RMSNorm against float64. The ScanCuda.*, ConvCuda.*, LinearCuda.*, NormCuda.*
// and GenerateCuda.* tests run the same kernels on a GPU; the probe tests show that each check of
// the emulator can fail. What the glue allocates uninitialized starts as NaN, so an output element no
// thread writes fails the comparison.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "model/conv1d.h"
#include "model/selective_scan.h"
#include "model/seq_idx.h"
#include "tests/cuda_emu/include/coil_emu.h"
#include "tests/cuda_emu/probe_kernels.h"
#include "util/error.h"

// The kernels' headers under the names the emulated build gives them (tests/cuda_emu/*_emu.cpp).
#define scan_cuda scan_cuda_emu
#define conv_cuda conv_cuda_emu
#define linear_cuda linear_cuda_emu
#define norm_cuda norm_cuda_emu
#include "model/conv1d_cuda.h"
#include "model/linear_cuda.h"
#include "model/norm_cuda.h"
#include "model/scan_cuda.h"
#undef scan_cuda
#undef conv_cuda
#undef linear_cuda
#undef norm_cuda

namespace coil::emulated {

using torch::Tensor;
Tensor channels_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

namespace scan {
namespace kernels = coil::scan_cuda_emu;
#include "model/scan_cuda_autograd.inc"
}  // namespace scan
namespace conv {
namespace kernels = coil::conv_cuda_emu;
#include "model/conv1d_cuda_autograd.inc"
}  // namespace conv
namespace linear {
namespace kernels = coil::linear_cuda_emu;
#include "model/linear_cuda_call.inc"
}  // namespace linear
namespace norm {
namespace kernels = coil::norm_cuda_emu;
#include "model/norm_cuda_call.inc"
}  // namespace norm

namespace {

using coil_emu::Order;

// Every tensor the glue allocates with torch::empty (the kernels' outputs, partial rows and scratch)
// starts as NaN (LibTorch's deterministic mode fills uninitialized memory), so an element that no
// thread writes, or scratch read before it is written, shows in the comparison with the reference.
const bool kEmptyIsNaN = [] {
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
  at::globalContext().setDeterministicFillUninitializedMemory(true);
  return true;
}();

struct Schedule {
  Order order;
  const char* name;
};
const Schedule kSchedules[] = {{Order::kAscending, "ascending"}, {Order::kDescending, "descending"},
                               {Order::kShuffled, "shuffled"}};

// |got - want| <= rtol * (|want| + max|want|) elementwise (as in test_scan_cuda.cpp).
void expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const Tensor g = got.to(torch::kDouble), w = want.to(torch::kDouble);
  const double scale = std::max(w.abs().max().item<double>(), 1e-30);
  const double worst = ((g - w).abs() - rtol * (w.abs() + scale)).max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |diff| = " << (g - w).abs().max().item<double>() << " at scale " << scale;
  EXPECT_FALSE(torch::isnan(g).any().item<bool>()) << what << " has NaN";
}

// ---- The scan -----------------------------------------------------------------------------------
struct ScanCase {
  int64_t B, L, I, N;
  torch::Dtype io;
  bool optional, softplus, boundaries, h0;
  scan_cuda_emu::Kernel kernel;
  int segments;  // 0: as plan() picks
};
std::string str(const ScanCase& c) {
  return fmt::format("B={} L={} I={} N={} {} optional={} softplus={} boundaries={} h0={} {} S={}", c.B, c.L, c.I,
                     c.N, c.io == torch::kFloat ? "f32" : "bf16", c.optional, c.softplus, c.boundaries, c.h0,
                     c.kernel == scan_cuda_emu::Kernel::kSequential ? "sequential" : "segmented", c.segments);
}

// Float64 values as in a Mamba layer, already rounded to what the kernel sees (inputs to io,
// parameters and h0 to float32): u, delta, A, B, C, D, z, delta_bias, h0; then seq_idx, dy, dlast.
struct ScanValues {
  std::vector<Tensor> x;
  Tensor seq, dy, dlast;
};
const char* kScanNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"};
bool is_param(size_t k) { return k == 2 || k == 5 || k == 7 || k == 8; }

ScanValues scan_values(const ScanCase& c) {
  auto o = torch::TensorOptions().dtype(torch::kDouble);
  auto in = [&](const Tensor& t) { return t.to(c.io).to(torch::kDouble); };
  auto param = [](const Tensor& t) { return t.to(torch::kFloat).to(torch::kDouble); };
  ScanValues v;
  Tensor delta = torch::randn({c.B, c.L, c.I}, o) * 0.5, bias;
  Tensor dt = torch::exp(torch::rand({c.I}, o) * (std::log(0.1) - std::log(0.001)) + std::log(0.001));
  if (c.optional) bias = dt + torch::log(-torch::expm1(-dt));  // inverse softplus
  if (!c.softplus) delta = delta.abs(), bias = bias.defined() ? bias.abs() : bias;
  v.x = {in(torch::randn({c.B, c.L, c.I}, o)),
         in(delta),
         param(-(torch::rand({c.I, c.N}, o) * 15 + 1)),
         in(torch::randn({c.B, c.L, c.N}, o)),
         in(torch::randn({c.B, c.L, c.N}, o)),
         c.optional ? param(torch::randn({c.I}, o)) : Tensor(),
         c.optional ? in(torch::randn({c.B, c.L, c.I}, o)) : Tensor(),
         c.optional ? param(bias) : Tensor(),
         c.h0 ? param(torch::randn({c.B, c.I, c.N}, o)) : Tensor()};
  if (c.boundaries) {  // documents of 1 to 40 tokens, a boundary on a chunk edge included
    Tensor starts = (torch::rand({c.B, c.L}) < 0.06).to(torch::kInt);
    if (c.L > 32) starts.select(1, 32).fill_(1);
    starts.select(1, 0).fill_(0);
    v.seq = starts.cumsum(1).to(torch::kInt);
  }
  v.dy = in(torch::randn({c.B, c.L, c.I}, o));
  v.dlast = param(torch::randn({c.B, c.I, c.N}, o));
  return v;
}

struct ScanResult {
  Tensor y, state;
  std::vector<Tensor> grads;
};
// The loss sum(y * dy) + sum(state * dlast): both output gradients reach the kernel.
ScanResult run_scan(const ScanValues& v, const ScanCase& c, bool reference) {
  std::vector<Tensor> x;
  for (size_t k = 0; k < v.x.size(); ++k) {
    const auto dtype = reference ? torch::kDouble : is_param(k) ? torch::kFloat : c.io;
    x.push_back(v.x[k].defined() ? v.x[k].to(dtype).detach().requires_grad_(true) : Tensor());
  }
  ScanResult r;
  Tensor y;
  if (reference)
    y = selective_scan_ref(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], c.softplus, v.seq, x[8], &r.state);
  else
    y = scan::selective_scan_cuda(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], c.softplus, &r.state, v.seq, x[8]);
  ((y.to(torch::kDouble) * v.dy).sum() + (r.state.to(torch::kDouble) * v.dlast).sum()).backward();
  r.y = y.detach(), r.state = r.state.detach();
  for (const Tensor& t : x) r.grads.push_back(t.defined() ? t.grad() : Tensor());
  return r;
}

struct TuningScope {
  scan_cuda_emu::Tuning saved = scan_cuda_emu::tuning();
  TuningScope(scan_cuda_emu::Kernel k, int segments) { scan_cuda_emu::set_tuning({k, segments}); }
  ~TuningScope() { scan_cuda_emu::set_tuning(saved); }
};

void check_scan(const ScanCase& c) {
  SCOPED_TRACE(str(c));
  torch::manual_seed(uint64_t(c.B * 1000003 + c.L * 1009 + c.I * 31 + c.N));
  const ScanValues v = scan_values(c);
  coil_emu::take_counts();
  const ScanResult ref = run_scan(v, c, true);
  // float32: the reference's float64 against float32 over a few hundred steps; bfloat16: y and the
  // input gradients are stored in bfloat16 (half an ulp is 2^-8 relative).
  const double rtol = c.io == torch::kFloat ? 1e-4 : 1e-2;
  TuningScope tuning(c.kernel, c.segments);
  std::vector<ScanResult> runs;
  for (const Schedule& s : kSchedules) {
    SCOPED_TRACE(s.name);
    coil_emu::set_schedule(s.order, 7);
    runs.push_back(run_scan(v, c, false));
    const ScanResult& got = runs.back();
    expect_close(got.y, ref.y, rtol, "y");
    expect_close(got.state, ref.state, rtol, "final state");
    for (size_t k = 0; k < ref.grads.size(); ++k) {
      ASSERT_EQ(got.grads[k].defined(), ref.grads[k].defined()) << kScanNames[k];
      if (ref.grads[k].defined()) expect_close(got.grads[k], ref.grads[k], rtol, kScanNames[k]);
    }
  }
  coil_emu::set_schedule(Order::kAscending, 0);
  // The kernels ran: per order a forward and a backward, each of 3 launches with time segments
  // (local pass, combine, full pass), else 1.
  const coil_emu::Counts counts = coil_emu::take_counts();
  const int per_pass = scan_cuda_emu::num_chunks(c.L) > 1 && c.segments > 1 ? 3 : 1;
  if (c.segments > 0) {
    EXPECT_EQ(counts.launches, 3 * 2 * per_pass);
  }
  EXPECT_GT(counts.blocks, 0);
  // Every order gives the same bits, but for dB and dC (atomic adds, in the threads' order).
  for (size_t r = 1; r < runs.size(); ++r) {
    SCOPED_TRACE(kSchedules[r].name);
    EXPECT_TRUE(torch::equal(runs[r].y, runs[0].y)) << "y depends on the threads' order";
    EXPECT_TRUE(torch::equal(runs[r].state, runs[0].state)) << "the final state depends on the threads' order";
    for (size_t k = 0; k < ref.grads.size(); ++k) {
      if (!ref.grads[k].defined()) continue;
      if (k == 3 || k == 4)
        expect_close(runs[r].grads[k], runs[0].grads[k], 1e-6, std::string(kScanNames[k]) + " across orders");
      else
        EXPECT_TRUE(torch::equal(runs[r].grads[k], runs[0].grads[k])) << kScanNames[k] << " depends on the order";
    }
  }
}

constexpr auto kSeq = scan_cuda_emu::Kernel::kSequential, kSeg = scan_cuda_emu::Kernel::kSegmented;
constexpr auto kF32 = torch::kFloat, kBF16 = torch::kBFloat16;

TEST(ScanEmulated, SegmentedMatchesTheReference) {
  // (B, L, I, N, io, optional, softplus, boundaries, h0, kernel, segments)
  for (const ScanCase& c : std::vector<ScanCase>{{1, 1, 1, 16, kF32, true, true, false, false, kSeg, 0},
                                                 {2, 45, 19, 16, kF32, true, true, false, false, kSeg, 0},
                                                 {1, 70, 17, 3, kF32, false, true, false, false, kSeg, 0},
                                                 {2, 33, 16, 5, kF32, true, false, false, false, kSeg, 0},
                                                 {1, 40, 18, 33, kF32, true, true, false, false, kSeg, 0},
                                                 {1, 36, 17, 64, kF32, true, true, false, false, kSeg, 0},
                                                 {2, 40, 20, 16, kBF16, true, true, false, false, kSeg, 0}})
    check_scan(c);
}

TEST(ScanEmulated, TimeSegmentsMatchTheReference) {
  for (const ScanCase& c : std::vector<ScanCase>{{1, 130, 17, 16, kF32, true, true, false, false, kSeg, 3},
                                                 {2, 97, 16, 17, kF32, true, true, false, false, kSeg, 2},
                                                 {1, 200, 17, 5, kF32, true, true, false, false, kSeg, 0},
                                                 {1, 100, 18, 40, kBF16, true, true, false, false, kSeg, 4}})
    check_scan(c);
}

TEST(ScanEmulated, BoundariesAndH0MatchTheReference) {
  for (const ScanCase& c : std::vector<ScanCase>{{2, 75, 19, 16, kF32, true, true, true, true, kSeg, 0},
                                                 {1, 130, 17, 16, kF32, true, true, true, true, kSeg, 3},
                                                 {2, 66, 17, 5, kF32, false, true, true, false, kSeg, 2},
                                                 {1, 70, 16, 64, kF32, true, true, false, true, kSeg, 2},
                                                 {2, 50, 18, 16, kBF16, true, true, true, true, kSeg, 2}})
    check_scan(c);
}

TEST(ScanEmulated, SequentialMatchesTheReference) {
  for (const ScanCase& c : std::vector<ScanCase>{{2, 45, 19, 16, kF32, true, true, false, false, kSeq, 0},
                                                 {1, 70, 17, 3, kF32, false, false, false, false, kSeq, 0},
                                                 {1, 40, 17, 64, kF32, true, true, false, false, kSeq, 0},
                                                 {2, 75, 18, 16, kF32, true, true, true, true, kSeq, 0},
                                                 {1, 50, 16, 16, kBF16, true, true, true, true, kSeq, 0}})
    check_scan(c);
}

// ---- The conv -----------------------------------------------------------------------------------
struct ConvCase {
  int64_t B, L, I, K;
  torch::Dtype io;
  bool boundaries, init;
};

void check_conv(const ConvCase& c) {
  SCOPED_TRACE(fmt::format("B={} L={} I={} K={} {} boundaries={} init={}", c.B, c.L, c.I, c.K,
                           c.io == torch::kFloat ? "f32" : "bf16", c.boundaries, c.init));
  torch::manual_seed(uint64_t(c.B * 1009 + c.L * 31 + c.I * 7 + c.K));
  auto o = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor x = torch::randn({c.B, c.L, c.I}, o).to(c.io).to(torch::kDouble);
  const Tensor w = torch::randn({c.I, 1, c.K}, o).to(torch::kFloat).to(torch::kDouble);
  const Tensor bias = torch::randn({c.I}, o).to(torch::kFloat).to(torch::kDouble);
  const Tensor init = c.init ? torch::randn({c.B, c.I, c.K - 1}, o).to(torch::kFloat).to(torch::kDouble) : Tensor();
  Tensor seq;
  if (c.boundaries) {
    Tensor starts = (torch::rand({c.B, c.L}) < 0.15).to(torch::kInt);
    starts.select(1, 0).fill_(0);
    if (c.L > 1) starts.select(1, 1).fill_(1);  // a document of one token
    seq = starts.cumsum(1).to(torch::kInt);
  }
  const Tensor dy = torch::randn({c.B, c.L, c.I}, o).to(c.io).to(torch::kDouble);
  auto run = [&](bool reference) {
    std::vector<Tensor> in = {x.to(reference ? torch::kDouble : c.io), w, bias, init};
    for (size_t k = 1; k < in.size(); ++k)
      if (in[k].defined()) in[k] = in[k].to(reference ? torch::kDouble : torch::kFloat);
    for (Tensor& t : in)
      if (t.defined()) t = t.detach().requires_grad_(true);  // leaves, never the shared values
    const Tensor y = reference ? causal_conv1d_ref(in[0], in[1], in[2], seq, in[3])
                               : conv::causal_conv1d_cuda(in[0], in[1].view({c.I, c.K}), in[2], seq, in[3]);
    (y.to(torch::kDouble) * dy).sum().backward();
    std::vector<Tensor> out = {y.detach()};
    for (const Tensor& t : in) out.push_back(t.defined() ? t.grad() : Tensor());
    return out;
  };
  const auto ref = run(true);
  const char* names[] = {"y", "dx", "dw", "dbias", "dinit"};
  const double rtol = c.io == torch::kFloat ? 1e-5 : 1e-2;
  std::vector<std::vector<Tensor>> runs;
  for (const Schedule& s : kSchedules) {
    SCOPED_TRACE(s.name);
    coil_emu::set_schedule(s.order, 11);
    runs.push_back(run(false));
    for (size_t k = 0; k < ref.size(); ++k) {
      ASSERT_EQ(runs.back()[k].defined(), ref[k].defined()) << names[k];
      if (ref[k].defined()) expect_close(runs.back()[k], ref[k], rtol, names[k]);
    }
  }
  coil_emu::set_schedule(Order::kAscending, 0);
  for (size_t r = 1; r < runs.size(); ++r) {
    for (size_t k = 0; k < ref.size(); ++k) {
      if (ref[k].defined()) {
        EXPECT_TRUE(torch::equal(runs[r][k], runs[0][k])) << names[k] << " depends on the order";
      }
    }
  }
}

TEST(ConvEmulated, MatchesTheReference) {
  for (const ConvCase& c : std::vector<ConvCase>{{2, 37, 40, 4, kF32, true, true},
                                                 {1, 1, 33, 4, kF32, true, true},
                                                 {3, 70, 7, 2, kF32, true, false},
                                                 {1, 130, 65, 4, kF32, false, true},
                                                 {2, 9, 33, 8, kF32, true, true},
                                                 {2, 40, 36, 4, kBF16, true, true}})
    check_conv(c);
}

// ---- Decoding steps ------------------------------------------------------------------------------
// L steps of the step kernels (float32, the state carried in place), on inputs strided as the
// model's narrows of its projections, against the float64 references over the whole sequence from
// the same initial state: every step's y and the final state.
struct StepCase {
  int64_t B, L, I, N, K;
  bool optional, softplus;
  bool silu;  // the conv step's SiLU (as the model decodes)
};

void check_steps(const StepCase& c) {
  SCOPED_TRACE(fmt::format("B={} L={} I={} N={} K={} optional={} softplus={} silu={}", c.B, c.L, c.I, c.N, c.K,
                           c.optional, c.softplus, c.silu));
  torch::manual_seed(uint64_t(c.B * 1009 + c.L * 31 + c.I * 7 + c.N * 3 + c.K));
  auto o = torch::TensorOptions().dtype(torch::kFloat);
  auto f64 = [](const Tensor& t) { return t.defined() ? t.to(torch::kDouble) : t; };
  // The conv: x is the first half of an in_proj output [B, L, 2I], state [B, K-1, I].
  const Tensor xz = torch::randn({c.B, c.L, 2 * c.I}, o), x = xz.narrow(2, 0, c.I);
  const Tensor w = torch::randn({c.I, 1, c.K}, o), bias = torch::randn({c.I}, o);
  const Tensor conv0 = torch::randn({c.B, c.K - 1, c.I}, o);
  // The scan: u, delta, z [B, L, I], B and C narrows of an x_proj output [B, L, 3 + 2N].
  const Tensor u = torch::randn({c.B, c.L, c.I}, o), delta = torch::randn({c.B, c.L, c.I}, o) * 0.5;
  const Tensor x_dbl = torch::randn({c.B, c.L, 3 + 2 * c.N}, o);
  const Tensor Bm = x_dbl.narrow(2, 3, c.N), Cm = x_dbl.narrow(2, 3 + c.N, c.N);
  const Tensor A = -(torch::rand({c.I, c.N}, o) * 15 + 1);
  const Tensor D = c.optional ? torch::randn({c.I}, o) : Tensor();
  const Tensor z = c.optional ? xz.narrow(2, c.I, c.I) : Tensor();
  // Without softplus delta + delta_bias is the step itself: kept positive, else the state explodes.
  const Tensor dbias = !c.optional ? Tensor() : c.softplus ? torch::rand({c.I}, o) - 4 : torch::rand({c.I}, o) * 0.1;
  const Tensor d = c.softplus ? delta : delta.abs();
  const Tensor h0 = torch::randn({c.B, c.I, c.N}, o);

  Tensor ref_last;
  Tensor conv_ref = causal_conv1d_ref(f64(x), f64(w), f64(bias), {}, f64(conv0).transpose(1, 2));
  if (c.silu) conv_ref = torch::silu(conv_ref);
  const Tensor scan_ref = selective_scan_ref(f64(u), f64(d), f64(A), f64(Bm), f64(Cm), f64(D), f64(z), f64(dbias),
                                             c.softplus, {}, f64(h0), &ref_last);
  const Tensor conv_last_ref = f64(torch::cat({conv0, x}, 1).narrow(1, c.L, c.K - 1));
  std::vector<std::vector<Tensor>> runs;
  for (const Schedule& s : kSchedules) {
    SCOPED_TRACE(s.name);
    coil_emu::set_schedule(s.order, 5);
    Tensor conv_state = conv0.clone(), h = h0.clone();
    std::vector<Tensor> ys, us;
    for (int64_t t = 0; t < c.L; ++t) {
      auto at = [t](const Tensor& v) { return v.defined() ? v.select(1, t) : v; };
      const float* before = conv_state.data_ptr<float>();
      ys.push_back(conv::causal_conv1d_step_cuda(at(x), conv_state, w.view({c.I, c.K}), bias, c.silu));
      us.push_back(scan::selective_scan_step_cuda(at(u), at(d), A, at(Bm), at(Cm), D, at(z), dbias, c.softplus, h));
      ASSERT_EQ(conv_state.data_ptr<float>(), before) << "the conv state is updated in place";
    }
    expect_close(torch::stack(ys, 1), conv_ref, 1e-5, "conv y");
    expect_close(torch::stack(us, 1), scan_ref, 1e-5, "scan y");
    if (c.K > 1) expect_close(conv_state, conv_last_ref, 0, "conv state");  // K = 1 keeps no state
    expect_close(h, ref_last, 1e-5, "scan state");
    runs.push_back({torch::stack(ys, 1), torch::stack(us, 1), conv_state, h});
  }
  coil_emu::set_schedule(Order::kAscending, 0);
  for (size_t r = 1; r < runs.size(); ++r)
    for (size_t k = 0; k < runs[0].size(); ++k) EXPECT_TRUE(torch::equal(runs[r][k], runs[0][k])) << k;
}

TEST(StepEmulated, ConvAndScanStepsMatchTheReferences) {
  for (const StepCase& c : std::vector<StepCase>{{1, 6, 33, 16, 4, true, true, true},
                                                 {3, 5, 7, 3, 2, false, true, false},
                                                 {2, 4, 130, 17, 5, true, false, true},
                                                 {5, 3, 1, 1, 1, true, true, false},
                                                 {2, 9, 65, 64, 8, false, false, true}})
    check_steps(c);
}

// ---- Decoding's bfloat16 matrix-vector product ---------------------------------------------------
struct LinearCase {
  int64_t B, K, N;
  bool bias;
  int64_t x_pad;   // x is a [B, K] view into rows of K + x_pad floats (x_sb = K + x_pad)
  int64_t offset;  // x and W start this many elements into their storage (odd: not 16-byte aligned)
};

// decode_linear's CUDA kernel against the float64 product of the same values (W rounded to
// bfloat16, x float32), under every schedule, which must give the same bits.
void check_linear(const LinearCase& c) {
  const std::string what = fmt::format("B={} K={} N={} bias={} x_pad={} offset={}", c.B, c.K, c.N, c.bias,
                                       c.x_pad, c.offset);
  const Tensor xs = torch::randn({c.offset + c.B * (c.K + c.x_pad)});
  const Tensor x = xs.narrow(0, c.offset, c.B * (c.K + c.x_pad)).view({c.B, c.K + c.x_pad}).narrow(1, 0, c.K);
  const Tensor ws = torch::randn({c.offset + c.N * c.K}).to(torch::kBFloat16);
  const Tensor w = ws.narrow(0, c.offset, c.N * c.K).view({c.N, c.K});
  const Tensor bias = c.bias ? torch::randn({c.N}) : Tensor();
  ASSERT_TRUE(w.is_contiguous()) << what;  // (so the glue passes the offset pointer itself)
  Tensor want = torch::matmul(x.to(torch::kDouble), w.to(torch::kDouble).t());
  if (c.bias) want = want + bias.to(torch::kDouble);
  std::vector<Tensor> runs;
  for (const Schedule& s : kSchedules) {
    coil_emu::set_schedule(s.order, 11);
    runs.push_back(linear::decode_linear_bf16_cuda(x, w, bias));
    expect_close(runs.back(), want, 1e-5, what + " " + s.name);
  }
  coil_emu::set_schedule(Order::kAscending, 0);
  for (size_t r = 1; r < runs.size(); ++r) EXPECT_TRUE(torch::equal(runs[r], runs[0])) << what;
}

TEST(LinearEmulated, Bf16MatrixVectorProductsMatchTheFloat64Product) {
  torch::manual_seed(5);
  for (const LinearCase& c : std::vector<LinearCase>{
           {1, 768, 37, true, 0, 0},     // 16-byte loads, three per lane
           {3, 48, 20, false, 0, 0},     // K < 256: some lanes hold nothing
           {16, 264, 9, true, 4, 0},     // strided rows of x, K not a multiple of 256
           {5, 13, 11, true, 0, 0},      // K % 8 != 0: one weight at a time
           {17, 40, 5, false, 0, 0},     // two launches: 16 rows, then 1
           {7, 64, 10, true, 1, 0},      // x rows not 16-byte aligned: one weight at a time
           {2, 64, 10, true, 0, 3},      // x and W not 16-byte aligned
           {6, 1, 3, true, 0, 0},        // K = 1
           {9, 96, 200, false, 0, 0}})   // more rows of W than one block's warps, many blocks
    check_linear(c);
}

// ---- Decoding's residual add + RMSNorm -------------------------------------------------------------
// The kernel against float64: h + delta (written back into h: exactly the float32 sum) and its
// RMSNorm, under every schedule (the same bits in each).
TEST(NormEmulated, AddRmsNormMatchesTheFloat64Reference) {
  torch::manual_seed(9);
  struct Case {
    int64_t B, H;
    bool delta;
  };
  for (const Case& c : std::vector<Case>{{1, 768, true}, {3, 13, false}, {5, 300, true}, {2, 1, true},
                                         {4, 64, true}, {2, 600, false}}) {
    const std::string what = fmt::format("B={} H={} delta={}", c.B, c.H, c.delta);
    const Tensor h0 = torch::randn({c.B, c.H}) * 3, w = torch::randn({c.H});
    const Tensor delta = c.delta ? torch::randn({c.B, c.H}) : Tensor();
    const Tensor sum = c.delta ? h0 + delta : h0;  // float32, as the kernel adds
    const Tensor s64 = sum.to(torch::kDouble);
    const Tensor want = w.to(torch::kDouble) * s64 * torch::rsqrt(s64.pow(2).mean(-1, true) + 1e-5);
    std::vector<Tensor> runs;
    for (const Schedule& s : kSchedules) {
      coil_emu::set_schedule(s.order, 4);
      Tensor h = h0.clone();
      runs.push_back(norm::add_rms_norm_cuda(h, delta, w, 1e-5));
      EXPECT_TRUE(torch::equal(h, sum)) << what << " " << s.name;
      expect_close(runs.back(), want, 1e-5, what + " " + s.name);
    }
    coil_emu::set_schedule(Order::kAscending, 0);
    for (size_t r = 1; r < runs.size(); ++r) EXPECT_TRUE(torch::equal(runs[r], runs[0])) << what;
  }
}

// ---- The emulator's own checks -----------------------------------------------------------------
using coil_emu::probe::Kernel;

TEST(CudaEmulator, ShufflesAndBallotsGiveTheWarpsValues) {
  const auto o = coil_emu::probe::run(Kernel::kWarpSums);
  ASSERT_EQ(o.error, "");
  for (int t = 0; t < 128; ++t) {
    const int warp = t % 64 / 32;  // in its block: lanes 32w+1 .. 32w+32, and 16 odd lanes
    EXPECT_FLOAT_EQ(o.out[size_t(t)], float(32 * (32 * warp + 1) + 31 * 32 / 2) + 0.16f) << t;
  }
}

TEST(CudaEmulator, SharedMemoryWithoutABarrierDependsOnTheOrder) {
  std::vector<std::vector<float>> with, without;
  for (const Schedule& s : kSchedules) {
    coil_emu::set_schedule(s.order, 3);
    with.push_back(coil_emu::probe::run(Kernel::kSharedWithBarrier).out);
    without.push_back(coil_emu::probe::run(Kernel::kSharedWithoutBarrier).out);
  }
  coil_emu::set_schedule(Order::kAscending, 0);
  for (int t = 0; t < 128; ++t) EXPECT_EQ(with[0][size_t(t)], float(t / 64 * 64 + (t + 1) % 64)) << t;
  EXPECT_EQ(with[1], with[0]);
  EXPECT_EQ(with[2], with[0]);
  // Without it, ascending: every thread but the last of its block reads its neighbour's slot before
  // the neighbour writes it (NaN, as dynamic shared memory starts); descending: only the last does.
  auto unwritten = [](const std::vector<float>& v) {
    return std::count_if(v.begin(), v.end(), [](float f) { return std::isnan(f); });
  };
  EXPECT_EQ(unwritten(without[0]), 2 * 63);
  EXPECT_EQ(unwritten(without[1]), 2);
  for (int t = 0; t < 128; ++t) {
    if (t % 64 != 63) {
      EXPECT_EQ(without[1][size_t(t)], with[0][size_t(t)]) << t;
    }
  }
}

TEST(CudaEmulator, ReportsWhatCudaLeavesUndefined) {
  EXPECT_NE(coil_emu::probe::run(Kernel::kExitBeforeBarrier).error.find("left the kernel"), std::string::npos);
  EXPECT_NE(coil_emu::probe::run(Kernel::kShuffleWithExitedLane).error.find("left the kernel"), std::string::npos);
  EXPECT_NE(coil_emu::probe::run(Kernel::kDeadlock).error.find("deadlock"), std::string::npos);
  EXPECT_NE(coil_emu::probe::run(Kernel::kBigSharedNoAttribute).error.find("without cudaFuncSetAttribute"),
            std::string::npos);
  EXPECT_EQ(coil_emu::probe::run(Kernel::kBigSharedAllowed).error, "");
  EXPECT_NE(coil_emu::probe::run(Kernel::kSharedAboveDevice).error.find("above the"), std::string::npos);
}

}  // namespace
}  // namespace coil::emulated
