// Parquet files as they come from the Hugging Face Hub (FineWeb: text, id, dump, url, ...; Alpaca:
// instruction, input, output, text), read through Apache Arrow's Parquet C++ library. Only this
// header's implementation (parquet.cpp) includes Arrow: the rest of Coil sees rows of strings.
//
// A file is read one row group at a time, and only the columns asked for, so memory is bounded by a
// row group's worth of those columns, not by the file. Rows are numbered from 0 across the file's
// row groups; skip() passes whole row groups by their row counts in the footer without reading them
// (a resumed stream starts at the row group that holds its row).
//
// Errors are one-line coil::Errors naming the file, and the row group when it is one that fails: not
// a Parquet file or a truncated one (the footer is read at open), a column that is missing or does
// not hold strings (string, large_string or string_view), a row group whose pages do not decode.
// Coil built without Arrow (-DCOIL_PARQUET=OFF, or no Arrow found) refuses every .parquet file with a
// line that says so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace coil::data {

// True for *.parquet (and *.parq), the files read here rather than as text.
bool is_parquet_path(const std::string& path);
// Whether this build reads Parquet.
bool parquet_supported();

class ParquetRows {
 public:
  // Opens `path` and checks that the columns exist and hold strings. An `optional` column (by
  // index in `columns`; may be empty) that is missing reads as null in every row.
  ParquetRows(const std::string& path, const std::vector<std::string>& columns,
              const std::vector<bool>& optional = {});
  ~ParquetRows();
  ParquetRows(ParquetRows&&) noexcept;

  int64_t rows() const;        // in the file (from its footer)
  int row_groups() const;
  // The next row: values[i] is column i's string (a view valid until the next call), null[i] when
  // it is null. False at the end of the file. Throws coil::Error naming the row group on bad data.
  bool next(std::vector<std::string_view>& values, std::vector<bool>& null);
  int64_t row() const;         // the number of the row last returned (from 0)
  int row_group() const;       // the row group it is in
  // Passes over the next n rows (whole row groups without reading them); returns how many were
  // passed (fewer at the end of the file).
  int64_t skip(int64_t n);
  int64_t row_groups_read() const;  // row groups decoded so far (skipped ones are not)
  double fraction() const;     // rows returned or passed / rows

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace coil::data
