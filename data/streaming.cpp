#include "data/streaming.h"

#include <fmt/ranges.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/mixture.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace coil::data {

namespace {

enum class Status : uint8_t { kOk, kEmpty, kMalformed, kTooLong };

// A run of this rank's records, read by the reading thread and tokenized by a worker.
struct Chunk {
  int64_t epoch = 0;
  bool epoch_end = false;    // the last chunk of an epoch (may hold no record)
  bool whole_epoch = false;  // the epoch was read from its start (not resumed half-way)
  std::vector<std::string> bytes;
  std::vector<int64_t> record, line;
  std::vector<int> file;
  std::vector<uint8_t> json;
  // Filled by the worker.
  std::vector<std::vector<int32_t>> tokens;
  std::vector<Status> status;
  std::vector<std::string> why;
};

// A document of this rank being packed into rows.
struct Doc {
  int64_t epoch, record;
  std::vector<int32_t> tokens;  // with its EOS
  int64_t used = 0;             // tokens before the next row's start
};

uint64_t epoch_key(uint64_t seed, int64_t epoch) { return mix64(seed ^ 0x5bd1e995u) ^ mix64(static_cast<uint64_t>(epoch) + 1); }

// A streaming mixture's fingerprint: its parts' names and quotas, and where its interleave began.
struct MixtureSegment {
  std::vector<std::string> names;
  std::vector<int64_t> quotas;
  int64_t from = 0;
};

std::string segment_json(const MixtureSegment& m) {
  nlohmann::json parts = nlohmann::json::array();
  for (size_t k = 0; k < m.names.size(); ++k) parts.push_back({{"name", m.names[k]}, {"quota", m.quotas[k]}});
  return nlohmann::json{{"streaming_mixture", parts}, {"from", m.from}}.dump();
}

MixtureSegment segment_of(const LoaderState& s) {
  MixtureSegment out;
  try {
    const nlohmann::json j = nlohmann::json::parse(s.fingerprint);
    for (const auto& p : j.at("streaming_mixture")) {
      out.names.push_back(p.at("name").get<std::string>());
      out.quotas.push_back(p.at("quota").get<int64_t>());
    }
    out.from = j.at("from").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    fail("the saved streaming mixture state is damaged ({}): {}", e.what(), s.fingerprint.substr(0, 200));
  }
  COIL_CHECK(out.names.size() == s.parts.size() && out.from >= 0 && out.from <= s.next_sample,
             "the saved streaming mixture state is damaged: {} parts named, {} states, rows from {} to {}",
             out.names.size(), s.parts.size(), out.from, s.next_sample);
  return out;
}

// A single stream's state out of a saved streamed mixture's: the part of the stream's name, at the
// mixture's row.
LoaderState part_named(const LoaderState& s, const std::string& name) {
  const MixtureSegment m = segment_of(s);
  for (size_t k = 0; k < m.names.size(); ++k)
    if (m.names[k] == name) {
      LoaderState p = s.parts[k];
      p.next_sample = s.next_sample;
      return p;
    }
  fail("the saved loader state belongs to other data (a streamed mixture of {}; this run streams {} alone, none of "
       "its parts)", fmt::join(m.names, ", "), name);
}

class StreamingLoader : public Loader {
 public:
  explicit StreamingLoader(const StreamingOptions& o) : o_(o), tokenizer_(o.tokenizer) {
    o_.geometry.validate();
    COIL_CHECK(!o_.files.empty(), "streaming: no input file");
    COIL_CHECK(o_.threads >= 1, "streaming: threads must be >= 1");
    fingerprint_ = fmt::format("streaming:{}:{}:{}", o_.files.size(), o_.geometry.seq_len, tokenizer_.sha256().substr(0, 16));
    start();
  }
  ~StreamingLoader() override { stop(); }

  Batch next() override {
    const int64_t cols = o_.geometry.seq_len + 1;
    Batch b;
    b.rows = o_.geometry.micro_batch;
    b.cols = cols;
    b.tokens.resize(static_cast<size_t>(b.rows * cols));
    if (o_.document_masking) b.seq_idx.resize(b.tokens.size());
    for (int64_t r = 0; r < b.rows; ++r) {
      // Copy seq_len + 1 tokens from the front of the pending documents, then move on by seq_len.
      int32_t* out = b.tokens.data() + r * cols;
      int64_t have = 0;
      size_t d = 0;
      while (pending_.empty()) pull();
      int64_t at = pending_.front().used;
      while (have < cols) {
        while (d >= pending_.size()) pull();
        const Doc& doc = pending_[d];
        const int64_t n = std::min<int64_t>(cols - have, static_cast<int64_t>(doc.tokens.size()) - at);
        std::copy(doc.tokens.begin() + at, doc.tokens.begin() + at + n, out + have);
        if (o_.document_masking)  // the row's d-th document (its EOS included)
          std::fill_n(b.seq_idx.data() + r * cols + have, n, static_cast<int32_t>(d));
        have += n;
        at += n;
        if (at == static_cast<int64_t>(doc.tokens.size())) ++d, at = 0;
      }
      advance(o_.geometry.seq_len);
    }
    rows_ += b.rows;
    return b;
  }

