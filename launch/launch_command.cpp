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
// latest intact checkpoint by itself. After R restarts it exits with the job's status. A job that
// exits with coil's usage / configuration error status (2, kConfigErrorExit) is not restarted.
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
//
// A lost host (elastic restarts): before each restart on several hosts, every host is asked again;
// one that does not answer (its processes died with the machine, its link is down) is retried for
// `--host-wait` seconds, then dropped as long as `--min-nodes` hosts remain, and the job starts again
// on those, with fewer ranks: a training run resumes its latest intact checkpoint resharded to the new
// world size, with the same global batch, so every step sees the batch it would have seen. A dropped
// host is not taken back later in the same launch. Without --min-nodes no host may be lost: after
// --host-wait the launcher gives up, in one line saying which host does not answer.
#include <fcntl.h>
#include <netdb.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
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
  int min_nodes = -1;      // -1 (not given): every host; fewer answering at a restart: give up
  double host_wait = 60;   // seconds a host that does not answer at a restart is waited for
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

// Why host h cannot be used, or "" when it resolves and (another host) answers `<agent> HOST true`
// through mpirun's agent (ssh by default).
std::string host_problem(const Host& h) {
  const char* env_agent = std::getenv("OMPI_MCA_plm_rsh_agent");
  const std::string agent = env_agent && *env_agent ? env_agent : "ssh";
  std::string agent_program = agent.substr(0, agent.find(' '));
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(h.name.c_str(), nullptr, nullptr, &found);
  if (found) ::freeaddrinfo(found);
  if (rc != 0) return fmt::format("host '{}' is unknown here ({})", h.name, ::gai_strerror(rc));
  if (is_this_host(h.name)) return "";
  if (find_program(agent_program).empty())
    return fmt::format("cannot reach host '{}': {} is not installed (mpirun reaches other hosts with it; "
                       "OMPI_MCA_plm_rsh_agent names another)", h.name, agent_program);
  std::vector<std::string> argv;
  std::stringstream words(agent);
  for (std::string w; words >> w;) argv.push_back(w);
  if (agent_program == "ssh") argv.insert(argv.end(), {"-o", "BatchMode=yes", "-o", "ConnectTimeout=10"});
  argv.insert(argv.end(), {h.name, "true"});
  const int rc2 = run_quietly(argv, 20);
  if (rc2 == 0) return "";
  return fmt::format("cannot reach host '{}' ({} {} true exited with status {}{})", h.name, agent, h.name, rc2,
                     rc2 == 124 ? ": no answer in 20 s" : "");
}

// Before the first start: every host must answer (a wrong or dead host is one line, nothing starts).
void check_hosts(const std::vector<Host>& hosts) {
  for (const auto& h : hosts)
    if (const std::string p = host_problem(h); !p.empty()) fail("launch: {}: {}", h.where, p);
}

// Before a restart on several hosts: the hosts that answer. One that does not is asked again every
// 2 s for up to `wait` seconds (a link that comes back, a node that reboots), then dropped. Returns
// the hosts to go on with; fewer than `min_nodes` of them: empty, after one line saying which failed.
std::vector<Host> hosts_that_answer(const std::vector<Host>& hosts, int min_nodes, double wait) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<Host> alive;
    std::vector<std::string> problems;
    for (const auto& h : hosts) {
      const std::string p = host_problem(h);
      if (p.empty()) alive.push_back(h);
      else problems.push_back(p);
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (problems.empty()) return alive;
    if (waited >= wait || g_stop_signal != 0) {
      if (static_cast<int>(alive.size()) < min_nodes) {
        fmt::print(stderr, "coil launch: {} after {:.0f} s; {} host(s) answer, fewer than --min-nodes {}: giving up\n",
                   fmt::join(problems, "; "), waited, alive.size(), min_nodes);
        return {};
      }
      fmt::print(stderr, "coil launch: {} after {:.0f} s; going on without it on {} host(s) (--min-nodes {})\n",
                 fmt::join(problems, "; "), waited, alive.size(), min_nodes);
      return alive;
    }
    std::this_thread::sleep_for(std::chrono::seconds(2));
  }
}

// mpirun's command line for these hosts (none: this machine), and the host of each rank.
struct Job {
  std::vector<std::string> argv, host_of_rank;
  std::string host_list;
  int ranks = 0, threads = 1;
};

