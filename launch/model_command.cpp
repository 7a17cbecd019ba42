// `coil model`: describe a model (a preset or a Hugging Face directory) and run a smoke test of it:
// a few forward/backward passes with plain SGD on one fixed random batch, which a working model
// memorizes (the loss must fall), with tokens/s.
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <chrono>

#include "launch/commands.h"
#include "model/hf.h"
#include "model/mamba.h"
#include "model/selective_scan.h"
#include "util/error.h"

namespace coil {
namespace {

struct ModelOptions {
  std::string preset = "tiny";
  std::string hf_dir;
  int64_t vocab = 0;
  int steps = 0;
  int64_t batch = 2, seq_len = 128;
  double lr = 0.05;
  uint64_t seed = 0;
  bool table = false;
};

void run_model(const ModelOptions& o) {
  MambaConfig config;
  MambaLM model = [&] {
    if (!o.hf_dir.empty()) return load_hf(o.hf_dir);
    config = MambaConfig::preset(o.preset);
    if (o.vocab > 0) config.vocab_size = o.vocab;
    return MambaLM(config.padded(), o.seed);
  }();
  config = model.config();
  fmt::print("model: {}\n", config.describe());
  if (o.table) {
    fmt::print("{:<48} {:>16} {:>12}\n", "parameter", "shape", "count");
    for (const auto& p : model.named_parameters())
      fmt::print("{:<48} {:>16} {:>12}\n", p.name, fmt::format("{}", fmt::join(p.tensor.sizes(), "x")),
                 p.tensor.numel());
  }
  if (o.steps <= 0) return;
  COIL_CHECK(o.batch > 0 && o.seq_len > 1, "--batch must be >= 1 and --seq-len >= 2");
  fmt::print("smoke run: {} steps of forward+backward+SGD on one random batch of {} x {} tokens "
             "({} threads, scan kernel {})\n",
             o.steps, o.batch, o.seq_len, at::get_num_threads(), selective_scan_cpu_isa());
  torch::manual_seed(o.seed);
  torch::Tensor tokens = torch::randint(config.vocab_size, {o.batch, o.seq_len + 1});
  torch::Tensor inputs = tokens.narrow(1, 0, o.seq_len), targets = tokens.narrow(1, 1, o.seq_len);
  std::vector<torch::Tensor> params;
  for (auto& p : model.named_parameters()) params.push_back(p.tensor.requires_grad_(true));
  double first = 0, last = 0;
  for (int step = 1; step <= o.steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    torch::Tensor loss = model.loss_sum(inputs, model.embedding.scalar_type(), {}, targets) / static_cast<double>(targets.numel());
    loss.backward();
    {
      torch::NoGradGuard ng;
      for (auto& p : params) {
        p.sub_(p.grad(), o.lr);
        p.mutable_grad().zero_();
      }
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    last = loss.item<double>();
    COIL_CHECK(std::isfinite(last), "smoke run: the loss is {} at step {}", last, step);
    if (step == 1) first = last;
    fmt::print("step {:>3}/{}  loss {:.4f}  {:.0f} tokens/s\n", step, o.steps, last, o.batch * o.seq_len / dt);
  }
  COIL_CHECK(o.steps < 3 || last < first, "smoke run: the loss did not fall ({:.4f} -> {:.4f})", first, last);
  fmt::print("smoke run ok: loss {:.4f} -> {:.4f}\n", first, last);
}

}  // namespace

void add_model_command(CLI::App& app) {
  auto o = std::make_shared<ModelOptions>();
  CLI::App* cmd = app.add_subcommand("model", "Describe a Mamba model and run a forward/backward smoke test");
  cmd->add_option("--preset", o->preset, "tiny, 130m, 370m, 790m, 1.4b or 2.8b")->capture_default_str();
  cmd->add_option("--hf", o->hf_dir, "a Hugging Face Mamba directory (config.json + model.safetensors) instead");
  cmd->add_option("--vocab", o->vocab, "vocabulary size (default: the preset's), padded to a multiple of 8");
  cmd->add_flag("--table", o->table, "print every parameter with its shape");
  cmd->add_option("--smoke-steps", o->steps, "forward/backward/SGD steps on one random batch (0: none)");
  cmd->add_option("--batch", o->batch, "sequences per smoke step")->capture_default_str();
  cmd->add_option("--seq-len", o->seq_len, "tokens per sequence")->capture_default_str();
  cmd->add_option("--lr", o->lr, "SGD learning rate of the smoke run")->capture_default_str();
  cmd->add_option("--seed", o->seed, "initialization and data seed")->capture_default_str();
  on_run(cmd, [o] { run_model(*o); });
}

}  // namespace coil
