// Selective scan forward+backward: the fused CPU kernel against the ATen reference, in one run.
//   bench_scan [--B 4] [--I 1536] [--N 16] [--L 1024] [--reps 3]
// Prints the time of each and the ratio.
//   bench_scan --device cuda [--B 1,8] [--I 1536] [--N 16] [--L 2048] [--reps 20]
// The CUDA kernels at mamba-130m sizes, for each batch size, float32 and bfloat16 and each kernel
// version of model/scan_cuda.h (sequential, segmented): one line with the forward pass alone (no
// gradients, so no chunk states stored) and the backward pass alone (autograd's backward of one
// retained forward), each as bytes moved per second and as a fraction of the device-to-device copy
// bandwidth measured in the same run. --doc-len n > 0: also the segmented kernel on rows packed with
// documents of n tokens (seq_idx), its time over the same kernel's without seq_idx in the same run.
// Exits non-zero when there is no GPU.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>

#include "model/selective_scan.h"
#if defined(COIL_WITH_CUDA)
#include "model/scan_cuda.h"
namespace scan_cuda = coil::scan_cuda;
#endif

using torch::Tensor;

namespace {

// Seconds per call of fn on the GPU: warm-up, then the best of 3 rounds of `reps` calls, each
// round bracketed by synchronizations (the kernels are queued back to back inside a round).
template <typename Fn>
double gpu_seconds(Fn&& fn, int reps) {
  fn();
  torch::cuda::synchronize();
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) fn();
    torch::cuda::synchronize();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return best;
}

