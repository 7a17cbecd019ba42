// Causal depthwise conv1d forward+backward as the model runs it (input a channels-last view into
// the in_proj output): Coil's channels-last kernel against torch's conv1d on the transposed input.
//   bench_conv [--B 1] [--L 1024] [--I 1536] [--K 4] [--reps 5] [--doc-len 0]
// --doc-len n > 0: also the kernel on rows packed with documents of n tokens (seq_idx), against
// the same kernel with seq_idx undefined.
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
  int64_t doc_len = 0;
  app.add_option("--doc-len", doc_len, "documents of this many tokens (seq_idx); 0: none");
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
  Fn ref = [](const Tensor& x, const Tensor& w, const Tensor& b) { return coil::causal_conv1d_ref(x, w, b); };
  Fn coil_fn = [](const Tensor& x, const Tensor& w, const Tensor& b) { return coil::causal_conv1d(x, w, b); };
  const double t_torch = time_it(ref), t_coil = time_it(coil_fn);
  fmt::print("causal conv1d fwd+bwd  B={} L={} I={} K={}  threads={}\n", B, L, I, K, at::get_num_threads());
  fmt::print("  torch conv1d (transposed input): {:8.2f} ms\n", 1e3 * t_torch);
  fmt::print("  channels-last kernel           : {:8.2f} ms\n", 1e3 * t_coil);
  fmt::print("  speed-up                       : {:8.1f}x\n", t_torch / t_coil);
  if (doc_len > 0) {
    static Tensor seq;  // a captureless lambda below reads it
    seq = (torch::arange(L, torch::kInt) / doc_len).to(torch::kInt).repeat({B, 1});
    Fn packed = [](const Tensor& x, const Tensor& w, const Tensor& b) { return coil::causal_conv1d(x, w, b, seq); };
    const double t_packed = time_it(packed), t_plain = time_it(coil_fn);
    fmt::print("  kernel, documents of {} tokens : {:8.2f} ms   ({:.3f}x the kernel without seq_idx, {:.2f} ms)\n",
               doc_len, 1e3 * t_packed, t_packed / t_plain, 1e3 * t_plain);
  }
  return 0;
}
