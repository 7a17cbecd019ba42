// The Mamba-1 language model, numerically the model of mamba_ssm and Hugging Face transformers'
// MambaForCausalLM: the same parameter names and shapes (so weights move both ways with no renaming
// table), RMSNorm, a residual stream in float32, the LM head tied to the embedding, and mamba_ssm's
// initialization.
//
// The model is plain data plus functions: the forward runs unit by unit (embed, block 0..n-1, head),
// each unit a function of its weights, so a parallelism wrapper (FSDP-style sharding, later) can
// gather a unit's weights and call the same function from outside, without the model knowing.
//
// Packed sequences: forward and block take an optional seq_idx [B, L] int32 (document numbers,
// non-decreasing per row); the mixer passes it to the causal conv and the selective scan, which
// restart at each document (model/conv1d.h, model/selective_scan.h); forward checks it once
// (model/seq_idx.h). Decoding (prefill, step)
// takes none: generation starts from a zero state, and the recurrent step needs no boundaries.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/activation_checkpointing.h"
#include "model/config.h"

namespace coil {

// One block's weights; Hugging Face names below `backbone.layers.{i}.`.
struct MambaBlockWeights {
  at::Tensor norm;      // norm.weight              [H]
  at::Tensor in_proj;   // mixer.in_proj.weight     [2I, H]
  at::Tensor conv_w;    // mixer.conv1d.weight      [I, 1, K]
  at::Tensor conv_b;    // mixer.conv1d.bias        [I]
  at::Tensor x_proj;    // mixer.x_proj.weight      [R + 2N, I]
  at::Tensor dt_w;      // mixer.dt_proj.weight     [I, R]
  at::Tensor dt_b;      // mixer.dt_proj.bias       [I]
  at::Tensor A_log;     // mixer.A_log              [I, N]
  at::Tensor D;         // mixer.D                  [I]
  at::Tensor out_proj;  // mixer.out_proj.weight    [H, I]
};

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

// Per-layer recurrent state for decoding: Mamba's fixed-size replacement of a KV cache.
struct MambaCache {
  std::vector<at::Tensor> conv;  // [B, K-1, I]: the last K-1 conv inputs (channels last)
  std::vector<at::Tensor> ssm;   // [B, I, N]:   the SSM state after the last token
  std::vector<at::Tensor> A;     // [I, N]: -exp(A_log) per layer, computed by the first step (the
                                 // weights do not change while decoding)
};

class MambaLM {
 public:
  // Allocates every parameter (float32, CPU) and initializes it as mamba_ssm does, from `seed`.
  explicit MambaLM(const MambaConfig& config, uint64_t seed = 0);

  const MambaConfig& config() const { return config_; }

  // mamba_ssm's initialization; the same seed gives the same weights.
  void init(uint64_t seed);

  // Every parameter under its Hugging Face name, in a fixed order; the tensors alias the model's.
  // The tied head is listed once, as backbone.embeddings.weight.
  std::vector<NamedTensor> named_parameters() const;
  at::Tensor parameter(const std::string& name) const;  // throws coil::Error for an unknown name

  // tokens [B, L] (int64) -> logits [B, L, V] in float32.
  at::Tensor forward(const at::Tensor& tokens) const;
  // The same with the weights cast to `compute` (bfloat16: mixed precision) except those that
  // keeps_float32() names; the casts are differentiable, so the gradients reach the float32
  // parameters in float32. The residual stream, norms, scan state, logits and loss stay float32.
  at::Tensor forward(const at::Tensor& tokens, at::ScalarType compute) const;
  // Packed rows: seq_idx [B, L] int32, each position's document number, non-decreasing within a
  // row (model/selective_scan.h). Every block's conv and scan restart at each document start, so
  // each document gets the logits (and gradients) it would get alone. Undefined: the forwards above.
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& seq_idx) const;
  at::Tensor forward(const at::Tensor& tokens, at::ScalarType compute, const at::Tensor& seq_idx) const;
  // The summed cross-entropy of the logits forward() would give against targets [B, L] (int64,
  // -100 where a position does not count), without the logits: the head and the loss in one pass
  // a chunk of tokens at a time (model/head_loss.h). What training and evaluation call.
  at::Tensor loss_sum(const at::Tensor& tokens, at::ScalarType compute, const at::Tensor& seq_idx,
                      const at::Tensor& targets) const;
  // Parameters the model uses in float32 whatever the compute dtype (mamba_ssm keeps them so):
  // the RMSNorm gains, A_log, D and dt_proj.bias. The matrices (embedding, in_proj, conv1d,
  // x_proj, dt_proj.weight, out_proj) compute in the dtype they are given.
  static bool keeps_float32(const std::string& name);

