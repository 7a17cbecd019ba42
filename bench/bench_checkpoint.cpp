// Checkpoint I/O against `dd` on the same disk, in one run:
//   save: a synchronous checkpoint of a model's parameters and optimizer state (HDF5 rank file,
//     fsync, CRC-32 read back, index, rename) vs `dd if=/dev/zero bs=8M conv=fsync` of as many bytes;
//     target >= 70% of dd's throughput.
//   load: read every tensor while the files' CRC-32s are checked alongside (as a resuming run
//     does), from a cold page cache (the files' pages dropped with posix_fadvise) vs
//     `dd of=/dev/null` of the same cold bytes; target >= 70%.
//   open: Checkpoint() alone from a cold page cache (HDF5 opens index.h5 and reads its attributes),
//     with the index's CRC-32 checked first (index.h5.crc32) and without (an older Coil's
//     checkpoint), alternating: the cost of the check (a read of every byte of the index).
//   async stall: the time the training thread is blocked by an async save (the host copy of the
//     state, save() and finish()) against a synchronous save's time; target <= 10%. A compute loop
//     (one thread of matmuls, standing in for training) also shows how much the write slows it
//     down by sharing the machine's cores.
//   bench_checkpoint [--preset 130m] [--dir DIR]
// Under mpirun each rank writes its own rows (run it with -np 1; the ratio is per disk).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/core.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>

#include <chrono>
#include <cstdlib>
#include <filesystem>

#include "dist/checkpoint.h"
#include "model/mamba.h"
#include "optim/hybrid.h"

