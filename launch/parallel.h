// How a training run lays the model over its processes, apart from the loop (torchtitan's
// `parallelize`): the ranks (one process, or the ranks of an MPI run), the device of each rank
// (train.device: "auto" takes the GPU of the rank's local index when one is visible, else the
// CPU), the compute dtype, the communicators (MPI for sums and checkpoints; NCCL for the model's
// collectives on CUDA), and the model itself: whole on one process, or sharded FSDP-style. The
// loop is the same either way: it calls forward, sums doubles over the ranks, and saves / reads
// each rank's rows of every tensor through the layouts kept here.
//
// HSDP (train.data_parallel_shard_degree S x train.data_parallel_replicate_degree R = the world):
// the shard groups are consecutive ranks (rank = replica * S + shard position: within a node when
// S divides the ranks per node), the replicate groups the ranks of one position in every shard
// group. The model's collectives run in the shard group (data_comm), the gradients' all-reduce in
// the replicate group; Muon's owners are ranks of the shard group (each replica computes the same
// update). The data loader still splits the batch over all ranks (rank, world). A checkpoint holds
// each row once: replica 0 writes its shards' rows, the ranks of other replicas write no rows of any
// tensor (each rank still writes its own generator and loader state).
//
// Seeds: the model's initialization and the data order take train.seed themselves; LibTorch's
// default CPU generator (saved in each checkpoint as /rng/cpu, restored on resume) is seeded here
// with train.seed + rank, since LibTorch seeds it at random otherwise and two identical runs
// would then write different checkpoints.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dist/checkpoint.h"
#include "dist/comm.h"
#include "dist/fsdp.h"
#include "launch/config.h"
#include "model/mamba.h"
#include "optim/hybrid.h"

namespace coil {

// The device a rank trains on: train.device "cpu", "cuda" or "auto". On CUDA each rank of a node
// takes its own GPU (local_rank), as NCCL needs: "cuda" is an error without a GPU or with fewer GPUs
// than ranks on the node; "auto" takes CUDA when there is a GPU for every rank of the node, else the
// CPU. `gpus`: the GPUs visible to this process. `why` (optional) says how "auto" decided, for the
// start-up line.
at::Device pick_device(const std::string& setting, int local_rank, int local_size, int gpus, std::string* why = nullptr);
// The same with the GPUs LibTorch sees here.
at::Device pick_device(const std::string& setting, int local_rank, int local_size, std::string* why = nullptr);

// train.dtype as a compute dtype; an error names the key, or the device that cannot compute in it.
at::ScalarType compute_dtype(const std::string& setting, const at::Device& device);

// LibTorch's default CPU generator seeded with seed + rank (each rank its own stream).
void seed_cpu_generator(int64_t seed, int rank);

struct Parallel {
  int rank = 0, world = 1;
  int shard = 1, replicate = 1;           // HSDP degrees (shard x replicate = world); FSDP: shard = world
  int shard_rank = 0, replica = 0;        // this rank's position in its shard group, and its group
  std::shared_ptr<dist::Comm> comm;       // null on one process; MPI (CPU tensors): sums, checkpoints
  std::shared_ptr<dist::Comm> data_comm;  // the model's collectives (the shard group): MPI on CPU, NCCL on CUDA
  std::shared_ptr<dist::Comm> replicate_comm;  // HSDP: the gradients' all-reduce over replicas (null otherwise)
  at::Device device = at::kCPU;
  std::string device_why;                 // how train.device = "auto" chose (empty otherwise)
  at::ScalarType compute = at::kFloat;
  std::unique_ptr<dist::FsdpMamba> fsdp;
  MambaLM* model = nullptr;
  std::vector<NamedTensor> params;        // what the optimizer updates: whole tensors or this rank's shards
  std::map<std::string, size_t> index;    // parameter name -> position
  std::vector<dist::ShardLayout> layouts; // how each parameter is split over the ranks (one rank: whole)

  // Ranks, threads, device and compute dtype from the configuration (before the model exists);
  // seeds the CPU generator (seed_cpu_generator).
  static Parallel start(const RunConfig& c);
  // Puts the model on the ranks: the communicators (checking that every rank runs config_text),
  // then FSDP shards or the whole model on this rank's device.
  void place(MambaLM& m, const RunConfig& c, const std::string& config_text);
  // The optimizer over params (Muon's matrices orthogonalized whole, each on one owner rank).
  std::unique_ptr<optim::HybridOptimizer> make_optimizer(const RunConfig& c) const;

  bool root() const { return rank == 0; }
  // What this rank adds to a sum over all ranks of a quantity each replica holds alike (the
  // squared gradient norm of its shards): 1 / replicate.
  double replica_weight() const { return 1.0 / replicate; }
  // The summed cross-entropy against targets (MambaLM::loss_sum); seq_idx: document numbers for the
  // state resets of packed rows (undefined: none).
  at::Tensor loss_sum(const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets);
  void finish_step();
  std::vector<double> sum(std::vector<double> v) const;  // over the ranks (itself on one process)
  std::vector<std::vector<int64_t>> shapes() const;      // the whole shapes of params

  const dist::ShardLayout& layout(const std::string& param) const { return layouts[index.at(param)]; }
  // The layout of an optimizer state tensor ("muon.<param>.momentum", "adamw.<param>.exp_avg").
  const dist::ShardLayout& state_layout(const std::string& state) const;
  // This rank's rows of a tensor it holds (its shard, or the whole tensor), as a host copy.
  dist::TensorRows rows(dist::CheckpointSaver& saver, const std::string& name, const at::Tensor& local,
                        const dist::ShardLayout& l) const;
  // Reads this rank's rows of a checkpoint tensor into `local`.
  void read(const dist::Checkpoint& ck, const std::string& name, const at::Tensor& local, const dist::ShardLayout& l) const;
};

}  // namespace coil