int bench_cuda(const std::vector<int64_t>& batches, int64_t L, int64_t I, int64_t N, int reps, int64_t doc_len) {
#if !defined(COIL_WITH_CUDA)
  fmt::print(stderr, "bench_scan --device cuda: this build has no CUDA kernels\n");
  return 1;
#else
  if (!torch::cuda::is_available()) {
    fmt::print(stderr, "bench_scan --device cuda: no CUDA device is visible (torch::cuda::is_available() is false)\n");
    return 1;
  }
  torch::manual_seed(0);
  const auto dev = torch::kCUDA;
  // The copy bandwidth: read and write 1 GiB.
  Tensor src = torch::randn({int64_t(1) << 28}, torch::TensorOptions(dev)), dst = torch::empty_like(src);
  const double copy_bytes = 2.0 * src.numel() * 4;
  const double copy_bw = copy_bytes / gpu_seconds([&] { dst.copy_(src); }, reps);
  src = Tensor(), dst = Tensor();

  fmt::print("selective scan on CUDA  L={} I={} N={}  ({} reps, best of 3); device-to-device copy {:.1f} GB/s\n", L,
             I, N, reps, copy_bw / 1e9);
  const scan_cuda::Tuning saved = scan_cuda::tuning();
  for (int64_t B : batches)
    for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16}) {
      const auto io = torch::TensorOptions(dev).dtype(dtype);
      const auto f32 = torch::TensorOptions(dev).dtype(torch::kFloat);
      auto leaf = [](Tensor t) { return t.requires_grad_(true); };
      Tensor u = leaf(torch::randn({B, L, I}, io)), delta = leaf((torch::randn({B, L, I}, f32) * 0.5).to(dtype));
      Tensor z = leaf(torch::randn({B, L, I}, io));
      Tensor Bm = leaf(torch::randn({B, L, N}, io)), Cm = leaf(torch::randn({B, L, N}, io));
      Tensor A = leaf(-torch::arange(1, N + 1, f32).repeat({I, 1}));
      Tensor D = leaf(torch::ones({I}, f32)), bias = leaf(torch::full({I}, -4.0, f32));
      Tensor dy = torch::randn({B, L, I}, io);
      const std::vector<Tensor> inputs = {u, delta, A, Bm, Cm, D, z, bias};

      // Bytes a pass must move at least: its inputs read once and its outputs written once.
      const double e = u.element_size(), BLI = double(B) * L * I, BLN = double(B) * L * N;
      const double params = 4.0 * (I * N + 2 * I);
      const double fwd_bytes = e * (3 * BLI + 2 * BLN) + params + e * BLI;  // u, delta, z, B, C -> y
      // backward: u, delta, z, dy, B, C -> du, ddelta, dz, dB, dC (+ parameter gradients)
      const double bwd_bytes = e * (4 * BLI + 2 * BLN) + params + e * (3 * BLI + 2 * BLN) + params;

      for (scan_cuda::Kernel k : {scan_cuda::Kernel::kSequential, scan_cuda::Kernel::kSegmented}) {
        scan_cuda::set_tuning({k, 0});
        scan_cuda::Params plan_f, plan_b;  // what plan() picks here, for the printout
        for (scan_cuda::Params* p : {&plan_f, &plan_b}) {
          p->B = B, p->L = L, p->I = I, p->N = N;
          p->dtype = dtype == torch::kBFloat16 ? scan_cuda::DType::kBFloat16 : scan_cuda::DType::kFloat32;
          scan_cuda::plan(*p, p == &plan_b);
        }
        const double t_fwd = gpu_seconds([&] {
          torch::NoGradGuard ng;
          coil::selective_scan(u, delta, A, Bm, Cm, D, z, bias, true);
        }, reps);
        Tensor y = coil::selective_scan(u, delta, A, Bm, Cm, D, z, bias, true);
        const double t_bwd = gpu_seconds([&] { torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/true); }, reps);
        fmt::print("  B={} {:8} {:10} S={:>2}/{:<2}  forward {:7.3f} ms {:7.1f} GB/s {:5.1f}% of copy   backward "
                   "{:7.3f} ms {:7.1f} GB/s {:5.1f}% of copy\n",
                   B, c10::toString(dtype), k == scan_cuda::Kernel::kSequential ? "sequential" : "segmented",
                   plan_f.segments, plan_b.segments, t_fwd * 1e3, fwd_bytes / t_fwd / 1e9,
                   100.0 * fwd_bytes / t_fwd / copy_bw, t_bwd * 1e3, bwd_bytes / t_bwd / 1e9,
                   100.0 * bwd_bytes / t_bwd / copy_bw);
        if (doc_len > 0 && k == scan_cuda::Kernel::kSegmented) {
          // The same kernel with document starts every doc_len tokens, against itself without.
          const Tensor seq = (torch::arange(L, torch::TensorOptions(dev).dtype(torch::kInt)) / doc_len)
                                 .to(torch::kInt)
                                 .repeat({B, 1});
          const double p_fwd = gpu_seconds([&] {
            torch::NoGradGuard ng;
            coil::selective_scan(u, delta, A, Bm, Cm, D, z, bias, true, nullptr, seq);
          }, reps);
          Tensor yp = coil::selective_scan(u, delta, A, Bm, Cm, D, z, bias, true, nullptr, seq);
          const double p_bwd =
              gpu_seconds([&] { torch::autograd::grad({yp}, inputs, {dy}, /*retain_graph=*/true); }, reps);
          fmt::print("  B={} {:8} segmented, documents of {} tokens: forward {:7.3f} ms ({:.3f}x without seq_idx), "
                     "backward {:7.3f} ms ({:.3f}x without)\n",
                     B, c10::toString(dtype), doc_len, p_fwd * 1e3, p_fwd / t_fwd, p_bwd * 1e3, p_bwd / t_bwd);
        }
      }
    }
  scan_cuda::set_tuning(saved);
  fmt::print("  (S = time segments forward/backward; target: >= 60% of the copy bandwidth)\n");
  return 0;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"selective scan benchmark: fused CPU kernel vs ATen reference"};
  int64_t B = 4, I = 1536, N = 16, L = 1024;
  int reps = 3;
  bool skip_ref = false;
  std::string device = "cpu";
  app.add_flag("--skip-reference", skip_ref, "time only the fused kernel");
  int64_t doc_len = 0;
  app.add_option("--doc-len", doc_len, "also time rows packed with documents of this many tokens (seq_idx)");
  app.add_option("--device", device, "cpu: the CPU kernel against the reference; cuda: the CUDA kernel")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--B", B);
  app.add_option("--I", I);
  app.add_option("--N", N);
  app.add_option("--L", L);
  app.add_option("--reps", reps);
  CLI11_PARSE(app, argc, argv);
  if (device == "cuda") {  // mamba-130m-like sizes unless given: B = 1 and 8 (FSDP's micro batches, and more)
    if (!app.count("--L")) L = 2048;
    if (!app.count("--reps")) reps = 20;
    return bench_cuda(app.count("--B") ? std::vector<int64_t>{B} : std::vector<int64_t>{1, 8}, L, I, N, reps, doc_len);
  }

  torch::manual_seed(0);
  auto leaf = [](Tensor t) { return t.requires_grad_(true); };
  Tensor u = leaf(torch::randn({B, L, I})), delta = leaf(torch::randn({B, L, I}) * 0.5);
  Tensor A = leaf(-torch::arange(1, N + 1, torch::kFloat).repeat({I, 1}));
  Tensor Bm = leaf(torch::randn({B, L, N})), Cm = leaf(torch::randn({B, L, N}));
  Tensor D = leaf(torch::ones({I})), z = leaf(torch::randn({B, L, I})), bias = leaf(torch::full({I}, -4.0));
  Tensor dy = torch::randn({B, L, I});

  using Fn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, bool);
  auto time_it = [&](Fn fn) {
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      fn(u, delta, A, Bm, Cm, D, z, bias, true).backward(dy);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  Fn fast = [](const Tensor& u, const Tensor& d, const Tensor& A, const Tensor& B, const Tensor& C,
               const Tensor& D, const Tensor& z, const Tensor& b, bool sp) {
    return coil::selective_scan(u, d, A, B, C, D, z, b, sp);
  };
  const double t_fast = time_it(fast);
  double t_fwd = 1e30;
  {
    torch::NoGradGuard ng;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      fast(u, delta, A, Bm, Cm, D, z, bias, true);
      t_fwd = std::min(t_fwd, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  if (doc_len > 0) {  // the same kernel on rows packed with documents of doc_len tokens
    static Tensor seq;
    seq = (torch::arange(L, torch::kInt) / doc_len).to(torch::kInt).repeat({B, 1});
    Fn packed = [](const Tensor& u, const Tensor& d, const Tensor& A, const Tensor& B, const Tensor& C,
                   const Tensor& D, const Tensor& z, const Tensor& b, bool sp) {
      return coil::selective_scan(u, d, A, B, C, D, z, b, sp, nullptr, seq);
    };
    const double t_packed = time_it(packed), t_plain = time_it(fast);
    fmt::print("fused CPU kernel B={} I={} N={} L={}: fwd+bwd {:.3f} s without seq_idx, {:.3f} s with documents of "
               "{} tokens ({:.3f}x)\n", B, I, N, L, t_plain, t_packed, doc_len, t_packed / t_plain);
  }
  if (skip_ref) {
    fmt::print("fused CPU kernel B={} I={} N={} L={}: fwd {:.3f} s, fwd+bwd {:.3f} s\n", B, I, N, L, t_fwd, t_fast);
    return 0;
  }
  Fn ref = [](const Tensor& u, const Tensor& d, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
              const Tensor& z, const Tensor& b, bool sp) { return coil::selective_scan_ref(u, d, A, B, C, D, z, b, sp); };
  const double t_ref = time_it(ref);
  fmt::print("selective scan fwd+bwd  B={} I={} N={} L={}  threads={}  kernel={}\n", B, I, N, L,
             at::get_num_threads(), coil::selective_scan_cpu_isa());
  fmt::print("  reference (ATen ops): {:8.3f} s\n", t_ref);
  fmt::print("  fused CPU kernel    : {:8.3f} s   (forward alone {:.3f} s)\n", t_fast, t_fwd);
  fmt::print("  speed-up            : {:8.1f}x\n", t_ref / t_fast);
  return 0;
}
