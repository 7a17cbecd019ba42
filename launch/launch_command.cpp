// `coil launch`: a torchrun-like launcher, on Open MPI underneath, for one node or several.
//
//   coil launch --nproc-per-node N [--max-restarts R] -- coil pretrain --config ...
//   coil launch --hosts node1:2,node2:2 [--max-restarts R] -- coil pretrain ...
//   coil launch --hostfile FILE [--nproc-per-node N] -- coil pretrain ...
//
// It runs `mpirun -np N` on the command with LibTorch's threads split between the ranks of a node,
// prefixes each output line with its rank ("[rank R]", or "[rank R host]" on several hosts),
// forwards SIGINT, SIGUSR1, SIGUSR2 and SIGTERM (as SIGUSR1, which mpirun passes on to every rank)
// to the job, and when the job fails (a rank crashed, was killed, ran out of memory: mpirun then
// stops the other ranks) starts it again, up to R times; a training command resumes from its run's
// latest intact checkpoint by itself. After R restarts it exits with the job's status.
//
// Several hosts: `--hosts` (mpirun's --host syntax, host:slots) or `--hostfile` (Open MPI's format,
// one `host slots=N` a line, # comments). Ranks fill each host's slots in order (mpirun --map-by
// slot), so rank -> host is known here for the prefixes; `--nproc-per-node` then starts N on every
// host, at most its slots unless --oversubscribe. mpirun reaches the other hosts with ssh (or the
// agent in OMPI_MCA_plm_rsh_agent, as the simulated cluster's stand-in); before starting anything,
// every host must resolve and answer `<agent> HOST true`, so that a wrong or dead host is one line
// and no job is left half started. `--iface IF` selects the network interface for MPI
// (btl_tcp_if_include, oob_tcp_if_include) and NCCL (NCCL_SOCKET_IFNAME); NCCL_* variables set here
// are passed on to every rank.
#include <fcntl.h>
#include <netdb.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
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
  int nproc = -1;  // per node; -1 (not given): each host's slots
  std::string hosts, hostfile, iface;
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
  LineRelay(FILE* out, const std::vector<std::string>& host_of_rank) : out_(out), hosts_(host_of_rank) {}
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
    if (std::regex_match(line, m, tag)) {
      const size_t r = std::stoul(m[1].str());
      fmt::print(out_, "[rank {}{}] {}\n", r, r < hosts_.size() ? " " + hosts_[r] : "", m[3].str());
    }
    else fmt::print(out_, "{}\n", line);
    std::fflush(out_);
  }
  FILE* out_;
  const std::vector<std::string>& hosts_;  // empty on one host: "[rank R]"
  std::string buf_;
};

// Runs mpirun once; returns its exit status (128 + signal when it was killed).
int run_once(const std::vector<std::string>& argv, const std::vector<std::string>& host_of_rank) {
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
  LineRelay relay_out(stdout, host_of_rank), relay_err(stderr, host_of_rank);
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

struct Host {
  std::string name;
  int slots = 1;
  std::string where;  // "--hosts" or "FILE line N", for errors
};

int parse_slots(const std::string& text, const std::string& where) {
  size_t used = 0;
  int n = -1;
  try {
    n = std::stoi(text, &used);
  } catch (const std::exception&) {
  }
  COIL_CHECK(used == text.size() && n >= 1, "launch: {}: slots must be a whole number >= 1, not '{}'", where, text);
  return n;
}

// --hosts node1:2,node2:2 (a host without :N has 1 slot).
std::vector<Host> parse_hosts(const std::string& list) {
  std::vector<Host> hosts;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');) {
    COIL_CHECK(!item.empty(), "launch: --hosts {}: an empty host name", list);
    const size_t colon = item.find(':');
    Host h{item.substr(0, colon), 1, "--hosts"};
    if (colon != std::string::npos) h.slots = parse_slots(item.substr(colon + 1), "--hosts " + item);
    COIL_CHECK(!h.name.empty(), "launch: --hosts {}: an empty host name", list);
    hosts.push_back(h);
  }
  return hosts;
}

// Open MPI's hostfile: `host [slots=N] [max_slots=M]` a line; # starts a comment.
std::vector<Host> parse_hostfile(const std::string& path) {
  std::ifstream in(path);
  COIL_CHECK(in.good(), "launch: --hostfile {}: cannot read it", path);
  std::vector<Host> hosts;
  int number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    line = line.substr(0, line.find('#'));
    std::stringstream words(line);
    std::string name, word;
    if (!(words >> name)) continue;
    Host h{name, 1, fmt::format("{} line {}", path, number)};
    while (words >> word) {
      if (word.rfind("slots=", 0) == 0) h.slots = parse_slots(word.substr(6), h.where);
      else if (word.rfind("max_slots=", 0) == 0) parse_slots(word.substr(10), h.where);
      else fail("launch: {}: '{}' is not Open MPI's hostfile syntax (host slots=N)", h.where, word);
    }
    hosts.push_back(h);
  }
  COIL_CHECK(!hosts.empty(), "launch: --hostfile {}: no hosts in it", path);
  return hosts;
}

