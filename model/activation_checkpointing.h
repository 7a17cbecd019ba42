// Activation checkpointing: a function run without keeping what its backward needs, and run again
// in backward to get it back (as torch.utils.checkpoint, non-reentrant in effect: the recompute runs
// inside this node's backward, its gradients taken with autograd::grad). It trades one more forward
// of the function for the activations inside it: only its inputs are saved.
//
// It is a model-agnostic component, applied per block: MambaLM::set_activation_checkpointing for a
// whole model on one process, and the FSDP units (dist/fsdp.h) around their compute. The function
// must be deterministic (Mamba has no dropout), so the recompute gives the forward's values again.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace coil {

// train.activation_checkpointing: "none" keeps every activation; "full" recomputes each block.
enum class ActivationCheckpointing { none, full };

// "none" or "full"; anything else is a coil::Error naming `what` (the key or flag it came from).
ActivationCheckpointing parse_activation_checkpointing(const std::string& value, const std::string& what);
const char* to_string(ActivationCheckpointing mode);

using CheckpointedFunction = std::function<at::Tensor(const std::vector<at::Tensor>& inputs)>;

// f(inputs), keeping only `inputs` for backward, where f runs again with gradients on. Without
// gradient mode, or when no input requires a gradient, this is just f(inputs). Tensors that f
// captures instead of taking them as inputs get no gradient.
at::Tensor checkpointed(const CheckpointedFunction& f, const std::vector<at::Tensor>& inputs);

}  // namespace coil
