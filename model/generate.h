// Text generation with Mamba's recurrent state: each prompt is run once through the full forward
// (prefill), then every sequence of the batch advances one token per step from its conv and SSM
// states. The cost of a token does not grow with the context (no KV cache: the state has a fixed
// size), and sequences that reach EOS leave the batch.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace coil {

class MambaLM;

struct SamplingOptions {
  double temperature = 0;  // 0: greedy (argmax; deterministic)
  int64_t top_k = 0;       // > 0: only the k most likely tokens
  double top_p = 1.0;      // < 1: only the most likely tokens whose probabilities sum to p (nucleus)
};

// probs [V] (sums to 1) restricted to the top-k tokens and then to the nucleus of mass top_p:
// the most likely tokens, in order, until the mass *before* a token reaches top_p (so the most
// likely token always stays). Renormalized. Ties at the cut are broken by index.
at::Tensor filter_probs(const at::Tensor& probs, int64_t top_k, double top_p);

// The next token of each row of logits [B, V'] from its first `vocab` columns (padding rows of the
// embedding are never produced) -> [B] int64.
at::Tensor sample_next(const at::Tensor& logits, int64_t vocab, const SamplingOptions& sampling, at::Generator& gen);

struct GenerateRequest {
  std::vector<std::vector<int32_t>> prompts;  // token ids, each non-empty
  int64_t max_new_tokens = 128;
  int64_t vocab = 0;  // tokens that may be produced: [0, vocab)
  int32_t eos = -1;   // a sequence ends when it produces this token (not returned); -1: never
  SamplingOptions sampling;
  uint64_t seed = 0;
};

// The tokens generated for each prompt. on_token(i, token) is called as soon as prompt i's next
// token is known (for streaming). A sequence's tokens do not depend on the other prompts of the
// batch when decoding greedily. The model computes on its device (MambaLM::to: on the CPU with the
// fused decoding kernels, elsewhere with LibTorch ops); the next tokens are chosen on the CPU, so a
// seed gives the same choices from the same logits on any device.
std::vector<std::vector<int32_t>> generate(const MambaLM& model, const GenerateRequest& request,
                                           const std::function<void(size_t, int32_t)>& on_token = {});

}  // namespace coil
