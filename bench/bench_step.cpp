// One training step of a Mamba model: tokens/s, model FLOP/s, MFU and the optimizer's share of the
// step, measured in one run.
//   bench_step [--preset 130m | --hf DIR] [--batch 1] [--seq-len 1024] [--reps 3] [--gemm 4096]
//              [--device cpu|cuda] [--dtype float32|bfloat16] [--optimizer] [--fsdp]
//              [--activation-checkpointing none|full] [--loss fused|plain|both] [--masked 0]
// Model FLOPs count the matrix products only (6 x tokens x matmul parameters, the LM head
// included): the usual MFU convention; the scan, conv and norms come on top, uncounted.
// The peak the MFU is taken against: on CUDA the datasheet's dense bf16 tensor-core peak
// (--peak-tflops, 989 for an H100/H200 SXM); on CPU a float32 GEMM of --gemm^3 measured in the same
// run ("fraction of GEMM").
// --optimizer: the hybrid optimizer's step (Muon + AdamW, gradient clipping) is timed after each
// backward; its share = optimizer / (forward + backward + optimizer).
// --fsdp: the model runs under FsdpMamba on the ranks of this process's MPI world (one rank:
// all-gathers are local copies), timed with the collectives' overlap off and on; prints the bytes
// moved and the step time the overlap saved.
// --loss: the LM head fused with its cross-entropy (MambaLM::loss_sum, the trainer's way: no
// [tokens, vocab] logits), the plain logits then cross_entropy, or both, timed one after the other
// (the ratios of their step times and peak memories printed). --masked F: the first F of each
// row's targets do not count (-100), as an SFT prompt's.
// --profile N: one more step under LibTorch's Kineto profiler, then its top N GPU kernels (CUDA) or
// CPU operators by self time (bench/profile_table.h).
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <c10/cuda/CUDACachingAllocator.h>
#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>
#include <memory>

