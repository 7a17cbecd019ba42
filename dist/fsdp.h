// FSDP-style sharding (ZeRO-3) of a Mamba LM, applied from outside the model: every parameter is
// split on dim 0 across the ranks (rows padded up to a multiple of the number of ranks; rank r
// holds rows [r k, (r + 1) k)). The model runs unit by unit: the embedding/head unit (the tied
// embedding and norm_f) and one unit per block. Before a unit runs, its shards are all-gathered in
// one collective over a flat buffer; after its backward, its gradient is reduce-scattered (summed:
// the loss is already a mean over the whole global batch) into the shards' .grad.
//
// reshard_after_forward = true: a unit's gathered weights are freed after its forward, and the
// unit's forward is run again in backward from its saved input (with the weights gathered again),
// so one unit's weights and activations are whole at a time. false (ZeRO-2): every unit's weights
// are gathered once per step and kept until the step's gradients are reduce-scattered, once per
// step whatever the gradient accumulation (finish_step()).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "dist/comm.h"
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

class FsdpMamba {
 public:
  // Takes this rank's shards of `model` (the same initial model on every rank).
  FsdpMamba(const MambaLM& model, std::shared_ptr<Comm> comm, bool reshard_after_forward = true);
  ~FsdpMamba();

  const MambaConfig& config() const { return config_; }
  // This rank's shards under the parameters' names (leaves: gradients land in their .grad), and
  // the whole shapes, in named_parameters() order: what the optimizer is given.
  const std::vector<NamedTensor>& local_parameters() const { return params_; }
  std::vector<std::vector<int64_t>> whole_shapes() const;
  const ShardLayout& layout(size_t i) const { return layouts_[i]; }
  Comm& comm() { return *comm_; }

  // logits [B, L, V] of this rank's micro batch.
  at::Tensor forward(const at::Tensor& tokens);
  // With reshard_after_forward = false: reduce-scatters the step's gradients (call after the last
  // backward of the step). A no-op otherwise.
  void finish_step();
  // The whole parameters, gathered on every rank (tests compare them with one process's).
  std::vector<NamedTensor> gather_whole() const;

  // Elements of whole (gathered) weights alive now, with the whole gradients and the send buffer
  // of a unit's backward: for memory tests and benchmarks.
  static int64_t gathered_numel();
  static int64_t gathered_peak();  // the most alive at once since reset_gathered_peak()
  static void reset_gathered_peak();

  struct Unit;

 private:
  MambaConfig config_;
  std::shared_ptr<Comm> comm_;
  bool reshard_;
  std::vector<NamedTensor> params_;
  std::vector<ShardLayout> layouts_;
  std::vector<std::unique_ptr<Unit>> units_;
};

// Muon's orthogonalization under sharding: each matrix's momentum update is gathered whole on its
// owner rank (owners chosen so that every rank does about the same Newton-Schulz work), is
// orthogonalized there once, and every rank gets its rows back. layouts: the Muon slots' layouts,
// in the order the optimizer's Muon holds them.
optim::Muon::Orthogonalize sharded_orthogonalize(std::shared_ptr<Comm> comm, std::vector<ShardLayout> layouts,
                                                 int ns_steps);

}  // namespace coil::dist
