// The training loop of `coil pretrain` and `coil sft`, top to bottom: the ranks and the model on
// them (parallel.h), the data (run_data.h), the optimizer and schedule, where the run starts (a
// checkpoint, a pretrained model, scratch), then one step after another: micro batches to the
// device (batch.h), forward and backward of the (loss-scaled) loss, one all-reduce of the step's
// numbers, the optimizer step (skipped on a float16 overflow, loss_scale.h), the logs
// (metrics.h), evaluations and checkpoints.
#include "launch/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/streaming.h"
#include "data/tokenizer.h"
#include "dist/checkpoint.h"
#include "dist/world.h"
#include "launch/batch.h"
#include "launch/metrics.h"
#include "launch/parallel.h"
#include "launch/ranks.h"
#include "launch/run_data.h"
#include "launch/watchdog.h"
#include "model/mamba.h"
#include "optim/hybrid.h"
#include "optim/loss_scale.h"
#include "optim/schedule.h"
#include "util/error.h"

namespace coil {
namespace fs = std::filesystem;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  COIL_CHECK(in.good(), "cannot read {}", path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// SIGTERM and SIGUSR1 ask a run to stop: it finishes its step, saves a checkpoint and exits 0
// (Slurm sends them before a time limit or a preemption). Installed for the length of a run.
volatile std::sig_atomic_t g_stop_signal = 0;
int stop_signal() { return g_stop_signal; }
struct StopSignals {
  struct sigaction old_term {}, old_usr1 {};
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = [](int sig) { g_stop_signal = sig; };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGUSR1, &sa, &old_usr1);
  }
  ~StopSignals() {
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGUSR1, &old_usr1, nullptr);
  }
};

}  // namespace

