// Fuzz target: a sentencepiece model's bytes (a .model file, or the copy a checkpoint keeps), loaded
// by Tokenizer::from_bytes as `coil generate` and the trainers load them, then used: encode a text
// with several scripts, decode what came out, the pieces and decoding of the first ids, and ids
// outside the vocabulary (a coil::Error).
#include "data/tokenizer.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  coil::fuzz::expect_coil_errors([&] {
    auto tok = coil::data::Tokenizer::from_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz.model");
    const int32_t n = tok.vocab_size();
    COIL_FUZZ_ASSERT(n > 0 && tok.eos() >= 0 && tok.eos() < n && tok.pad() >= 0 && tok.pad() < n,
                     "EOS and PAD are ids of the vocabulary");
    std::vector<int32_t> ids = tok.encode("Hello, world! 123 \xc3\xa9t\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80\n\t  x");
    for (int32_t id : ids) COIL_FUZZ_ASSERT(id >= 0 && id < n, "encode gives ids of the vocabulary");
    tok.decode(ids);
    std::vector<int32_t> first;
    for (int32_t i = 0; i < std::min(n, 64); ++i) {
      first.push_back(i);
      tok.piece(i);
    }
    tok.decode(first);
    for (int32_t bad : {-1, n}) {
      bool threw = false;
      try {
        tok.decode({bad});
      } catch (const coil::Error&) {
        threw = true;
      }
      COIL_FUZZ_ASSERT(threw, "an id outside the vocabulary is a coil::Error");
    }
  });
  return 0;
}
