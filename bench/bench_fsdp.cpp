// FSDP-style sharding, measured per rank under mpirun (run it for N = 1, 2, 4):
//   model-state memory: local parameters + gradients + optimizer state + the peak of whole
//     (gathered) unit weights, gradients and buffers; target <= 1.15 x (N = 1 value) / N;
//   Newton-Schulz CPU time (this rank's share of Muon's orthogonalizations); target
//     <= 1.3 x (N = 1 value) / N;
//   a step's breakdown: forward, backward, optimizer, and the time inside collectives.
// CPU times are per thread (one LibTorch thread per rank), so ranks sharing cores still measure
// their own work. A deep, narrow model, so that its states (not activations) dominate.
//   mpirun -np N bench_fsdp [--layers 24] [--d-model 256] [--vocab 1024] [--steps 3]
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
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);
  const dist::World& w = dist::world();
  auto timed = std::make_shared<TimedComm>(dist::make_mpi_comm());
  std::shared_ptr<dist::Comm> comm = timed;

  MambaConfig cfg = MambaConfig::preset("tiny");
  cfg.d_model = d_model;
  cfg.n_layer = layers;
  cfg.vocab_size = vocab;
  MambaLM model(cfg.padded(), 0);
  const bool sharded = w.size > 1;
  std::unique_ptr<dist::FsdpMamba> fsdp;
  std::vector<NamedTensor> params;
  if (sharded) {
    fsdp = std::make_unique<dist::FsdpMamba>(model, comm, true);
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
  at::Tensor tokens = at::randint(vocab, {batch, seq + 1}, at::kLong);
  double t_fwd = 0, t_bwd = 0, t_opt = 0, t_comm = 0;
  int64_t peak_states = 0;
  dist::FsdpMamba::reset_gathered_peak();
  for (int s = 0; s <= steps; ++s) {  // step 0 warms up
    for (auto& p : params) p.tensor.mutable_grad() = at::Tensor();
    timed->seconds = 0;
    double t0 = wall_now();
    at::Tensor logits = sharded ? fsdp->forward(tokens.narrow(1, 0, seq)) : model.forward(tokens.narrow(1, 0, seq));
    at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), tokens.narrow(1, 1, seq).reshape({-1}));
    double t1 = wall_now();
    loss.backward();
    double t2 = wall_now();
    opt.step(0.02, 3e-3);
    double t3 = wall_now();
    if (s == 0) continue;
    t_fwd += t1 - t0, t_bwd += t2 - t1, t_opt += t3 - t2, t_comm += timed->seconds;
    peak_states = std::max(peak_states, bytes(params) * 2 + bytes(opt.state()));  // params, grads, states
  }
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
  const int64_t gathered = dist::FsdpMamba::gathered_peak() * 4;
  const int64_t total = peak_states + gathered;
  // Every rank's figures, printed by rank 0.
  at::Tensor mine = at::tensor({static_cast<double>(total), ns_cpu, t_fwd / steps, t_bwd / steps, t_opt / steps,
                                t_comm / steps},
                               at::kDouble);
  at::Tensor all = at::empty({w.size * 6}, at::kDouble);
  comm->all_gather(mine, all);
  if (w.root()) {
    double max_mem = 0, max_ns = 0;
    for (int r = 0; r < w.size; ++r) {
      max_mem = std::max(max_mem, all[r * 6].item<double>());
      max_ns = std::max(max_ns, all[r * 6 + 1].item<double>());
    }
    fmt::print("ranks {} | model {} layers x d_model {} ({:.1f}M parameters) | max per rank: model-state memory "
               "{:.1f} MB (of it whole units {:.1f} MB), Newton-Schulz CPU {:.3f} s | rank 0 step: forward {:.3f} s, "
               "backward {:.3f} s, optimizer {:.3f} s, in collectives {:.3f} s\n",
               w.size, layers, d_model, static_cast<double>(cfg.padded().num_parameters()) / 1e6, max_mem / 1e6,
               gathered / 1e6, max_ns, all[2].item<double>(), all[3].item<double>(), all[4].item<double>(),
               all[5].item<double>());
  }
  return 0;
}
