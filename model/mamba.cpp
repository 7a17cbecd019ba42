#include "model/mamba.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <torch/types.h>

#include <cmath>

#include "model/conv1d.h"
#include "model/head_loss.h"
#include "model/linear_cpu.h"
#include "model/selective_scan.h"
#include "model/seq_idx.h"
#include "util/error.h"

#if defined(COIL_WITH_CUDA)
#include "model/norm_cuda.h"
#endif

namespace coil {

using torch::Tensor;

namespace {

// The residual stream, norms, logits and loss are computed in float32, or wider (float64 checks).
at::ScalarType wide(at::ScalarType t) { return at::promote_types(t, torch::kFloat); }

// Hugging Face names of a block's weights, in the order named_parameters() lists them.
const char* const kBlockNames[] = {"norm.weight",         "mixer.in_proj.weight",  "mixer.conv1d.weight",
                                   "mixer.conv1d.bias",   "mixer.x_proj.weight",   "mixer.dt_proj.weight",
                                   "mixer.dt_proj.bias",  "mixer.A_log",           "mixer.D",
                                   "mixer.out_proj.weight"};

// Handles to a block's weights (sharing their storage), in kBlockNames' order.
std::vector<Tensor> block_tensors(const MambaBlockWeights& w) {
  return {w.norm, w.in_proj, w.conv_w, w.conv_b, w.x_proj, w.dt_w, w.dt_b, w.A_log, w.D, w.out_proj};
}

}  // namespace

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const Tensor xf = x.to(wide(x.scalar_type()));
  return weight * (xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps));
}

#if defined(COIL_WITH_CUDA)
namespace {
namespace kernels = norm_cuda;
#include "model/norm_cuda_call.inc"
}  // namespace
#endif

Tensor add_rms_norm_(Tensor& h, const Tensor& delta, const Tensor& weight, double eps) {
  COIL_CHECK(h.dim() == 2 && (!delta.defined() || delta.sizes() == h.sizes()) && weight.numel() == h.size(1),
             "add_rms_norm_: h [B, H], delta as h and weight [H], got {}, {} and {}", c10::str(h.sizes()),
             delta.defined() ? c10::str(delta.sizes()) : std::string("none"), c10::str(weight.sizes()));
#if defined(COIL_WITH_CUDA)
  const bool grad = at::GradMode::is_enabled() && (h.requires_grad() || weight.requires_grad() ||
                                                   (delta.defined() && delta.requires_grad()));
  if (!grad && h.is_cuda() && h.scalar_type() == torch::kFloat && h.is_contiguous() && weight.device() == h.device() &&
      (!delta.defined() || (delta.device() == h.device() && delta.scalar_type() == torch::kFloat)))
    return add_rms_norm_cuda(h, delta, weight, eps);
#endif
  if (delta.defined()) h.add_(delta);
  return rms_norm(h, weight, eps);
}

Tensor lm_loss(const Tensor& logits, const Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(wide(logits.scalar_type())), targets.reshape({-1}),
                                {}, at::Reduction::Mean, -100);
}

MambaLM::MambaLM(const MambaConfig& config, uint64_t seed) : config_(config) {
  config_.validate();
  const int64_t H = config_.d_model, I = config_.d_inner(), N = config_.d_state, R = config_.rank(),
                K = config_.d_conv, V = config_.vocab_size;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  embedding = torch::empty({V, H}, f32);
  norm_f = torch::empty({H}, f32);
  layers.resize(config_.n_layer);
  for (auto& w : layers) {
    w.norm = torch::empty({H}, f32);
    w.in_proj = torch::empty({2 * I, H}, f32);
    w.conv_w = torch::empty({I, 1, K}, f32);
    w.conv_b = torch::empty({I}, f32);
    w.x_proj = torch::empty({R + 2 * N, I}, f32);
    w.dt_w = torch::empty({I, R}, f32);
    w.dt_b = torch::empty({I}, f32);
    w.A_log = torch::empty({I, N}, f32);
    w.D = torch::empty({I}, f32);
    w.out_proj = torch::empty({H, I}, f32);
  }
  init(seed);
}

