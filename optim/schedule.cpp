#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "util/error.h"

namespace coil::optim {

void Schedule::validate() const {
  COIL_CHECK(kind == "cosine" || kind == "wsd" || kind == "constant",
             "optim.schedule must be cosine, wsd or constant, not '{}'", kind);
  COIL_CHECK(total_steps >= 1, "the run has {} steps; it needs at least 1", total_steps);
  COIL_CHECK(warmup_steps >= 0, "optim.warmup_steps must be >= 0, not {}", warmup_steps);
  // launch/config.cpp checks this against train.max_steps; with train.train_by_epochs the steps
  // are derived from the data, and this is where it is checked (still before the first step).
  COIL_CHECK(warmup_steps <= total_steps, "optim.warmup_steps ({}) must be <= the run's steps ({})", warmup_steps,
             total_steps);
  COIL_CHECK(min_lr_ratio >= 0 && min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1], not {}", min_lr_ratio);
  COIL_CHECK(decay_fraction > 0 && decay_fraction <= 1, "optim.decay_fraction must be in (0, 1], not {}", decay_fraction);
}

double Schedule::factor(int64_t step) const {
  if (step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (kind == "constant") return 1.0;
  const int64_t last = total_steps - 1;
  if (kind == "cosine") {
    if (last <= warmup_steps) return 1.0;
    const double p = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(last - warmup_steps));
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + std::cos(M_PI * p));
  }
  // wsd: the decay covers the last decay_fraction of all steps (never the warmup).
  const int64_t decay_steps = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(decay_fraction * total_steps)));
  const int64_t decay_start = std::max(warmup_steps, last - decay_steps);
  if (step <= decay_start) return 1.0;
  if (step >= last) return min_lr_ratio;
  const double p = static_cast<double>(step - decay_start) / static_cast<double>(last - decay_start);
  return 1 - (1 - min_lr_ratio) * p;
}

}  // namespace coil::optim
