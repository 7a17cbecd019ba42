// `coil ckpt inspect|verify|consolidate|export-hf|import-hf`: checkpoints from the outside.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/mixture.h"
#include "data/streaming.h"
#include "dist/checkpoint.h"
#include "launch/commands.h"
#include "data/tokenizer.h"
#include "launch/config.h"
#include "launch/load_model.h"
#include "model/mamba.h"
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

// Where the run's data reader was (describe_state, describe_streaming_state): one state for all
// ranks, or one a rank when streaming. An imported model has none; a state that does not read is said, not fatal.
void print_data_position(const dist::Checkpoint& ck) {
  try {
    for (int r = 0; r < ck.world_size(); ++r) {
      const std::string json = ck.rank_string(r, "loader_state");
      if (json.empty()) return;
      const data::LoaderState state = data::LoaderState::from_json(json);
      if (state.kind != "streaming") {  // one state for all ranks
        for (const std::string& line : data::describe_state(state)) fmt::print("  data: {}\n", line);
        return;
      }
      for (const std::string& line : data::describe_streaming_state(state)) fmt::print("  data: {}\n", line);
    }
  } catch (const Error& e) {
    fmt::print("  data: the loader state does not read: {}\n", e.what());
  }
}

void inspect(const std::string& path) {
  dist::Checkpoint ck(path);
  fmt::print("checkpoint {}\n", path);
  fmt::print("  step {}, saved on {} rank(s){}{}, {} on disk\n", ck.step(), ck.world_size(),
             ck.shard_degree() < ck.world_size() ? fmt::format(" (HSDP: rows on the first {})", ck.shard_degree()) : "",
             ck.consolidated() ? " (consolidated into one file)" : "", human_bytes(static_cast<double>(ck.total_bytes())));
  for (const char* key : {"phase", "tokens_seen", "best_val_loss", "elapsed_s", "schedule"})
    if (ck.strings().count(key)) fmt::print("  {}: {}\n", key, ck.strings().at(key));
  print_data_position(ck);
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
  // Opening checked the index's (or the consolidated file's) CRC-32, where one is recorded.
  fmt::print("{}: intact ({} file(s) checked, step {}){}\n", path, ck.consolidated() ? 1 : ck.files().size() + 1, ck.step(),
             ck.index_checked() ? "" : ck.consolidated() ? "; no CRC-32 of the whole file (an older Coil's)"
                                                         : "; no index.h5.crc32 (an older Coil's): the index's bytes are unchecked");
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
  LoadedModel m = load_model(path, "", /*need_tokenizer=*/false);
  save_hf(*m.model, out);
  const std::string tok = dist::Checkpoint(path).tokenizer();
  const bool json = !tok.empty() && tok[tok.find_first_not_of(" \t\r\n")] == '{';
  const std::string tok_name = json ? "tokenizer.json" : "tokenizer.model";
  std::string kind = "sentencepiece";  // a tokenizer.json's model.type: BPE or Unigram
  if (json) {
    const nlohmann::json j = nlohmann::json::parse(tok, nullptr, /*allow_exceptions=*/false);
    kind = j.is_object() && j.contains("model") && j["model"].is_object() ? j["model"].value("type", "?") : "?";
  }
  if (!tok.empty()) std::ofstream(fs::path(out) / tok_name, std::ios::binary) << tok;
  fmt::print("{} -> {}: config.json, model.safetensors (transformers' MambaForCausalLM){}\n", path, out,
             tok.empty() ? "; the checkpoint holds no tokenizer"
                         : ", " + tok_name + " (" + kind + ")");
}