bool is_this_host(const std::string& name) {
  char me[256] = {};
  ::gethostname(me, sizeof me - 1);
  const std::string mine = me, short_mine = mine.substr(0, mine.find('.'));
  return name == "localhost" || name == mine || name == short_mine || name.rfind("127.", 0) == 0;
}

// Runs argv with a time limit; its exit status (124 when it ran out of time). Output is discarded.
int run_quietly(const std::vector<std::string>& argv, int seconds) {
  const pid_t pid = ::fork();
  COIL_CHECK(pid >= 0, "launch: fork failed: {}", std::strerror(errno));
  if (pid == 0) {
    const int null = ::open("/dev/null", O_RDWR);
    ::dup2(null, STDIN_FILENO), ::dup2(null, STDOUT_FILENO), ::dup2(null, STDERR_FILENO);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  for (int waited = 0; waited < seconds * 10; ++waited) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    ::usleep(100000);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return 124;
}

// Every host resolves, and every other host answers through mpirun's agent (ssh by default).
void check_hosts(const std::vector<Host>& hosts) {
  const char* env_agent = std::getenv("OMPI_MCA_plm_rsh_agent");
  const std::string agent = env_agent && *env_agent ? env_agent : "ssh";
  std::string agent_program = agent.substr(0, agent.find(' '));
  for (const auto& h : hosts) {
    addrinfo* found = nullptr;
    const int rc = ::getaddrinfo(h.name.c_str(), nullptr, nullptr, &found);
    if (found) ::freeaddrinfo(found);
    COIL_CHECK(rc == 0, "launch: {}: host '{}' is unknown here ({})", h.where, h.name, ::gai_strerror(rc));
    if (is_this_host(h.name)) continue;
    COIL_CHECK(!find_program(agent_program).empty(),
               "launch: {}: cannot reach host '{}': {} is not installed (mpirun reaches other hosts with it; "
               "OMPI_MCA_plm_rsh_agent names another)", h.where, h.name, agent_program);
    std::vector<std::string> argv;
    std::stringstream words(agent);
    for (std::string w; words >> w;) argv.push_back(w);
    if (agent_program == "ssh") argv.insert(argv.end(), {"-o", "BatchMode=yes", "-o", "ConnectTimeout=10"});
    argv.insert(argv.end(), {h.name, "true"});
    const int rc2 = run_quietly(argv, 20);
    COIL_CHECK(rc2 == 0, "launch: {}: cannot reach host '{}' ({} {} true exited with status {}{})", h.where, h.name,
               agent, h.name, rc2, rc2 == 124 ? ": no answer in 20 s" : "");
  }
}

int run_launch(const LaunchOptions& o) {
  COIL_CHECK(!o.command.empty(), "launch: no command (coil launch --nproc-per-node N -- coil pretrain ...)");
  COIL_CHECK(o.nproc == -1 || o.nproc >= 1, "launch: --nproc-per-node must be >= 1, not {}", o.nproc);
  COIL_CHECK(o.hosts.empty() || o.hostfile.empty(), "launch: --hosts and --hostfile: give one of them, not both");
  COIL_CHECK(o.max_restarts >= 0, "launch: --max-restarts must be >= 0, not {}", o.max_restarts);
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const bool several = !o.hosts.empty() || !o.hostfile.empty();
  std::vector<Host> hosts = !o.hosts.empty() ? parse_hosts(o.hosts) : !o.hostfile.empty() ? parse_hostfile(o.hostfile)
                                                                                           : std::vector<Host>{};
  if (!several) {
    COIL_CHECK(o.nproc >= 1, "launch: --nproc-per-node N is needed on one host (or --hosts / --hostfile)");
    COIL_CHECK(o.nproc <= cores || o.oversubscribe,
               "launch: --nproc-per-node {} is more than this machine's {} cores (add --oversubscribe to run more "
               "ranks than cores)",
               o.nproc, cores);
  }
  std::map<std::string, int> seen;
  for (const auto& h : hosts) {
    COIL_CHECK(seen[h.name]++ == 0, "launch: {}: host '{}' is named twice", h.where, h.name);
    COIL_CHECK(o.nproc == -1 || o.nproc <= h.slots || o.oversubscribe,
               "launch: {}: --nproc-per-node {} is more than host '{}''s {} slot(s) (add --oversubscribe to run more "
               "ranks than slots)",
               h.where, o.nproc, h.name, h.slots);
  }
  const std::string mpirun = find_program("mpirun");
  COIL_CHECK(!mpirun.empty(), "launch: mpirun is not installed (Debian: apt-get install openmpi-bin)");
  // `coil` means this very executable.
  std::string program = o.command[0] == "coil" ? fs::read_symlink("/proc/self/exe").string() : find_program(o.command[0]);
  COIL_CHECK(!program.empty(), "launch: command not found: {}", o.command[0]);
  if (several) check_hosts(hosts);

  // Ranks per host, and which host each rank lands on (--map-by slot fills hosts in order).
  std::vector<std::string> host_of_rank;
  std::string host_list;
  int per_node_most = std::max(o.nproc, 1);
  for (const auto& h : hosts) {
    const int n = o.nproc > 0 ? o.nproc : h.slots;
    per_node_most = std::max(per_node_most, n);
    host_of_rank.insert(host_of_rank.end(), static_cast<size_t>(n), h.name);
    host_list += fmt::format("{}{}:{}", host_list.empty() ? "" : ",", h.name, n);
  }
  const int ranks = several ? static_cast<int>(host_of_rank.size()) : o.nproc;
  const int threads = std::max(1, cores / per_node_most);
  std::vector<std::string> argv = {mpirun, "-np", std::to_string(ranks), "--bind-to", "none", "--tag-output",
                                   "-x", fmt::format("OMP_NUM_THREADS={}", threads)};
  if (several) argv.insert(argv.end(), {"--host", host_list, "--map-by", "slot"});
  if (per_node_most > cores || o.oversubscribe) argv.push_back("--oversubscribe");
  if (!o.iface.empty()) {
    argv.insert(argv.end(), {"--mca", "btl_tcp_if_include", o.iface, "--mca", "oob_tcp_if_include", o.iface});
    if (o.iface.find('/') == std::string::npos) argv.insert(argv.end(), {"-x", "NCCL_SOCKET_IFNAME=" + o.iface});
  }
  for (char** e = environ; *e; ++e) {  // NCCL's settings reach every rank (OMPI_MCA_* do by themselves)
    const std::string var(*e);
    const std::string name = var.substr(0, var.find('='));
    if (name.rfind("NCCL_", 0) == 0 && !(name == "NCCL_SOCKET_IFNAME" && !o.iface.empty() && o.iface.find('/') == std::string::npos)) argv.insert(argv.end(), {"-x", name});
  }
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.push_back(program);
  argv.insert(argv.end(), o.command.begin() + 1, o.command.end());
  if (!several) host_of_rank.clear();

  struct sigaction sa {};
  sa.sa_handler = forward;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGUSR1, SIGUSR2}) ::sigaction(sig, &sa, nullptr);

  fmt::print("coil launch: {} rank(s){}, {} thread(s) each: {}\n", ranks, several ? " on " + host_list : "", threads,
             fmt::join(o.command, " "));
  for (int attempt = 0;; ++attempt) {
    const int status = run_once(argv, host_of_rank);
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
  CLI::App* cmd = app.add_subcommand("launch", "Run a command on N ranks of this machine or of several hosts, restarting it when a rank dies");
  cmd->add_option("--nproc-per-node", o->nproc, "ranks to start on each host (default: each host's slots)");
  cmd->add_option("--hosts", o->hosts, "hosts and their slots: node1:2,node2:2 (mpirun --host syntax)");
  cmd->add_option("--hostfile", o->hostfile, "Open MPI hostfile: one `host slots=N` a line");
  cmd->add_option("--iface", o->iface, "network interface (or CIDR for MPI) for MPI's and NCCL's traffic");
  cmd->add_option("--max-restarts", o->max_restarts, "times to start the job again after a failure")->capture_default_str();
  cmd->add_flag("--oversubscribe", o->oversubscribe, "allow more ranks than cores");
  cmd->add_option("command", o->command, "the command every rank runs, after --")->required();
  cmd->footer(
      "Example: coil launch --nproc-per-node 4 --max-restarts 3 -- coil pretrain --config configs/pretrain.toml\n"
      "       coil launch --hosts node1:2,node2:2 -- coil pretrain ...   (or --hostfile FILE: `node1 slots=2` a line)\n"
      "Output lines are prefixed [rank R] ([rank R host] on several hosts). SIGINT/SIGTERM/SIGUSR1/SIGUSR2 are forwarded to every rank (SIGTERM or\n"
      "SIGUSR1 make a training run save a checkpoint and exit). A failed job is started again and resumes from\n"
      "its latest checkpoint; the exit status is the job's.");
  on_run(cmd, [o] {
    const int status = run_launch(*o);
    if (status != 0) std::exit(status);
  });
}

}  // namespace coil