void MambaLM::init(uint64_t seed) {
  torch::NoGradGuard no_grad;
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const MambaConfig& c = config_;
  const int64_t I = c.d_inner(), N = c.d_state, R = c.rank();
  // nn.Linear's and nn.Conv1d's default: kaiming_uniform(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  auto kaiming = [&](Tensor& t, int64_t fan_in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    t.uniform_(-bound, bound, gen);
  };
  embedding.normal_(0.0, 0.02, gen);
  norm_f.fill_(1.0);
  for (auto& w : layers) {
    w.norm.fill_(1.0);
    kaiming(w.in_proj, c.d_model);
    kaiming(w.conv_w, c.d_conv);
    kaiming(w.conv_b, c.d_conv);
    kaiming(w.x_proj, I);
    // dt_proj: weight ~ U(-R^-1/2, R^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
    const double std_dt = 1.0 / std::sqrt(static_cast<double>(R));
    w.dt_w.uniform_(-std_dt, std_dt, gen);
    Tensor dt = torch::exp(torch::rand({I}, gen, torch::kFloat) * (std::log(c.dt_max) - std::log(c.dt_min)) +
                           std::log(c.dt_min))
                    .clamp_min(c.dt_init_floor);
    w.dt_b.copy_(dt + torch::log(-torch::expm1(-dt)));
    // S4D-real: A = -(1..N) for every channel, stored as its log; D = 1.
    w.A_log.copy_(torch::log(torch::arange(1, N + 1, torch::kFloat)).repeat({I, 1}));
    w.D.fill_(1.0);
    // out_proj: the Linear default, divided by sqrt(n_layer) (one residual branch per block).
    kaiming(w.out_proj, I);
    w.out_proj.div_(std::sqrt(static_cast<double>(c.n_layer)));
  }
}

std::vector<NamedTensor> MambaLM::named_parameters() const {
  std::vector<NamedTensor> out{{"backbone.embeddings.weight", embedding}};
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto ts = block_tensors(layers[i]);
    for (size_t k = 0; k < ts.size(); ++k)
      out.push_back({"backbone.layers." + std::to_string(i) + "." + kBlockNames[k], ts[k]});
  }
  out.push_back({"backbone.norm_f.weight", norm_f});
  return out;
}

Tensor MambaLM::parameter(const std::string& name) const {
  for (auto& p : named_parameters())
    if (p.name == name) return p.tensor;
  fail("model has no parameter named '{}'", name);
}

Tensor MambaLM::embed(const Tensor& tokens) const { return embed(embedding, tokens); }

Tensor MambaLM::head(const Tensor& hidden) const { return head(embedding, norm_f, config_, hidden); }

Tensor MambaLM::embed(const Tensor& embedding, const Tensor& tokens) {
  COIL_CHECK(tokens.dim() == 2, "model input must be token ids [B, L], got {} dims", tokens.dim());
  return torch::embedding(embedding, tokens).to(wide(embedding.scalar_type()));
}

Tensor MambaLM::head(const Tensor& embedding, const Tensor& norm_f, const MambaConfig& config, const Tensor& hidden) {
  const Tensor logits = torch::linear(rms_norm(hidden, norm_f, config.rms_eps).to(embedding.scalar_type()), embedding);
  return logits.to(wide(logits.scalar_type()));
}

Tensor MambaLM::head_loss(const Tensor& embedding, const Tensor& norm_f, const MambaConfig& config,
                          const Tensor& hidden, const Tensor& targets) {
  COIL_CHECK(targets.sizes() == hidden.sizes().slice(0, hidden.dim() - 1),
             "the loss's targets have shape {}, expected the hidden states' {} without the last", c10::str(targets.sizes()),
             c10::str(hidden.sizes()));
  const Tensor normed = rms_norm(hidden, norm_f, config.rms_eps).to(embedding.scalar_type());
  return fused_linear_cross_entropy(normed.reshape({-1, hidden.size(-1)}), embedding, targets.reshape({-1}));
}

MambaBlockWeights MambaLM::block_weights(const std::vector<Tensor>& t) {
  COIL_CHECK(t.size() == 10, "a Mamba block has 10 tensors, got {}", t.size());
  return {t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9]};
}

