// The checkpoint format (see checkpoint.h): rank files, the index of virtual datasets, reading,
// verifying and consolidating. The saving protocol during training is in checkpoint_saver.cpp.
#include "dist/checkpoint.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fmt/ranges.h>
#include <hdf5.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace coil::dist {
namespace fs = std::filesystem;

namespace {

constexpr int kVersion = 2;
constexpr const char* kFormat = "coil.checkpoint";
constexpr const char* kIndex = "index.h5";
constexpr const char* kIndexSum = "index.h5.crc32";  // the index's own size and CRC-32 (checkpoint.h)
// A consolidated file's user block (checkpoint.h): HDF5 puts the superblock after it.
constexpr int64_t kUserBlock = 512;
constexpr const char* kUserBlockMagic = "COIL-CRC32 ";
constexpr char kHdf5Signature[] = "\x89HDF\r\n\x1a\n";

// Closes an HDF5 handle at scope exit.
struct H5 {
  hid_t id;
  herr_t (*close)(hid_t);
  H5(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  H5(const H5&) = delete;
  ~H5() {
    if (id >= 0) close(id);
  }
  operator hid_t() const { return id; }
};

// HDF5 reports an error by pushing a stack of messages and, by default, printing it to stderr.
// This build of HDF5 is thread-safe, and then each thread has its own stack and its own printing
// switch: every entry point below calls quiet() first (the background writer and verifier are
// other threads), so HDF5 never prints; failures become coil::Errors built from reason().
void quiet() {
  static std::once_flag once;
  std::call_once(once, [] {
    setenv("HDF5_USE_FILE_LOCKING", "FALSE", 0);  // also for the files a virtual dataset opens
    H5dont_atexit();  // before the library starts: no clean-up at exit (see WriteFile)
  });
  thread_local bool done = false;
  if (!done) H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  done = true;
}

// Why the last HDF5 call on this thread failed, in a few words: the system's reason when a read,
// write or open failed in the file driver (its message records errno: "No space left on device"),
// else HDF5's own innermost message. The stack is cleared.
std::string reason() {
  struct Found {
    int err = 0;
    std::string innermost;
  } found;
  auto one = [](unsigned n, const H5E_error2_t* e, void* arg) -> herr_t {
    auto* f = static_cast<Found*>(arg);
    const std::string desc = e->desc ? e->desc : "";
    if (n == 0) {
      char minor[128] = "";
      H5Eget_msg(e->min_num, nullptr, minor, sizeof minor);
      f->innermost = minor[0] ? minor : desc;
    }
    const size_t at = desc.find("errno = ");
    if (!f->err && at != std::string::npos) f->err = std::atoi(desc.c_str() + at + 8);
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, one, &found);
  H5Eclear2(H5E_DEFAULT);
  if (found.err > 0) return std::strerror(found.err);
  return found.innermost.empty() ? "HDF5 gave no reason" : found.innermost;
}

// `what` (e.g. "<file>: writing model/x") failed: one line with the reason.
void check(herr_t rc, const std::string& what) {
  if (rc < 0) fail("{} failed: {}", what, reason());
}

// The name of the file that HDF5 object `obj` lives in.
std::string file_of(hid_t obj) {
  char name[4096] = "";
  return H5Fget_name(obj, name, sizeof name) > 0 ? name : "?";
}

// File access: no HDF5 file locking (Coil's own write-then-rename protocol makes it unnecessary,
// and flock fails on some network file systems).
hid_t file_access() {
  quiet();
  hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  H5Pset_file_locking(fapl, false, true);
  // The 1.10 file format: its superblock, object headers and B-trees carry checksums, so damaged
  // metadata is an error when read, not a misreading (h5py and HDF5 >= 1.10 read it).
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110);
  return fapl;
}

// File creation without modification times in the object headers: identical runs write
// byte-identical checkpoint files (a byte comparison of two runs' files is then a test).
hid_t file_create(int64_t userblock = 0) {
  hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
  H5Pset_obj_track_times(fcpl, false);
  if (userblock > 0) H5Pset_userblock(fcpl, static_cast<hsize_t>(userblock));
  return fcpl;
}

hid_t open_file(const std::string& path) {
  H5 fapl(file_access(), H5Pclose);
  return H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl);
}

