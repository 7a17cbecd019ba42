#include "model/hf.h"

#include <fmt/ranges.h>
#include <torch/types.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/mamba.h"
#include "model/safetensors.h"
#include "util/error.h"

namespace coil {

namespace fs = std::filesystem;

MambaConfig read_hf_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream in(path);
  COIL_CHECK(in, "{}: cannot open (is {} a Hugging Face model directory?)", path, dir);
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  COIL_CHECK(j.is_object(), "{}: not a JSON object", path);
  auto integer = [&](const char* key, int64_t fallback, bool required = false) -> int64_t {
    if (!j.contains(key)) {
      COIL_CHECK(!required, "{}: missing key '{}'", path, key);
      return fallback;
    }
    COIL_CHECK(j[key].is_number_integer(), "{}: key '{}' must be an integer, got {}", path, key, j[key].dump());
    return j[key].get<int64_t>();
  };
  auto boolean = [&](const char* key, bool fallback) {
    if (!j.contains(key)) return fallback;
    COIL_CHECK(j[key].is_boolean(), "{}: key '{}' must be true or false, got {}", path, key, j[key].dump());
    return j[key].get<bool>();
  };
  if (j.contains("model_type"))
    COIL_CHECK(j["model_type"] == "mamba", "{}: model_type is {}, Coil reads Mamba-1 (\"mamba\")", path,
               j["model_type"].dump());
  MambaConfig c;
  c.d_model = integer("hidden_size", 0, true);
  c.n_layer = integer("num_hidden_layers", 0, true);
  c.vocab_size = integer("vocab_size", 0, true);
  c.d_state = integer("state_size", 16);
  c.d_conv = integer("conv_kernel", 4);
  c.expand = integer("expand", 2);
  c.pad_vocab_multiple = 1;
  if (j.contains("time_step_rank") && !(j["time_step_rank"].is_string() && j["time_step_rank"] == "auto"))
    c.dt_rank = integer("time_step_rank", 0);
  if (j.contains("layer_norm_epsilon")) {
    COIL_CHECK(j["layer_norm_epsilon"].is_number(), "{}: key 'layer_norm_epsilon' must be a number", path);
    c.rms_eps = j["layer_norm_epsilon"].get<double>();
  }
  if (j.contains("intermediate_size"))
    COIL_CHECK(integer("intermediate_size", 0) == c.d_inner(), "{}: intermediate_size {} is not expand * hidden_size = {}",
               path, integer("intermediate_size", 0), c.d_inner());
  COIL_CHECK(!boolean("use_bias", false), "{}: use_bias = true (projection biases) is not supported", path);
  COIL_CHECK(boolean("use_conv_bias", true), "{}: use_conv_bias = false is not supported", path);
  COIL_CHECK(boolean("tie_word_embeddings", true), "{}: tie_word_embeddings = false is not supported", path);
  try {
    c.validate();
  } catch (const Error& e) {
    fail("{}: {}", path, e.what());
  }
  return c;
}

MambaLM load_hf(const std::string& dir) {
  const MambaConfig config = read_hf_config(dir);
  const std::string path = (fs::path(dir) / "model.safetensors").string();
  auto tensors = read_safetensors(path);
  if (!tensors.count("backbone.embeddings.weight") && tensors.count("backbone.embedding.weight")) {
    tensors["backbone.embeddings.weight"] = tensors["backbone.embedding.weight"];  // mamba_ssm's name
    tensors.erase("backbone.embedding.weight");
  }
  MambaLM model(config);
  torch::NoGradGuard no_grad;
  for (auto& [name, param] : model.named_parameters()) {
    auto it = tensors.find(name);
    COIL_CHECK(it != tensors.end(), "{}: missing tensor '{}'", path, name);
    const at::Tensor& t = it->second;
    COIL_CHECK(t.is_floating_point(), "{}: tensor '{}' has dtype {}, expected a floating-point type", path, name,
               std::string(c10::toString(t.scalar_type())));
    COIL_CHECK(t.sizes() == param.sizes(), "{}: tensor '{}' has shape [{}], expected [{}]", path, name,
               fmt::join(t.sizes(), ", "), fmt::join(param.sizes(), ", "));
    param.copy_(t);
    tensors.erase(it);
  }
  tensors.erase("lm_head.weight");  // tied to the embedding
  COIL_CHECK(tensors.empty(), "{}: unexpected tensor '{}' (not part of a Mamba-1 model)", path, tensors.begin()->first);
  return model;
}

void save_hf(const MambaLM& model, const std::string& dir) {
  const MambaConfig& c = model.config();
  fs::create_directories(dir);
  nlohmann::json j = {{"architectures", {"MambaForCausalLM"}},
                      {"model_type", "mamba"},
                      {"hidden_size", c.d_model},
                      {"num_hidden_layers", c.n_layer},
                      {"vocab_size", c.vocab_size},
                      {"state_size", c.d_state},
                      {"conv_kernel", c.d_conv},
                      {"expand", c.expand},
                      {"intermediate_size", c.d_inner()},
                      {"time_step_rank", c.rank()},
                      {"layer_norm_epsilon", c.rms_eps},
                      {"use_bias", false},
                      {"use_conv_bias", true},
                      {"residual_in_fp32", true},
                      {"tie_word_embeddings", true},
                      {"time_step_min", c.dt_min},
                      {"time_step_max", c.dt_max},
                      {"time_step_floor", c.dt_init_floor}};
  std::ofstream(fs::path(dir) / "config.json") << j.dump(2) << "\n";
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& p : model.named_parameters()) tensors.emplace_back(p.name, p.tensor);
  write_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
}

}  // namespace coil
