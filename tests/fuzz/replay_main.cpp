// The fuzz targets without libFuzzer, for CI (ctest fuzz.<target>, the normal gcc build): feeds
// every file of a corpus folder to LLVMFuzzerTestOneInput, then, for a few seconds, cheap random
// mutations of the corpus entries (seeded: the same sequence of inputs on every run; how many get
// through depends on the machine's speed). Fails on any exception escaping the target (the
// targets catch coil::Error themselves); a crash or abort kills the process, and then the input
// that did it is written to ./<target>-crash.bin first.
//
//   fuzz_<target> <corpus folder> [--seconds S (3)] [--seed N (1)] [--max-len BYTES (65536)]
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::string g_name = "fuzz";
const std::string* g_current = nullptr;

void on_fatal(int sig) {
  if (g_current) {
    const std::string file = g_name + "-crash.bin";
    if (FILE* f = std::fopen(file.c_str(), "wb")) {
      std::fwrite(g_current->data(), 1, g_current->size(), f);
      std::fclose(f);
      std::fprintf(stderr, "%s: signal %d; the input is in %s\n", g_name.c_str(), sig, file.c_str());
    }
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

// One or a few of libFuzzer's simplest mutations, chosen at random.
void mutate(std::string& s, const std::vector<std::string>& corpus, std::mt19937_64& rng, size_t max_len) {
  auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  static const char* kInteresting[] = {"0", "-1", "1e999", "\"", "\\u0000", "\\ud800", "[", "{", "}", "]", ",",
                                       "\xff", "\x80", "\xc3", "\n", "=", "\"\"\"", "9223372036854775807",
                                       "18446744073709551616", "nan", "inf", "null", "true"};
  const int n = 1 + static_cast<int>(rng() % 4);
  for (int k = 0; k < n; ++k) {
    switch (rng() % 9) {
      case 0:  // flip a bit
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:  // a random byte
        if (!s.empty()) s[pick(s.size())] = static_cast<char>(rng());
        break;
      case 2:  // insert a random byte
        s.insert(s.begin() + static_cast<std::ptrdiff_t>(pick(s.size() + 1)), static_cast<char>(rng()));
        break;
      case 3: {  // erase a range
        if (s.empty()) break;
        size_t at = pick(s.size()), len = 1 + pick(std::min<size_t>(16, s.size() - at));
        s.erase(at, len);
        break;
      }
      case 4: {  // duplicate a range
        if (s.empty()) break;
        size_t at = pick(s.size()), len = 1 + pick(std::min<size_t>(64, s.size() - at));
        s.insert(pick(s.size() + 1), s.substr(at, len));
        break;
      }
      case 5:  // an interesting token
        s.insert(pick(s.size() + 1), kInteresting[pick(std::size(kInteresting))]);
        break;
      case 6:  // truncate
        s.resize(pick(s.size() + 1));
        break;
      case 7: {  // splice with another entry
        const std::string& o = corpus[pick(corpus.size())];
        if (o.empty()) break;
        size_t at = pick(o.size());
        s = s.substr(0, pick(s.size() + 1)) + o.substr(at);
        break;
      }
      case 8: {  // overwrite a little-endian integer with an extreme value
        if (s.size() < 8) break;
        const uint64_t values[] = {0, ~uint64_t{0}, uint64_t{1} << 63, 0x7fffffff, 0x80000000, 0xffffffff};
        uint64_t v = values[pick(std::size(values))];
        std::memcpy(&s[pick(s.size() - 7)], &v, rng() % 2 ? 8 : 4);
        break;
      }
    }
  }
  if (s.size() > max_len) s.resize(max_len);
}

}  // namespace

int main(int argc, char** argv) {
  g_name = std::filesystem::path(argv[0]).filename().string();
  std::string dir;
  double seconds = 3;
  uint64_t seed = 1;
  size_t max_len = 65536;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--max-len" && i + 1 < argc) max_len = std::strtoull(argv[++i], nullptr, 10);
    else if (dir.empty() && a.rfind("--", 0) != 0) dir = a;
    else {
      std::fprintf(stderr, "usage: %s <corpus folder> [--seconds S] [--seed N] [--max-len BYTES]\n", argv[0]);
      return 2;
    }
  }
  if (dir.empty() || !std::filesystem::is_directory(dir)) {
    std::fprintf(stderr, "%s: not a corpus folder: '%s'\n", g_name.c_str(), dir.c_str());
    return 2;
  }
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "%s: %s holds no files\n", g_name.c_str(), dir.c_str());
    return 2;
  }
  std::vector<std::string> corpus;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    corpus.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) signal(sig, on_fatal);

  std::string what;
  auto run = [&](const std::string& input) {
    g_current = &input;
    try {
      LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
      what = "an exception that is not a std::exception";
    }
    g_current = nullptr;
    return what.empty();
  };
  for (size_t i = 0; i < corpus.size(); ++i)
    if (!run(corpus[i])) {
      std::fprintf(stderr, "%s: %s: exception escaped: %s\n", g_name.c_str(), files[i].c_str(), what.c_str());
      return 1;
    }

  std::mt19937_64 rng(seed);
  const auto start = std::chrono::steady_clock::now();
  int64_t mutations = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    size_t base = static_cast<size_t>(rng() % corpus.size());
    std::string input = corpus[base];
    mutate(input, corpus, rng, max_len);
    ++mutations;
    if (!run(input)) {
      const std::string file = g_name + "-failure.bin";
      std::ofstream(file, std::ios::binary).write(input.data(), static_cast<std::streamsize>(input.size()));
      std::fprintf(stderr, "%s: mutation %lld of %s (seed %llu): exception escaped: %s (input written to %s)\n",
                   g_name.c_str(), static_cast<long long>(mutations), files[base].c_str(),
                   static_cast<unsigned long long>(seed), what.c_str(), file.c_str());
      return 1;
    }
  }
  std::printf("%s: %zu corpus files and %lld mutations of them in %.1f s: no exception escaped, no crash\n",
              g_name.c_str(), corpus.size(), static_cast<long long>(mutations), seconds);
  return 0;
}