Tensor MambaLM::block(const MambaBlockWeights& w, const MambaConfig& c, const Tensor& hidden,
                      Tensor* conv_state, Tensor* ssm_state, const Tensor& seq_idx) {
  const int64_t I = c.d_inner(), N = c.d_state, R = c.rank(), K = c.d_conv;
  // The norm in float32 (or wider), its output in in_proj's dtype (the compute dtype).
  const Tensor x = rms_norm(hidden, w.norm, c.rms_eps).to(w.in_proj.scalar_type());
  const Tensor xz = torch::linear(x, w.in_proj);  // [B, L, 2I]: the SSM input and the gate
  const Tensor xs = xz.narrow(2, 0, I), z = xz.narrow(2, I, I);
  const Tensor u = torch::silu(causal_conv1d(xs, w.conv_w, w.conv_b, seq_idx));  // [B, L, I]
  const Tensor x_dbl = torch::linear(u, w.x_proj);                      // [B, L, R + 2N]
  const Tensor dt = torch::linear(x_dbl.narrow(2, 0, R), w.dt_w);       // bias and softplus: in the scan
  const Tensor Bm = x_dbl.narrow(2, R, N), Cm = x_dbl.narrow(2, R + N, N);
  // A, D and the dt bias in float32 (keeps_float32); u, dt, B, C, z in the compute dtype.
  const Tensor y = selective_scan(u, dt, -torch::exp(w.A_log.to(wide(w.A_log.scalar_type()))), Bm, Cm, w.D, z, w.dt_b,
                                  true, ssm_state, seq_idx);
  if (conv_state) {  // the last K-1 conv inputs, zero-padded in front for short prompts
    const int64_t L = xs.size(1), keep = std::min(L, K - 1);
    Tensor s = torch::zeros({xs.size(0), K - 1, I}, xs.options());
    s.narrow(1, K - 1 - keep, keep).copy_(xs.narrow(1, L - keep, keep));
    *conv_state = s;
  }
  return hidden + torch::linear(y.to(w.out_proj.scalar_type()), w.out_proj);  // the residual stays float32
}

Tensor MambaLM::forward(const Tensor& tokens) const { return forward(tokens, embedding.scalar_type()); }

bool MambaLM::keeps_float32(const std::string& name) {
  auto ends = [&](const std::string& tail) {
    return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  return ends("norm.weight") || ends("norm_f.weight") || ends("mixer.A_log") || ends("mixer.D") ||
         ends("mixer.dt_proj.bias");
}

Tensor MambaLM::forward(const Tensor& tokens, at::ScalarType compute) const { return forward(tokens, compute, {}); }

Tensor MambaLM::forward(const Tensor& tokens, const Tensor& seq_idx) const {
  return forward(tokens, embedding.scalar_type(), seq_idx);
}

Tensor MambaLM::forward(const Tensor& tokens, at::ScalarType compute, const Tensor& seq_idx) const {
  // Once here, not per layer (on CUDA the order check is a sync: model/seq_idx.h).
  if (seq_idx.defined()) check_seq_idx(seq_idx, tokens.size(0), tokens.size(-1), "MambaLM::forward", true);
  const Tensor emb = embedding.to(compute);  // a no-op in the weights' own dtype
  return head(emb, norm_f, config_, trunk(tokens, emb, compute, seq_idx));
}

Tensor MambaLM::loss_sum(const Tensor& tokens, at::ScalarType compute, const Tensor& seq_idx,
                         const Tensor& targets) const {
  if (seq_idx.defined()) check_seq_idx(seq_idx, tokens.size(0), tokens.size(-1), "MambaLM::loss_sum", true);
  const Tensor emb = embedding.to(compute);
  return head_loss(emb, norm_f, config_, trunk(tokens, emb, compute, seq_idx), targets);
}

Tensor MambaLM::trunk(const Tensor& tokens, const Tensor& emb, at::ScalarType compute, const Tensor& seq_idx) const {
  Tensor h = embed(emb, tokens);
  for (size_t l = 0; l < layers.size(); ++l) h = run_block(l, h, compute, seq_idx);
  return h;
}

Tensor MambaLM::run_block(size_t l, const Tensor& h, at::ScalarType compute, const Tensor& seq_idx) const {
  const MambaConfig cfg = config_;
  // inputs: the residual stream, then the block's 10 weights as stored; the casts happen inside.
  // seq_idx (not differentiable) is captured, so the recompute of a checkpointed block sees it too.
  auto f = [cfg, compute, seq_idx](const std::vector<Tensor>& in) {
    std::vector<Tensor> w(in.begin() + 1, in.end());
    for (size_t k = 0; k < w.size(); ++k)
      if (!keeps_float32(kBlockNames[k])) w[k] = w[k].to(compute);
    return block(block_weights(w), cfg, in[0], nullptr, nullptr, seq_idx);
  };
  std::vector<Tensor> inputs{h};
  for (const Tensor& t : block_tensors(layers[l])) inputs.push_back(t);
  return checkpointing_ == ActivationCheckpointing::full ? checkpointed(f, inputs) : f(inputs);
}

void MambaLM::to(const at::Device& device) {
  torch::NoGradGuard no_grad;
  embedding = embedding.to(device);
  norm_f = norm_f.to(device);
  for (auto& w : layers)
    for (Tensor* t : {&w.norm, &w.in_proj, &w.conv_w, &w.conv_b, &w.x_proj, &w.dt_w, &w.dt_b, &w.A_log, &w.D, &w.out_proj})
      *t = t->to(device);
}

void MambaLM::store_matrices(at::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters())
    if (!keeps_float32(p.name) && p.tensor.dim() == 2) p.tensor.set_data(p.tensor.to(dtype));
}

