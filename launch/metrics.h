// What a run logs, written by rank 0 only: <run_dir>/metrics.jsonl (one JSON object per training
// step and per evaluation), TensorBoard scalars in <run_dir>/tb (a new event file per start), and,
// with metrics.wandb_project set, the same scalars on Weights & Biases, sent by a sidecar process
// that follows metrics.jsonl (launch/wandb.h).
// A resumed run keeps the metrics lines up to the step it resumes from and appends after them, so
// that the file reads as one run. Other ranks get a log that writes nothing.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/tensorboard.h"
#include "model/config.h"
#include "launch/wandb.h"

namespace coil {

class MetricsLog {
 public:
  // Opens the log of run_dir on the root rank; resume_step > 0 trims the lines past it first.
  // Then starts the W&B sidecar when wandb.project is set (run_dir/config.toml must be written).
  MetricsLog(const std::string& run_dir, bool root, int64_t resume_step, const WandbOptions& wandb = {});
  // A training step's line; its numbers also go to TensorBoard as train/<key> (the non-finite
  // ones, a skipped step's gradient norm, are left out there).
  void step(int64_t step, const nlohmann::json& line);
  // An evaluation: val_loss and val_ppl, and with several held-out sets val_loss_parts
  // ({name: loss}; TensorBoard and W&B: val/loss/<name>).
  void eval(int64_t step, double val_loss, const std::vector<std::pair<std::string, double>>& parts = {});
  // Flushes TensorBoard's file; a W&B sidecar that has died is reported (once) here.
  void flush();

 private:
  void write(const nlohmann::json& line);
  std::unique_ptr<WandbSidecar> wandb_;  // first: destroyed last, once metrics.jsonl is complete
  std::ofstream out_;
  std::unique_ptr<TensorBoardWriter> tb_;
};

// The model FLOPs of training on one token: 6 x the parameters of the matrix products (in_proj,
// x_proj, dt_proj, out_proj of every layer and the LM head), forward and backward, the usual MFU
// convention (bench/bench_step.cpp's); the scan, convolution and norms come on top, uncounted.
// MFU = this x tokens/s / (metrics.peak_tflops x 1e12 x devices).
double train_flops_per_token(const MambaConfig& c);

// metrics.jsonl of a resumed run keeps the lines up to the step it resumes from.
void trim_metrics(const std::string& path, int64_t step);

// "1h02m", "3m05s", "42s" ("?" for a negative or non-finite time): the ETA of the progress lines.
std::string human_time(double seconds);

}  // namespace coil
