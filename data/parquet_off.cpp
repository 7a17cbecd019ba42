// Coil built without Arrow: .parquet files are recognised and refused with one line.
#include "data/parquet.h"

#include "util/error.h"

namespace coil::data {

namespace {
bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

bool is_parquet_path(const std::string& path) { return ends_with(path, ".parquet") || ends_with(path, ".parq"); }
bool parquet_supported() { return false; }

struct ParquetRows::Impl {};

ParquetRows::ParquetRows(const std::string& path, const std::vector<std::string>&, const std::vector<bool>&) {
  fail("{}: this Coil was built without Parquet support (no Apache Arrow found at configure time, or "
       "-DCOIL_PARQUET=OFF); reconfigure with pyarrow in the venv or -DCOIL_ARROW_ROOT=<prefix>",
       path);
}
ParquetRows::~ParquetRows() = default;
ParquetRows::ParquetRows(ParquetRows&&) noexcept = default;
int64_t ParquetRows::rows() const { return 0; }
int ParquetRows::row_groups() const { return 0; }
bool ParquetRows::next(std::vector<std::string_view>&, std::vector<bool>&) { return false; }
int64_t ParquetRows::row() const { return -1; }
int ParquetRows::row_group() const { return -1; }
int64_t ParquetRows::skip(int64_t) { return 0; }
int64_t ParquetRows::row_groups_read() const { return 0; }
double ParquetRows::fraction() const { return 1.0; }

}  // namespace coil::data