// A file being written, with its disk space reserved first. HDF5 1.10 cannot recover a file whose
// metadata flush failed (say on a full disk): every later close of it fails ("slist already
// enabled?") and its clean-up at exit crashes on it. So a file is never left to fail there:
//   - before HDF5 writes anything, `reserve` bytes (the tensors' bytes and a margin for metadata,
//     estimated by the caller) are allocated to the file (fallocate, the size unchanged): a full
//     disk or quota is then this one clean error, and the writes that follow land in allocated
//     blocks; after the close the unused rest is released (where the file system cannot
//     fallocate, e.g. NFS, nothing is reserved);
//   - a file abandoned on an error (the destructor, while the error propagates) has its descriptor
//     pointed at an anonymous memory file (memfd) first, so that its last writes succeed and the
//     real file's blocks are freed once the caller removes it; should HDF5 still refuse to close
//     it, its handle is left, and the library's clean-up at exit is off (quiet()), so that it
//     cannot crash the process on the way out.
class WriteFile {
 public:
  WriteFile(const std::string& path, int64_t reserve, int64_t userblock = 0) : path_(path), reserve_(reserve) {
    H5 fapl(file_access(), H5Pclose);
    H5 fcpl(file_create(userblock), H5Pclose);
    id_ = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl, fapl);
    if (id_ < 0) fail("cannot create {}: {}", path, reason());
    const int fd = descriptor();
    if (fd >= 0 && ::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, reserve) != 0) {
      const int err = errno;
      if (err != EOPNOTSUPP && err != ENOSYS && err != EINVAL) {
        abandon();  // a throwing constructor runs no destructor
        fail("{}: cannot reserve {} bytes for it: {}", path, reserve, std::strerror(err));
      }
      reserve_ = 0;
    }
  }
  WriteFile(const WriteFile&) = delete;
  ~WriteFile() {
    if (id_ >= 0) abandon();
  }
  operator hid_t() const { return id_; }
  void close() {
    if (H5Fclose(id_) < 0) {
      const std::string why = reason();
      abandon();  // its descriptor is still open: let go of the file's blocks
      fail("{}: writing failed: {}", path_, why);
    }
    id_ = -1;
    struct stat st {};
    if (reserve_ > 0 && ::stat(path_.c_str(), &st) == 0 && st.st_size < reserve_) {  // give back the rest
      const int fd = ::open(path_.c_str(), O_WRONLY);
      if (fd >= 0) {
        ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st.st_size, reserve_ - st.st_size);
        ::close(fd);
      }
    }
  }

 private:
  // Drops the file (see above): its descriptor onto a memory file, then closed as far as HDF5 can.
  void abandon() {
    const int fd = descriptor();
    const int sink = fd >= 0 ? ::memfd_create("coil-discarded-h5", MFD_CLOEXEC) : -1;
    if (sink >= 0) {
      ::dup2(sink, fd);
      ::close(sink);
    }
    H5Fclose(id_);
    H5Eclear2(H5E_DEFAULT);
    id_ = -1;
  }
  int descriptor() const {  // the sec2 (POSIX) driver's file descriptor
    void* handle = nullptr;
    return H5Fget_vfd_handle(id_, H5P_DEFAULT, &handle) >= 0 && handle ? *static_cast<int*>(handle) : -1;
  }
  std::string path_;
  int64_t reserve_;
  hid_t id_ = -1;
};

// Room for a file's metadata besides its tensors' bytes: object headers, attributes, link heaps
// (a few hundred bytes each in practice; reserved generously, the rest is given back).
int64_t metadata_reserve(size_t objects, size_t attr_bytes) {
  return (int64_t{64} << 10) + static_cast<int64_t>(objects) * 4096 + 2 * static_cast<int64_t>(attr_bytes);
}

hid_t h5_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return H5T_NATIVE_FLOAT;
    case at::kDouble: return H5T_NATIVE_DOUBLE;
    case at::kByte: return H5T_NATIVE_UINT8;
    default: fail("checkpoints hold float32, float64 and uint8 tensors, not {}", c10::toString(t));
  }
}

at::ScalarType torch_type(hid_t type) {
  if (H5Tget_class(type) == H5T_FLOAT) return H5Tget_size(type) == 8 ? at::kDouble : at::kFloat;
  if (H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == 1) return at::kByte;
  fail("a checkpoint tensor of an unsupported HDF5 type");
}

const char* dtype_name(at::ScalarType t) {
  return t == at::kFloat ? "float32" : t == at::kDouble ? "float64" : "uint8";
}

// The groups above `name` ("model" of "model/<name>"), made without times (see file_create): the
// groups a link creation list makes on the way would record them.
void make_parent_groups(hid_t file, const std::string& name) {
  for (size_t slash = name.find('/', 1); slash != std::string::npos; slash = name.find('/', slash + 1)) {
    const std::string group = name.substr(0, slash);
    if (H5Lexists(file, group.c_str(), H5P_DEFAULT) > 0) continue;
    H5 gcpl(H5Pcreate(H5P_GROUP_CREATE), H5Pclose);
    H5Pset_obj_track_times(gcpl, false);
    H5 g(H5Gcreate2(file, group.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT), H5Gclose);
    if (g < 0) fail("cannot create group {}", group);
  }
}

// Link creation that makes the groups of "model/<name>" on the way.
hid_t make_groups() {
  hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  return lcpl;
}

std::vector<hsize_t> hdims(const std::vector<int64_t>& shape) { return {shape.begin(), shape.end()}; }

void write_dataset(hid_t file, const std::string& name, const at::Tensor& t) {
  H5 dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_obj_track_times(dcpl, false);  // no times: see file_create
  const hid_t type = h5_type(t.scalar_type());
  const std::vector<hsize_t> dims = hdims(t.sizes().vec());
  H5 space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  make_parent_groups(file, name);
  H5 lcpl(make_groups(), H5Pclose);
  H5 ds(H5Dcreate2(file, name.c_str(), type, space, lcpl, dcpl, H5P_DEFAULT), H5Dclose);
  if (ds < 0) fail("{}: cannot create dataset {}: {}", file_of(file), name, reason());
  if (t.numel() > 0)
    check(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.contiguous().data_ptr()), file_of(file) + ": writing " + name);
}