Job make_job(const LaunchOptions& o, const std::vector<Host>& hosts, bool several, const std::string& mpirun,
             const std::string& program) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Ranks per host, and which host each rank lands on (--map-by slot fills hosts in order).
  Job job;
  int per_node_most = std::max(o.nproc, 1);
  for (const auto& h : hosts) {
    const int n = o.nproc > 0 ? o.nproc : h.slots;
    per_node_most = std::max(per_node_most, n);
    job.host_of_rank.insert(job.host_of_rank.end(), static_cast<size_t>(n), h.name);
    job.host_list += fmt::format("{}{}:{}", job.host_list.empty() ? "" : ",", h.name, n);
  }
  job.ranks = several ? static_cast<int>(job.host_of_rank.size()) : o.nproc;
  job.threads = std::max(1, cores / per_node_most);
  std::vector<std::string>& argv = job.argv;
  argv = {mpirun, "-np", std::to_string(job.ranks), "--bind-to", "none", "--tag-output"};
  // The variables every rank gets ("NAME=value", or "NAME": the launcher's value).
  std::vector<std::string> exports{fmt::format("OMP_NUM_THREADS={}", job.threads)};
  if (several) argv.insert(argv.end(), {"--host", job.host_list, "--map-by", "slot"});
  if (per_node_most > cores || o.oversubscribe) argv.push_back("--oversubscribe");
  // NCCL takes an interface name only; a CIDR (for MPI) leaves NCCL_SOCKET_IFNAME to the user.
  const bool iface_is_name = !o.iface.empty() && o.iface.find('/') == std::string::npos;
  if (!o.iface.empty()) {
    argv.insert(argv.end(), {"--mca", "btl_tcp_if_include", o.iface, "--mca", "oob_tcp_if_include", o.iface});
    if (iface_is_name) exports.push_back("NCCL_SOCKET_IFNAME=" + o.iface);
  }
  for (char** e = environ; *e; ++e) {  // NCCL's settings reach every rank (OMPI_MCA_* do by themselves)
    const std::string var(*e);
    const std::string name = var.substr(0, var.find('='));
    if (name.rfind("NCCL_", 0) == 0 && !(name == "NCCL_SOCKET_IFNAME" && iface_is_name)) exports.push_back(name);
  }
  // Open MPI refuses -x beside the MCA parameter mca_base_env_list (the user's, in the environment:
  // "mixing these two methods"); then the exports join that list instead (one --mca overriding it).
  const char* env_list = std::getenv("OMPI_MCA_mca_base_env_list");
  if (env_list && *env_list) {
    std::string list = env_list;
    for (const std::string& x : exports) list += ";" + x;
    argv.insert(argv.end(), {"--mca", "mca_base_env_list", list});
  } else {
    for (const std::string& x : exports) argv.insert(argv.end(), {"-x", x});
  }
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.push_back(program);
  argv.insert(argv.end(), o.command.begin() + 1, o.command.end());
  if (!several) job.host_of_rank.clear();
  return job;
}

