#include "launch/trainer.h"

#include "launch/tensorboard.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/sft.h"
#include "data/shards.h"
#include "data/streaming.h"
#include "data/tokenizer.h"
#include "dist/checkpoint.h"
#include "model/mamba.h"
#include "optim/hybrid.h"
#include "optim/schedule.h"
#include "util/error.h"

namespace coil {
namespace fs = std::filesystem;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string human_time(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// A micro batch as tensors: inputs [B, L] and targets [B, L] (int64), with -100 where the loss
// mask is off. Returns the number of targets that count.
int64_t to_tensors(const data::Batch& b, at::Tensor& inputs, at::Tensor& targets) {
  at::Tensor tokens = at::from_blob(const_cast<int32_t*>(b.tokens.data()), {b.rows, b.cols}, at::kInt).to(at::kLong);
  inputs = tokens.narrow(1, 0, b.cols - 1);
  targets = tokens.narrow(1, 1, b.cols - 1).clone();
  if (b.mask.empty()) return b.rows * (b.cols - 1);
  at::Tensor mask = at::from_blob(const_cast<uint8_t*>(b.mask.data()), {b.rows, b.cols}, at::kByte).narrow(1, 1, b.cols - 1);
  targets.masked_fill_(mask.eq(0), -100);
  return mask.sum().item<int64_t>();
}

// Sum of the cross-entropy over the targets that count.
at::Tensor loss_sum(const MambaLM& model, const at::Tensor& inputs, const at::Tensor& targets) {
  at::Tensor logits = model.forward(inputs);
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}), {},
                                at::Reduction::Sum, -100);
}

// The data of a run: the training loader, and how to make the held-out batches.
struct RunData {
  std::unique_ptr<data::Loader> train;
  std::function<std::unique_ptr<data::Loader>()> val;  // a fresh loader from the start of the val data
  std::string summary;
};

RunData open_data(const RunConfig& c, Phase phase, const data::Tokenizer& tok, const data::BatchGeometry& geo) {
  RunData d;
  data::ReadOptions read;
  read.text_field = c.data_text_field;
  read.max_bad_records = c.data_max_bad_records;
  const data::BatchGeometry eval_geo{c.seq_len, c.micro_batch_size, c.micro_batch_size, 0, 1};
  if (phase == Phase::kSft) {
    auto ds = std::make_shared<data::SftDataset>(data::expand_inputs(c.data_train), tok, c.seq_len, read);
    d.summary = fmt::format("SFT data {}: {} examples ({} dropped: no response token fits in {}), {} response tokens",
                            c.data_train, ds->size(), ds->dropped(), c.seq_len, ds->response_tokens());
    d.train = data::make_indexed_loader(ds, geo, static_cast<uint64_t>(c.seed));
    if (!c.data_val.empty()) {
      auto val = std::make_shared<data::SftDataset>(data::expand_inputs(c.data_val), tok, c.seq_len, read);
      d.val = [val, eval_geo] { return data::make_indexed_loader(val, eval_geo, 0, 0); };
    }
    return d;
  }
  auto open_shards = [&](const std::string& dir) {
    auto shards = std::make_shared<data::TokenShards>(dir);
    COIL_CHECK(shards->tokenizer_sha256() == tok.sha256(),
               "{} was prepared with another tokenizer (sha256 {}) than data.tokenizer {} ({})", dir,
               shards->tokenizer_sha256().substr(0, 12), tok.path(), tok.sha256().substr(0, 12));
    return std::make_shared<data::PackedSamples>(shards, c.seq_len);
  };
  if (c.data_streaming) {
    data::StreamingOptions o;
    o.files = data::expand_inputs(c.data_train);
    o.read = read;
    o.tokenizer = tok.path();
    o.geometry = geo;
    o.seed = static_cast<uint64_t>(c.seed);
    d.train = data::make_streaming_loader(o);
    d.summary = fmt::format("streaming {} file(s) from {}", o.files.size(), c.data_train);
  } else {
    auto samples = open_shards(c.data_train);
    d.train = data::make_indexed_loader(samples, geo, static_cast<uint64_t>(c.seed));
    d.summary = fmt::format("prepared data {}: {} sequences of {} tokens per epoch", c.data_train, samples->size(), c.seq_len);
  }
  if (!c.data_val.empty()) {
    if (fs::exists(fs::path(c.data_val) / "manifest.json")) {
      auto val = open_shards(c.data_val);
      d.val = [val, eval_geo] { return data::make_indexed_loader(val, eval_geo, 0, 0); };
    } else {
      data::StreamingOptions o;
      o.files = data::expand_inputs(c.data_val);
      o.read = read;
      o.tokenizer = tok.path();
      o.geometry = eval_geo;
      d.val = [o] { return data::make_streaming_loader(o); };
    }
  }
  return d;
}

