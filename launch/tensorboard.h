// TensorBoard scalars without TensorFlow: an event file (events.out.tfevents.*) that TensorBoard,
// and tensorboard's EventAccumulator, read. Each record is a protobuf `Event` (wall_time, step,
// summary { value { tag, simple_value } }), framed as TFRecord: length, masked CRC-32C of the
// length, the bytes, masked CRC-32C of the bytes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace coil {

class TensorBoardWriter {
 public:
  // Opens a new event file in dir (created if missing).
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;
  void scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& bytes);
  std::string path_;
  FILE* f_ = nullptr;
};

// CRC-32C (Castagnoli), as TFRecord frames use it.
uint32_t crc32c(const void* data, size_t n);

}  // namespace coil
