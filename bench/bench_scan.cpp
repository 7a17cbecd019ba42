// Selective scan forward+backward: the fused CPU kernel against the ATen reference, in one run.
//   bench_scan [--B 4] [--I 1536] [--N 16] [--L 1024] [--reps 3]
// Prints the time of each and the ratio.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>

#include "model/selective_scan.h"

using torch::Tensor;

int main(int argc, char** argv) {
  CLI::App app{"selective scan benchmark: fused CPU kernel vs ATen reference"};
  int64_t B = 4, I = 1536, N = 16, L = 1024;
  int reps = 3;
  bool skip_ref = false;
  app.add_flag("--skip-reference", skip_ref, "time only the fused kernel");
  app.add_option("--B", B);
  app.add_option("--I", I);
  app.add_option("--N", N);
  app.add_option("--L", L);
  app.add_option("--reps", reps);
  CLI11_PARSE(app, argc, argv);

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
  if (skip_ref) {
    fmt::print("fused CPU kernel B={} I={} N={} L={}: fwd {:.3f} s, fwd+bwd {:.3f} s\n", B, I, N, L, t_fwd, t_fast);
    return 0;
  }
  const double t_ref = time_it(&coil::selective_scan_ref);
  fmt::print("selective scan fwd+bwd  B={} I={} N={} L={}  threads={}  kernel={}\n", B, I, N, L,
             at::get_num_threads(), coil::selective_scan_cpu_isa());
  fmt::print("  reference (ATen ops): {:8.3f} s\n", t_ref);
  fmt::print("  fused CPU kernel    : {:8.3f} s   (forward alone {:.3f} s)\n", t_fast, t_fwd);
  fmt::print("  speed-up            : {:8.1f}x\n", t_ref / t_fast);
  return 0;
}
