// `coil launch`: a torchrun-like launcher for one node, on Open MPI underneath.
//
//   coil launch --nproc-per-node N [--max-restarts R] -- coil pretrain --config ...
//
// It runs `mpirun -np N` on the command with LibTorch's threads split between the ranks, prefixes
// each output line with its rank, forwards SIGINT, SIGUSR1, SIGUSR2 and SIGTERM (as SIGUSR1, which
// mpirun passes on to every rank) to the job, and
// when the job fails (a rank crashed, was killed, ran out of memory: mpirun then stops the other
// ranks) starts it again, up to R times; a training command resumes from its run's latest intact
// checkpoint by itself. After R restarts it exits with the job's status.
#include <fcntl.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "launch/commands.h"
#include "util/error.h"

namespace coil {
namespace {
namespace fs = std::filesystem;

struct LaunchOptions {
  int nproc = 1;
  int max_restarts = 0;
  bool oversubscribe = false;
  std::vector<std::string> command;
};

volatile sig_atomic_t g_child = 0;        // mpirun's pid while it runs
volatile sig_atomic_t g_stop_signal = 0;  // SIGINT / SIGTERM received: no restart after

// SIGTERM goes on as SIGUSR1: mpirun would kill the ranks on a SIGTERM of its own and fail, while
// it hands SIGUSR1 to every rank, and a training run takes either as "save and stop".
void forward(int sig) {
  if (sig == SIGINT || sig == SIGTERM) g_stop_signal = sig;
  if (g_child > 0) ::kill(static_cast<pid_t>(g_child), sig == SIGTERM ? SIGUSR1 : sig);
}

// A program on PATH (or a path), or "" when there is none.
std::string find_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (size_t a = 0; a <= dirs.size();) {
    size_t b = dirs.find(':', a);
    if (b == std::string::npos) b = dirs.size();
    const std::string candidate = (a == b ? "." : dirs.substr(a, b - a)) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0 && !fs::is_directory(candidate)) return candidate;
    a = b + 1;
  }
  return "";
}

// Copies the job's output to ours line by line, "[1,R]<stdout>:" (mpirun's --tag-output) becoming
// "[rank R] ".
class LineRelay {
 public:
  explicit LineRelay(FILE* out) : out_(out) {}
  void feed(const char* data, size_t n) {
    buf_.append(data, n);
    for (size_t nl; (nl = buf_.find('\n')) != std::string::npos;) {
      emit(buf_.substr(0, nl));
      buf_.erase(0, nl + 1);
    }
  }
  void flush() {
    if (!buf_.empty()) emit(buf_);
    buf_.clear();
  }

 private:
  void emit(const std::string& line) {
    static const std::regex tag(R"(^\[\d+,(\d+)\]<std(out|err)>:(.*)$)");
    std::smatch m;
    if (std::regex_match(line, m, tag)) fmt::print(out_, "[rank {}] {}\n", m[1].str(), m[3].str());
    else fmt::print(out_, "{}\n", line);
    std::fflush(out_);
  }
  FILE* out_;
  std::string buf_;
};