int run_launch(const LaunchOptions& o) {
  COIL_CHECK(!o.command.empty(), "launch: no command (coil launch --nproc-per-node N -- coil pretrain ...)");
  COIL_CHECK(o.nproc == -1 || o.nproc >= 1, "launch: --nproc-per-node must be >= 1, not {}", o.nproc);
  COIL_CHECK(o.hosts.empty() || o.hostfile.empty(), "launch: --hosts and --hostfile: give one of them, not both");
  COIL_CHECK(o.max_restarts >= 0, "launch: --max-restarts must be >= 0, not {}", o.max_restarts);
  COIL_CHECK(o.host_wait >= 0, "launch: --host-wait must be >= 0 seconds, not {}", o.host_wait);
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
  COIL_CHECK(o.min_nodes == -1 || several, "launch: --min-nodes is for several hosts (--hosts or --hostfile)");
  COIL_CHECK(o.min_nodes == -1 || (o.min_nodes >= 1 && o.min_nodes <= static_cast<int>(hosts.size())),
             "launch: --min-nodes must be from 1 to the {} host(s) given, not {}", hosts.size(), o.min_nodes);
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
  const int min_nodes = o.min_nodes > 0 ? o.min_nodes : static_cast<int>(hosts.size());

  struct sigaction sa {};
  sa.sa_handler = forward;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGUSR1, SIGUSR2}) ::sigaction(sig, &sa, nullptr);

  Job job = make_job(o, hosts, several, mpirun, program);
  fmt::print("coil launch: {} rank(s){}, {} thread(s) each: {}\n", job.ranks, several ? " on " + job.host_list : "",
             job.threads, fmt::join(o.command, " "));
  for (int attempt = 0;; ++attempt) {
    const int status = run_once(job.argv, job.host_of_rank);
    if (status == 0) return 0;
    if (g_stop_signal != 0) {  // asked to stop: no restart
      fmt::print(stderr, "coil launch: stopped by signal {} (the job exited with status {})\n", g_stop_signal, status);
      return status;
    }
    if (status == kConfigErrorExit) {  // coil's usage or configuration error: the same again would fail the same
      fmt::print(stderr, "coil launch: the job failed with status {} (a usage or configuration error): not restarting it\n",
                 status);
      return status;
    }
    if (attempt >= o.max_restarts) {
      fmt::print(stderr, "coil launch: the job failed with status {}{}\n", status,
                 o.max_restarts > 0 ? fmt::format(" after {} restart(s); giving up", o.max_restarts) : "");
      return status;
    }
    if (several) {  // a host lost (its processes died, it does not answer): go on with the others, or stop
      std::vector<Host> alive = hosts_that_answer(hosts, min_nodes, o.host_wait);
      if (alive.empty()) return status;
      if (g_stop_signal != 0) {
        fmt::print(stderr, "coil launch: stopped by signal {} (the job exited with status {})\n", g_stop_signal, status);
        return status;
      }
      if (alive.size() != hosts.size()) {
        hosts = alive;
        job = make_job(o, hosts, several, mpirun, program);
      }
    }
    fmt::print(stderr, "coil launch: the job failed with status {}; restart {} of {}{} (it resumes from its latest checkpoint)\n",
               status, attempt + 1, o.max_restarts, several ? fmt::format(" on {} rank(s) on {}", job.ranks, job.host_list) : "");
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
  cmd->add_option("--min-nodes", o->min_nodes,
                  "several hosts: at a restart, go on without hosts that no longer answer while at least this many do "
                  "(default: all of them, no host may be lost)");
  cmd->add_option("--host-wait", o->host_wait, "seconds a host that does not answer at a restart is waited for before it is dropped")
      ->capture_default_str();
  cmd->add_flag("--oversubscribe", o->oversubscribe, "allow more ranks than cores");
  cmd->add_option("command", o->command, "the command every rank runs, after --")->required();
  cmd->footer(
      "Example: coil launch --nproc-per-node 4 --max-restarts 3 -- coil pretrain --config configs/pretrain.toml\n"
      "       coil launch --hosts node1:2,node2:2 -- coil pretrain ...   (or --hostfile FILE: `node1 slots=2` a line)\n"
      "Output lines are prefixed [rank R] ([rank R host] on several hosts). SIGINT/SIGTERM/SIGUSR1/SIGUSR2 are forwarded to every rank (SIGTERM or\n"
      "SIGUSR1 make a training run save a checkpoint and exit). A failed job is started again and resumes from\n"
      "its latest checkpoint; the exit status is the job's. A job that exits with status 2 (coil's usage or configuration\n"
      "error: a bad TOML file, an unknown key, a value out of range) is not restarted: the same again would fail the same.\n"
      "Several hosts: before a restart every host must answer `ssh HOST true` (OMPI_MCA_plm_rsh_agent's agent); one that\n"
      "does not (a lost node, a link down) is asked again for --host-wait seconds, then dropped if --min-nodes hosts still\n"
      "answer: the job goes on with fewer ranks (the checkpoint reshards to the new world size; the global batch stays).\n"
      "Fewer than --min-nodes: the launcher gives up. Example: --hosts node1:8,node2:8 --max-restarts 3 --min-nodes 1.");
  on_run(cmd, [o] {
    const int status = run_launch(*o);
    if (status != 0) std::exit(status);
  });
}

}  // namespace coil
