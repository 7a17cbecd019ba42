// Parquet rows through Arrow's parquet::arrow::FileReader: one row group, the chosen columns only,
// decoded into Arrow arrays at a time; a row's strings are views into those arrays.
#include "data/parquet.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/reader.h>
#include <parquet/arrow/schema.h>
#include <parquet/exception.h>
#include <parquet/file_reader.h>
#include <parquet/metadata.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "util/error.h"

namespace coil::data {

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Arrow's messages may span lines; Coil's errors are one line.
std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

bool string_type(const arrow::DataType& t) {
  return t.id() == arrow::Type::STRING || t.id() == arrow::Type::LARGE_STRING || t.id() == arrow::Type::STRING_VIEW;
}

bool readable_type(const arrow::DataType& t) {
  if (string_type(t)) return true;
  if (t.id() == arrow::Type::DICTIONARY)
    return string_type(*static_cast<const arrow::DictionaryType&>(t).value_type());
  return false;
}

// The string at `i` of an array of one of the readable types; false when null.
bool string_at(const arrow::Array& a, int64_t i, std::string_view& out) {
  if (a.IsNull(i)) return false;
  switch (a.type_id()) {
    case arrow::Type::STRING: out = static_cast<const arrow::StringArray&>(a).GetView(i); return true;
    case arrow::Type::LARGE_STRING: out = static_cast<const arrow::LargeStringArray&>(a).GetView(i); return true;
    case arrow::Type::STRING_VIEW: out = static_cast<const arrow::StringViewArray&>(a).GetView(i); return true;
    case arrow::Type::DICTIONARY: {
      const auto& d = static_cast<const arrow::DictionaryArray&>(a);
      return string_at(*d.dictionary(), d.GetValueIndex(i), out);
    }
    default: return false;  // not reached: types are checked at open
  }
}

// A column of the current row group, walked chunk by chunk.
struct ColumnCursor {
  std::shared_ptr<arrow::ChunkedArray> data;  // null for a missing optional column
  int chunk = 0;
  int64_t at = 0;  // within the chunk
};

}  // namespace

bool is_parquet_path(const std::string& path) { return ends_with(path, ".parquet") || ends_with(path, ".parq"); }
bool parquet_supported() { return true; }

struct ParquetRows::Impl {
  std::string path;
  std::vector<std::string> names;
  std::vector<int> leaf;  // the Parquet leaf column of each asked column; -1: missing (optional)
  std::unique_ptr<parquet::arrow::FileReader> reader;
  std::shared_ptr<parquet::FileMetaData> meta;
  int groups = 0;
  int64_t total = 0;
  // Position: the next row group to decode, the rows of the current one, and where in it.
  int next_group = 0;
  int group = -1;
  int64_t group_first = 0;  // the file row number of the current group's first row
  int64_t group_rows = 0;
  int64_t in_group = 0;     // rows of the current group used
  int64_t passed = 0;       // rows returned or skipped in the file
  int64_t decoded = 0;
  std::vector<ColumnCursor> cursors;

  [[noreturn]] void group_error(int g, const std::string& why) const {
    fail("{}: row group {} of {}: {}", path, g, groups, one_line(why));
  }

  void open() {
    // A file that is not Parquet says so itself, before Arrow's words for a bad footer.
    {
      FILE* f = std::fopen(path.c_str(), "rb");
      if (!f) fail("cannot open {}: {}", path, std::strerror(errno));
      char magic[4] = {};
      const size_t got = std::fread(magic, 1, 4, f);
      std::fclose(f);
      if (got < 4 || std::memcmp(magic, "PAR1", 4) != 0)
        fail("{}: not a Parquet file (it does not start with PAR1)", path);
    }
    try {
      auto file = arrow::io::ReadableFile::Open(path);
      if (!file.ok()) fail("cannot open {}: {}", path, one_line(file.status().message()));
      auto r = parquet::arrow::OpenFile(*file, arrow::default_memory_pool());
      if (!r.ok())
        fail("{}: a damaged or truncated Parquet file ({})", path, one_line(r.status().message()));
      reader = std::move(*r);
      meta = reader->parquet_reader()->metadata();
    } catch (const parquet::ParquetException& e) {
      fail("{}: a damaged or truncated Parquet file ({})", path, one_line(e.what()));
    }
    groups = meta->num_row_groups();
    total = meta->num_rows();
    // The footer's row count must be its row groups' (found by fuzzing: a footer saying -7 rows
    // over row groups of 4 and 2): rows(), the progress share and resume positions rely on it.
    int64_t sum = 0;
    for (int g = 0; g < groups; ++g) {
      const int64_t n = meta->RowGroup(g)->num_rows();
      if (n < 0) fail("{}: a damaged Parquet footer (row group {} of {} says {} rows)", path, g, groups, n);
      sum += n;
    }
    if (sum != total)
      fail("{}: a damaged Parquet footer (it says {} rows, its row groups hold {})", path, total, sum);
    std::shared_ptr<arrow::Schema> schema;
    try {
      arrow::Status st = reader->GetSchema(&schema);
      if (!st.ok()) fail("{}: cannot read its schema ({})", path, one_line(st.message()));
    } catch (const parquet::ParquetException& e) {
      fail("{}: cannot read its schema ({})", path, one_line(e.what()));
    }
    const auto& fields = reader->manifest().schema_fields;
    leaf.assign(names.size(), -1);
    for (size_t i = 0; i < names.size(); ++i) {
      const int f = schema->GetFieldIndex(names[i]);
      if (f < 0) continue;  // missing: an error unless optional (checked by the caller)
      const auto& type = *schema->field(f)->type();
      if (!readable_type(type) || f >= static_cast<int>(fields.size()) || !fields[static_cast<size_t>(f)].is_leaf())
        fail("{}: column \"{}\" holds {}, not strings", path, names[i], type.ToString());
      leaf[i] = fields[static_cast<size_t>(f)].column_index;
    }
  }

