// `coil`: one executable, one subcommand per task. Errors are one line on stderr and a non-zero exit:
// 2 for a usage or configuration error (the same command can never succeed), 1 for any other.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cstdio>
#include <exception>
#include <string>

#include "launch/commands.h"
#include "util/error.h"

#ifndef COIL_VERSION
#define COIL_VERSION "unknown"
#endif

int main(int argc, char** argv) {
  // Progress lines reach a log file (a Slurm job's output) as they are printed.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  CLI::App app{
      "Coil trains Mamba language models on CPUs and GPUs, from one workstation to a Slurm cluster.\n"
      "Run `coil <command> --help` for a command's options.",
      "coil"};
  app.set_version_flag("--version", std::string("coil ") + COIL_VERSION);
  app.footer(
      "Exit status: 0 on success; 2 on a usage or configuration error (a bad flag, TOML file, key or value: the same\n"
      "command would fail again, so `coil launch` does not restart it); 1 on any other error.");
  app.require_subcommand(1);
  coil::add_train_commands(app);
  coil::add_model_command(app);
  coil::add_generate_command(app);
  coil::add_eval_command(app);
  coil::add_tokenizer_command(app);
  coil::add_data_command(app);
  coil::add_ckpt_command(app);
  coil::add_launch_command(app);
  std::string known;
  bool found = false;
  for (const CLI::App* sub : app.get_subcommands({})) {
    known += (known.empty() ? "" : ", ") + sub->get_name();
    found = found || (argc > 1 && sub->check_name(argv[1]));
  }
  if (argc > 1 && argv[1][0] != '-' && !found) {
    fmt::print(stderr, "coil: error: unknown command '{}' (commands: {}; see coil --help)\n", argv[1], known);
    return coil::kConfigErrorExit;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    fmt::print(stderr, "coil: error: {} (see coil --help)\n", e.what());
    return coil::kConfigErrorExit;  // a usage error
  }
  try {
    coil::run_selected_command(app);
  } catch (const coil::ConfigError& e) {  // restarting cannot help: a status of its own (coil launch gives up)
    fmt::print(stderr, "coil: error: {}\n", e.what());
    return coil::kConfigErrorExit;
  } catch (const coil::Error& e) {
    fmt::print(stderr, "coil: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    // LibTorch's errors carry a backtrace after the first line; the first line says what happened.
    std::string what = e.what();
    fmt::print(stderr, "coil: error: {}\n", what.substr(0, what.find('\n')));
    return 1;
  }
  return 0;
}