  LoaderState state() const override {
    LoaderState s;
    s.kind = "streaming";
    s.fingerprint = fingerprint_;
    s.seed = o_.seed;
    s.rank = o_.geometry.rank;
    s.world = o_.geometry.world;
    s.name = o_.name;
    s.next_sample = start_row_ + rows_ / o_.geometry.per_rank() * o_.geometry.global_batch;
    if (!pending_.empty()) {
      s.epoch = pending_.front().epoch;
      s.record = pending_.front().record;
      s.offset = pending_.front().used;
    } else {
      s.epoch = resume_.epoch;
      s.record = resume_.record;
      s.offset = resume_.offset;
    }
    return s;
  }

  void restore(const LoaderState& saved) override {
    COIL_CHECK(saved.kind == "streaming", "the saved loader state is for {} data, this run streams", saved.kind);
    const LoaderState s = saved.parts.empty() ? saved : part_named(saved, o_.name);
    COIL_CHECK(s.fingerprint == fingerprint_, "the saved loader state belongs to other data ({}), not to this run's ({})",
               s.fingerprint, fingerprint_);
    COIL_CHECK(s.world == o_.geometry.world && s.rank == o_.geometry.rank,
               "the saved streaming state is rank {} of {}, this is rank {} of {} (merge_streaming_states() "
               "converts states across numbers of ranks)",
               s.rank, s.world, o_.geometry.rank, o_.geometry.world);
    COIL_CHECK(s.epoch >= 0 && s.record >= 0 && s.offset >= 0, "bad streaming state {}", s.to_json());
    stop();
    o_.seed = s.seed;
    resume_ = s;
    start_row_ = s.next_sample;
    rows_ = 0;
    start();
  }

  int64_t samples_per_epoch() const override { return 0; }
  int64_t tokens_per_epoch() const override { return 0; }

 private:
  // Moves the start of the next row forward by n tokens, dropping documents used up.
  void advance(int64_t n) {
    while (n > 0) {
      while (pending_.empty()) pull();
      Doc& doc = pending_.front();
      const int64_t step = std::min<int64_t>(n, static_cast<int64_t>(doc.tokens.size()) - doc.used);
      doc.used += step;
      n -= step;
      if (doc.used == static_cast<int64_t>(doc.tokens.size())) {
        resume_.epoch = doc.epoch;
        resume_.record = doc.record + 1;
        resume_.offset = 0;
        pending_.pop_front();
      }
    }
  }