MambaCache MambaLM::new_cache(int64_t batch) const {
  MambaCache cache;
  for (int64_t l = 0; l < config_.n_layer; ++l) {
    const auto options = torch::TensorOptions().dtype(wide(norm_f.scalar_type())).device(norm_f.device());
    cache.conv.push_back(torch::zeros({batch, config_.d_conv - 1, config_.d_inner()}, options));
    cache.ssm.push_back(torch::zeros({batch, config_.d_inner(), config_.d_state}, options));
  }
  return cache;
}

Tensor MambaLM::prefill(const Tensor& tokens, MambaCache& cache) const {
  torch::NoGradGuard no_grad;
  cache = new_cache(tokens.size(0));
  Tensor h = embed(tokens);
  for (size_t l = 0; l < layers.size(); ++l) {
    // Matrices stored narrower than float32 (store_matrices) widened for the layer's compute.
    std::vector<Tensor> w = block_tensors(layers[l]);
    for (Tensor& t : w) t = t.to(wide(t.scalar_type()));
    h = block(block_weights(w), config_, h, &cache.conv[l], &cache.ssm[l]);
  }
  Tensor last = h.select(1, -1).contiguous();  // only the last position's logits: the next token's
  return decode_head(add_rms_norm_(last, {}, norm_f, config_.rms_eps));
}

// The tied head for a few positions as a matrix-vector product per sequence (model/linear_cpu.h),
// in float32 whatever dtype the embedding is stored in.
Tensor MambaLM::decode_head(const Tensor& normed) const { return decode_linear(normed, embedding); }

// One token through every block (as Hugging Face's cached path), the conv and the scan advanced by
// one step, their states updated in place (fused kernels on the CPU and on CUDA in float32, LibTorch
// ops elsewhere):
//   window = [conv state, x_t];  u = silu(<w, window> + b);  h = exp(dt A) h + dt u B;  y = <h, C> + D u
Tensor MambaLM::step(const Tensor& token, MambaCache& cache) const {
  torch::NoGradGuard no_grad;
  COIL_CHECK(token.dim() == 1, "step takes one token per sequence [B], got {} dims", token.dim());
  const MambaConfig& c = config_;
  const int64_t I = c.d_inner(), N = c.d_state, R = c.rank();
  // The residual stream h [B, H], a fresh tensor; each block's output is added to it in place by
  // the next norm (add_rms_norm_).
  Tensor h = torch::embedding(embedding, token).to(wide(embedding.scalar_type())).contiguous(), out;
  for (size_t l = 0; l < layers.size(); ++l) {
    const MambaBlockWeights& w = layers[l];
    const Tensor xz = decode_linear(add_rms_norm_(h, out, w.norm, c.rms_eps), w.in_proj);
    const Tensor xs = xz.narrow(1, 0, I), z = xz.narrow(1, I, I);
    // u [B, I], the SiLU applied in the conv step; the state slides.
    const Tensor u = causal_conv1d_step(xs, cache.conv[l], w.conv_w, w.conv_b, /*silu=*/true);
    const Tensor x_dbl = decode_linear(u, w.x_proj);
    const Tensor dt = decode_linear(x_dbl.narrow(1, 0, R), w.dt_w);  // [B, I]; bias and softplus: in the step
    const Tensor Bm = x_dbl.narrow(1, R, N), Cm = x_dbl.narrow(1, R + N, N);
    if (cache.A.size() <= l) cache.A.push_back(-torch::exp(w.A_log));
    const Tensor y = selective_scan_step(u, dt, cache.A[l], Bm, Cm, w.D, z, w.dt_b, true, cache.ssm[l]);
    out = decode_linear(y, w.out_proj);
  }
  return decode_head(add_rms_norm_(h, out, norm_f, c.rms_eps));
}

}  // namespace coil
