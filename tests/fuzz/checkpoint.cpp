// Fuzz target: a checkpoint (dist/checkpoint.h) as `coil ckpt inspect/verify`, resuming and
// `coil generate` open it. Byte 0 picks the layout:
//   even: a checkpoint folder; bytes 1..4 are the index's length n and bytes 5..8 the checksum
//         line's length m (little-endian), the next n bytes are index.h5, the next m bytes
//         index.h5.crc32 (written even when empty) and the rest rank-00000-of-00001.h5;
//   odd:  a consolidated checkpoint, the rest of the bytes being the one .h5 file (its first 512
//         bytes the user block with its CRC-32).
// The checkpoint is opened, inspected (step, strings, files, tensors, sizes), verified, and then
// read whatever verify() said (a reader must survive a file that fails its checks): every tensor
// of up to 2^16 elements, whole and from its middle row on, the rank's strings and generator, the
// tokenizer.
// Every file's size and CRC-32 are checked before HDF5 opens it, because HDF5 1.10 crashes on some
// damaged files (docs/RELIABILITY.md, finding 7): what reaches HDF5 is bytes that Coil wrote. The
// layout of an older Coil, which recorded no checksum of the index (no index.h5.crc32; a
// consolidated file starting with HDF5's signature), is still read, unchecked, and so is not
// fuzzed: a folder always gets its index.h5.crc32, and a consolidated file without the user block
// is skipped.
#include <ATen/ATen.h>

#include <cstring>

#include "dist/checkpoint.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string path;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 1) {
    if (rest.substr(0, 8) == std::string_view("\x89HDF\r\n\x1a\n", 8)) return 0;  // an older Coil's: unchecked
    path = coil::fuzz::write_file("consolidated.h5", rest);
  } else {
    if (rest.size() < 8) return 0;
    uint32_t n = 0, m = 0;
    std::memcpy(&n, rest.data(), 4);
    std::memcpy(&m, rest.data() + 4, 4);
    std::string_view files = rest.substr(8);
    n = std::min<uint32_t>(n, files.size());
    coil::fuzz::write_file("index.h5", files.substr(0, n));
    files = files.substr(n);
    m = std::min<uint32_t>(m, files.size());
    coil::fuzz::write_file("index.h5.crc32", files.substr(0, m));
    coil::fuzz::write_file(coil::dist::rank_file_name(0, 1), files.substr(m));
    path = coil::fuzz::scratch_dir();
  }
  coil::fuzz::expect_coil_errors([&] {
    coil::dist::Checkpoint ck(path);
    (void)ck.step();
    (void)ck.world_size();
    for (const auto& [key, value] : ck.strings()) (void)ck.string(key);
    (void)ck.files();
    (void)ck.total_bytes();
    const auto tensors = ck.tensors();
    (void)ck.verify();
    for (int r = 0; r < std::min(ck.world_size(), 4); ++r) {
      coil::fuzz::expect_coil_errors([&] { ck.rank_string(r, "loader_state"); });
      coil::fuzz::expect_coil_errors([&] { ck.rank_rng(r); });
    }
    coil::fuzz::expect_coil_errors([&] { ck.tokenizer(); });
    for (const auto& t : tensors) {
      int64_t numel = 1;
      bool small = true;
      for (int64_t d : t.shape) {
        if (d < 0 || d > (1 << 16) || numel * d > (1 << 16)) small = false;
        if (!small) break;
        numel *= d;
      }
      if (!small) continue;
      COIL_FUZZ_ASSERT(ck.has(t.name), "a listed tensor is there");
      coil::fuzz::expect_coil_errors([&] { ck.read(t.name, at::zeros(t.shape, at::kFloat)); });
      if (!t.shape.empty() && t.shape[0] > 1) {
        std::vector<int64_t> half = t.shape;
        half[0] = t.shape[0] - t.shape[0] / 2;
        coil::fuzz::expect_coil_errors([&] { ck.read(t.name, at::zeros(half, at::kFloat), t.shape[0] / 2); });
      }
    }
  });
  return 0;
}
