// Coil's error type: every user-facing failure is one of these, with a one-line message that says
// what was wrong and where (file, tensor, key). The `coil` executable prints it and exits non-zero.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace coil {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A configuration error (a TOML file that does not parse, an unknown key, a value out of range):
// the `coil` executable exits with kConfigErrorExit for it, as for a command-line usage error, so
// that a launcher knows that starting the job again cannot help.
class ConfigError : public Error {
 public:
  using Error::Error;
};
inline constexpr int kConfigErrorExit = 2;

// fail("bad {} in {}", x, y): throw coil::Error with a formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace coil

// COIL_CHECK(cond, "message {}", arg): throw coil::Error when cond is false.
#define COIL_CHECK(cond, ...)          \
  do {                                 \
    if (!(cond)) ::coil::fail(__VA_ARGS__); \
  } while (0)