  // Appends the documents of the next chunk (in order) to pending_.
  void pull() {
    Chunk c;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return done_.count(next_out_) || error_; });
      if (!done_.count(next_out_)) std::rethrow_exception(error_);
      c = std::move(done_[next_out_]);
      done_.erase(next_out_++);
      cv_.notify_all();
    }
    if (c.epoch != epoch_) {
      epoch_ = c.epoch;
      epoch_tokens_ = 0;
    }
    for (size_t i = 0; i < c.bytes.size(); ++i) {
      const std::string& file = o_.files[static_cast<size_t>(c.file[i])];
      ++stats_.records;
      switch (c.status[i]) {
        case Status::kOk: {
          ++stats_.documents;
          Doc doc{c.epoch, c.record[i], std::move(c.tokens[i]), 0};
          if (first_doc_) {  // a restored state may start inside this document
            first_doc_ = false;
            if (doc.epoch == resume_.epoch && doc.record == resume_.record) doc.used = resume_.offset;
            COIL_CHECK(doc.used < static_cast<int64_t>(doc.tokens.size()),
                       "the saved streaming state points past the end of {}:{} (was the file changed?)", file, c.line[i]);
          }
          epoch_tokens_ += static_cast<int64_t>(doc.tokens.size());
          pending_.push_back(std::move(doc));
          break;
        }
        case Status::kEmpty: ++stats_.empty; break;
        case Status::kMalformed: skip_record(file, c.line[i], c.why[i], o_.read, stats_); break;
        case Status::kTooLong:
          skip_record(file, c.line[i], fmt::format("record longer than {} bytes", o_.read.max_record_bytes), o_.read,
                      stats_, true);
          break;
      }
    }
    if (c.epoch_end && c.whole_epoch && epoch_tokens_ == 0)
      fail("streaming: rank {} of {} got no document in a whole pass over {} file(s) ({})", o_.geometry.rank,
           o_.geometry.world, o_.files.size(), stats_.summary());
  }

  // ---- Background threads: one reads records, `threads` tokenize them ----

  void start() {
    stop_ = false;
    error_ = nullptr;
    done_.clear();
    work_.clear();
    next_in_ = next_out_ = 0;
    pending_.clear();
    first_doc_ = true;
    epoch_ = -1;
    const int64_t epoch = resume_.epoch, record = resume_.record;  // the reader's own copy
    reader_ = std::thread([this, epoch, record] { guarded([&] { read_loop(epoch, record); }); });
    for (int t = 0; t < o_.threads; ++t) workers_.emplace_back([this] { guarded([this] { work_loop(); }); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (reader_.joinable()) reader_.join();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  template <typename F>
  void guarded(F f) {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      cv_.notify_all();
    }
  }

  // Hands a chunk to the workers; false when stopping. Waits while enough chunks are in flight.
  bool submit(Chunk&& c) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return stop_ || next_in_ - next_out_ < 8 * o_.threads; });
    if (stop_) return false;
    work_.emplace_back(next_in_++, std::move(c));
    cv_.notify_all();
    return true;
  }

  // Reads epoch after epoch from (first_epoch, first_record) on, handing this rank's records to
  // the workers in chunks.
  void read_loop(int64_t first_epoch, int64_t first_record) {
    const int64_t rank = o_.geometry.rank, world = o_.geometry.world;
    for (int64_t epoch = first_epoch;; ++epoch) {
      const int64_t skip_below = epoch == first_epoch ? first_record : 0;
      const Permutation order(o_.files.size(), epoch_key(o_.seed, epoch));
      int64_t record = 0;
      Chunk c;
      c.epoch = epoch;
      c.whole_epoch = skip_below == 0;
      size_t chunk_bytes = 0;
      for (size_t f = 0; f < o_.files.size(); ++f) {
        const int file = static_cast<int>(order(f));
        RecordReader reader(o_.files[static_cast<size_t>(file)], o_.read);
        // A resumed epoch passes over the records before its start unparsed (a Parquet file's
        // whole row groups unread).
        if (record < skip_below) record += reader.skip(skip_below - record);
        Record r;
        while (reader.next(r)) {
          const int64_t k = record++;
          if (k < skip_below || k % world != rank) continue;
          c.bytes.emplace_back(r.bytes);
          c.record.push_back(r.too_long ? -k - 1 : k);  // negative: too long (bytes dropped)
          c.line.push_back(r.line);
          c.file.push_back(file);
          c.json.push_back(reader.is_json());
          chunk_bytes += r.bytes.size();
          if (c.bytes.size() >= 256 || chunk_bytes >= (size_t{1} << 20)) {
            Chunk next;
            next.epoch = epoch;
            next.whole_epoch = c.whole_epoch;
            if (!submit(std::move(c))) return;
            c = std::move(next);
            chunk_bytes = 0;
          }
        }
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
      }
      c.epoch_end = true;
      if (!submit(std::move(c))) return;
    }
  }

  void work_loop() {
    std::string text;
    while (true) {
      std::pair<int64_t, Chunk> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !work_.empty(); });
        if (stop_) return;
        job = std::move(work_.front());
        work_.pop_front();
      }
      Chunk& c = job.second;
      const size_t n = c.bytes.size();
      c.tokens.resize(n);
      c.status.assign(n, Status::kOk);
      c.why.resize(n);
      for (size_t i = 0; i < n; ++i) {
        if (c.record[i] < 0) {
          c.record[i] = -c.record[i] - 1;
          c.status[i] = Status::kTooLong;
        } else {
          Record r{c.bytes[i], c.line[i], false};
          if (!document_text(r, c.json[i], o_.read, text, c.why[i])) {
            c.status[i] = Status::kMalformed;
          } else if (text.empty()) {
            c.status[i] = Status::kEmpty;
          } else {
            tokenizer_.encode(text, c.tokens[i]);
            c.tokens[i].push_back(tokenizer_.eos());
          }
        }
        std::string().swap(c.bytes[i]);
      }
      std::lock_guard<std::mutex> lock(mu_);
      done_.emplace(job.first, std::move(c));
      cv_.notify_all();
    }
  }

  StreamingOptions o_;
  Tokenizer tokenizer_;
  std::string fingerprint_;
  LoaderState resume_;  // where reading started, then: where the next row starts when pending_ is empty
  int64_t start_row_ = 0, rows_ = 0;  // the global row where reading started; rows read since
  std::deque<Doc> pending_;
  bool first_doc_ = true;
  int64_t epoch_ = -1, epoch_tokens_ = 0;
  ReadStats stats_;

  std::thread reader_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, Chunk>> work_;
  std::map<int64_t, Chunk> done_;
  int64_t next_in_ = 0, next_out_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// Streamed parts taking turns over the global order of rows (see the header).