// A Hugging Face Mamba folder (config.json + model.safetensors) -> a Coil checkpoint folder (one
// rank file + index.h5, step 0) that SFT (train.pretrained_checkpoint_path) and generate load. Its
// [model] config names the nearest preset and sets every shape key. The tokenizer (--tokenizer, else
// the folder's tokenizer.json, e.g. the GPT-NeoX BPE of state-spaces/mamba-*-hf, else its
// tokenizer.model, as export-hf writes) is stored inside, as the file's bytes (data/tokenizer.h
// reads either kind); without one the checkpoint has no tokenizer.
void import_hf(const std::string& hf_dir, const std::string& out, const std::string& tokenizer_path) {
  COIL_CHECK(!fs::exists(out), "{} exists; remove it first or choose another name", out);
  const MambaLM model = load_hf(hf_dir);
  const MambaConfig& mc = model.config();
  RunConfig c;
  for (const auto& name : MambaConfig::preset_names())
    if (MambaConfig::preset(name).d_model == mc.d_model && MambaConfig::preset(name).n_layer == mc.n_layer)
      c.model_preset = name;
  c.model_vocab_size = mc.vocab_size;
  c.model_d_model = mc.d_model, c.model_n_layer = mc.n_layer, c.model_d_state = mc.d_state;
  c.model_d_conv = mc.d_conv, c.model_expand = mc.expand, c.model_dt_rank = mc.rank(), c.model_rms_eps = mc.rms_eps;

  std::string tokenizer, tokenizer_note;
  std::string tok_file = tokenizer_path;
  for (const char* name : {"tokenizer.json", "tokenizer.model"})
    if (tok_file.empty() && fs::exists(fs::path(hf_dir) / name)) tok_file = (fs::path(hf_dir) / name).string();
  if (!tok_file.empty()) {
    const data::Tokenizer tok(tok_file);  // either kind, or an error naming the file
    data::check_vocab_fits(tok.vocab_size(), mc.vocab_size, tok_file);
    std::ifstream in(tok_file, std::ios::binary);
    tokenizer.assign(std::istreambuf_iterator<char>(in), {});
    tokenizer_note = "tokenizer " + tok_file;
  } else {
    tokenizer_note = "no tokenizer (pass --tokenizer FILE.model or tokenizer.json)";
  }

  dist::RankPart part;
  for (const auto& p : model.named_parameters())
    part.tensors.push_back({"model/" + p.name, p.tensor.sizes().vec(), 0, p.tensor.contiguous()});
  part.strings["loader_state"] = "";  // as a trained checkpoint's rank file has it (consolidate copies it)
  const std::string tmp = out + ".tmp";
  try {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    const dist::FileRecord record = dist::write_rank_file(tmp, part);
    COIL_CHECK(record.error.empty(), "import-hf: {}", record.error);
    dist::IndexInfo info;
    info.files = {record};
    info.strings = {{"config", c.to_toml()}, {"phase", "import-hf"},   {"tokens_seen", "0"},
                    {"best_val_loss", "inf"}, {"elapsed_s", "0"},       {"schedule", ""},
                    {"loader_state", ""},     {"source", fs::absolute(hf_dir).string()}};
    info.tokenizer = tokenizer;
    dist::write_index(tmp, part, info);
    dist::commit_directory(tmp, out);
  } catch (const fs::filesystem_error& e) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    fail("import-hf: {}: {}", e.path1().string(), e.code().message());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);  // no half-written checkpoint is left
    throw;
  }
  fmt::print("{} -> {}: {}; {}\n", hf_dir, out, mc.describe(), tokenizer_note);
  const std::string toml = c.to_toml();
  const size_t section = toml.find("[model]"), next = toml.find("\n[", section);
  fmt::print("for SFT from it: train.pretrained_checkpoint_path = \"{}\" and this model section:\n{}\n", out,
             toml.substr(section, next == std::string::npos ? std::string::npos : next - section));
}

}  // namespace

void add_ckpt_command(CLI::App& app) {
  CLI::App* ckpt = app.add_subcommand("ckpt", "Inspect, verify, consolidate, export and import checkpoints");
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

  c = ckpt->add_subcommand("export-hf", "Write a Hugging Face model folder (config.json, model.safetensors, the tokenizer)");
  c->add_option("checkpoint", *path, "a checkpoint folder or .h5")->required();
  c->add_option("out", *out, "the folder to write")->required();
  on_run(c, [path, out] { export_hf(*path, *out); });

  auto tokenizer = std::make_shared<std::string>();
  c = ckpt->add_subcommand("import-hf", "A Hugging Face Mamba folder (config.json, model.safetensors) as a Coil checkpoint");
  c->add_option("hf_dir", *path, "the folder (e.g. a download of state-spaces/mamba-130m-hf)")->required();
  c->add_option("out", *out, "the checkpoint folder to write")->required();
  c->add_option("--tokenizer", *tokenizer, "a sentencepiece .model or a tokenizer.json to store inside (default: the folder's tokenizer.json, "
                "else its tokenizer.model)");
  c->footer("A tokenizer.json (BPE: GPT-2, GPT-NeoX, Llama-3 style; Llama-2, Mistral, Gemma style; or Unigram) goes in as it is:\n"
            "generate, chat and sft take and give text with it. Without a tokenizer, `coil generate --prompt-ids` takes and prints ids.");
  on_run(c, [path, out, tokenizer] { import_hf(*path, *out, *tokenizer); });
}

}  // namespace coil
