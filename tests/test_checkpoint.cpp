// Distributed checkpoints under mpirun (1 to 4 ranks): checkpoints saved on N = 1..4 ranks read
// back on this run's M ranks bit for bit (each rank its FSDP rows, and whole tensors); the
// collective saver (async) writes every rank's rows, keeps the last k, and survives a failed save;
// truncated, flipped, missing rank files and a missing index are detected, and resuming falls back
// to the previous intact checkpoint; failed writes, opens and renames are one-line errors naming the
// file and the system's reason, with nothing from HDF5 on stderr (from any thread).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fmt/format.h>

#include <fstream>
#include <thread>

#include "dist/checkpoint.h"
#include "dist/comm.h"
#include "dist/fsdp.h"
#include "dist/world.h"
#include "util/error.h"

using namespace coil;
using namespace coil::dist;
namespace fs = std::filesystem;

namespace {

// Tensors of odd row counts (7 and 13 rows split 3 or 4 ways; 1 row on 4 ranks leaves ranks empty).
struct Spec {
  const char* name;
  std::vector<int64_t> shape;
};
const std::vector<Spec> kSpecs = {{"model/a.weight", {7, 3}},
                                  {"model/b.bias", {5}},
                                  {"model/c.one_row", {1, 4}},
                                  {"optimizer/adamw.a.weight.exp_avg", {13, 2}},
                                  {"optimizer/muon.d.momentum", {9, 5}}};

at::Tensor global(size_t i, int64_t step) {
  at::Generator gen = at::detail::createCPUGenerator(100 * step + i);
  return at::randn(kSpecs[i].shape, gen);
}

RankPart part_of(int rank, int world, int64_t step) {
  RankPart p;
  p.rank = rank, p.world = world, p.step = step;
  for (size_t i = 0; i < kSpecs.size(); ++i) {
    const auto [b, e] = rank_rows(kSpecs[i].shape[0], rank, world);
    p.tensors.push_back({kSpecs[i].name, kSpecs[i].shape, b, global(i, step).narrow(0, b, e - b).clone()});
  }
  p.strings["loader_state"] = fmt::format("{{\"rank\": {}}}", rank);
  p.rng = at::detail::getDefaultCPUGenerator().get_state();
  return p;
}

// Writes a whole checkpoint of `world` ranks from one process (what each rank would write).
void write_checkpoint(const std::string& dir, int world, int64_t step) {
  fs::create_directories(dir);
  IndexInfo info;
  info.step = step, info.world = world;
  for (int r = 0; r < world; ++r) {
    info.files.push_back(write_rank_file(dir, part_of(r, world, step)));
    ASSERT_EQ(info.files.back().error, "");
  }
  info.strings = {{"config", "# none"}, {"tokens_seen", "42"}};
  info.tokenizer = "not really a tokenizer";
  write_index(dir, part_of(0, world, step), info);
}

// A folder every rank agrees on (rank 0 makes it).
std::string shared_dir(Comm& comm, const char* what) {
  std::string mine;
  if (comm.rank() == 0) {
    mine = (fs::temp_directory_path() / fmt::format("coil-test-{}-{}", what, getpid())).string();
    fs::remove_all(mine);
    fs::create_directories(mine);
  }
  return all_gather_strings(&comm, mine)[0];
}

std::shared_ptr<Comm> comm() {
  static std::shared_ptr<Comm> c = make_mpi_comm();
  return c;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(Checkpoint, SavedOnAnyWorldSizeLoadsOnThisOneBitForBit) {
  auto c = comm();
  const int M = c->size(), rank = c->rank();
  const std::string base = shared_dir(*c, "reshard");
  if (rank == 0)
    for (int n = 1; n <= 4; ++n) write_checkpoint(fmt::format("{}/n{}", base, n), n, n);
  c->barrier();
  for (int n = 1; n <= 4; ++n) {
    Checkpoint ck(fmt::format("{}/n{}", base, n));
    EXPECT_EQ(ck.step(), n);
    EXPECT_EQ(ck.world_size(), n);
    EXPECT_EQ(ck.string("tokens_seen"), "42");
    EXPECT_EQ(ck.tokenizer(), "not really a tokenizer");
    EXPECT_TRUE(ck.verify(rank, M).empty());
    ASSERT_EQ(ck.tensors().size(), kSpecs.size());
    for (size_t i = 0; i < kSpecs.size(); ++i) {
      // This rank's FSDP shard on M ranks (zero-padded rows), and the whole tensor.
      ShardLayout layout(kSpecs[i].shape, M);
      std::vector<int64_t> local = kSpecs[i].shape;
      local[0] = layout.rows_per_rank;
      at::Tensor mine = at::full(local, 7.0f), whole = at::empty(kSpecs[i].shape);
      ck.read(kSpecs[i].name, mine, rank * layout.rows_per_rank);
      ck.read(kSpecs[i].name, whole);
      EXPECT_TRUE(at::equal(mine, layout.slice(global(i, n), rank))) << kSpecs[i].name << " saved on " << n;
      EXPECT_TRUE(at::equal(whole, global(i, n))) << kSpecs[i].name << " saved on " << n;
    }
    for (int r = 0; r < n; ++r) EXPECT_EQ(ck.rank_string(r, "loader_state"), fmt::format("{{\"rank\": {}}}", r));
    EXPECT_TRUE(ck.rank_rng(n - 1).defined());
  }
  // Consolidated into one file (from 3 ranks' files): the same tensors, and verified by CRC.
  if (rank == 0) {
    consolidate(Checkpoint(base + "/n3"), base + "/one.h5");
    Checkpoint one(base + "/one.h5");
    EXPECT_TRUE(one.consolidated());
    EXPECT_TRUE(one.verify().empty());
    EXPECT_EQ(one.rank_string(2, "loader_state"), "{\"rank\": 2}");
    for (size_t i = 0; i < kSpecs.size(); ++i) {
      at::Tensor whole = at::empty(kSpecs[i].shape);
      one.read(kSpecs[i].name, whole);
      EXPECT_TRUE(at::equal(whole, global(i, 3))) << kSpecs[i].name;
    }
  }
  c->barrier();
  if (rank == 0) fs::remove_all(base);
}

TEST(Checkpoint, SaverWritesEveryRanksRowsKeepsTheLastKAndSurvivesAFailedSave) {
  auto c = comm();
  const int M = c->size(), rank = c->rank();
  const std::string dir = shared_dir(*c, "saver");
  CheckpointSaver saver(dir, c, /*async=*/true, /*keep_last_k=*/2);
  auto save = [&](int64_t step, bool best, bool broken) {
    SaveRequest r;
    r.name = fmt::format("step-{:08d}", step);
    r.part = part_of(rank, M, step);
    if (broken && rank == M - 1) r.part.tensors.push_back({"model/bad", {2}, 0, at::zeros({2}, at::kLong)});
    r.strings = {{"config", "# none"}};
    r.best = best;
    saver.save(std::move(r));
    // What the training loop does: sum busy() over the ranks until no rank is writing.
    for (;;) {
      at::Tensor busy = at::tensor({saver.busy()}, at::kDouble);
      c->all_reduce(busy);
      if (busy.item<double>() == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return saver.finish();
  };
  EXPECT_TRUE(save(1, /*best=*/true, false));
  EXPECT_FALSE(save(2, false, /*broken=*/true));  // one rank's file fails: reported, nothing committed
  EXPECT_TRUE(save(3, false, false));
  EXPECT_TRUE(save(4, false, false));
  c->barrier();
  // keep_last_k = 2 keeps steps 3 and 4, and step 1 because `best` points at it.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"best", "latest", "step-00000001", "step-00000003", "step-00000004"}));
  Checkpoint ck(dir + "/latest");
  EXPECT_EQ(ck.step(), 4);
  EXPECT_EQ(ck.world_size(), M);
  EXPECT_TRUE(ck.verify().empty());
  for (size_t i = 0; i < kSpecs.size(); ++i) {
    at::Tensor whole = at::empty(kSpecs[i].shape);
    ck.read(kSpecs[i].name, whole);
    EXPECT_TRUE(at::equal(whole, global(i, 4))) << kSpecs[i].name;
  }
  EXPECT_EQ(ck.rank_string(M - 1, "loader_state"), fmt::format("{{\"rank\": {}}}", M - 1));
  c->barrier();
  if (rank == 0) fs::remove_all(dir);
}

TEST(Checkpoint, DamageIsDetectedAndResumingFallsBack) {
  if (comm()->size() > 1) GTEST_SKIP() << "one process is enough";
  const std::string base = (fs::temp_directory_path() / fmt::format("coil-test-damage-{}", getpid())).string();
  fs::remove_all(base);
  auto fresh = [&](const std::string& name) {
    const std::string dir = base + "/" + name;
    write_checkpoint(dir, 3, 1);
    return dir;
  };
  auto problems = [](const std::string& dir) {
    std::string all;
    for (const auto& p : Checkpoint(dir).verify()) all += p + "\n";
    return all;
  };
  const std::string intact = fresh("intact");
  EXPECT_EQ(problems(intact), "");

  const std::string truncated = fresh("truncated");
  fs::resize_file(truncated + "/rank-00001-of-00003.h5", fs::file_size(truncated + "/rank-00001-of-00003.h5") - 100);
  EXPECT_NE(problems(truncated).find("rank-00001-of-00003.h5: "), std::string::npos);
  EXPECT_NE(problems(truncated).find("(truncated)"), std::string::npos);

  const std::string flipped = fresh("flipped");
  {
    std::fstream f(flipped + "/rank-00002-of-00003.h5", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(3000);
    char b = 0;
    f.read(&b, 1);
    f.seekp(3000);
    b = static_cast<char>(b ^ 0x10);
    f.write(&b, 1);
  }
  EXPECT_NE(problems(flipped).find("rank-00002-of-00003.h5: checksum mismatch (the file is damaged; CRC-32 "),
            std::string::npos);

  // A byte flipped anywhere (metadata included) while the tensors are read alongside the check:
  // reported as damage, never a crash or a silent misreading.
  const int64_t size = static_cast<int64_t>(fs::file_size(intact + "/rank-00001-of-00003.h5"));
  for (int64_t at = 0; at < size; at += std::max<int64_t>(1, size / 40)) {
    const std::string dir = fresh(fmt::format("flip-{}", at));
    {
      std::fstream f(dir + "/rank-00001-of-00003.h5", std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(at);
      char b = 0;
      f.read(&b, 1);
      f.seekp(at);
      b = static_cast<char>(~b);
      f.write(&b, 1);
    }
    Checkpoint ck(dir);
    const std::string problems = read_verified(ck, nullptr, [](const Checkpoint& c) {
      for (size_t i = 0; i < kSpecs.size(); ++i) c.read(kSpecs[i].name, at::empty(kSpecs[i].shape));
    });
    EXPECT_NE(problems.find("rank-00001-of-00003.h5: checksum mismatch"), std::string::npos) << "byte " << at << ": " << problems;
    fs::remove_all(dir);
  }

  const std::string missing = fresh("missing");
  fs::remove(missing + "/rank-00000-of-00003.h5");
  EXPECT_NE(problems(missing).find("rank-00000-of-00003.h5: missing (rank 0 of 3)"), std::string::npos);

  const std::string no_index = fresh("no-index");
  fs::remove(no_index + "/index.h5");
  EXPECT_NE(error_of([&] { Checkpoint{no_index}; }).find("no index.h5 (an incomplete checkpoint"), std::string::npos);

  const std::string bad_index = fresh("bad-index");
  const auto index_size = fs::file_size(bad_index + "/index.h5");
  fs::resize_file(bad_index + "/index.h5", 1000);
  EXPECT_EQ(error_of([&] { Checkpoint{bad_index}; }),
            fmt::format("{}/index.h5: 1000 bytes, index.h5.crc32 records {} (truncated)", bad_index, index_size));
  // The same without the checksum file (an older Coil's checkpoint): HDF5's own error.
  fs::remove(bad_index + "/index.h5.crc32");
  EXPECT_NE(error_of([&] { Checkpoint{bad_index}; }).find("not an HDF5 file (truncated or damaged?)"), std::string::npos);

  // Resuming: latest (step 2) is damaged, step 1 is intact: step 1, with a warning; the damaged
  // one is moved aside and latest re-pointed.
  const std::string run = base + "/run";
  write_checkpoint(run + "/step-00000001", 3, 1);
  write_checkpoint(run + "/step-00000002", 3, 2);
  point_link(run, "latest", "step-00000002");
  fs::resize_file(run + "/step-00000002/rank-00001-of-00003.h5", 10);
  std::vector<std::string> warnings;
  EXPECT_EQ(find_intact_checkpoint(run, nullptr, &warnings), run + "/step-00000001");
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("step-00000002 is damaged: "), std::string::npos);
  EXPECT_TRUE(fs::exists(run + "/step-00000002.damaged"));
  EXPECT_EQ(fs::read_symlink(run + "/latest").string(), "step-00000001");
  // Nothing intact: nothing found, nothing moved.
  fs::remove(run + "/step-00000001/index.h5");
  warnings.clear();
  EXPECT_EQ(find_intact_checkpoint(run, nullptr, &warnings), "");
  EXPECT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(fs::exists(run + "/step-00000001"));
  // An empty or missing folder: nothing to resume, no warning.
  warnings.clear();
  EXPECT_EQ(find_intact_checkpoint(base + "/nothing", nullptr, &warnings), "");
  EXPECT_TRUE(warnings.empty());
  fs::remove_all(base);
}

// Every file's bytes are checked against their recorded size and CRC-32 before HDF5 opens the file
// (HDF5 1.10 crashes on some damaged files, docs/RELIABILITY.md finding 7): a byte flipped in
// index.h5, in a rank file or in a consolidated file is one line naming the file, from opening or
// from the first read of the rank file; a checkpoint without index.h5.crc32 (an older Coil's)
// still loads, unchecked.
TEST(Checkpoint, DamagedBytesAreCaughtBeforeHdf5OpensTheFile) {
  if (comm()->size() > 1) GTEST_SKIP() << "one process is enough";
  const std::string base = (fs::temp_directory_path() / fmt::format("coil-test-crc-{}", getpid())).string();
  fs::remove_all(base);
  auto flip = [](const std::string& file, int64_t at) {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(at);
    char b = 0;
    f.read(&b, 1);
    f.seekp(at);
    b = static_cast<char>(b ^ 0x01);
    f.write(&b, 1);
  };
  auto text_of = [](const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  auto one_line = [](const std::string& s) { return s.find('\n') == std::string::npos; };
  auto loads_whole = [](const Checkpoint& ck, int64_t step) {
    for (size_t i = 0; i < kSpecs.size(); ++i) {
      at::Tensor whole = at::empty(kSpecs[i].shape);
      ck.read(kSpecs[i].name, whole);
      if (!at::equal(whole, global(i, step))) return false;
    }
    return ck.rank_string(1, "loader_state") == "{\"rank\": 1}" && ck.verify().empty();
  };

  // Intact: the index's line records its size and CRC-32; everything loads.
  const std::string intact = base + "/intact";
  write_checkpoint(intact, 2, 5);
  const std::string line = text_of(intact + "/index.h5.crc32");
  EXPECT_EQ(line, fmt::format("{} {} index.h5\n", line.substr(0, 8), fs::file_size(intact + "/index.h5")));
  {
    Checkpoint ck(intact);
    EXPECT_TRUE(ck.index_checked());
    EXPECT_TRUE(loads_whole(ck, 5));
  }

  // A byte of index.h5 flipped (in its first, middle and last bytes): opening it is the error.
  const int64_t index_size = static_cast<int64_t>(fs::file_size(intact + "/index.h5"));
  for (int64_t at : {int64_t{0}, int64_t{40}, index_size / 2, index_size - 1}) {
    const std::string dir = fmt::format("{}/index-{}", base, at);
    write_checkpoint(dir, 2, 5);
    flip(dir + "/index.h5", at);
    const std::string e = error_of([&] { Checkpoint{dir}; });
    EXPECT_EQ(e.rfind(dir + "/index.h5: checksum mismatch (the file is damaged; CRC-32 ", 0), 0u) << e;
    EXPECT_NE(e.find(", index.h5.crc32 records " + line.substr(0, 8) + ")"), std::string::npos) << e;
    EXPECT_TRUE(one_line(e)) << e;
  }
  // A damaged checksum line is itself an error (never "no checksum": that would skip the check).
  {
    const std::string dir = base + "/bad-line";
    write_checkpoint(dir, 2, 5);
    std::ofstream(dir + "/index.h5.crc32") << "zz" << line.substr(2);
    EXPECT_EQ(error_of([&] { Checkpoint{dir}; }),
              dir + "/index.h5.crc32: not a checksum line \"<crc32> <bytes> index.h5\" (the file is damaged)");
  }

  // A byte of a rank file flipped: the index opens, but the file is never opened by HDF5: every
  // read from it, its strings and its generator are the one-line error, and verify() lists it.
  const int64_t rank_size = static_cast<int64_t>(fs::file_size(intact + "/rank-00001-of-00002.h5"));
  for (int64_t at : {int64_t{0}, int64_t{100}, rank_size / 2, rank_size - 1}) {
    const std::string dir = fmt::format("{}/rank-{}", base, at);
    write_checkpoint(dir, 2, 5);
    const std::string file = dir + "/rank-00001-of-00002.h5";
    flip(file, at);
    Checkpoint ck(dir);
    const std::string want =
        fmt::format("{}: checksum mismatch (the file is damaged; CRC-32 {:08x}, the index records {:08x})", file,
                    [&] {
                      // zlib's CRC-32 of the damaged bytes, as Python's zlib.crc32 gives it
                      const std::string bytes = text_of(file);
                      uint32_t c = 0xffffffffu;
                      for (unsigned char ch : bytes) {
                        c ^= ch;
                        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
                      }
                      return ~c;
                    }(),
                    ck.files()[1].crc32);
    EXPECT_EQ(error_of([&] { ck.read(kSpecs[0].name, at::empty(kSpecs[0].shape)); }), want);
    EXPECT_EQ(error_of([&] { ck.rank_string(1, "loader_state"); }), want);
    EXPECT_EQ(error_of([&] { ck.rank_rng(1); }), want);
    EXPECT_EQ(ck.verify(), std::vector<std::string>{want});
    // Rank 0's file is intact and reads.
    EXPECT_EQ(ck.rank_string(0, "loader_state"), "{\"rank\": 0}");
  }

  // A consolidated file: its first 512 bytes (HDF5's user block) record the CRC-32 of the rest.
  const std::string one = base + "/one.h5";
  consolidate(Checkpoint(intact), one);
  EXPECT_EQ(text_of(one).rfind("COIL-CRC32 ", 0), 0u);
  {
    Checkpoint ck(one);
    EXPECT_TRUE(ck.index_checked());
    EXPECT_TRUE(ck.consolidated());
    EXPECT_TRUE(loads_whole(ck, 5));
  }
  const int64_t one_size = static_cast<int64_t>(fs::file_size(one));
  const std::pair<int64_t, std::string> cases[] = {
      {5, "not an HDF5 file (truncated or damaged?)"},         // in "COIL-CRC32 "
      {20, fmt::format("{} bytes, its header records ", one_size)},  // a digit of the size
      {19, "a damaged checksum line in its first 512 bytes (the file is damaged)"},  // ' ' -> '!'
      {512, "checksum mismatch (the file is damaged; CRC-32 "},  // HDF5's signature
      {one_size / 2, "checksum mismatch (the file is damaged; CRC-32 "},
      {one_size - 1, "checksum mismatch (the file is damaged; CRC-32 "}};
  for (const auto& [at, want] : cases) {
    const std::string copy = fmt::format("{}/one-{}.h5", base, at);
    fs::copy_file(one, copy);
    flip(copy, at);
    const std::string e = error_of([&] { Checkpoint{copy}; });
    EXPECT_EQ(e.rfind(copy + ": " + want, 0), 0u) << at << ": " << e;
    EXPECT_TRUE(one_line(e)) << e;
  }

  // An older Coil's checkpoint: no index.h5.crc32. It loads as before (HDF5 opens it unchecked).
  fs::remove(intact + "/index.h5.crc32");
  {
    Checkpoint ck(intact);
    EXPECT_FALSE(ck.index_checked());
    EXPECT_TRUE(loads_whole(ck, 5));
  }
  fs::remove_all(base);
}

// Failing I/O is one line naming the file and the system's reason, from any thread (HDF5's error
// printing is per thread: the background writer's too stays off), and nothing reaches stderr but
// the saver's one warning. (The full-disk, read-only and refused-rename cases on real file
// systems are tests/test_io_faults.sh.)
TEST(Checkpoint, FailedIoIsOneLineAndHdf5StaysSilent) {
  if (comm()->size() > 1) GTEST_SKIP() << "one process is enough";
  const fs::path root = fs::temp_directory_path() / fmt::format("coil-io-{}", ::getpid());
  fs::remove_all(root);
  fs::create_directories(root);
  const std::string not_a_dir = (root / "file").string();
  std::ofstream(not_a_dir) << "not a folder, not HDF5";

  testing::internal::CaptureStderr();
  FileRecord rec;
  std::string open_error;
  std::thread([&] {
    rec = write_rank_file((root / "missing").string(), part_of(0, 1, 1));
    try {
      Checkpoint ck(not_a_dir);
    } catch (const coil::Error& e) {
      open_error = e.what();
    }
  }).join();
  EXPECT_EQ(rec.error, fmt::format("cannot create {}/missing/rank-00000-of-00001.h5: No such file or directory", root.string()));
  EXPECT_EQ(open_error, not_a_dir + ": not an HDF5 file (truncated or damaged?)");
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");

  try {
    commit_directory((root / "missing").string(), (root / "to").string());
    ADD_FAILURE() << "no error";
  } catch (const coil::Error& e) {
    EXPECT_EQ(std::string(e.what()), fmt::format("cannot rename {0}/missing to {0}/to: No such file or directory", root.string()));
  }

  // A saver whose checkpoints folder cannot be made (a file is in the way): a warning, one line,
  // for a save during the run; for the last save none, and error() says why.
  for (bool async : {false, true}) {
    CheckpointSaver saver(not_a_dir + "/checkpoints", nullptr, async, 0);
    for (bool last : {false, true}) {
      SaveRequest r;
      r.name = "step-00000001";
      r.part = part_of(0, 1, 1);
      r.last = last;
      testing::internal::CaptureStderr();
      saver.save(std::move(r));
      EXPECT_FALSE(saver.finish());
      const std::string err = testing::internal::GetCapturedStderr();
      const std::string why =
          fmt::format("rank 0: cannot create {}/checkpoints/step-00000001.tmp: Not a directory", not_a_dir);
      EXPECT_EQ(saver.error(), why);
      EXPECT_EQ(err, last ? "" : "coil: warning: checkpoint step-00000001 was not saved (" + why +
                                     "); the next checkpoint saves again\n");
    }
  }
  fs::remove_all(root);
}