class StreamingMixture : public Loader {
 public:
  StreamingMixture(std::vector<StreamingOptions> parts, std::vector<std::string> names, const std::vector<double>& weights)
      : options_(std::move(parts)), names_(std::move(names)), mix_({1}) {
    COIL_CHECK(options_.size() >= 2 && names_.size() == options_.size() && weights.size() == options_.size(),
               "a streaming mixture needs two or more parts, with a name and a weight each");
    geo_ = options_[0].geometry;
    geo_.validate();
    // The shares as quotas of 2^20 rows: the interleave of any multiple of them is the same.
    mix_ = Interleave(apportion(int64_t{1} << 20, weights, names_));
    for (size_t k = 0; k < options_.size(); ++k) {
      StreamingOptions& o = options_[k];
      o.name = names_[k];
      COIL_CHECK(o.geometry.seq_len == geo_.seq_len && o.document_masking == options_[0].document_masking,
                 "the parts of a streaming mixture share seq_len and document_masking");
      o.geometry = BatchGeometry{geo_.seq_len, geo_.world, 1, geo_.rank, geo_.world};  // a row at a time
      loaders_.push_back(make_streaming_loader(o));
    }
  }

  Batch next() override {
    const int64_t cols = geo_.seq_len + 1, per = geo_.per_rank();
    Batch b;
    b.rows = geo_.micro_batch;
    b.cols = cols;
    b.tokens.reserve(static_cast<size_t>(b.rows * cols));
    for (int64_t r = 0; r < b.rows; ++r, ++rows_) {
      const int64_t g = start_ + rows_ / per * geo_.global_batch + geo_.rank * per + rows_ % per;
      const Batch one = loaders_[mix_.at(g - from_).part]->next();
      b.tokens.insert(b.tokens.end(), one.tokens.begin(), one.tokens.end());
      b.seq_idx.insert(b.seq_idx.end(), one.seq_idx.begin(), one.seq_idx.end());
    }
    return b;
  }

  LoaderState state() const override {
    LoaderState s;
    s.kind = "streaming";
    s.fingerprint = fingerprint();
    s.rank = geo_.rank;
    s.world = geo_.world;
    s.next_sample = start_ + rows_ / geo_.per_rank() * geo_.global_batch;
    for (const auto& l : loaders_) {
      s.parts.push_back(l->state());
      s.parts.back().next_sample = s.next_sample;
    }
    return s;
  }

  void restore(const LoaderState& s) override {
    COIL_CHECK(s.kind == "streaming", "the saved loader state is for {} data, this run streams", s.kind);
    COIL_CHECK(!s.parts.empty() || !s.name.empty(), "the saved loader state is a single stream's that names no "
               "data.train entry (saved before 2026-12-06): it resumes as that stream alone, not as a part of this "
               "run's mixture of {} streams", loaders_.size());
    COIL_CHECK(s.world == geo_.world && s.rank == geo_.rank,
               "the saved streaming state is rank {} of {}, this is rank {} of {} (merge_streaming_states() converts "
               "states across numbers of ranks)", s.rank, s.world, geo_.rank, geo_.world);
    COIL_CHECK(s.next_sample >= 0, "bad streaming mixture state: next row {}", s.next_sample);
    // A single stream's state is that of a mixture of one part here.
    const MixtureSegment saved = s.parts.empty() ? MixtureSegment{{s.name}, {1}, s.next_sample} : segment_of(s);
    const std::vector<LoaderState> states = s.parts.empty() ? std::vector<LoaderState>{s} : s.parts;
    bool any = false;
    std::vector<bool> taken(saved.names.size(), false);
    for (size_t k = 0; k < loaders_.size(); ++k) {
      loaders_[k] = make_streaming_loader(options_[k]);  // a new part starts at its beginning
      for (size_t i = 0; i < saved.names.size(); ++i)
        if (!taken[i] && saved.names[i] == names_[k]) {
          loaders_[k]->restore(states[i]);  // its data changed (another fingerprint): a coil::Error
          taken[i] = any = true;
          break;
        }
    }
    COIL_CHECK(any || !s.parts.empty(), "the saved loader state belongs to other data (its stream, {}, is not a part "
               "of this run's mixture: {})", s.name, fmt::join(names_, ", "));
    COIL_CHECK(any, "the saved loader state belongs to other data (none of its parts, {}, is in this run's data)",
               fmt::join(saved.names, ", "));
    start_ = s.next_sample;
    rows_ = 0;
    from_ = saved.names == names_ && saved.quotas == mix_.quotas() ? saved.from : s.next_sample;
  }

