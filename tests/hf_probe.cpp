// Test helper for tests/python/test_hf_parity.py: loads a Hugging Face Mamba directory, runs the
// forward and backward pass on the token ids in IN, and writes the logits, the loss and the
// gradient of every parameter to OUT (safetensors), for comparison with transformers.
//   hf_probe HF_DIR IN.safetensors OUT.safetensors [float64]
#include <fmt/core.h>
#include <torch/torch.h>

#include "model/hf.h"
#include "model/mamba.h"
#include "model/safetensors.h"
#include "util/error.h"

int main(int argc, char** argv) {
  if (argc != 4 && !(argc == 5 && std::string(argv[4]) == "float64")) {
    fmt::print(stderr, "usage: hf_probe HF_DIR IN.safetensors OUT.safetensors [float64]\n");
    return 2;
  }
  try {
    coil::MambaLM model = coil::load_hf(argv[1]);
    auto in = coil::read_safetensors(argv[2]);
    COIL_CHECK(in.count("input_ids"), "{}: no tensor 'input_ids'", argv[2]);
    torch::Tensor ids = in.at("input_ids").to(torch::kLong);
    auto params = model.named_parameters();
    for (auto& p : params) {
      if (argc == 5) p.tensor.set_data(p.tensor.to(torch::kDouble));
      p.tensor.requires_grad_(true);
    }
    torch::Tensor logits = model.forward(ids);
    const int64_t L = ids.size(1);
    // Hugging Face's causal-LM loss: logits at t predict the token at t + 1.
    torch::Tensor loss = coil::lm_loss(logits.narrow(1, 0, L - 1), ids.narrow(1, 1, L - 1));
    loss.backward();
    std::vector<std::pair<std::string, torch::Tensor>> out{{"logits", logits.detach()}, {"loss", loss.detach()}};
    for (auto& p : params) out.emplace_back("grad/" + p.name, p.tensor.grad());
    coil::write_safetensors(argv[3], out);
  } catch (const std::exception& e) {
    fmt::print(stderr, "hf_probe: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
