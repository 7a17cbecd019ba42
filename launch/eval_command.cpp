// `coil eval`: how well a checkpoint predicts held-out data, every target scored once.
//
//   prepared shards or text files (JSONL, .gz/.zst, Parquet, text): the documents, each followed by
//     EOS, cut into rows of seq_len + 1 tokens that overlap by one (data/eval_rows.h): every token
//     of every document, and its EOS, is a target exactly once, the last row padded, nothing dropped;
//   --sft: Alpaca-format examples in the run's template, the loss on the response tokens only, the
//     examples packed with the state reset between them (the same loss as one example per row).
//
// It prints the mean loss in nats per target token and the perplexity (exp of it) and, for text,
// the bits per UTF-8 byte of the documents (the summed loss / ln 2 / their bytes), which does not
// depend on the tokenizer, so models with different tokenizers compare. One process, one device;
// the trainer's val loss (train.eval_batches micro batches of data.val) is a sample of this.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/eval_rows.h"
#include "data/progress.h"
#include "data/reader.h"
#include "data/sft.h"
#include "data/shards.h"
#include "launch/batch.h"
#include "launch/commands.h"
#include "launch/load_model.h"
#include "launch/parallel.h"
#include "launch/run_data.h"
#include "util/error.h"

namespace coil {
namespace {

struct EvalOptions {
  std::vector<std::string> checkpoints;
  std::string data, tokenizer, document_masking, text_field, device = "auto", dtype = "float32";
  bool sft = false, json = false;
  int64_t seq_len = 0, batch_size = 8, max_tokens = 0;
};

// The loss summed over the batches' targets, on the device until the end.
class Scorer {
 public:
  Scorer(const MambaLM& model, at::Device device, at::ScalarType compute, data::Progress& progress)
      : device_(device), progress_(progress), sum_(at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device))) {
    forward_ = [&model, compute](const at::Tensor& tokens, const at::Tensor& seq_idx) {
      return model.forward(tokens, compute, seq_idx);
    };
  }
  void add(const data::Batch& b) {
    const DeviceBatch d = to_device(b, device_);
    sum_ += loss_sum(forward_, d).to(at::kDouble);
    targets += d.count;
    rows += b.rows;
    progress_.add_tokens(d.count);
  }
  double sum() const { return sum_.item<double>(); }  // waits for the device
  int64_t targets = 0, rows = 0;

 private:
  at::Device device_;
  data::Progress& progress_;
  Forward forward_;
  at::Tensor sum_;
};

