// Decoding: tokens/s of the recurrent step at several batch sizes, and the time per token after a
// short and after a long context (Mamba's state has a fixed size: it must not grow).
//   bench_decode [--preset 130m | --hf DIR] [--batch 1,16] [--prompt 100] [--long 4000] [--new 32]
//                [--weights float32|bfloat16] [--kernels] [--device cpu|cuda]
// --device cuda: the model on the first GPU, as `coil generate --device cuda` runs it (the fused
// conv and scan step kernels; sampling on the CPU), the clock read after a device synchronize.
// --weights: the dtype the matrices are held in (MambaLM::store_matrices; `coil generate --dtype`);
// --kernels: also the decoding matmuls alone per shape, against at::linear.
// A step's time is measured after the prompts' prefill: the recurrent step over every layer and
// the greedy pick. The last line is JSON, for bench/decode_vs_transformers.py.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "model/generate.h"
#include "model/hf.h"
#include "model/linear_cpu.h"
#include "model/mamba.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Seconds per decoding step (the recurrent step and the greedy pick) for a batch of `batch`
// prompts of `context` tokens, after their prefill.
double step_seconds(const coil::MambaLM& model, int64_t batch, int64_t context, int64_t new_tokens, int reps) {
  torch::manual_seed(static_cast<uint64_t>(context));
  const torch::Device device = model.embedding.device();
  const torch::Tensor prompts = torch::randint(model.config().vocab_size, {batch, context}).to(device);
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  at::Generator gen = at::detail::createCPUGenerator(0);
  double best = 1e30;
  for (int rep = 0; rep <= reps; ++rep) {  // the first is a warm-up
    coil::MambaCache cache;
    torch::Tensor logits = model.prefill(prompts, cache);
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t t = 0; t < new_tokens; ++t)  // sampling on the CPU, as coil::generate
      logits = model.step(coil::sample_next(logits.to(torch::kCPU), model.config().vocab_size, {}, gen).to(device), cache);
    sync();
    if (rep > 0) best = std::min(best, seconds_since(t0) / static_cast<double>(new_tokens));
  }
  return best;
}

// The decoding matmuls alone, per shape of the model: decode_linear against at::linear (W in
// float32 for at::linear), as GB/s of W read and GFLOP/s.
void linear_shapes(const coil::MambaConfig& c, const std::vector<int64_t>& batches, at::ScalarType wtype) {
  const int64_t H = c.d_model, I = c.d_inner(), R = c.rank(), N = c.d_state;
  const std::vector<std::pair<const char*, std::pair<int64_t, int64_t>>> shapes{
      {"in_proj", {2 * I, H}}, {"x_proj", {R + 2 * N, I}}, {"dt_proj", {I, R}}, {"out_proj", {H, I}}, {"head", {c.vocab_size, H}}};
  auto time = [](auto&& f) {
    double best = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 10; ++i) f();
      best = std::min(best, seconds_since(t0) / 10);
    }
    return best;
  };
  for (int64_t b : batches)
    for (const auto& [name, nk] : shapes) {
      const auto [n, k] = nk;
      const torch::Tensor x = torch::randn({b, k}), w32 = torch::randn({n, k}), w = w32.to(wtype);
      const double ours = time([&] { coil::decode_linear(x, w); }), aten = time([&] { at::linear(x, w32); });
      const double bytes = static_cast<double>(w.numel() * w.element_size()), flops = 2.0 * b * n * k;
      fmt::print("linear batch {:2d} {:8s} [{:5d} x {:4d}] {}: {:7.3f} ms ({:5.1f} GB/s, {:5.1f} GFLOP/s); at::linear float32 {:7.3f} ms\n",
                 b, name, n, k, c10::toString(wtype), ours * 1e3, bytes / ours / 1e9, flops / ours / 1e9, aten * 1e3);
    }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Mamba decoding benchmark"};
  std::string preset = "130m", hf;
  std::vector<int64_t> batches{1, 16};
  int64_t prompt = 100, long_context = 4000, new_tokens = 32;
  int reps = 2;
  app.add_option("--preset", preset);
  app.add_option("--hf", hf, "a Hugging Face Mamba directory (the same weights as a transformers run)");
  app.add_option("--batch", batches, "batch sizes")->delimiter(',');
  app.add_option("--prompt", prompt, "prompt tokens before the timed steps");
  app.add_option("--long", long_context, "a long context, for the flatness check (0: skip)");
  app.add_option("--new", new_tokens, "timed decoding steps");
  app.add_option("--reps", reps, "repetitions (the fastest counts)");
  bool kernels = false;
  std::string weights = "float32";
  app.add_option("--weights", weights, "dtype the matrices are stored in for decoding: float32 or bfloat16")
      ->check(CLI::IsMember({"float32", "bfloat16"}));
  app.add_flag("--kernels", kernels, "also time the decoding matmuls alone, per shape (CPU)");
  std::string device_name = "cpu";
  app.add_option("--device", device_name, "cpu, or cuda: the first GPU")->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    fmt::print(stderr, "bench_decode: --device cuda, but no CUDA device is visible\n");
    return 1;
  }
  const at::ScalarType wtype = weights == "bfloat16" ? at::kBFloat16 : at::kFloat;

  c10::InferenceMode inference;
  coil::MambaLM model = hf.empty() ? coil::MambaLM(coil::MambaConfig::preset(preset)) : coil::load_hf(hf);
  model.store_matrices(wtype);
  if (device_name == "cuda") model.to(torch::Device(torch::kCUDA, 0));
  fmt::print("model {}, {}, {} threads, weights {}\n", model.config().describe(), device_name, at::get_num_threads(), weights);
  if (kernels) linear_shapes(model.config(), batches, wtype);
  nlohmann::json out{{"threads", at::get_num_threads()}, {"device", device_name}};
  for (int64_t b : batches) {
    const double s = step_seconds(model, b, prompt, new_tokens, reps);
    fmt::print("batch {:3d}: {:8.2f} ms per step, {:9.1f} tokens/s (after {} prompt tokens)\n", b, s * 1e3,
               static_cast<double>(b) / s, prompt);
    out["tokens_per_sec"][std::to_string(b)] = static_cast<double>(b) / s;
  }
  if (long_context > 0) {
    const double short_s = step_seconds(model, 1, prompt, new_tokens, reps);
    const double long_s = step_seconds(model, 1, long_context, new_tokens, reps);
    fmt::print("per token, batch 1: {:.2f} ms after {} tokens, {:.2f} ms after {} tokens: ratio {:.3f} (flat = 1)\n",
               short_s * 1e3, prompt, long_s * 1e3, long_context, long_s / short_s);
    out["ms_per_token_short"] = short_s * 1e3;
    out["ms_per_token_long"] = long_s * 1e3;
    out["long_over_short"] = long_s / short_s;
  }
  fmt::print("{}\n", out.dump());
  return 0;
}
