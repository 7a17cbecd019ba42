// Saving checkpoints during training (CheckpointSaver), and finding the one to resume from.
//
// A save, on every rank: save() waits for the save in flight (if any), then rank 0 makes
// <name>.tmp/, all ranks meet at a barrier, and each rank's writer writes, fsyncs and checksums
// its rank file from the host copy it was handed (on a background thread when async). The
// training thread learns that every writer is done through busy(), summed in the step's
// all-reduce, and then calls finish(): the ranks exchange their file records; rank 0 writes the
// index, renames the folder into place and re-points the links; every rank learns the outcome.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <regex>
#include <set>
#include <thread>

#include "dist/checkpoint.h"
#include "dist/comm.h"
#include "util/error.h"

namespace coil::dist {
namespace fs = std::filesystem;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool is_step_dir(const fs::directory_entry& e) {
  static const std::regex step_name("step-[0-9]{8}");
  return e.is_directory() && !e.is_symlink() && std::regex_match(e.path().filename().string(), step_name);
}

// The step folders of a checkpoints folder, oldest first.
std::vector<std::string> step_dirs(const std::string& dir) {
  std::vector<std::string> out;
  if (!fs::exists(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (is_step_dir(e)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string link_target(const std::string& dir, const char* link) {
  const fs::path l = fs::path(dir) / link;
  return fs::is_symlink(l) ? fs::read_symlink(l).filename().string() : std::string();
}

// Deletes the step folders older than the newest `keep`, except those a link points to.
void prune(const std::string& dir, int64_t keep) {
  if (keep <= 0) return;
  const std::vector<std::string> steps = step_dirs(dir);
  const std::set<std::string> linked{link_target(dir, "latest"), link_target(dir, "best"), link_target(dir, "final")};
  for (size_t i = 0; i + static_cast<size_t>(keep) < steps.size(); ++i)
    if (!linked.count(steps[i])) fs::remove_all(fs::path(dir) / steps[i]);
}

// The same value on every rank: rank 0's.
bool agree(Comm* comm, bool value) {
  if (!comm || comm->size() == 1) return value;
  at::Tensor t = at::tensor({value ? 1.0 : 0.0}, at::kDouble);
  comm->broadcast(t, 0);
  return t.item<double>() != 0;
}

}  // namespace

struct CheckpointSaver::Pending {
  SaveRequest request;
  RankPart layout;  // the tensors' names, shapes and dtypes, without their data (for the index)
  std::string tmp;
  std::thread writer;
  std::atomic<bool> done{false};
  FileRecord record;
};

CheckpointSaver::CheckpointSaver(std::string dir, std::shared_ptr<Comm> comm, bool async, int64_t keep_last_k)
    : dir_(std::move(dir)), comm_(std::move(comm)), async_(async), keep_last_k_(keep_last_k) {}

CheckpointSaver::~CheckpointSaver() {
  if (pending_ && pending_->writer.joinable()) pending_->writer.join();
}

double CheckpointSaver::busy() const { return pending_ && !pending_->done ? 1.0 : 0.0; }

void CheckpointSaver::save(SaveRequest request) {
  if (pending_) finish();
  const double t0 = now_s();
  const int rank = comm_ ? comm_->rank() : 0;
  auto p = std::make_unique<Pending>();
  p->tmp = (fs::path(dir_) / (request.name + ".tmp")).string();
  if (rank == 0) {
    fs::remove_all(p->tmp);
    fs::create_directories(p->tmp);
  }
  if (comm_) comm_->barrier();  // the folder exists before any rank writes into it
  p->layout.rank = request.part.rank;
  p->layout.world = request.part.world;
  p->layout.step = request.part.step;
  for (const auto& t : request.part.tensors) {
    std::vector<int64_t> none = t.shape;
    none[0] = 0;
    p->layout.tensors.push_back({t.name, t.shape, 0, at::empty(none, t.rows.options())});
  }
  p->request = std::move(request);
  Pending* raw = p.get();
  auto work = [raw] {
    raw->record = write_rank_file(raw->tmp, raw->request.part);
    raw->request.part = RankPart{};  // free the host copy
    raw->done = true;
  };
  pending_ = std::move(p);
  if (async_) pending_->writer = std::thread(work);
  else work();
  stall_s_ += now_s() - t0;
}

bool CheckpointSaver::finish() {
  if (!pending_) return true;
  const double t0 = now_s();
  Pending& p = *pending_;
  if (p.writer.joinable()) p.writer.join();
  const std::vector<std::string> records = all_gather_strings(comm_.get(), p.record.to_json());
  const int rank = comm_ ? comm_->rank() : 0;
  bool saved = true;
  if (rank == 0) {
    IndexInfo info;
    info.step = p.layout.step;
    info.world = p.layout.world;
    info.strings = p.request.strings;
    info.tokenizer = p.request.tokenizer;
    std::string why;
    for (size_t r = 0; r < records.size(); ++r) {
      info.files.push_back(FileRecord::from_json(records[r]));
      if (!info.files.back().error.empty() && why.empty()) why = fmt::format("rank {}: {}", r, info.files.back().error);
    }
    if (why.empty()) {
      try {
        write_index(p.tmp, p.layout, info);
        commit_directory(p.tmp, (fs::path(dir_) / p.request.name).string());
        point_link(dir_, "latest", p.request.name);
        if (p.request.best) point_link(dir_, "best", p.request.name);
        if (p.request.final) point_link(dir_, "final", p.request.name);
        prune(dir_, keep_last_k_);
      } catch (const std::exception& e) {
        why = e.what();
      }
    }
    if (!why.empty()) {
      saved = false;
      std::error_code ignored;
      fs::remove_all(p.tmp, ignored);
      fmt::print(stderr, "coil: warning: checkpoint {} was not saved ({}); the next checkpoint saves again\n",
                 p.request.name, why);
    }
  }
  saved = agree(comm_.get(), saved);
  pending_.reset();
  stall_s_ += now_s() - t0;
  return saved;
}

std::string find_intact_checkpoint(const std::string& dir, const std::shared_ptr<Comm>& comm,
                                   std::vector<std::string>* warnings) {
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;
  std::vector<std::string> candidates;
  const std::string latest = link_target(dir, "latest");
  if (!latest.empty() && fs::exists(fs::path(dir) / latest)) candidates.push_back(latest);
  std::vector<std::string> steps = step_dirs(dir);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it)
    if (*it != latest) candidates.push_back(*it);
  std::vector<std::string> damaged;
  for (const std::string& name : candidates) {
    const std::string path = (fs::path(dir) / name).string();
    std::vector<std::string> problems;
    try {
      Checkpoint ck(path);
      problems = ck.verify(rank, world);
    } catch (const std::exception& e) {
      problems.push_back(e.what());
    }
    std::string all;
    for (const auto& p : problems) all += (all.empty() ? "" : "; ") + p;
    const std::vector<std::string> ranks = all_gather_strings(comm.get(), all);
    all.clear();
    for (const auto& r : ranks)
      if (!r.empty()) all += (all.empty() ? "" : "; ") + r;
    if (all.empty()) {
      if (rank == 0 && !damaged.empty()) {  // out of the way of later saves, kept for a post-mortem
        for (const auto& d : damaged) {
          std::error_code ignored;
          fs::remove_all(fs::path(dir) / (d + ".damaged"), ignored);
          fs::rename(fs::path(dir) / d, fs::path(dir) / (d + ".damaged"), ignored);
        }
        point_link(dir, "latest", name);
      }
      if (comm) comm->barrier();
      return path;
    }
    damaged.push_back(name);
    if (warnings) warnings->push_back(fmt::format("checkpoint {} is damaged: {}", path, all));
  }
  return {};
}

void remove_interrupted_saves(const std::string& dir) {
  if (!fs::exists(dir)) return;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    auto ends = [&](const std::string& s) { return name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
    if (ends(".tmp") || ends(".tmp-link") || ends(".old")) fs::remove_all(e.path());
  }
}

}  // namespace coil::dist
