#include "launch/parallel.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <functional>
#include <mutex>

#include "dist/world.h"
#include "model/activation_checkpointing.h"
#include "util/error.h"

namespace coil {

at::Device pick_device(const std::string& setting, int local_rank, int local_size, int gpus, std::string* why) {
  COIL_CHECK(setting == "cpu" || setting == "cuda" || setting == "auto",
             "train.device must be \"auto\", \"cpu\" or \"cuda\", not \"{}\"", setting);
  COIL_CHECK(setting != "cuda" || gpus > 0,
             "train.device = \"cuda\": CUDA is not available here (no GPU visible, no driver, or a LibTorch without CUDA)");
  COIL_CHECK(setting != "cuda" || local_size <= gpus,
             "train.device = \"cuda\": {} ranks on this node and {} GPU(s) visible (each rank needs a GPU of its own: "
             "start one rank per GPU, or set CUDA_VISIBLE_DEVICES)",
             local_size, gpus);
  if (setting == "cpu") return at::kCPU;
  if (setting == "auto" && gpus == 0) {
    if (why) *why = "auto: no GPU visible";  // none, no driver, or a LibTorch without CUDA
    return at::kCPU;
  }
  if (setting == "auto" && local_size > gpus) {
    if (why) *why = fmt::format("auto: {} GPU(s) visible for {} ranks on this node, so the CPU", gpus, local_size);
    return at::kCPU;
  }
  if (why && setting == "auto") *why = fmt::format("auto: {} GPU(s) visible, local rank {}", gpus, local_rank);
  return {at::kCUDA, static_cast<c10::DeviceIndex>(local_rank)};
}

at::Device pick_device(const std::string& setting, int local_rank, int local_size, std::string* why) {
  const int gpus = at::hasCUDA() ? static_cast<int>(at::getNumGPUs()) : 0;
  return pick_device(setting, local_rank, local_size, gpus, why);
}

at::ScalarType compute_dtype(const std::string& setting, const at::Device& device) {
  if (setting == "float32") return at::kFloat;
  if (setting == "bfloat16") return at::kBFloat16;
  COIL_CHECK(setting == "float16", "train.dtype must be \"float32\", \"bfloat16\" or \"float16\", not \"{}\"", setting);
  // float16 matrix products on this device, once, small: a build or device that cannot is named here
  // rather than failing deep in the first forward.
  try {
    const auto o = at::TensorOptions().dtype(at::kHalf).device(device);
    (void)at::linear(at::ones({2, 3}, o), at::ones({4, 3}, o)).sum().item<double>();
  } catch (const std::exception& e) {
    fail("train.dtype = \"float16\": {} cannot multiply float16 matrices here ({})", device.str(),
         std::string(e.what()).substr(0, std::string(e.what()).find('\n')));
  }
  return at::kHalf;
}

void seed_cpu_generator(int64_t seed, int rank) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(static_cast<uint64_t>(seed) + static_cast<uint64_t>(rank));
}

Parallel Parallel::start(const RunConfig& c) {
  Parallel par;
  if (dist::launched_by_mpi()) {
    par.rank = dist::world().rank;
    par.world = dist::world().size;
  }
  par.replicate = static_cast<int>(c.data_parallel_replicate_degree);
  par.shard = c.data_parallel_shard_degree > 0 ? static_cast<int>(c.data_parallel_shard_degree) : par.world / par.replicate;
  COIL_CHECK(par.world % par.replicate == 0 && static_cast<int64_t>(par.shard) * par.replicate == par.world,
             "train.data_parallel_shard_degree ({}) x train.data_parallel_replicate_degree ({}) must equal the world size "
             "({} ranks)",
             c.data_parallel_shard_degree > 0 ? fmt::format("{}", c.data_parallel_shard_degree) : "0: all ranks",
             c.data_parallel_replicate_degree, par.world);
  par.shard_rank = par.rank % par.shard;
  par.replica = par.rank / par.shard;
  seed_cpu_generator(c.seed, par.rank);
  if (c.threads > 0) at::set_num_threads(static_cast<int>(c.threads));
  else if (par.world > 1) at::set_num_threads(dist::cores_per_rank());
  const bool mpi = dist::launched_by_mpi();
  par.device = pick_device(c.device, mpi ? dist::world().local_rank : 0, mpi ? dist::world().local_size : 1, &par.device_why);
  par.compute = compute_dtype(c.dtype, par.device);
  return par;
}

namespace {
// Under mpirun or srun every rank must run the same configuration.
void check_same_config(dist::Comm& comm, int rank, int world, const std::string& config_text) {
  at::Tensor mine = at::tensor({static_cast<int64_t>(std::hash<std::string>{}(config_text) >> 1)}, at::kLong);
  at::Tensor all = at::empty({world}, at::kLong);
  comm.all_gather(mine, all);
  for (int r = 0; r < world; ++r)
    COIL_CHECK(all[r].item<int64_t>() == mine.item<int64_t>(),
               "rank {} runs another configuration than rank {} (the resolved configs differ: same --config and "
               "--set on every rank?)",
               rank, r);
}
}  // namespace

