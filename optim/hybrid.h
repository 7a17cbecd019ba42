// The hybrid optimizer of Coil's Mamba runs: Muon for the 2-D weight matrices of the blocks
// (in_proj, x_proj, out_proj), AdamW for everything else (the embedding, which is also the tied
// head, the norms, conv1d, dt_proj's weight and bias, A_log, D). No weight decay on A_log, D, the
// norms and the biases. Plus the global gradient-norm clipping both share: the norm in one pass
// (_foreach_norm in float64 over every gradient, then one sum: one host sync), the clipping one
// _foreach_mul_; the per-tensor versions stay as references.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/mamba.h"
#include "optim/adamw.h"
#include "optim/muon.h"

namespace coil::optim {

struct Grouping {
  bool muon;   // else AdamW
  bool decay;  // weight decay applies
};

// The group of a parameter, from its Hugging Face name and shape.
Grouping group_of(const std::string& name, int64_t dim);

// The table printed at the start of a run: parameter, shape, optimizer, weight decay.
std::string grouping_table(const std::vector<NamedTensor>& params);

struct HybridConfig {
  AdamWConfig adamw;
  MuonConfig muon;
  bool use_muon = true;  // false: AdamW for every parameter (the baseline)
};

class HybridOptimizer {
 public:
  // params: what to update (whole tensors, or local shards with their whole shapes in `shapes`).
  HybridOptimizer(const std::vector<NamedTensor>& params, const HybridConfig& config,
                  const std::vector<std::vector<int64_t>>& shapes = {});
  void step(double lr_muon, double lr_adamw);
  Muon& muon() { return muon_; }
  AdamW& adamw() { return adamw_; }
  std::vector<NamedTensor> state() const;  // "muon.<name>.momentum", "adamw.<name>.exp_avg", ...
  void load_state(const std::vector<NamedTensor>& tensors, int64_t steps);
  int64_t steps() const { return adamw_.steps(); }

 private:
  HybridConfig config_;
  Muon muon_;
  AdamW adamw_;
};

// Sum of squares of the gradients (float64), to be summed across ranks before the sqrt: one host
// sync. grad_sq_norm_tensor: the same as a 0-dim float64 tensor on the gradients' device (no sync;
// zeros on CPU without gradients).
double grad_sq_norm(const std::vector<NamedTensor>& params);
at::Tensor grad_sq_norm_tensor(const std::vector<NamedTensor>& params);
// Scales every gradient by min(1, max_norm / norm) (max_norm <= 0: no clipping); returns nothing.
void clip_grads(const std::vector<NamedTensor>& params, double norm, double max_norm);

// The per-tensor versions (a float64 copy and a host sync per gradient), for tests and benchmarks.
double grad_sq_norm_reference(const std::vector<NamedTensor>& params);
void clip_grads_reference(const std::vector<NamedTensor>& params, double norm, double max_norm);

}  // namespace coil::optim
