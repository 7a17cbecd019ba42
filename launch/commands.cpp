#include "launch/commands.h"

#include <map>

#include "util/error.h"

namespace coil {
namespace {

std::map<CLI::App*, std::function<void()>>& registry() {
  static std::map<CLI::App*, std::function<void()>> r;
  return r;
}

}  // namespace

void on_run(CLI::App* command, std::function<void()> run) { registry()[command] = std::move(run); }

void run_selected_command(CLI::App& app) {
  for (auto& [cmd, run] : registry())
    if (cmd->parsed()) return run();
  for (CLI::App* sub : app.get_subcommands())
    fail("'coil {}' needs a subcommand (see coil {} --help)", sub->get_name(), sub->get_name());
  fail("no command given (see coil --help)");
}

}  // namespace coil