void Parallel::place(MambaLM& m, const RunConfig& c, const std::string& config_text) {
  model = &m;
  if (world > 1) {
    comm = dist::make_mpi_comm();
    check_same_config(*comm, rank, world, config_text);
    // HSDP: the shard group (color: the replica) and the replicate group (color: the position).
    const bool hybrid = replicate > 1;
    if (device.is_cuda()) data_comm = dist::make_nccl_comm(hybrid ? replica : -1);
    else data_comm = hybrid ? std::shared_ptr<dist::Comm>(dist::make_mpi_comm(replica)) : comm;
    if (hybrid) replicate_comm = device.is_cuda() ? dist::make_nccl_comm(shard_rank) : dist::make_mpi_comm(shard_rank);
    dist::FsdpOptions fo;
    fo.reshard_after_forward = c.reshard_after_forward;
    fo.compute_dtype = compute;
    fo.reduce_dtype = c.reduce_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    fo.overlap = c.overlap_comm;
    fo.device = device;
    fo.activation_checkpointing = parse_activation_checkpointing(c.activation_checkpointing, "train.activation_checkpointing");
    fo.replicate = replicate_comm;
    fsdp = std::make_unique<dist::FsdpMamba>(m, data_comm, fo);
    params = fsdp->local_parameters();
  } else {
    m.to(device);
    m.set_activation_checkpointing(parse_activation_checkpointing(c.activation_checkpointing, "train.activation_checkpointing"));
    params = m.named_parameters();
    for (auto& p : params) p.tensor.requires_grad_(true);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    index[params[i].name] = i;
    layouts.push_back(fsdp ? fsdp->layout(i) : dist::ShardLayout(params[i].tensor.sizes().vec(), 1));
  }
}

std::unique_ptr<optim::HybridOptimizer> Parallel::make_optimizer(const RunConfig& c) const {
  optim::HybridConfig hc;
  hc.use_muon = c.use_muon;
  hc.adamw = {c.adam_beta1, c.adam_beta2, c.adam_eps, c.weight_decay};
  hc.muon = {c.muon_momentum, c.muon_nesterov, static_cast<int>(c.muon_ns_steps), c.weight_decay, c.muon_scale};
  auto opt = std::make_unique<optim::HybridOptimizer>(params, hc, shapes());
  if (fsdp) {
    std::vector<dist::ShardLayout> muon_layouts;
    for (size_t i = 0; i < params.size(); ++i)
      if (hc.use_muon && optim::group_of(params[i].name, static_cast<int64_t>(layouts[i].shape.size())).muon)
        muon_layouts.push_back(layouts[i]);
    opt->muon().set_orthogonalize(dist::sharded_orthogonalize(data_comm, muon_layouts, hc.muon.ns_steps));
  }
  return opt;
}

at::Tensor Parallel::loss_sum(const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets) {
  const at::Tensor t = tokens.to(device), y = targets.to(device);
  const at::Tensor s = seq_idx.defined() ? seq_idx.to(device) : seq_idx;
  return fsdp ? fsdp->loss_sum(t, s, y) : model->loss_sum(t, compute, s, y);
}

void Parallel::finish_step() {
  if (fsdp) fsdp->finish_step();
}

std::vector<double> Parallel::sum(std::vector<double> v) const {
  if (!comm) return v;
  at::Tensor t = at::tensor(v, at::kDouble);
  comm->all_reduce(t);
  return {t.data_ptr<double>(), t.data_ptr<double>() + t.numel()};
}

std::vector<std::vector<int64_t>> Parallel::shapes() const {
  if (fsdp) return fsdp->whole_shapes();
  std::vector<std::vector<int64_t>> out;
  for (const auto& p : params) out.push_back(p.tensor.sizes().vec());
  return out;
}

const dist::ShardLayout& Parallel::state_layout(const std::string& state) const {
  const size_t a = state.find('.'), b = state.rfind('.');
  return layout(state.substr(a + 1, b - a - 1));
}

dist::TensorRows Parallel::rows(dist::CheckpointSaver& saver, const std::string& name, const at::Tensor& local,
                                const dist::ShardLayout& l) const {
  COIL_CHECK(local.size(0) == l.rows_per_rank, "{}: {} rows held, the layout says {}", name, local.size(0), l.rows_per_rank);
  // HSDP: replica 0 writes the rows; the other replicas hold the same ones and write none.
  const auto [begin, end] = dist::rank_rows(l.shape[0], rank, world, shard);
  return {name, l.shape, begin, saver.stage(name, local.narrow(0, 0, end - begin))};
}

void Parallel::read(const dist::Checkpoint& ck, const std::string& name, const at::Tensor& local,
                    const dist::ShardLayout& l) const {
  ck.read(name, local, shard_rank * l.rows_per_rank);
}

}  // namespace coil
