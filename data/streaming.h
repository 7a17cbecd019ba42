// Streaming pretraining data: JSONL or Parquet shards read and tokenized on the fly, with no prepare
// step (as `load_dataset(..., streaming=True)` in Python).
//
// Order. In epoch e the files are taken in a seeded order (a permutation of the sorted list, new
// every epoch) and their records numbered 0, 1, 2, ... across files. Rank r of N owns the records
// whose number is r mod N: every rank reads (decompresses) the files, but parses and tokenizes only
// its own records, in background threads. A rank packs its documents (each followed by EOS) back
// to back into rows of seq_len + 1 tokens that overlap by one, like the prepared shards. With
// document_masking (data.document_masking) a row also numbers the documents it packs
// (Batch::seq_idx: the packer knows where each one starts; a document's EOS is its own).
//
// Resume. The state of a rank is where its next row starts: (epoch, record, offset), offset being
// the tokens of that record's document already used. Restoring it on the same rank of the same
// number of ranks gives exactly the same rows again. A Parquet file's records are its rows: a
// resumed reader passes the row groups before its record by the row counts in the file's footer,
// without decoding them, and starts at the row group that holds the record. When the number of
// ranks changes, every rank of the new run starts at the smallest (epoch, record) of the old ranks'
// states (see merge_streaming_states): no document is skipped; documents that a rank ahead of the
// others had already used may be seen a second time (at most about N rows' worth).
//
// Mixtures (make_streaming_mixture: data.train_weights with data.streaming). Each part is a stream
// as above, on every rank, and the parts take turns as data/mixture.h's Interleave has them, over
// the global order of rows: the row at global position g (step s, rank r of N, its row j of the
// step: g = s G + r G / N + j) comes from part mix.at(g - from).part, the next row of that part's
// stream on this rank. So the global batch holds each part's share whatever N is. The state keeps
// each part's (LoaderState::parts) and, as next_sample, the global row of the next step (the same
// on every rank): a resume on another number of ranks merges each part's states on its own. Resumed
// with other weights or parts (matched by their data.train entry), the interleave starts again at
// that step (`from`), each part that was there from its saved state, a new one from its start.
//
// For large runs on many nodes, prepared shards (data/shards.h) read less: each rank reads only the
// sequences it trains on, and their order does not depend on the number of ranks.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/reader.h"

namespace coil::data {

struct StreamingOptions {
  std::vector<std::string> files;
  ReadOptions read;
  std::string tokenizer;   // a sentencepiece .model
  BatchGeometry geometry;  // rows per next() = micro_batch
  uint64_t seed = 0;
  int threads = 2;  // tokenizer threads (a reading thread comes on top)
  bool document_masking = false;  // fill Batch::seq_idx
  std::string name;  // its data.train entry: matched with a streamed mixture's part on resume
};

std::unique_ptr<Loader> make_streaming_loader(const StreamingOptions& options);

// Streamed parts (two or more; the same geometry, tokenizer and document_masking, a seed each)
// in the shares of `weights`; `names` (their data.train entries) name them in messages and match
// them on resume, also with a single stream's state (a single stream continues from the mixture's
// part of its name, and a mixture's part of its name from a single stream's state).
std::unique_ptr<Loader> make_streaming_mixture(std::vector<StreamingOptions> parts, std::vector<std::string> names,
                                               const std::vector<double>& weights);

// Where a saved streaming state is, in lines (`coil ckpt inspect`): the rank's place in its files,
// for a mixture each part's.
std::vector<std::string> describe_streaming_state(const LoaderState& state);

// The state every rank of a new run of `world` ranks restores, from the states of all the ranks of
// the old run (see the resume notes above).
LoaderState merge_streaming_states(const std::vector<LoaderState>& old_states, int rank, int world);

}  // namespace coil::data
