// SFT rows packed (data.sft_packing) against padded, for an epoch of Alpaca-format data: how many
// rows of seq_len + 1 tokens an epoch needs each way, how many of their tokens are padding, and the
// row ratio (padded / packed), which bounds the step-time speed-up packing can give at a fixed cost
// per row. Counts only (no model): the throughput itself is measured with a model on a GPU.
//   bench_sft_packing --tokenizer MODEL|tokenizer.json --input FILES [--seq-len 512] [--seed 0]
//                     [--template alpaca] [--epochs 2]
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <memory>

#include "data/reader.h"
#include "data/sft.h"
#include "data/tokenizer.h"

using namespace coil::data;

int main(int argc, char** argv) {
  CLI::App app{"SFT rows and padding, packed vs padded"};
  std::string tokenizer, input, templ = "alpaca";
  int64_t seq_len = 512, epochs = 2;
  uint64_t seed = 0;
  app.add_option("--tokenizer", tokenizer, "a sentencepiece .model or tokenizer.json")->required();
  app.add_option("--input", input, "Alpaca JSON / JSONL file(s) (a glob)")->required();
  app.add_option("--seq-len", seq_len, "train.seq_len");
  app.add_option("--seed", seed, "train.seed (the packing order)");
  app.add_option("--template", templ, "data.sft_template");
  app.add_option("--epochs", epochs, "epochs packed (their row counts differ a little)");
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
    PackedSftSamples packed(ds, seed);
    for (int64_t e = 0; e < epochs; ++e) {
      const int64_t rows = packed.rows_in_epoch(seed, e), pad = rows * cols - tokens;
      fmt::print("packed epoch {}: {} rows, {} padding tokens ({:.1f}%), {:.2f} examples a row; rows padded/packed = {:.2f}x\n",
                 e, rows, pad, 100.0 * static_cast<double>(pad) / static_cast<double>(rows * cols),
                 static_cast<double>(n) / static_cast<double>(rows), static_cast<double>(n) / static_cast<double>(rows));
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
