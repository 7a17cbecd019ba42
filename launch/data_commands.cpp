// `coil tokenizer ...` and `coil data ...`: making a tokenizer and tokenized shards from a corpus.
#include <fmt/core.h>

#include <fstream>
#include <memory>
#include <thread>

#include "data/progress.h"
#include "data/reader.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "util/error.h"

namespace coil {
namespace {

// Options every reading command shares.
void add_read_options(CLI::App* cmd, data::ReadOptions& o) {
  cmd->add_option("--text-field", o.text_field, "the JSON field (Parquet column) that holds a document's text")
      ->capture_default_str();
  cmd->add_option("--max-bad-records", o.max_bad_records,
                  "malformed records skipped (with a warning) before the command fails; 0: fail at the first")
      ->capture_default_str();
  cmd->add_option("--max-record-bytes", o.max_record_bytes, "longer records (lines) are skipped and counted")
      ->capture_default_str();
}

struct TokenizerTrain {
  std::string input;
  data::TokenizerTrainOptions o;
};

struct Encode {
  std::string model, text;
};

struct Prepare {
  std::string input;
  data::PrepareOptions o;
};

struct Inspect {
  std::string dir, tokenizer;
  int64_t documents = 1;
};

void run_prepare(Prepare& p) {
  p.o.inputs = data::expand_inputs(p.input);
  fmt::print("prepare: {} input file(s) -> {} ({} threads)\n", p.o.inputs.size(), p.o.output,
             p.o.threads > 0 ? p.o.threads : static_cast<int>(std::thread::hardware_concurrency()));
  data::PrepareResult r = data::prepare_shards(p.o);
  fmt::print("prepare: {} tokens in {} shard(s), {} ({:.1f} s, {:.2f}M tokens/s)\n", r.tokens, r.shards,
             r.stats.summary(), r.seconds, r.tokens / std::max(r.seconds, 1e-9) / 1e6);
}

void run_inspect(const Inspect& in) {
  data::TokenShards shards(in.dir);
  fmt::print("{}: {} tokens, {} documents, vocabulary {}, EOS {}, tokenizer sha256 {}\n", in.dir, shards.tokens(),
             shards.documents(), shards.vocab_size(), shards.eos(), shards.tokenizer_sha256());
  if (in.tokenizer.empty() || in.documents <= 0) return;
  data::Tokenizer tok(in.tokenizer);
  COIL_CHECK(tok.sha256() == shards.tokenizer_sha256(), "{} is not the tokenizer {} was prepared with", in.tokenizer,
             in.dir);
  for (int64_t i = 0; i < std::min(in.documents, shards.documents()); ++i) {
    std::vector<int32_t> ids = shards.document(i);
    fmt::print("--- document {} ({} tokens)\n{}\n", i, ids.size(), tok.decode(ids));
  }
}

}  // namespace

void add_tokenizer_command(CLI::App& app) {
  CLI::App* tok = app.add_subcommand("tokenizer", "Train a sentencepiece tokenizer, or encode text with one (or with a tokenizer.json)");
  tok->require_subcommand(1);

  auto t = std::make_shared<TokenizerTrain>();
  CLI::App* train = tok->add_subcommand(
      "train",
      "Train a sentencepiece tokenizer (byte fallback, lossless) on the documents of JSONL/Parquet/text files; writes "
      "PREFIX.model and PREFIX.vocab");
  train->add_option("--input", t->input, "files: comma-separated globs, files or directories")->required();
  train->add_option("--output", t->o.output_prefix, "output prefix (PREFIX.model, PREFIX.vocab)")->required();
  train->add_option("--vocab-size", t->o.vocab_size, "vocabulary size")->capture_default_str();
  train->add_option("--model-type", t->o.model_type, "unigram or bpe")
      ->capture_default_str()
      ->check(CLI::IsMember({"unigram", "bpe"}));
  train->add_option("--max-sentences", t->o.max_sentences, "lines sampled for training")->capture_default_str();
  train->add_option("--threads", t->o.threads, "training threads (0: all cores)")->capture_default_str();
  add_read_options(train, t->o.read);
  on_run(train, [t] {
    t->o.inputs = data::expand_inputs(t->input);
    // Documents read and the share of the input, on stderr, until sentencepiece starts training.
    data::Progress progress("tokenizer", data::total_file_bytes(t->o.inputs), /*with_tokens=*/false);
    t->o.read.progress = &progress;
    data::train_tokenizer(t->o);
  });

  auto e = std::make_shared<Encode>();
  CLI::App* enc = tok->add_subcommand("encode", "Print the tokens of a text");
  enc->add_option("--model", e->model, "a sentencepiece .model or a tokenizer.json")->required();
  enc->add_option("text", e->text, "the text")->required();
  on_run(enc, [e] {
    data::Tokenizer tk(e->model);
    std::vector<int32_t> ids = tk.encode(e->text);
    for (int32_t id : ids) fmt::print("{}\t{}\n", id, tk.piece(id));
    fmt::print("{} tokens\n", ids.size());
  });
}

void add_data_command(CLI::App& app) {
  CLI::App* data = app.add_subcommand("data", "Prepare tokenized shards for pretraining, and look into them");
  data->require_subcommand(1);

  auto p = std::make_shared<Prepare>();
  CLI::App* prep = data->add_subcommand(
      "prepare",
      "Tokenize documents (JSONL, JSONL.gz/.zst, Parquet, text) into shards with a manifest; the same inputs give "
      "byte-identical output");
  prep->add_option("--input", p->input, "files: comma-separated globs, files or directories")->required();
  prep->add_option("--tokenizer", p->o.tokenizer, "a sentencepiece .model (coil tokenizer train) or a tokenizer.json (BPE or Unigram)")->required();
  prep->add_option("--output", p->o.output, "output directory")->required();
  prep->add_option("--threads", p->o.threads, "tokenizer threads (0: all cores)")->capture_default_str();
  prep->add_option("--shard-tokens", p->o.shard_tokens, "tokens per shard")->capture_default_str();
  prep->add_flag("--force", p->o.force, "replace a prepared data set in the output directory");
  add_read_options(prep, p->o.read);
  on_run(prep, [p] { run_prepare(*p); });

  auto in = std::make_shared<Inspect>();
  CLI::App* insp = data->add_subcommand("inspect", "Print a prepared data set's counts and its first documents");
  insp->add_option("dir", in->dir, "a directory made by coil data prepare")->required();
  insp->add_option("--tokenizer", in->tokenizer, "decode documents with this .model or tokenizer.json");
  insp->add_option("--documents", in->documents, "documents to print (with --tokenizer)")->capture_default_str();
  on_run(insp, [in] { run_inspect(*in); });
}

}  // namespace coil
