// One training step (forward + backward) of a Mamba model on CPU: tokens/s, and the achieved FLOP/s
// as a fraction of a large GEMM's FLOP/s measured in the same run.
//   bench_step [--preset 130m | --hf DIR] [--batch 1] [--seq-len 1024] [--reps 3] [--gemm 4096]
// Model FLOPs count the matrix products only (6 x tokens x matmul parameters, the LM head
// included): the usual MFU convention; the scan, conv and norms come on top, uncounted.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>

#include "model/hf.h"
#include "model/mamba.h"
#include "model/selective_scan.h"

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Mamba training-step benchmark (CPU)"};
  std::string preset = "130m", hf;
  int64_t batch = 1, seq_len = 1024, gemm = 4096;
  int reps = 3;
  app.add_option("--preset", preset);
  app.add_option("--hf", hf, "a Hugging Face Mamba directory (same weights as a transformers run)");
  app.add_option("--batch", batch);
  app.add_option("--seq-len", seq_len);
  app.add_option("--reps", reps);
  app.add_option("--gemm", gemm, "size n of the n x n x n float32 GEMM that sets the machine's peak");
  CLI11_PARSE(app, argc, argv);

  coil::MambaLM model = hf.empty() ? coil::MambaLM(coil::MambaConfig::preset(preset)) : coil::load_hf(hf);
  const coil::MambaConfig& c = model.config();
  std::vector<torch::Tensor> params;
  for (auto& p : model.named_parameters()) params.push_back(p.tensor.requires_grad_(true));
  torch::manual_seed(0);
  torch::Tensor tokens = torch::randint(c.vocab_size, {batch, seq_len + 1});
  torch::Tensor inputs = tokens.narrow(1, 0, seq_len), targets = tokens.narrow(1, 1, seq_len);

  auto step = [&] {
    coil::lm_loss(model.forward(inputs), targets).backward();
    for (auto& p : params) p.mutable_grad().reset();
  };
  step();  // warm-up: allocator, thread pool
  double t_step = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    step();
    t_step = std::min(t_step, seconds_since(t0));
  }

  torch::Tensor a = torch::randn({gemm, gemm}), b = torch::randn({gemm, gemm});
  torch::mm(a, b);
  double t_gemm = 1e30;
  for (int r = 0; r < 3; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    torch::mm(a, b);
    t_gemm = std::min(t_gemm, seconds_since(t0));
  }
  const double gemm_flops = 2.0 * gemm * gemm * gemm / t_gemm;

  const int64_t H = c.d_model, I = c.d_inner(), N = c.d_state, R = c.rank();
  const double matmul_params = double(c.n_layer) * (2 * I * H + (R + 2 * N) * I + I * R + H * I) + double(c.vocab_size) * H;
  const double tokens_per_step = double(batch) * seq_len;
  const double model_flops = 6.0 * matmul_params * tokens_per_step / t_step;
  fmt::print("training step (forward+backward), {} x {} tokens, {} threads, scan kernel {}\n", batch, seq_len,
             at::get_num_threads(), coil::selective_scan_cpu_isa());
  fmt::print("  model: {}\n", c.describe());
  fmt::print("  step time        : {:.3f} s  ({:.0f} tokens/s)\n", t_step, tokens_per_step / t_step);
  fmt::print("  achieved         : {:.1f} GFLOP/s (matmul FLOPs)\n", model_flops / 1e9);
  fmt::print("  {}^3 GEMM       : {:.1f} GFLOP/s\n", gemm, gemm_flops / 1e9);
  fmt::print("  fraction of GEMM : {:.1f}%\n", 100.0 * model_flops / gemm_flops);
  fmt::print("coil_step_seconds={:.6f} gemm_gflops={:.3f} model_gflops={:.3f}\n", t_step, gemm_flops / 1e9,
             model_flops / 1e9);
  return 0;
}