void write_string_attr(hid_t obj, const std::string& name, const std::string& value) {
  H5 type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, std::max<size_t>(1, value.size()));
  H5Tset_strpad(type, H5T_STR_NULLPAD);
  H5Tset_cset(type, H5T_CSET_UTF8);
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(attr < 0 ? -1 : 0, file_of(obj) + ": creating attribute " + name);
  check(H5Awrite(attr, type, value.data()), file_of(obj) + ": writing attribute " + name);
}

void write_int_attr(hid_t obj, const std::string& name, int64_t value) {
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(H5Acreate2(obj, name.c_str(), H5T_NATIVE_INT64, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(attr < 0 ? -1 : 0, file_of(obj) + ": creating attribute " + name);
  check(H5Awrite(attr, H5T_NATIVE_INT64, &value), file_of(obj) + ": writing attribute " + name);
}

// Every attribute of an object: strings as they are, integers in decimal.
std::map<std::string, std::string> read_attrs(hid_t obj) {
  std::map<std::string, std::string> out;
  auto one = [](hid_t o, const char* name, const H5A_info_t*, void* arg) -> herr_t {
    auto* m = static_cast<std::map<std::string, std::string>*>(arg);
    H5 attr(H5Aopen(o, name, H5P_DEFAULT), H5Aclose);
    H5 type(H5Aget_type(attr), H5Tclose);
    if (H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type)) {
      std::string value(H5Tget_size(type), '\0');
      if (H5Aread(attr, type, value.data()) < 0) return -1;
      value.resize(std::strlen(value.c_str()));
      (*m)[name] = value;
    } else if (H5Tget_class(type) == H5T_INTEGER) {
      int64_t v = 0;
      if (H5Aread(attr, H5T_NATIVE_INT64, &v) < 0) return -1;
      (*m)[name] = std::to_string(v);
    }
    return 0;
  };
  check(H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, nullptr, one, &out), "reading attributes");
  return out;
}

uint32_t crc_of(const void* data, size_t n, uint32_t crc = 0) {
  const auto* p = static_cast<const Bytef*>(data);
  while (n > 0) {  // zlib's crc32 takes a uInt length
    const auto chunk = static_cast<uInt>(std::min<size_t>(n, size_t{1} << 30));
    crc = static_cast<uint32_t>(crc32(crc, p, chunk));
    p += chunk, n -= chunk;
  }
  return crc;
}

// CRC-32 (zlib's, as Python's zlib.crc32) of a file's bytes from offset `from` on, and the file's
// size. With `sync` the file's writeback to disk is started first and waited for (fsync) last, so
// that reading it back overlaps the disk's write.
std::pair<int64_t, uint32_t> checksum_file(const std::string& path, bool sync, int64_t from = 0) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open {}: {}", path, std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail("cannot stat {}: {}", path, std::strerror(errno));
  const int64_t size = st.st_size;
  if (sync) ::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  // One thread: CRC-32 runs at ~3.6 GB/s here, faster than the disk; when loading, the tensors are
  // read on the other core meanwhile.
  std::vector<char> buf(size_t{8} << 20);
  uint32_t crc = 0;
  for (int64_t at = from; at < size;) {
    const ssize_t n = ::pread(fd, buf.data(), static_cast<size_t>(std::min<int64_t>(size - at, static_cast<int64_t>(buf.size()))), at);
    if (n <= 0) fail("reading {} failed: {}", path, n == 0 ? "unexpected end of file" : std::strerror(errno));
    crc = crc_of(buf.data(), static_cast<size_t>(n), crc);
    at += n;
  }
  if (sync && ::fsync(fd) != 0) fail("fsync of {} failed: {}", path, std::strerror(errno));
  return {size, crc};
}

// Writes a small file whole and fsyncs it (the index's checksum line).
void write_synced(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create {}: {}", path, std::strerror(errno));
  const ssize_t n = ::write(fd, text.data(), text.size());
  const int err = errno;
  const bool synced = n == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  const int sync_err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) fail("writing {} failed: {}", path, n < 0 ? std::strerror(err) : "short write");
  if (!synced) fail("fsync of {} failed: {}", path, std::strerror(sync_err));
}

// "<crc32 as 8 hex digits> <bytes>" at the start of `text` (then `rest` is what follows), or false.
bool parse_sum(std::string_view text, uint32_t* crc, int64_t* bytes, std::string_view* rest) {
  if (text.size() < 10 || text[8] != ' ') return false;
  uint32_t c = 0;
  for (size_t i = 0; i < 8; ++i) {
    const char ch = text[i];
    const int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
    if (d < 0) return false;
    c = c << 4 | static_cast<uint32_t>(d);
  }
  size_t i = 9;
  int64_t b = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    if (b > (INT64_MAX - 9) / 10) return false;
    b = b * 10 + (text[i] - '0');
  }
  if (i == 9 || (i < text.size() && text[i] != ' ' && text[i] != '\n')) return false;
  *crc = c, *bytes = b, *rest = text.substr(i);
  return true;
}

// The first `n` bytes of a file (fewer when it is shorter).
std::string head_of(const std::string& path, size_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open {}: {}", path, std::strerror(errno));
  std::string out(n, '\0');
  const ssize_t got = ::pread(fd, out.data(), n, 0);
  const int err = errno;
  ::close(fd);
  if (got < 0) fail("reading {} failed: {}", path, std::strerror(err));
  out.resize(static_cast<size_t>(got));
  return out;
}

