// Saving checkpoints during training (CheckpointSaver), and finding the one to resume from.
//
// A save, on every rank: save() waits for the save in flight (if any), then rank 0 makes
// <name>.tmp/, all ranks meet at a barrier, and each rank's writer writes, fsyncs and checksums
// its rank file from the host copy it was handed (on a background thread when async). The
// training thread learns that every writer is done through busy(), summed in the step's
// all-reduce, and then calls finish(): the ranks exchange their file records; rank 0 writes the
// index, renames the folder into place and re-points the links; every rank learns the outcome.
#include <ATen/ATen.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
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
  std::thread writer;            // this rank's file
  std::atomic<bool> written{false};
  FileRecord record;
  bool exchanged = false;        // the ranks' records gathered; rank 0 commits
  std::thread committer;         // rank 0: index, rename, links (in the background when async)
  bool committed = false;
  std::string error;             // rank 0: why it was not committed
};

CheckpointSaver::CheckpointSaver(std::string dir, std::shared_ptr<Comm> comm, bool async, int64_t keep_last_k)
    : dir_(std::move(dir)), comm_(std::move(comm)), async_(async), keep_last_k_(keep_last_k) {}

CheckpointSaver::~CheckpointSaver() {
  if (!pending_) return;
  if (pending_->writer.joinable()) pending_->writer.join();
  if (pending_->committer.joinable()) pending_->committer.join();
}

double CheckpointSaver::busy() const { return pending_ && !pending_->written ? 1.0 : 0.0; }
bool CheckpointSaver::awaiting_commit() const { return pending_ && !pending_->exchanged; }

at::Tensor CheckpointSaver::stage(const std::string& name, const at::Tensor& src) {
  COIL_CHECK(!pending_, "CheckpointSaver::stage: a save is in flight (finish() it first)");
  const double t0 = now_s();
  at::Tensor& buf = staging_[name];
  // From a GPU: a pinned (page-locked) buffer, so the device-to-host copy is one DMA transfer
  // instead of a copy through a pageable bounce buffer. Pinning needs a CUDA context: CPU tensors
  // get plain memory.
  const bool pin = src.is_cuda();
  if (!buf.defined() || buf.sizes() != src.sizes() || buf.scalar_type() != src.scalar_type() || buf.is_pinned() != pin)
    buf = at::empty(src.sizes(), src.options().device(at::kCPU).pinned_memory(pin));
  buf.copy_(src.detach());  // blocking: the writer thread reads buf once save() hands it over
  stall_s_ += now_s() - t0;
  return buf;
}

void CheckpointSaver::save(SaveRequest request) {
  if (pending_) finish();
  const double t0 = now_s();
  const int rank = comm_ ? comm_->rank() : 0;
  auto p = std::make_unique<Pending>();
  p->tmp = (fs::path(dir_) / (request.name + ".tmp")).string();
  std::string mkdir_error;  // rank 0 could not make the folder (a read-only or full file system)
  if (rank == 0) {
    std::error_code ec;
    fs::remove_all(p->tmp, ec);
    if (!ec) fs::create_directories(p->tmp, ec);
    if (ec) mkdir_error = fmt::format("cannot create {}: {}", p->tmp, ec.message());
  }
  if (comm_) comm_->barrier();  // the folder exists before any rank writes into it
  p->layout.rank = request.part.rank;
  p->layout.world = request.part.world;
  p->layout.shard = request.part.shard;
  p->layout.step = request.part.step;
  for (const auto& t : request.part.tensors) {
    std::vector<int64_t> none = t.shape;
    none[0] = 0;
    p->layout.tensors.push_back({t.name, t.shape, 0, at::empty(none, t.rows.options())});
  }
  p->request = std::move(request);
  Pending* raw = p.get();
  auto work = [raw, async = async_, mkdir_error] {
    // A background writer yields the cores to training (Linux: nice applies per thread).
    if (async) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
    if (mkdir_error.empty()) {
      raw->record = write_rank_file(raw->tmp, raw->request.part);
    } else {
      raw->record.name = rank_file_name(raw->request.part.rank, raw->request.part.world);
      raw->record.error = mkdir_error;
    }
    raw->request.part = RankPart{};  // let go of the host copy
    raw->written = true;
  };
  pending_ = std::move(p);
  if (async_) pending_->writer = std::thread(work);
  else work();
  stall_s_ += now_s() - t0;
}

