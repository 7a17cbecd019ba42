// The training loop end to end on a tiny model and tiny data: config errors, bit-exact resume,
// checkpoints (shapes checked by name), SFT from a pretrained checkpoint, NaN handling.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "data/shards.h"
#include "data/tokenizer.h"
#include "dist/checkpoint.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "model/mamba.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace coil;

namespace {

void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const coil::Error& e) {
    return e.what();
  }
  return "no error";
}

// A tokenizer, prepared shards and an Alpaca set, made once for the suite.
class Train : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(fs::temp_directory_path() / fmt::format("coil-test-train-{}", getpid()));
    fs::create_directories(*dir_);
    std::mt19937 rng(5);
    const char* words[] = {"the", "snake", "coils", "around", "a", "warm", "stone", "and", "sleeps", "while",
                           "rain", "falls", "on", "green", "hills", "far", "away", "from", "town", "."};
    std::string jsonl, alpaca;
    for (int d = 0; d < 300; ++d) {
      std::string text;
      for (int w = 0; w < 20 + static_cast<int>(rng() % 60); ++w) text += std::string(words[rng() % 20]) + " ";
      jsonl += nlohmann::json{{"text", text}}.dump() + "\n";
      if (d < 60)
        alpaca += nlohmann::json{{"instruction", "Say something about " + std::string(words[d % 20]) + "."},
                                 {"input", ""},
                                 {"output", text.substr(0, 40)}}
                      .dump() +
                  "\n";
    }
    write(*dir_ + "/corpus.jsonl", jsonl);
    write(*dir_ + "/alpaca.jsonl", alpaca);
    data::TokenizerTrainOptions t;
    t.inputs = {*dir_ + "/corpus.jsonl"};
    t.output_prefix = *dir_ + "/tok";
    t.vocab_size = 300;
    t.threads = 2;
    data::train_tokenizer(t);
    data::PrepareOptions p;
    p.inputs = t.inputs;
    p.tokenizer = *dir_ + "/tok.model";
    p.output = *dir_ + "/shards";
    p.threads = 2;
    data::prepare_shards(p);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  // A tiny pretraining config over the suite's data.
  static RunConfig config(const std::string& run_dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> sets = {"data.train=" + *dir_ + "/shards", "data.val=" + *dir_ + "/shards",
                                     "data.tokenizer=" + *dir_ + "/tok.model", "train.run_dir=" + run_dir,
                                     "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
                                     "train.max_steps=6", "train.eval_interval=3", "train.eval_batches=2",
                                     "train.checkpoint_interval=3", "train.threads=2", "optim.warmup_steps=2"};
    sets.insert(sets.end(), extra.begin(), extra.end());
    return RunConfig::load("", sets);
  }
  static std::vector<nlohmann::json> metrics(const std::string& run_dir) {
    std::vector<nlohmann::json> out;
    std::ifstream in(run_dir + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
    return out;
  }
  static std::string* dir_;
};
std::string* Train::dir_ = nullptr;

}  // namespace