// Runs mpirun once; returns its exit status (128 + signal when it was killed).
int run_once(const std::vector<std::string>& argv) {
  int out[2], err[2];
  COIL_CHECK(::pipe(out) == 0 && ::pipe(err) == 0, "launch: pipe failed: {}", std::strerror(errno));
  const pid_t pid = ::fork();
  COIL_CHECK(pid >= 0, "launch: fork failed: {}", std::strerror(errno));
  if (pid == 0) {
    ::setpgid(0, 0);  // its own process group: a Ctrl-C reaches it through us only
    ::dup2(out[1], STDOUT_FILENO);
    ::dup2(err[1], STDERR_FILENO);
    ::close(out[0]), ::close(out[1]), ::close(err[0]), ::close(err[1]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "coil: error: launch: cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  g_child = pid;
  ::close(out[1]), ::close(err[1]);
  LineRelay relay_out(stdout), relay_err(stderr);
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? relay_out : relay_err).feed(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  relay_out.flush();
  relay_err.flush();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  g_child = 0;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int run_launch(const LaunchOptions& o) {
  COIL_CHECK(!o.command.empty(), "launch: no command (coil launch --nproc-per-node N -- coil pretrain ...)");
  COIL_CHECK(o.nproc >= 1, "launch: --nproc-per-node must be >= 1, not {}", o.nproc);
  COIL_CHECK(o.max_restarts >= 0, "launch: --max-restarts must be >= 0, not {}", o.max_restarts);
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  COIL_CHECK(o.nproc <= cores || o.oversubscribe,
             "launch: --nproc-per-node {} is more than this machine's {} cores (add --oversubscribe to run more ranks "
             "than cores)",
             o.nproc, cores);
  const std::string mpirun = find_program("mpirun");
  COIL_CHECK(!mpirun.empty(), "launch: mpirun is not installed (Debian: apt-get install openmpi-bin)");
  // `coil` means this very executable.
  std::string program = o.command[0] == "coil" ? fs::read_symlink("/proc/self/exe").string() : find_program(o.command[0]);
  COIL_CHECK(!program.empty(), "launch: command not found: {}", o.command[0]);

  const int threads = std::max(1, cores / o.nproc);
  std::vector<std::string> argv = {mpirun, "-np", std::to_string(o.nproc), "--bind-to", "none", "--tag-output",
                                   "-x", fmt::format("OMP_NUM_THREADS={}", threads)};
  if (o.nproc > cores) argv.push_back("--oversubscribe");
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.push_back(program);
  argv.insert(argv.end(), o.command.begin() + 1, o.command.end());

  struct sigaction sa {};
  sa.sa_handler = forward;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGUSR1, SIGUSR2}) ::sigaction(sig, &sa, nullptr);

  fmt::print("coil launch: {} rank(s), {} thread(s) each: {}\n", o.nproc, threads, fmt::join(o.command, " "));
  for (int attempt = 0;; ++attempt) {
    const int status = run_once(argv);
    if (status == 0) return 0;
    if (g_stop_signal != 0) {  // asked to stop: no restart
      fmt::print(stderr, "coil launch: stopped by signal {} (the job exited with status {})\n", g_stop_signal, status);
      return status;
    }
    if (attempt >= o.max_restarts) {
      fmt::print(stderr, "coil launch: the job failed with status {}{}\n", status,
                 o.max_restarts > 0 ? fmt::format(" after {} restart(s); giving up", o.max_restarts) : "");
      return status;
    }
    fmt::print(stderr, "coil launch: the job failed with status {}; restart {} of {} (it resumes from its latest checkpoint)\n",
               status, attempt + 1, o.max_restarts);
  }
}

}  // namespace

void add_launch_command(CLI::App& app) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* cmd = app.add_subcommand("launch", "Run a command on N ranks of this machine, restarting it when a rank dies");
  cmd->add_option("--nproc-per-node", o->nproc, "ranks to start")->required();
  cmd->add_option("--max-restarts", o->max_restarts, "times to start the job again after a failure")->capture_default_str();
  cmd->add_flag("--oversubscribe", o->oversubscribe, "allow more ranks than cores");
  cmd->add_option("command", o->command, "the command every rank runs, after --")->required();
  cmd->footer(
      "Example: coil launch --nproc-per-node 4 --max-restarts 3 -- coil pretrain --config configs/pretrain.toml\n"
      "Output lines are prefixed [rank R]. SIGINT/SIGTERM/SIGUSR1/SIGUSR2 are forwarded to every rank (SIGTERM or\n"
      "SIGUSR1 make a training run save a checkpoint and exit). A failed job is started again and resumes from\n"
      "its latest checkpoint; the exit status is the job's.");
  on_run(cmd, [o] {
    const int status = run_launch(*o);
    if (status != 0) std::exit(status);
  });
}

}  // namespace coil
