// Data loader throughput, against the targets of docs/PERFORMANCE.md:
//   shards:    the pretraining loader over prepared shards, on ONE thread (no prefetch thread):
//              >= 5M tokens/s. Random sequences of seq_len + 1 tokens from memory-mapped shards.
//              The same shards as a 3-part mixture (data/mixture.h), against the single set.
//   streaming: JSONL(.zst) read, parsed and tokenized on the fly by 2 tokenizer threads:
//              >= 1M tokens/s. The same files as a streamed 2-part mixture, against the single stream.
//   bench_loader [--shards DIR] [--stream GLOB --tokenizer MODEL|tokenizer.json] [--seq-len 2048] [--batch 8]
// Without --shards, a synthetic 128M-token data set is written to a temporary directory first.
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>

#include "data/loader.h"
#include "data/mixture.h"
#include "data/reader.h"
#include "data/shards.h"
#include "data/streaming.h"

namespace fs = std::filesystem;
using namespace coil::data;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Random documents of 50..5000 random tokens, in the documented shard format (data/shards.h).
std::string synthetic_shards(int64_t tokens) {
  const std::string dir = (fs::temp_directory_path() / fmt::format("coil-bench-shards-{}", getpid())).string();
  fs::create_directories(dir);
  std::mt19937 rng(1);
  std::vector<uint16_t> data;
  std::vector<uint64_t> offsets{0};
  data.reserve(static_cast<size_t>(tokens));
  while (static_cast<int64_t>(data.size()) < tokens) {
    int n = 50 + static_cast<int>(rng() % 4950);
    for (int i = 0; i < n; ++i) data.push_back(static_cast<uint16_t>(4 + rng() % 32000));
    data.push_back(2);
    offsets.push_back(data.size());
  }
  std::ofstream(dir + "/t.bin", std::ios::binary).write(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size() * 2));
  std::ofstream(dir + "/t.idx", std::ios::binary).write(reinterpret_cast<char*>(offsets.data()), static_cast<std::streamsize>(offsets.size() * 8));
  std::ofstream(dir + "/manifest.json")
      << fmt::format("{{\"format\": \"coil.tokens\", \"version\": 1, \"dtype\": \"uint16\", \"eos_id\": 2, "
                     "\"vocab_size\": 32004, \"tokenizer\": {{\"file\": \"none\", \"sha256\": \"synthetic\"}}, "
                     "\"tokens\": {}, \"documents\": {}, \"shards\": [{{\"tokens_file\": \"t.bin\", \"index_file\": "
                     "\"t.idx\", \"tokens\": {}, \"documents\": {}}}], \"inputs\": []}}",
                     data.size(), offsets.size() - 1, data.size(), offsets.size() - 1);
  return dir;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"data loader throughput: prepared shards (1 thread) and streaming (2 tokenizer threads)"};
  std::string shards_dir, stream, tokenizer;
  int64_t seq_len = 2048, batch = 8, synthetic_tokens = int64_t{128} << 20;
  double seconds = 3;
  int threads = 2;
  app.add_option("--shards", shards_dir, "a prepared directory (default: synthetic)");
  app.add_option("--stream", stream, "JSONL files to stream (with --tokenizer)");
  app.add_option("--tokenizer", tokenizer, "a sentencepiece .model or a tokenizer.json");
  app.add_option("--threads", threads, "streaming tokenizer threads")->capture_default_str();
  app.add_option("--seq-len", seq_len)->capture_default_str();
  app.add_option("--batch", batch, "sequences per micro batch")->capture_default_str();
  app.add_option("--seconds", seconds, "time per measurement")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  // Prepared shards, one thread: the loader's own work (permutation, copy, uint16 -> int32).
  const bool synthetic = shards_dir.empty();
  if (synthetic) shards_dir = synthetic_shards(synthetic_tokens);
  {
    auto shards = std::make_shared<TokenShards>(shards_dir);
    auto samples = std::make_shared<PackedSamples>(shards, seq_len);
    // The same shards as a mixture of three parts weighted 5:3:2 (data/mixture.h): the cost of
    // finding each sample's part and its place in that part's order (data/mixture.h's Interleave).
    auto mixture = std::make_shared<MixedSamples>(std::vector<std::shared_ptr<const SampleSource>>{samples, samples, samples},
                                                  std::vector<std::string>{"a", "b", "c"}, std::vector<double>{5, 3, 2}, 1234);
    auto rate = [&](std::shared_ptr<const SampleSource> source) {
      auto loader = make_indexed_loader(source, BatchGeometry{seq_len, batch, batch, 0, 1}, 1234, /*prefetch=*/0);
      for (int i = 0; i < 20; ++i) loader->next();  // warm the page cache a little
      int64_t tokens = 0;
      const double t0 = now();
      while (now() - t0 < seconds / 2) tokens += loader->next().rows * seq_len;
      return tokens / (now() - t0);
    };
    double single = 0, mixed = 0;
    for (int round = 0; round < 2; ++round) single += rate(samples) / 2, mixed += rate(mixture) / 2;  // interleaved
    fmt::print("shards    {} ({} tokens, {} sequences of {}): {:.1f}M tokens/s on 1 thread = {:.1f}x the 5M target\n",
               synthetic ? "synthetic" : shards_dir, shards->tokens(), samples->size(), seq_len, single / 1e6, single / 5e6);
    fmt::print("mixture   the same shards as 3 parts weighted 5:3:2: {:.1f}M tokens/s = {:.3f}x the single set's\n",
               mixed / 1e6, mixed / single);
  }
  if (synthetic) fs::remove_all(shards_dir);

  if (!stream.empty()) {
    StreamingOptions o;
    o.files = expand_inputs(stream);
    o.tokenizer = tokenizer;
    o.threads = threads;
    o.geometry = BatchGeometry{seq_len, batch, batch, 0, 1};
    auto measure = [&](Loader& loader) {
      loader.next();  // start-up: first chunks read and tokenized
      int64_t tokens = 0;
      const double t0 = now();
      while (now() - t0 < seconds) tokens += loader.next().rows * seq_len;
      return tokens / (now() - t0);
    };
    const double rate = measure(*make_streaming_loader(o));
    fmt::print("streaming {} file(s), {} tokenizer threads: {:.2f}M tokens/s = {:.2f}x the 1M target\n", o.files.size(),
               threads, rate / 1e6, rate / 1e6);
    // The same files as a streamed mixture of two parts, 7:3, each with its own threads as a run
    // gives them (data/streaming.h): a row at a time from the part the interleave names.
    StreamingOptions b = o;
    b.seed = 1;
    const double mixed = measure(*make_streaming_mixture({o, b}, {"a", "b"}, {7, 3}));
    fmt::print("streamed mixture of 2 parts (7:3, {} tokenizer threads each): {:.2f}M tokens/s = {:.3f}x the single "
               "stream's\n", threads, mixed / 1e6, mixed / rate);
  }
  return 0;
}