// Mean loss over the first eval_batches micro batches of the held-out data.
double evaluate(const MambaLM& model, RunData& d, int64_t batches) {
  c10::NoGradGuard no_grad;
  auto loader = d.val();
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < batches; ++i) {
    at::Tensor inputs, targets;
    count += to_tensors(loader->next(), inputs, targets);
    sum += loss_sum(model, inputs, targets).item<double>();
  }
  return sum / std::max<int64_t>(count, 1);
}

int64_t derive_steps(const RunConfig& c, const data::Loader& loader) {
  const int64_t tokens_per_step = c.global_batch_size * c.seq_len;
  if (!c.train_by_epochs) {
    COIL_CHECK(c.max_steps > 0, "train.max_steps must be > 0 (or set train.train_by_epochs = true)");
    return c.max_steps;
  }
  if (c.total_train_tokens > 0) return (c.total_train_tokens + tokens_per_step - 1) / tokens_per_step;
  COIL_CHECK(loader.samples_per_epoch() > 0,
             "train.train_by_epochs with streaming data needs train.total_train_tokens (the stream's length is unknown)");
  COIL_CHECK(c.num_epochs > 0, "train.num_epochs must be > 0");
  return (c.num_epochs * loader.samples_per_epoch() + c.global_batch_size - 1) / c.global_batch_size;
}

// metrics.jsonl of a resumed run keeps the lines up to the step it resumes from.
void trim_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

}  // namespace

