#include "launch/ranks.h"

#include <unistd.h>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <chrono>
#include <random>
#include <thread>

#include "util/error.h"

namespace coil {
namespace fs = std::filesystem;

namespace {
constexpr int kWords = 16;  // 128 bytes per string

at::Tensor pack(const std::string& s) {
  at::Tensor t = at::zeros({kWords}, at::kLong);
  std::memcpy(t.data_ptr<int64_t>(), s.data(), std::min(s.size(), static_cast<size_t>(kWords * 8 - 1)));
  return t;
}

std::string unpack(const at::Tensor& t) {
  const char* p = reinterpret_cast<const char*>(t.data_ptr<int64_t>());
  return std::string(p, strnlen(p, kWords * 8));
}

std::string this_host() {
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  return name;
}
}  // namespace

int Ranks::nodes() const {
  std::map<std::string, int> hosts;
  for (const auto& r : ranks) ++hosts[r.host];
  return static_cast<int>(hosts.size());
}

std::string Ranks::describe(int threads_per_rank) const {
  // Hosts in the order of their first rank, each with its ranks and their devices.
  std::vector<std::string> order;
  std::map<std::string, std::vector<int>> of;
  for (int r = 0; r < static_cast<int>(ranks.size()); ++r) {
    if (!of.count(ranks[r].host)) order.push_back(ranks[r].host);
    of[ranks[r].host].push_back(r);
  }
  size_t most = 0, least = ranks.size();
  for (const auto& [h, rs] : of) most = std::max(most, rs.size()), least = std::min(least, rs.size());
  std::string s = fmt::format("{} node(s) x {} rank(s) per node, {} thread(s) per rank", order.size(),
                              most == least ? std::to_string(most) : fmt::format("{}-{}", least, most), threads_per_rank);
  for (const auto& h : order) {
    s += fmt::format("; {}:", h);
    for (int r : of[h]) s += fmt::format(" rank {} {}", r, ranks[r].device);
  }
  return s;
}

Ranks gather_ranks(dist::Comm* comm, int rank, int world, const std::string& device) {
  Ranks out;
  if (!comm || world == 1) {
    out.ranks.push_back({this_host(), device});
    return out;
  }
  (void)rank;
  at::Tensor mine = at::cat({pack(this_host()), pack(device)});
  at::Tensor all = at::empty({world * 2 * kWords}, at::kLong);
  comm->all_gather(mine, all);
  for (int r = 0; r < world; ++r)
    out.ranks.push_back({unpack(all.narrow(0, 2 * kWords * r, kWords)), unpack(all.narrow(0, 2 * kWords * r + kWords, kWords))});
  return out;
}

void check_shared_run_dir(const std::string& run_dir, dist::Comm* comm, int rank, const Ranks& ranks) {
  const int world = static_cast<int>(ranks.ranks.size());
  // Rank 0 makes the folder and writes the token; its failure to do so is every rank's error too.
  const fs::path file = fs::path(run_dir) / ".coil-shared-check";
  int64_t token = 0;
  std::string root_problem;
  if (rank == 0) {
    std::random_device rd;
    token = (static_cast<int64_t>(rd()) << 31) ^ static_cast<int64_t>(rd()) ^ static_cast<int64_t>(::getpid());
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec) root_problem = fmt::format("train.run_dir: cannot create {}: {}", run_dir, ec.message());
    else if (!(std::ofstream(file) << token << '\n'))
      root_problem = fmt::format("train.run_dir: cannot write {}", file.string());
  }
  if (!comm || world == 1) {
    COIL_CHECK(root_problem.empty(), "{}", root_problem);
    fs::remove(file);
    return;
  }
  // The token to every rank (and rank 0's failure, as token 0), after rank 0 wrote the file.
  at::Tensor t = at::tensor({root_problem.empty() ? token : int64_t{0}}, at::kLong);
  comm->broadcast(t, 0);
  token = t.item<int64_t>();
  COIL_CHECK(token != 0, "{}", root_problem.empty() ? "train.run_dir: rank 0 could not write its check file" : root_problem);
  int64_t seen = 0;
  std::ifstream(file) >> seen;
  // Every rank learns which ranks did not see the token: a vector of flags, summed.
  at::Tensor missing = at::zeros({world}, at::kLong);
  if (seen != token) missing[rank] = 1;
  comm->all_reduce(missing);
  comm->barrier();
  if (rank == 0) fs::remove(file);
  for (int r = 0; r < world; ++r)
    if (missing[r].item<int64_t>() != 0) {
      // Every rank fails alike; rank 0 says it first (its error ends every rank, MPI_Abort), the
      // others only if it has not done so within seconds: one line, and no rank left waiting.
      if (rank != 0) std::this_thread::sleep_for(std::chrono::seconds(10));
      fail("train.run_dir {} is not shared by all ranks: rank {} on host {} does not see the file rank 0 ({}) wrote "
           "there ({} rank(s) in all do not); put run_dir on a file system every node mounts",
           run_dir, r, ranks.ranks[r].host, ranks.ranks[0].host, missing.sum().item<int64_t>());
    }
}

}  // namespace coil
