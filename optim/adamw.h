// AdamW (Loshchilov and Hutter): Adam with bias correction and decoupled weight decay.
//
// For each parameter p with gradient g, at step t (from 1):
//   m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
//   p = p - lr wd p                         (decoupled: not through the gradient)
//   p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
// The update of float32 CPU tensors runs as one fused pass over all of them (p, g, m, v read and
// written once, parallel over chunks of all tensors together); adamw_reference() beside it is the
// same math in plain ATen ops, used on other devices and by the tests.
//
// The optimizer updates whatever tensors it is given: whole parameters on one process, local
// shards under FSDP-style sharding.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/mamba.h"  // NamedTensor

namespace coil::optim {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  explicit AdamW(const AdamWConfig& config) : config_(config) {}
  // Registers a parameter (its .grad() is read at each step); decay: apply weight decay to it.
  void add(const std::string& name, const at::Tensor& param, bool decay);
  // One step at learning rate lr for every parameter with a gradient.
  void step(double lr);
  int64_t steps() const { return step_; }

  // Moment buffers as "<name>.exp_avg" / "<name>.exp_avg_sq", for checkpoints; load_state
  // copies them back (and the step count).
  std::vector<NamedTensor> state() const;
  void load_state(const std::vector<NamedTensor>& tensors, int64_t steps);

 private:
  struct Slot {
    std::string name;
    at::Tensor param, exp_avg, exp_avg_sq;
    bool decay;
  };
  AdamWConfig config_;
  std::vector<Slot> slots_;
  int64_t step_ = 0;
};

// One AdamW step on one tensor in ATen ops (t: the step number, from 1).
void adamw_reference(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     double lr, double weight_decay, const AdamWConfig& config, int64_t t);

}  // namespace coil::optim
