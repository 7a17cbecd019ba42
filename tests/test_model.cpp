// The Mamba model: the conv kernel against torch's conv1d, initialization, recurrent decoding against
// the full forward, presets, activation checkpointing against keeping the activations, and Hugging
// Face files (round trip and every kind of bad input).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "model/activation_checkpointing.h"
#include "model/config.h"
#include "model/conv1d.h"
#include "model/hf.h"
#include "model/mamba.h"
#include "model/safetensors.h"
#include "util/cpu_memory.h"
#include "util/error.h"

namespace coil {
namespace {

namespace fs = std::filesystem;
using torch::Tensor;

// Expects fn() to throw coil::Error whose message contains `needle`.
template <typename Fn>
void expect_error(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("coil_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

MambaConfig tiny() { return MambaConfig::preset("tiny"); }

TEST(CausalConv1d, MatchesTorchConv1dForwardAndGradients) {
  torch::manual_seed(0);
  struct S { int64_t B, L, I, K; };
  for (S s : {S{1, 1, 1, 4}, S{2, 3, 5, 4}, S{2, 37, 67, 4}, S{3, 130, 129, 2}, S{1, 9, 200, 7}}) {
    Tensor xz = torch::randn({s.B, s.L, 2 * s.I});
    Tensor x = xz.narrow(2, 0, s.I).detach().requires_grad_(true);  // strided, as in the model
    Tensor w = torch::randn({s.I, 1, s.K}, torch::requires_grad());
    Tensor b = torch::randn({s.I}, torch::requires_grad());
    Tensor dy = torch::randn({s.B, s.L, s.I});
    Tensor y_ref = causal_conv1d_ref(x, w, b);
    auto g_ref = torch::autograd::grad({y_ref}, {x, w, b}, {dy});
    Tensor y = causal_conv1d(x, w, b);
    auto g = torch::autograd::grad({y}, {x, w, b}, {dy});
    const std::string where = "B=" + std::to_string(s.B) + " L=" + std::to_string(s.L) + " I=" + std::to_string(s.I);
    EXPECT_TRUE(torch::allclose(y, y_ref, 1e-5, 1e-5)) << where;
    for (int k = 0; k < 3; ++k) EXPECT_TRUE(torch::allclose(g[k], g_ref[k], 1e-5, 1e-4)) << where << " grad " << k;
  }
}

// Decoding's conv step against its reference in LibTorch ops and against the whole-sequence conv:
// random shapes (odd channel counts, K = 1..4), float32 and float64, a strided x; the state slides
// in place.
TEST(CausalConv1d, StepMatchesItsReferenceAndTheWholeConv) {
  torch::manual_seed(4);
  for (auto dtype : {torch::kFloat, torch::kDouble})
    for (int64_t K : {1, 2, 4})
      for (const bool silu : {false, true})
        for (auto [B, I] : std::vector<std::pair<int64_t, int64_t>>{{1, 37}, {3, 64}, {2, 5}}) {
          const int64_t L = 7;
          const Tensor x = torch::randn({B, L, 2 * I}, dtype).narrow(2, 0, I);  // rows strided, as in_proj's half
          const Tensor w = torch::randn({I, 1, K}, dtype), b = torch::randn({I}, dtype);
          const Tensor conv = causal_conv1d_ref(x, w, b), whole = silu ? torch::silu(conv) : conv;
          Tensor state = torch::zeros({B, K - 1, I}, dtype), ref_state = state.clone();
          const void* storage = state.data_ptr();
          for (int64_t t = 0; t < L; ++t) {
            const std::string at = fmt::format("K {} I {} silu {} t {}", K, I, silu, t);
            const Tensor y = causal_conv1d_step(x.select(1, t), state, w, b, silu);
            const Tensor y_ref = causal_conv1d_step_ref(x.select(1, t), ref_state, w, b, silu);
            const double tol = dtype == torch::kFloat ? 1e-5 : 1e-12;
            EXPECT_TRUE(torch::allclose(y, y_ref, tol, tol)) << at;
            EXPECT_TRUE(torch::allclose(y, whole.select(1, t), tol, tol)) << at;
            EXPECT_TRUE(torch::equal(state, ref_state));
          }
          EXPECT_EQ(state.data_ptr(), storage);  // slid in place
        }
  Tensor state = torch::zeros({1, 3, 8});
  EXPECT_THROW(causal_conv1d_step(torch::zeros({1, 9}), state, torch::zeros({8, 1, 4}), torch::zeros({8})), Error);
  EXPECT_THROW(causal_conv1d_step(torch::zeros({1, 8}), state, torch::zeros({8, 1, 3}), torch::zeros({8})), Error);
}

TEST(MambaConfig, PresetsAndErrors) {
  EXPECT_EQ(MambaConfig::preset("130m").d_model, 768);
  EXPECT_EQ(MambaConfig::preset("130m").n_layer, 24);
  EXPECT_EQ(MambaConfig::preset("2.8b").n_layer, 64);
  // mamba-130m: 129.1M parameters with the head tied.
  EXPECT_NEAR(MambaConfig::preset("130m").num_parameters() / 1e6, 129.1, 0.1);
  MambaConfig c = tiny();
  c.vocab_size = 1001;
  EXPECT_EQ(c.padded().vocab_size, 1008);
  EXPECT_EQ(c.rank(), 4);  // ceil(64 / 16)
  expect_error([] { MambaConfig::preset("7b"); }, "unknown model preset '7b' (known: tiny, 130m");
  c.d_state = 0;
  expect_error([&] { c.validate(); }, "d_state must be positive");
}

TEST(MambaLM, InitializationFollowsMambaSsm) {
  MambaConfig c = tiny();
  MambaLM m(c, 7), same(c, 7), other(c, 8);
  const auto& w = m.layers[0];
  const int64_t N = c.d_state;
  EXPECT_TRUE(torch::allclose(w.A_log[3], torch::log(torch::arange(1, N + 1, torch::kFloat))));
  EXPECT_TRUE(torch::equal(w.D, torch::ones_like(w.D)));
  Tensor dt = torch::softplus(w.dt_b);
  EXPECT_GE(dt.min().item<float>(), 0.001f * 0.999f);
  EXPECT_LE(dt.max().item<float>(), 0.1f * 1.001f);
  const double out_bound = 1.0 / std::sqrt(double(c.d_inner())) / std::sqrt(double(c.n_layer));
  EXPECT_LE(w.out_proj.abs().max().item<double>(), out_bound);
  EXPECT_GT(w.out_proj.abs().max().item<double>(), 0.9 * out_bound);
  EXPECT_NEAR(m.embedding.std().item<double>(), 0.02, 0.001);
  for (size_t i = 0; i < m.named_parameters().size(); ++i) {
    EXPECT_TRUE(torch::equal(m.named_parameters()[i].tensor, same.named_parameters()[i].tensor));
  }
  EXPECT_FALSE(torch::equal(m.embedding, other.embedding));
}

TEST(MambaLM, ParameterNamesAreHuggingFaces) {
  MambaLM m(tiny());
  auto p = m.named_parameters();
  ASSERT_EQ(p.size(), 2 + 10 * 2u);
  EXPECT_EQ(p[0].name, "backbone.embeddings.weight");
  EXPECT_EQ(p[2].name, "backbone.layers.0.mixer.in_proj.weight");
  EXPECT_EQ(p[2].tensor.sizes(), (std::vector<int64_t>{256, 64}));
  EXPECT_EQ(m.parameter("backbone.layers.1.mixer.x_proj.weight").sizes(), (std::vector<int64_t>{4 + 32, 128}));
  EXPECT_EQ(p.back().name, "backbone.norm_f.weight");
  int64_t total = 0;
  for (auto& t : p) total += t.tensor.numel();
  EXPECT_EQ(total, tiny().num_parameters());
  expect_error([&] { m.parameter("lm_head.weight"); }, "no parameter named 'lm_head.weight'");
}

// Decoding (prefill, then one step per token) gives the full forward's logits; with the matrices
// stored in bfloat16 (store_matrices), it gives the full forward of a float32 model holding the
// same rounded values.
TEST(MambaLM, RecurrentStepsEqualTheFullForward) {
  MambaConfig c = tiny();
  c.n_layer = 3;
  auto make = [&] {
    torch::manual_seed(1);
    MambaLM m(c, 3);
    for (auto& p : m.named_parameters())  // move away from the init's symmetric values
      p.tensor.data().add_(torch::randn_like(p.tensor) * 0.05);
    return m;
  };
  const int64_t B = 2, L = 12;
  torch::manual_seed(7);
  Tensor tokens = torch::randint(c.vocab_size, {B, L});
  for (bool bf16 : {false, true}) {
    MambaLM m = make(), reference = make();
    if (bf16) {
      m.store_matrices(torch::kBFloat16);
      EXPECT_EQ(m.layers[0].in_proj.scalar_type(), torch::kBFloat16);
      EXPECT_EQ(m.embedding.scalar_type(), torch::kBFloat16);
      EXPECT_EQ(m.layers[0].A_log.scalar_type(), torch::kFloat);
      EXPECT_EQ(m.layers[0].conv_w.scalar_type(), torch::kFloat);
      for (auto& p : reference.named_parameters())
        if (p.tensor.dim() == 2 && !MambaLM::keeps_float32(p.name))
          p.tensor.data().copy_(p.tensor.to(torch::kBFloat16).to(torch::kFloat));
    }
    Tensor full;
    {
      torch::NoGradGuard ng;
      full = reference.forward(tokens);
    }
    for (int64_t prompt : {1, 2, 5}) {  // shorter and longer than the conv window
      MambaCache cache;
      Tensor logits = m.prefill(tokens.narrow(1, 0, prompt), cache);
      EXPECT_EQ(logits.scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::allclose(logits, full.select(1, prompt - 1), 1e-5, 1e-5)) << "bf16 " << bf16;
      for (int64_t t = prompt; t < L; ++t) {
        Tensor step = m.step(tokens.select(1, t), cache);
        EXPECT_TRUE(torch::allclose(step, full.select(1, t), 1e-4, 1e-4))
            << "bf16 " << bf16 << " prompt " << prompt << " step " << t << " max diff "
            << (step - full.select(1, t)).abs().max().item<float>();
      }
    }
  }
}

// checkpointed(f, inputs) against f itself on random odd shapes: the same output and gradients,
// none for inputs that need none (an integer index, a constant), and f run twice.
TEST(ActivationCheckpointing, MatchesTheFunctionItself) {
  torch::manual_seed(5);
  int runs = 0;
  auto f = [&](const std::vector<Tensor>& in) {
    ++runs;
    return torch::tanh(torch::matmul(in[0], in[1])).index_select(0, in[2]) * in[3] + in[0].sum();
  };
  for (auto [m, k, n] : {std::tuple<int64_t, int64_t, int64_t>{3, 5, 7}, {1, 1, 1}, {9, 4, 13}}) {
    Tensor x = torch::randn({m, k}, torch::kDouble), w = torch::randn({k, n}, torch::kDouble);
    Tensor idx = torch::randint(m, {m + 2}, torch::kLong), c = torch::randn({n}, torch::kDouble);
    Tensor g = torch::randn({m + 2, n}, torch::kDouble);
    std::vector<Tensor> grads[2];
    Tensor out[2];
    for (int ckpt : {0, 1}) {
      Tensor xa = x.clone().requires_grad_(true), wa = w.clone().requires_grad_(true);
      runs = 0;
      out[ckpt] = ckpt ? checkpointed(f, {xa, wa, idx, c}) : f({xa, wa, idx, c});
      out[ckpt].backward(g);
      EXPECT_EQ(runs, ckpt ? 2 : 1);
      grads[ckpt] = {xa.grad(), wa.grad()};
    }
    EXPECT_TRUE(torch::equal(out[0], out[1]));
    EXPECT_TRUE(torch::allclose(grads[0][0], grads[1][0], 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(grads[0][1], grads[1][1], 1e-12, 1e-12));
  }
  {
    torch::NoGradGuard no_grad;
    runs = 0;
    checkpointed(f, {torch::randn({2, 2}).requires_grad_(true), torch::randn({2, 2}), torch::zeros({1}, torch::kLong),
                     torch::randn({2})});
    EXPECT_EQ(runs, 1);
  }
  expect_error([] { parse_activation_checkpointing("selective", "train.activation_checkpointing"); },
               "train.activation_checkpointing must be \"none\" or \"full\", not \"selective\"");
  EXPECT_EQ(parse_activation_checkpointing("full", "x"), ActivationCheckpointing::full);
  EXPECT_EQ(parse_activation_checkpointing("none", "x"), ActivationCheckpointing::none);
}

// The whole model with each block checkpointed: the same loss and gradients as keeping the
// activations (float32 bit for bit; bf16 compute too), and far fewer bytes held after forward.
TEST(MambaLM, ActivationCheckpointingGivesTheSameLossAndGradients) {
  CpuMemory& mem = CpuMemory::install();
  MambaConfig cfg = tiny();
  cfg.n_layer = 3;
  torch::manual_seed(9);
  const Tensor tokens = torch::randint(cfg.vocab_size, {3, 19});
  for (at::ScalarType compute : {at::kFloat, at::kBFloat16}) {
    Tensor loss[2];
    int64_t held[2];
    std::vector<Tensor> grads[2];
    for (int ckpt : {0, 1}) {
      MambaLM model(cfg, 4);
      model.set_activation_checkpointing(ckpt ? ActivationCheckpointing::full : ActivationCheckpointing::none);
      auto params = model.named_parameters();
      for (auto& p : params) p.tensor.requires_grad_(true);
      const int64_t before = mem.bytes();
      const Tensor logits = model.forward(tokens.narrow(1, 0, 18), compute);
      held[ckpt] = mem.bytes() - before;
      loss[ckpt] = lm_loss(logits, tokens.narrow(1, 1, 18));
      loss[ckpt].backward();
      for (auto& p : params) grads[ckpt].push_back(p.tensor.grad());
    }
    EXPECT_EQ(loss[0].item<double>(), loss[1].item<double>()) << c10::toString(compute);
    for (size_t i = 0; i < grads[0].size(); ++i)
      EXPECT_TRUE(torch::allclose(grads[0][i], grads[1][i], 1e-6, 1e-7)) << c10::toString(compute) << " parameter " << i;
    EXPECT_LT(held[1], held[0] / 2) << c10::toString(compute);
  }
}

TEST(MambaLM, LossIgnoresMaskedTargets) {
  torch::manual_seed(2);
  Tensor logits = torch::randn({2, 3, 11});
  Tensor targets = torch::tensor({{1, -100, 3}, {-100, 5, 6}});
  Tensor keep = torch::tensor({0, 2, 4, 5});
  Tensor want = torch::nn::functional::cross_entropy(logits.reshape({6, 11}).index_select(0, keep),
                                                     targets.reshape({6}).index_select(0, keep));
  EXPECT_TRUE(torch::allclose(lm_loss(logits, targets), want));
}

TEST(HuggingFace, SaveAndLoadRoundTrip) {
  fs::path dir = temp_dir("hf_roundtrip");
  MambaLM m(tiny(), 5);
  save_hf(m, dir.string());
  MambaLM back = load_hf(dir.string());
  EXPECT_EQ(back.config().d_model, 64);
  EXPECT_EQ(back.config().vocab_size, tiny().vocab_size);
  auto a = m.named_parameters(), b = back.named_parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].tensor, b[i].tensor)) << a[i].name;
  fs::remove_all(dir);
}

// Writes a tiny model's files, lets `edit` change them, and expects load_hf to fail with `needle`.
void expect_bad_checkpoint(const std::string& name, const std::function<void(const fs::path&)>& edit,
                           const std::string& needle) {
  fs::path dir = temp_dir(name);
  save_hf(MambaLM(tiny()), dir.string());
  edit(dir);
  expect_error([&] { load_hf(dir.string()); }, needle);
  fs::remove_all(dir);
}

std::vector<std::pair<std::string, Tensor>> tensors_of(const fs::path& dir) {
  auto m = read_safetensors((dir / "model.safetensors").string());
  return {m.begin(), m.end()};
}

TEST(HuggingFace, BadCheckpointsAreOneLineErrors) {
  auto st = [](const fs::path& d) { return (d / "model.safetensors").string(); };
  expect_bad_checkpoint("truncated", [&](const fs::path& d) { fs::resize_file(st(d), fs::file_size(st(d)) - 100); },
                        "truncated file");
  expect_bad_checkpoint("tiny_file", [&](const fs::path& d) { fs::resize_file(st(d), 5); }, "no header");
  expect_bad_checkpoint("missing", [&](const fs::path& d) {
    auto t = tensors_of(d);
    t.erase(std::remove_if(t.begin(), t.end(), [](auto& p) { return p.first == "backbone.layers.1.mixer.D"; }), t.end());
    write_safetensors(st(d), t);
  }, "model.safetensors: missing tensor 'backbone.layers.1.mixer.D'");
  expect_bad_checkpoint("shape", [&](const fs::path& d) {
    auto t = tensors_of(d);
    for (auto& p : t)
      if (p.first == "backbone.layers.0.mixer.x_proj.weight") p.second = torch::zeros({3, 3});
    write_safetensors(st(d), t);
  }, "tensor 'backbone.layers.0.mixer.x_proj.weight' has shape [3, 3], expected [36, 128]");
  expect_bad_checkpoint("dtype", [&](const fs::path& d) {
    auto t = tensors_of(d);
    for (auto& p : t)
      if (p.first == "backbone.norm_f.weight") p.second = torch::zeros({64}, torch::kLong);
    write_safetensors(st(d), t);
  }, "tensor 'backbone.norm_f.weight' has dtype Long, expected a floating-point type");
  expect_bad_checkpoint("extra", [&](const fs::path& d) {
    auto t = tensors_of(d);
    t.emplace_back("backbone.layers.9.mixer.D", torch::zeros({2}));
    write_safetensors(st(d), t);
  }, "unexpected tensor 'backbone.layers.9.mixer.D'");
  expect_bad_checkpoint("unknown_dtype", [&](const fs::path& d) {
    // Rewrite the header's first dtype as one safetensors does not define.
    std::fstream f(st(d), std::ios::in | std::ios::out | std::ios::binary);
    std::string head(4096, '\0');
    f.read(head.data(), head.size());
    const size_t at = head.find("\"F32\"");
    f.seekp(at);
    f.write("\"F99\"", 5);
  }, "unsupported dtype \"F99\"");
  expect_bad_checkpoint("no_config", [&](const fs::path& d) { fs::remove(d / "config.json"); }, "config.json: cannot open");
  expect_bad_checkpoint("bad_config", [&](const fs::path& d) {
    std::ofstream(d / "config.json") << R"({"model_type": "mamba", "hidden_size": "wide", "num_hidden_layers": 2})";
  }, "key 'hidden_size' must be an integer");
  expect_bad_checkpoint("bias", [&](const fs::path& d) {
    std::ofstream(d / "config.json") << R"({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512, "use_bias": true})";
  }, "use_bias = true");
}

// Found while writing the safetensors fuzz target (tests/fuzz/corpus/safetensors/numel-overflow*,
// docs/RELIABILITY.md): a shape whose element count overflows int64 wrapped around (undefined
// behaviour; [2^62, 4] of F32 came to 0 elements and passed the size check). Now a one-line error.
TEST(Safetensors, ShapesTooLargeToCountAreOneLineErrors) {
  fs::path dir = temp_dir("st_overflow");
  auto write_header = [&](const std::string& header) {
    const std::string path = (dir / "x.safetensors").string();
    std::ofstream f(path, std::ios::binary);
    const uint64_t len = header.size();
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << header;
    return path;
  };
  const std::string a = write_header(R"({"a": {"dtype": "F32", "shape": [2305843009213693952, 2], "data_offsets": [0, 0]}})");
  expect_error([&] { read_safetensors(a); },
               "x.safetensors: tensor 'a': shape [2305843009213693952, 2] of F32 has more bytes than an int64 counts");
  const std::string b = write_header(R"({"b": {"dtype": "U8", "shape": [1099511627776, 1099511627776, 0], "data_offsets": [0, 0]}})");
  expect_error([&] { read_safetensors(b); },
               "x.safetensors: tensor 'b': shape [1099511627776, 1099511627776, ...] has more elements than an int64 counts");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace coil
