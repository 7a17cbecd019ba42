// `coil pretrain` and `coil sft`: a TOML config, overridden by --set section.key=value.
#include <memory>

#include "launch/commands.h"
#include "launch/config.h"
#include "launch/trainer.h"

namespace coil {
namespace {

struct TrainOptions {
  std::string config;
  std::vector<std::string> overrides;
  bool resume = false;
};

void add_phase(CLI::App& app, const char* name, const char* help, Phase phase) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand(name, help);
  cmd->add_option("--config", o->config, "a TOML file with [model], [data], [optim], [train]")->required();
  cmd->add_option("--set", o->overrides, "override a key: --set train.max_steps=100 (repeatable)");
  cmd->add_flag("--resume", o->resume,
                "resume from <run_dir>/checkpoints/latest, and fail if there is none (without it a run resumes "
                "when a checkpoint is there, and starts fresh otherwise)");
  cmd->footer(
      "A run resumes by itself from <train.run_dir>/checkpoints/latest when it exists, bit-exactly.\n"
      "Writes <run_dir>/config.toml (the resolved config), metrics.jsonl and checkpoints/ (step-N, latest, best, final).");
  on_run_all_ranks(cmd, [o, phase] { train(RunConfig::load(o->config, o->overrides), phase, o->resume); });
}

}  // namespace

void add_train_commands(CLI::App& app) {
  add_phase(app, "pretrain", "Pretrain a Mamba LM on tokenized shards or streamed JSONL", Phase::kPretrain);
  add_phase(app, "sft", "Instruction-tune a pretrained Mamba LM on Alpaca-format data", Phase::kSft);
}

}  // namespace coil
