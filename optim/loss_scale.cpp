#include "optim/loss_scale.h"

#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include <cmath>

#include "util/error.h"

namespace coil::optim {

namespace {
bool power_of_two(double x) {
  int e = 0;
  return x > 0 && std::frexp(x, &e) == 0.5;
}
}  // namespace

void LossScaleConfig::validate() const {
  COIL_CHECK(power_of_two(init_scale), "loss scale: the initial scale must be a power of two (exact unscaling), got {}",
             init_scale);
  COIL_CHECK(power_of_two(min_scale) && min_scale <= init_scale,
             "loss scale: the minimum scale must be a power of two <= the initial scale, got {}", min_scale);
  COIL_CHECK(growth_factor == 2 && backoff_factor == 0.5,
             "loss scale: the scale grows by 2 and backs off by 1/2 (powers of two), got {} and {}", growth_factor,
             backoff_factor);
  COIL_CHECK(growth_interval >= 1, "loss scale: the growth interval must be >= 1 step, got {}", growth_interval);
}

LossScaler::LossScaler(bool enabled, LossScaleConfig config)
    : enabled_(enabled), config_(config), scale_(enabled ? config.init_scale : 1.0) {
  if (enabled_) config_.validate();
}

at::Tensor LossScaler::scale_loss(const at::Tensor& loss) const { return scale_ == 1 ? loss : loss * scale_; }

double LossScaler::unscaled_norm(double scaled_sq_norm) const { return std::sqrt(scaled_sq_norm) / scale_; }

LossScaler::Verdict LossScaler::judge(double loss, double grad_norm) const {
  if (!std::isfinite(loss)) return Verdict::kNonFinite;
  if (std::isfinite(grad_norm)) return Verdict::kStep;
  return enabled_ && scale_ > config_.min_scale ? Verdict::kOverflow : Verdict::kNonFinite;
}

void LossScaler::unscale(const std::vector<NamedTensor>& params) const {
  if (scale_ == 1) return;
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.tensor.grad().defined()) grads.push_back(p.tensor.grad());
  if (!grads.empty()) at::_foreach_mul_(grads, 1.0 / scale_);  // exact: S is a power of two
}

void LossScaler::update(Verdict v) {
  if (!enabled_) return;
  COIL_CHECK(v != Verdict::kNonFinite, "LossScaler::update: a non-finite step is train.nan_policy's to handle");
  if (v == Verdict::kOverflow) {
    scale_ = std::max(config_.min_scale, scale_ * config_.backoff_factor);
    good_steps_ = 0;
  } else if (++good_steps_ >= config_.growth_interval) {
    scale_ *= config_.growth_factor;
    good_steps_ = 0;
  }
}

std::map<std::string, std::string> LossScaler::state() const {
  if (!enabled_) return {};
  return {{"loss_scale", fmt::format("{}", scale_)}, {"loss_scale_good_steps", std::to_string(good_steps_)}};
}

void LossScaler::load_state(const std::map<std::string, std::string>& strings) {
  if (!enabled_) return;
  const auto s = strings.find("loss_scale"), g = strings.find("loss_scale_good_steps");
  if (s == strings.end() || g == strings.end()) return;
  const double scale = std::stod(s->second);
  COIL_CHECK(power_of_two(scale), "checkpoint: loss_scale {} is not a power of two", s->second);
  scale_ = scale;
  good_steps_ = std::stoll(g->second);
}

}  // namespace coil::optim
