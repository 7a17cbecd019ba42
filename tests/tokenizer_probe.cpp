// Encodes records with a Coil tokenizer (a sentencepiece .model or a tokenizer.json), for the
// parity test against PyPI's `tokenizers` (tests/python/test_tokenizer_json_parity.py) and the
// speed comparison (bench/tokenizer_vs_hf.py).
//
//   tokenizer_probe TOKENIZER RECORDS IDS [--specials]   ids of every record, and IDS.decoded
//   tokenizer_probe TOKENIZER RECORDS --bench            one timed pass, one thread: tokens/s
//
// RECORDS: records as (uint32 little-endian byte count, bytes). IDS: per record (uint32 count,
// int32 ids). IDS.decoded: decode(ids) of every record, as RECORDS.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "data/bpe.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace {

std::vector<std::string> read_records(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) coil::fail("cannot read {}", path);
  std::vector<std::string> out;
  uint32_t n = 0;
  while (in.read(reinterpret_cast<char*>(&n), 4)) {
    std::string s(n, '\0');
    if (!in.read(s.data(), n)) coil::fail("{}: truncated record", path);
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 4) {
      std::fprintf(stderr, "usage: tokenizer_probe TOKENIZER RECORDS (IDS [--specials] | --bench)\n");
      return 2;
    }
    const coil::data::Tokenizer tok(argv[1]);
    const std::vector<std::string> records = read_records(argv[2]);
    if (std::strcmp(argv[3], "--bench") == 0) {
      size_t bytes = 0, tokens = 0;
      std::vector<int32_t> ids;
      const auto t0 = std::chrono::steady_clock::now();
      for (const std::string& r : records) {
        ids.clear();
        tok.encode(r, ids);
        tokens += ids.size();
        bytes += r.size();
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("{\"tokens\": %zu, \"bytes\": %zu, \"seconds\": %.6f, \"tokens_per_s\": %.1f}\n", tokens, bytes, s,
                  tokens / s);
      return 0;
    }
    const bool specials = argc > 4 && std::strcmp(argv[4], "--specials") == 0;
    std::ofstream out(argv[3], std::ios::binary), dec(std::string(argv[3]) + ".decoded", std::ios::binary);
    for (size_t i = 0; i < records.size(); ++i) {
      const std::vector<int32_t> ids = specials ? tok.encode_with_specials(records[i]) : tok.encode(records[i]);
      const uint32_t n = static_cast<uint32_t>(ids.size());
      out.write(reinterpret_cast<const char*>(&n), 4);
      out.write(reinterpret_cast<const char*>(ids.data()), static_cast<std::streamsize>(4 * ids.size()));
      const std::string text = tok.decode(ids);
      const uint32_t m = static_cast<uint32_t>(text.size());
      dec.write(reinterpret_cast<const char*>(&m), 4);
      dec.write(text.data(), m);
    }
    std::printf("records %zu\n", records.size());
    return 0;
  } catch (const coil::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
