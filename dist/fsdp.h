// FSDP-style sharding (ZeRO-3) of a Mamba LM, applied from outside the model: every parameter is
// split on dim 0 across the ranks (rows padded up to a multiple of the number of ranks; rank r
// holds rows [r k, (r + 1) k)). The model runs unit by unit: the embedding/head unit (the tied
// embedding and norm_f) and one unit per block. Before a unit runs, its shards are all-gathered in
// one collective over a flat buffer; after its backward, its gradient is reduce-scattered (summed:
// the loss is already a mean over the whole global batch) into the shards' .grad.
//
// A unit's whole weights are the outputs of one autograd node (GatherFunction): its backward gets
// their gradients together once the unit's backward is done. reshard_after_forward = true (as
// PyTorch's FSDP2): after its forward, the unit's whole weights' storage is freed (0 bytes) while
// the tensors, and the activations autograd saved, stay; a hook on the unit's output gradient
// gathers the weights again into that same storage before the unit's backward, which then runs
// as it would unsharded (no recompute); the gradient node frees them again and reduce-scatters.
// So whole weights are resident for one unit at a time (plus a prefetch), and activations for the
// whole model, as without sharding. The embedding unit is not gathered again: its backward needs
// only the token ids; nor is the head fused with the loss (loss_sum): its forward computed its
// gradients. false (ZeRO-2): every unit's weights are gathered once per step and kept;
// each micro batch's whole gradients are added in float32 into the step's whole gradients (the
// tied embedding's two uses included), reduce-scattered once per step whatever the gradient
// accumulation (finish_step()).
//
// Activation checkpointing (FsdpOptions::activation_checkpointing = full) is its own choice, in
// either mode: each block unit's compute runs under model/activation_checkpointing.h (its input
// and its whole-weight handles kept, the block recomputed in its backward, after the weights are
// gathered again). FsdpStats::unit_forwards counts each unit's forward runs: one per micro batch
// without, two per block with.
//
// Mixed precision (FsdpOptions::compute_dtype = bfloat16, or float16 with the trainer's loss
// scaling): the shards stay float32 (the master
// weights: the optimizer and its state see only them); each gather casts the shard to the compute
// dtype first, so the all-gather moves half the bytes and the unit computes with 16-bit matrices.
// Parameters the model keeps in float32 (MambaLM::keeps_float32: norms, A_log, D, dt_proj.bias)
// are gathered in float32. A unit's mixed dtypes travel in one all-gather, as bytes. The whole
// gradients (in the dtype of the whole weights) are cast to reduce_dtype for the reduce-scatter
// (float32 by default; bfloat16 halves those bytes too, at a rounding per add) and accumulated
// into the float32 shards' .grad.
//
// HSDP (hybrid sharding, FsdpOptions::replicate): `comm` is then this rank's shard group (the
// parameters are split over its ranks only) and `replicate` the group of the ranks at the same
// position in every shard group, each holding the same shards. A unit's reduce-scatter sums over
// the shard group; its result is then all-reduced over the replicate group, shard by shard: every
// replica ends with the sum over all ranks, so every replica takes the same optimizer step.
//
// Overlap (FsdpOptions::overlap, with a Comm whose collectives are asynchronous: NCCL on its own
// stream): while a unit computes, the next unit's all-gather runs (in backward: the unit before);
// a unit's reduce-scatter runs while the unit before it computes its backward, and is finished
// (waited for, accumulated into .grad) at that unit's end or when the backward pass ends (an
// autograd final callback). With MPI on CPU the collectives are synchronous and nothing changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <deque>

#include <memory>
#include <vector>

#include "dist/comm.h"
#include "model/activation_checkpointing.h"
#include "model/mamba.h"
#include "optim/muon.h"

