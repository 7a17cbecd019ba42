// SFT rows packed (data.sft_packing) against padded, for an epoch of Alpaca-format data: how many
// rows of seq_len + 1 tokens an epoch needs each way, how many of their tokens are padding, and the
// row ratio (padded / packed), which bounds the step-time speed-up packing can give at a fixed cost
// per row. Counts only (no model): the throughput itself is measured with a model on a GPU.
// Also: the milliseconds the packing of an epoch takes (PackedSftSamples' best fit decreasing, in
// windows of kPackWindow examples), the rows BFD would make of epoch 0 in other windows (--windows),
// and, for comparison, those of the packing before 2026-12-01 (first fit over the 16 rows opened last).
//   bench_sft_packing --tokenizer MODEL|tokenizer.json --input FILES [--seq-len 512] [--seed 0]
//                     [--template alpaca] [--epochs 2] [--windows 1024,4096,16384]
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <deque>
#include <memory>
#include <vector>

#include "data/reader.h"
#include "data/sft.h"
#include "data/tokenizer.h"

using namespace coil::data;

int main(int argc, char** argv) {
  CLI::App app{"SFT rows and padding, packed vs padded"};
  std::string tokenizer, input, templ = "alpaca";
  int64_t seq_len = 512, epochs = 2;
  uint64_t seed = 0;
  std::vector<int64_t> windows{1024, 4096, 16384};
  std::string lengths_out;
  app.add_option("--tokenizer", tokenizer, "a sentencepiece .model or tokenizer.json")->required();
  app.add_option("--input", input, "Alpaca JSON / JSONL file(s) (a glob)")->required();
  app.add_option("--seq-len", seq_len, "train.seq_len");
  app.add_option("--seed", seed, "train.seed (the packing order)");
  app.add_option("--template", templ, "data.sft_template");
  app.add_option("--epochs", epochs, "epochs packed (their row counts differ a little)");
  app.add_option("--windows", windows, "BFD windows (examples) to compare on epoch 0")->delimiter(',');
  app.add_option("--lengths-out", lengths_out, "write epoch 0's example lengths, in its order, one a line");
  CLI11_PARSE(app, argc, argv);
  try {
    const Tokenizer tok(tokenizer);
    const SftTemplate t = SftTemplate::from_config(templ, "");
    check_sft_packing(tok, t, seq_len);
    auto ds = std::make_shared<SftDataset>(expand_inputs(input), tok, seq_len, ReadOptions{}, 0, t);
    fmt::print("tokenizer {} ({} ids), template tokens {}, seq_len {}\n", tokenizer, tok.vocab_size(),
               sft_template_tokens(tok, t), seq_len);
    const int64_t cols = seq_len + 1, n = ds->size();
    int64_t tokens = 0, cut = 0;
    for (int64_t i = 0; i < n; ++i) {
      tokens += (*ds)[i].length;
      cut += (*ds)[i].length == cols;
    }
    fmt::print("{} examples ({} dropped, {} cut at seq_len {}): {} tokens, mean {:.1f} a example, {} response tokens\n",
               n, ds->dropped(), cut, seq_len, tokens, static_cast<double>(tokens) / static_cast<double>(n),
               ds->response_tokens());
    const int64_t padded_pad = n * cols - tokens;
    fmt::print("padded: {} rows, {} padding tokens ({:.1f}% of the rows' tokens)\n", n, padded_pad,
               100.0 * static_cast<double>(padded_pad) / static_cast<double>(n * cols));
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    const std::clock_t c0 = std::clock();
    PackedSftSamples packed(ds, seed);  // packs epoch 0
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count(),
                 cpu_ms = 1000.0 * static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    fmt::print("packing (best fit decreasing in windows of {} examples): epoch 0 in {:.1f} ms ({:.1f} ms of CPU)\n",
               PackedSftSamples::kPackWindow, ms, cpu_ms);
    for (int64_t e = 0; e < epochs; ++e) {
      const int64_t rows = packed.rows_in_epoch(seed, e), pad = rows * cols - tokens;
      fmt::print("packed epoch {}: {} rows, {} padding tokens ({:.1f}%), {:.2f} examples a row; rows padded/packed = {:.2f}x\n",
                 e, rows, pad, 100.0 * static_cast<double>(pad) / static_cast<double>(rows * cols),
                 static_cast<double>(n) / static_cast<double>(rows), static_cast<double>(n) / static_cast<double>(rows));
    }
    // Epoch 0 packed other ways: its examples' lengths in the epoch's order.
    std::vector<int64_t> lengths;
    for (int64_t k = 0; k < n; ++k) lengths.push_back((*ds)[sample_at(k, n, seed)].length);
    if (!lengths_out.empty()) {
      std::ofstream out(lengths_out);
      for (int64_t len : lengths) out << len << '\n';
    }
    auto report = [&](const std::string& how, int64_t rows) {
      fmt::print("  epoch 0, {}: {} rows, {:.1f}% padding, rows padded/packed = {:.2f}x\n", how, rows,
                 100.0 * static_cast<double>(rows * cols - tokens) / static_cast<double>(rows * cols),
                 static_cast<double>(n) / static_cast<double>(rows));
    };
    for (int64_t w : windows) {
      const std::clock_t c1 = std::clock();
      const int64_t rows = pack_best_fit_decreasing(lengths, cols, w, 1).rows();
      report(fmt::format("BFD in windows of {} ({:.1f} ms of CPU)", w, 1000.0 * static_cast<double>(std::clock() - c1) / CLOCKS_PER_SEC), rows);
    }
    report("BFD over the whole epoch", pack_best_fit_decreasing(lengths, cols, n, 1).rows());
    std::deque<int64_t> open;  // first fit over the 16 rows opened last: their used tokens
    int64_t first_fit = 0;
    for (int64_t len : lengths) {
      auto it = std::find_if(open.begin(), open.end(), [&](int64_t used) { return used + len <= cols; });
      if (it != open.end()) {
        *it += len;
        continue;
      }
      if (open.size() == 16) open.pop_front();
      open.push_back(len);
      ++first_fit;
    }
    report("first fit over the 16 rows opened last (before 2026-12-01)", first_fit);
    report("the ceiling (tokens / cols, rounded up)", (tokens + cols - 1) / cols);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
