// Hugging Face Mamba checkpoints (a directory with config.json and model.safetensors, as
// transformers' MambaForCausalLM.save_pretrained writes them) to and from Coil's model.
#pragma once

#include <string>

#include "model/config.h"

namespace coil {

class MambaLM;

// Reads config.json; rejects what Coil's model does not implement (projection biases, an untied
// head) with the key named. The vocabulary is taken as is (no further padding).
MambaConfig read_hf_config(const std::string& dir);

// Loads config.json and model.safetensors into a new model. Every parameter must be present with
// its shape (mamba_ssm's `backbone.embedding.weight` is accepted for the embedding; a tied
// `lm_head.weight` is ignored); anything else is an error naming the file and the tensor.
MambaLM load_hf(const std::string& dir);

// Writes config.json and model.safetensors that transformers' MambaForCausalLM loads.
void save_hf(const MambaLM& model, const std::string& dir);

}  // namespace coil