namespace coil::dist {

// How a parameter of `shape` is split over `ranks`.
struct ShardLayout {
  std::vector<int64_t> shape;
  int64_t rows_per_rank = 0;  // ceil(rows / ranks)
  int64_t row_numel = 1;      // elements per row
  int64_t local_numel() const { return rows_per_rank * row_numel; }
  ShardLayout(std::vector<int64_t> shape, int ranks);
  // Rank r's rows of a whole tensor, zero-padded to rows_per_rank.
  at::Tensor slice(const at::Tensor& whole, int rank) const;
  // The whole tensor from every rank's shard, in rank order ([ranks, local_numel] flat).
  at::Tensor assemble(const at::Tensor& per_rank) const;
};

struct FsdpOptions {
  bool reshard_after_forward = true;
  at::ScalarType compute_dtype = at::kFloat;  // of the gathered weights (float32, bfloat16 or float16)
  at::ScalarType reduce_dtype = at::kFloat;   // of the gradient reduce-scatter
  bool overlap = true;                        // prefetch / deferred reduce-scatter, when comm is asynchronous
  c10::Device device = c10::Device(c10::kCPU);  // where the shards live (the comm's device)
  ActivationCheckpointing activation_checkpointing = ActivationCheckpointing::none;  // per block unit
  std::shared_ptr<Comm> replicate;  // HSDP: the replicate group (null or size 1: plain FSDP)
};

// What the collectives of a FsdpMamba moved (bytes: of the whole buffers, this rank's view).
struct FsdpStats {
  int64_t all_gathers = 0, all_gather_bytes = 0;          // bytes received (every rank's part)
  int64_t reduce_scatters = 0, reduce_scatter_bytes = 0;  // bytes of the send buffers
  int64_t all_reduces = 0, all_reduce_bytes = 0;          // HSDP: of the reduced shards, over replicas
  std::vector<int64_t> unit_forwards;  // runs of each unit's function (forward order), recomputes included
};

class FsdpMamba {
 public:
  // Takes this rank's shards of `model` (the same initial model on every rank).
  FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, bool reshard_after_forward = true);
  FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, const FsdpOptions& options);
  ~FsdpMamba();

  const FsdpOptions& options() const { return options_; }
  // The dtype parameter i travels and computes in.
  at::ScalarType gather_dtype(size_t i) const;
  const FsdpStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

  const MambaConfig& config() const { return config_; }
  // This rank's shards under the parameters' names (leaves: gradients land in their .grad), and
  // the whole shapes, in named_parameters() order: what the optimizer is given.
  const std::vector<NamedTensor>& local_parameters() const { return params_; }
  std::vector<std::vector<int64_t>> whole_shapes() const;
  const ShardLayout& layout(size_t i) const { return layouts_[i]; }
  Comm& comm() { return *comm_; }

  // logits [B, L, V] of this rank's micro batch.
  // seq_idx: the document number of each position ([B, L] int32, model/mamba.h), or undefined (one
  // document per row). It stays with the sharded model until the next forward, for the blocks that
  // are recomputed in backward (activation checkpointing).
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& seq_idx = {});
  // The summed cross-entropy against targets [B, L] (-100: not counted) instead of the logits, the
  // head unit fused with the loss (MambaLM::head_loss): no [B, L, V] tensor, and in ZeRO-3 the
  // head's weights (the tied embedding, the largest unit) are not gathered again for backward.
  at::Tensor loss_sum(const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets);
  // With reshard_after_forward = false: reduce-scatters the step's gradients (call after the last
  // backward of the step). A no-op otherwise.
  void finish_step();
  // The whole parameters (the float32 master weights), gathered on every rank (tests compare them
  // with one process's).
  std::vector<NamedTensor> gather_whole();

  // Elements of whole (gathered) weights resident now, with the whole gradients and the send
  // buffer of a unit's backward (ZeRO-2: the step's whole gradients): for memory tests and
  // benchmarks.
  static int64_t gathered_numel();
  static int64_t gathered_peak();  // the most alive at once since reset_gathered_peak()
  static void reset_gathered_peak();

  struct Unit;
  struct PendingReduce;
  struct WholeWeights;

  // Used by the units' autograd node and hooks.
  void prefetch(size_t unit);  // queues unit's all-gather (overlap only)
  void before_unit_backward(size_t unit, WholeWeights* whole);
  void after_unit_backward(size_t unit, WholeWeights& whole, const std::vector<at::Tensor>& whole_grads);
  void reduce_scatter(size_t unit, const std::vector<at::Tensor>& whole_grads);
  void finish_reduces();  // waits for the queued reduce-scatters and accumulates them into .grad
  void finish_reduces_when_backward_ends();  // once per backward pass: an autograd final callback

 private:
  at::Tensor run_unit(Unit& unit, const at::Tensor& x, const at::Tensor& seq_idx);
  bool overlapping() const;
  void accumulate(size_t param, const at::Tensor& grad);
  void drop_prefetches();

  MambaConfig config_;
  std::shared_ptr<Comm> comm_;
  FsdpOptions options_;
  std::vector<NamedTensor> params_;
  std::vector<ShardLayout> layouts_;
  std::vector<std::unique_ptr<Unit>> units_;
  std::deque<std::unique_ptr<PendingReduce>> reduces_;
  std::vector<at::Tensor> accum_;  // ZeRO-2: the step's whole gradients, float32, by parameter
  at::Tensor targets_;  // loss_sum's, for the head unit (undefined in forward: logits)
  bool flush_queued_ = false;  // a final callback of the running backward will finish_reduces()
  FsdpStats stats_;
};

// Muon's orthogonalization under sharding: each matrix's momentum update is gathered whole on its
// owner rank (owners chosen so that every rank does about the same Newton-Schulz work), is
// orthogonalized there once, and every rank gets its rows back. layouts: the Muon slots' layouts,
// in the order the optimizer's Muon holds them.
optim::Muon::Orthogonalize sharded_orthogonalize(std::shared_ptr<Comm> comm, std::vector<ShardLayout> layouts,
                                                 int ns_steps);

}  // namespace coil::dist
