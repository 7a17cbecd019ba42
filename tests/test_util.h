// Helpers that several C++ test files share (test_data.cpp, test_parquet.cpp, test_train.cpp): a
// fresh folder per test, whole files written and read back as bytes, and the message of the
// coil::Error that a call throws. Only what is the same in several files lives here; a file's own
// fixtures (corpora, tokenizers, checkpoints) stay in that file.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>

#include "util/error.h"

namespace coil::test {

// A fresh folder for the running test (named after it and this process), removed at its end.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            fmt::format("coil-test-{}-{}-{}", info->test_suite_name(), info->name(), getpid());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The message of the coil::Error that f throws, "no error" when it throws none (any other exception
// goes on, and fails the test).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const coil::Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace coil::test
