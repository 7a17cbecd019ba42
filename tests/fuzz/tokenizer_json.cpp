// Fuzz target: a Hugging Face tokenizer.json (data/bpe.h), as `--tokenizer`, a checkpoint's copy or
// `coil ckpt import-hf` hands it over. The bytes are the file; a file that parses encodes a fixed
// text (plain, with special tokens) and its first bytes as text, and decodes the ids back: ids are in
// the vocabulary, and decoding never fails on ids the tokenizer made.
#include <string>
#include <vector>

#include "data/bpe.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  coil::fuzz::expect_coil_errors([&] {
    auto tok = coil::data::BpeTokenizer::parse(bytes, "fuzz/tokenizer.json");
    const std::string texts[] = {"Hello world, it's 2026!\n\t  \xe4\xbd\xa0\xe5\xa5\xbd <|endoftext|>",
                                 std::string(bytes.substr(0, 64))};
    for (const std::string& text : texts) {
      std::vector<int32_t> ids;
      tok->encode(text, ids);
      tok->encode_with_specials(text, ids);
      for (int32_t id : ids) COIL_FUZZ_ASSERT(id >= 0 && id < tok->vocab_size(), "ids are in the vocabulary");
      (void)tok->decode(ids);
    }
  });
  return 0;
}
