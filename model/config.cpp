#include "model/config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

#include "util/error.h"

namespace coil {

MambaConfig MambaConfig::padded() const {
  MambaConfig c = *this;
  const int64_t m = pad_vocab_multiple > 0 ? pad_vocab_multiple : 1;
  c.vocab_size = (vocab_size + m - 1) / m * m;
  return c;
}

void MambaConfig::validate() const {
  auto positive = [](const char* key, int64_t v) {
    COIL_CHECK(v > 0, "model config: {} must be positive, got {}", key, v);
  };
  positive("d_model", d_model);
  positive("n_layer", n_layer);
  positive("vocab_size", vocab_size);
  positive("d_state", d_state);
  positive("d_conv", d_conv);
  positive("expand", expand);
  positive("pad_vocab_multiple", pad_vocab_multiple);
  COIL_CHECK(dt_rank >= 0, "model config: dt_rank must be >= 0 (0: ceil(d_model / 16)), got {}", dt_rank);
  COIL_CHECK(std::isfinite(rms_eps) && rms_eps > 0, "model config: rms_eps must be > 0, got {}", rms_eps);
  COIL_CHECK(std::isfinite(dt_max) && dt_min > 0 && dt_min <= dt_max,
             "model config: need 0 < dt_min <= dt_max, got {} and {}", dt_min, dt_max);
  COIL_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0, "model config: dt_init_floor must be >= 0, got {}",
             dt_init_floor);
}

int64_t MambaConfig::num_parameters() const {
  const int64_t H = d_model, I = d_inner(), N = d_state, R = rank(), K = d_conv;
  const int64_t per_layer = H                 // norm
                            + 2 * I * H       // in_proj
                            + I * K + I       // conv1d weight, bias
                            + (R + 2 * N) * I // x_proj
                            + I * R + I       // dt_proj weight, bias
                            + I * N + I       // A_log, D
                            + H * I;          // out_proj
  return vocab_size * H + n_layer * per_layer + H;
}

std::string MambaConfig::describe() const {
  return fmt::format("d_model={} n_layer={} vocab={} d_state={} d_conv={} expand={} dt_rank={} ({:.1f}M params)",
                     d_model, n_layer, vocab_size, d_state, d_conv, expand, rank(),
                     num_parameters() / 1e6);
}

std::vector<std::string> MambaConfig::preset_names() {
  return {"tiny", "130m", "370m", "790m", "1.4b", "2.8b"};
}

MambaConfig MambaConfig::preset(const std::string& name) {
  MambaConfig c;  // defaults: vocab 50280 (GPT-NeoX, padded), N=16, K=4, expand 2
  auto shape = [&](int64_t h, int64_t l) { c.d_model = h; c.n_layer = l; };
  if (name == "tiny") {
    shape(64, 2);
    c.vocab_size = 512;
  } else if (name == "130m") {
    shape(768, 24);
  } else if (name == "370m") {
    shape(1024, 48);
  } else if (name == "790m") {
    shape(1536, 48);
  } else if (name == "1.4b") {
    shape(2048, 48);
  } else if (name == "2.8b") {
    shape(2560, 64);
  } else {
    fail("unknown model preset '{}' (known: {})", name, fmt::join(preset_names(), ", "));
  }
  return c.padded();
}

}  // namespace coil
