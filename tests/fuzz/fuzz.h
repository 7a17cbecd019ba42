// Shared by the fuzz targets (tests/fuzz/*.cpp): each defines LLVMFuzzerTestOneInput, drives one of
// Coil's parsers through its public entry points, and treats coil::Error as the expected answer to
// bad bytes. Anything else is a finding: a crash or sanitizer report, an abort, another exception
// escaping, a hang, a leak.
//
// The same sources build two ways (tests/fuzz/CMakeLists.txt): with clang and -fsanitize=fuzzer for
// libFuzzer (scripts/fuzz), and with the normal build and replay_main.cpp, which feeds the corpus
// and a few seconds of seeded mutations of it (ctest fuzz.<target>).
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "util/error.h"

namespace coil::fuzz {

inline std::string scratch_path() { return "/dev/shm/coil-fuzz-" + std::to_string(getpid()); }

// Removes the files of scratch_dir() (plain files only: the targets write nothing else) and it.
inline void remove_scratch() {
  const std::string d = scratch_path();
  if (DIR* dir = ::opendir(d.c_str())) {
    while (dirent* e = ::readdir(dir))
      if (e->d_type == DT_REG) ::unlink((d + "/" + e->d_name).c_str());
    ::closedir(dir);
  }
  ::rmdir(d.c_str());
}

// A per-process folder for the files a target reads (in /dev/shm: memory, not disk), removed at exit.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string d = scratch_path();
    ::mkdir(d.c_str(), 0700);
    std::atexit(remove_scratch);
    return d;
  }();
  return dir;
}

// Writes `bytes` to scratch_dir()/name (a new inode each time: unlinked first) and returns its path.
inline std::string write_file(const std::string& name, std::string_view bytes) {
  const std::string path = scratch_dir() + "/" + name;
  ::unlink(path.c_str());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) std::abort();
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return path;
}

inline void remove_file(const std::string& name) { ::unlink((scratch_dir() + "/" + name).c_str()); }

// Runs fn; a coil::Error (the one-line message a user sees) is the expected outcome of bad bytes.
template <typename F>
void expect_coil_errors(F&& fn) {
  try {
    fn();
  } catch (const coil::Error&) {
  }
}

// A property that must hold for every input (e.g. a round trip): prints and aborts otherwise.
#define COIL_FUZZ_ASSERT(cond, what)                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "coil fuzz: property failed: %s (%s)\n", what, #cond); \
      std::abort();                                                               \
    }                                                                             \
  } while (0)

}  // namespace coil::fuzz
