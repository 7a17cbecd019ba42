#include "model/generate.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "model/mamba.h"
#include "util/error.h"

namespace coil {

at::Tensor filter_probs(const at::Tensor& probs, int64_t top_k, double top_p) {
  COIL_CHECK(probs.dim() == 1, "filter_probs takes one distribution [V], got {} dims", probs.dim());
  COIL_CHECK(top_p > 0 && top_p <= 1, "top-p must be in (0, 1], got {}", top_p);
  COIL_CHECK(top_k >= 0, "top-k must be >= 0 (0: all tokens), got {}", top_k);
  // A stable sort by decreasing probability: ties keep index order, so the cut is deterministic.
  auto [sorted, order] = probs.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
  at::Tensor keep = at::ones_like(sorted, at::kBool);
  if (top_k > 0 && top_k < sorted.size(0)) keep.narrow(0, top_k, sorted.size(0) - top_k).fill_(false);
  if (top_p < 1) {
    // The mass before each token (exclusive cumulative sum); a token stays while it is < top_p.
    const at::Tensor before = sorted.to(at::kDouble).cumsum(0) - sorted.to(at::kDouble);
    keep &= before.lt(top_p);
  }
  at::Tensor kept = sorted * keep;
  at::Tensor out = at::zeros_like(probs);
  out.index_put_({order}, kept / kept.sum());
  return out;
}

at::Tensor sample_next(const at::Tensor& logits, int64_t vocab, const SamplingOptions& s, at::Generator& gen) {
  COIL_CHECK(logits.dim() == 2 && vocab > 0 && vocab <= logits.size(1),
             "sample_next: logits must be [B, V] with V >= vocab = {}, got {} dims", vocab, logits.dim());
  const at::Tensor l = logits.narrow(1, 0, vocab).to(at::kFloat);
  if (s.temperature <= 0) return l.argmax(1);
  const at::Tensor probs = at::softmax(l / s.temperature, 1);
  at::Tensor next = at::empty({l.size(0)}, at::kLong);
  for (int64_t b = 0; b < l.size(0); ++b) {
    const at::Tensor p = s.top_k > 0 || s.top_p < 1 ? filter_probs(probs[b], s.top_k, s.top_p) : probs[b];
    next[b] = at::multinomial(p, 1, false, gen).item<int64_t>();
  }
  return next;
}

std::vector<std::vector<int32_t>> generate(const MambaLM& model, const GenerateRequest& r,
                                           const std::function<void(size_t, int32_t)>& on_token) {
  c10::NoGradGuard no_grad;
  const size_t n = r.prompts.size();
  COIL_CHECK(r.vocab > 0 && r.vocab <= model.config().vocab_size, "generate: vocab must be in [1, {}], got {}",
             model.config().vocab_size, r.vocab);
  std::vector<std::vector<int32_t>> out(n);
  if (n == 0 || r.max_new_tokens <= 0) return out;
  // The model's device computes; sampling runs on the CPU (its generator), so that a seed gives the
  // same text on any device, and the batch's bookkeeping reads the tokens there.
  at::Generator gen = at::detail::createCPUGenerator(r.seed);
  const at::Device device = model.embedding.device();

  // Prefill: each prompt alone (prompts differ in length, and Mamba has no padding mask), then
  // the caches are stacked into one batch.
  MambaCache cache;
  std::vector<at::Tensor> logits_rows;
  std::vector<MambaCache> caches(n);
  for (size_t i = 0; i < n; ++i) {
    COIL_CHECK(!r.prompts[i].empty(), "generate: prompt {} is empty", i + 1);
    for (int32_t t : r.prompts[i])
      COIL_CHECK(t >= 0 && t < model.config().vocab_size, "generate: prompt {} holds token {}, outside [0, {})", i + 1,
                 t, model.config().vocab_size);
    const at::Tensor ids =
        at::tensor(std::vector<int64_t>(r.prompts[i].begin(), r.prompts[i].end()), at::kLong).to(device);
    logits_rows.push_back(model.prefill(ids.unsqueeze(0), caches[i]));
  }
  for (size_t l = 0; l < caches[0].conv.size(); ++l) {
    std::vector<at::Tensor> conv, ssm;
    for (auto& c : caches) conv.push_back(c.conv[l]), ssm.push_back(c.ssm[l]);
    cache.conv.push_back(at::cat(conv, 0));
    cache.ssm.push_back(at::cat(ssm, 0));
  }
  caches.clear();
  at::Tensor logits = at::cat(logits_rows, 0);  // [n, V]

  // Decode: `active` maps the rows of the batch to prompts; finished rows leave the batch.
  std::vector<int64_t> active(n);
  for (size_t i = 0; i < n; ++i) active[i] = static_cast<int64_t>(i);
  for (int64_t t = 0; t < r.max_new_tokens && !active.empty(); ++t) {
    const at::Tensor next = sample_next(logits.to(at::kCPU), r.vocab, r.sampling, gen);  // [B] on the CPU
    const auto* ids = next.data_ptr<int64_t>();
    std::vector<int64_t> keep;
    for (size_t row = 0; row < active.size(); ++row) {
      const auto token = static_cast<int32_t>(ids[row]);
      if (token == r.eos) continue;
      out[static_cast<size_t>(active[row])].push_back(token);
      if (on_token) on_token(static_cast<size_t>(active[row]), token);
      keep.push_back(static_cast<int64_t>(row));
    }
    if (t + 1 == r.max_new_tokens || keep.empty()) break;
    at::Tensor tokens = next;
    if (keep.size() < active.size()) {  // drop finished sequences from the batch and its state
      const at::Tensor rows = at::tensor(keep, at::kLong);
      const at::Tensor on_device = rows.to(device);
      for (auto& c : cache.conv) c = c.index_select(0, on_device);
      for (auto& s : cache.ssm) s = s.index_select(0, on_device);
      tokens = next.index_select(0, rows);
      std::vector<int64_t> still;
      for (int64_t row : keep) still.push_back(active[static_cast<size_t>(row)]);
      active = std::move(still);
    }
    logits = model.step(tokens.to(device), cache);
  }
  return out;
}

}  // namespace coil