// Checks `file` (its bytes from `from` on) against the size and CRC-32 that `recorder` records,
// before HDF5 may open it: "" when they match, else the one-line problem.
std::string check_bytes(const std::string& file, int64_t bytes, uint32_t crc, const std::string& recorder,
                        int64_t from = 0) {
  std::error_code ec;
  const auto size = static_cast<int64_t>(fs::file_size(file, ec));
  if (ec) return fmt::format("{}: missing ({})", file, ec.message());
  if (size != bytes)
    return fmt::format("{}: {} bytes, {} records {} ({})", file, size, recorder, bytes, size < bytes ? "truncated" : "overwritten");
  try {
    const uint32_t got = checksum_file(file, false, from).second;
    if (got != crc)
      return fmt::format("{}: checksum mismatch (the file is damaged; CRC-32 {:08x}, {} records {:08x})", file, got,
                         recorder, crc);
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

// The index of a checkpoint folder against index.h5.crc32, before HDF5 opens it: false when there
// is no such file (an older Coil's checkpoint: not checked), else true or a coil::Error.
bool check_index(const std::string& dir, const std::string& index) {
  const std::string sum = (fs::path(dir) / kIndexSum).string();
  std::error_code ec;
  if (!fs::exists(sum, ec)) return false;
  const std::string line = head_of(sum, 256);
  uint32_t crc = 0;
  int64_t bytes = 0;
  std::string_view rest;
  if (!parse_sum(line, &crc, &bytes, &rest) || rest != std::string(" ") + kIndex + "\n")
    fail("{}: not a checksum line \"<crc32> <bytes> {}\" (the file is damaged)", sum, kIndex);
  const std::string problem = check_bytes(index, bytes, crc, kIndexSum);
  if (!problem.empty()) fail("{}", problem);
  return true;
}

// A consolidated file's user block against the bytes after it, before HDF5 opens the file: false
// for a file of an older Coil (HDF5's signature at byte 0: not checked), else true or a coil::Error.
bool check_consolidated(const std::string& file) {
  const std::string head = head_of(file, static_cast<size_t>(kUserBlock));
  if (head.compare(0, 8, kHdf5Signature, 8) == 0) return false;
  const size_t magic = std::strlen(kUserBlockMagic);
  uint32_t crc = 0;
  int64_t bytes = 0;
  std::string_view rest;
  if (head.compare(0, magic, kUserBlockMagic) != 0) fail("{}: not an HDF5 file (truncated or damaged?)", file);
  if (!parse_sum(std::string_view(head).substr(magic), &crc, &bytes, &rest) || rest.empty() || rest[0] != '\n')
    fail("{}: a damaged checksum line in its first {} bytes (the file is damaged)", file, kUserBlock);
  const std::string problem = check_bytes(file, bytes, crc, "its header", kUserBlock);
  if (!problem.empty()) fail("{}", problem);
  return true;
}

std::vector<std::string> list_datasets(hid_t file) {
  std::vector<std::string> out;
  for (const char* group : {"model", "optimizer"}) {
    if (H5Lexists(file, group, H5P_DEFAULT) <= 0) continue;
    H5 g(H5Gopen2(file, group, H5P_DEFAULT), H5Gclose);
    auto one = [](hid_t, const char* name, const H5L_info_t*, void* arg) -> herr_t {
      static_cast<std::vector<std::string>*>(arg)->push_back(name);
      return 0;
    };
    std::vector<std::string> names;
    check(H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, nullptr, one, &names), "listing " + std::string(group));
    for (auto& n : names) out.push_back(std::string(group) + "/" + n);
  }
  return out;
}

std::vector<int64_t> dataset_shape(hid_t ds) {
  H5 space(H5Dget_space(ds), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(rank, 0)));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return {dims.begin(), dims.end()};
}

at::Tensor read_whole(hid_t file, const std::string& name) {
  H5 ds(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (ds < 0) fail("no dataset {}", name);
  H5 type(H5Dget_type(ds), H5Tclose);
  at::Tensor t = at::empty(dataset_shape(ds), torch_type(type));
  if (t.numel() > 0) check(H5Dread(ds, h5_type(t.scalar_type()), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()), "reading " + name);
  return t;
}

}  // namespace

std::pair<int64_t, int64_t> rank_rows(int64_t rows, int rank, int world, int shard) {
  if (shard > 0 && shard < world) {
    if (rank >= shard) return {rows, rows};
    world = shard;
  }
  const int64_t k = (rows + world - 1) / world;
  const int64_t begin = std::min(rows, rank * k);
  return {begin, std::min(rows, begin + k)};
}

std::string rank_file_name(int rank, int world) { return fmt::format("rank-{:05d}-of-{:05d}.h5", rank, world); }

std::string FileRecord::to_json() const {
  return nlohmann::json{{"name", name}, {"bytes", bytes}, {"crc32", crc32}, {"error", error}}.dump();
}

FileRecord FileRecord::from_json(const std::string& text) {
  auto j = nlohmann::json::parse(text);
  FileRecord r;
  r.name = j.at("name").get<std::string>();
  r.bytes = j.at("bytes").get<int64_t>();
  r.crc32 = j.at("crc32").get<uint32_t>();
  r.error = j.value("error", "");
  return r;
}

