// Fuzz target: a saved data loader state (data/loader.h's LoaderState, the JSON a checkpoint keeps
// as rankN.loader_state): parsed, described as `coil ckpt inspect` does (data/mixture.h's
// describe_state), and resumed (continue_from) into a mixture of two in-memory parts and into one
// of them alone, whose next samples are then read. A damaged state must be a coil::Error: no
// overflow, no out-of-range part, no crash.
#include <optional>

#include "data/loader.h"
#include "data/mixture.h"
#include "tests/fuzz/fuzz.h"

namespace {

using coil::data::LoaderState;
using coil::data::SampleSource;

// n samples of 3 tokens, sample i all i.
class Counted : public SampleSource {
 public:
  explicit Counted(int64_t n) : n_(n) {}
  int64_t size() const override { return n_; }
  int64_t cols() const override { return 3; }
  int64_t target_tokens() const override { return 2 * n_; }
  bool has_mask() const override { return false; }
  void fill(int64_t i, int32_t* tokens, uint8_t*) const override {
    COIL_FUZZ_ASSERT(i >= 0 && i < n_, "a sample inside the part");
    for (int c = 0; c < 3; ++c) tokens[c] = static_cast<int32_t>(i);
  }
  std::string kind() const override { return "shards"; }
  std::string fingerprint() const override { return "counted-" + std::to_string(n_); }

 private:
  int64_t n_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::optional<LoaderState> state;
  coil::fuzz::expect_coil_errors([&] {
    state = LoaderState::from_json(input);
    COIL_FUZZ_ASSERT(LoaderState::from_json(state->to_json()) == *state, "to_json and from_json give the state back");
  });
  if (!state) return 0;
  if (state->kind != "streaming") coil::fuzz::expect_coil_errors([&] { coil::data::describe_state(*state); });
  auto a = std::make_shared<Counted>(7), b = std::make_shared<Counted>(13);
  auto mixture = std::make_shared<coil::data::MixedSamples>(std::vector<std::shared_ptr<const SampleSource>>{a, b},
                                                            std::vector<std::string>{"a", "b"}, std::vector<double>{2, 1}, 5);
  for (std::shared_ptr<const SampleSource> source : {std::shared_ptr<const SampleSource>(mixture), std::shared_ptr<const SampleSource>(a)})
    coil::fuzz::expect_coil_errors([&] {
      std::shared_ptr<const SampleSource> next = coil::data::continue_from(source, *state);
      int32_t tokens[3];
      for (int64_t g = state->next_sample; g < state->next_sample + 4; ++g) next->fill_at(g, state->seed, tokens, nullptr, nullptr);
    });
  return 0;
}
