// Fuzz target: text through a tokenizer Coil trained (corpus/sentencepiece/coil-unigram.model:
// identity normalization, byte fallback), as every document of the data goes. The bytes are the
// text. Coil's tokenizers are lossless (data/tokenizer.h): decode(encode(text)) == text for valid
// UTF-8, checked here for every input.
#include "data/reader.h"
#include "data/tokenizer.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const coil::data::Tokenizer tok(COIL_FUZZ_TOKENIZER);
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  coil::fuzz::expect_coil_errors([&] {
    std::vector<int32_t> ids = tok.encode(text);
    for (int32_t id : ids) COIL_FUZZ_ASSERT(id >= 0 && id < tok.vocab_size(), "encode gives ids of the vocabulary");
    std::string back = tok.decode(ids);
    if (coil::data::valid_utf8(text)) COIL_FUZZ_ASSERT(back == text, "decode(encode(text)) == text");
  });
  return 0;
}
