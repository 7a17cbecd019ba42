// The subcommands of `coil`; each registers its options on the app and runs when selected.
#pragma once

#include <CLI/CLI.hpp>

namespace coil {

// `coil model`: a model's shape and parameter table, and a forward/backward smoke run.
void add_model_command(CLI::App& app);

// Runs whichever subcommand the command line selected.
void run_selected_command(CLI::App& app);

}  // namespace coil