TrainResult train(const RunConfig& c, Phase phase, bool must_resume) {
  const auto t_start = std::chrono::steady_clock::now();
  if (c.threads > 0) at::set_num_threads(static_cast<int>(c.threads));
  COIL_CHECK(!c.data_tokenizer.empty(), "data.tokenizer is not set");
  COIL_CHECK(!c.data_train.empty(), "data.train is not set");
  COIL_CHECK(c.nan_policy == "stop" || c.nan_policy == "skip", "train.nan_policy must be stop or skip, not '{}'",
             c.nan_policy);
  COIL_CHECK(c.log_interval >= 1, "train.log_interval must be >= 1");
  const char* what = phase == Phase::kSft ? "sft" : "pretrain";

  // ---- The model ----
  data::Tokenizer tok(c.data_tokenizer);
  MambaConfig mc = MambaConfig::preset(c.model_preset);
  mc.vocab_size = c.model_vocab_size > 0 ? c.model_vocab_size : tok.vocab_size();
  mc = mc.padded();
  data::check_vocab_fits(tok.vocab_size(), mc.vocab_size, tok.path());
  MambaLM model(mc, static_cast<uint64_t>(c.seed));
  std::vector<NamedTensor> params = model.named_parameters();
  for (auto& p : params) p.tensor.requires_grad_(true);

  // ---- Data, steps, optimizer, schedule ----
  const data::BatchGeometry geo{c.seq_len, c.global_batch_size, c.micro_batch_size, 0, 1};
  geo.validate();
  RunData data = open_data(c, phase, tok, geo);
  const int64_t steps = derive_steps(c, *data.train);
  optim::HybridConfig hc;
  hc.use_muon = c.use_muon;
  hc.adamw = {c.adam_beta1, c.adam_beta2, c.adam_eps, c.weight_decay};
  hc.muon = {c.muon_momentum, c.muon_nesterov, static_cast<int>(c.muon_ns_steps), c.weight_decay, c.muon_scale};
  optim::HybridOptimizer opt(params, hc);
  optim::Schedule schedule{c.schedule, c.warmup_steps, steps, c.min_lr_ratio, c.decay_fraction};
  schedule.validate();

  // ---- The run directory: resume from its latest checkpoint, or start ----
  const fs::path run_dir(c.run_dir), ckpt_dir = run_dir / "checkpoints";
  fs::create_directories(ckpt_dir);
  const std::string config_text = c.to_toml();
  int64_t step = 0, tokens_seen = 0;
  double best_val = std::numeric_limits<double>::infinity(), elapsed_before = 0;
  if (fs::exists(ckpt_dir / "latest" / "checkpoint.h5")) {
    std::vector<NamedTensor> opt_state = opt.state();
    CheckpointData ck = load_checkpoint((ckpt_dir / "latest").string(), params, &opt_state);
    step = ck.step;
    opt.load_state(opt_state, step);
    data.train->restore(data::LoaderState::from_json(ck.strings.at("loader_state")));
    tokens_seen = std::stoll(ck.strings.at("tokens_seen"));
    best_val = std::stod(ck.strings.at("best_val_loss"));
    elapsed_before = std::stod(ck.strings.at("elapsed_s"));
    fmt::print("{}: resuming {} at step {} of {}\n", what, fs::canonical(ckpt_dir / "latest").string(), step, steps);
  } else if (must_resume) {
    fail("--resume: no checkpoint to resume from in {}", ckpt_dir.string());
  } else if (phase == Phase::kSft) {
    COIL_CHECK(!c.pretrained_checkpoint_path.empty(), "train.pretrained_checkpoint_path is not set (SFT starts from a pretrained model)");
    load_checkpoint(c.pretrained_checkpoint_path, params, nullptr, false);
    fmt::print("sft: starting from the pretrained weights of {}\n", c.pretrained_checkpoint_path);
  }
  std::ofstream(run_dir / "config.toml") << config_text;
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  if (step > 0) trim_metrics(metrics_path, step);
  std::ofstream metrics(metrics_path, step > 0 ? std::ios::app : std::ios::trunc);
  TensorBoardWriter tb((run_dir / "tb").string());  // a new event file per (re)start, as TensorBoard expects

  fmt::print("{}: model {}\n{}", what, mc.describe(), optim::grouping_table(params));
  fmt::print("{}: {}; {} steps of {} sequences x {} tokens ({} micro batch(es) of {}), {} threads\n", what,
             data.summary, steps, c.global_batch_size, c.seq_len, geo.accumulation(), c.micro_batch_size,
             at::get_num_threads());

  // Saves the whole state after `done` steps into checkpoints/<name>.
  auto save = [&](const std::string& name, int64_t done, double elapsed) {
    CheckpointData ck;
    ck.step = done;
    ck.model = params;
    ck.optimizer = opt.state();
    ck.strings = {{"config", config_text},
                  {"phase", what},
                  {"loader_state", data.train->state().to_json()},
                  {"tokens_seen", std::to_string(tokens_seen)},
                  {"best_val_loss", fmt::format("{}", best_val)},
                  {"elapsed_s", fmt::format("{}", elapsed)},
                  {"schedule", fmt::format("{} warmup {} total {} min_lr_ratio {}", schedule.kind,
                                           schedule.warmup_steps, schedule.total_steps, schedule.min_lr_ratio)}};
    save_checkpoint((ckpt_dir / name).string(), ck);
  };

  // ---- The loop ----
  TrainResult result;
  if (step == 0 && data.val && c.eval_interval > 0) {  // where the run starts from, for comparison
    const double val = evaluate(model, data, c.eval_batches);
    metrics << nlohmann::json{{"step", 0}, {"val_loss", val}, {"val_ppl", std::exp(val)}}.dump() << "\n" << std::flush;
    tb.scalar("val/loss", val, 0);
    fmt::print("{} step 0/{} | val loss {:.4f} | val ppl {:.2f}\n", what, steps, val, std::exp(val));
  }
  const auto t_loop = std::chrono::steady_clock::now();
  const int64_t first = step;
  int64_t skipped = 0;
  double step_time = 0;  // moving average, for the ETA
  for (; step < steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // The global batch: every micro batch first, to know how many targets the mean is over.
    std::vector<at::Tensor> inputs(static_cast<size_t>(geo.accumulation())), targets(inputs.size());
    int64_t count = 0;
    for (size_t m = 0; m < inputs.size(); ++m) count += to_tensors(data.train->next(), inputs[m], targets[m]);
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    double loss = 0;
    for (size_t m = 0; m < inputs.size(); ++m) {
      at::Tensor l = loss_sum(model, inputs[m], targets[m]) / static_cast<double>(std::max<int64_t>(count, 1));
      l.backward();
      loss += l.item<double>();
    }
    const double grad_norm = std::sqrt(optim::grad_sq_norm(params));
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      if (c.nan_policy == "stop")
        fail("{} step {}: the loss is {} (gradient norm {}); stopping without writing a checkpoint "
             "(train.nan_policy = \"skip\" skips such steps)",
             what, step + 1, loss, grad_norm);
      ++skipped;
      fmt::print(stderr, "coil: warning: step {}: loss {}, gradient norm {}: step skipped ({} so far)\n", step + 1,
                 loss, grad_norm, skipped);
      continue;
    }
    optim::clip_grads(params, grad_norm, c.grad_clip);
    const double f = schedule.factor(step), lr_muon = c.learning_rate_muon * f, lr_adamw = c.learning_rate_adamw * f;
    opt.step(lr_muon, lr_adamw);

    const int64_t done = step + 1;
    const double dt = seconds_since(t0);
    step_time = step == first ? dt : 0.9 * step_time + 0.1 * dt;
    tokens_seen += c.global_batch_size * c.seq_len;
    const double elapsed = elapsed_before + seconds_since(t_loop);
    const double tok_s = static_cast<double>(c.global_batch_size * c.seq_len) / dt;
    metrics << nlohmann::json{{"step", done},           {"loss", loss},         {"lr_muon", lr_muon},
                              {"lr_adamw", lr_adamw},   {"grad_norm", grad_norm}, {"tokens", tokens_seen},
                              {"tokens_per_sec", tok_s}, {"elapsed_s", elapsed}}
                   .dump()
            << "\n"
            << std::flush;
    tb.scalar("train/loss", loss, done);
    tb.scalar("train/lr_muon", lr_muon, done);
    tb.scalar("train/lr_adamw", lr_adamw, done);
    tb.scalar("train/grad_norm", grad_norm, done);
    tb.scalar("train/tokens_per_sec", tok_s, done);
    if (done % c.log_interval == 0 || done == steps) {
      tb.flush();
      fmt::print("{} step {}/{} | loss {:.4f} | lr {:.2e}/{:.2e} | grad {:.3f} | {:.0f} tok/s | ETA {}\n", what, done,
                 steps, loss, lr_muon, lr_adamw, grad_norm, tok_s, human_time(step_time * static_cast<double>(steps - done)));
    }
    result.last_loss = loss;

    if (data.val && c.eval_interval > 0 && (done % c.eval_interval == 0 || done == steps)) {
      const double val = evaluate(model, data, c.eval_batches);
      metrics << nlohmann::json{{"step", done}, {"val_loss", val}, {"val_ppl", std::exp(val)}}.dump() << "\n" << std::flush;
      tb.scalar("val/loss", val, done);
      tb.flush();
      fmt::print("{} step {}/{} | val loss {:.4f} | val ppl {:.2f}{}\n", what, done, steps, val, std::exp(val),
                 val < best_val ? " (best)" : "");
      result.last_val_loss = val;
      if (val < best_val) {
        best_val = val;
        save("best", done, elapsed);
      }
    }
    if ((c.checkpoint_interval > 0 && done % c.checkpoint_interval == 0) || done == steps) {
      const std::string name = fmt::format("step-{:08d}", done);
      save(name, done, elapsed);
      point_link(ckpt_dir.string(), "latest", name);
      if (done == steps) point_link(ckpt_dir.string(), "final", name);
    }
  }
  result.steps = steps;
  fmt::print("{}: done, {} steps in {} ({} skipped); checkpoints in {}\n", what, steps,
             human_time(seconds_since(t_start)), skipped, ckpt_dir.string());
  return result;
}

}  // namespace coil
