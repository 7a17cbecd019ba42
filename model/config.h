// MambaConfig: the shape of a Mamba-1 language model. No LibTorch here, so any file may include it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace coil {

struct MambaConfig {
  int64_t d_model = 768;      // H: hidden size
  int64_t n_layer = 24;       // number of Mamba blocks
  int64_t vocab_size = 50280; // V: embedding rows; padded up to pad_vocab_multiple (see padded())
  int64_t d_state = 16;       // N: SSM state size per channel
  int64_t d_conv = 4;         // K: causal depthwise conv kernel
  int64_t expand = 2;         // I = expand * H
  int64_t dt_rank = 0;        // R: rank of the delta projection; 0 means ceil(H / 16)
  double rms_eps = 1e-5;      // RMSNorm epsilon
  int64_t pad_vocab_multiple = 8;
  // Initialization of delta (mamba_ssm): softplus(dt_proj.bias) ~ logU(dt_min, dt_max), >= floor.
  double dt_min = 0.001, dt_max = 0.1, dt_init_floor = 1e-4;

  int64_t d_inner() const { return expand * d_model; }
  int64_t rank() const { return dt_rank > 0 ? dt_rank : (d_model + 15) / 16; }

  // The config with vocab_size rounded up to a multiple of pad_vocab_multiple.
  MambaConfig padded() const;
  // Throws coil::Error naming the first inconsistent field.
  void validate() const;
  // Number of parameters (the tied head counted once).
  int64_t num_parameters() const;
  std::string describe() const;

  // tiny (tests), 130m, 370m, 790m, 1.4b, 2.8b (shapes of mamba_ssm / Hugging Face's presets).
  static MambaConfig preset(const std::string& name);
  static std::vector<std::string> preset_names();
};

}  // namespace coil
