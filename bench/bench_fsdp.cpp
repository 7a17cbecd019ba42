// FSDP-style sharding, measured per rank under mpirun (run it for N = 1, 2, 4):
//   model-state memory: local parameters + gradients + optimizer state + the peak of whole
//     (gathered) unit weights, gradients and buffers; target <= 1.15 x (N = 1 value) / N;
//   Newton-Schulz CPU time (this rank's share of Muon's orthogonalizations); target
//     <= 1.3 x (N = 1 value) / N;
//   a step's breakdown: forward, backward, optimizer, and the time inside collectives;
//   activation checkpointing off and on (--checkpointing both, the default): the step time the
//   recompute costs (ZeRO-3 used to recompute every unit: "full" is that old step) and the bytes
//   the activations hold after forward (a counting CPU allocator, util/cpu_memory.h).
// CPU times are per thread (one LibTorch thread per rank), so ranks sharing cores still measure
// their own work. A deep, narrow model, so that its states (not activations) dominate.
//   mpirun -np N bench_fsdp [--layers 24] [--d-model 256] [--vocab 1024] [--steps 3] [--checkpointing both]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <time.h>

#include <chrono>

#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
#include "model/mamba.h"
#include "optim/hybrid.h"
#include "optim/muon.h"
#include "util/cpu_memory.h"

using namespace coil;

namespace {

double cpu_now() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}
double wall_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Forwards every collective to the MPI backend and adds up the wall time spent in them.
class TimedComm : public dist::Comm {
 public:
  explicit TimedComm(std::unique_ptr<dist::Comm> inner) : inner_(std::move(inner)) {
    rank_ = inner_->rank();
    size_ = inner_->size();
  }
  double seconds = 0;
  void all_gather(const at::Tensor& i, at::Tensor& o) override { time([&] { inner_->all_gather(i, o); }); }
  void reduce_scatter(const at::Tensor& i, at::Tensor& o) override { time([&] { inner_->reduce_scatter(i, o); }); }
  void all_reduce(at::Tensor& t) override { time([&] { inner_->all_reduce(t); }); }
  void broadcast(at::Tensor& t, int r) override { time([&] { inner_->broadcast(t, r); }); }
  void gather(const at::Tensor& i, at::Tensor& o, int r) override { time([&] { inner_->gather(i, o, r); }); }
  void scatter(const at::Tensor& i, at::Tensor& o, int r) override { time([&] { inner_->scatter(i, o, r); }); }
  void barrier() override { inner_->barrier(); }

 private:
  template <typename F>
  void time(F f) {
    const double t0 = wall_now();
    f();
    seconds += wall_now() - t0;
  }
  std::unique_ptr<dist::Comm> inner_;
};

