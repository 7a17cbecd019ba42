#include "launch/trainer.h"

#include "launch/tensorboard.h"
#include "launch/watchdog.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/sft.h"
#include "data/shards.h"
#include "data/streaming.h"
#include "data/tokenizer.h"
#include "dist/checkpoint.h"
#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
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

// A fingerprint of a global batch, the same whatever the number of ranks, so that a log shows
// which data each step saw (metrics.jsonl "batch_hash"). Each row gets a 64-bit hash of its
// global index in the batch, its tokens and its loss mask (splitmix64's finalizer as the mixer);
// the batch's hash is the sum over rows of each 32-bit half (mod 2^32), so each rank adds up its
// own rows and one all-reduce of doubles completes it (exact while a batch has < 2^21 rows).
uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void add_row_hashes(const data::Batch& b, int64_t first_global_row, double& low, double& high) {
  for (int64_t i = 0; i < b.rows; ++i) {
    uint64_t h = mix64(static_cast<uint64_t>(first_global_row + i) + 0x9e3779b97f4a7c15ULL);
    for (int64_t j = 0; j < b.cols; ++j) {
      const auto k = static_cast<size_t>(i * b.cols + j);
      const uint64_t m = b.mask.empty() ? 1 : b.mask[k];
      h = mix64(h ^ (static_cast<uint32_t>(b.tokens[k]) | m << 32));
    }
    low += static_cast<double>(h & 0xffffffffULL);
    high += static_cast<double>(h >> 32);
  }
}

uint64_t batch_hash(double low_sum, double high_sum) {
  return static_cast<uint64_t>(std::fmod(high_sum, 4294967296.0)) << 32 |
         static_cast<uint64_t>(std::fmod(low_sum, 4294967296.0));
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

using Forward = std::function<at::Tensor(const at::Tensor&)>;

// Sum of the cross-entropy over the targets that count.
at::Tensor loss_sum(const Forward& forward, const at::Tensor& inputs, const at::Tensor& targets) {
  at::Tensor logits = forward(inputs);
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), targets.to(logits.device()).reshape({-1}), {},
                                at::Reduction::Sum, -100);
}

// Mean loss over the first eval_batches micro batches of the held-out data (every rank computes
// the same; the sharded forward needs every rank).
double evaluate(const Forward& model, RunData& d, int64_t batches) {
  c10::NoGradGuard no_grad;
  auto loader = d.val();
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < batches; ++i) {
    at::Tensor inputs, targets;
    count += to_tensors(loader->next(), inputs, targets);
    sum += loss_sum(model, inputs, targets).item<double>();  // model: the (possibly sharded) forward
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

// How the model runs: whole on one process, or sharded FSDP-style across the ranks of an MPI run.
// The loop below is the same either way.
struct Parallel {
  int rank = 0, world = 1;
  std::shared_ptr<dist::Comm> comm;       // null on one process; MPI (CPU tensors): sums, checkpoints
  std::shared_ptr<dist::Comm> data_comm;  // the model's collectives: comm on CPU, NCCL on CUDA
  at::Device device = at::kCPU;
  at::ScalarType compute = at::kFloat;
  std::unique_ptr<dist::FsdpMamba> fsdp;
  MambaLM* model = nullptr;
  std::vector<NamedTensor> params;  // what the optimizer updates: whole tensors or this rank's shards
  std::map<std::string, size_t> index;  // parameter name -> position

  bool root() const { return rank == 0; }
  at::Tensor forward(const at::Tensor& tokens) {
    const at::Tensor t = tokens.to(device);
    return fsdp ? fsdp->forward(t) : model->forward(t, compute);
  }
  void finish_step() {
    if (fsdp) fsdp->finish_step();
  }
  std::vector<double> sum(std::vector<double> v) {
    if (!comm) return v;
    at::Tensor t = at::tensor(v, at::kDouble);
    comm->all_reduce(t);
    return {t.data_ptr<double>(), t.data_ptr<double>() + t.numel()};
  }
  std::vector<std::vector<int64_t>> shapes() const {
    if (fsdp) return fsdp->whole_shapes();
    std::vector<std::vector<int64_t>> out;
    for (const auto& p : params) out.push_back(p.tensor.sizes().vec());
    return out;
  }
  // How each parameter is split over the ranks (one rank: whole), in params order.
  std::vector<dist::ShardLayout> layouts;
  const dist::ShardLayout& layout(const std::string& param) const { return layouts[index.at(param)]; }
  // The layout of an optimizer state tensor ("muon.<param>.momentum", "adamw.<param>.exp_avg").
  const dist::ShardLayout& state_layout(const std::string& state) const {
    const size_t a = state.find('.'), b = state.rfind('.');
    return layout(state.substr(a + 1, b - a - 1));
  }
  // This rank's rows of a tensor it holds (its shard, or the whole tensor), as a host copy.
  dist::TensorRows rows(dist::CheckpointSaver& saver, const std::string& name, const at::Tensor& local,
                        const dist::ShardLayout& l) const {
    const auto [begin, end] = dist::rank_rows(l.shape[0], rank, world);
    COIL_CHECK(local.size(0) == l.rows_per_rank, "{}: {} rows held, the layout says {}", name, local.size(0), l.rows_per_rank);
    return {name, l.shape, begin, saver.stage(name, local.narrow(0, 0, end - begin))};
  }
  // Reads this rank's rows of a checkpoint tensor into `local`.
  void read(const dist::Checkpoint& ck, const std::string& name, const at::Tensor& local, const dist::ShardLayout& l) const {
    ck.read(name, local, rank * l.rows_per_rank);
  }
};

// Under mpirun or srun every rank must run the same configuration.
void check_same_config(Parallel& par, const std::string& config_text) {
  if (!par.comm) return;
  at::Tensor mine = at::tensor({static_cast<int64_t>(std::hash<std::string>{}(config_text) >> 1)}, at::kLong);
  at::Tensor all = at::empty({par.world}, at::kLong);
  par.comm->all_gather(mine, all);
  for (int r = 0; r < par.world; ++r)
    COIL_CHECK(all[r].item<int64_t>() == mine.item<int64_t>(),
               "rank {} runs another configuration than rank {} (the resolved configs differ: same --config and "
               "--set on every rank?)",
               par.rank, r);
}

}  // namespace