  std::string column_list() const {
    std::string s;
    for (int i = 0; i < meta->schema()->group_node()->field_count(); ++i)
      s += (i ? ", " : "") + meta->schema()->group_node()->field(i)->name();
    return s;
  }

  // Decodes row group g's columns.
  void load(int g) {
    std::vector<int> wanted;
    for (int l : leaf)
      if (l >= 0) wanted.push_back(l);
    std::shared_ptr<arrow::Table> table;
    try {
      auto t = reader->ReadRowGroup(g, wanted);
      if (!t.ok()) group_error(g, t.status().message());
      table = std::move(*t);
      auto valid = table->ValidateFull();  // offsets and UTF-8 the pages claim are checked here
      if (!valid.ok()) group_error(g, valid.message());
    } catch (const parquet::ParquetException& e) {
      group_error(g, e.what());
    }
    cursors.assign(names.size(), {});
    int k = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      if (leaf[i] < 0) continue;
      cursors[i].data = table->column(k++);
    }
    group = g;
    group_first = passed;
    group_rows = meta->RowGroup(g)->num_rows();
    if (table->num_rows() != group_rows)
      group_error(g, fmt::format("{} rows decoded, its metadata says {}", table->num_rows(), group_rows));
    in_group = 0;
    ++decoded;
  }
};

ParquetRows::ParquetRows(const std::string& path, const std::vector<std::string>& columns,
                         const std::vector<bool>& optional)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.path = path;
  m.names = columns;
  if (std::filesystem::is_directory(path)) fail("{} is a directory, not a data file", path);
  m.open();
  for (size_t i = 0; i < columns.size(); ++i)
    if (m.leaf[i] < 0 && !(i < optional.size() && optional[i]))
      fail("{}: no column \"{}\" (its columns: {})", path, columns[i], m.column_list());
}

ParquetRows::~ParquetRows() = default;
ParquetRows::ParquetRows(ParquetRows&&) noexcept = default;

int64_t ParquetRows::rows() const { return impl_->total; }
int ParquetRows::row_groups() const { return impl_->groups; }
int64_t ParquetRows::row() const { return impl_->passed - 1; }
int ParquetRows::row_group() const { return impl_->group; }
int64_t ParquetRows::row_groups_read() const { return impl_->decoded; }
double ParquetRows::fraction() const {
  return impl_->total > 0 ? static_cast<double>(impl_->passed) / static_cast<double>(impl_->total) : 1.0;
}

bool ParquetRows::next(std::vector<std::string_view>& values, std::vector<bool>& null) {
  Impl& m = *impl_;
  while (m.group < 0 || m.in_group >= m.group_rows) {
    if (m.next_group >= m.groups) return false;
    m.load(m.next_group++);
  }
  values.assign(m.names.size(), {});
  null.assign(m.names.size(), true);
  for (size_t i = 0; i < m.cursors.size(); ++i) {
    ColumnCursor& c = m.cursors[i];
    if (!c.data) continue;
    while (c.chunk < c.data->num_chunks() && c.at >= c.data->chunk(c.chunk)->length()) ++c.chunk, c.at = 0;
    if (c.chunk >= c.data->num_chunks()) m.group_error(m.group, fmt::format("column \"{}\" ends early", m.names[i]));
    null[i] = !string_at(*c.data->chunk(c.chunk), c.at, values[i]);
    ++c.at;
  }
  ++m.in_group;
  ++m.passed;
  return true;
}

int64_t ParquetRows::skip(int64_t n) {
  Impl& m = *impl_;
  int64_t done = 0;
  // The rest of the current row group, row by row (its columns are decoded already).
  std::vector<std::string_view> v;
  std::vector<bool> nl;
  while (done < n && m.group >= 0 && m.in_group < m.group_rows) {
    next(v, nl);
    ++done;
  }
  // Whole row groups, from the footer's counts, without decoding them.
  while (done < n && m.next_group < m.groups) {
    const int64_t rows = m.meta->RowGroup(m.next_group)->num_rows();
    if (done + rows > n) break;
    done += rows;
    m.passed += rows;
    ++m.next_group;
    m.group = -1;
  }
  // Into the row group that holds the target row.
  while (done < n && next(v, nl)) ++done;
  return done;
}

}  // namespace coil::data