using namespace coil;
namespace fs = std::filesystem;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void drop_cache(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void drop_cache_tree(const fs::path& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) drop_cache(e.path());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double run_timed(const std::string& cmd) {
  const double t0 = now();
  if (std::system(cmd.c_str()) != 0) throw std::runtime_error("failed: " + cmd);
  return now() - t0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Checkpoint save/load throughput against dd, and the stall of an async save");
  std::string preset = "130m", dir = (fs::temp_directory_path() / "coil-bench-ckpt").string();
  app.add_option("--preset", preset, "model preset")->capture_default_str();
  app.add_option("--dir", dir, "scratch folder on the disk to measure")->capture_default_str();
  bool keep = false;
  app.add_flag("--keep", keep, "keep the checkpoints written (in DIR/checkpoints)");
  int reps = 7;
  app.add_option("--reps", reps, "repetitions of the save and load measurements")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  fs::remove_all(dir);
  fs::create_directories(dir);

  // The state of a training run: parameters and the hybrid optimizer's state (Muon momenta, Adam
  // moments), random values (incompressible for the disk, as real weights are).
  MambaLM model(MambaConfig::preset(preset), 0);
  std::vector<NamedTensor> params = model.named_parameters();
  std::vector<std::vector<int64_t>> shapes;
  for (auto& p : params) shapes.push_back(p.tensor.sizes().vec());
  optim::HybridOptimizer opt(params, optim::HybridConfig{}, shapes);
  const std::vector<NamedTensor> state = opt.state();
  for (const auto& t : state) t.tensor.normal_();
  // What the training loop hands the saver: host copies of this rank's rows, in buffers the saver
  // keeps from one save to the next.
  auto request = [&](dist::CheckpointSaver& saver, int64_t step) {
    dist::SaveRequest r;
    r.name = fmt::format("step-{:08d}", step);
    r.part.step = step;
    for (const auto& p : params) r.part.tensors.push_back({"model/" + p.name, p.tensor.sizes().vec(), 0, saver.stage(p.name, p.tensor)});
    for (const auto& t : state) r.part.tensors.push_back({"optimizer/" + t.name, t.tensor.sizes().vec(), 0, saver.stage(t.name, t.tensor)});
    r.strings = {{"config", "# bench"}};
    return r;
  };
  int64_t bytes = 0;
  for (const auto& t : params) bytes += t.tensor.nbytes();
  for (const auto& t : state) bytes += t.tensor.nbytes();
  fmt::print("state: {} preset, {} tensors, {:.1f} MB; scratch {}\n", preset, params.size() + state.size(), bytes / 1e6, dir);

  // Each measurement is repeated `reps` times, dd and Coil one after the other, which goes first
  // alternating (this machine's disk is shared: one write of 1.2 GB takes 1.5 s or 5 s); the
  // table shows the medians, and the range of the ratios of the pairs.
  const int64_t mb8 = (bytes + (8 << 20) - 1) >> 23;
  const double dd_bytes = static_cast<double>(mb8) * 8.388608e6;
  const std::string ckpts = dir + "/checkpoints";
  std::vector<NamedTensor> into = params;  // read into tensors that exist, as a resuming run does
  for (auto& t : into) t.tensor = at::ones_like(t.tensor), t.name = "model/" + t.name;
  for (const auto& t : state) into.push_back({"optimizer/" + t.name, at::ones_like(t.tensor)});
  std::vector<double> dd_w, save_t, dd_r, load_t, save_ratio, load_ratio, open_checked, open_unchecked;
  double file_bytes = 0, dd_cpu = 0;
  // dd copies random bytes (zeros may be cheaper for a virtual disk) from memory (tmpfs).
  const std::string source = "/dev/shm/coil-bench-ckpt.bin";
  run_timed(fmt::format("head -c {} /dev/urandom > {}", mb8 << 23, source));
  for (int rep = -1; rep < reps; ++rep) {  // rep -1: a warm-up (a VM's memory is slow at first touch)
    auto run_dd = [&] {
      struct rusage before {}, after {};
      getrusage(RUSAGE_CHILDREN, &before);
      // A new file each time, the previous one removed after, as checkpoints come and go: the
      // page cache needs new pages for each, which costs on a VM whose memory is slow at first
      // touch (overwriting one file would reuse the pages just freed).
      dd_w.push_back(run_timed(fmt::format("dd if={} of={}/dd-{}.bin bs=8M conv=fsync status=none", source, dir, rep + 1)));
      fs::remove(fmt::format("{}/dd-{}.bin", dir, rep));
      getrusage(RUSAGE_CHILDREN, &after);
      dd_cpu = (after.ru_stime.tv_sec - before.ru_stime.tv_sec) + 1e-6 * (after.ru_stime.tv_usec - before.ru_stime.tv_usec) +
               (after.ru_utime.tv_sec - before.ru_utime.tv_sec) + 1e-6 * (after.ru_utime.tv_usec - before.ru_utime.tv_usec);
    };
    auto run_save = [&] {
      dist::CheckpointSaver sync(ckpts, nullptr, /*async=*/false, 1);
      dist::SaveRequest r = request(sync, rep + 2);  // the host copy first: the time is the writing's
      const double t0 = now();
      sync.save(std::move(r));
      sync.finish();
      save_t.push_back(now() - t0);
    };
    if (rep % 2 == 0) run_dd(), run_save();  // alternating which goes first
    else run_save(), run_dd();
    if (rep < 0) {
      dd_w.clear(), save_t.clear();
      continue;
    }
    file_bytes = static_cast<double>(dist::Checkpoint(ckpts + "/latest").total_bytes());
    save_ratio.push_back((file_bytes / save_t.back()) / (dd_bytes / dd_w.back()));


    const std::string dd_file = fmt::format("{}/dd-{}.bin", dir, rep + 1);
    drop_cache(dd_file);
    dd_r.push_back(run_timed(fmt::format("dd if={} of=/dev/null bs=8M status=none", dd_file)));
    drop_cache_tree(fs::canonical(ckpts + "/latest"));
    double t0 = now();
    {
      // As a resuming run reads: the tensors read while the files are checksummed on another thread.
      dist::Checkpoint ck(ckpts + "/latest");
      const std::string problems = dist::read_verified(ck, nullptr, [&](const dist::Checkpoint& c) {
        for (const auto& t : into) c.read(t.name, t.tensor);
      });
      if (!problems.empty()) throw std::runtime_error(problems);
    }
    load_t.push_back(now() - t0);
    load_ratio.push_back((file_bytes / load_t.back()) / (dd_bytes / dd_r.back()));

    const fs::path latest = fs::canonical(ckpts + "/latest"), sum = latest / "index.h5.crc32", aside = dir + "/aside.crc32";
    auto open_cold = [&](bool checked) {
      if (!checked) fs::rename(sum, aside);
      drop_cache_tree(latest);
      const double t1 = now();
      {
        dist::Checkpoint ck(latest.string());
        if (ck.index_checked() != checked) throw std::runtime_error("index_checked() is not as expected");
      }
      (checked ? open_checked : open_unchecked).push_back(now() - t1);
      if (!checked) fs::rename(aside, sum);
    };
    if (rep % 2 == 0) open_cold(true), open_cold(false);
    else open_cold(false), open_cold(true);
  }
  const double save_s = median(save_t);
  // ---- Async stall ----
  // A compute loop on one thread (standing in for a training step) runs a fixed number of steps
  // with no save and with an async save started at its first step boundary.
  at::set_num_threads(1);
  at::Tensor a = at::randn({384, 384}), b = at::randn({384, 384});
  auto step = [&] {
    for (int i = 0; i < 8; ++i) a = at::mm(a, b).div_(20);
  };
  for (int i = 0; i < 20; ++i) step();
  double t0 = now();
  int steps = 0;
  while (now() - t0 < 1.5 * save_s + 1) step(), ++steps;  // a loop longer than a save
  const double loop_plain = now() - t0;
  dist::CheckpointSaver async(ckpts, nullptr, /*async=*/true, 1);
  async.save(request(async, 100));  // a first save, so that the staging buffers exist (as after a
  async.finish();                   // run's first checkpoint)
  const double before = async.stall_seconds();
  t0 = now();
  for (int i = 0; i < steps; ++i) {
    if (i == 0) async.save(request(async, 101));  // the host copy is part of the stall here
    step();
    if (async.awaiting_commit() && async.busy() == 0) async.commit();
  }
  const double loop_async = now() - t0;
  async.finish();
  const double blocked = async.stall_seconds() - before;
  fs::remove(source);

  auto range = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return fmt::format("{:.0f}-{:.0f}%", 100 * v.front(), 100 * v.back());
  };
  fmt::print("\n{} repetitions, medians:\n\n| | time | throughput | vs dd (range) |\n| --- | --- | --- | --- |\n", reps);
  fmt::print("| dd write (conv=fsync) | {:.2f} s | {:.0f} MB/s | |\n", median(dd_w), dd_bytes / 1e6 / median(dd_w));
  fmt::print("| save (sync: HDF5 + fsync + CRC + index + rename) | {:.2f} s | {:.0f} MB/s | **{:.0f}%** ({}) |\n", save_s,
             file_bytes / 1e6 / save_s, 100 * median(save_ratio), range(save_ratio));
  fmt::print("| dd read (cold) | {:.2f} s | {:.0f} MB/s | |\n", median(dd_r), dd_bytes / 1e6 / median(dd_r));
  fmt::print("| load (cold: read every tensor, CRC of every file alongside) | {:.2f} s | {:.0f} MB/s | **{:.0f}%** ({}) |\n",
             median(load_t), file_bytes / 1e6 / median(load_t), 100 * median(load_ratio), range(load_ratio));
  fmt::print("\nload (cold, as above): {:.2f} ms; open alone (cold: Checkpoint(), index.h5 of {:.0f} kB): {:.2f} ms with its CRC-32 "
             "checked first, {:.2f} ms unchecked (no index.h5.crc32): the check costs {:.2f} ms\n",
             1e3 * median(load_t), fs::file_size(fs::canonical(ckpts + "/latest") / "index.h5") / 1e3, 1e3 * median(open_checked),
             1e3 * median(open_unchecked), 1e3 * (median(open_checked) - median(open_unchecked)));
  fmt::print("\nThe last dd write used {:.2f} s of CPU (kernel) in {:.2f} s: on a VM whose memory is slow at first touch,\n"
             "filling new page-cache pages costs CPU time, for dd and Coil alike.\n",
             dd_cpu, dd_w.back());
  fmt::print("async save: the training thread was blocked {:.3f} s (the host copy, save(), commit(), finish()) = "
             "**{:.1f}%** of a synchronous save ({:.2f} s).\n",
             blocked, 100 * blocked / save_s, save_s);
  fmt::print("The compute loop ({} steps, 1 thread) took {:.2f} s with no save and {:.2f} s with the save in flight: "
             "{:.2f} s slower ({:.0f}% of the synchronous save) from sharing the cores with the write.\n",
             steps, loop_plain, loop_async, loop_async - loop_plain, 100 * (loop_async - loop_plain) / save_s);
  if (!keep) fs::remove_all(dir);
  return 0;
}