TrainResult train(const RunConfig& c, Phase phase, bool must_resume) {
  const auto t_start = std::chrono::steady_clock::now();
  StopSignals signals;
  Watchdog watchdog(c.watchdog_timeout);  // ends a job that stops making progress (a hang)
  Parallel par;
  if (dist::launched_by_mpi()) {
    par.rank = dist::world().rank;
    par.world = dist::world().size;
  }
  if (c.threads > 0) at::set_num_threads(static_cast<int>(c.threads));
  else if (par.world > 1) at::set_num_threads(dist::cores_per_rank());
  COIL_CHECK(!c.data_tokenizer.empty(), "data.tokenizer is not set");
  COIL_CHECK(!c.data_train.empty(), "data.train is not set");
  COIL_CHECK(c.nan_policy == "stop" || c.nan_policy == "skip", "train.nan_policy must be stop or skip, not '{}'",
             c.nan_policy);
  COIL_CHECK(c.log_interval >= 1, "train.log_interval must be >= 1");
  const char* what = phase == Phase::kSft ? "sft" : "pretrain";
  // The device (one GPU per rank) and the precision.
  const bool cuda = c.device == "cuda";
  if (cuda) {
    COIL_CHECK(at::hasCUDA() && at::getNumGPUs() > 0,
               "train.device = \"cuda\": CUDA is not available here (no GPU visible, no driver, or a LibTorch without CUDA)");
    const int local = dist::launched_by_mpi() ? dist::world().local_rank : 0;
    par.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local % static_cast<int>(at::getNumGPUs())));
  }
  c10::OptionalDeviceGuard device_guard;
  if (cuda) device_guard.reset_device(par.device);
  par.compute = c.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;

  // ---- The model ----
  data::Tokenizer tok(c.data_tokenizer);
  MambaConfig mc = c.model_config(c.model_vocab_size > 0 ? c.model_vocab_size : tok.vocab_size());
  mc = mc.padded();
  data::check_vocab_fits(tok.vocab_size(), mc.vocab_size, tok.path());
  MambaLM model(mc, static_cast<uint64_t>(c.seed));
  const std::string config_text = c.to_toml();
  if (par.world > 1) {
    par.comm = dist::make_mpi_comm();
    check_same_config(par, config_text);
    par.data_comm = cuda ? std::shared_ptr<dist::Comm>(dist::make_nccl_comm()) : par.comm;
  }

  // ---- The model across the ranks ----
  par.model = &model;
  if (par.world > 1) {
    dist::FsdpOptions fo;
    fo.reshard_after_forward = c.reshard_after_forward;
    fo.compute_dtype = par.compute;
    fo.reduce_dtype = c.reduce_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    fo.overlap = c.overlap_comm;
    fo.device = par.device;
    fo.activation_checkpointing = parse_activation_checkpointing(c.activation_checkpointing, "train.activation_checkpointing");
    par.fsdp = std::make_unique<dist::FsdpMamba>(model, par.data_comm, fo);
    par.params = par.fsdp->local_parameters();
  } else {
    model.to(par.device);
    model.set_activation_checkpointing(parse_activation_checkpointing(c.activation_checkpointing, "train.activation_checkpointing"));
    par.params = model.named_parameters();
    for (auto& p : par.params) p.tensor.requires_grad_(true);
  }
  for (size_t i = 0; i < par.params.size(); ++i) {
    par.index[par.params[i].name] = i;
    par.layouts.push_back(par.fsdp ? par.fsdp->layout(i) : dist::ShardLayout(par.params[i].tensor.sizes().vec(), 1));
  }
  const std::vector<NamedTensor>& params = par.params;

  // ---- Data, steps, optimizer, schedule ----
  watchdog.mark("opening the data");
  const data::BatchGeometry geo{c.seq_len, c.global_batch_size, c.micro_batch_size, par.rank, par.world};
  geo.validate();
  RunData data = open_data(c, phase, tok, geo);
  const int64_t steps = derive_steps(c, *data.train);
  optim::HybridConfig hc;
  hc.use_muon = c.use_muon;
  hc.adamw = {c.adam_beta1, c.adam_beta2, c.adam_eps, c.weight_decay};
  hc.muon = {c.muon_momentum, c.muon_nesterov, static_cast<int>(c.muon_ns_steps), c.weight_decay, c.muon_scale};
  optim::HybridOptimizer opt(params, hc, par.shapes());
  if (par.fsdp) {  // Muon's matrices are orthogonalized whole, each on one owner rank
    std::vector<dist::ShardLayout> muon_layouts;
    for (size_t i = 0; i < params.size(); ++i)
      if (hc.use_muon && optim::group_of(params[i].name, static_cast<int64_t>(par.fsdp->layout(i).shape.size())).muon)
        muon_layouts.push_back(par.fsdp->layout(i));
    opt.muon().set_orthogonalize(dist::sharded_orthogonalize(par.data_comm, muon_layouts, hc.muon.ns_steps));
  }
  optim::Schedule schedule{c.schedule, c.warmup_steps, steps, c.min_lr_ratio, c.decay_fraction};
  schedule.validate();

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
    fs::create_directories(ckpt_dir);
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
    opt.load_state(state, step);
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
    if (at::Tensor rng = ck.rank_rng(par.rank % ck.world_size()); rng.defined()) {
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(rng);
    }
    tokens_seen = std::stoll(ck.string("tokens_seen"));
    best_val = std::stod(ck.string("best_val_loss"));
    elapsed_before = std::stod(ck.string("elapsed_s"));
    if (par.root())
      fmt::print("{}: resuming {} (saved on {} rank(s)) at step {} of {}\n", what, resume_from, ck.world_size(), step, steps);
  }
  // Only rank 0 writes files.
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  std::ofstream metrics;
  std::unique_ptr<TensorBoardWriter> tb;
  if (par.root()) {
    std::ofstream(run_dir / "config.toml") << config_text;
    if (step > 0) trim_metrics(metrics_path, step);
    metrics.open(metrics_path, step > 0 ? std::ios::app : std::ios::trunc);
    tb = std::make_unique<TensorBoardWriter>((run_dir / "tb").string());  // a new event file per (re)start
  }
  auto log_scalar = [&](const char* tag, double v, int64_t at_step) {
    if (tb) tb->scalar(tag, v, at_step);
  };
  const Forward forward = [&](const at::Tensor& tokens) { return par.forward(tokens); };

  if (par.root()) fmt::print("{}: model {}\n{}", what, mc.describe(), optim::grouping_table(params));
  if (par.root())
    fmt::print("{}: device {}, compute {}, master weights and optimizer state float32{}\n", what, c.device, c.dtype,
               par.fsdp ? fmt::format(", gradient reduce-scatter {}", c.reduce_dtype) : "");
  if (par.root())
    fmt::print("{}: {}; {} steps of {} sequences x {} tokens ({} micro batch(es) of {} on each of {} rank(s)), {} threads{}\n",
               what, data.summary, steps, c.global_batch_size, c.seq_len, geo.accumulation(), c.micro_batch_size,
               par.world, at::get_num_threads(), par.world > 1 ? " per rank" : "");

  // Saves the state after `done` steps as checkpoints/step-<done>: each rank its own rows (a host
  // copy now, written by a background thread when train.async_checkpoint). Collective. The
  // training thread's time in it (the copy and the saver's calls) is reported at the end.
  dist::CheckpointSaver saver(ckpt_dir.string(), par.comm, c.async_checkpoint, c.keep_last_k);
  const std::string tokenizer_bytes = par.root() ? read_file(tok.path()) : std::string();
  auto save = [&](int64_t done, double elapsed, bool best, bool final) {
    saver.finish();  // the one before (long written, as a rule): its host buffers are reused
    dist::SaveRequest r;
    r.name = fmt::format("step-{:08d}", done);
    r.best = best;
    r.final = final;
    r.part.rank = par.rank;
    r.part.world = par.world;
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
                 {"best_val_loss", fmt::format("{}", best_val)},
                 {"elapsed_s", fmt::format("{}", elapsed)},
                 {"schedule", fmt::format("{} warmup {} total {} min_lr_ratio {}", schedule.kind,
                                          schedule.warmup_steps, schedule.total_steps, schedule.min_lr_ratio)}};
    r.tokenizer = tokenizer_bytes;
    saver.save(std::move(r));
  };

  // ---- The loop ----
  TrainResult result;
  if (step == 0 && data.val && c.eval_interval > 0) {  // where the run starts from, for comparison
    watchdog.mark("evaluation");
    const double val = evaluate(forward, data, c.eval_batches);
    if (par.root()) {
      metrics << nlohmann::json{{"step", 0}, {"val_loss", val}, {"val_ppl", std::exp(val)}}.dump() << "\n" << std::flush;
      log_scalar("val/loss", val, 0);
      fmt::print("{} step 0/{} | val loss {:.4f} | val ppl {:.2f}\n", what, steps, val, std::exp(val));
    }
  }
  const auto t_loop = std::chrono::steady_clock::now();
  const int64_t first = step;
  int64_t skipped = 0;
  double step_time = 0;  // moving average, for the ETA
  for (; step < steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // This rank's part of the global batch: every micro batch first, to know how many targets
    // (over all ranks) the mean is over.
    watchdog.mark("waiting for the data loader", step);
    std::vector<at::Tensor> inputs(static_cast<size_t>(geo.accumulation())), targets(inputs.size());
    int64_t local_count = 0;
    double hash_low = 0, hash_high = 0;
    for (size_t m = 0; m < inputs.size(); ++m) {
      const data::Batch b = data.train->next();
      add_row_hashes(b, par.rank * geo.per_rank() + static_cast<int64_t>(m) * geo.micro_batch, hash_low, hash_high);
      local_count += to_tensors(b, inputs[m], targets[m]);
    }
    watchdog.mark("the all-reduce of the target count");
    const std::vector<double> batch_sums = par.sum({static_cast<double>(local_count), hash_low, hash_high});
    const double count = std::max(1.0, batch_sums[0]);
    const uint64_t hash = batch_hash(batch_sums[1], batch_sums[2]);
    watchdog.mark("forward and backward (all-gathers, reduce-scatters)");
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    double local_loss = 0;
    for (size_t m = 0; m < inputs.size(); ++m) {
      at::Tensor l = loss_sum(forward, inputs[m], targets[m]) / count;
      l.backward();
      local_loss += l.item<double>();
    }
    par.finish_step();
    // One all-reduce for the loss, the gradient norm, a stop signal on any rank, and whether any
    // rank is still writing the checkpoint in flight.
    watchdog.mark("the all-reduce of the loss and gradient norm");
    const std::vector<double> sums =
        par.sum({local_loss, optim::grad_sq_norm(params), stop_signal() != 0 ? 1.0 : 0.0, saver.busy()});
    const double loss = sums[0], grad_norm = std::sqrt(sums[1]);
    const bool stop = sums[2] > 0;
    watchdog.mark("committing a checkpoint");
    if (saver.awaiting_commit() && sums[3] == 0) saver.commit();
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
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
    optim::clip_grads(params, grad_norm, c.grad_clip);
    const double f = schedule.factor(step), lr_muon = c.learning_rate_muon * f, lr_adamw = c.learning_rate_adamw * f;
    watchdog.mark("the optimizer step (Muon's gathers)");
    opt.step(lr_muon, lr_adamw);

    const int64_t done = step + 1;
    const double dt = seconds_since(t0);
    step_time = step == first ? dt : 0.9 * step_time + 0.1 * dt;
    tokens_seen += c.global_batch_size * c.seq_len;
    const double elapsed = elapsed_before + seconds_since(t_loop);
    const double tok_s = static_cast<double>(c.global_batch_size * c.seq_len) / dt;
    if (par.root()) {
      metrics << nlohmann::json{{"step", done},           {"loss", loss},         {"lr_muon", lr_muon},
                                {"lr_adamw", lr_adamw},   {"grad_norm", grad_norm}, {"tokens", tokens_seen},
                                {"tokens_per_sec", tok_s}, {"elapsed_s", elapsed},
                                {"batch_hash", fmt::format("{:016x}", hash)}}
                     .dump()
              << "\n"
              << std::flush;
      log_scalar("train/loss", loss, done);
      log_scalar("train/lr_muon", lr_muon, done);
      log_scalar("train/lr_adamw", lr_adamw, done);
      log_scalar("train/grad_norm", grad_norm, done);
      log_scalar("train/tokens_per_sec", tok_s, done);
      if (done % c.log_interval == 0 || done == steps) {
        tb->flush();
        fmt::print("{} step {}/{} | loss {:.4f} | lr {:.2e}/{:.2e} | grad {:.3f} | {:.0f} tok/s | ETA {}\n", what,
                   done, steps, loss, lr_muon, lr_adamw, grad_norm, tok_s,
                   human_time(step_time * static_cast<double>(steps - done)));
      }
    }
    result.last_loss = loss;

    bool best = false;
    if (data.val && c.eval_interval > 0 && (done % c.eval_interval == 0 || done == steps)) {
      watchdog.mark("evaluation");
      const double val = evaluate(forward, data, c.eval_batches);
      if (par.root()) {
        metrics << nlohmann::json{{"step", done}, {"val_loss", val}, {"val_ppl", std::exp(val)}}.dump() << "\n"
                << std::flush;
        log_scalar("val/loss", val, done);
        tb->flush();
        fmt::print("{} step {}/{} | val loss {:.4f} | val ppl {:.2f}{}\n", what, done, steps, val, std::exp(val),
                   val < best_val ? " (best)" : "");
      }
      result.last_val_loss = val;
      if (val < best_val) best_val = val, best = true;
    }
    // A checkpoint at each interval, at the end, at a new best val loss (`best` points at it), and
    // when a signal asks to stop (SIGTERM, SIGUSR1: preemption, a time limit coming).
    watchdog.mark("saving a checkpoint");
    if ((c.checkpoint_interval > 0 && done % c.checkpoint_interval == 0) || done == steps || best || stop)
      save(done, elapsed, best, done == steps);
    if (stop) {
      watchdog.mark("writing the checkpoint of a stop");
      COIL_CHECK(saver.finish(), "{}: stopping at step {} on a signal, and its checkpoint could not be saved (see above)",
                 what, done);
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
  COIL_CHECK(saver.finish(), "{}: the final checkpoint could not be saved (see above)", what);
  result.steps = steps;
  if (par.root())
    fmt::print("{}: done, {} steps in {} ({} skipped); checkpoints in {} (the training thread waited {:.2f} s for them)\n",
               what, steps, human_time(seconds_since(t_start)), skipped, ckpt_dir.string(), saver.stall_seconds());
  return result;
}

}  // namespace coil
