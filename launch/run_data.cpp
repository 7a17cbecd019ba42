#include "launch/run_data.h"

#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "data/mixture.h"
#include "data/sft.h"
#include "data/shards.h"
#include "data/streaming.h"
#include "util/error.h"

namespace coil {

data::SftTemplate sft_template(const RunConfig& c) {
  return data::SftTemplate::from_config(c.data_sft_template, c.data_sft_template_no_input);
}

RunData open_data(const RunConfig& c, Phase phase, const data::Tokenizer& tok, const data::BatchGeometry& geo) {
  RunData d;
  data::ReadOptions read;
  read.text_field = c.data_text_field;
  read.max_bad_records = c.data_max_bad_records;
  const data::BatchGeometry eval_geo{c.seq_len, c.micro_batch_size, c.micro_batch_size, 0, 1};
  const std::vector<std::string> parts = c.train_parts();
  const std::vector<double> weights = c.train_weights();
  // data.val: a held-out set per comma-separated entry, with its short name.
  std::vector<std::pair<std::string, std::string>> val_entries;
  {
    const std::vector<std::string> entries = RunConfig::split_entries(c.data_val), names = val_set_names(entries);
    for (size_t k = 0; k < entries.size(); ++k) val_entries.emplace_back(names[k], entries[k]);
  }
  // Several data sets as one (data/mixture.h), its parts named in the start-up lines.
  auto mix = [&](std::vector<std::shared_ptr<const data::SampleSource>> sets) -> std::shared_ptr<const data::SampleSource> {
    auto m = std::make_shared<data::MixedSamples>(std::move(sets), parts, weights, static_cast<uint64_t>(c.seed));
    d.mixture = m->describe(phase == Phase::kSft && c.data_sft_packing ? "rows" : phase == Phase::kSft ? "examples" : "sequences");
    return m;
  };
  if (phase == Phase::kSft) {
    const data::SftTemplate templ = sft_template(c);
    if (c.data_sft_packing) data::check_sft_packing(tok, templ, c.seq_len);
    // Padded: one example per row; packed (data.sft_packing): several per row, seq_idx numbering them.
    auto rows = [&](std::shared_ptr<const data::SftDataset> ds, uint64_t seed) -> std::shared_ptr<const data::SampleSource> {
      if (!c.data_sft_packing) return ds;
      return std::make_shared<data::PackedSftSamples>(std::move(ds), seed);
    };
    auto open_set = [&](const std::string& inputs) {
      return std::make_shared<data::SftDataset>(data::expand_inputs(inputs), tok, c.seq_len, read, 0, templ);
    };
    const uint64_t seed = static_cast<uint64_t>(c.seed);
    std::shared_ptr<const data::SampleSource> train;
    int64_t examples = 0, dropped = 0, response_tokens = 0;
    if (weights.empty()) {  // one data set, however many inputs
      auto ds = open_set(c.data_train);
      examples = ds->size(), dropped = ds->dropped(), response_tokens = ds->response_tokens();
      train = rows(ds, seed);
    } else {  // a part per entry of data.train
      std::vector<std::shared_ptr<const data::SampleSource>> sets;
      for (size_t k = 0; k < parts.size(); ++k) {
        auto ds = open_set(parts[k]);
        examples += ds->size(), dropped += ds->dropped(), response_tokens += ds->response_tokens();
        sets.push_back(rows(ds, data::MixedSamples::part_seed(seed, k)));
      }
      train = mix(sets);
    }
    d.summary = fmt::format("SFT data {}: {} examples ({} dropped: no response token fits in {}), {} response tokens{}",
                            c.data_train, examples, dropped, c.seq_len, response_tokens,
                            c.data_sft_packing ? fmt::format(", packed into {} rows", train->size()) : "");
    d.train = data::make_indexed_loader(train, geo, static_cast<uint64_t>(c.seed));
    for (const auto& [name, entry] : val_entries) {
      auto val = rows(open_set(entry), 0);
      d.val.push_back({name, [val, eval_geo] { return data::make_indexed_loader(val, eval_geo, 0, 0); }});
    }
    return d;
  }
  auto open_shards = [&](const std::string& dir) {
    auto shards = std::make_shared<data::TokenShards>(dir);
    data::check_prepared_with(*shards, tok, "data.tokenizer " + tok.path());
    return std::make_shared<data::PackedSamples>(shards, c.seq_len, c.data_document_masking);
  };
  if (c.data_streaming) {
    auto stream = [&](const std::string& inputs, uint64_t seed) {
      data::StreamingOptions o;
      o.files = data::expand_inputs(inputs);
      o.read = read;
      o.tokenizer = tok.path();
      o.geometry = geo;
      o.seed = seed;
      o.document_masking = c.data_document_masking;
      return o;
    };
    const uint64_t seed = static_cast<uint64_t>(c.seed);
    size_t files = 0;
    if (weights.empty()) {  // one stream, however many inputs
      data::StreamingOptions o = stream(c.data_train, seed);
      o.name = parts.size() == 1 ? parts[0] : c.data_train;  // as a mixture names its part
      files = o.files.size();
      d.train = data::make_streaming_loader(o);
    } else {  // a stream per entry of data.train, taking turns in the weights' shares
      std::vector<data::StreamingOptions> streams;
      double total = 0;
      for (double w : weights) total += w;
      for (size_t k = 0; k < parts.size(); ++k) {
        streams.push_back(stream(parts[k], data::MixedSamples::part_seed(seed, k)));
        files += streams.back().files.size();
        d.mixture.push_back(fmt::format("part {} {}: {:.2f}% of the rows ({} file(s), streamed)", k, parts[k],
                                        100.0 * weights[k] / total, streams.back().files.size()));
      }
      d.train = data::make_streaming_mixture(std::move(streams), parts, weights);
    }
    d.summary = fmt::format("streaming {} file(s) from {}", files, c.data_train);
  } else {
    COIL_CHECK(!parts.empty(), "data.train names no prepared directory: \"{}\"", c.data_train);
    std::shared_ptr<const data::SampleSource> samples;
    if (parts.size() == 1) {
      samples = open_shards(parts[0]);
    } else {  // several prepared directories: a mixture, in data.train_weights' shares or the sizes'
      std::vector<std::shared_ptr<const data::SampleSource>> sets;
      for (const std::string& dir : parts) sets.push_back(open_shards(dir));
      samples = mix(sets);
    }
    d.train = data::make_indexed_loader(samples, geo, static_cast<uint64_t>(c.seed));
    d.summary = fmt::format("prepared data {}: {} sequences of {} tokens per epoch", c.data_train, samples->size(), c.seq_len);
  }
  for (const auto& [name, entry] : val_entries) {
    if (data::is_prepared(entry)) {
      auto val = open_shards(entry);
      d.val.push_back({name, [val, eval_geo] { return data::make_indexed_loader(val, eval_geo, 0, 0); }});
    } else {
      data::StreamingOptions o;
      o.files = data::expand_inputs(entry);
      o.read = read;
      o.tokenizer = tok.path();
      o.geometry = eval_geo;
      o.document_masking = c.data_document_masking;
      d.val.push_back({name, [o] { return data::make_streaming_loader(o); }});
    }
  }
  return d;
}

int64_t derive_steps(const RunConfig& c, const data::Loader& loader) {
  const int64_t tokens_per_step = c.global_batch_size * c.seq_len;
  if (!c.train_by_epochs) {
    COIL_CHECK(c.max_steps > 0, "train.max_steps must be > 0 (or set train.train_by_epochs = true)");
    return c.max_steps;
  }
  if (c.total_train_tokens > 0) return (c.total_train_tokens + tokens_per_step - 1) / tokens_per_step;
  COIL_CHECK(loader.samples_per_epoch() > 0,
             "train.train_by_epochs with streaming data needs train.total_train_tokens (the stream's length is unknown)");
  COIL_CHECK(c.num_epochs > 0, "train.num_epochs must be > 0");
  return (c.num_epochs * loader.samples_per_epoch() + c.global_batch_size - 1) / c.global_batch_size;
}

std::vector<std::string> val_set_names(const std::vector<std::string>& entries) {
  std::vector<std::string> names = entries;
  if (entries.size() > 1) {
    const std::string& first = entries[0];
    size_t prefix = first.size(), suffix = first.size();  // what all entries share at either end
    for (const std::string& e : entries) {
      size_t i = 0, j = 0;
      while (i < prefix && i < e.size() && e[i] == first[i]) ++i;
      while (j < suffix && j < e.size() && e[e.size() - 1 - j] == first[first.size() - 1 - j]) ++j;
      prefix = i, suffix = j;
    }
    const size_t slash = first.substr(0, prefix).rfind('/');
    prefix = slash == std::string::npos ? 0 : slash + 1;  // whole directories only
    while (suffix > 0 && first[first.size() - suffix] != '/' && first[first.size() - suffix] != '.') --suffix;
    for (std::string& n : names) {
      const size_t end = std::max(prefix, n.size() >= suffix ? n.size() - suffix : 0);
      n = n.substr(prefix, end - prefix);
    }
  }
  for (std::string& n : names)
    for (char& ch : n)  // a TensorBoard tag and a W&B key
      if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.' || ch == '/')) ch = '_';
  std::vector<std::string> out = names;
  for (size_t k = 0; k < names.size(); ++k)
    if (names[k].empty() || std::count(names.begin(), names.end(), names[k]) > 1) out[k] = fmt::format("part{}", k);
  return out;
}

Evaluation evaluate(const LossSum& model, at::Device device, RunData& d, int64_t batches) {
  c10::NoGradGuard no_grad;
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  std::vector<at::Tensor> sums;
  std::vector<int64_t> counts;
  for (const ValSet& set : d.val) {
    auto loader = set.open();
    at::Tensor sum = at::zeros({}, opts);
    int64_t count = 0;
    for (int64_t i = 0; i < batches; ++i) {
      const DeviceBatch b = to_device(loader->next(), device);
      count += b.count;
      sum += loss_sum(model, b).to(at::kDouble);  // model: the (possibly sharded) model
    }
    sums.push_back(sum);
    counts.push_back(count);
  }
  const at::Tensor all = at::stack(sums).cpu();  // one transfer for every set
  Evaluation e;
  double total = 0;
  int64_t count = 0;
  for (size_t k = 0; k < sums.size(); ++k) {
    const double s = all[static_cast<int64_t>(k)].item<double>();
    total += s, count += counts[k];
    if (sums.size() > 1) e.parts.emplace_back(d.val[k].name, s / static_cast<double>(std::max<int64_t>(counts[k], 1)));
  }
  e.loss = total / static_cast<double>(std::max<int64_t>(count, 1));
  return e;
}

}  // namespace coil
