// Fuzz target: the run configuration (launch/config.h), as `coil pretrain --config FILE --set ...`
// reads it. The bytes are a TOML file, then, after a line "%%", one `--set` override per line.
// A configuration that loads is written out (to_toml, as into the run directory) and parsed back
// (as from a checkpoint): it must parse, to the same TOML. The whole input is also given to
// RunConfig::parse, as a checkpoint's config string.
#include "launch/config.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::string toml = input;
  std::vector<std::string> overrides;
  if (size_t at = input.find("\n%%\n"); at != std::string::npos) {
    toml = input.substr(0, at + 1);
    size_t pos = at + 4;
    while (pos <= input.size()) {
      size_t end = input.find('\n', pos);
      if (end == std::string::npos) end = input.size();
      overrides.push_back(input.substr(pos, end - pos));
      pos = end + 1;
    }
  }
  const std::string path = coil::fuzz::write_file("run.toml", toml);
  coil::fuzz::expect_coil_errors([&] {
    coil::RunConfig config = coil::RunConfig::load(path, overrides);
    const std::string written = config.to_toml();
    std::string again;
    try {
      again = coil::RunConfig::parse(written, "config.toml").to_toml();
    } catch (const coil::Error& e) {
      std::fprintf(stderr, "the written configuration does not parse: %s\n%s", e.what(), written.c_str());
      std::abort();
    }
    COIL_FUZZ_ASSERT(again == written, "to_toml, parse and to_toml again give the same text");
  });
  coil::fuzz::expect_coil_errors([&] { coil::RunConfig::parse(input, "checkpoint config"); });
  return 0;
}