int64_t bytes(const std::vector<NamedTensor>& ts) {
  int64_t b = 0;
  for (const auto& t : ts) b += t.tensor.numel() * static_cast<int64_t>(t.tensor.element_size());
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FSDP-style sharding: model-state memory, Newton-Schulz time and step breakdown per rank"};
  int64_t layers = 24, d_model = 256, vocab = 1024, batch = 4, seq = 128;
  int steps = 3;
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--d-model", d_model)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  app.add_option("--batch", batch, "sequences per rank")->capture_default_str();
  app.add_option("--seq-len", seq)->capture_default_str();
  app.add_option("--steps", steps)->capture_default_str();
  std::string checkpointing = "both";
  app.add_option("--checkpointing", checkpointing, "activation checkpointing: none, full or both (compared)")
      ->check(CLI::IsMember({"none", "full", "both"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);
  const dist::World& w = dist::world();
  auto timed = std::make_shared<TimedComm>(dist::make_mpi_comm());
  std::shared_ptr<dist::Comm> comm = timed;

  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.d_model = d_model;
  cfg.n_layer = layers;
  cfg.vocab_size = vocab;
  const bool sharded = w.size > 1;
  CpuMemory& mem = CpuMemory::install();
  at::Tensor tokens = at::randint(vocab, {batch, seq + 1}, at::kLong);

  // One configuration's steps: the model whole (one rank) or sharded, the hybrid optimizer.
  struct Figures {
    double fwd = 0, bwd = 0, opt = 0, comm = 0;
    int64_t states = 0, gathered = 0, activations = 0;  // bytes: model state, whole units' peak, after forward
  };
  std::vector<NamedTensor> params;
  std::unique_ptr<dist::FsdpMamba> fsdp;
  auto measure = [&](ActivationCheckpointing ckpt) {
    MambaLM model(cfg.padded(), 0);
    model.set_activation_checkpointing(ckpt);
    fsdp.reset();
    if (sharded) {
      dist::FsdpOptions o;
      o.activation_checkpointing = ckpt;
      fsdp = std::make_unique<dist::FsdpMamba>(model, comm, o);
      params = fsdp->local_parameters();
    } else {
      params = model.named_parameters();
      for (auto& p : params) p.tensor.requires_grad_(true);
    }
    optim::HybridOptimizer opt(params, optim::HybridConfig{}, sharded ? fsdp->whole_shapes() : std::vector<std::vector<int64_t>>{});
    if (sharded) {
      std::vector<dist::ShardLayout> muon_layouts;
      for (size_t i = 0; i < params.size(); ++i)
        if (optim::group_of(params[i].name, static_cast<int64_t>(fsdp->layout(i).shape.size())).muon)
          muon_layouts.push_back(fsdp->layout(i));
      opt.muon().set_orthogonalize(dist::sharded_orthogonalize(comm, muon_layouts, 5));
    }
    Figures f;
    dist::FsdpMamba::reset_gathered_peak();
    for (int s = 0; s <= steps; ++s) {  // step 0 warms up
      for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
      timed->seconds = 0;
      const int64_t held = mem.bytes();
      double t0 = wall_now();
      at::Tensor logits = sharded ? fsdp->forward(tokens.narrow(1, 0, seq)) : model.forward(tokens.narrow(1, 0, seq));
      at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), tokens.narrow(1, 1, seq).reshape({-1}));
      double t1 = wall_now();
      f.activations = std::max(f.activations, mem.bytes() - held);
      loss.backward();
      double t2 = wall_now();
      opt.step(0.02, 3e-3);
      double t3 = wall_now();
      if (s == 0) continue;
      f.fwd += (t1 - t0) / steps, f.bwd += (t2 - t1) / steps, f.opt += (t3 - t2) / steps, f.comm += timed->seconds / steps;
      f.states = std::max(f.states, bytes(params) * 2 + bytes(opt.state()));  // params, grads, states
    }
    f.gathered = dist::FsdpMamba::gathered_peak() * 4;
    return f;
  };
  std::vector<ActivationCheckpointing> modes;
  if (checkpointing != "full") modes.push_back(ActivationCheckpointing::none);
  if (checkpointing != "none") modes.push_back(ActivationCheckpointing::full);
  std::vector<Figures> figures;
  for (ActivationCheckpointing m : modes) figures.push_back(measure(m));
  const Figures& first = figures.front();
  const int64_t peak_states = first.states;
  // Newton-Schulz CPU time of one optimizer step's orthogonalizations on this rank, spread over
  // the ranks as the sharded optimizer spreads them (N = 1: all of them, here).
  std::vector<size_t> slots;
  std::vector<at::Tensor> updates;
  std::vector<dist::ShardLayout> layouts;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::vector<int64_t> shape = sharded ? fsdp->layout(i).shape : params[i].tensor.sizes().vec();
    if (!optim::group_of(params[i].name, static_cast<int64_t>(shape.size())).muon) continue;
    layouts.emplace_back(shape, w.size);
    slots.push_back(slots.size());
    at::Generator gen = at::detail::createCPUGenerator(slots.size());
    updates.push_back(layouts.back().slice(at::randn(shape, gen), w.rank));
  }
  auto ortho = dist::sharded_orthogonalize(comm, layouts, 5);
  // The matrices this rank orthogonalizes (its own ones) are recorded, then timed alone: CPU time
  // inside collectives is spin-waiting, not Newton-Schulz work.
  std::vector<at::Tensor> owned;
  optim::observe_newton_schulz([&](const at::Tensor& m) { owned.push_back(m.clone()); });
  ortho(slots, updates);
  optim::observe_newton_schulz({});
  const double c0 = cpu_now();
  for (const auto& m : owned) optim::newton_schulz(m, 5);
  const double ns_cpu = cpu_now() - c0;
  const int64_t gathered = first.gathered;
  const int64_t total = peak_states + gathered;
  // Every rank's figures, printed by rank 0.
  at::Tensor mine = at::tensor({static_cast<double>(total), ns_cpu}, at::kDouble);
  at::Tensor all = at::empty({w.size * 2}, at::kDouble);
  comm->all_gather(mine, all);
  if (w.root()) {
    double max_mem = 0, max_ns = 0;
    for (int r = 0; r < w.size; ++r) {
      max_mem = std::max(max_mem, all[r * 2].item<double>());
      max_ns = std::max(max_ns, all[r * 2 + 1].item<double>());
    }
    fmt::print("ranks {} | model {} layers x d_model {} ({:.1f}M parameters), {} x {} tokens per rank | max per rank: "
               "model-state memory {:.1f} MB (of it whole units {:.1f} MB), Newton-Schulz CPU {:.3f} s\n",
               w.size, layers, d_model, static_cast<double>(cfg.padded().num_parameters()) / 1e6, batch, seq,
               max_mem / 1e6, gathered / 1e6, max_ns);
    for (size_t k = 0; k < modes.size(); ++k) {
      const Figures& f = figures[k];
      fmt::print("  activation checkpointing {}: rank 0 step {:.3f} s (forward {:.3f} s, backward {:.3f} s, optimizer "
                 "{:.3f} s, in collectives {:.3f} s); activations after forward {:.1f} MB\n",
                 to_string(modes[k]), f.fwd + f.bwd + f.opt, f.fwd, f.bwd, f.opt, f.comm, f.activations / 1e6);
    }
    if (figures.size() == 2) {
      const double none = figures[0].fwd + figures[0].bwd, full = figures[1].fwd + figures[1].bwd;
      fmt::print("  forward+backward: recompute (full) / none = {:.2f} (no recompute saves {:.1f}%); activations "
                 "full / none = {:.3f}\n",
                 full / none, 100 * (1 - none / full),
                 static_cast<double>(figures[1].activations) / static_cast<double>(figures[0].activations));
    }
  }
  return 0;
}
