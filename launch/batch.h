// A micro batch on its way from the loader to the model: token ids as model inputs and shifted
// targets (-100 where the loss mask is off), on the training device, and the number of targets
// that count, from the host-side mask (no device sync to learn it). On CUDA the host tensors are
// built in pinned (page-locked) memory and copied with non_blocking, so the copy runs on the
// stream without stalling the host (the caching host allocator keeps a pinned block until the
// copy that reads it is done); on CPU they are plain tensors, used in place.
// Also the batch fingerprint of metrics.jsonl ("batch_hash") and the summed cross-entropy.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include "data/loader.h"

namespace coil {

struct DeviceBatch {
  at::Tensor inputs;   // [B, L-1] int64
  at::Tensor targets;  // [B, L-1] int64, -100 where the mask is off
  // [B, L-1] int32: the document number of each input position (the Batch's seq_idx without its
  // last column, data/loader.h), for the model's state resets; undefined when the batch has none.
  at::Tensor seq_idx;
  int64_t count = 0;   // targets that count
};

// The loader's batch on `device` (pinned and non-blocking when it is a GPU).
DeviceBatch to_device(const data::Batch& b, at::Device device);

// Targets that count in a loader batch: every shifted position, or the mask's ones past the first
// column (each target is the next token).
int64_t target_count(const data::Batch& b);

// A fingerprint of a global batch, the same whatever the number of ranks, so that a log shows
// which data each step saw. Each row gets a 64-bit hash of its global index in the batch, its
// tokens and its loss mask (splitmix64's finalizer as the mixer); the batch's hash is the sum
// over rows of each 32-bit half (mod 2^32), so each rank adds up its own rows and one all-reduce
// of doubles completes it (exact while a batch has < 2^21 rows).
void add_row_hashes(const data::Batch& b, int64_t first_global_row, double& low, double& high);
uint64_t batch_hash(double low_sum, double high_sum);

// The model's summed cross-entropy of token ids against targets (-100: not counted), with the rows'
// document numbers (DeviceBatch::seq_idx): MambaLM::loss_sum, whole or sharded (the head fused
// with the loss: no logits).
using LossSum = std::function<at::Tensor(const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets)>;

// Sum of the cross-entropy over the targets that count (a device scalar: no host sync).
at::Tensor loss_sum(const LossSum& model, const DeviceBatch& b);

}  // namespace coil
