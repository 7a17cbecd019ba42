// One hybrid optimizer step (gradient norm, clipping, Muon, AdamW) of a Mamba model: the ATen
// operators it calls at top level (not from inside another operator: at most about one kernel
// launch each on CUDA), all operators, and its host syncs (aten::_local_scalar_dense, what .item()
// runs), counted with RecordFunction callbacks (optim/op_count.h), and its time; for the per-tensor
// references (before) and the multi-tensor paths (after), measured in one run.
//   bench_optim [--preset 130m] [--device cpu|cuda] [--ns-steps N] [--reps N] [--all] [--by-name]
// Variants: reference (per-tensor AdamW, per-matrix Muon, per-gradient norm: what CUDA ran before),
// foreach (AdamW in _foreach_ ops), torch_fused (LibTorch's _fused_adamw_; on CPU its kernel reads
// each tensor's step with .item()), automatic (what a run uses on this device: our fused CPU pass
// on CPU, _fused_adamw_ on CUDA). Every variant but the reference runs Muon through foreach ops and
// Newton-Schulz batched per shape, and the one-pass norm. Gradients are random (the counts and
// times do not depend on their values); each variant starts from fresh optimizer state. Without
// --all only reference and automatic run.
// --ns-steps: Newton-Schulz iterations (training's default is 5). On CPU the default is 1 so that
// the run takes seconds, not minutes (Newton-Schulz at 130m is ~1.5 TFLOP a step at 5): each
// further iteration adds 3 top-level operators per matrix to the reference, per shape to the
// others. --reps: steps timed after the counted first one (default 0 on CPU, 5 on CUDA).
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "model/mamba.h"
#include "optim/hybrid.h"
#include "optim/op_count.h"

using namespace coil;

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Variant {
  const char* name;
  bool reference;
  optim::AdamWKernel adamw;
};

void step(optim::HybridOptimizer& opt, const std::vector<NamedTensor>& params, bool reference) {
  const double sq = reference ? optim::grad_sq_norm_reference(params) : optim::grad_sq_norm(params);
  const double norm = std::sqrt(sq), max_norm = norm / 2;  // clipping always applies
  reference ? optim::clip_grads_reference(params, norm, max_norm) : optim::clip_grads(params, norm, max_norm);
  opt.step(0.02, 1e-3);
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Hybrid optimizer step: operator calls, host syncs, time"};
  std::string preset = "130m", device_name = "cpu";
  int reps = -1, ns_steps = -1;
  bool by_name = false, all = false;
  app.add_option("--preset", preset);
  app.add_option("--device", device_name)->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--ns-steps", ns_steps, "Newton-Schulz iterations (default: 1 on CPU, 5 on CUDA)")
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "timed steps per variant after the counted one (default: 0 on CPU, 5 on CUDA)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--all", all, "also the foreach and torch_fused variants");
  app.add_flag("--by-name", by_name, "print each variant's top-level operators by name");
  CLI11_PARSE(app, argc, argv);
  const bool cuda = device_name == "cuda";
  if (ns_steps < 0) ns_steps = cuda ? 5 : 1;
  if (reps < 0) reps = cuda ? 5 : 0;
  if (cuda && !torch::cuda::is_available()) {
    fmt::print(stderr, "bench_optim: --device cuda: no CUDA device (or a LibTorch without CUDA)\n");
    return 1;
  }
  const torch::Device device = cuda ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  auto sync = [&] {
    if (cuda) torch::cuda::synchronize();
  };

  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  std::vector<NamedTensor> params;
  {
    MambaLM model(MambaConfig::preset(preset), 0);
    for (const auto& p : model.named_parameters()) params.push_back({p.name, p.tensor.detach().to(device).clone()});
  }
  std::set<std::vector<int64_t>> shapes, muon_shapes, adamw_shapes;
  int64_t numel = 0, muon = 0;
  for (auto& p : params) {
    p.tensor.mutable_grad() = torch::randn_like(p.tensor);
    numel += p.tensor.numel();
    const bool m = optim::group_of(p.name, p.tensor.dim()).muon;
    muon += m;
    shapes.insert(p.tensor.sizes().vec());
    (m ? muon_shapes : adamw_shapes).insert(p.tensor.sizes().vec());
  }
  fmt::print("preset {} on {}: {} parameters ({:.1f}M elements), {} distinct shapes; Muon: {} matrices of {} shapes, "
             "AdamW: {} tensors of {} shapes; Newton-Schulz: {} iterations\n",
             preset, device_name, params.size(), static_cast<double>(numel) / 1e6, shapes.size(), muon,
             muon_shapes.size(), static_cast<int64_t>(params.size()) - muon, adamw_shapes.size(), ns_steps);

  std::vector<Variant> variants = {{"reference", true, optim::AdamWKernel::reference}};
  if (all) {
    variants.push_back({"foreach", false, optim::AdamWKernel::foreach});
    variants.push_back({"torch_fused", false, optim::AdamWKernel::torch_fused});
  }
  variants.push_back({"automatic", false, optim::AdamWKernel::automatic});
  optim::HybridConfig config;
  config.muon.ns_steps = ns_steps;
  fmt::print("{:<12} {:>10} {:>10} {:>11} {:>12}\n", "variant", "top-level", "all ops", "host syncs", "ms / step");
  std::vector<optim::OpCounts> counts;
  std::vector<double> ms;
  for (const Variant& v : variants) {
    optim::HybridOptimizer opt(params, config);
    opt.muon().set_reference(v.reference);
    opt.adamw().set_kernel(v.adamw);
    sync();
    auto t0 = std::chrono::steady_clock::now();
    {
      optim::OpCounter counter;
      step(opt, params, v.reference);
      counts.push_back(counter.counts());
    }
    sync();
    double seconds = seconds_since(t0);
    if (reps > 0) {  // the counted step warmed up; time the next ones
      t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) step(opt, params, v.reference);
      sync();
      seconds = seconds_since(t0) / reps;
    }
    ms.push_back(1e3 * seconds);
    const optim::OpCounts& c = counts.back();
    fmt::print("{:<12} {:>10} {:>10} {:>11} {:>12.1f}\n", v.name, c.top_level, c.all, c.host_syncs, ms.back());
    if (by_name) {
      std::vector<std::pair<int64_t, std::string>> names;
      for (const auto& [name, n] : c.top_level_by_name) names.push_back({n, name});
      std::sort(names.rbegin(), names.rend());
      for (const auto& [n, name] : names) fmt::print("    {:>6} {}\n", n, name);
    }
  }
  const optim::OpCounts &ref = counts.front(), &after = counts.back();
  fmt::print("reference / automatic: top-level operators {:.1f}x ({} -> {}), host syncs {} -> {}, time {:.2f}x\n",
             static_cast<double>(ref.top_level) / static_cast<double>(after.top_level), ref.top_level, after.top_level,
             ref.host_syncs, after.host_syncs, ms.front() / ms.back());
  fmt::print("top-level operators per parameter: reference {:.1f}, automatic {:.2f}; per distinct shape: automatic "
             "{:.1f}\n",
             static_cast<double>(ref.top_level) / static_cast<double>(params.size()),
             static_cast<double>(after.top_level) / static_cast<double>(params.size()),
             static_cast<double>(after.top_level) / static_cast<double>(shapes.size()));
  return 0;
}
