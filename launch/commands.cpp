#include "launch/commands.h"

#include <exception>
#include <map>
#include <string>

#include "dist/world.h"
#include "util/error.h"

namespace coil {
namespace {

std::map<CLI::App*, std::function<void()>>& registry() {
  static std::map<CLI::App*, std::function<void()>> r;
  return r;
}

}  // namespace

void on_run(CLI::App* command, std::function<void()> run) { registry()[command] = std::move(run); }

void on_run_all_ranks(CLI::App* command, std::function<void()> run) {
  on_run(command, [run = std::move(run)] {
    try {
      run();
    } catch (const std::exception& e) {
      if (dist::launched_by_mpi() && dist::world().size > 1) {
        const std::string what = e.what();
        dist::abort_all(what.substr(0, what.find('\n')), dynamic_cast<const ConfigError*>(&e) ? kConfigErrorExit : 1);
      }
      throw;
    }
  });
}

void run_selected_command(CLI::App& app) {
  for (auto& [cmd, run] : registry())
    if (cmd->parsed()) return run();
  for (CLI::App* sub : app.get_subcommands())
    fail("'coil {}' needs a subcommand (see coil {} --help)", sub->get_name(), sub->get_name());
  fail("no command given (see coil --help)");
}

}  // namespace coil