void CheckpointSaver::commit() {
  if (!pending_ || pending_->exchanged) return;
  const double t0 = now_s();
  Pending& p = *pending_;
  if (p.writer.joinable()) p.writer.join();
  const std::vector<std::string> records = all_gather_strings(comm_.get(), p.record.to_json());
  p.exchanged = true;
  if ((comm_ ? comm_->rank() : 0) == 0) {
    IndexInfo info;
    info.step = p.layout.step;
    info.world = p.layout.world;
    info.shard = p.layout.shard;
    info.strings = p.request.strings;
    info.tokenizer = p.request.tokenizer;
    for (const auto& r : records) info.files.push_back(FileRecord::from_json(r));
    auto work = [this, &p, info = std::move(info)] {
      std::string why;
      for (size_t r = 0; r < info.files.size() && why.empty(); ++r)
        if (!info.files[r].error.empty()) why = fmt::format("rank {}: {}", r, info.files[r].error);
      if (why.empty()) {
        try {
          write_index(p.tmp, p.layout, info);
          commit_directory(p.tmp, (fs::path(dir_) / p.request.name).string());
          point_link(dir_, "latest", p.request.name);
          if (p.request.best) point_link(dir_, "best", p.request.name);
          if (p.request.final) point_link(dir_, "final", p.request.name);
        } catch (const std::exception& e) {
          why = e.what();
        }
      }
      if (why.empty()) {
        p.committed = true;
        try {  // the checkpoint is in place: a folder that cannot be deleted is only a warning
          prune(dir_, keep_last_k_);
        } catch (const std::exception& e) {
          fmt::print(stderr, "coil: warning: old checkpoints were not deleted ({})\n", e.what());
        }
      } else {
        std::error_code ignored;
        fs::remove_all(p.tmp, ignored);
        p.error = why;
        if (!p.request.last)
          fmt::print(stderr, "coil: warning: checkpoint {} was not saved ({}); the next checkpoint saves again\n",
                     p.request.name, why);
      }
    };
    if (async_) p.committer = std::thread(work);
    else work();
  }
  stall_s_ += now_s() - t0;
}

bool CheckpointSaver::finish() {
  if (!pending_) return true;
  commit();
  const double t0 = now_s();
  if (pending_->committer.joinable()) pending_->committer.join();
  const bool saved = agree(comm_.get(), pending_->committed);
  error_.clear();
  if (!saved) error_ = all_gather_strings(comm_.get(), pending_->error).front();  // rank 0's
  pending_.reset();
  stall_s_ += now_s() - t0;
  return saved;
}

std::string read_verified(const Checkpoint& ck, const std::shared_ptr<Comm>& comm,
                          const std::function<void(const Checkpoint&)>& read) {
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;
  // This rank's share of the files is checksummed on another thread while `read` reads: one pass
  // over the disk for both. What was read is only trusted once every rank found its share intact.
  auto verifying = std::async(std::launch::async, [&] { return ck.verify(rank, world); });
  std::string read_error;
  try {
    if (read) read(ck);
  } catch (const std::exception& e) {
    read_error = e.what();
  }
  std::string problems;
  for (const auto& p : verifying.get()) problems += (problems.empty() ? "" : "; ") + p;
  auto join = [&](const std::string& mine) {
    std::string all;
    for (const auto& r : all_gather_strings(comm.get(), mine))
      if (!r.empty()) all += (all.empty() ? "" : "; ") + r;
    return all;
  };
  problems = join(problems);
  read_error = join(read_error);
  if (problems.empty() && !read_error.empty()) fail("{}", read_error);  // intact, but not for this model
  return problems;
}

std::string find_intact_checkpoint(const std::string& dir, const std::shared_ptr<Comm>& comm,
                                   std::vector<std::string>* warnings,
                                   const std::function<void(const Checkpoint&)>& read) {
  const int rank = comm ? comm->rank() : 0;
  std::vector<std::string> candidates;
  const std::string latest = link_target(dir, "latest");
  if (!latest.empty() && fs::exists(fs::path(dir) / latest)) candidates.push_back(latest);
  std::vector<std::string> steps = step_dirs(dir);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it)
    if (*it != latest) candidates.push_back(*it);
  std::vector<std::string> damaged;
  for (const std::string& name : candidates) {
    const std::string path = (fs::path(dir) / name).string();
    std::string problems;
    std::unique_ptr<Checkpoint> ck;
    try {
      ck = std::make_unique<Checkpoint>(path);
    } catch (const std::exception& e) {
      problems = e.what();
    }
    // Every rank opens the same files, so `ck` is null on all ranks or on none.
    if (ck) problems = read_verified(*ck, comm, read);
    if (problems.empty()) {
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
    if (warnings) warnings->push_back(fmt::format("checkpoint {} is damaged: {}", path, problems));
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
