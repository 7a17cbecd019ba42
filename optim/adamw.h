// AdamW (Loshchilov and Hutter): Adam with bias correction and decoupled weight decay.
//
// For each parameter p with gradient g, at step t (from 1):
//   m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
//   p = p - lr wd p                         (decoupled: not through the gradient)
//   p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//
// One step runs as a handful of kernels over all tensors together, whatever the device:
//   - float32 CPU tensors: one fused pass of our own (p, g, m, v read and written once, parallel
//     over chunks of all tensors together);
//   - CUDA: LibTorch's fused multi-tensor kernel (at::_fused_adamw_), one launch per (dtype, weight
//     decay) group. Its arithmetic differs from ours only in rounding: it divides sqrt(v) by
//     sqrt(1 - beta2^t) instead of taking sqrt(v / (1 - beta2^t)), so it matches to ~1e-7 relative;
//   - anything else: the reference's ops as _foreach_ ops (adamw_foreach: about 9 ops for all the
//     tensors, multi-tensor kernels on CUDA; on CPU the per-tensor ops themselves, bit for bit the
//     reference).
// adamw_reference() is the same math in plain ATen ops on one tensor (about 9 ops and a temporary
// per tensor), kept for the tests and the benchmark (AdamWKernel::reference selects it).
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

// Which implementation AdamW::step uses: automatic picks by device as above; torch_fused sends
// what LibTorch's kernel cannot take (see adamw_torch_fused) through the foreach ops.
enum class AdamWKernel { automatic, reference, foreach, torch_fused };

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
  void set_kernel(AdamWKernel kernel) { kernel_ = kernel; }

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
  AdamWKernel kernel_ = AdamWKernel::automatic;
};

// One AdamW step on one tensor in ATen ops (t: the step number, from 1).
void adamw_reference(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     double lr, double weight_decay, const AdamWConfig& config, int64_t t);

// The tensors of one AdamW step: parallel lists (exp_avgs, exp_avg_sqs updated in place) and each
// tensor's weight decay.
struct AdamWLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  std::vector<double> weight_decays;
};
// adamw_reference's ops as _foreach_ ops over all the lists' tensors at once.
void adamw_foreach(AdamWLists& lists, double lr, const AdamWConfig& config, int64_t t);
// LibTorch's fused kernel (at::_fused_adamw_, on CPU or CUDA), one call per (device, dtype, weight
// decay): needs floating tensors, each grad of its param's dtype, all contiguous.
void adamw_torch_fused(AdamWLists& lists, double lr, const AdamWConfig& config, int64_t t);

}  // namespace coil::optim