  int64_t samples_per_epoch() const override { return 0; }
  int64_t tokens_per_epoch() const override { return 0; }

 private:
  std::string fingerprint() const { return segment_json({names_, mix_.quotas(), from_}); }

  std::vector<StreamingOptions> options_;  // each part's, a row at a time
  std::vector<std::string> names_;
  Interleave mix_;
  BatchGeometry geo_;
  std::vector<std::unique_ptr<Loader>> loaders_;
  int64_t start_ = 0;  // the global row where this rank's reading started (a step boundary)
  int64_t rows_ = 0;   // rows this rank has read since
  int64_t from_ = 0;   // the global row where the interleave started
};

}  // namespace

std::unique_ptr<Loader> make_streaming_loader(const StreamingOptions& options) {
  return std::make_unique<StreamingLoader>(options);
}

std::unique_ptr<Loader> make_streaming_mixture(std::vector<StreamingOptions> parts, std::vector<std::string> names,
                                               const std::vector<double>& weights) {
  return std::make_unique<StreamingMixture>(std::move(parts), std::move(names), weights);
}

std::vector<std::string> describe_streaming_state(const LoaderState& state) {
  COIL_CHECK(state.kind == "streaming", "describe_streaming_state: a {} state", state.kind);
  auto place = [](const LoaderState& s) {
    return fmt::format("epoch {}, record {}, {} tokens of it used", s.epoch, s.record, s.offset);
  };
  if (state.parts.empty())
    return {fmt::format("streaming{}, rank {} of {}: {}", state.name.empty() ? "" : " " + state.name, state.rank,
                        state.world, place(state))};
  const MixtureSegment m = segment_of(state);
  std::vector<std::string> out = {fmt::format("streaming mixture of {} parts, rank {} of {}: next global row {}",
                                              state.parts.size(), state.rank, state.world, state.next_sample)};
  for (size_t k = 0; k < state.parts.size(); ++k) out.push_back(fmt::format("part {} {}: {}", k, m.names[k], place(state.parts[k])));
  return out;
}

LoaderState merge_streaming_states(const std::vector<LoaderState>& old, int rank, int world) {
  COIL_CHECK(!old.empty(), "no streaming state to merge");
  COIL_CHECK(world >= 1 && rank >= 0 && rank < world, "rank {} is outside a world of {}", rank, world);
  LoaderState s = old[0];
  if (!s.parts.empty()) {  // a mixture: each part's states merged on their own, the same next row
    for (const LoaderState& o : old)
      COIL_CHECK(o.kind == "streaming" && o.fingerprint == s.fingerprint && o.parts.size() == s.parts.size() &&
                     o.next_sample == s.next_sample,
                 "the streaming mixture states do not belong together");
    for (size_t p = 0; p < s.parts.size(); ++p) {
      std::vector<LoaderState> of_part;
      for (const LoaderState& o : old) of_part.push_back(o.parts[p]);
      s.parts[p] = merge_streaming_states(of_part, rank, world);
    }
    s.rank = rank;
    s.world = world;
    return s;
  }
  for (const LoaderState& o : old) {
    COIL_CHECK(o.kind == "streaming" && o.fingerprint == s.fingerprint && o.parts.empty(),
               "the streaming states do not belong together");
    if (o.epoch < s.epoch || (o.epoch == s.epoch && o.record < s.record)) s = o;
  }
  // Every record before the smallest position was used by its owner; start there, at a
  // document's beginning.
  s.offset = 0;
  s.rank = rank;
  s.world = world;
  return s;
}

}  // namespace coil::data
