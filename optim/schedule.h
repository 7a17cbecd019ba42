// Learning-rate schedules, as a factor of the peak lr at each step (steps count from 0):
//   cosine: linear warmup over warmup_steps (factor (s + 1) / warmup), then a half cosine from 1
//           down to min_lr_ratio at total_steps - 1, and min_lr_ratio after.
//   wsd:    warmup-stable-decay: the same warmup, 1 until the last decay_fraction of the steps,
//           then linear down to min_lr_ratio at total_steps - 1.
//   constant: the warmup, then 1.
#pragma once

#include <cstdint>
#include <string>

namespace coil::optim {

struct Schedule {
  std::string kind = "cosine";  // cosine, wsd or constant
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.1;
  double decay_fraction = 0.2;  // wsd only
  void validate() const;        // throws coil::Error naming the bad optim.* key
  double factor(int64_t step) const;
};

}  // namespace coil::optim
