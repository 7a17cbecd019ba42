#include "launch/evaluation.h"

#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <vector>

#include "data/eval_rows.h"
#include "data/progress.h"
#include "data/shards.h"
#include "launch/batch.h"
#include "util/error.h"

namespace coil {
namespace {

// The loss summed over the batches' targets (this rank's share of them), on the model's device
// until the end.
class Scorer {
 public:
  Scorer(const MambaLM& model, at::ScalarType compute, data::Progress& progress, dist::Comm* comm)
      : device_(model.embedding.device()),
        progress_(progress),
        comm_(comm),
        sum_(at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device_))) {
    model_ = [&model, compute](const at::Tensor& tokens, const at::Tensor& seq_idx, const at::Tensor& targets) {
      return model.loss_sum(tokens, compute, seq_idx, targets);
    };
  }
  void add(const data::Batch& b, EvalResult& r) {
    const int64_t count = target_count(b);
    const bool mine = !comm_ || batches_++ % comm_->size() == comm_->rank();
    if (mine) sum_ += loss_sum(model_, to_device(b, device_)).to(at::kDouble);
    r.targets += count;
    r.rows += b.rows;
    progress_.add_tokens(count);
  }
  // The sum over every batch: waits for the device (and for the other ranks).
  double sum() const {
    at::Tensor total = sum_.cpu();
    if (comm_) comm_->all_reduce(total);
    return total.item<double>();
  }

 private:
  at::Device device_;
  data::Progress& progress_;
  dist::Comm* comm_;
  LossSum model_;
  at::Tensor sum_;
  int64_t batches_ = 0;
};

// SFT examples, packed (seed 0), a batch of rows at a time.
void score_examples(const data::Tokenizer& tok, const EvalRequest& q, const std::vector<std::string>& files,
                    Scorer& scorer, data::Progress& progress, EvalResult& r) {
  auto examples = std::make_shared<data::SftDataset>(files, tok, q.seq_len, q.read, 0, q.templ);
  const data::PackedSftSamples rows(examples, 0);
  data::Batch b;
  b.cols = rows.cols();
  for (int64_t i = 0; i < rows.size() && (q.max_tokens == 0 || r.targets < q.max_tokens); i += b.rows) {
    b.rows = std::min(q.batch_size, rows.size() - i);
    b.tokens.resize(static_cast<size_t>(b.rows * b.cols));
    b.mask.resize(b.tokens.size());
    b.seq_idx.resize(b.tokens.size());
    for (int64_t k = 0; k < b.rows; ++k) {
      rows.fill_at(i + k, 0, b.tokens.data() + k * b.cols, b.mask.data() + k * b.cols, b.seq_idx.data() + k * b.cols);
      const auto n = static_cast<int64_t>(rows.row_examples(0, 0, i + k).size());
      r.documents += n;
      progress.add_documents(n);
    }
    scorer.add(b, r);
  }
}

// Documents from prepared shards or text files, in EvalRows' rows.
void score_documents(const MambaLM& model, const data::Tokenizer* tok, const EvalRequest& q, bool shards,
                     const std::vector<std::string>& files, Scorer& scorer, data::Progress& progress, EvalResult& r) {
  std::unique_ptr<data::TokenShards> sh;
  if (shards) {
    sh = std::make_unique<data::TokenShards>(q.data);
    data::check_vocab_fits(sh->vocab_size(), model.config().vocab_size, q.data);
    if (tok) data::check_prepared_with(*sh, *tok, tok->path());
  }
  data::EvalRows rows(q.seq_len, q.batch_size, shards ? sh->eos() : tok->eos(), q.document_masking);
  data::Batch b;
  // Adds a document, scores the rows it completes; false once max_tokens targets are in.
  auto add = [&](const std::vector<int32_t>& doc) {
    ++r.documents;
    if (shards) progress.add_documents(1);  // the text reader counts its own
    rows.add(doc);
    while (rows.next(b)) scorer.add(b, r);
    return q.max_tokens == 0 || rows.targets() < q.max_tokens;
  };
  if (shards) {
    for (int64_t i = 0; i < sh->documents(); ++i)
      if (!add(sh->document(i))) break;
  } else {
    std::vector<int32_t> ids;
    data::ReadStats stats;
    data::for_each_document_while(files, q.read, [&](std::string&& doc) {
      r.bytes += static_cast<int64_t>(doc.size());
      ids.clear();
      tok->encode(doc, ids);
      return add(ids);
    }, &stats);
    COIL_CHECK(r.documents > 0, "{}: no document to score ({})", q.data, stats.summary());
  }
  while (rows.finish(b)) scorer.add(b, r);
}

}  // namespace

double EvalResult::bits_per_byte() const { return bytes > 0 ? loss_sum / std::log(2.0) / static_cast<double>(bytes) : 0; }

EvalResult score(const MambaLM& model, const data::Tokenizer* tok, const EvalRequest& request) {
  COIL_CHECK(request.seq_len >= 1, "eval: the rows' length must be >= 1, got {}", request.seq_len);
  COIL_CHECK(request.batch_size >= 1, "--batch-size must be >= 1, got {}", request.batch_size);
  COIL_CHECK(request.max_tokens >= 0, "--max-tokens must be >= 0 (0: all the data), got {}", request.max_tokens);
  const bool shards = !request.sft && data::is_prepared(request.data);
  COIL_CHECK(shards || tok, "eval: {} needs a tokenizer (pass --tokenizer)", request.data);
  const std::vector<std::string> files = shards ? std::vector<std::string>{} : data::expand_inputs(request.data);
  const bool text = !shards && !request.sft;
  data::Progress progress("eval", text && request.max_tokens == 0 ? data::total_file_bytes(files) : 0, /*with_tokens=*/true,
                         !request.comm || request.comm->rank() == 0 ? stderr : nullptr);
  EvalRequest q = request;
  q.read.progress = text ? &progress : nullptr;
  c10::NoGradGuard no_grad;
  Scorer scorer(model, q.compute, progress, q.comm);
  EvalResult r;
  const auto t0 = std::chrono::steady_clock::now();
  if (q.sft)
    score_examples(*tok, q, files, scorer, progress, r);
  else
    score_documents(model, tok, q, shards, files, scorer, progress, r);
  COIL_CHECK(r.targets > 0, "{}: no target to score{}", q.data,
             q.sft ? " (no example has a response token within the rows' length)" : "");
  r.loss_sum = scorer.sum();
  progress.finish();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  COIL_CHECK(std::isfinite(r.loss_sum), "eval: the loss is {} (the model's weights are not finite?)", r.loss_sum);
  return r;
}

}  // namespace coil
