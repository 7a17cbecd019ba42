// Held-out scoring (`coil eval`, launch/eval_command.cpp): a model's summed loss over every target
// of a data set, each scored once, on one device.
//
//   prepared shards or text files: the documents, each followed by EOS, in the rows of
//     data/eval_rows.h (an EOS first, rows of seq_len + 1 overlapping by one, the last padded), so
//     every token of every document and its EOS is a target exactly once; with document_masking
//     each document runs from a zero state;
//   sft: Alpaca-format examples in a template, the loss on the response tokens (and their EOS),
//     packed as data.sft_packing packs them (the state reset between examples: the loss of each
//     example alone).
//
// Data parallel (`coil eval` under mpirun or srun, request.comm set): every rank reads and counts
// all the data, in the same order, and scores every size-th batch (batch k on rank k mod size);
// the loss sums are added over the ranks at the end (one all-reduce of a double), so every rank
// returns the whole result, that of one process up to the order of the double additions.
//
// The loss stays on the device until the end (one sync). Bits per byte are for text input only
// (shards keep no text): the summed loss / ln 2 / the documents' UTF-8 bytes, which does not depend
// on the tokenizer.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "data/reader.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "dist/comm.h"
#include "model/mamba.h"

namespace coil {

struct EvalRequest {
  std::string data;  // a prepared directory, or text files (comma-separated globs); sft: examples
  bool sft = false;
  int64_t seq_len = 0, batch_size = 8;
  int64_t max_tokens = 0;  // > 0: stop after the document (example row) that brings the targets there
  bool document_masking = false;
  at::ScalarType compute = at::kFloat;
  data::ReadOptions read;  // (read.progress is score()'s own)
  data::SftTemplate templ;
  dist::Comm* comm = nullptr;  // several ranks: each scores its share of the batches (MPI, CPU tensors)
};

struct EvalResult {
  double loss_sum = 0;
  int64_t targets = 0, rows = 0, documents = 0;  // documents: the examples with sft
  int64_t bytes = 0;                             // the documents' UTF-8 bytes (text input; else 0)
  double seconds = 0;
  double loss() const { return loss_sum / static_cast<double>(targets); }  // nats per target
  double bits_per_byte() const;                                           // 0 without bytes
};

// Scores the model (already on its device, where the batches go) on the request's data, with a
// progress line on stderr (data/progress.h; the first rank's only). The tokenizer may be null for
// prepared shards; when given, shards of another tokenizer are an error. Errors (no such file,
// nothing to score, a bad request) are coil::Error naming the data.
EvalResult score(const MambaLM& model, const data::Tokenizer* tokenizer, const EvalRequest& request);

}  // namespace coil
