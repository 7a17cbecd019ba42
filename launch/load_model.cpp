#include "launch/load_model.h"

#include <fmt/format.h>

#include "dist/checkpoint.h"
#include "util/error.h"

namespace coil {

LoadedModel load_model(const std::string& checkpoint, const std::string& tokenizer_path) {
  dist::Checkpoint ck(checkpoint);
  std::string problems;
  for (const auto& p : ck.verify()) problems += (problems.empty() ? "" : "; ") + p;
  COIL_CHECK(problems.empty(), "{} is damaged: {}", checkpoint, problems);
  LoadedModel out;
  out.config = RunConfig::parse(ck.string("config"), checkpoint + ": config");
  MambaConfig mc = MambaConfig::preset(out.config.model_preset);
  for (const auto& t : ck.tensors())
    if (t.name == "model/backbone.embeddings.weight") mc.vocab_size = t.shape[0];
  out.model = std::make_unique<MambaLM>(mc, 0);
  for (const auto& p : out.model->named_parameters()) ck.read("model/" + p.name, p.tensor);
  if (!tokenizer_path.empty()) {
    out.tokenizer = std::make_unique<data::Tokenizer>(tokenizer_path);
  } else {
    const std::string bytes = ck.tokenizer();
    COIL_CHECK(!bytes.empty(), "{} holds no tokenizer; pass --tokenizer", checkpoint);
    out.tokenizer = std::make_unique<data::Tokenizer>(data::Tokenizer::from_bytes(bytes, checkpoint + ": tokenizer/model"));
  }
  data::check_vocab_fits(out.tokenizer->vocab_size(), mc.vocab_size, out.tokenizer->path());
  return out;
}

}  // namespace coil
