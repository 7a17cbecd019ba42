// Fuzz target: pretraining documents from a JSONL file, plain or compressed (the file name's suffix,
// COIL_FUZZ_SUFFIX, picks the decompressor: ".jsonl", ".jsonl.gz", ".jsonl.zst"). The bytes are the
// file as it would lie on disk; every record goes through document_text() as for_each_document()
// does. A record longer than 256 bytes is "too long" here, so that path is reached too.
#include "data/reader.h"
#include "tests/fuzz/fuzz.h"

#ifndef COIL_FUZZ_SUFFIX
#define COIL_FUZZ_SUFFIX ".jsonl"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path =
      coil::fuzz::write_file("input" COIL_FUZZ_SUFFIX, {reinterpret_cast<const char*>(data), size});
  coil::data::ReadOptions options;
  options.max_record_bytes = 256;
  coil::fuzz::expect_coil_errors([&] {
    coil::data::RecordReader reader(path, options);
    coil::data::Record record;
    std::string text, why;
    int64_t last_line = 0;
    while (reader.next(record)) {
      COIL_FUZZ_ASSERT(record.line > last_line, "record lines increase");
      last_line = record.line;
      COIL_FUZZ_ASSERT(record.bytes.size() <= static_cast<size_t>(options.max_record_bytes), "records are bounded");
      if (record.too_long) continue;
      text.clear();
      if (coil::data::document_text(record, reader.is_json(), options, text, why))
        COIL_FUZZ_ASSERT(coil::data::valid_utf8(text), "a document is valid UTF-8");
    }
  });
  return 0;
}