// ---- Writing ------------------------------------------------------------------------------------

FileRecord write_rank_file(const std::string& dir, const RankPart& part) noexcept {
  FileRecord rec;
  rec.name = rank_file_name(part.rank, part.world);
  try {
    const std::string path = dir + "/" + rec.name;
    {
      int64_t bytes = part.rng.defined() ? part.rng.nbytes() : 0;
      size_t attr_bytes = 0;
      for (const auto& t : part.tensors) bytes += t.rows.nbytes();
      for (const auto& [k, v] : part.strings) attr_bytes += k.size() + v.size();
      WriteFile f(path, bytes + metadata_reserve(part.tensors.size() + part.strings.size() + 8, attr_bytes));
      write_string_attr(f, "format", std::string(kFormat) + ".rank");
      write_int_attr(f, "version", kVersion);
      write_int_attr(f, "rank", part.rank);
      write_int_attr(f, "world_size", part.world);
      write_int_attr(f, "step", part.step);
      for (const auto& [k, v] : part.strings) write_string_attr(f, k, v);
      for (const auto& t : part.tensors) {
        COIL_CHECK(t.rows.dim() == static_cast<int64_t>(t.shape.size()), "{}: rows of another rank than the tensor", t.name);
        write_dataset(f, t.name, t.rows);
      }
      if (part.rng.defined()) write_dataset(f, "rng/cpu", part.rng);
      f.close();
    }
    std::tie(rec.bytes, rec.crc32) = checksum_file(path, /*sync=*/true);
  } catch (const std::exception& e) {
    rec.error = e.what();
  }
  return rec;
}

void write_index(const std::string& dir, const RankPart& layout, const IndexInfo& info) {
  const std::string path = dir + "/" + kIndex;
  {
    size_t attr_bytes = info.tokenizer.size() + info.files.size() * 128;
    for (const auto& [k, v] : info.strings) attr_bytes += k.size() + v.size();
    const size_t mappings = layout.tensors.size() * static_cast<size_t>(info.world);
    WriteFile f(path, static_cast<int64_t>(info.tokenizer.size()) +
                          metadata_reserve(layout.tensors.size() + mappings / 8 + info.strings.size() + 8,
                                           attr_bytes + mappings * 256));
    write_string_attr(f, "format", kFormat);
    write_int_attr(f, "version", kVersion);
    write_int_attr(f, "step", info.step);
    write_int_attr(f, "world_size", info.world);
    if (info.shard > 0 && info.shard < info.world) write_int_attr(f, "shard_degree", info.shard);
    nlohmann::json files = nlohmann::json::array();
    for (const auto& r : info.files) files.push_back(nlohmann::json::parse(r.to_json()));
    write_string_attr(f, "files", files.dump());
    for (const auto& [k, v] : info.strings) write_string_attr(f, k, v);
    for (const auto& t : layout.tensors) {
      // The global tensor: rank r's rows come from rank r's file.
      const std::vector<hsize_t> dims = hdims(t.shape);
      const int nd = static_cast<int>(dims.size());
      const hid_t type = h5_type(t.rows.scalar_type());
      H5 vspace(H5Screate_simple(nd, dims.data(), nullptr), H5Sclose);
      H5 dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
      H5Pset_obj_track_times(dcpl, false);
      const double nan = std::nan("");
      const float nanf = std::nanf("");
      if (type != H5T_NATIVE_UINT8) check(H5Pset_fill_value(dcpl, type, type == H5T_NATIVE_FLOAT ? static_cast<const void*>(&nanf) : &nan), "fill value");
      for (int r = 0; r < info.world; ++r) {
        const auto [begin, end] = rank_rows(t.shape[0], r, info.world, info.shard);
        if (end <= begin) continue;
        std::vector<hsize_t> src = dims, start(dims.size(), 0);
        src[0] = static_cast<hsize_t>(end - begin);
        start[0] = static_cast<hsize_t>(begin);
        H5 sspace(H5Screate_simple(nd, src.data(), nullptr), H5Sclose);
        check(H5Sselect_hyperslab(vspace, H5S_SELECT_SET, start.data(), nullptr, src.data(), nullptr), "selecting rows");
        check(H5Pset_virtual(dcpl, vspace, rank_file_name(r, info.world).c_str(), t.name.c_str(), sspace),
              "mapping " + t.name);
      }
      H5 space(H5Screate_simple(nd, dims.data(), nullptr), H5Sclose);
      make_parent_groups(f, t.name);
      H5 lcpl(make_groups(), H5Pclose);
      H5 ds(H5Dcreate2(f, t.name.c_str(), type, space, lcpl, dcpl, H5P_DEFAULT), H5Dclose);
      if (ds < 0) fail("{}: cannot create the virtual dataset {}: {}", path, t.name, reason());
    }
    if (!info.tokenizer.empty())
      write_dataset(f, "tokenizer/model",
                    at::from_blob(const_cast<char*>(info.tokenizer.data()), {static_cast<int64_t>(info.tokenizer.size())}, at::kByte));
    f.close();
  }
  // The index's own checksum beside it, in the same folder: committed with it by the folder's rename.
  const auto [bytes, crc] = checksum_file(path, /*sync=*/true);
  write_synced(dir + "/" + kIndexSum, fmt::format("{:08x} {} {}\n", crc, bytes, kIndex));
}

