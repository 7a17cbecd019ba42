#include "launch/wandb.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "launch/config.h"

extern char** environ;

namespace coil {
namespace fs = std::filesystem;

WandbOptions wandb_options(const RunConfig& c) {
  return {c.wandb_project, c.wandb_entity, c.wandb_run_name, c.wandb_mode, c.wandb_python};
}

std::string wandb_python(const std::string& configured) {
  if (!configured.empty()) return configured;
  if (const char* env = std::getenv("COIL_PYTHON"); env && *env) return env;
  return COIL_DEFAULT_PYTHON;
}

namespace {

// W&B's own ids are 8 characters of [a-z0-9].
std::string new_run_id() {
  static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  std::random_device rd;
  std::string id;
  for (int i = 0; i < 8; ++i) id += digits[rd() % 36];
  return id;
}

std::string read_id(const fs::path& path) {
  std::ifstream in(path);
  std::string id;
  in >> id;
  return id;
}

}  // namespace

WandbSidecar::WandbSidecar(const WandbOptions& o, const std::string& run_dir, int64_t resume_step) {
  if (o.project.empty() || o.mode == "disabled") return;
  const fs::path dir(run_dir);
  log_ = (dir / "wandb-sidecar.log").string();
  // A resumed run continues its W&B run; a fresh one starts a new run and sends every step.
  if (resume_step > 0) run_id_ = read_id(dir / "wandb_run_id");
  if (run_id_.empty()) {
    run_id_ = new_run_id();
    std::error_code ec;
    fs::remove(dir / "wandb_last_step", ec);
    std::ofstream(dir / "wandb_run_id") << run_id_ << "\n";
  }
  const std::string python = wandb_python(o.python);
  std::vector<std::string> args = {python,     "-c",        kWandbSidecarScript, "--run-dir", run_dir,
                                   "--project", o.project, "--mode",            o.mode};
  if (!o.entity.empty()) args.insert(args.end(), {"--entity", o.entity});
  if (!o.run_name.empty()) args.insert(args.end(), {"--name", o.run_name});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    fmt::print(stderr, "coil: warning: W&B: cannot make a pipe: {}; the run goes on without W&B\n", std::strerror(errno));
    return;
  }
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_adddup2(&files, fds[0], 0);  // dup2 clears close-on-exec on stdin
  posix_spawn_file_actions_addopen(&files, 1, log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&files, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int s : {SIGINT, SIGTERM, SIGUSR1, SIGPIPE, SIGHUP}) sigaddset(&defaults, s);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setpgroup(&attr, 0);  // a process group of its own
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  const int rc = posix_spawn(&pid_, python.c_str(), &files, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&files);
  posix_spawnattr_destroy(&attr);
  close(fds[0]);
  if (rc != 0) {
    pid_ = -1;
    close(fds[1]);
    fmt::print(stderr, "coil: warning: W&B: cannot start {}: {} (metrics.wandb_python or $COIL_PYTHON names the python "
               "with wandb); the run goes on without W&B\n", python, std::strerror(rc));
    return;
  }
  pipe_ = fds[1];
  fmt::print("coil: W&B run {} ({} mode, project {}), sent by a sidecar (pid {}, log {})\n", run_id_, o.mode,
             o.project, pid_, log_);
}

namespace {

// The last line of the sidecar's log (a traceback's last line names the error), at most 300 bytes.
std::string last_log_line(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  const std::streamoff size = in.tellg(), from = std::max<std::streamoff>(0, size - 4096);
  in.seekg(from);
  std::string tail((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!tail.empty() && std::isspace(static_cast<unsigned char>(tail.back()))) tail.pop_back();
  std::string line = tail.substr(tail.find_last_of('\n') == std::string::npos ? 0 : tail.find_last_of('\n') + 1);
  return line.size() > 300 ? line.substr(0, 300) + "..." : line;
}

}  // namespace

void WandbSidecar::warn_exit(int status) {
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
  const std::string how = WIFEXITED(status) ? fmt::format("exited with status {}", WEXITSTATUS(status))
                                            : fmt::format("was ended by signal {}", WTERMSIG(status));
  const std::string why = last_log_line(log_);
  fmt::print(stderr, "coil: warning: the W&B sidecar {}{} (see {}); the run goes on without W&B\n", how,
             why.empty() ? "" : ": " + why, log_);
}

void WandbSidecar::check() {
  if (pid_ <= 0) return;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return;
  pid_ = -1;
  warn_exit(status);
}

WandbSidecar::~WandbSidecar() {
  if (pipe_ >= 0) close(pipe_);  // the sidecar sends what is left, finishes the run and exits
  if (pid_ <= 0) return;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(kFinishSeconds);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      warn_exit(status);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  fmt::print(stderr, "coil: the W&B sidecar (pid {}) is still finishing after {:.0f} s; it goes on in the background "
             "(log {})\n", pid_, kFinishSeconds, log_);
}

}  // namespace coil
