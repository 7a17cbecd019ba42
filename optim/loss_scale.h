// Dynamic loss scaling, for float16 compute (GPUs without bfloat16: V100, T4). float16 keeps 5
// exponent bits: a gradient below 2^-24 flushes to zero and one above 65504 overflows to inf.
// Multiplying the loss by a scale S before backward moves the small gradients of the float16
// graph into range; the gradients arrive (accumulated in float32 on the master weights) times S
// and are divided by S before the norm is clipped and the optimizer steps. S is a power of two,
// so scaling and unscaling change no bit of a gradient that neither overflowed nor flushed.
// The scale is found as the run goes (Micikevicius et al. 2018, torch.amp.GradScaler's rule):
//   a step whose gradients hold an inf or NaN (an overflow somewhere in the float16 backward) is
//   skipped and S halved; after growth_interval finite steps in a row S doubles.
// S never goes below min_scale (1): an overflow at that scale is not the scaling's doing, and the
// trainer treats it as a non-finite step (train.nan_policy). Disabled (float32, bfloat16 compute):
// S = 1, nothing is scaled and no step is an overflow. The state (S, the run of finite steps) is
// two checkpoint strings, so that a resumed run scales as the uninterrupted one would.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/mamba.h"

namespace coil::optim {

struct LossScaleConfig {
  double init_scale = 65536;  // 2^16 (GradScaler's default)
  double growth_factor = 2, backoff_factor = 0.5;
  int64_t growth_interval = 2000;  // finite steps in a row before the scale grows
  double min_scale = 1;
  void validate() const;  // throws coil::Error naming the bad value
};

class LossScaler {
 public:
  enum class Verdict { kStep, kOverflow, kNonFinite };

  explicit LossScaler(bool enabled, LossScaleConfig config = {});
  bool enabled() const { return enabled_; }
  double scale() const { return scale_; }
  int64_t good_steps() const { return good_steps_; }

  // loss * S, what backward starts from (the loss itself when disabled).
  at::Tensor scale_loss(const at::Tensor& loss) const;
  // The gradient norm of the unscaled gradients from the squared norm of the scaled ones.
  double unscaled_norm(double scaled_sq_norm) const;
  // What to do with a step, from its loss and unscaled gradient norm (over all ranks): take it,
  // skip it as a float16 overflow (S can still back off), or hand it to train.nan_policy.
  Verdict judge(double loss, double grad_norm) const;
  // Divides every gradient by S in place (nothing when S = 1), before clipping.
  void unscale(const std::vector<NamedTensor>& params) const;
  // Ends a step judged kStep (finite: counts toward growth) or kOverflow (halves S).
  void update(Verdict v);

  // Checkpoint strings ("loss_scale", "loss_scale_good_steps"), and back from them; a checkpoint
  // without them (float32, bfloat16, an older run) leaves the initial state.
  std::map<std::string, std::string> state() const;
  void load_state(const std::map<std::string, std::string>& strings);

 private:
  bool enabled_;
  LossScaleConfig config_;
  double scale_;
  int64_t good_steps_ = 0;
};

}  // namespace coil::optim
