// The training loop of `coil pretrain` and `coil sft`: one loop, read top to bottom in trainer.cpp.
#pragma once

#include <cstdint>

#include "launch/config.h"

namespace coil {

enum class Phase { kPretrain, kSft };

struct TrainResult {
  int64_t steps = 0;          // steps done by the end of the run (all runs of it together)
  double last_loss = 0;       // the training loss of the last step
  double last_val_loss = 0;   // the last evaluation's (0 when none)
  bool stopped = false;       // stopped early by SIGTERM / SIGUSR1, after saving a checkpoint
};

// Runs (or resumes, when run_dir holds a checkpoint) a training run. With must_resume, a run_dir
// without a checkpoint is an error instead of a fresh start.
TrainResult train(const RunConfig& config, Phase phase, bool must_resume = false);

}  // namespace coil
