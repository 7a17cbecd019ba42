#include "data/loader.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/mixture.h"
#include "util/error.h"

namespace coil::data {

void BatchGeometry::validate() const {
  COIL_CHECK(seq_len >= 1, "train.seq_len must be >= 1, not {}", seq_len);
  COIL_CHECK(world >= 1 && rank >= 0 && rank < world, "rank {} is outside a world of {}", rank, world);
  COIL_CHECK(micro_batch >= 1, "train.micro_batch_size must be >= 1, not {}", micro_batch);
  COIL_CHECK(global_batch >= 1 && global_batch % (int64_t{world} * micro_batch) == 0,
             "train.global_batch_size ({}) must be a multiple of ranks x train.micro_batch_size ({} x {})",
             global_batch, world, micro_batch);
}

// ---- State ----------------------------------------------------------------------------------------

std::string LoaderState::to_json() const {
  nlohmann::json j = {{"kind", kind},   {"fingerprint", fingerprint}, {"seed", seed},   {"next_sample", next_sample},
                      {"epoch", epoch}, {"record", record},           {"offset", offset}, {"rank", rank},
                      {"world", world}};
  if (!name.empty()) j["name"] = name;
  if (!parts.empty()) {
    j["parts"] = nlohmann::json::array();
    for (const LoaderState& p : parts) j["parts"].push_back(nlohmann::json::parse(p.to_json()));
  }
  return j.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  LoaderState s;
  try {
    auto j = nlohmann::json::parse(text);
    s.kind = j.at("kind").get<std::string>();
    s.fingerprint = j.at("fingerprint").get<std::string>();
    s.seed = j.at("seed").get<uint64_t>();
    s.next_sample = j.at("next_sample").get<int64_t>();
    s.epoch = j.at("epoch").get<int64_t>();
    s.record = j.at("record").get<int64_t>();
    s.offset = j.at("offset").get<int64_t>();
    s.rank = j.at("rank").get<int>();
    s.world = j.at("world").get<int>();
    if (j.contains("name")) s.name = j.at("name").get<std::string>();
    if (j.contains("parts"))
      for (const auto& p : j.at("parts")) {
        if (!p.is_object() || p.contains("parts")) fail("not a data loader state (a part of parts): {}", text.substr(0, 200));
        s.parts.push_back(from_json(p.dump()));
      }
  } catch (const nlohmann::json::exception& e) {
    fail("not a data loader state ({}): {}", e.what(), text.substr(0, 200));
  }
  return s;
}

bool LoaderState::operator==(const LoaderState& o) const {
  return kind == o.kind && fingerprint == o.fingerprint && seed == o.seed && next_sample == o.next_sample &&
         epoch == o.epoch && record == o.record && offset == o.offset && rank == o.rank && world == o.world &&
         name == o.name && parts == o.parts;
}

// ---- Permutation ----------------------------------------------------------------------------------

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Permutation::Permutation(uint64_t n, uint64_t key) : n_(n) {
  COIL_CHECK(n > 0, "cannot permute an empty set");
  uint64_t bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  bits += bits & 1;  // an even number of bits: two equal halves
  half_bits_ = bits / 2;
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  for (int r = 0; r < 4; ++r) keys_[r] = mix64(key ^ mix64(static_cast<uint64_t>(r) + 1));
}

// Four Feistel rounds: (L, R) -> (R, L ^ F(R)); a bijection whatever F is.
uint64_t Permutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (uint64_t k : keys_) {
    uint64_t next = left ^ (mix64(right ^ k) & half_mask_);
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t Permutation::operator()(uint64_t i) const {
  COIL_CHECK(i < n_, "permutation index {} out of range {}", i, n_);
  uint64_t x = encrypt(i);
  while (x >= n_) x = encrypt(x);  // cycle walking: stays on i's cycle, so still a bijection
  return x;
}

// ---- The indexed loader ---------------------------------------------------------------------------

int64_t sample_at(int64_t g, int64_t samples, uint64_t seed) {
  const int64_t epoch = g / samples;
  Permutation perm(static_cast<uint64_t>(samples), mix64(seed) ^ mix64(static_cast<uint64_t>(epoch) * 0x632be59bd9b4e019ULL));
  return static_cast<int64_t>(perm(static_cast<uint64_t>(g % samples)));
}

void SampleSource::fill_at(int64_t g, uint64_t seed, int32_t* tokens, uint8_t* mask, int32_t* seq_idx) const {
  const int64_t s = sample_at(g, size(), seed);
  fill(s, tokens, mask);
  if (seq_idx) fill_seq_idx(s, seq_idx);
}

namespace {

void fill_rows(const SampleSource& source, int64_t first, int64_t rows, uint64_t seed, Batch& b) {
  b.rows = rows;
  b.cols = source.cols();
  b.tokens.resize(static_cast<size_t>(rows * b.cols));
  b.mask.resize(source.has_mask() ? b.tokens.size() : 0);
  b.seq_idx.resize(source.has_seq_idx() ? b.tokens.size() : 0);
  for (int64_t i = 0; i < rows; ++i)
    source.fill_at(first + i, seed, b.tokens.data() + i * b.cols, source.has_mask() ? b.mask.data() + i * b.cols : nullptr,
                   source.has_seq_idx() ? b.seq_idx.data() + i * b.cols : nullptr);
}

class IndexedLoader : public Loader {
 public:
  IndexedLoader(std::shared_ptr<const SampleSource> source, const BatchGeometry& g, uint64_t seed, int prefetch)
      : source_(std::move(source)), geo_(g), seed_(seed), prefetch_(prefetch) {
    geo_.validate();
    COIL_CHECK(source_->size() > 0, "the data set has no sample");
    start();
  }
  ~IndexedLoader() override { stop(); }

  Batch next() override {
    Batch b;
    if (prefetch_ == 0) {
      b = make(consumed_);
    } else {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty() || error_; });
      if (queue_.empty()) std::rethrow_exception(error_);
      b = std::move(queue_.front());
      queue_.pop_front();
      cv_.notify_all();
    }
    ++consumed_;
    return b;
  }

  LoaderState state() const override {
    COIL_CHECK(consumed_ % geo_.accumulation() == 0,
               "the loader state was asked for in the middle of a step ({} of {} micro batches)",
               consumed_ % geo_.accumulation(), geo_.accumulation());
    LoaderState s;
    s.kind = source_->kind();
    s.fingerprint = source_->fingerprint();
    s.seed = seed_;
    s.next_sample = start_ + consumed_ / geo_.accumulation() * geo_.global_batch;
    s.rank = geo_.rank;
    s.world = geo_.world;
    return s;
  }

  void restore(const LoaderState& s) override {
    COIL_CHECK(s.kind == source_->kind(), "the saved loader state is for {} data, this run reads {} data", s.kind,
               source_->kind());
    COIL_CHECK(s.next_sample >= 0, "bad loader state: next_sample {}", s.next_sample);
    std::shared_ptr<const SampleSource> source = continue_from(source_, s);  // or a coil::Error
    stop();
    source_ = std::move(source);
    seed_ = s.seed;  // the run goes on in its own order
    start_ = s.next_sample;
    consumed_ = 0;
    start();
  }

  int64_t samples_per_epoch() const override { return source_->size(); }
  int64_t tokens_per_epoch() const override { return source_->target_tokens(); }

 private:
  // Micro batch m since start_: step m / A, micro batch m mod A of this rank's slice.
  Batch make(int64_t m) const {
    const int64_t step = m / geo_.accumulation(), j = m % geo_.accumulation();
    const int64_t first = start_ + step * geo_.global_batch + geo_.rank * geo_.per_rank() + j * geo_.micro_batch;
    Batch b;
    fill_rows(*source_, first, geo_.micro_batch, seed_, b);
    return b;
  }

  void start() {
    if (prefetch_ == 0) return;
    stop_ = false;
    error_ = nullptr;
    queue_.clear();
    worker_ = std::thread([this] {
      int64_t m = consumed_;
      try {
        while (true) {
          {
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait(lock, [&] { return stop_ || static_cast<int>(queue_.size()) < prefetch_; });
            if (stop_) return;
          }
          Batch b = make(m++);
          std::lock_guard<std::mutex> lock(mu_);
          queue_.push_back(std::move(b));
          cv_.notify_all();
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = std::current_exception();
        cv_.notify_all();
      }
    });
  }

  void stop() {
    if (!worker_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    worker_.join();
  }

  std::shared_ptr<const SampleSource> source_;
  BatchGeometry geo_;
  uint64_t seed_;
  int prefetch_;
  int64_t start_ = 0, consumed_ = 0;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace

std::unique_ptr<Loader> make_indexed_loader(std::shared_ptr<const SampleSource> source, const BatchGeometry& geometry,
                                            uint64_t seed, int prefetch) {
  return std::make_unique<IndexedLoader>(std::move(source), geometry, seed, prefetch);
}

Batch global_batch(const SampleSource& source, int64_t global_batch_size, uint64_t seed, int64_t step, int64_t start) {
  Batch b;
  fill_rows(source, start + step * global_batch_size, global_batch_size, seed, b);
  return b;
}

}  // namespace coil::data
