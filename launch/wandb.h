// Weights & Biases, through the official `wandb` Python client in a sidecar process that follows
// <run_dir>/metrics.jsonl (launch/wandb_sidecar.py, compiled into coil and run with `python -c`).
// Training never waits on it and never fails because of it: coil only writes metrics.jsonl, as
// it always does, and the sidecar reads it; a sidecar that cannot start (no python, no wandb) or
// that dies is one warning line, and the run goes on without W&B.
//
// - Which python: metrics.wandb_python, else $COIL_PYTHON, else the venv's python that coil was
//   built with (scripts/setup puts wandb there).
// - The W&B run id lives in <run_dir>/wandb_run_id: a fresh run (step 0) writes a new one, a
//   resumed run continues the run of the id it finds (wandb.init(id=..., resume="allow")).
// - Lifetime: the sidecar's stdin is a pipe from coil, which coil never writes. When coil closes it
//   at the end of a run, or when coil is gone however it ended (the kernel closes it then), the
//   sidecar sends what is left, finishes the W&B run and exits. It runs in a process group of its
//   own, so that a Ctrl-C, or a launcher ending the ranks' group, does not cut it off mid-write.
//   At the end of a run coil gives it a few seconds to finish (kFinishSeconds); one still
//   uploading goes on in the background.
// - Its output, and wandb's, go to <run_dir>/wandb-sidecar.log; wandb's files to <run_dir>/wandb.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace coil {

struct RunConfig;

struct WandbOptions {
  std::string project;  // "": no W&B
  std::string entity, run_name, mode = "online", python;
};
WandbOptions wandb_options(const RunConfig& c);

// The python that runs the sidecar: `configured` if set, else $COIL_PYTHON, else the build's venv.
std::string wandb_python(const std::string& configured);

// The source of launch/wandb_sidecar.py.
extern const char* const kWandbSidecarScript;

class WandbSidecar {
 public:
  static constexpr double kFinishSeconds = 30;
  // Starts the sidecar of run_dir when o.project is set and o.mode is not "disabled" (call it on
  // the root rank, once run_dir/config.toml and metrics.jsonl are in place).
  WandbSidecar(const WandbOptions& o, const std::string& run_dir, int64_t resume_step);
  ~WandbSidecar();  // closes the pipe and waits up to kFinishSeconds for the sidecar to finish
  WandbSidecar(const WandbSidecar&) = delete;
  WandbSidecar& operator=(const WandbSidecar&) = delete;
  // A sidecar that has exited before its time: one warning. Cheap (one waitpid); call it now and then.
  void check();
  bool running() const { return pid_ > 0; }
  const std::string& run_id() const { return run_id_; }

 private:
  void warn_exit(int status);
  pid_t pid_ = -1;
  int pipe_ = -1;  // the write end of the sidecar's stdin
  std::string run_id_, log_;
};

}  // namespace coil
