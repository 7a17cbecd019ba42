// Fuzz target: an Alpaca instruction set, as read_alpaca() reads it for SFT: a .json file (a JSON
// array of {instruction, input, output}, or JSONL). The bytes are the file.
#include "data/reader.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = coil::fuzz::write_file("alpaca.json", {reinterpret_cast<const char*>(data), size});
  coil::data::ReadOptions options;
  options.max_bad_records = 3;  // past three malformed records the read fails (a coil::Error)
  coil::fuzz::expect_coil_errors([&] {
    coil::data::ReadStats stats;
    auto examples = coil::data::read_alpaca({path}, options, &stats);
    COIL_FUZZ_ASSERT(static_cast<int64_t>(examples.size()) <= stats.records, "no more examples than records");
  });
  return 0;
}