TEST(Config, ErrorsNameTheKeyAndTheLine) {
  const std::string path = fs::temp_directory_path() / fmt::format("coil-config-{}.toml", getpid());
  write(path, "[train]\nmax_steps = 10\nseq_len = \"long\"\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); }).find(path + ":3: train.seq_len must be an integer"),
            std::string::npos);
  write(path, "[train]\nmax_steps = 10\n\n[optim]\nlearning_rate = 0.1\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); }).find(path + ":5: unknown key optim.learning_rate"),
            std::string::npos);
  write(path, "[trian]\nmax_steps = 10\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); }).find("unknown section [trian]"), std::string::npos);
  write(path, "[train]\nmax_steps = = 10\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); }).find(path + ":2:"), std::string::npos);
  EXPECT_NE(error_of([&] { RunConfig::load(path + ".missing", {}); }).find("cannot read config"), std::string::npos);
  write(path, "[train]\nmax_steps = 10\n[optim]\nlearning_rate_adamw = 1\n");
  RunConfig c = RunConfig::load(path, {"train.max_steps=20", "optim.muon_scale=moonlight", "train.run_dir=/x/y",
                                       "optim.use_muon=false", "optim.learning_rate_muon=5e-3"});
  EXPECT_EQ(c.max_steps, 20);
  EXPECT_EQ(c.muon_scale, "moonlight");
  EXPECT_EQ(c.run_dir, "/x/y");
  EXPECT_FALSE(c.use_muon);
  EXPECT_DOUBLE_EQ(c.learning_rate_muon, 5e-3);
  EXPECT_DOUBLE_EQ(c.learning_rate_adamw, 1.0);  // an integer is a fine number
  EXPECT_NE(error_of([&] { RunConfig::load(path, {"train.max_steps=ten"}); }).find("--set train.max_steps=ten: train.max_steps must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of([&] { RunConfig::load(path, {"train.bogus=1"}); }).find("unknown key train.bogus"), std::string::npos);
  EXPECT_NE(error_of([&] { RunConfig::load(path, {"max_steps"}); }).find("expected section.key=value"), std::string::npos);
  // The resolved config reads back to the same values.
  write(path, c.to_toml());
  RunConfig again = RunConfig::load(path, {});
  EXPECT_EQ(again.to_toml(), c.to_toml());
  fs::remove(path);
}

// The device and precision keys take only the values named in the error, with file:line.
TEST(Config, DeviceAndDtypeKeys) {
  const std::string path = fs::temp_directory_path() / fmt::format("coil-config-dtype-{}.toml", getpid());
  write(path, "[train]\nmax_steps = 10\ndtype = \"float16\"\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); })
                .find(path + ":3: train.dtype must be \"float32\" or \"bfloat16\", not \"float16\""),
            std::string::npos);
  EXPECT_NE(error_of([&] { RunConfig::load("", {"train.device=tpu"}); }).find("train.device must be \"cpu\" or \"cuda\""),
            std::string::npos);
  EXPECT_NE(error_of([&] { RunConfig::load("", {"train.reduce_dtype=fp8"}); }).find("train.reduce_dtype must be"),
            std::string::npos);
  const RunConfig c = RunConfig::load("", {"train.dtype=bfloat16", "train.reduce_dtype=bfloat16", "train.overlap_comm=false"});
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.reduce_dtype, "bfloat16");
  EXPECT_FALSE(c.overlap_comm);
  EXPECT_EQ(RunConfig::load("", {}).device, "cpu");
  std::remove(path.c_str());
}

// train.activation_checkpointing: "none" (the default) or "full"; anything else names the key
// and file:line.
TEST(Config, ActivationCheckpointingKey) {
  const std::string path = fs::temp_directory_path() / fmt::format("coil-config-ckpt-{}.toml", getpid());
  write(path, "[train]\nmax_steps = 10\nactivation_checkpointing = \"selective\"\n");
  EXPECT_NE(error_of([&] { RunConfig::load(path, {}); })
                .find(path + ":3: train.activation_checkpointing must be \"none\" or \"full\", not \"selective\""),
            std::string::npos);
  EXPECT_EQ(RunConfig::load("", {}).activation_checkpointing, "none");
  EXPECT_EQ(RunConfig::load("", {"train.activation_checkpointing=full"}).activation_checkpointing, "full");
  std::remove(path.c_str());
}

TEST(Config, TheShippedConfigsParse) {
  for (const char* name : {"pretrain", "sft", "demo-pretrain", "demo-sft"}) {
    RunConfig c = RunConfig::load(fmt::format("{}/configs/{}.toml", COIL_SOURCE_DIR, name), {});
    EXPECT_FALSE(c.data_train.empty()) << name;
    EXPECT_FALSE(c.data_tokenizer.empty()) << name;
  }
  EXPECT_EQ(RunConfig::load(std::string(COIL_SOURCE_DIR) + "/configs/sft.toml", {}).pretrained_checkpoint_path,
            "runs/pretrain-130m/checkpoints/final");
}

TEST_F(Train, ResumeIsBitExact) {
  const std::string straight = *dir_ + "/straight", resumed = *dir_ + "/resumed";
  TrainResult a = train(config(straight), Phase::kPretrain);
  EXPECT_EQ(a.steps, 6);
  // The same run, stopped after step 3: its checkpoints as they were then, then started again
  // (with synchronous saves: the same checkpoints as async ones).
  train(config(resumed, {"train.async_checkpoint=false"}), Phase::kPretrain);
  fs::remove_all(resumed + "/checkpoints/step-00000006");
  fs::remove(resumed + "/checkpoints/latest");
  dist::point_link(resumed + "/checkpoints", "latest", "step-00000003");
  std::vector<nlohmann::json> before = metrics(resumed);
  TrainResult b = train(config(resumed, {"train.async_checkpoint=false"}), Phase::kPretrain);
  std::vector<nlohmann::json> m1 = metrics(straight), m2 = metrics(resumed);
  ASSERT_EQ(m1.size(), m2.size());
  for (size_t i = 0; i < m1.size(); ++i) {
    EXPECT_EQ(m1[i]["step"], m2[i]["step"]);
    for (const char* k : {"loss", "grad_norm", "val_loss", "lr_muon", "lr_adamw"})
      if (m1[i].contains(k)) {
        EXPECT_EQ(m1[i][k].dump(), m2[i][k].dump()) << "line " << i << " " << k;
      }
  }
  EXPECT_EQ(a.last_loss, b.last_loss);
  EXPECT_GT(before.size(), 0u);
  // The final weights are identical too.
  MambaConfig mc = MambaConfig::preset("tiny");
  mc.vocab_size = 300;
  MambaLM p(mc.padded(), 1), q(mc.padded(), 2);
  dist::Checkpoint cp(straight + "/checkpoints/final"), cq(resumed + "/checkpoints/final");
  for (const auto& t : p.named_parameters()) cp.read("model/" + t.name, t.tensor);
  for (const auto& t : q.named_parameters()) cq.read("model/" + t.name, t.tensor);
  for (size_t i = 0; i < p.named_parameters().size(); ++i)
    EXPECT_TRUE(torch::equal(p.named_parameters()[i].tensor, q.named_parameters()[i].tensor));
  // latest, best and final exist; config.toml is the resolved config.
  for (const char* name : {"latest", "best", "final", "step-00000003", "step-00000006"})
    EXPECT_TRUE(fs::exists(straight + "/checkpoints/" + name + "/index.h5")) << name;
  EXPECT_EQ(RunConfig::load(straight + "/config.toml", {}).to_toml(), config(straight).to_toml());
}

TEST_F(Train, ResumingFallsBackPastADamagedCheckpoint) {
  const std::string straight = *dir_ + "/fb-straight", run = *dir_ + "/fb";
  train(config(straight), Phase::kPretrain);
  train(config(run), Phase::kPretrain);
  // The newest checkpoint (step 6, latest) loses a byte's worth of bits; the step-3 one is intact.
  {
    std::fstream f(run + "/checkpoints/step-00000006/rank-00000-of-00001.h5", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(5000);
    f.put('\x5a');
  }
  testing::internal::CaptureStderr();
  TrainResult r = train(config(run), Phase::kPretrain);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("step-00000006 is damaged: "), std::string::npos) << err;
  EXPECT_NE(err.find("resuming from " + run + "/checkpoints/step-00000003 instead"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step-00000006.damaged"));
  EXPECT_EQ(r.steps, 6);
  std::vector<nlohmann::json> m1 = metrics(straight), m2 = metrics(run);
  ASSERT_EQ(m1.size(), m2.size());
  for (size_t i = 0; i < m1.size(); ++i)
    if (m1[i].contains("loss")) {
      EXPECT_EQ(m1[i]["loss"].dump(), m2[i]["loss"].dump()) << i;
    }
  EXPECT_TRUE(dist::Checkpoint(run + "/checkpoints/latest").verify().empty());
}

TEST_F(Train, CheckpointOfAnotherShapeIsRefusedByName) {
  const std::string run = *dir_ + "/shape";
  train(config(run, {"train.max_steps=1", "train.eval_interval=0"}), Phase::kPretrain);
  MambaConfig mc = MambaConfig::preset("tiny");
  mc.d_model = 32;
  mc.vocab_size = 300;
  MambaLM small(mc.padded(), 0);
  dist::Checkpoint ck(run + "/checkpoints/final");
  EXPECT_NE(error_of([&] { ck.read("model/backbone.embeddings.weight", small.embedding); })
                .find("model/backbone.embeddings.weight has shape [304, 64] in the checkpoint, the model has [304, 32]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ck.read("model/nothing", small.embedding); }).find("no tensor model/nothing"), std::string::npos);
  EXPECT_NE(error_of([&] { dist::Checkpoint(run + "/nowhere"); }).find("no checkpoint at"), std::string::npos);
}

TEST_F(Train, SftStartsFromThePretrainedModelAndLearns) {
  const std::string pre = *dir_ + "/pre", sft = *dir_ + "/sft";
  train(config(pre, {"train.max_steps=4", "train.eval_interval=0"}), Phase::kPretrain);
  RunConfig c = config(sft, {"data.train=" + *dir_ + "/alpaca.jsonl", "data.val=" + *dir_ + "/alpaca.jsonl",
                             "train.pretrained_checkpoint_path=" + pre + "/checkpoints/final", "train.max_steps=12",
                             "train.eval_interval=4", "train.seq_len=400", "optim.learning_rate_adamw=0.003",
                             "optim.learning_rate_muon=0.01"});
  train(c, Phase::kSft);
  std::vector<double> val;
  for (auto& m : metrics(sft))
    if (m.contains("val_loss")) val.push_back(m["val_loss"].get<double>());
  ASSERT_EQ(val.size(), 4u);  // before the first step, and every 4 steps
  EXPECT_LT(val.back(), val.front());
  EXPECT_LT(val[2], val[0]);
  EXPECT_TRUE(fs::exists(sft + "/checkpoints/final/index.h5"));
  c.pretrained_checkpoint_path = "";
  c.run_dir = *dir_ + "/sft2";
  EXPECT_NE(error_of([&] { train(c, Phase::kSft); }).find("train.pretrained_checkpoint_path is not set"), std::string::npos);
}

TEST_F(Train, BadSettingsAreErrors) {
  EXPECT_NE(error_of([&] { train(config(*dir_ + "/b1", {"train.global_batch_size=5"}), Phase::kPretrain); })
                .find("must be a multiple of ranks x train.micro_batch_size"),
            std::string::npos);
  EXPECT_NE(error_of([&] { train(config(*dir_ + "/b2", {"model.vocab_size=100"}), Phase::kPretrain); })
                .find("has 300 ids but the model's vocabulary has 104 rows"),
            std::string::npos);
  EXPECT_NE(error_of([&] { train(config(*dir_ + "/b3", {"train.max_steps=0"}), Phase::kPretrain); }).find("train.max_steps must be > 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] { train(config(*dir_ + "/b5"), Phase::kPretrain, /*must_resume=*/true); }).find("--resume: no checkpoint"),
            std::string::npos);
  if (!at::hasCUDA() || at::getNumGPUs() == 0) {
    EXPECT_NE(error_of([&] { train(config(*dir_ + "/b6", {"train.device=cuda"}), Phase::kPretrain); })
                  .find("train.device = \"cuda\""),
              std::string::npos);
  }
  // train_by_epochs: one epoch of the shards, in steps.
  RunConfig c = config(*dir_ + "/b4", {"train.train_by_epochs=true", "train.total_train_tokens=1000", "train.eval_interval=0"});
  EXPECT_EQ(train(c, Phase::kPretrain).steps, (1000 + 4 * 32 - 1) / (4 * 32));
}

TEST_F(Train, NanLossStopsWithoutACheckpoint) {
  const std::string run = *dir_ + "/nan";
  // A learning rate this large drives the weights to inf within a few steps.
  RunConfig c = config(run, {"optim.learning_rate_adamw=1e30", "optim.learning_rate_muon=1e30", "optim.grad_clip=0",
                             "optim.warmup_steps=0", "train.max_steps=20", "train.checkpoint_interval=0",
                             "train.eval_interval=0"});
  EXPECT_NE(error_of([&] { train(c, Phase::kPretrain); }).find("stopping without writing a checkpoint"), std::string::npos);
  EXPECT_FALSE(fs::exists(run + "/checkpoints/latest"));
  c.nan_policy = "skip";
  c.run_dir = *dir_ + "/nan-skip";
  EXPECT_EQ(train(c, Phase::kPretrain).steps, 20);
}

// Mixed precision on one process (bf16 compute, float32 master weights): trains, and its losses
// track float32 training's step for step.
// train.activation_checkpointing = "full" on one process recomputes each block in backward: the
// same operations on the same values, so the same losses.
TEST_F(Train, ActivationCheckpointingKeepsTheLosses) {
  train(config(*dir_ + "/ac0", {"train.eval_interval=0", "train.max_steps=3"}), Phase::kPretrain);
  train(config(*dir_ + "/ac1", {"train.eval_interval=0", "train.max_steps=3", "train.activation_checkpointing=full"}), Phase::kPretrain);
  const auto m0 = metrics(*dir_ + "/ac0"), m1 = metrics(*dir_ + "/ac1");
  ASSERT_EQ(m0.size(), m1.size());
  ASSERT_FALSE(m0.empty());
  for (size_t i = 0; i < m0.size(); ++i)
    EXPECT_NEAR(m1[i]["loss"].get<double>(), m0[i]["loss"].get<double>(), 1e-6 * m0[i]["loss"].get<double>()) << "step " << i + 1;
}

TEST_F(Train, Bfloat16TracksFloat32) {
  const TrainResult f = train(config(*dir_ + "/mp32", {"train.eval_interval=0"}), Phase::kPretrain);
  const TrainResult b = train(config(*dir_ + "/mp16", {"train.eval_interval=0", "train.dtype=bfloat16"}), Phase::kPretrain);
  const auto mf = metrics(*dir_ + "/mp32"), mb = metrics(*dir_ + "/mp16");
  ASSERT_EQ(mf.size(), mb.size());
  bool differs = false;
  for (size_t i = 0; i < mf.size(); ++i) {
    const double lf = mf[i]["loss"], lb = mb[i]["loss"];
    EXPECT_NEAR(lb, lf, 0.01 * lf) << "step " << i + 1;  // within 1%
    differs |= lb != lf;
  }
  EXPECT_TRUE(differs);  // it did compute in bfloat16
  EXPECT_LT(b.last_loss, mb.front()["loss"].get<double>());
  (void)f;
}
