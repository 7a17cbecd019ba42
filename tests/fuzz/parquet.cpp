// Fuzz target: a Parquet file (data/parquet.h), as `coil data prepare`, streaming and the SFT reader
// open one from the Hub. The bytes are the file; it is read as FineWeb's text column would be, row
// by row, and again with a skip() past the first rows (the path a resumed stream takes): rows count
// up from 0, each value is valid UTF-8 (Parquet's strings are), and a skip passes no more than asked.
#include <string>
#include <vector>

#include "data/parquet.h"
#include "data/reader.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = coil::fuzz::write_file("input.parquet", {reinterpret_cast<const char*>(data), size});
  for (int64_t skip : {0, 3}) {
    coil::fuzz::expect_coil_errors([&] {
      coil::data::ParquetRows rows(path, {"text", "id"}, {false, true});
      const int64_t passed = rows.skip(skip);
      COIL_FUZZ_ASSERT(passed >= 0 && passed <= skip, "skip passes at most the rows asked");
      std::vector<std::string_view> values;
      std::vector<bool> null;
      int64_t expect = passed;
      while (rows.next(values, null)) {
        COIL_FUZZ_ASSERT(rows.row() >= expect, "rows count up");
        expect = rows.row() + 1;
        COIL_FUZZ_ASSERT(values.size() == 2 && null.size() == 2, "one value per column");
        for (size_t i = 0; i < values.size(); ++i)
          if (!null[i]) COIL_FUZZ_ASSERT(coil::data::valid_utf8(values[i]), "strings are valid UTF-8");
      }
      COIL_FUZZ_ASSERT(expect <= rows.rows(), "no more rows than the footer says");
    });
  }
  return 0;
}
