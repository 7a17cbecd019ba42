#include "launch/tensorboard.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "util/error.h"

namespace coil {

uint32_t crc32c(const void* data, size_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = ~0u;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

namespace {

uint32_t masked_crc(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

// Protobuf wire format: a key is (field << 3 | wire type); 0 varint, 1 fixed64, 2 bytes, 5 fixed32.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out += static_cast<char>((v & 0x7f) | 0x80), v >>= 7;
  out += static_cast<char>(v);
}
void bytes_field(std::string& out, int field, const std::string& b) {
  varint(out, static_cast<uint64_t>(field) << 3 | 2);
  varint(out, b.size());
  out += b;
}
template <typename T>
void fixed_field(std::string& out, int field, T v) {
  varint(out, static_cast<uint64_t>(field) << 3 | (sizeof(T) == 8 ? 1 : 5));
  char buf[sizeof(T)];
  std::memcpy(buf, &v, sizeof(T));  // little-endian, as protobuf wants
  out.append(buf, sizeof(T));
}

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  path_ = fmt::format("{}/events.out.tfevents.{}.{}.{}", dir, static_cast<int64_t>(wall_time()), host, getpid());
  f_ = std::fopen(path_.c_str(), "wb");
  if (!f_) fail("cannot write {}", path_);
  std::string event;
  fixed_field(event, 1, wall_time());
  bytes_field(event, 3, "brain.Event:2");  // file_version: the first event of every file
  write_record(event);
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::scalar(const std::string& tag, double value, int64_t step) {
  std::string v, summary, event;
  bytes_field(v, 1, tag);                              // Summary.Value.tag
  fixed_field(v, 2, static_cast<float>(value));        // Summary.Value.simple_value
  bytes_field(summary, 1, v);                          // Summary.value
  fixed_field(event, 1, wall_time());                  // Event.wall_time
  varint(event, 2 << 3 | 0), varint(event, static_cast<uint64_t>(step));  // Event.step
  bytes_field(event, 5, summary);                      // Event.summary
  write_record(event);
}

void TensorBoardWriter::write_record(const std::string& data) {
  const uint64_t len = data.size();
  const uint32_t len_crc = masked_crc(&len, sizeof len), data_crc = masked_crc(data.data(), data.size());
  std::fwrite(&len, sizeof len, 1, f_);
  std::fwrite(&len_crc, sizeof len_crc, 1, f_);
  std::fwrite(data.data(), 1, data.size(), f_);
  std::fwrite(&data_crc, sizeof data_crc, 1, f_);
}

void TensorBoardWriter::flush() { std::fflush(f_); }

}  // namespace coil