void eval_checkpoint(const EvalOptions& o, const std::string& checkpoint) {
  const bool shards = !o.sft && std::filesystem::exists(std::filesystem::path(o.data) / "manifest.json");
  LoadedModel m = load_model(checkpoint, o.tokenizer, /*need_tokenizer=*/!shards);
  const RunConfig& c = m.config;
  const int64_t seq_len = o.seq_len > 0 ? o.seq_len : c.seq_len;
  const bool masking = o.document_masking.empty() ? c.data_document_masking : o.document_masking == "true";
  std::string device_why;
  const at::Device device = pick_device(o.device, 0, 1, &device_why);
  const at::ScalarType compute = compute_dtype(o.dtype, device);
  m.model->to(device);
  c10::NoGradGuard no_grad;

  data::ReadOptions read;
  read.text_field = o.text_field.empty() ? c.data_text_field : o.text_field;
  read.max_bad_records = c.data_max_bad_records;
  const bool text = !o.sft && !shards;
  const std::vector<std::string> files = shards ? std::vector<std::string>{} : data::expand_inputs(o.data);
  data::Progress progress("eval", text && o.max_tokens == 0 ? data::total_file_bytes(files) : 0, /*with_tokens=*/true);
  read.progress = text ? &progress : nullptr;
  if (!o.json)
    fmt::print("eval: {} on {}: rows of {} tokens, {} a batch, {}, device {}{}, compute {}\n", checkpoint, o.data,
               seq_len, o.batch_size,
               o.sft ? "SFT examples (the loss on responses)" : masking ? "document masking on" : "document masking off",
               device.str(), device_why.empty() ? "" : " (" + device_why + ")", o.dtype);

  Scorer scorer(*m.model, device, compute, progress);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t documents = 0, bytes = 0;
  data::Batch b;
  if (o.sft) {
    auto examples = std::make_shared<data::SftDataset>(files, *m.tokenizer, seq_len, read, 0, sft_template(c));
    const data::PackedSftSamples rows(examples, 0);
    b.cols = rows.cols();
    for (int64_t i = 0; i < rows.size() && (o.max_tokens == 0 || scorer.targets < o.max_tokens); i += b.rows) {
      b.rows = std::min(o.batch_size, rows.size() - i);
      b.tokens.resize(static_cast<size_t>(b.rows * b.cols));
      b.mask.resize(b.tokens.size());
      b.seq_idx.resize(b.tokens.size());
      for (int64_t r = 0; r < b.rows; ++r) {
        rows.fill_at(i + r, 0, b.tokens.data() + r * b.cols, b.mask.data() + r * b.cols, b.seq_idx.data() + r * b.cols);
        const auto n = static_cast<int64_t>(rows.row_examples(0, 0, i + r).size());
        documents += n;
        progress.add_documents(n);
      }
      scorer.add(b);
    }
  } else {
    std::unique_ptr<data::TokenShards> sh;
    if (shards) {
      sh = std::make_unique<data::TokenShards>(o.data);
      data::check_vocab_fits(sh->vocab_size(), m.model->config().vocab_size, o.data);
      COIL_CHECK(!m.tokenizer || sh->tokenizer_sha256() == m.tokenizer->sha256(),
                 "{} was prepared with another tokenizer (sha256 {}) than {} ({})", o.data,
                 sh->tokenizer_sha256().substr(0, 12), m.tokenizer ? m.tokenizer->path() : "",
                 m.tokenizer ? m.tokenizer->sha256().substr(0, 12) : "");
    }
    data::EvalRows rows(seq_len, o.batch_size, shards ? sh->eos() : m.tokenizer->eos(), masking);
    // Adds a document, scores the rows it completes; false once --max-tokens targets are in.
    auto add = [&](const std::vector<int32_t>& doc) {
      ++documents;
      if (shards) progress.add_documents(1);  // the text reader counts its own
      rows.add(doc);
      while (rows.next(b)) scorer.add(b);
      return o.max_tokens == 0 || rows.targets() < o.max_tokens;
    };
    if (shards) {
      for (int64_t i = 0; i < sh->documents(); ++i)
        if (!add(sh->document(i))) break;
    } else {
      std::vector<int32_t> ids;
      data::ReadStats stats;
      data::for_each_document_while(files, read, [&](std::string&& doc) {
        bytes += static_cast<int64_t>(doc.size());
        ids.clear();
        m.tokenizer->encode(doc, ids);
        return add(ids);
      }, &stats);
      COIL_CHECK(documents > 0, "{}: no document to score ({})", o.data, stats.summary());
    }
    while (rows.finish(b)) scorer.add(b);
  }
  COIL_CHECK(scorer.targets > 0, "{}: no target to score{}", o.data,
             o.sft ? " (no example has a response token within --seq-len)" : "");
  const double sum = scorer.sum();
  progress.finish();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double loss = sum / static_cast<double>(scorer.targets);
  const double bpb = bytes > 0 ? sum / std::log(2.0) / static_cast<double>(bytes) : 0;
  COIL_CHECK(std::isfinite(loss), "eval: the loss is {} (the checkpoint's weights are not finite?)", loss);
  if (o.json) {
    nlohmann::json j = {{"checkpoint", checkpoint}, {"loss", loss}, {"perplexity", std::exp(loss)}, {"targets", scorer.targets},
                        {"rows", scorer.rows}, {"seq_len", seq_len}, {o.sft ? "examples" : "documents", documents},
                        {"document_masking", !o.sft && masking}, {"seconds", seconds}};
    if (bytes > 0) j.update({{"bytes", bytes}, {"bits_per_byte", bpb}});
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("eval: {} targets of {} {} in {} rows, {:.1f} s ({:.0f} tokens/s)\n", scorer.targets, documents,
             o.sft ? "examples" : "documents", scorer.rows, seconds, static_cast<double>(scorer.targets) / seconds);
  fmt::print("eval: loss {:.4f}, perplexity {:.2f}{}\n", loss, std::exp(loss),
             bytes > 0 ? fmt::format(", bits per byte {:.4f} ({} bytes)", bpb, bytes) : "");
}

void run_eval(const EvalOptions& o) {
  COIL_CHECK(o.seq_len >= 0, "--seq-len must be >= 1 (or 0: the run's train.seq_len), got {}", o.seq_len);
  COIL_CHECK(o.batch_size >= 1, "--batch-size must be >= 1, got {}", o.batch_size);
  COIL_CHECK(o.max_tokens >= 0, "--max-tokens must be >= 0 (0: all the data), got {}", o.max_tokens);
  for (const std::string& checkpoint : o.checkpoints) eval_checkpoint(o, checkpoint);
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
                  "prepared shards (a directory of coil data prepare), or text files: JSONL (.gz, .zst), Parquet or "
                  "text, comma-separated globs; with --sft, Alpaca-format examples")
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
      ->capture_default_str();
  cmd->add_flag("--json", o->json,
                "print one JSON line a checkpoint (checkpoint, loss, perplexity, targets, documents, bytes, "
                "bits_per_byte, ...)");
  cmd->footer(
      "Every token of every document (and its EOS) is a target once: rows of --seq-len + 1 tokens overlapping by "
      "one, the last one padded.\nBits per byte = the summed loss / ln 2 / the documents' UTF-8 bytes: comparable "
      "across tokenizers.");
  on_run(cmd, [o] { run_eval(*o); });
}

}  // namespace coil
