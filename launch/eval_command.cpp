// `coil eval`: how well checkpoints predict held-out data, every target scored once
// (launch/evaluation.h): prepared shards or text files (JSONL, .gz/.zst, Parquet, text), or
// Alpaca-format examples with --sft, one or more sets. It prints, for each checkpoint and set in
// turn, the mean loss in nats per target token, the perplexity and, for text, the bits per UTF-8
// byte (comparable across tokenizers), then with several of either a table of the losses; or a
// JSON line each with --json. One process on one device, or data parallel
// under mpirun / srun: each rank holds the whole model on its own device (the GPU of its local
// rank, as training picks it) and scores its share of the batches; the first rank prints. The
// trainer's val loss (train.eval_batches micro batches of data.val) is a sample of the same quantity.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shards.h"
#include "dist/world.h"
#include "launch/commands.h"
#include "launch/evaluation.h"
#include "launch/load_model.h"
#include "launch/parallel.h"
#include "launch/run_data.h"
#include "util/error.h"

namespace coil {
namespace {

struct EvalOptions {
  std::vector<std::string> checkpoints, data;
  std::string tokenizer, document_masking, text_field, device = "auto", dtype = "float32";
  bool sft = false, json = false;
  int64_t seq_len = 0, batch_size = 8, max_tokens = 0;
};

// The ranks of a data-parallel eval (none on one process).
struct Ranks {
  std::unique_ptr<dist::Comm> comm;  // null on one process
  int local_rank = 0, local_size = 1;
  bool root() const { return !comm || comm->rank() == 0; }
};

// Scores one checkpoint on every data set of the options, printing as it goes; the results in the
// order of o.data.
std::vector<EvalResult> eval_checkpoint(const EvalOptions& o, const std::string& checkpoint, const Ranks& ranks) {
  bool need_tokenizer = false;
  for (const std::string& d : o.data) need_tokenizer = need_tokenizer || o.sft || !data::is_prepared(d);
  LoadedModel m = load_model(checkpoint, o.tokenizer, need_tokenizer);
  const RunConfig& c = m.config;
  EvalRequest q;
  q.sft = o.sft;
  q.seq_len = o.seq_len > 0 ? o.seq_len : c.seq_len;
  q.batch_size = o.batch_size;
  q.max_tokens = o.max_tokens;
  q.document_masking = o.document_masking.empty() ? c.data_document_masking : o.document_masking == "true";
  q.read.text_field = o.text_field.empty() ? c.data_text_field : o.text_field;
  q.read.max_bad_records = c.data_max_bad_records;
  q.templ = sft_template(c);
  COIL_CHECK(o.device != "cuda" || (at::hasCUDA() && at::getNumGPUs() > 0),
             "--device cuda: CUDA is not available here (no GPU visible, no driver, or a LibTorch without CUDA)");
  std::string device_why;
  const at::Device device = pick_device(o.device, ranks.local_rank, ranks.local_size, &device_why);
  q.compute = compute_dtype(o.dtype, device);
  q.comm = ranks.comm.get();
  m.model->to(device);
  std::vector<EvalResult> results;
  for (const std::string& set : o.data) {
    q.data = set;
    if (!o.json && ranks.root())
      fmt::print("eval: {} on {}: rows of {} tokens, {} a batch, {}, device {}{}{}, compute {}\n", checkpoint, set,
                 q.seq_len, q.batch_size,
                 o.sft ? "SFT examples (the loss on responses)"
                       : q.document_masking ? "document masking on" : "document masking off",
                 device.str(), device_why.empty() ? "" : " (" + device_why + ")",
                 q.comm ? fmt::format(", {} ranks", q.comm->size()) : "", o.dtype);
    const EvalResult r = score(*m.model, m.tokenizer.get(), q);
    results.push_back(r);
    if (!ranks.root()) continue;
    const char* what = o.sft ? "examples" : "documents";
    if (o.json) {
      nlohmann::json j = {{"checkpoint", checkpoint}, {"data", set}, {"loss", r.loss()}, {"perplexity", std::exp(r.loss())},
                          {"targets", r.targets}, {"rows", r.rows}, {"seq_len", q.seq_len}, {what, r.documents},
                          {"document_masking", !o.sft && q.document_masking}, {"seconds", r.seconds}};
      if (r.bytes > 0) j.update({{"bytes", r.bytes}, {"bits_per_byte", r.bits_per_byte()}});
      fmt::print("{}\n", j.dump());
      continue;
    }
    fmt::print("eval: {} targets of {} {} in {} rows, {:.1f} s ({:.0f} tokens/s)\n", r.targets, r.documents, what, r.rows,
               r.seconds, static_cast<double>(r.targets) / r.seconds);
    fmt::print("eval: loss {:.4f}, perplexity {:.2f}{}\n", r.loss(), std::exp(r.loss()),
               r.bytes > 0 ? fmt::format(", bits per byte {:.4f} ({} bytes)", r.bits_per_byte(), r.bytes) : "");
  }
  return results;
}

// With several checkpoints or data sets: the losses side by side, a row per checkpoint and a column
// per set (its short name, as data.val's sets are named in training metrics).
void print_table(const EvalOptions& o, const std::vector<std::pair<std::string, std::vector<EvalResult>>>& scored) {
  const std::vector<std::string> names = val_set_names(o.data);
  size_t first = std::string("checkpoint").size();
  for (const auto& [checkpoint, results] : scored) first = std::max(first, checkpoint.size());
  std::vector<size_t> width;
  for (const std::string& n : names) width.push_back(std::max<size_t>(n.size(), 16));
  std::string head = fmt::format("  {:<{}}", "checkpoint", first);
  for (size_t k = 0; k < names.size(); ++k) head += fmt::format("  {:>{}}", names[k], width[k]);
  fmt::print("eval: loss (perplexity), a row per checkpoint{}\n{}\n", names.size() > 1 ? ", a column per data set" : "",
             head);
  for (const auto& [checkpoint, results] : scored) {
    std::string line = fmt::format("  {:<{}}", checkpoint, first);
    for (size_t k = 0; k < results.size(); ++k)
      line += fmt::format("  {:>{}}", fmt::format("{:.4f} ({:.2f})", results[k].loss(), std::exp(results[k].loss())),
                          width[k]);
    fmt::print("{}\n", line);
  }
}

void run_eval(const EvalOptions& o) {
  COIL_CHECK(o.seq_len >= 0, "--seq-len must be >= 1 (or 0: the run's train.seq_len), got {}", o.seq_len);
  Ranks ranks;
  if (dist::launched_by_mpi() && dist::world().size > 1) {
    ranks.comm = dist::make_mpi_comm();
    ranks.local_rank = dist::world().local_rank;
    ranks.local_size = dist::world().local_size;
    at::set_num_threads(dist::cores_per_rank());
  }
  std::vector<std::pair<std::string, std::vector<EvalResult>>> scored;
  for (const std::string& checkpoint : o.checkpoints) {
    // A glob such as step-* also matches a save in progress, or one a crash interrupted.
    if (o.checkpoints.size() > 1 && checkpoint.size() > 4 && checkpoint.compare(checkpoint.size() - 4, 4, ".tmp") == 0) {
      if (ranks.root()) fmt::print(stderr, "coil: warning: skipping {}: a checkpoint not yet (or never) committed\n", checkpoint);
      continue;
    }
    scored.emplace_back(checkpoint, eval_checkpoint(o, checkpoint, ranks));
  }
  if (ranks.root() && !o.json && (scored.size() > 1 || o.data.size() > 1)) print_table(o, scored);
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd = app.add_subcommand("eval", "Score a checkpoint on held-out data: loss, perplexity and bits per byte");
  cmd->add_option("--checkpoint", o->checkpoints,
                  "one or more checkpoints (e.g. runs/x/checkpoints/final, runs/x/checkpoints/step-*, or a "
                  "consolidated .h5), each scored in turn")
      ->required();
  cmd->add_option("--data", o->data,
                  "one or more data sets, each scored on its own: prepared shards (a directory of coil data "
                  "prepare), or text files: JSONL (.gz, .zst), Parquet or text, comma-separated globs; with --sft, "
                  "Alpaca-format examples")
      ->required();
  cmd->add_flag("--sft", o->sft, "the data are instruction examples: the loss on response tokens, in the run's template");
  cmd->add_option("--tokenizer", o->tokenizer,
                  "a sentencepiece .model or a tokenizer.json (default: the copy inside the checkpoint)");
  cmd->add_option("--seq-len", o->seq_len, "tokens per row (default: the run's train.seq_len)");
  cmd->add_option("--batch-size", o->batch_size, "rows per forward")->capture_default_str();
  cmd->add_option("--max-tokens", o->max_tokens, "stop after about this many targets (default: all the data)");
  cmd->add_option("--document-masking", o->document_masking,
                  "true: reset the model's state at each document start; false: documents flow into each other "
                  "(default: the run's data.document_masking)")
      ->check(CLI::IsMember({"true", "false"}));
  cmd->add_option("--text-field", o->text_field, "the JSON field of a document's text (default: the run's data.text_field)");
  cmd->add_option("--device", o->device, "auto (a GPU when there is one), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "compute dtype: float32, bfloat16 or float16 (the weights are cast, the loss stays float32)")
      ->check(CLI::IsMember({"float32", "bfloat16", "float16"}))
      ->capture_default_str();
  cmd->add_flag("--json", o->json,
                "print one JSON line a checkpoint and data set (checkpoint, data, loss, perplexity, targets, "
                "documents, bytes, bits_per_byte, ...)");
  cmd->footer(
      "Every token of every document (and its EOS) is a target once: rows of --seq-len + 1 tokens overlapping by "
      "one, the last one padded.\nBits per byte = the summed loss / ln 2 / the documents' UTF-8 bytes: comparable "
      "across tokenizers.\nUnder mpirun or srun the ranks share the batches (each on its own device) and the first "
      "rank prints: the result of one process.\nSeveral checkpoints or data sets end with a table of the losses, a "
      "row per checkpoint, a column per set.");
  on_run_all_ranks(cmd, [o] { run_eval(*o); });
}

}  // namespace coil