namespace {
void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}
}  // namespace

namespace {
// rename(2), or one line naming both paths and the system's reason (EXDEV, EBUSY, EROFS, ...).
void rename_or_fail(const fs::path& from, const fs::path& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    fail("cannot rename {} to {}: {}", from.string(), to.string(), std::strerror(errno));
}
}  // namespace

void commit_directory(const std::string& from, const std::string& to) {
  fsync_dir(from);
  if (fs::exists(to)) {  // a checkpoint of that name (a damaged one, or "best" of old): replace it
    const std::string old = to + ".old";
    std::error_code ignored;
    fs::remove_all(old, ignored);
    rename_or_fail(to, old);
    rename_or_fail(from, to);
    fs::remove_all(old, ignored);
  } else {
    rename_or_fail(from, to);
  }
  fsync_dir(fs::path(to).parent_path());
}

void point_link(const std::string& parent, const std::string& link, const std::string& target) {
  const fs::path tmp = fs::path(parent) / (link + ".tmp-link");
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_directory_symlink(target, tmp, ec);
  if (ec) fail("cannot create the link {}: {}", tmp.string(), ec.message());
  rename_or_fail(tmp, fs::path(parent) / link);  // rename(2) replaces the old link atomically
  fsync_dir(parent);
}

// ---- Reading ------------------------------------------------------------------------------------

Checkpoint::Checkpoint(const std::string& path) : path_(path) {
  if (!fs::exists(path)) fail("no checkpoint at {}", path);
  if (fs::is_directory(path)) {
    index_ = (fs::path(path) / kIndex).string();
    if (!fs::exists(index_)) {
      if (fs::exists(fs::path(path) / "checkpoint.h5"))
        fail("{}: a checkpoint of Coil's first format (checkpoint.h5); this version reads format 2 only", path);
      fail("{}: no {} (an incomplete checkpoint, or not a checkpoint)", path, kIndex);
    }
    index_checked_ = check_index(path, index_);
  } else {
    index_ = path;
    consolidated_ = true;
    index_checked_ = check_consolidated(index_);
  }
  file_id_ = open_file(index_);
  if (file_id_ < 0) fail("{}: not an HDF5 file (truncated or damaged?)", index_);
  H5 root(H5Gopen2(file_id_, "/", H5P_DEFAULT), H5Gclose);
  strings_ = read_attrs(root);
  if (strings_["format"] != kFormat) fail("{}: not a Coil checkpoint (format '{}')", index_, strings_["format"]);
  if (strings_["version"] != std::to_string(kVersion))
    fail("{}: checkpoint format version {}, this Coil reads version {}", index_, strings_["version"], kVersion);
  step_ = std::stoll(strings_.at("step"));
  world_ = std::stoi(strings_.at("world_size"));
  shard_ = strings_.count("shard_degree") ? std::stoi(strings_.at("shard_degree")) : world_;
  COIL_CHECK(shard_ >= 1 && shard_ <= world_ && world_ % shard_ == 0, "{}: shard_degree {} for world size {}", index_,
             shard_, world_);
  consolidated_ = strings_.count("consolidated") > 0;
  if (!consolidated_) {
    for (const auto& f : nlohmann::json::parse(strings_.at("files"))) files_.push_back(FileRecord::from_json(f.dump()));
    COIL_CHECK(static_cast<int>(files_.size()) == world_, "{}: {} rank files recorded for world size {}", index_,
               files_.size(), world_);
    for (int r = 0; r < world_; ++r) checks_.push_back(std::make_unique<FileCheck>());
  }
  for (const char* k : {"format", "version", "step", "world_size", "shard_degree", "files", "consolidated"}) strings_.erase(k);
}

Checkpoint::~Checkpoint() {
  quiet();
  for (int64_t f : rank_files_)
    if (f >= 0) H5Fclose(f);
  if (file_id_ >= 0) H5Fclose(file_id_);
}

struct Checkpoint::FileCheck {
  std::mutex mutex;
  bool done = false;
  std::string problem;
};

std::string Checkpoint::check_rank_file(size_t i) const {
  COIL_CHECK(i < checks_.size(), "{}: no rank file {} (world size {})", path_, i, world_);
  FileCheck& c = *checks_[i];
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!c.done) {
    const FileRecord& rec = files_[i];
    const std::string file = (fs::path(path_) / rank_file_name(static_cast<int>(i), world_)).string();
    std::error_code ec;
    if (!fs::exists(file, ec)) c.problem = fmt::format("{}: missing (rank {} of {})", file, i, world_);
    else c.problem = check_bytes(file, rec.bytes, rec.crc32, "the index");
    c.done = true;
  }
  return c.problem;
}

int64_t Checkpoint::rank_file(int r) const {
  if (rank_files_.empty()) rank_files_.assign(static_cast<size_t>(world_), -1);
  int64_t& f = rank_files_[static_cast<size_t>(r)];
  if (f < 0) {
    const std::string file = (fs::path(path_) / rank_file_name(r, world_)).string();
    // Opened only once its bytes are as recorded (HDF5 never parses a damaged file).
    const std::string problem = check_rank_file(static_cast<size_t>(r));
    if (!problem.empty()) fail("{}", problem);
    f = open_file(file);
    if (f < 0) fail("{}: missing or not an HDF5 file", file);
  }
  return f;
}

