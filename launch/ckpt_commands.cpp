// `coil ckpt inspect|verify|consolidate|export-hf`: checkpoints from the outside.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <memory>

#include "dist/checkpoint.h"
#include "launch/commands.h"
#include "launch/load_model.h"
#include "model/hf.h"
#include "util/error.h"

namespace coil {
namespace {
namespace fs = std::filesystem;

std::string human_bytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) b /= 1000, ++u;
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.1f} {}", b, units[u]);
}

void fail_if_damaged(const dist::Checkpoint& ck) {
  const std::vector<std::string> problems = ck.verify();
  for (const auto& p : problems) fmt::print("{}\n", p);
  COIL_CHECK(problems.empty(), "{} is damaged or incomplete ({} problem(s), listed above)", ck.path(), problems.size());
}

void inspect(const std::string& path) {
  dist::Checkpoint ck(path);
  fmt::print("checkpoint {}\n", path);
  fmt::print("  step {}, saved on {} rank(s){}, {} on disk\n", ck.step(), ck.world_size(),
             ck.consolidated() ? " (consolidated into one file)" : "", human_bytes(static_cast<double>(ck.total_bytes())));
  for (const char* key : {"phase", "tokens_seen", "best_val_loss", "elapsed_s", "schedule"})
    if (ck.strings().count(key)) fmt::print("  {}: {}\n", key, ck.strings().at(key));
  for (const auto& f : ck.files()) fmt::print("  file {}  {}  crc32 {:08x}\n", f.name, human_bytes(static_cast<double>(f.bytes)), f.crc32);
  int64_t params = 0, state = 0;
  fmt::print("  {:<56} {:>16} {:>8} {:>10}\n", "tensor", "shape", "dtype", "size");
  for (const auto& t : ck.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    (t.name.rfind("model/", 0) == 0 ? params : state) += n;
    fmt::print("  {:<56} {:>16} {:>8} {:>10}\n", t.name, fmt::format("[{}]", fmt::join(t.shape, ", ")), t.dtype,
               human_bytes(static_cast<double>(n * (t.dtype == "float64" ? 8 : t.dtype == "uint8" ? 1 : 4))));
  }
  fmt::print("  {} parameters, {} optimizer state values; tokenizer {}\n", params, state,
             ck.tokenizer().empty() ? "not included" : "included");
}

void verify(const std::string& path) {
  dist::Checkpoint ck(path);
  fail_if_damaged(ck);
  fmt::print("{}: intact ({} file(s) checked, step {})\n", path, ck.consolidated() ? 1 : ck.files().size() + 1, ck.step());
}

void consolidate(const std::string& path, const std::string& out) {
  dist::Checkpoint ck(path);
  fail_if_damaged(ck);
  COIL_CHECK(!fs::exists(out), "{} exists; remove it first", out);
  dist::consolidate(ck, out);
  fmt::print("{}: step {} from {} rank file(s) -> {} ({})\n", path, ck.step(), ck.world_size(), out,
             human_bytes(static_cast<double>(fs::file_size(out))));
}

void export_hf(const std::string& path, const std::string& out) {
  LoadedModel m = load_model(path);
  save_hf(*m.model, out);
  const std::string tok = dist::Checkpoint(path).tokenizer();
  std::ofstream(fs::path(out) / "tokenizer.model", std::ios::binary) << tok;
  fmt::print("{} -> {}: config.json, model.safetensors (transformers' MambaForCausalLM), tokenizer.model (sentencepiece)\n",
             path, out);
}

}  // namespace

void add_ckpt_command(CLI::App& app) {
  CLI::App* ckpt = app.add_subcommand("ckpt", "Inspect, verify, consolidate and export checkpoints");
  ckpt->footer(
      "A checkpoint is a step folder (rank files + index.h5, opened by h5py: index.h5[\"model/<name>\"][:])\n"
      "or a consolidated .h5 file. Any of them loads on any number of ranks.");
  auto path = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();

  CLI::App* c = ckpt->add_subcommand("inspect", "Step, world size, tensors with shapes, dtypes and sizes");
  c->add_option("checkpoint", *path, "a checkpoint folder or .h5")->required();
  on_run(c, [path] { inspect(*path); });

  c = ckpt->add_subcommand("verify", "Check that every file is there and whole (sizes, CRC-32s)");
  c->add_option("checkpoint", *path, "a checkpoint folder or .h5")->required();
  c->footer("Exit status 0: intact. 1: damaged or incomplete (each problem on its own line).");
  on_run(c, [path] { verify(*path); });

  c = ckpt->add_subcommand("consolidate", "Write one single-file checkpoint from any world size");
  c->add_option("checkpoint", *path, "a checkpoint folder")->required();
  c->add_option("out", *out, "the .h5 file to write")->required();
  on_run(c, [path, out] { consolidate(*path, *out); });

  c = ckpt->add_subcommand("export-hf", "Write a Hugging Face model folder (config.json, model.safetensors, tokenizer.model)");
  c->add_option("checkpoint", *path, "a checkpoint folder or .h5")->required();
  c->add_option("out", *out, "the folder to write")->required();
  on_run(c, [path, out] { export_hf(*path, *out); });
}

}  // namespace coil
