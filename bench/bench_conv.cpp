// Causal depthwise conv1d forward+backward as the model runs it (input a channels-last view into
// the in_proj output): Coil's channels-last kernel against torch's conv1d on the transposed input.
//   bench_conv [--B 1] [--L 1024] [--I 1536] [--K 4] [--reps 5]
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>

#include "model/conv1d.h"

using torch::Tensor;

int main(int argc, char** argv) {
  CLI::App app{"causal conv1d benchmark: channels-last kernel vs torch conv1d"};
  int64_t B = 1, L = 1024, I = 1536, K = 4;
  int reps = 5;
  app.add_option("--B", B);
  app.add_option("--L", L);
  app.add_option("--I", I);
  app.add_option("--K", K);
  app.add_option("--reps", reps);
  CLI11_PARSE(app, argc, argv);

  torch::manual_seed(0);
  Tensor xz = torch::randn({B, L, 2 * I});
  Tensor x = xz.narrow(2, 0, I).detach().requires_grad_(true);
  Tensor w = torch::randn({I, 1, K}, torch::requires_grad()), b = torch::randn({I}, torch::requires_grad());
  Tensor dy = torch::randn({B, L, I});
  using Fn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&);
  auto time_it = [&](Fn fn) {
    double best = 1e30;
    for (int r = 0; r <= reps; ++r) {  // the first is a warm-up
      auto t0 = std::chrono::steady_clock::now();
      fn(x, w, b).backward(dy);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) best = std::min(best, t);
    }
    return best;
  };
  const double t_torch = time_it(&coil::causal_conv1d_ref), t_coil = time_it(&coil::causal_conv1d);
  fmt::print("causal conv1d fwd+bwd  B={} L={} I={} K={}  threads={}\n", B, L, I, K, at::get_num_threads());
  fmt::print("  torch conv1d (transposed input): {:8.2f} ms\n", 1e3 * t_torch);
  fmt::print("  channels-last kernel           : {:8.2f} ms\n", 1e3 * t_coil);
  fmt::print("  speed-up                       : {:8.1f}x\n", t_torch / t_coil);
  return 0;
}