std::string Checkpoint::string(const std::string& key) const {
  auto it = strings_.find(key);
  if (it == strings_.end()) fail("{}: the checkpoint has no '{}'", path_, key);
  return it->second;
}

std::vector<TensorInfo> Checkpoint::tensors() const {
  quiet();
  std::vector<TensorInfo> out;
  for (const auto& name : list_datasets(file_id_)) {
    H5 ds(H5Dopen2(file_id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    H5 type(H5Dget_type(ds), H5Tclose);
    out.push_back({name, dataset_shape(ds), dtype_name(torch_type(type))});
  }
  return out;
}

int64_t Checkpoint::total_bytes() const {
  int64_t n = static_cast<int64_t>(fs::file_size(index_));
  for (const auto& f : files_) n += f.bytes;
  return n;
}

bool Checkpoint::has(const std::string& name) const {
  quiet();
  return H5Lexists(file_id_, name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<std::string> Checkpoint::verify(int part, int parts) const {
  quiet();
  std::vector<std::string> problems;
  if (consolidated_) {
    if (part != 0) return problems;
    for (const auto& name : list_datasets(file_id_)) {
      try {
        H5 ds(H5Dopen2(file_id_, name.c_str(), H5P_DEFAULT), H5Dclose);
        if (H5Aexists(ds, "crc32") <= 0) {
          problems.push_back(fmt::format("{}: {} has no crc32 attribute", index_, name));
          continue;
        }
        H5 attr(H5Aopen(ds, "crc32", H5P_DEFAULT), H5Aclose);
        int64_t want = 0;
        check(H5Aread(attr, H5T_NATIVE_INT64, &want), "reading crc32");
        at::Tensor t = read_whole(file_id_, name);
        if (crc_of(t.data_ptr(), static_cast<size_t>(t.nbytes())) != static_cast<uint32_t>(want))
          problems.push_back(fmt::format("{}: {} does not match its CRC-32 (damaged)", index_, name));
      } catch (const std::exception& e) {
        problems.push_back(fmt::format("{}: {}: {}", index_, name, e.what()));
      }
    }
    return problems;
  }
  for (size_t i = static_cast<size_t>(part); i < files_.size(); i += static_cast<size_t>(parts)) {
    std::string problem = check_rank_file(i);
    if (!problem.empty()) problems.push_back(std::move(problem));
  }
  return problems;
}

void Checkpoint::read(const std::string& name, at::Tensor dst, int64_t row_begin) const {
  quiet();
  if (!has(name)) fail("{}: no tensor {}", path_, name);
  H5 ds(H5Dopen2(file_id_, name.c_str(), H5P_DEFAULT), H5Dclose);
  const std::vector<int64_t> shape = dataset_shape(ds);
  std::vector<int64_t> want = dst.sizes().vec();
  const bool whole = row_begin == 0 && want == shape;
  if (!whole && (want.size() != shape.size() || want.empty() ||
                 !std::equal(want.begin() + 1, want.end(), shape.begin() + 1) || row_begin < 0))
    fail("{}: {} has shape [{}] in the checkpoint, the model has [{}]", path_, name, fmt::join(shape, ", "),
         fmt::join(want, ", "));
  H5 type(H5Dget_type(ds), H5Tclose);
  const at::ScalarType st = torch_type(type);
  const int64_t n = shape.empty() ? 0 : std::max<int64_t>(0, std::min(shape[0] - row_begin, want.empty() ? 0 : want[0]));
  // Straight into dst when it can take the bytes as they are (no second copy).
  const bool direct = dst.device().is_cpu() && dst.is_contiguous() && dst.scalar_type() == st;
  at::Tensor buf = direct ? dst : at::empty(want, at::TensorOptions().dtype(st));
  if (n < (want.empty() ? 0 : want[0])) {
    c10::NoGradGuard no_grad;
    buf.narrow(0, n, want[0] - n).zero_();
  }
  // Rows [lo, hi) of the global tensor, from dataset `from` whose row 0 is global row `first`.
  auto read_rows = [&](hid_t from, int64_t first, int64_t lo, int64_t hi, const std::string& file) {
    std::vector<hsize_t> start(shape.size(), 0), count = hdims(shape);
    start[0] = static_cast<hsize_t>(lo - first);
    count[0] = static_cast<hsize_t>(hi - lo);
    H5 fspace(H5Dget_space(from), H5Sclose);
    check(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr), "selecting rows");
    H5 mspace(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr), H5Sclose);
    check(H5Dread(from, h5_type(st), mspace, fspace, H5P_DEFAULT, buf.narrow(0, lo - row_begin, hi - lo).data_ptr()),
          "reading " + name + " of " + file);
  };
  if (n > 0 && consolidated_) {
    read_rows(ds, 0, row_begin, row_begin + n, index_);
  } else if (n > 0) {
    // From the rank files themselves: the virtual dataset would give the same bytes, slower.
    for (int r = 0; r < world_; ++r) {
      const auto [b, e] = rank_rows(shape[0], r, world_, shard_);
      const int64_t lo = std::max(b, row_begin), hi = std::min(e, row_begin + n);
      if (lo >= hi) continue;
      H5 src(H5Dopen2(rank_file(r), name.c_str(), H5P_DEFAULT), H5Dclose);
      const std::string file = (fs::path(path_) / rank_file_name(r, world_)).string();
      if (src < 0) fail("{}: no tensor {}", file, name);
      if (dataset_shape(src)[0] != e - b) fail("{}: {} holds {} rows, not {}", file, name, dataset_shape(src)[0], e - b);
      read_rows(src, b, lo, hi, file);
    }
  }
  if (!direct) {
    c10::NoGradGuard no_grad;
    dst.copy_(buf);
  }
}

std::string Checkpoint::rank_string(int rank, const std::string& key) const {
  quiet();
  if (consolidated_) return string(fmt::format("rank{}.{}", rank, key));
  COIL_CHECK(rank >= 0 && rank < world_, "{}: no rank {} (world size {})", path_, rank, world_);
  const std::string file = (fs::path(path_) / rank_file_name(rank, world_)).string();
  H5 root(H5Gopen2(rank_file(rank), "/", H5P_DEFAULT), H5Gclose);
  auto attrs = read_attrs(root);
  auto it = attrs.find(key);
  if (it == attrs.end()) fail("{}: no '{}'", file, key);
  return it->second;
}

at::Tensor Checkpoint::rank_rng(int rank) const {
  quiet();
  if (consolidated_) return has("rng/cpu") ? read_whole(file_id_, "rng/cpu") : at::Tensor();
  COIL_CHECK(rank >= 0 && rank < world_, "{}: no rank {} (world size {})", path_, rank, world_);
  const hid_t f = rank_file(rank);
  if (H5Lexists(f, "rng", H5P_DEFAULT) <= 0) return {};
  return read_whole(f, "rng/cpu");
}

std::string Checkpoint::tokenizer() const {
  quiet();
  if (!has("tokenizer")) return {};
  at::Tensor t = read_whole(file_id_, "tokenizer/model");
  return {static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel())};
}

// ---- Consolidating ------------------------------------------------------------------------------

void consolidate(const Checkpoint& ck, const std::string& out) {
  const std::string tmp = out + ".tmp";
  try {
    const at::Tensor rng = ck.rank_rng(0);
    const std::string tok = ck.tokenizer();
    int64_t bytes = 0;
    size_t attr_bytes = 0;
    const std::vector<TensorInfo> tensors = ck.tensors();
    for (const auto& info : tensors) {
      int64_t n = info.dtype == "float64" ? 8 : info.dtype == "uint8" ? 1 : 4;
      for (int64_t d : info.shape) n *= d;
      bytes += n;
    }
    for (const auto& [k, v] : ck.strings()) attr_bytes += k.size() + v.size();
    bytes += static_cast<int64_t>(tok.size()) + (rng.defined() ? rng.nbytes() : 0);
    WriteFile f(tmp, bytes + metadata_reserve(tensors.size() + ck.strings().size() + 8, attr_bytes), kUserBlock);
    write_string_attr(f, "format", kFormat);
    write_int_attr(f, "version", kVersion);
    write_int_attr(f, "step", ck.step());
    write_int_attr(f, "world_size", ck.world_size());
    write_int_attr(f, "consolidated", 1);
    for (const auto& [k, v] : ck.strings()) write_string_attr(f, k, v);
    for (int r = 0; r < ck.world_size() && !ck.consolidated(); ++r)
      write_string_attr(f, fmt::format("rank{}.loader_state", r), ck.rank_string(r, "loader_state"));
    for (const auto& info : tensors) {
      at::Tensor t = at::empty(info.shape, info.dtype == "float64" ? at::kDouble : info.dtype == "uint8" ? at::kByte : at::kFloat);
      ck.read(info.name, t);
      write_dataset(f, info.name, t);
      H5 ds(H5Dopen2(f, info.name.c_str(), H5P_DEFAULT), H5Dclose);
      write_int_attr(ds, "crc32", crc_of(t.data_ptr(), static_cast<size_t>(t.nbytes())));
    }
    if (rng.defined()) write_dataset(f, "rng/cpu", rng);
    if (!tok.empty())
      write_dataset(f, "tokenizer/model",
                    at::from_blob(const_cast<char*>(tok.data()), {static_cast<int64_t>(tok.size())}, at::kByte));
    f.close();
    // The CRC-32 of the bytes after the user block, written into it (checkpoint.h), then synced.
    const auto [size, crc] = checksum_file(tmp, /*sync=*/true, kUserBlock);
    std::string block = fmt::format("{}{:08x} {}\n", kUserBlockMagic, crc, size);
    block.resize(static_cast<size_t>(kUserBlock), '\0');
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open {}: {}", tmp, std::strerror(errno));
    const bool ok = ::pwrite(fd, block.data(), block.size(), 0) == static_cast<ssize_t>(block.size()) && ::fsync(fd) == 0;
    const int err = errno;
    ::close(fd);
    if (!ok) fail("writing {} failed: {}", tmp, std::strerror(err));
    rename_or_fail(tmp, out);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);  // no half-written file is left
    throw;
  }
  fsync_dir(fs::absolute(out).parent_path());
}

}  // namespace coil::dist
