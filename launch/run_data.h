// The data of a training run: the training loader (prepared shards, streamed JSONL or an SFT set),
// how to make the held-out batches afresh for each evaluation, and the run's length in steps
// (train.max_steps, or epochs / total tokens over the loader). Also the evaluation itself: the
// mean held-out loss over the first train.eval_batches micro batches.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/loader.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "launch/batch.h"
#include "launch/config.h"
#include "launch/trainer.h"

namespace coil {

// A held-out set: each comma-separated entry of data.val is one, scored on its own.
struct ValSet {
  std::string name;                                     // short: what tells the entries apart
  std::function<std::unique_ptr<data::Loader>()> open;  // a fresh loader from its start
};

struct RunData {
  std::unique_ptr<data::Loader> train;
  std::vector<ValSet> val;                             // empty: no evaluation
  std::string summary;                                 // one line for the start-up message
  std::vector<std::string> mixture;                    // a line per part of a mixture (data/mixture.h)
};

// The SFT prompt template of data.sft_template (Alpaca's, or the config's own): SFT data, and
// `coil generate` / `coil chat` with a checkpoint's config.
data::SftTemplate sft_template(const RunConfig& c);

RunData open_data(const RunConfig& c, Phase phase, const data::Tokenizer& tok, const data::BatchGeometry& geo);

// Steps of the run: train.max_steps, or train.total_train_tokens / train.num_epochs in steps.
int64_t derive_steps(const RunConfig& c, const data::Loader& loader);

// Short names for data.val's entries (metrics: val_loss_parts, TensorBoard and W&B: val/loss/<name>):
// the entries without the directories and the ending they all share ("data/web/val, data/code/val"
// -> "web", "code"; "a.jsonl, b.jsonl" -> "a", "b"); "part<k>" where that leaves nothing or twins.
std::vector<std::string> val_set_names(const std::vector<std::string>& entries);

// The held-out loss: over the first `batches` micro batches of each held-out set, the mean over all
// their tokens, and each set's own mean (parts: only when there are several). Every rank computes
// the same (the sharded forward needs every rank); the sums stay on the device until the end.
struct Evaluation {
  double loss = 0;
  std::vector<std::pair<std::string, double>> parts;
};
Evaluation evaluate(const LossSum& model, at::Device device, RunData& d, int64_t batches);

}  // namespace coil