#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
#include "model/hf.h"
#include "model/mamba.h"
#include "model/selective_scan.h"
#include "optim/hybrid.h"
#include "profile_table.h"
#include "util/cpu_memory.h"

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Mamba training-step benchmark"};
  std::string preset = "130m", hf, device_name = "cpu", dtype_name = "float32", checkpointing = "none", loss = "fused";
  int64_t batch = 1, seq_len = 1024, gemm = 4096;
  int reps = 3;
  double peak_tflops = 989, masked = 0;
  bool with_optimizer = false, fsdp_mode = false;
  int profile_top = 0;
  app.add_option("--preset", preset);
  app.add_option("--hf", hf, "a Hugging Face Mamba directory (same weights as a transformers run)");
  app.add_option("--batch", batch);
  app.add_option("--seq-len", seq_len);
  app.add_option("--reps", reps);
  app.add_option("--gemm", gemm, "size n of the n x n x n float32 GEMM that sets the CPU's peak");
  app.add_option("--device", device_name)->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", dtype_name, "compute dtype (master weights stay float32)")
      ->check(CLI::IsMember({"float32", "bfloat16"}));
  app.add_option("--peak-tflops", peak_tflops, "CUDA: the GPU's dense bf16 peak (H100/H200 SXM: 989)");
  app.add_flag("--optimizer", with_optimizer, "time the hybrid optimizer's step too");
  app.add_flag("--fsdp", fsdp_mode, "run under FsdpMamba, overlap off and on");
  app.add_option("--profile", profile_top, "print the top N kernels (CUDA) or operators (CPU) of one step");
  app.add_option("--activation-checkpointing", checkpointing, "recompute each block in backward")
      ->check(CLI::IsMember({"none", "full"}));
  app.add_option("--loss", loss, "the head fused with the loss (the trainer's), the plain logits, or both")
      ->check(CLI::IsMember({"fused", "plain", "both"}));
  app.add_option("--masked", masked, "the share of each row's targets that do not count (an SFT prompt)")
      ->check(CLI::Range(0.0, 1.0));
  CLI11_PARSE(app, argc, argv);

  const bool cuda = device_name == "cuda";
  if (cuda && (!at::hasCUDA() || at::getNumGPUs() == 0)) {
    fmt::print(stderr, "bench_step: --device cuda: no CUDA device (or a LibTorch without CUDA)\n");
    return 2;
  }
  const at::Device device = cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  const at::ScalarType compute = dtype_name == "bfloat16" ? at::kBFloat16 : at::kFloat;
  auto sync = [&] {
    if (cuda) torch::cuda::synchronize();
  };
  coil::CpuMemory& cpu_memory = coil::CpuMemory::install();  // CPU: the step's peak bytes

  coil::MambaLM model = hf.empty() ? coil::MambaLM(coil::MambaConfig::preset(preset)) : coil::load_hf(hf);
  const coil::MambaConfig& c = model.config();
  torch::manual_seed(0);
  torch::Tensor tokens = torch::randint(c.vocab_size, {batch, seq_len + 1}).to(device);
  torch::Tensor inputs = tokens.narrow(1, 0, seq_len), targets = tokens.narrow(1, 1, seq_len).clone();
  targets.narrow(1, 0, static_cast<int64_t>(masked * static_cast<double>(seq_len))).fill_(-100);

  // The model: whole on this device, or sharded over the MPI world (--fsdp).
  std::shared_ptr<coil::dist::Comm> comm;
  std::unique_ptr<coil::dist::FsdpMamba> fsdp;
  std::vector<coil::NamedTensor> params;
  coil::dist::FsdpOptions fo;
  fo.compute_dtype = compute;
  fo.device = device;
  fo.activation_checkpointing = coil::parse_activation_checkpointing(checkpointing, "--activation-checkpointing");
  model.set_activation_checkpointing(fo.activation_checkpointing);
  if (fsdp_mode) {
    comm = coil::dist::make_comm(cuda);
    fsdp = std::make_unique<coil::dist::FsdpMamba>(model, comm, fo);
    params = fsdp->local_parameters();
  } else {
    model.to(device);
    params = model.named_parameters();
    for (auto& p : params) p.tensor.requires_grad_(true);
  }
  std::unique_ptr<coil::optim::HybridOptimizer> opt;
  if (with_optimizer) {
    opt = std::make_unique<coil::optim::HybridOptimizer>(params, coil::optim::HybridConfig{},
                                                         fsdp ? fsdp->whole_shapes() : std::vector<std::vector<int64_t>>{});
    if (fsdp) {
      std::vector<coil::dist::ShardLayout> muon_layouts;
      for (size_t i = 0; i < params.size(); ++i)
        if (coil::optim::group_of(params[i].name, static_cast<int64_t>(fsdp->layout(i).shape.size())).muon)
          muon_layouts.push_back(fsdp->layout(i));
      opt->muon().set_orthogonalize(coil::dist::sharded_orthogonalize(comm, muon_layouts, 5));
    }
  }

  double t_opt = 0;
  bool fused = loss != "plain";
  auto step = [&] {
    for (auto& p : params) p.tensor.mutable_grad().reset();
    if (fused) {
      const torch::Tensor sum = fsdp ? fsdp->loss_sum(inputs, {}, targets) : model.loss_sum(inputs, compute, {}, targets);
      (sum / std::max<double>(1, static_cast<double>(targets.ne(-100).sum().item<int64_t>()))).backward();
    } else {
      const torch::Tensor logits = fsdp ? fsdp->forward(inputs) : model.forward(inputs, compute);
      coil::lm_loss(logits, targets).backward();
    }
    if (fsdp) fsdp->finish_step();
    if (opt) {
      sync();
      const auto t0 = std::chrono::steady_clock::now();
      coil::optim::clip_grads(params, std::sqrt(coil::optim::grad_sq_norm(params)), 1.0);
      opt->step(1e-4, 1e-5);  // tiny steps: the weights stay about where they were
      sync();
      t_opt = seconds_since(t0);
    }
  };
  // The fastest of `reps` steps after a warm-up (allocator, thread pool, cuBLAS heuristics).
  auto timed = [&](double* opt_s) {
    step();
    double best = 1e30, best_opt = 0;
    for (int r = 0; r < reps; ++r) {
      sync();
      auto t0 = std::chrono::steady_clock::now();
      step();
      sync();
      const double t = seconds_since(t0);
      if (t < best) best = t, best_opt = t_opt;
    }
    if (opt_s) *opt_s = best_opt;
    return best;
  };

  // The best step time, and the peak memory above what is held before the timed steps (the model
  // state, the inputs): the activations, whole weights and gradients of a step.
  auto measured = [&](double* t_opt_best, int64_t* peak) {
    sync();
    cpu_memory.reset_peak();
    const int64_t held_before = cuda ? c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current : cpu_memory.bytes();
    if (cuda) c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    const double t = timed(t_opt_best);
    *peak = (cuda ? c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak : cpu_memory.peak()) - held_before;
    return t;
  };
  double t_opt_best = 0, t_plain = 0;
  int64_t step_peak = 0, plain_peak = 0;
  if (loss == "both") {  // the plain way first, then the fused one (the figures below)
    fused = false;
    double plain_opt = 0;
    t_plain = measured(&plain_opt, &plain_peak) - plain_opt;
    fused = true;
  }
  double t_total = measured(&t_opt_best, &step_peak);
  const double t_step = t_total - t_opt_best;  // forward + backward
  if (profile_top > 0) coil::bench::print_profile([&] { step(), sync(); }, cuda, profile_top);

  const int64_t H = c.d_model, I = c.d_inner(), N = c.d_state, R = c.rank();
  const double matmul_params = double(c.n_layer) * (2 * I * H + (R + 2 * N) * I + I * R + H * I) + double(c.vocab_size) * H;
  const double tokens_per_step = double(batch) * seq_len;
  const double model_flops = 6.0 * matmul_params * tokens_per_step / t_step;
  fmt::print("training step (forward+backward), {} x {} tokens, device {}, compute {}, activation checkpointing {}, "
             "{} head and loss, {}\n",
             batch, seq_len, device_name, dtype_name, checkpointing, fused ? "fused" : "plain",
             cuda ? std::string("CUDA") : fmt::format("{} threads, scan kernel {}", at::get_num_threads(), coil::selective_scan_cpu_isa()));
  fmt::print("  model: {}\n", c.describe());
  fmt::print("  step time        : {:.4f} s  ({:.0f} tokens/s)\n", t_step, tokens_per_step / t_step);
  fmt::print("  step peak memory : {:.1f} MB above the model state\n", static_cast<double>(step_peak) / 1e6);
  if (loss == "both")
    fmt::print("  plain head + loss: {:.4f} s, {:.1f} MB; fused: {:.3f}x the speed, {:.3f}x less peak memory\n", t_plain,
               static_cast<double>(plain_peak) / 1e6, t_plain / t_step, static_cast<double>(plain_peak) / static_cast<double>(step_peak));
  fmt::print("  achieved         : {:.1f} GFLOP/s (matmul FLOPs)\n", model_flops / 1e9);
  double peak = peak_tflops * 1e12;
  if (!cuda) {
    torch::Tensor a = torch::randn({gemm, gemm}), b = torch::randn({gemm, gemm});
    torch::mm(a, b);
    double t_gemm = 1e30;
    for (int r = 0; r < 3; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      torch::mm(a, b);
      t_gemm = std::min(t_gemm, seconds_since(t0));
    }
    peak = 2.0 * gemm * gemm * gemm / t_gemm;
    fmt::print("  {}^3 GEMM       : {:.1f} GFLOP/s\n", gemm, peak / 1e9);
    fmt::print("  fraction of GEMM : {:.1f}%\n", 100.0 * model_flops / peak);
  } else {
    fmt::print("  MFU              : {:.1f}% of {:.0f} TFLOP/s (dense bf16 peak)\n", 100.0 * model_flops / peak, peak_tflops);
  }
  if (opt)
    fmt::print("  optimizer step   : {:.4f} s = {:.1f}% of the step with it\n", t_opt_best, 100.0 * t_opt_best / t_total);
  const double opt_share = opt ? t_opt_best / t_total : 0.0;
  double t_sync = 0, saved = 0;
  if (fsdp) {
    const coil::dist::FsdpStats s0 = fsdp->stats();
    fmt::print("  fsdp, {} rank(s): {} all-gathers, {:.1f} MB; {} reduce-scatters, {:.1f} MB (all steps so far)\n",
               comm->size(), s0.all_gathers, s0.all_gather_bytes / 1e6, s0.reduce_scatters, s0.reduce_scatter_bytes / 1e6);
    // The same model with the collectives waited for at once (no prefetch, no deferred reduce).
    coil::dist::FsdpOptions off = fo;
    off.overlap = false;
    coil::MambaLM again = hf.empty() ? coil::MambaLM(coil::MambaConfig::preset(preset)) : coil::load_hf(hf);
    auto fsdp_on = std::move(fsdp);
    fsdp = std::make_unique<coil::dist::FsdpMamba>(again, comm, off);
    params = fsdp->local_parameters();
    opt.reset();
    t_sync = timed(nullptr);
    saved = t_sync - t_step;
    fmt::print("  overlap off      : {:.4f} s; overlap on saves {:.4f} s ({:.1f}%){}\n", t_sync, saved, 100.0 * saved / t_sync,
               comm->asynchronous() ? "" : " (MPI is synchronous: the two runs differ by noise only)");
  }
  fmt::print("coil_step_seconds={:.6f} tokens_per_s={:.1f} model_gflops={:.3f} peak_gflops={:.3f} mfu={:.4f} "
             "optimizer_share={:.4f} overlap_saved_s={:.6f} step_peak_mb={:.1f} plain_loss_s={:.6f} plain_peak_mb={:.1f}\n",
             t_step, tokens_per_step / t_step, model_flops / 1e9, peak / 1e9, model_flops / peak,
             opt_share, saved, static_cast<double>(step_peak) / 1e6, t_plain, static_cast<double>(plain_peak) / 1e6);
  return 0;
}