TrainResult train(const RunConfig& c, Phase phase, bool must_resume) {
  const auto t_start = std::chrono::steady_clock::now();
  StopSignals signals;
  Watchdog watchdog(c.watchdog_timeout);  // ends a job that stops making progress (a hang)
  COIL_CHECK(!c.data_tokenizer.empty(), "data.tokenizer is not set");
  COIL_CHECK(!c.data_train.empty(), "data.train is not set");
  COIL_CHECK(c.nan_policy == "stop" || c.nan_policy == "skip", "train.nan_policy must be stop or skip, not '{}'",
             c.nan_policy);
  COIL_CHECK(c.log_interval >= 1, "train.log_interval must be >= 1");
  const char* what = phase == Phase::kSft ? "sft" : "pretrain";
  // The ranks, the device (one GPU per rank) and the precision.
  Parallel par = Parallel::start(c);
  c10::OptionalDeviceGuard device_guard;
  if (par.device.is_cuda()) device_guard.reset_device(par.device);
  const optim::LossScaleConfig lsc{c.loss_scale_init, 2, 0.5, c.loss_scale_growth_interval, /*min_scale=*/1};
  COIL_CHECK(lsc.init_scale >= 1 && std::ldexp(1.0, std::ilogb(lsc.init_scale)) == lsc.init_scale,
             "train.loss_scale_init must be a power of two >= 1 (unscaling is then exact), not {}", lsc.init_scale);
  COIL_CHECK(lsc.growth_interval >= 1, "train.loss_scale_growth_interval must be >= 1, not {}", lsc.growth_interval);
  optim::LossScaler scaler(par.compute == at::kHalf, lsc);  // float16 only: a scale of 1 otherwise

  // ---- The model, across the ranks ----
  data::Tokenizer tok(c.data_tokenizer);
  MambaConfig mc = c.model_config(c.model_vocab_size > 0 ? c.model_vocab_size : tok.vocab_size());
  mc = mc.padded();
  data::check_vocab_fits(tok.vocab_size(), mc.vocab_size, tok.path());
  MambaLM model(mc, static_cast<uint64_t>(c.seed));
  const std::string config_text = c.to_toml();
  par.place(model, c, config_text);
  const std::vector<NamedTensor>& params = par.params;

  // ---- Data, steps, optimizer, schedule ----
  watchdog.mark("opening the data");
  const data::BatchGeometry geo{c.seq_len, c.global_batch_size, c.micro_batch_size, par.rank, par.world};
  geo.validate();
  RunData data = open_data(c, phase, tok, geo);
  const int64_t steps = derive_steps(c, *data.train);
  std::unique_ptr<optim::HybridOptimizer> optimizer = par.make_optimizer(c);
  optim::HybridOptimizer& opt = *optimizer;
  optim::Schedule schedule{c.schedule, c.warmup_steps, steps, c.min_lr_ratio, c.decay_fraction};
  schedule.validate();
  // Every rank's host and device; every rank sees run_dir (or all stop here, before step 1). The
  // first write to run_dir: the settings above are all checked by now.
  const Ranks ranks = gather_ranks(par.comm.get(), par.rank, par.world, par.device.str());
  check_shared_run_dir(c.run_dir, par.comm.get(), par.rank, ranks);

  // ---- Where the run starts: its newest intact checkpoint, a pretrained model (SFT), or scratch ----
  // Each rank reads its own rows of every tensor, whatever the number of ranks that saved them.
  const fs::path run_dir(c.run_dir), ckpt_dir = run_dir / "checkpoints";
  std::vector<NamedTensor> state = opt.state();  // this rank's rows of each optimizer state tensor
  auto read_weights = [&](const dist::Checkpoint& ck) {
    for (size_t i = 0; i < params.size(); ++i) par.read(ck, "model/" + params[i].name, params[i].tensor, par.layouts[i]);
  };
  auto read_all = [&](const dist::Checkpoint& ck) {
    read_weights(ck);
    for (const auto& t : state) par.read(ck, "optimizer/" + t.name, t.tensor, par.state_layout(t.name));
  };
  watchdog.mark("reading the checkpoint");
  std::vector<std::string> damaged;
  const std::string resume_from = dist::find_intact_checkpoint(ckpt_dir.string(), par.comm, &damaged, read_all);
  if (par.root())
    for (const auto& d : damaged)
      fmt::print(stderr, "coil: warning: {}; {}\n", d,
                 resume_from.empty() ? "no intact checkpoint is left" : "resuming from " + resume_from + " instead");
  COIL_CHECK(damaged.empty() || !resume_from.empty(),
             "{} holds no intact checkpoint to resume from (see above); move the damaged ones away to start afresh",
             ckpt_dir.string());
  if (par.root()) {
    std::error_code ec;
    fs::create_directories(ckpt_dir, ec);
    COIL_CHECK(!ec, "train.run_dir: cannot create {}: {}", ckpt_dir.string(), ec.message());
    dist::remove_interrupted_saves(ckpt_dir.string());
  }
  if (resume_from.empty() && must_resume) fail("--resume: no checkpoint to resume from in {}", ckpt_dir.string());
  if (resume_from.empty() && phase == Phase::kSft) {
    COIL_CHECK(!c.pretrained_checkpoint_path.empty(), "train.pretrained_checkpoint_path is not set (SFT starts from a pretrained model)");
    const std::string problems = dist::read_verified(dist::Checkpoint(c.pretrained_checkpoint_path), par.comm, read_weights);
    COIL_CHECK(problems.empty(), "train.pretrained_checkpoint_path {} is damaged: {}", c.pretrained_checkpoint_path, problems);
    if (par.root()) fmt::print("sft: starting from the pretrained weights of {}\n", c.pretrained_checkpoint_path);
  }

  int64_t step = 0, tokens_seen = 0;
  double best_val = std::numeric_limits<double>::infinity(), elapsed_before = 0;
  if (!resume_from.empty()) {  // the weights and optimizer state are read; the rest now
    const dist::Checkpoint ck(resume_from);
    step = ck.step();
    // The optimizer's own count (bias corrections) is behind the step's when steps were skipped.
    const auto& strings = ck.strings();
    opt.load_state(state, strings.count("optimizer_steps") ? std::stoll(strings.at("optimizer_steps")) : step);
    // The loader state: one for all ranks (its order does not depend on them), or, when streaming,
    // one per rank of the run that saved it (merged when the number of ranks changed).
    data::LoaderState state0 = data::LoaderState::from_json(ck.string("loader_state"));
    if (state0.kind == "streaming") {
      std::vector<data::LoaderState> saved;
      for (int r = 0; r < ck.world_size(); ++r) saved.push_back(data::LoaderState::from_json(ck.rank_string(r, "loader_state")));
      state0 = ck.world_size() == par.world ? saved[static_cast<size_t>(par.rank)]
                                            : data::merge_streaming_states(saved, par.rank, par.world);
    }
    data.train->restore(state0);
    if (par.root() && data.train->state().fingerprint != state0.fingerprint)
      fmt::print("{}: the data mixture changed since step {}: each part goes on from where it was, a new one from its "
                 "start (docs/DATA.md, Mixtures)\n", what, step);
    if (at::Tensor rng = ck.rank_rng(par.rank % ck.world_size()); rng.defined()) {
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(rng);
    }
    tokens_seen = std::stoll(ck.string("tokens_seen"));
    best_val = std::stod(ck.string("best_val_loss"));
    elapsed_before = std::stod(ck.string("elapsed_s"));
    scaler.load_state(strings);
    if (par.root())
      fmt::print("{}: resuming {} (saved on {} rank(s)) at step {} of {}\n", what, resume_from, ck.world_size(), step, steps);
  }
  // Only rank 0 writes files.
  if (par.root()) std::ofstream(run_dir / "config.toml") << config_text;
  MetricsLog metrics(run_dir.string(), par.root(), step, wandb_options(c));
  const LossSum model_loss = [&](const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets) {
    return par.loss_sum(tokens, seq_idx, targets);
  };

  if (par.root()) {
    fmt::print("{}: model {}\n{}", what, mc.describe(), optim::grouping_table(params));
    fmt::print("{}: device {}{}, compute {}{}, master weights and optimizer state float32{}{}\n", what, par.device.str(),
               par.device_why.empty() ? "" : " (" + par.device_why + ")", c.dtype,
               scaler.enabled() ? fmt::format(" with dynamic loss scaling (scale {}, doubled after {} finite steps)",
                                              scaler.scale(), c.loss_scale_growth_interval)
                                : "",
               par.fsdp ? fmt::format(", gradient reduce-scatter {}", c.reduce_dtype) : "",
               c.activation_checkpointing == "full" ? ", each block recomputed in backward (activation checkpointing)" : "");
    fmt::print("{}: {}; {} steps of {} sequences x {} tokens ({} micro batch(es) of {} on each of {} rank(s)), {} threads{}\n",
               what, data.summary, steps, c.global_batch_size, c.seq_len, geo.accumulation(), c.micro_batch_size,
               par.world, at::get_num_threads(), par.world > 1 ? " per rank" : "");
    for (const std::string& line : data.mixture) fmt::print("{}: {}\n", what, line);
    fmt::print("{}: {}\n", what, ranks.describe(at::get_num_threads()));
    if (par.replicate > 1)
      fmt::print("{}: HSDP: parameters sharded over {} rank(s), {} replica group(s), gradients all-reduced across them\n",
                 what, par.shard, par.replicate);
  }

  // Saves the state after `done` steps as checkpoints/step-<done>: each rank its own rows (a host
  // copy now, written by a background thread when train.async_checkpoint). Collective. The
  // training thread's time in it (the copy and the saver's calls) is reported at the end.
  dist::CheckpointSaver saver(ckpt_dir.string(), par.comm, c.async_checkpoint, c.keep_last_k);
  const std::string tokenizer_bytes = par.root() ? read_file(tok.path()) : std::string();
  auto save = [&](int64_t done, double elapsed, bool best, bool final, bool last) {
    saver.finish();  // the one before (long written, as a rule): its host buffers are reused
    dist::SaveRequest r;
    r.name = fmt::format("step-{:08d}", done);
    r.best = best;
    r.final = final;
    r.last = last;
    r.part.rank = par.rank;
    r.part.world = par.world;
    r.part.shard = par.shard;
    r.part.step = done;
    for (size_t i = 0; i < params.size(); ++i)
      r.part.tensors.push_back(par.rows(saver, "model/" + params[i].name, params[i].tensor, par.layouts[i]));
    for (const auto& t : opt.state())
      r.part.tensors.push_back(par.rows(saver, "optimizer/" + t.name, t.tensor, par.state_layout(t.name)));
    r.part.rng = at::detail::getDefaultCPUGenerator().get_state();
    r.part.strings["loader_state"] = data.train->state().to_json();
    r.strings = {{"config", config_text},
                 {"phase", what},
                 {"loader_state", r.part.strings["loader_state"]},
                 {"tokens_seen", std::to_string(tokens_seen)},
                 {"optimizer_steps", std::to_string(opt.steps())},
                 {"best_val_loss", fmt::format("{}", best_val)},
                 {"elapsed_s", fmt::format("{}", elapsed)},
                 {"schedule", fmt::format("{} warmup {} total {} min_lr_ratio {}", schedule.kind,
                                          schedule.warmup_steps, schedule.total_steps, schedule.min_lr_ratio)}};
    for (const auto& [k, v] : scaler.state()) r.strings[k] = v;
    r.tokenizer = tokenizer_bytes;
    saver.save(std::move(r));
  };

  // ---- The loop ----
  TrainResult result;
  auto eval_now = [&](int64_t done) {  // logs and returns the held-out loss
    watchdog.mark("evaluation");
    const Evaluation e = evaluate(model_loss, par.device, data, c.eval_batches);
    metrics.eval(done, e.loss, e.parts);
    std::string parts;
    for (const auto& [name, loss] : e.parts) parts += fmt::format("{}{} {:.4f}", parts.empty() ? " | " : ", ", name, loss);
    if (par.root())
      fmt::print("{} step {}/{} | val loss {:.4f} | val ppl {:.2f}{}{}\n", what, done, steps, e.loss, std::exp(e.loss),
                 parts, done > 0 && e.loss < best_val ? " (best)" : "");
    return e.loss;
  };
  if (step == 0 && !data.val.empty() && c.eval_interval > 0) eval_now(0);  // where the run starts from, for comparison
  const auto t_loop = std::chrono::steady_clock::now();
  const int64_t first = step;
  int64_t skipped = 0, overflows = 0;
  double step_time = 0;  // moving average, for the ETA
  for (; step < steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // This rank's part of the global batch, on the device: every micro batch first, to know how
    // many targets (over all ranks) the mean is over.
    watchdog.mark("waiting for the data loader", step);
    std::vector<DeviceBatch> micro(static_cast<size_t>(geo.accumulation()));
    int64_t local_count = 0;
    double hash_low = 0, hash_high = 0;
    for (size_t m = 0; m < micro.size(); ++m) {
      const data::Batch b = data.train->next();
      add_row_hashes(b, par.rank * geo.per_rank() + static_cast<int64_t>(m) * geo.micro_batch, hash_low, hash_high);
      micro[m] = to_device(b, par.device);
      local_count += micro[m].count;
    }
    watchdog.mark("the all-reduce of the target count");
    const std::vector<double> batch_sums = par.sum({static_cast<double>(local_count), hash_low, hash_high});
    const double count = std::max(1.0, batch_sums[0]);
    const uint64_t hash = batch_hash(batch_sums[1], batch_sums[2]);
    // The loss stays on the device until the step's one all-reduce (no host sync per micro batch).
    watchdog.mark("forward and backward (all-gathers, reduce-scatters)");
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    at::Tensor local_loss = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(par.device));
    for (const DeviceBatch& b : micro) {
      at::Tensor l = loss_sum(model_loss, b) / count;
      scaler.scale_loss(l).backward();
      local_loss += l.detach().to(at::kDouble);
    }
    par.finish_step();
    // One all-reduce for the loss, the gradient norm, a stop signal on any rank, and whether any
    // rank is still writing the checkpoint in flight.
    watchdog.mark("the all-reduce of the loss and gradient norm");
    // The loss and the squared gradient norm come to the host together: one sync per step.
    const at::Tensor local = at::stack({local_loss, optim::grad_sq_norm_tensor(params).to(local_loss.device()) * par.replica_weight()}).cpu();
    const std::vector<double> sums = par.sum({local[0].item<double>(), local[1].item<double>(),
                                              stop_signal() != 0 ? 1.0 : 0.0, saver.busy()});
    const double loss = sums[0], grad_norm = scaler.unscaled_norm(sums[1]);
    const bool stop = sums[2] > 0;
    watchdog.mark("committing a checkpoint");
    if (saver.awaiting_commit() && sums[3] == 0) saver.commit();
    const auto verdict = scaler.judge(loss, grad_norm);
    if (verdict == optim::LossScaler::Verdict::kNonFinite) {
      if (c.nan_policy == "stop")
        fail("{} step {}: the loss is {} (gradient norm {}); stopping without writing a checkpoint "
             "(train.nan_policy = \"skip\" skips such steps)",
             what, step + 1, loss, grad_norm);
      ++skipped;
      if (par.root())
        fmt::print(stderr, "coil: warning: step {}: loss {}, gradient norm {}: step skipped ({} so far)\n", step + 1,
                   loss, grad_norm, skipped);
      continue;
    }
    const double scale = scaler.scale(), f = schedule.factor(step);
    const double lr_muon = c.learning_rate_muon * f, lr_adamw = c.learning_rate_adamw * f;
    if (verdict == optim::LossScaler::Verdict::kStep) {
      scaler.unscale(params);
      optim::clip_grads(params, grad_norm, c.grad_clip);
      watchdog.mark("the optimizer step (Muon's gathers)");
      opt.step(lr_muon, lr_adamw);
    } else {  // float16 overflow: no update; the scale halves and the next step tries again
      ++overflows;
      if (par.root())
        fmt::print(stderr, "coil: warning: step {}: float16 gradients overflowed (inf/NaN) at loss scale {}: "
                   "step skipped, scale halved ({} overflow(s) so far)\n", step + 1, scale, overflows);
    }
    scaler.update(verdict);

    const int64_t done = step + 1;
    const double dt = seconds_since(t0);
    step_time = step == first ? dt : 0.9 * step_time + 0.1 * dt;
    tokens_seen += c.global_batch_size * c.seq_len;
    const double elapsed = elapsed_before + seconds_since(t_loop);
    const double tok_s = static_cast<double>(c.global_batch_size * c.seq_len) / dt;
    nlohmann::json line{{"step", done},           {"loss", loss},           {"lr_muon", lr_muon},
                        {"lr_adamw", lr_adamw},   {"grad_norm", grad_norm}, {"tokens", tokens_seen},
                        {"tokens_per_sec", tok_s}, {"elapsed_s", elapsed},   {"batch_hash", fmt::format("{:016x}", hash)}};
    if (c.peak_tflops > 0) line["mfu"] = train_flops_per_token(mc) * tok_s / (c.peak_tflops * 1e12 * par.world);
    if (scaler.enabled()) line["loss_scale"] = scale, line["skipped"] = verdict != optim::LossScaler::Verdict::kStep;
    metrics.step(done, line);
    if (par.root() && (done % c.log_interval == 0 || done == steps)) {
      metrics.flush();
      fmt::print("{} step {}/{} | loss {:.4f} | lr {:.2e}/{:.2e} | grad {:.3f} | {:.0f} tok/s | ETA {}\n", what, done,
                 steps, loss, lr_muon, lr_adamw, grad_norm, tok_s, human_time(step_time * static_cast<double>(steps - done)));
    }
    result.last_loss = loss;

    bool best = false;
    if (!data.val.empty() && c.eval_interval > 0 && (done % c.eval_interval == 0 || done == steps)) {
      const double val = eval_now(done);
      result.last_val_loss = val;
      if (val < best_val) best_val = val, best = true;
    }
    // A checkpoint at each interval, at the end, at a new best val loss (`best` points at it), and
    // when a signal asks to stop (SIGTERM, SIGUSR1: preemption, a time limit coming).
    watchdog.mark("saving a checkpoint");
    if ((c.checkpoint_interval > 0 && done % c.checkpoint_interval == 0) || done == steps || best || stop)
      save(done, elapsed, best, done == steps, done == steps || stop);
    if (stop) {
      watchdog.mark("writing the checkpoint of a stop");
      COIL_CHECK(saver.finish(), "{}: stopping at step {} on a signal, and its checkpoint could not be saved ({})",
                 what, done, saver.error());
      if (par.root())
        fmt::print("{}: stopped by a signal after step {} of {}; checkpoint {} saved; run again to resume\n", what,
                   done, steps, (ckpt_dir / fmt::format("step-{:08d}", done)).string());
      result.steps = done;
      result.stopped = true;
      return result;
    }
  }
  // The final checkpoint must be on disk before the run reports success.
  watchdog.mark("writing the final checkpoint");
  COIL_CHECK(saver.finish(), "{}: the final checkpoint could not be saved ({})", what, saver.error());
  result.steps = steps;
  if (par.root())
    fmt::print("{}: done, {} steps in {} ({} skipped{}); checkpoints in {} (the training thread waited {:.2f} s for them)\n",
               what, steps, human_time(seconds_since(t_start)), skipped,
               scaler.enabled() ? fmt::format(", {} float16 overflow(s)", overflows) : "", ckpt_dir.string(),
               saver.stall_seconds());
  return result;
}

}  // namespace coil
