// The LM head and its cross-entropy in one pass over the vocabulary, a chunk of tokens at a time,
// without the logits of the whole batch (as Liger-Kernel's fused linear cross-entropy).
//
// The plain way, torch::linear then cross_entropy, keeps [T, V] logits (float32, and a 16-bit copy
// in mixed precision), the [T, V] log-softmax autograd saves for backward, and in backward a [T, V]
// gradient: with a 50k vocabulary ~0.5 MB per token, more than everything else a Mamba-130m step
// keeps when its blocks are checkpointed. Here the forward takes `chunk` rows at a time: their
// logits (float32 at least), log-sum-exp and loss, and, when a gradient is wanted, at once their
// softmax minus the one-hot target, and from it the rows' input gradient and their share of the
// weight gradient (the two products backward would do). So nothing [T, V] exists, no matmul runs
// twice, and backward only scales the two stored gradients by the loss's incoming gradient (the
// loss scale and the 1 / count of a mean). Stored: the input gradient [T, H] and the weight
// gradient [V, H] in float32, the sizes of the gradients backward returns anyway, scaled there in
// place (so one backward only: a second, with retain_graph, is an error). Rows whose
// target does not count (-100: an SFT prompt, padding) are, by default, left out of the products
// on CPU (their loss and input gradient are zero) and computed and masked on CUDA, where finding
// them would be a device sync.
//
// The matrix products compute in the inputs' dtype (bfloat16 weights: bfloat16 products) and the
// softmax in float32 (float64 for float64 inputs), as the plain way does; only the order of the
// weight gradient's sum over tokens differs (chunk by chunk), so the results agree to rounding.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace coil {

// Sum over the rows of x [T, H] of cross_entropy(x W^T, targets) for W [V, H] and targets [T]
// int64 in [0, V), -100 for a row that does not count (the SFT mask). Returns a float32 scalar
// (float64 for float64 inputs), differentiable in x and W when gradient mode is on and either
// requires a gradient. chunk: rows per pass, 0 = as many as keep a pass's logits near 2^24
// elements (64 MiB in float32). skip_uncounted: leave the rows that do not count out of the
// products (default: on CPU) or mask them.
at::Tensor fused_linear_cross_entropy(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets,
                                      int64_t chunk = 0, std::optional<bool> skip_uncounted = std::nullopt);

// The plain reference: torch::linear, then cross_entropy (sum, ignore_index -100), by autograd.
at::Tensor linear_cross_entropy_ref(const at::Tensor& x, const at::Tensor& W, const at::Tensor& targets);

}  // namespace coil
