// `coil generate`: text from a checkpoint, for a prompt or an Alpaca-style instruction. Decoding
// runs the prompt once (prefill), then one token at a time from the recurrent state.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fmt/core.h>

#include <memory>

#include "data/reader.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "launch/load_model.h"
#include "model/mamba.h"
#include "util/error.h"

namespace coil {
namespace {

struct GenerateOptions {
  std::string checkpoint, tokenizer, prompt, instruction, input;
  int64_t max_new_tokens = 128, top_k = 40;
  double temperature = 0.0;
  uint64_t seed = 0;
};

void run_generate(const GenerateOptions& o) {
  COIL_CHECK(o.prompt.empty() != o.instruction.empty(), "give either --prompt or --instruction");
  c10::NoGradGuard no_grad;
  LoadedModel loaded = load_model(o.checkpoint, o.tokenizer);
  const MambaLM& model = *loaded.model;
  const data::Tokenizer& tok = *loaded.tokenizer;

  const std::string prompt = o.prompt.empty() ? data::alpaca_prompt({o.instruction, o.input, ""}) : o.prompt;
  std::vector<int32_t> ids = tok.encode(prompt);
  COIL_CHECK(!ids.empty(), "the prompt is empty");
  at::Tensor tokens = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).unsqueeze(0);
  MambaCache cache = model.new_cache(1);
  at::Tensor logits = model.prefill(tokens, cache).select(1, -1);  // [1, V]
  at::Generator gen = at::detail::createCPUGenerator(o.seed);
  std::vector<int32_t> out;
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    at::Tensor l = logits.narrow(1, 0, tok.vocab_size()).squeeze(0);  // padding rows are never produced
    int64_t next;
    if (o.temperature <= 0) {
      next = l.argmax().item<int64_t>();
    } else {
      auto [vals, idx] = l.topk(std::min<int64_t>(o.top_k, l.size(0)));
      at::Tensor probs = at::softmax(vals / o.temperature, 0);
      next = idx[at::multinomial(probs, 1, false, gen).item<int64_t>()].item<int64_t>();
    }
    if (next == tok.eos()) break;
    out.push_back(static_cast<int32_t>(next));
    logits = model.step(at::tensor({next}, at::kLong), cache);
  }
  fmt::print("{}{}\n", o.prompt.empty() ? "" : prompt, tok.decode(out));
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a checkpoint (a prompt, or an instruction)");
  cmd->add_option("--checkpoint", o->checkpoint, "a checkpoint (e.g. runs/x/checkpoints/final, or a consolidated .h5)")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "a sentencepiece .model (default: the copy inside the checkpoint)");
  cmd->add_option("--prompt", o->prompt, "text to continue");
  cmd->add_option("--instruction", o->instruction, "an instruction, put in the Alpaca template (SFT models)");
  cmd->add_option("--input", o->input, "the instruction's input, if any");
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "0: greedy")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "sample among the k most likely tokens")->capture_default_str();
  cmd->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  on_run(cmd, [o] { run_generate(*o); });
}

}  // namespace coil
