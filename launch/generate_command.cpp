// `coil generate` and `coil chat`: text from a checkpoint. Decoding runs each prompt once
// (prefill), then one token at a time from the recurrent state (model/generate.h); tokens are
// printed as they come.
#include <ATen/ATen.h>
#include <fmt/core.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/reader.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "launch/load_model.h"
#include "launch/run_data.h"
#include "model/generate.h"
#include "model/mamba.h"
#include "util/error.h"

namespace coil {
namespace {

struct GenerateOptions {
  std::string checkpoint, tokenizer, prompt, instruction, input, prompts_file, prompt_ids, dtype = "float32";
  std::string device = "cpu";
  int64_t max_new_tokens = 128, top_k = 40, batch_size = 16;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
};

void add_sampling_options(CLI::App* cmd, GenerateOptions& o) {
  cmd->add_option("--checkpoint", o.checkpoint, "a checkpoint (e.g. runs/x/checkpoints/final, or a consolidated .h5)")->required();
  cmd->add_option("--tokenizer", o.tokenizer, "a sentencepiece .model or a tokenizer.json (default: the copy inside the checkpoint)");
  cmd->add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate at most (fewer when EOS comes)")->capture_default_str();
  cmd->add_option("--temperature", o.temperature, "0: greedy, deterministic; > 0: sample")->capture_default_str();
  cmd->add_option("--top-k", o.top_k, "when sampling: only the k most likely tokens (0: all)")->capture_default_str();
  cmd->add_option("--top-p", o.top_p, "when sampling: only the most likely tokens up to this probability mass")->capture_default_str();
  cmd->add_option("--seed", o.seed, "sampling seed (the same seed and prompts give the same text)")->capture_default_str();
  cmd->add_option("--dtype", o.dtype,
                  "float32 or bfloat16: the dtype the weight matrices are held in while decoding. bfloat16 reads "
                  "half the bytes per token (faster on CPU; the weights rounded to bfloat16, arithmetic stays "
                  "float32)")
      ->capture_default_str();
  cmd->add_option("--device", o.device,
                  "cpu (fused decoding kernels) or cuda (the first GPU; the tokens are chosen on the CPU, so a seed "
                  "gives the same choices from the same logits)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

// The checkpoint's model and tokenizer, the matrices stored in --dtype, on --device.
LoadedModel load_for_decoding(const GenerateOptions& o, bool need_tokenizer) {
  COIL_CHECK(o.dtype == "float32" || o.dtype == "bfloat16", "--dtype must be float32 or bfloat16, got '{}'", o.dtype);
  COIL_CHECK(o.device != "cuda" || (at::hasCUDA() && at::getNumGPUs() > 0),
             "--device cuda: CUDA is not available here (no GPU visible, no driver, or a LibTorch without CUDA)");
  LoadedModel loaded = load_model(o.checkpoint, o.tokenizer, need_tokenizer);
  if (o.dtype == "bfloat16") loaded.model->store_matrices(at::kBFloat16);
  if (o.device == "cuda") loaded.model->to(at::Device(at::kCUDA, 0));
  return loaded;
}

GenerateRequest request_for(const GenerateOptions& o, int64_t vocab, int32_t eos) {
  COIL_CHECK(o.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got {}", o.max_new_tokens);
  COIL_CHECK(o.temperature >= 0, "--temperature must be >= 0, got {}", o.temperature);
  COIL_CHECK(o.top_k >= 0, "--top-k must be >= 0 (0: all tokens), got {}", o.top_k);
  COIL_CHECK(o.top_p > 0 && o.top_p <= 1, "--top-p must be in (0, 1], got {}", o.top_p);
  GenerateRequest r;
  r.max_new_tokens = o.max_new_tokens;
  r.vocab = vocab;
  r.eos = eos;
  r.sampling = {o.temperature, o.top_k, o.top_p};
  r.seed = o.seed;
  return r;
}

// Prints decoded text as tokens arrive. Text is decoded from all tokens so far (a token's text
// can depend on its neighbours) and only the new part printed; an incomplete UTF-8 character at
// the end (byte-fallback tokens decode to U+FFFD until the character is whole) waits.
class TextStream {
 public:
  TextStream(const data::Tokenizer& tok, std::FILE* out) : tok_(tok), out_(out) {}
  void add(int32_t id) {
    ids_.push_back(id);
    const std::string text = tok_.decode(ids_);
    if (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0) return;
    emit(text);
  }
  // The rest, also when a later token changed the text already printed (then what follows the
  // printed length is printed: nothing is lost, though that part may not match the final text).
  void finish() { emit(tok_.decode(ids_), true); }

 private:
  void emit(const std::string& text, bool last = false) {
    if (text.size() > printed_ && (last || text.compare(0, printed_, printed_text_) == 0)) {
      std::fwrite(text.data() + printed_, 1, text.size() - printed_, out_);
      std::fflush(out_);
      printed_ = text.size();
      printed_text_ = text;
    }
  }
  const data::Tokenizer& tok_;
  std::FILE* out_;
  std::vector<int32_t> ids_;
  size_t printed_ = 0;
  std::string printed_text_;
};

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
    }
    COIL_CHECK(used > 0 && item.find_first_not_of(" \t", used) == std::string::npos && v >= 0 && v <= INT32_MAX,
               "--prompt-ids: '{}' is not a token id (expected comma-separated integers >= 0)", item);
    ids.push_back(static_cast<int32_t>(v));
  }
  COIL_CHECK(!ids.empty(), "--prompt-ids is empty");
  return ids;
}

// --prompts FILE: one prompt per line: plain text, or a JSON object with "prompt", or with
// "instruction" (and "input") for the SFT template.
std::vector<std::string> read_prompts(const std::string& path, const data::SftTemplate& templ) {
  std::ifstream in(path);
  COIL_CHECK(in.good(), "--prompts: cannot read {}", path);
  std::vector<std::string> prompts;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (line[0] != '{') {
      prompts.push_back(line);
      continue;
    }
    const auto j = nlohmann::json::parse(line, nullptr, false);
    COIL_CHECK(!j.is_discarded() && j.is_object(), "{}:{}: not a JSON object", path, n);
    if (j.contains("prompt") && j["prompt"].is_string()) {
      prompts.push_back(j["prompt"].get<std::string>());
    } else {
      COIL_CHECK(j.contains("instruction") && j["instruction"].is_string(),
                 "{}:{}: a JSON line needs a string \"prompt\" or \"instruction\"", path, n);
      const std::string input = j.contains("input") && j["input"].is_string() ? j["input"].get<std::string>() : "";
      prompts.push_back(templ.prompt({j["instruction"].get<std::string>(), input, ""}));
    }
  }
  COIL_CHECK(!prompts.empty(), "--prompts: {} holds no prompt", path);
  return prompts;
}

void run_generate(const GenerateOptions& o) {
  const int given = !o.prompt.empty() + !o.instruction.empty() + !o.prompts_file.empty() + !o.prompt_ids.empty();
  COIL_CHECK(given == 1, "give one of --prompt, --instruction, --prompts FILE, --prompt-ids");
  COIL_CHECK(o.batch_size >= 1, "--batch-size must be >= 1, got {}", o.batch_size);
  LoadedModel loaded = load_for_decoding(o, /*need_tokenizer=*/o.prompt_ids.empty());
  const MambaLM& model = *loaded.model;
  const data::Tokenizer* tok = loaded.tokenizer.get();
  const int64_t vocab = tok ? tok->vocab_size() : model.config().vocab_size;
  GenerateRequest r = request_for(o, vocab, tok ? tok->eos() : -1);

  if (!o.prompt_ids.empty()) {  // ids in, ids out: models without a sentencepiece tokenizer
    r.prompts = {parse_ids(o.prompt_ids)};
    const char* sep = "";
    generate(model, r, [&](size_t, int32_t t) {
      fmt::print("{}{}", sep, t);
      std::fflush(stdout);
      sep = " ";
    });
    fmt::print("\n");
    return;
  }
  if (!o.prompts_file.empty()) {  // a batch: one JSON line per prompt, in order, when its batch is done
    const std::vector<std::string> prompts = read_prompts(o.prompts_file, sft_template(loaded.config));
    for (size_t first = 0; first < prompts.size(); first += static_cast<size_t>(o.batch_size)) {
      const size_t count = std::min(prompts.size() - first, static_cast<size_t>(o.batch_size));
      r.prompts.clear();
      for (size_t i = first; i < first + count; ++i) {
        r.prompts.push_back(tok->encode(prompts[i]));
        COIL_CHECK(!r.prompts.back().empty(), "--prompts: prompt {} is empty", i + 1);
      }
      r.seed = o.seed + first;
      const auto outs = generate(model, r);
      for (size_t i = 0; i < count; ++i)
        fmt::print("{}\n", nlohmann::json{{"prompt", prompts[first + i]},
                                          {"completion", tok->decode(outs[i])},
                                          {"tokens", outs[i].size()}}
                               .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      std::fflush(stdout);
    }
    return;
  }
  const std::string prompt = o.prompt.empty() ? sft_template(loaded.config).prompt({o.instruction, o.input, ""}) : o.prompt;
  r.prompts = {tok->encode(prompt)};
  COIL_CHECK(!r.prompts[0].empty(), "the prompt is empty");
  if (!o.prompt.empty()) fmt::print("{}", prompt);  // a continuation is shown after its prompt
  TextStream stream(*tok, stdout);
  generate(model, r, [&](size_t, int32_t t) { stream.add(t); });
  stream.finish();
  fmt::print("\n");
}

// `coil chat`: each line read is an instruction, answered with the SFT template the checkpoint's
// run was trained with (data.sft_template; one turn: the template has no conversation history).
// In a terminal a "> " prompt is shown; piped input gets one answer per line. Ends at end of
// input, or at "/quit".
void run_chat(const GenerateOptions& o) {
  LoadedModel loaded = load_for_decoding(o, /*need_tokenizer=*/true);
  const data::Tokenizer& tok = *loaded.tokenizer;
  const data::SftTemplate templ = sft_template(loaded.config);
  GenerateRequest r = request_for(o, tok.vocab_size(), tok.eos());
  const bool terminal = isatty(STDIN_FILENO) != 0;
  if (terminal)
    fmt::print("coil chat: {} ({}). Type an instruction and press Enter; /quit or Ctrl-D ends.\n", o.checkpoint,
               loaded.model->config().describe());
  std::string line;
  for (uint64_t turn = 0;; ++turn) {
    if (terminal) fmt::print("> "), std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "/quit" || line == "/exit") break;
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    r.prompts = {tok.encode(templ.prompt({line, "", ""}))};
    r.seed = o.seed + turn;
    TextStream stream(tok, stdout);
    generate(*loaded.model, r, [&](size_t, int32_t t) { stream.add(t); });
    stream.finish();
    fmt::print("\n");
    std::fflush(stdout);
  }
  if (terminal) fmt::print("\n");
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Generate text from a checkpoint: continue a prompt, answer an instruction, or a file of prompts");
  add_sampling_options(cmd, *o);
  cmd->add_option("--prompt", o->prompt, "text to continue (printed, then the continuation as it comes)");
  cmd->add_option("--instruction", o->instruction,
                  "an instruction, put in the SFT template of the checkpoint's run (data.sft_template; Alpaca's by default)");
  cmd->add_option("--input", o->input, "the instruction's input, if any");
  cmd->add_option("--prompts", o->prompts_file,
                  "a file with one prompt per line (text, or JSON with \"prompt\" or \"instruction\"/\"input\"), "
                  "decoded in batches; prints one JSON line per prompt");
  cmd->add_option("--batch-size", o->batch_size, "prompts of --prompts decoded together")->capture_default_str();
  cmd->add_option("--prompt-ids", o->prompt_ids,
                  "the prompt as comma-separated token ids; prints token ids (no tokenizer needed)");
  on_run(cmd, [o] { run_generate(*o); });

  auto c = std::make_shared<GenerateOptions>();
  c->max_new_tokens = 256;
  CLI::App* chat = app.add_subcommand(
      "chat", "Talk to an instruction-tuned (SFT) model: each line is an instruction, the answer streams back");
  add_sampling_options(chat, *c);
  on_run(chat, [c] { run_chat(*c); });
}

}  // namespace coil
