#include "launch/metrics.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>

namespace coil {
namespace fs = std::filesystem;

MetricsLog::MetricsLog(const std::string& run_dir, bool root, int64_t resume_step, const WandbOptions& wandb) {
  if (!root) return;
  const std::string path = (fs::path(run_dir) / "metrics.jsonl").string();
  if (resume_step > 0) trim_metrics(path, resume_step);
  out_.open(path, resume_step > 0 ? std::ios::app : std::ios::trunc);
  tb_ = std::make_unique<TensorBoardWriter>((fs::path(run_dir) / "tb").string());
  out_.flush();  // the trimmed file, for the sidecar to read from its start
  if (!wandb.project.empty()) wandb_ = std::make_unique<WandbSidecar>(wandb, run_dir, resume_step);
}

void MetricsLog::write(const nlohmann::json& line) { out_ << line.dump() << "\n" << std::flush; }

void MetricsLog::step(int64_t step, const nlohmann::json& line) {
  if (!tb_) return;
  write(line);
  for (auto it = line.begin(); it != line.end(); ++it)
    if (it.key() != "step" && it.key() != "tokens" && it.key() != "elapsed_s" && it->is_number() &&
        std::isfinite(it->get<double>()))
      tb_->scalar("train/" + it.key(), it->get<double>(), step);
}

void MetricsLog::eval(int64_t step, double val_loss, const std::vector<std::pair<std::string, double>>& parts) {
  if (!tb_) return;
  nlohmann::json line{{"step", step}, {"val_loss", val_loss}, {"val_ppl", std::exp(val_loss)}};
  for (const auto& [name, loss] : parts) line["val_loss_parts"][name] = loss;
  write(line);
  tb_->scalar("val/loss", val_loss, step);
  for (const auto& [name, loss] : parts) tb_->scalar("val/loss/" + name, loss, step);
  tb_->flush();
}

void MetricsLog::flush() {
  if (tb_) tb_->flush();
  if (wandb_) wandb_->check();
}

void trim_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

double train_flops_per_token(const MambaConfig& c) {
  const double H = static_cast<double>(c.d_model), I = static_cast<double>(c.d_inner()),
               N = static_cast<double>(c.d_state), R = static_cast<double>(c.rank());
  const double per_layer = 2 * I * H + (R + 2 * N) * I + I * R + H * I;
  return 6 * (static_cast<double>(c.n_layer) * per_layer + static_cast<double>(c.vocab_size) * H);
}

std::string human_time(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

}  // namespace coil
