#include "launch/load_model.h"

#include <fmt/format.h>

#include "dist/checkpoint.h"
#include "util/error.h"

namespace coil {

LoadedModel load_model(const std::string& checkpoint, const std::string& tokenizer_path, bool need_tokenizer) {
  dist::Checkpoint ck(checkpoint);
  std::string problems;
  for (const auto& p : ck.verify()) problems += (problems.empty() ? "" : "; ") + p;
  COIL_CHECK(problems.empty(), "{} is damaged: {}", checkpoint, problems);
  LoadedModel out;
  out.config = RunConfig::parse(ck.string("config"), checkpoint + ": config");
  int64_t vocab = 0;
  for (const auto& t : ck.tensors())
    if (t.name == "model/backbone.embeddings.weight") vocab = t.shape[0];
  COIL_CHECK(vocab > 0, "{} holds no model/backbone.embeddings.weight", checkpoint);
  const MambaConfig mc = out.config.model_config(vocab);
  out.model = std::make_unique<MambaLM>(mc, 0);
  for (const auto& p : out.model->named_parameters()) ck.read("model/" + p.name, p.tensor);
  if (!tokenizer_path.empty()) {
    out.tokenizer = std::make_unique<data::Tokenizer>(tokenizer_path);
  } else if (const std::string bytes = ck.tokenizer(); !bytes.empty()) {
    out.tokenizer = std::make_unique<data::Tokenizer>(data::Tokenizer::from_bytes(bytes, checkpoint + ": tokenizer/model"));
  } else {
    COIL_CHECK(!need_tokenizer, "{} holds no tokenizer (imported from Hugging Face?); pass --tokenizer FILE.model or "
               "tokenizer.json, or token ids (--prompt-ids)", checkpoint);
    return out;
  }
  data::check_vocab_fits(out.tokenizer->vocab_size(), mc.vocab_size, out.tokenizer->path());
  return out;
}

}  // namespace coil