  // full: each block of forward() keeps only its input and recomputes its activations in backward
  // (model/activation_checkpointing.h); the casts to the compute dtype are inside the recompute.
  void set_activation_checkpointing(ActivationCheckpointing mode) { checkpointing_ = mode; }
  ActivationCheckpointing activation_checkpointing() const { return checkpointing_; }

  // Moves every parameter to `device` (init() runs on CPU, so that a seed gives the same model).
  void to(const at::Device& device);
  // Stores the 2-D matrices (embedding, in_proj, x_proj, dt_proj.weight, out_proj: 99.3% of the
  // bytes at 130m) in `dtype`, for decoding: in bfloat16 a decoding step reads half the bytes.
  // prefill and step still compute in float32, on the rounded values (widened as they are read).
  void store_matrices(at::ScalarType dtype);

  // The units of the forward pass, as members and as functions of their weights (for wrappers
  // that hold the weights themselves, such as FSDP-style sharding).
  at::Tensor embed(const at::Tensor& tokens) const;  // -> residual stream [B, L, H], float32
  at::Tensor head(const at::Tensor& hidden) const;   // norm_f, then the tied LM head -> logits
  static at::Tensor embed(const at::Tensor& embedding, const at::Tensor& tokens);
  static at::Tensor head(const at::Tensor& embedding, const at::Tensor& norm_f, const MambaConfig& config,
                         const at::Tensor& hidden);
  // head() and the summed cross-entropy against targets [B, L] in one, fused (model/head_loss.h).
  static at::Tensor head_loss(const at::Tensor& embedding, const at::Tensor& norm_f, const MambaConfig& config,
                              const at::Tensor& hidden, const at::Tensor& targets);
  // A block's weights from its 10 tensors in named_parameters() order. Mixed dtypes work: the
  // matrices set the compute dtype (in_proj's; the embedding's in the head).
  static MambaBlockWeights block_weights(const std::vector<at::Tensor>& tensors);
  static at::Tensor block(const MambaBlockWeights& w, const MambaConfig& config, const at::Tensor& hidden,
                          at::Tensor* conv_state = nullptr, at::Tensor* ssm_state = nullptr,
                          const at::Tensor& seq_idx = {});

  // Decoding. prefill runs the prompts [B, L] through the full forward, fills the cache and returns
  // the logits of the last position [B, V]; step feeds one token per sequence ([B]) and returns its
  // logits [B, V]. Stepping gives the same logits as the full forward over the same tokens. Both
  // compute in float32 (or float64 for a float64 model) whatever dtype the matrices are stored in.
  MambaCache new_cache(int64_t batch) const;
  at::Tensor prefill(const at::Tensor& tokens, MambaCache& cache) const;
  at::Tensor step(const at::Tensor& token, MambaCache& cache) const;

  at::Tensor embedding;  // backbone.embeddings.weight [V, H] (also the LM head)
  at::Tensor norm_f;     // backbone.norm_f.weight [H]
  std::vector<MambaBlockWeights> layers;

 private:
  at::Tensor decode_head(const at::Tensor& normed) const;  // normed [B, H] -> float32 logits [B, V]
  // Embedding and blocks: the residual stream before the head (emb: the embedding in `compute`).
  at::Tensor trunk(const at::Tensor& tokens, const at::Tensor& emb, at::ScalarType compute, const at::Tensor& seq_idx) const;
  // Block l on the residual stream h, its matrices cast to `compute`, checkpointed or not.
  at::Tensor run_block(size_t l, const at::Tensor& h, at::ScalarType compute, const at::Tensor& seq_idx) const;

  MambaConfig config_;
  ActivationCheckpointing checkpointing_ = ActivationCheckpointing::none;
};

// RMSNorm as Hugging Face's MambaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Decoding's residual add and norm: h += delta (in place; delta may be undefined: no add), then
// rms_norm(h, weight, eps). h and delta are [B, H]. On CUDA with float32 h (contiguous) and delta
// and no gradient wanted, one kernel (model/norm_cuda.h) instead of seven LibTorch ops; elsewhere
// those ops.
at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight, double eps);

// Mean cross-entropy of logits [B, L, V] against targets [B, L]; targets equal to -100 are ignored
// (the SFT loss mask writes -100 there, as Hugging Face does).
at::Tensor lm_loss(const at::Tensor& logits, const at::Tensor& targets);

}  // namespace coil
