// A trained model and its tokenizer from a checkpoint (a step folder or a consolidated .h5), for
// `coil generate`, `coil chat` and `coil ckpt export-hf`.
#pragma once

#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "launch/config.h"
#include "model/mamba.h"

namespace coil {

struct LoadedModel {
  RunConfig config;  // the run's, as the checkpoint recorded it
  std::unique_ptr<MambaLM> model;
  std::unique_ptr<data::Tokenizer> tokenizer;
};

// Verifies the checkpoint (every file whole, or an error listing what is not), then reads the
// weights. The tokenizer is the checkpoint's own copy, or `tokenizer_path` when given; without
// either, an error, or no tokenizer (null) when need_tokenizer is false.
LoadedModel load_model(const std::string& checkpoint, const std::string& tokenizer_path = "",
                       bool need_tokenizer = true);

}  // namespace coil
