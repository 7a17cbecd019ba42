// The subcommands of `coil`; each registers its options on the app and runs when selected.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace coil {

// `coil model`: a model's shape and parameter table, and a forward/backward smoke run.
void add_model_command(CLI::App& app);
// `coil tokenizer train|encode`: sentencepiece tokenizers.
void add_tokenizer_command(CLI::App& app);
// `coil data prepare|inspect`: tokenized shards for pretraining.
void add_data_command(CLI::App& app);

// `coil pretrain`, `coil sft`: the training runs.
void add_train_commands(CLI::App& app);

// `coil generate` and `coil chat`: text from a checkpoint.
void add_generate_command(CLI::App& app);

// `coil eval`: a checkpoint's loss, perplexity and bits per byte on held-out data.
void add_eval_command(CLI::App& app);

// `coil ckpt inspect|verify|consolidate|export-hf`: checkpoints.
void add_ckpt_command(CLI::App& app);

// `coil launch`: a command on N ranks of this machine, restarted when a rank dies.
void add_launch_command(CLI::App& app);

// Registers what runs when `command` is the one selected on the command line.
void on_run(CLI::App* command, std::function<void()> run);
// The same for a command whose ranks (under mpirun or srun) work together: an error on one rank
// ends them all (MPI_Abort, with the error's line), since the others would wait for it forever in
// a collective. A configuration error keeps its exit status through it (coil launch does not
// restart it).
void on_run_all_ranks(CLI::App* command, std::function<void()> run);
// Runs whichever subcommand the command line selected.
void run_selected_command(CLI::App& app);

}  // namespace coil
