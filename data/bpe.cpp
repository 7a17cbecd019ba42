#include "data/bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <tuple>
#include <unordered_map>

#include "util/error.h"

namespace coil::data {

using json = nlohmann::json;

bool replace_invalid_utf8(std::string_view s, std::string& out) {
  // Fast path: find the first invalid byte, if any.
  auto seq_len = [&](size_t i) -> size_t {  // length of the valid sequence at i, 0 when invalid
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) return 1;
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    for (size_t k = 1; k <= need; ++k) {
      if (i + k >= s.size()) return 0;
      const auto d = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return 0;
    }
    return need + 1;
  };
  size_t i = 0;
  while (i < s.size()) {
    size_t n = seq_len(i);
    if (n == 0) break;
    i += n;
  }
  if (i == s.size()) return false;
  out.assign(s.data(), i);
  while (i < s.size()) {
    size_t n = seq_len(i);
    if (n) {
      out.append(s.data() + i, n);
      i += n;
      continue;
    }
    // The maximal subpart: a lead byte followed by the continuation bytes it allows.
    const auto c = static_cast<unsigned char>(s[i]);
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    size_t k = 1;
    for (; k <= need && i + k < s.size(); ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) break;
    }
    out += "\xEF\xBF\xBD";
    i += k;
  }
  return true;
}

namespace {

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n.
struct ByteMap {
  std::string utf8[256];                        // byte -> the UTF-8 of its code point
  std::unordered_map<uint32_t, uint8_t> byte;   // code point -> byte
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      utf8_encode(cp, utf8[b]);
      byte[cp] = static_cast<uint8_t>(b);
    }
  }
  static void utf8_encode(uint32_t cp, std::string& out) {
    utf8proc_uint8_t buf[4];
    out.assign(reinterpret_cast<char*>(buf), static_cast<size_t>(utf8proc_encode_char(static_cast<int32_t>(cp), buf)));
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// Decodes the code points of valid UTF-8; false at the first invalid one.
template <typename F>
bool for_each_cp(std::string_view s, F f) {
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
  while (left > 0) {
    utf8proc_int32_t cp;
    const utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
    if (n <= 0) return false;
    f(static_cast<uint32_t>(cp));
    p += n;
    left -= n;
  }
  return true;
}

// A compiled PCRE2 pattern (UTF, UCP, JIT) and the per-thread state that matching needs.
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE at = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("{}: regex does not compile at offset {}: {}", where, at, reinterpret_cast<char*>(msg));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The matches in s, as the Rust onig crate's find_iter gives them: after an empty match the
  // search moves one character on, and an empty match right at the end of the previous match is
  // skipped. f(start, end) for each.
  template <typename F>
  void find_iter(std::string_view s, F f) const {
    State& st = state();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t pos = 0;
    bool have_last = false;
    size_t last_end = 0;
    while (pos <= s.size()) {
      const int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), pos, 0, st.md, st.mctx)
                          : pcre2_match(code_, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, st.md, st.mctx);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        fail("tokenizer regex: matching failed: {}", reinterpret_cast<char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md);
      const size_t b = ov[0], e = ov[1];
      if (b == e && have_last && last_end == e) {
        pos = next_char(s, pos);
        continue;
      }
      pos = b == e ? next_char(s, e) : e;
      have_last = true;
      last_end = e;
      f(b, e);
    }
  }

 private:
  static size_t next_char(std::string_view s, size_t i) {
    if (i >= s.size()) return s.size() + 1;
    ++i;
    while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) ++i;
    return i;
  }
  struct State {
    pcre2_match_data* md = pcre2_match_data_create(8, nullptr);
    pcre2_match_context* mctx = pcre2_match_context_create(nullptr);
    pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
    State() { pcre2_jit_stack_assign(mctx, nullptr, stack); }
    ~State() {
      pcre2_jit_stack_free(stack);
      pcre2_match_context_free(mctx);
      pcre2_match_data_free(md);
    }
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// Oniguruma's \s (which `tokenizers` runs) is Unicode's White_Space: PCRE2's \s with UCP leaves
// out U+0085 and takes U+180E (a space before Unicode 6.3), so Coil spells the class out.
std::string onig_compatible(const std::string& p, const std::string& where) {
  static const std::string kSpace =
      R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[++i];
      if (n == 's') out += in_class ? kSpace : "[" + kSpace + "]";
      else if (n == 'S' && !in_class) out += "[^" + kSpace + "]";
      else if (n == 'S') fail("{}: \\S inside a character class is not implemented", where);
      else out += c, out += n;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // a leading ] is literal
      continue;
    }
    if (in_class && c == '[') fail("{}: nested character classes are not implemented", where);
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

std::string escape_literal(const std::string& s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u)) out += '\\';
    out += c;
  }
  return out;
}

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

enum class Prepend { Always, First, Never };  // Metaspace's prepend_scheme

struct PreStep {
  bool byte_level = false;
  bool add_prefix_space = false;
  bool metaspace = false;       // Metaspace: ' ' -> replacement, then the prepend scheme
  std::string replacement;      // Metaspace's (one character, e.g. U+2581)
  Prepend prepend = Prepend::Always;
  std::unique_ptr<Regex> regex;  // ByteLevel with use_regex, Split, or Metaspace with split
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
};

// The length of the UTF-8 sequence that starts with lead byte c (valid input).
inline size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

// The base64 of JSON files (the standard alphabet, '=' padding); nullopt on anything else.
std::optional<std::string> base64_decode(std::string_view s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
  };
  if (s.size() % 4 != 0) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < s.size(); i += 4) {
    const size_t pad = i + 4 == s.size() ? (s[i + 3] == '=') + (s[i + 2] == '=' && s[i + 3] == '=') : 0;
    uint32_t v = 0;
    for (size_t k = 0; k < 4; ++k) {
      const int d = k >= 4 - pad ? 0 : value(s[i + k]);
      if (d < 0) return std::nullopt;
      v = v << 6 | static_cast<uint32_t>(d);
    }
    for (size_t k = 0; k < 3 - pad; ++k) out += static_cast<char>(v >> (16 - 8 * k) & 0xFF);
  }
  return out;
}

// sentencepiece's precompiled normalization (the normalizer Precompiled of files converted from a
// sentencepiece model), as `tokenizers` runs it: the charsmap is a darts-clone double-array trie
// (a u32 byte size, then its u32 units) from UTF-8 sequences to offsets of NUL-terminated
// replacements (the rest of the blob). Each extended grapheme cluster shorter than 6 bytes is
// looked up whole, and replaced by the value of the *shortest* prefix of it that the trie has (so
// a cluster whose first character has a rule becomes that rule's text: `tokenizers`' and
// sentencepiece's way); else each of its characters alone.
class CharsMap {
 public:
  CharsMap(std::string_view blob, const std::string& where) {
    uint32_t size = 0;
    if (blob.size() >= 4) std::memcpy(&size, blob.data(), 4);  // little-endian, as the hosts Coil runs on
    if (blob.size() < 4 || size % 4 != 0 || size == 0 || size > blob.size() - 4)
      fail("{}: the precompiled_charsmap is not a sentencepiece charsmap ({} bytes, a trie of {})", where, blob.size(), size);
    units_.resize(size / 4);
    std::memcpy(units_.data(), blob.data() + 4, size);
    normalized_.assign(blob.substr(4 + size));
    std::string fixed;
    if (replace_invalid_utf8(normalized_, fixed)) fail("{}: the precompiled_charsmap's replacements are not UTF-8", where);
  }

  void normalize(std::string_view s, std::string& out) const {
    out.clear();
    size_t begin = 0;
    utf8proc_int32_t prev = -1, state = 0;
    auto cluster = [&](std::string_view g) {
      if (g.size() < 6)
        if (const auto r = transform(g)) return void(out.append(*r));
      for (size_t i = 0; i < g.size();) {
        const size_t n = std::min(utf8_len(static_cast<unsigned char>(g[i])), g.size() - i);
        const auto r = transform(g.substr(i, n));
        out.append(r ? *r : g.substr(i, n));
        i += n;
      }
    };
    for (size_t i = 0; i < s.size();) {
      utf8proc_int32_t cp = 0;
      const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                      static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
      if (n <= 0) fail("Precompiled: invalid UTF-8");  // encode() made the text valid first
      if (prev >= 0 && utf8proc_grapheme_break_stateful(prev, cp, &state)) cluster(s.substr(begin, i - begin)), begin = i;
      prev = cp;
      i += static_cast<size_t>(n);
    }
    if (begin < s.size()) cluster(s.substr(begin));
  }

 private:
  static bool has_leaf(uint32_t u) { return (u >> 8) & 1; }
  static uint32_t value(uint32_t u) { return u & ((1u << 31) - 1); }
  static uint32_t label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
  static size_t offset(uint32_t u) { return static_cast<size_t>((u >> 10) << ((u & (1u << 9)) >> 6)); }

  // The replacement of the shortest prefix of key the trie has (a walk that leaves the units, where
  // `tokenizers` would panic, finds nothing).
  std::optional<std::string_view> transform(std::string_view key) const {
    size_t pos = offset(units_[0]);
    for (char ch : key) {
      const auto c = static_cast<unsigned char>(ch);
      if (c == 0) break;
      pos ^= c;
      if (pos >= units_.size() || label(units_[pos]) != c) return std::nullopt;
      const bool leaf = has_leaf(units_[pos]);
      pos ^= offset(units_[pos]);
      if (!leaf) continue;
      if (pos >= units_.size()) return std::nullopt;
      const size_t at = value(units_[pos]);
      if (at > normalized_.size()) return std::nullopt;
      const size_t end = normalized_.find('\0', at);
      return std::string_view(normalized_).substr(at, (end == std::string::npos ? normalized_.size() : end) - at);
    }
    return std::nullopt;
  }

  std::vector<uint32_t> units_;
  std::string normalized_;
};

// A normalizer step, in order: a Unicode normalization form, Prepend, Replace (a string or a
// regex), Nmt or Precompiled.
struct NormStep {
  int unicode = 0;      // utf8proc options; 0 for the others
  std::string a, b;     // Prepend: a; Replace: a (or regex's matches) -> b
  bool prepend = false;
  bool nmt = false;
  std::unique_ptr<Regex> regex;       // Replace with a Regex pattern
  std::unique_ptr<CharsMap> charsmap;  // Precompiled
};

// tokenizers' Nmt normalizer: drops the control characters U+0001-U+0008, U+000B, U+000E-U+001F,
// U+007F, U+008F and U+009F, and makes ' ' of tab, line feed, form feed, carriage return, U+1680,
// U+200B-U+200F, U+2028, U+2029, U+2581, U+FEFF and U+FFFD.
void nmt(std::string_view s, std::string& out) {
  out.clear();
  for_each_cp(s, [&](uint32_t c) {
    if ((c >= 0x01 && c <= 0x08) || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || c == 0x8F || c == 0x9F) return;
    if (c == 0x09 || c == 0x0A || c == 0x0C || c == 0x0D || c == 0x1680 || (c >= 0x200B && c <= 0x200F) || c == 0x2028 ||
        c == 0x2029 || c == 0x2581 || c == 0xFEFF || c == 0xFFFD)
      c = ' ';
    utf8proc_uint8_t buf[4];
    out.append(reinterpret_cast<char*>(buf), static_cast<size_t>(utf8proc_encode_char(static_cast<utf8proc_int32_t>(c), buf)));
  });
}

// Every match of re in s (tokenizers' find_matches: empty ones too) replaced by `to`.
void replace_matches(std::string_view s, const Regex& re, std::string_view to, std::string& out) {
  out.clear();
  size_t prev = 0;
  re.find_iter(s, [&](size_t b, size_t e) {
    out.append(s.data() + prev, b - prev);
    out.append(to);
    prev = e;
  });
  out.append(s.data() + prev, s.size() - prev);
}

// Decoders of character-level BPE (no ByteLevel): tokenizers' Replace (a string), ByteFallback,
// Fuse, Strip and Metaspace, applied in order to the list of tokens, then joined.
struct DecodeStep {
  enum Kind { Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  explicit DecodeStep(Kind k, std::string a_ = "", std::string b_ = "") : kind(k), a(std::move(a_)), b(std::move(b_)) {}
  std::string a, b;     // Replace: a -> b; Strip: the character a; Metaspace: the replacement a
  int64_t start = 0, stop = 0;  // Strip
  bool drop_first = false;      // Metaspace: the first token's replacements vanish (prepend scheme not never)
};

void replace_all(std::string_view s, std::string_view from, std::string_view to, std::string& out) {
  out.clear();
  size_t i = 0;
  for (size_t at = s.find(from); at != std::string_view::npos; at = s.find(from, i)) {
    out.append(s.data() + i, at - i);
    out.append(to);
    i = at + from.size();
  }
  out.append(s.data() + i, s.size() - i);
}

inline bool one_char(const std::string& s) { return !s.empty() && utf8_len(static_cast<unsigned char>(s[0])) == s.size(); }

constexpr std::string_view kMetaSpace = "\xe2\x96\x81";  // U+2581, sentencepiece's space
inline bool starts_meta(std::string_view t) { return t.substr(0, kMetaSpace.size()) == kMetaSpace; }
inline bool ends_meta(std::string_view t) {
  return t.size() >= kMetaSpace.size() && t.substr(t.size() - kMetaSpace.size()) == kMetaSpace;
}

// A byte trie of the added tokens, for leftmost-longest matching.
struct Trie {
  struct Node {
    std::unordered_map<unsigned char, int> next;
    int token = -1;  // index into the added tokens
  };
  std::vector<Node> nodes{1};
  bool first[256] = {};
  bool empty() const { return nodes.size() == 1; }
  void add(std::string_view s, int token) {
    int n = 0;
    for (char ch : s) {
      const auto c = static_cast<unsigned char>(ch);
      auto it = nodes[n].next.find(c);
      if (it == nodes[n].next.end()) {
        nodes.emplace_back();
        const int k = static_cast<int>(nodes.size()) - 1;
        nodes[n].next[c] = k;
        n = k;
      } else {
        n = it->second;
      }
    }
    nodes[n].token = token;
    first[static_cast<unsigned char>(s[0])] = true;
  }
  // The leftmost-longest match at or after `from`: (start, end, token), or token -1.
  void find(std::string_view s, size_t from, size_t& start, size_t& end, int& token) const {
    for (size_t i = from; i < s.size(); ++i) {
      if (!first[static_cast<unsigned char>(s[i])]) continue;
      int n = 0, best = -1;
      size_t best_end = 0;
      for (size_t j = i; j < s.size(); ++j) {
        auto it = nodes[n].next.find(static_cast<unsigned char>(s[j]));
        if (it == nodes[n].next.end()) break;
        n = it->second;
        if (nodes[n].token >= 0) best = nodes[n].token, best_end = j + 1;
      }
      if (best >= 0) {
        start = i, end = best_end, token = best;
        return;
      }
    }
    token = -1;
  }
};

// The per-thread word cache (pre-tokenized word -> ids), as `tokenizers` keeps one: open addressing
// over flat arenas, so that a hit costs one hash and about one cache miss.
class WordCache {
 public:
  // The ids of w, or nullptr; n gets their count.
  const int32_t* find(std::string_view w, uint64_t h, size_t& n) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key_len == kEmpty) return nullptr;
      if (s.hash == h && s.key_len == w.size() && std::memcmp(keys_.data() + s.key_off, w.data(), w.size()) == 0) {
        n = s.ids_len;
        return ids_.data() + s.ids_off;
      }
    }
  }
  void insert(std::string_view w, uint64_t h, const int32_t* ids, size_t n) {
    if (keys_.size() + w.size() > (1u << 30) || ids_.size() + n > (1u << 30)) clear();
    if ((count_ + 1) * 2 > slots_.size()) {
      if (slots_.size() >= kMaxSlots) clear();
      grow();
    }
    size_t i = h & mask_;
    while (slots_[i].key_len != kEmpty) i = (i + 1) & mask_;
    slots_[i] = {h, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(w.size()),
                 static_cast<uint32_t>(ids_.size()), static_cast<uint32_t>(n)};
    keys_.append(w);
    ids_.insert(ids_.end(), ids, ids + n);
    ++count_;
  }
  void clear() { slots_.clear(), keys_.clear(), ids_.clear(), count_ = 0; }

 private:
  static constexpr uint32_t kEmpty = ~uint32_t{0};
  static constexpr size_t kMaxSlots = size_t{1} << 20;  // at most half full: ~500k words, then it starts again
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = kEmpty, ids_off = 0, ids_len = 0;
  };
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 4096 : old.size() * 2, Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.key_len == kEmpty) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].key_len != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t mask_ = 0, count_ = 0;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool single_word, lstrip, rstrip, normalized, special;
};

std::atomic<uint64_t> g_serial{1};

// The merges: (left id, right id) -> (rank, merged id), in an open-addressing table (the merge
// loop's one hot lookup; std::unordered_map's modulo and node hops cost twice as much).
class MergeTable {
 public:
  struct Merge {
    int32_t rank, new_id;
  };
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  // Keeps the first (lowest-rank) entry of a pair listed twice, as tokenizers does.
  void insert(int32_t a, int32_t b, Merge m) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    Slot& s = find_slot(key(a, b));
    if (s.key != kEmpty) return;
    s = {key(a, b), m};
    ++size_;
  }
  const Merge* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    const Slot& s = const_cast<MergeTable*>(this)->find_slot(key(a, b));
    return s.key == kEmpty ? nullptr : &s.merge;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmpty;
    Merge merge{0, 0};
  };
  Slot& find_slot(uint64_t k) {
    const size_t mask = slots_.size() - 1;
    size_t i = static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_) & mask;
    while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask;
    return slots_[i];
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    const size_t n = old.empty() ? 1024 : old.size() * 2;
    slots_.assign(n, Slot{});
    shift_ = 64;
    for (size_t x = n; x > 1; x >>= 1) --shift_;
    for (const Slot& s : old)
      if (s.key != kEmpty) find_slot(s.key) = s;
  }
  std::vector<Slot> slots_;
  size_t size_ = 0;
  int shift_ = 64;
};

// A JSON number as serde_json reads it without its float_roundtrip feature (as `tokenizers` is
// built): the digits into a u64 (those that do not fit dropped), then one multiplication or
// division by a power of ten, so that a 17-digit score can land an ulp from the nearest double.
// A Unigram model's best path is often a tie between sums of the same scores in other orders, and
// an ulp decides it: Coil reads the scores as `tokenizers` does to take the same path. nullopt
// where serde_json refuses the number.
std::optional<double> serde_json_f64(std::string_view s) {
  static const std::vector<double> pow10 = [] {
    std::vector<double> p;
    for (int k = 0; k <= 308; ++k) p.push_back(std::strtod(fmt::format("1e{}", k).c_str(), nullptr));
    return p;
  }();
  constexpr uint64_t kMax = ~uint64_t{0};
  auto overflows = [](uint64_t a, uint64_t d) { return a >= kMax / 10 && (a > kMax / 10 || d > kMax % 10); };
  auto digit = [&](size_t i) { return i < s.size() && s[i] >= '0' && s[i] <= '9'; };
  size_t i = 0;
  const bool negative = i < s.size() && s[i] == '-';
  i += negative;
  uint64_t significand = 0;
  int64_t exponent = 0;
  for (bool full = false; digit(i); ++i) {  // past the u64, each digit only scales
    const uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (full || overflows(significand, d)) full = true, ++exponent;
    else significand = significand * 10 + d;
  }
  if (i < s.size() && s[i] == '.') {
    for (++i; digit(i); ++i) {
      const uint64_t d = static_cast<uint64_t>(s[i] - '0');
      if (overflows(significand, d)) {
        while (digit(i)) ++i;  // the rest of the fraction is ignored
        break;
      }
      significand = significand * 10 + d, --exponent;
    }
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    const bool minus = i < s.size() && s[i] == '-';
    i += i < s.size() && (s[i] == '-' || s[i] == '+');
    int64_t e = 0;
    for (; digit(i); ++i) {
      e = e * 10 + (s[i] - '0');
      if (e > (int64_t{1} << 31)) {  // serde_json: 0 for a tiny number, an error for a huge one
        if (minus || significand == 0) return negative ? -0.0 : 0.0;
        return std::nullopt;
      }
    }
    exponent += minus ? -e : e;
  }
  double f = static_cast<double>(significand);
  while (true) {
    const uint64_t a = static_cast<uint64_t>(exponent < 0 ? -exponent : exponent);
    if (a < pow10.size()) {
      f = exponent >= 0 ? f * pow10[a] : f / pow10[a];
      break;
    }
    if (f == 0.0) break;
    if (exponent >= 0) return std::nullopt;
    f /= 1e308;
    exponent += 308;
  }
  if (!std::isfinite(f)) return std::nullopt;
  return negative ? -f : f;
}

// The text of each model.vocab[i][1] of a tokenizer.json that is a JSON float, by i (nlohmann's
// DOM keeps only the nearest double).
std::vector<std::string> unigram_score_texts(std::string_view text) {
  struct Sax : nlohmann::json_sax<json> {
    struct Frame {
      bool array = false;
      std::string key;
      int64_t index = -1;  // an array's current element
    };
    std::vector<Frame> stack;
    std::vector<std::string> out;
    void value() {
      if (!stack.empty() && stack.back().array) ++stack.back().index;
    }
    bool null() override { return value(), true; }
    bool boolean(bool) override { return value(), true; }
    bool number_integer(number_integer_t) override { return value(), true; }
    bool number_unsigned(number_unsigned_t) override { return value(), true; }
    bool number_float(number_float_t, const string_t& raw) override {
      value();
      if (stack.size() == 4 && stack[0].key == "model" && stack[1].key == "vocab" && stack[2].array &&
          stack[3].array && stack[3].index == 1) {
        const auto at = static_cast<size_t>(stack[2].index);
        if (out.size() <= at) out.resize(at + 1);
        out[at] = raw;
      }
      return true;
    }
    bool string(string_t&) override { return value(), true; }
    bool binary(binary_t&) override { return value(), true; }
    bool start_object(std::size_t) override { return value(), stack.push_back({false, "", -1}), true; }
    bool key(string_t& k) override { return stack.back().key = k, true; }
    bool end_object() override { return stack.pop_back(), true; }
    bool start_array(std::size_t) override { return value(), stack.push_back({true, "", -1}), true; }
    bool end_array() override { return stack.pop_back(), true; }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }
  } sax;
  json::sax_parse(text.begin(), text.end(), &sax);
  return sax.out;
}

// A Unigram model's pieces as a byte trie: node 0 is the root, each edge (node, byte) -> child is
// in one open-addressing table, and a node knows the id of the piece that ends there (-1: none).
class PieceTrie {
 public:
  void add(std::string_view piece, int32_t id) {
    int32_t n = 0;
    for (char ch : piece) {
      const int32_t b = static_cast<unsigned char>(ch);
      if (const MergeTable::Merge* e = edges_.find(n, b)) {
        n = e->new_id;
      } else {
        const auto child = static_cast<int32_t>(id_.size());
        id_.push_back(-1);
        edges_.insert(n, b, {0, child});
        n = child;
      }
    }
    id_[static_cast<size_t>(n)] = id;  // a piece listed twice: the later id, as tokenizers' map has it
  }
  // f(end, id) for each piece that s[from..] starts with, shortest first.
  template <typename F>
  void prefixes(std::string_view s, size_t from, F f) const {
    int32_t n = 0;
    for (size_t i = from; i < s.size(); ++i) {
      const MergeTable::Merge* e = edges_.find(n, static_cast<unsigned char>(s[i]));
      if (!e) return;
      n = e->new_id;
      if (id_[static_cast<size_t>(n)] >= 0) f(i + 1, id_[static_cast<size_t>(n)]);
    }
  }

 private:
  MergeTable edges_;  // (node, byte) -> (unused, child)
  std::vector<int32_t> id_{-1};
};

}  // namespace

struct BpeTokenizer::Impl {
  std::string origin;
  uint64_t serial = g_serial++;
  // Model.
  std::unordered_map<std::string, int32_t> vocab;      // as the file writes the tokens
  std::unordered_map<std::string, int32_t> raw_vocab;  // the same tokens as bytes (ignore_merges)
  std::vector<std::string> id_to_token;                // vocabulary and added tokens
  std::vector<std::string> id_to_bytes;                // what the ByteLevel decoder makes of each
  std::vector<uint8_t> is_special, assigned;
  int32_t byte_id[256];      // byte-level: the id of each byte's character
  // Character-level BPE (no ByteLevel pre-tokenizer: Llama-2, Mistral, Gemma style): the ids of the
  // vocabulary's single characters, and byte_fallback's <0xXX> tokens.
  bool byte_level = false;
  int32_t ascii_id[128];
  std::unordered_map<uint32_t, int32_t> char_id;  // non-ASCII code point -> id
  int32_t fallback_id[256];
  MergeTable merges;
  int32_t unk = -1;
  bool fuse_unk = false, ignore_merges = false, byte_fallback = false;
  bool merge_joins_meta = false;  // a merge (a, b) with b starting with U+2581 and a not ending with it
  // A Unigram model instead (model.type "Unigram"): each piece's score, the trie of the pieces,
  // and the score of an unknown character (the lowest score - 10, as tokenizers has it).
  bool unigram = false;
  std::vector<double> scores;
  PieceTrie pieces;
  double unk_score = 0;
  // Pipeline.
  std::vector<AddedToken> added;
  Trie raw_trie, norm_trie;
  std::vector<NormStep> normalizers;  // applied in order
  std::vector<PreStep> steps;
  bool decoder_byte_level = false;
  std::vector<DecodeStep> decoders;  // character-level BPE's
  bool split_at_meta = false;        // bpe_word's cut before U+2581 (character-level only)
  std::vector<int32_t> prefix, suffix;  // the post-processor's single template
  int32_t bos = -1, eos = -1, pad = -1;
  std::unique_ptr<Regex> white_space, word_char;  // Rust regex's \s and \w (single_word, lstrip, rstrip)

  void normalize(std::string_view s, std::string& out) const {
    out.assign(s);
    thread_local std::string tmp;
    for (const NormStep& n : normalizers) {
      if (n.prepend) {
        if (!out.empty()) out.insert(0, n.a);  // tokenizers' Prepend leaves an empty string empty
        continue;
      }
      if (n.nmt || n.regex || n.charsmap || !n.unicode) {
        if (n.nmt) nmt(out, tmp);
        else if (n.charsmap) n.charsmap->normalize(out, tmp);
        else if (n.regex) replace_matches(out, *n.regex, n.b, tmp);
        else replace_all(out, n.a, n.b, tmp);
        std::swap(out, tmp);
        continue;
      }
      bool ascii = true;
      for (char c : out) ascii &= static_cast<unsigned char>(c) < 0x80;
      if (ascii) continue;  // every normalization form leaves ASCII as it is
      utf8proc_uint8_t* dst = nullptr;
      const utf8proc_ssize_t k = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(out.data()),
                                              static_cast<utf8proc_ssize_t>(out.size()), &dst,
                                              static_cast<utf8proc_option_t>(n.unicode));
      if (k < 0) fail("{}: normalization failed: {}", origin, utf8proc_errmsg(k));
      out.assign(reinterpret_cast<char*>(dst), static_cast<size_t>(k));
      std::free(dst);
    }
  }

  bool char_is(const Regex& re, std::string_view s, bool last) const {
    if (s.empty()) return false;
    size_t b = 0;
    if (last) {
      b = s.size() - 1;
      while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
    } else {
      size_t e = 1;
      while (e < s.size() && (static_cast<unsigned char>(s[e]) & 0xC0) == 0x80) ++e;
      s = s.substr(0, e);
    }
    bool hit = false;
    re.find_iter(s.substr(b), [&](size_t x, size_t) { hit |= x == 0; });
    return hit;
  }

  // tokenizers' AddedVocabulary::find_matches: pieces of s as (added token index or -1, start, end).
  template <typename F>
  void split_added(std::string_view s, const Trie& trie, F f) const {
    size_t start_offset = 0, from = 0;
    while (true) {
      size_t start = 0, stop = 0;
      int t = -1;
      trie.find(s, from, start, stop, t);
      if (t < 0) break;
      from = stop;
      const AddedToken& a = added[static_cast<size_t>(t)];
      if (a.single_word) {
        const bool start_space = start == 0 || !char_is(*word_char, s.substr(0, start), true);
        const bool stop_space = stop == s.size() || !char_is(*word_char, s.substr(stop), false);
        if (!start_space || !stop_space) continue;
      }
      if (a.lstrip) {
        size_t b = start;
        while (b > 0) {
          size_t c = b - 1;
          while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
          if (!char_is(*white_space, s.substr(c, b - c), false)) break;
          b = c;
        }
        start = std::max(b, start_offset);
      }
      if (a.rstrip) {
        while (stop < s.size() && char_is(*white_space, s.substr(stop), false)) {
          ++stop;
          while (stop < s.size() && (static_cast<unsigned char>(s[stop]) & 0xC0) == 0x80) ++stop;
        }
      }
      if (start_offset < start) f(-1, start_offset, start);
      f(t, start, stop);
      start_offset = stop;
    }
    if (start_offset != s.size()) f(-1, start_offset, s.size());
  }

  // The pre-tokenizer's words of one piece, to f(word). at_start: the piece begins the input
  // (tokenizers' offsets_original().0 == 0, what Metaspace's prepend_scheme "first" asks).
  template <typename F>
  void pre_tokenize(std::string_view piece, bool at_start, F f) const {
    thread_local std::vector<std::pair<std::string_view, bool>> cur, next;
    thread_local std::deque<std::string> owned;
    thread_local std::vector<std::tuple<size_t, size_t, bool>> parts, merged;
    cur.clear();
    owned.clear();
    cur.emplace_back(piece, at_start);
    bool mapped = false;  // the words hold ByteLevel's characters (steps after ByteLevel), not bytes
    for (const PreStep& st : steps) {
      next.clear();
      for (const auto& item : cur) {
        std::string_view s = item.first;
        const bool first = item.second;
        if (st.byte_level && st.add_prefix_space && !s.empty() && s[0] != ' ') {
          owned.emplace_back(" ");
          owned.back().append(s);
          s = owned.back();
        }
        if (st.metaspace && !s.empty()) {
          owned.emplace_back();
          std::string& o = owned.back();
          replace_all(s, " ", st.replacement, o);
          const bool prepend = st.prepend == Prepend::Always || (st.prepend == Prepend::First && first);
          if (prepend && o.compare(0, st.replacement.size(), st.replacement) != 0) o.insert(0, st.replacement);
          s = o;
        }
        auto emit = [&](size_t b, size_t e) { next.emplace_back(s.substr(b, e - b), first && b == 0); };
        if (!st.regex) {
          if (!s.empty()) emit(0, s.size());
          continue;
        }
        parts.clear();
        size_t prev = 0;
        st.regex->find_iter(s, [&](size_t b, size_t e) {
          if (prev != b) parts.emplace_back(prev, b, false);
          parts.emplace_back(b, e, true);
          prev = e;
        });
        if (prev != s.size()) parts.emplace_back(prev, s.size(), false);
        if (st.invert)
          for (auto& p : parts) std::get<2>(p) = !std::get<2>(p);
        if (st.behavior == Behavior::Isolated) {
          for (auto& [b, e, m] : parts)
            if (e > b) emit(b, e);
          continue;
        }
        merged.clear();
        bool previous = false;
        switch (st.behavior) {
          case Behavior::Isolated:
            break;
          case Behavior::Removed:
            for (auto& p : parts)
              if (!std::get<2>(p)) merged.push_back(p);
            break;
          case Behavior::MergedWithPrevious:
            for (auto& p : parts) {
              if (std::get<2>(p) && !previous && !merged.empty()) std::get<1>(merged.back()) = std::get<1>(p);
              else merged.push_back(p);
              previous = std::get<2>(p);
            }
            break;
          case Behavior::MergedWithNext:
            for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
              if (std::get<2>(*it) && !previous && !merged.empty()) std::get<0>(merged.back()) = std::get<0>(*it);
              else merged.push_back(*it);
              previous = std::get<2>(*it);
            }
            std::reverse(merged.begin(), merged.end());
            break;
          case Behavior::Contiguous:
            for (auto& p : parts) {
              if (std::get<2>(p) == previous && !merged.empty()) std::get<1>(merged.back()) = std::get<1>(p);
              else merged.push_back(p);
              previous = std::get<2>(p);
            }
            break;
        }
        for (auto& [b, e, m] : merged)
          if (e > b) emit(b, e);
      }
      std::swap(cur, next);
      if (st.byte_level && &st != &steps.back()) {  // the steps after ByteLevel see its characters
        const ByteMap& bm = byte_map();
        for (auto& item : cur) {
          std::string& o = owned.emplace_back();
          for (char c : item.first) o += bm.utf8[static_cast<unsigned char>(c)];
          item.first = o;
        }
        mapped = true;
      }
    }
    for (const auto& w : cur) {
      if (!mapped) {
        f(w.first);
        continue;
      }
      std::string& bytes = owned.emplace_back();
      for_each_cp(w.first, [&](uint32_t cp) { bytes += static_cast<char>(byte_map().byte.at(cp)); });
      f(std::string_view(bytes));
    }
  }

  // The BPE model on one word, as tokenizers' BPE::merge_word + Word::merge_all. With split_at_meta
  // (see parse_json) the word is cut before each U+2581 that follows another character, and each
  // part is merged (and cached) alone: no merge can join across such a cut, so the ids are those
  // of the whole word, and a Llama-2 style file (no pre-tokenizer: a word is a whole piece of
  // text) gets a word cache as byte-level files have.
  void bpe_word(std::string_view w, std::vector<int32_t>& out) const {
    if (!split_at_meta) return bpe_part(w, out);
    size_t begin = 0;
    for (size_t at = w.find(kMetaSpace, 1); at != std::string_view::npos; at = w.find(kMetaSpace, at + kMetaSpace.size())) {
      if (ends_meta(w.substr(0, at))) continue;  // inside a run of U+2581
      bpe_part(w.substr(begin, at - begin), out);
      begin = at;
    }
    bpe_part(w.substr(begin), out);
  }

  void bpe_part(std::string_view w, std::vector<int32_t>& out) const {
    struct Cache {
      uint64_t serial = 0;
      WordCache words;
    };
    thread_local Cache cache;
    if (cache.serial != serial) cache.words.clear(), cache.serial = serial;
    const uint64_t h = std::hash<std::string_view>()(w);
    size_t n = 0;
    if (const int32_t* hit = cache.words.find(w, h, n)) {
      out.insert(out.end(), hit, hit + n);
      return;
    }
    thread_local std::vector<int32_t> ids;
    ids.clear();
    if (ignore_merges) {
      auto it = raw_vocab.find(std::string(w));
      if (it != raw_vocab.end()) ids.push_back(it->second);
    }
    if (unigram) unigram_word(w, ids);
    else if (ids.empty()) merge_word(w, ids);
    out.insert(out.end(), ids.begin(), ids.end());
    // Not the long words: without a pre-tokenizer (Llama-2 style) a word is a whole piece of text.
    if (w.size() < kMaxCachedWord) cache.words.insert(w, h, ids.data(), ids.size());
  }
  static constexpr size_t kMaxCachedWord = 256;

  void merge_word(std::string_view w, std::vector<int32_t>& ids) const {
    struct Sym {
      int32_t c;
      int prev, next, len;
    };
    thread_local std::vector<Sym> sym;
    sym.clear();
    int32_t pending_unk = -1;
    int pending_len = 0;
    auto add = [&](int32_t c, int len) {
      const int n = static_cast<int>(sym.size());
      sym.push_back({c, n - 1, -1, len});
      if (n > 0) sym[static_cast<size_t>(n - 1)].next = n;
    };
    // One symbol per byte (byte-level) or per character, as tokenizers' BPE::merge_word.
    for (size_t i = 0; i < w.size();) {
      const auto c = static_cast<unsigned char>(w[i]);
      const int len = byte_level ? 1 : static_cast<int>(std::min(utf8_len(c), w.size() - i));
      const int32_t id = byte_level ? byte_id[c] : char_symbol(w.substr(i, static_cast<size_t>(len)));
      if (id >= 0) {
        if (pending_unk >= 0) add(pending_unk, pending_len), pending_unk = -1;
        add(id, len);
      } else if (byte_fallback && fallback_covers(w.substr(i, static_cast<size_t>(len)))) {
        // Its bytes' <0xXX> tokens. A pending unknown stays pending (it comes after them), as in
        // tokenizers.
        for (int k = 0; k < len; ++k) add(fallback_id[static_cast<unsigned char>(w[i + static_cast<size_t>(k)])], 1);
      } else if (unk >= 0) {
        if (pending_unk >= 0 && fuse_unk) {
          pending_len += len;
        } else {
          if (pending_unk >= 0) add(pending_unk, pending_len);
          pending_unk = unk, pending_len = len;
        }
      }
      i += static_cast<size_t>(len);
    }
    if (pending_unk >= 0) add(pending_unk, pending_len);
    struct Item {
      int32_t rank;
      int pos;
      int32_t new_id;
      bool operator<(const Item& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    thread_local std::vector<Item> heap;
    heap.clear();
    auto push = [&](int pos, int32_t a, int32_t b) {
      const MergeTable::Merge* m = merges.find(a, b);
      if (!m) return;
      heap.push_back({m->rank, pos, m->new_id});
      std::push_heap(heap.begin(), heap.end());
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) push(static_cast<int>(i), sym[i].c, sym[i + 1].c);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end());
      const Item top = heap.back();
      heap.pop_back();
      Sym& s = sym[static_cast<size_t>(top.pos)];
      if (s.len == 0 || s.next == -1) continue;
      const Sym right = sym[static_cast<size_t>(s.next)];
      const MergeTable::Merge* m = merges.find(s.c, right.c);
      if (!m || m->new_id != top.new_id) continue;
      sym[static_cast<size_t>(s.next)].len = 0;
      s.c = top.new_id;
      s.len += right.len;
      s.next = right.next;
      if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = top.pos;
      if (s.prev >= 0) push(s.prev, sym[static_cast<size_t>(s.prev)].c, s.c);
      if (s.next >= 0) push(top.pos, s.c, sym[static_cast<size_t>(s.next)].c);
    }
    for (const Sym& s : sym)
      if (s.len) ids.push_back(s.c);
  }

  // The Unigram model on one word, as tokenizers' Unigram::encode_optimized + tokenize: the best
  // path over the pieces (Viterbi, by byte position; a character in no one-character piece may also
  // be an unknown, at unk_score), ties to the first path found; then from the end, runs of unknowns
  // fused into one string, which is a piece if the vocabulary has it, else its bytes' <0xXX> tokens
  // (byte_fallback, when all are there), else unk.
  void unigram_word(std::string_view w, std::vector<int32_t>& ids) const {
    struct Best {
      int32_t id = 0;
      double score = 0;  // tokenizers' default: a position no path reaches scores 0 too
      int64_t start = -1;
    };
    thread_local std::vector<Best> best;
    best.assign(w.size() + 1, Best{});
    for (size_t at = 0; at < w.size();) {
      const double here = best[at].score;
      const size_t len = std::min(utf8_len(static_cast<unsigned char>(w[at])), w.size() - at);
      bool single = false;
      pieces.prefixes(w, at, [&](size_t end, int32_t id) {
        Best& b = best[end];
        const double score = scores[static_cast<size_t>(id)] + here;
        if (b.start < 0 || score > b.score) b = {id, score, static_cast<int64_t>(at)};
        single |= end - at == len;
      });
      if (!single) {
        Best& b = best[at + len];
        const double score = unk_score + here;
        if (b.start < 0 || score > b.score) {
          if (unk < 0)
            fail("{}: \"{}\" is in no piece of the Unigram model, and the model has no unk_id", origin,
                 std::string(w.substr(at, len)));
          b = {unk, score, static_cast<int64_t>(at)};
        }
      }
      at += len;
    }
    thread_local std::vector<std::pair<size_t, int32_t>> path;  // (start, id), from the end
    path.clear();
    for (size_t end = w.size(); end > 0;) {
      const Best& b = best[end];
      const auto start = static_cast<size_t>(b.start);
      if (b.id == unk && !path.empty() && path.back().second == unk && unk >= 0) path.back().first = start;
      else path.emplace_back(start, b.id);
      end = start;
    }
    size_t end = w.size();
    const size_t first = ids.size();
    for (const auto& [start, id] : path) {  // still from the end: reversed below
      if (id != unk || unk < 0) {
        ids.push_back(id);
      } else {
        const std::string_view run = w.substr(start, end - start);
        const auto it = vocab.find(std::string(run));
        if (it != vocab.end()) {
          ids.push_back(it->second);
        } else if (byte_fallback && fallback_covers(run)) {
          for (size_t k = run.size(); k-- > 0;) ids.push_back(fallback_id[static_cast<unsigned char>(run[k])]);
        } else {
          ids.push_back(unk);
        }
      }
      end = start;
    }
    std::reverse(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end());
  }

  // The id of one character's symbol, or -1.
  int32_t char_symbol(std::string_view c) const {
    const auto c0 = static_cast<unsigned char>(c[0]);
    if (c0 < 0x80) return ascii_id[c0];
    utf8proc_int32_t cp = -1;
    utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(c.data()), static_cast<utf8proc_ssize_t>(c.size()), &cp);
    auto it = char_id.find(static_cast<uint32_t>(cp));
    return it == char_id.end() ? -1 : it->second;
  }
  bool fallback_covers(std::string_view c) const {
    for (char b : c)
      if (fallback_id[static_cast<unsigned char>(b)] < 0) return false;
    return true;
  }

  void encode_normalizable(std::string_view piece, bool at_start, std::vector<int32_t>& out) const {
    std::string normed;
    if (!normalizers.empty()) {
      normalize(piece, normed);
      piece = normed;
    }
    auto words = [&](std::string_view p, bool first) {
      pre_tokenize(p, first, [&](std::string_view w) { bpe_word(w, out); });
    };
    if (norm_trie.empty()) return words(piece, at_start);
    split_added(piece, norm_trie, [&](int t, size_t b, size_t e) {
      if (t >= 0) out.push_back(added[static_cast<size_t>(t)].id);
      else words(piece.substr(b, e - b), at_start && b == 0);
    });
  }

  void encode(std::string_view text, std::vector<int32_t>& out) const {
    std::string fixed;
    if (replace_invalid_utf8(text, fixed)) text = fixed;
    if (raw_trie.empty()) return encode_normalizable(text, true, out);
    split_added(text, raw_trie, [&](int t, size_t b, size_t e) {
      if (t >= 0) out.push_back(added[static_cast<size_t>(t)].id);
      else encode_normalizable(text.substr(b, e - b), b == 0, out);
    });
  }

  // Character-level BPE's decoders over the tokens (tokenizers' decode_chain of each), joined.
  std::string decode_chars(std::vector<std::string>& tokens) const {
    thread_local std::string tmp;
    for (const DecodeStep& d : decoders) {
      switch (d.kind) {
        case DecodeStep::Replace:
          for (std::string& t : tokens) replace_all(t, d.a, d.b, tmp), std::swap(t, tmp);
          break;
        case DecodeStep::ByteFallback: {
          // Runs of <0xXX> tokens become their bytes when those are valid UTF-8, else one U+FFFD each.
          std::vector<std::string> out;
          std::string run;
          size_t run_tokens = 0;
          auto flush = [&] {
            if (!run_tokens) return;
            std::string fixed;
            if (!replace_invalid_utf8(run, fixed)) out.push_back(run);
            else for (size_t k = 0; k < run_tokens; ++k) out.emplace_back("\xEF\xBF\xBD");
            run.clear(), run_tokens = 0;
          };
          for (std::string& t : tokens) {
            const int b = byte_token(t);
            if (b >= 0) {
              run += static_cast<char>(b), ++run_tokens;
            } else {
              flush();
              out.push_back(std::move(t));
            }
          }
          flush();
          tokens = std::move(out);
          break;
        }
        case DecodeStep::Fuse: {
          std::string all;
          for (const std::string& t : tokens) all += t;
          tokens.assign(1, std::move(all));
          break;
        }
        case DecodeStep::Strip:
          for (std::string& t : tokens) {
            size_t b = 0, e = t.size();
            for (int64_t k = 0; k < d.start && t.compare(b, d.a.size(), d.a) == 0; ++k) b += d.a.size();
            for (int64_t k = 0; k < d.stop && e >= b + d.a.size() && t.compare(e - d.a.size(), d.a.size(), d.a) == 0; ++k)
              e -= d.a.size();
            t = t.substr(b, e - b);
          }
          break;
        case DecodeStep::Metaspace:
          for (size_t i = 0; i < tokens.size(); ++i) {
            replace_all(tokens[i], d.a, i == 0 && d.drop_first ? "" : " ", tmp);
            std::swap(tokens[i], tmp);
          }
          break;
      }
    }
    std::string text;
    for (const std::string& t : tokens) text += t;
    return text;
  }
  // The byte of a "<0xXX>" token as tokenizers' ByteFallback reads it (u8::from_str_radix of the
  // two characters after "<0x", so "+F" is 15 too), else -1.
  static int byte_token(std::string_view t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    std::string_view h = t.substr(3, 2);
    if (h[0] == '+') h.remove_prefix(1);
    int v = 0;
    for (char c : h) {
      const int d = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                    : (c >= 'a' && c <= 'f')                    ? c - 'a' + 10
                    : (c >= 'A' && c <= 'F')                    ? c - 'A' + 10
                                                                : -1;
      if (d < 0) return -1;
      v = v * 16 + d;
    }
    return v;
  }

  // ---- Parsing ----

  const json& need(const json& o, const char* k, const std::string& where) const {
    if (!o.is_object() || !o.contains(k)) fail("{}: {} has no \"{}\"", origin, where, k);
    return o.at(k);
  }
  bool flag(const json& o, const char* k, bool dflt, const std::string& where) const {
    if (!o.contains(k) || o.at(k).is_null()) return dflt;
    if (!o.at(k).is_boolean()) fail("{}: {}.{} is not true or false", origin, where, k);
    return o.at(k).get<bool>();
  }
  std::string type_of(const json& o, const std::string& where) const {
    const json& t = need(o, "type", where);
    if (!t.is_string()) fail("{}: {}.type is not a string", origin, where);
    return t.get<std::string>();
  }

  int64_t max_id = 1 << 24;  // ids are dense in real files; this bounds memory for any input
  std::string_view raw_text;  // the file, while parse() runs (empty after)

  void parse_model(const json& m) {
    const std::string type = type_of(m, "model");
    if (type == "Unigram") return parse_unigram(m);
    if (type != "BPE") fail("{}: model type {} is not implemented (Coil reads BPE and Unigram)", origin, type);
    if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
      fail("{}: model.dropout is not implemented", origin);
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
        fail("{}: model.{} is not implemented", origin, k);
    byte_fallback = flag(m, "byte_fallback", false, "model");
    fuse_unk = flag(m, "fuse_unk", false, "model");
    ignore_merges = flag(m, "ignore_merges", false, "model");
    const json& v = need(m, "vocab", "model");
    if (!v.is_object()) fail("{}: model.vocab is not an object", origin);
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!it.value().is_number_integer()) fail("{}: model.vocab[\"{}\"] is not an integer id", origin, it.key());
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id >= max_id) fail("{}: model.vocab[\"{}\"] = {} is out of range", origin, it.key(), id);
      vocab[it.key()] = static_cast<int32_t>(id);
      set_token(static_cast<int32_t>(id), it.key());
    }
    if (m.contains("unk_token") && !m["unk_token"].is_null()) {
      auto it = vocab.find(m["unk_token"].get<std::string>());
      if (it == vocab.end()) fail("{}: model.unk_token {} is not in the vocabulary", origin, m["unk_token"].dump());
      unk = it->second;
    }
    const json& mg = need(m, "merges", "model");
    if (!mg.is_array()) fail("{}: model.merges is not an array", origin);
    int32_t rank = 0;
    for (const json& e : mg) {
      std::string a, b;
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail("{}: merge {} at rank {} is not two tokens", origin, e.dump(), rank);
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>(), b = e[1].get<std::string>();
      } else {
        fail("{}: merge {} at rank {} is not two tokens", origin, e.dump(), rank);
      }
      auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
      if (ia == vocab.end() || ib == vocab.end() || iab == vocab.end())
        fail("{}: merge {} at rank {}: a token is not in the vocabulary", origin, e.dump(), rank);
      merges.insert(ia->second, ib->second, {rank, iab->second});
      merge_joins_meta |= starts_meta(b) && !ends_meta(a);
      ++rank;
    }
  }

  // tokenizers' Unigram: {"vocab": [[piece, score], ...], "unk_id": id or null, "byte_fallback"}.
  void parse_unigram(const json& m) {
    unigram = true;
    byte_fallback = flag(m, "byte_fallback", false, "model");
    const json& v = need(m, "vocab", "model");
    if (!v.is_array() || v.empty()) fail("{}: model.vocab of a Unigram model is not a non-empty list of [piece, score]", origin);
    if (static_cast<int64_t>(v.size()) >= max_id) fail("{}: model.vocab has too many pieces ({})", origin, v.size());
    double min_score = std::numeric_limits<double>::infinity();
    const std::vector<std::string> texts = unigram_score_texts(raw_text);
    for (size_t i = 0; i < v.size(); ++i) {
      const json& e = v[i];
      if (!e.is_array() || e.size() != 2 || !e[0].is_string() || !e[1].is_number())
        fail("{}: model.vocab[{}] is not [piece, score]: {}", origin, i, e.dump().substr(0, 80));
      const auto id = static_cast<int32_t>(i);
      const std::string piece = e[0].get<std::string>();
      std::optional<double> read = e[1].get<double>();  // an integer: exact
      if (i < texts.size() && !texts[i].empty()) read = serde_json_f64(texts[i]);
      if (!read || !std::isfinite(*read)) fail("{}: model.vocab[{}] has the score {}", origin, i, e[1].dump());
      const double score = *read;
      vocab[piece] = id;  // a piece listed twice: the later id, as tokenizers has it
      set_token(id, piece);
      scores.push_back(score);
      if (!piece.empty()) pieces.add(piece, id);
      min_score = std::min(min_score, score);
    }
    unk_score = min_score - 10.0;
    if (m.contains("unk_id") && !m["unk_id"].is_null()) {
      const json& u = m["unk_id"];
      if (!u.is_number_unsigned() || u.get<uint64_t>() >= v.size())
        fail("{}: model.unk_id {} is not an id of the vocabulary ({} pieces)", origin, u.dump().substr(0, 40), v.size());
      unk = static_cast<int32_t>(u.get<uint64_t>());
    }
  }

  int32_t vocab_size_now() const { return static_cast<int32_t>(id_to_token.size()); }

  void set_token(int32_t id, const std::string& s) {
    const size_t n = static_cast<size_t>(id) + 1;
    if (id_to_token.size() < n) id_to_token.resize(n), is_special.resize(n), assigned.resize(n);
    id_to_token[static_cast<size_t>(id)] = s;
    assigned[static_cast<size_t>(id)] = 1;
  }

  // A string field that must be present and non-empty.
  std::string text_of(const json& o, const char* k, const std::string& where) const {
    const json& v = need(o, k, where);
    if (!v.is_string() || v.get<std::string>().empty()) fail("{}: {}.{} is not a non-empty string", origin, where, k);
    return v.get<std::string>();
  }
  // Replace's pattern (normalizer or decoder): a String; a Regex is not implemented.
  std::string replace_pattern(const json& r, const std::string& where) const {
    const json& pat = need(r, "pattern", where);
    if (pat.is_object() && pat.contains("String")) return text_of(pat, "String", where + ".pattern");
    if (pat.is_object() && pat.contains("Regex")) fail("{}: {} with a Regex pattern is not implemented", origin, where);
    fail("{}: {}.pattern is neither Regex nor String", origin, where);
  }

  // Metaspace's prepend_scheme (pre-tokenizer and decoder alike): always when absent.
  Prepend prepend_scheme(const json& m, const std::string& where) const {
    if (!m.contains("prepend_scheme") || m["prepend_scheme"].is_null()) {
      if (!flag(m, "add_prefix_space", true, where))  // tokenizers refuses it too
        fail("{}: {}.add_prefix_space false without a prepend_scheme is not implemented", origin, where);
      return Prepend::Always;
    }
    const json& v = m["prepend_scheme"];
    const std::string scheme = v.is_string() ? v.get<std::string>() : "";
    if (scheme == "always") return Prepend::Always;
    if (scheme == "first") return Prepend::First;
    if (scheme == "never") return Prepend::Never;
    fail("{}: {}.prepend_scheme {} is not always, first or never", origin, where, v.dump());
  }

  void parse_normalizer(const json& n) {
    if (n.is_null()) return;
    const std::string t = type_of(n, "normalizer");
    auto unicode = [&](int opt) {
      NormStep u;
      u.unicode = UTF8PROC_STABLE | opt;
      normalizers.push_back(std::move(u));
    };
    if (t == "Sequence") {
      for (const json& x : need(n, "normalizers", "normalizer")) parse_normalizer(x);
    } else if (t == "NFC") {
      unicode(UTF8PROC_COMPOSE);
    } else if (t == "NFD") {
      unicode(UTF8PROC_DECOMPOSE);
    } else if (t == "NFKC") {
      unicode(UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
    } else if (t == "NFKD") {
      unicode(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
    } else if (t == "Prepend") {
      NormStep p;
      p.a = text_of(n, "prepend", "Prepend");
      p.prepend = true;
      normalizers.push_back(std::move(p));
    } else if (t == "Replace") {
      const json& c = need(n, "content", "Replace");
      if (!c.is_string()) fail("{}: Replace.content is not a string", origin);
      const json& pat = need(n, "pattern", "normalizer Replace");
      NormStep r;
      r.b = c.get<std::string>();
      if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string())
        r.regex = std::make_unique<Regex>(onig_compatible(pat["Regex"].get<std::string>(), origin + ": Replace"),
                                          origin + ": Replace");
      else
        r.a = replace_pattern(n, "normalizer Replace");
      normalizers.push_back(std::move(r));
    } else if (t == "Nmt") {
      NormStep s;
      s.nmt = true;
      normalizers.push_back(std::move(s));
    } else if (t == "Precompiled") {
      const json& m = need(n, "precompiled_charsmap", "Precompiled");
      const std::optional<std::string> blob = m.is_string() ? base64_decode(m.get<std::string>()) : std::nullopt;
      if (!blob) fail("{}: Precompiled.precompiled_charsmap is not base64", origin);
      NormStep p;
      p.charsmap = std::make_unique<CharsMap>(*blob, origin + ": Precompiled");
      normalizers.push_back(std::move(p));
    } else {
      fail("{}: normalizer {} is not implemented (Coil has NFC, NFD, NFKC, NFKD, Nmt, Precompiled, Prepend, Replace and "
           "Sequence)", origin, t);
    }
  }

  // A pre-tokenizer's "behavior" (dflt when absent).
  Behavior behavior_of(const json& p, const std::string& where, Behavior dflt) const {
    if (!p.contains("behavior") || p["behavior"].is_null()) return dflt;
    const std::string b = p["behavior"].is_string() ? p["behavior"].get<std::string>() : p["behavior"].dump();
    if (b == "Removed") return Behavior::Removed;
    if (b == "Isolated") return Behavior::Isolated;
    if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
    if (b == "MergedWithNext") return Behavior::MergedWithNext;
    if (b == "Contiguous") return Behavior::Contiguous;
    fail("{}: {}.behavior {} is not one of tokenizers' behaviors", origin, where, b);
  }

  void parse_pre_tokenizer(const json& p) {
    if (p.is_null()) return;  // the whole (normalized) piece is one word
    const std::string t = type_of(p, "pre_tokenizer");
    if (t == "Sequence") {
      for (const json& x : need(p, "pretokenizers", "pre_tokenizer")) parse_pre_tokenizer(x);
    } else if (t == "ByteLevel") {
      PreStep s;
      s.byte_level = true;
      s.add_prefix_space = flag(p, "add_prefix_space", true, "ByteLevel");
      if (flag(p, "use_regex", true, "ByteLevel")) s.regex = std::make_unique<Regex>(onig_compatible(kGpt2Pattern, origin), origin);
      steps.push_back(std::move(s));
    } else if (t == "Split") {
      PreStep s;
      const json& pat = need(p, "pattern", "Split");
      if (pat.contains("Regex")) {
        s.regex = std::make_unique<Regex>(onig_compatible(pat["Regex"].get<std::string>(), origin + ": Split"), origin + ": Split");
      } else if (pat.contains("String")) {
        const std::string lit = pat["String"].get<std::string>();
        if (lit.empty()) fail("{}: Split with an empty String pattern is not implemented", origin);
        s.regex = std::make_unique<Regex>(escape_literal(lit), origin + ": Split");
      } else {
        fail("{}: Split.pattern is neither Regex nor String", origin);
      }
      need(p, "behavior", "Split");
      s.behavior = behavior_of(p, "Split", Behavior::Isolated);
      s.invert = flag(p, "invert", false, "Split");
      steps.push_back(std::move(s));
    } else if (t == "Metaspace") {
      PreStep s;
      s.metaspace = true;
      s.replacement = text_of(p, "replacement", "Metaspace");
      if (!one_char(s.replacement))
        fail("{}: Metaspace.replacement {} is not one character", origin, need(p, "replacement", "Metaspace").dump());
      s.prepend = prepend_scheme(p, "Metaspace");
      if (flag(p, "split", true, "Metaspace")) {
        s.regex = std::make_unique<Regex>(escape_literal(s.replacement), origin + ": Metaspace");
        s.behavior = Behavior::MergedWithNext;
      }
      steps.push_back(std::move(s));
    } else if (t == "WhitespaceSplit") {  // each White_Space character a cut, removed
      PreStep s;
      s.regex = std::make_unique<Regex>(onig_compatible("\\s", origin), origin + ": WhitespaceSplit");
      s.behavior = Behavior::Removed;
      steps.push_back(std::move(s));
    } else if (t == "Digits") {  // Rust's char::is_numeric: Nd, Nl and No
      PreStep s;
      s.regex = std::make_unique<Regex>(flag(p, "individual_digits", false, "Digits") ? "\\p{N}" : "\\p{N}+",
                                        origin + ": Digits");
      steps.push_back(std::move(s));
    } else if (t == "Punctuation") {  // each character that is ASCII or Unicode punctuation a match
      PreStep s;
      s.regex = std::make_unique<Regex>(R"([\p{P}!-/:-@\[-`{-~])", origin + ": Punctuation");
      s.behavior = behavior_of(p, "Punctuation", Behavior::Isolated);
      steps.push_back(std::move(s));
    } else {
      fail("{}: pre-tokenizer {} is not implemented (Coil has ByteLevel, Split, Metaspace, Digits, Punctuation, "
           "WhitespaceSplit and Sequence)", origin, t);
    }
  }

  void parse_post_processor(const json& p) {
    if (p.is_null()) return;
    const std::string t = type_of(p, "post_processor");
    if (t == "Sequence") {
      for (const json& x : need(p, "processors", "post_processor")) parse_post_processor(x);
    } else if (t == "ByteLevel") {
      // Offsets only: no tokens added.
    } else if (t == "TemplateProcessing") {
      const json& specials = need(p, "special_tokens", "TemplateProcessing");
      bool seen_a = false;
      for (const json& piece : need(p, "single", "TemplateProcessing")) {
        if (piece.contains("Sequence")) {
          const std::string id = piece["Sequence"].value("id", "");
          if (id != "A") fail("{}: TemplateProcessing.single with sequence {} is not implemented", origin, id);
          if (seen_a) fail("{}: TemplateProcessing.single has sequence A twice", origin);
          seen_a = true;
        } else if (piece.contains("SpecialToken")) {
          const std::string name = piece["SpecialToken"].value("id", "");
          if (!specials.contains(name)) fail("{}: TemplateProcessing: special token {} is not in special_tokens", origin, name);
          for (const json& id : need(specials[name], "ids", "TemplateProcessing.special_tokens")) {
            const int64_t v = id.get<int64_t>();
            if (v < 0 || v >= max_id) fail("{}: TemplateProcessing: id {} of {} is out of range", origin, v, name);
            (seen_a ? suffix : prefix).push_back(static_cast<int32_t>(v));
          }
        } else {
          fail("{}: TemplateProcessing.single has a piece that is neither Sequence nor SpecialToken", origin);
        }
      }
      if (!seen_a) fail("{}: TemplateProcessing.single has no sequence A", origin);
    } else {
      fail("{}: post-processor {} is not implemented (Coil has TemplateProcessing, ByteLevel and Sequence)", origin, t);
    }
  }

  // The decoder: ByteLevel for byte-level BPE; for character-level BPE a chain of Replace,
  // ByteFallback, Fuse, Strip and Metaspace (checked against the pre-tokenizer in parse_json).
  void parse_decoder(const json& d) {
    if (d.is_null()) fail("{}: no decoder (Coil has ByteLevel, or Replace, ByteFallback, Fuse, Strip and Metaspace)", origin);
    const std::string t = type_of(d, "decoder");
    if (t == "Sequence") {
      for (const json& x : need(d, "decoders", "decoder")) parse_decoder(x);
    } else if (t == "ByteLevel") {
      decoder_byte_level = true;
    } else if (t == "Replace") {
      const json& c = need(d, "content", "Replace");
      if (!c.is_string()) fail("{}: decoder Replace.content is not a string", origin);
      decoders.emplace_back(DecodeStep::Replace, replace_pattern(d, "decoder Replace"), c.get<std::string>());
    } else if (t == "ByteFallback") {
      decoders.emplace_back(DecodeStep::ByteFallback);
    } else if (t == "Fuse") {
      decoders.emplace_back(DecodeStep::Fuse);
    } else if (t == "Strip") {
      DecodeStep s(DecodeStep::Strip, text_of(d, "content", "Strip"));
      if (!one_char(s.a)) fail("{}: decoder Strip.content is not one character", origin);
      for (auto [k, v] : {std::pair{"start", &s.start}, std::pair{"stop", &s.stop}}) {
        const json& n = need(d, k, "Strip");
        if (!n.is_number_unsigned()) fail("{}: decoder Strip.{} is not a count", origin, k);
        *v = static_cast<int64_t>(std::min<uint64_t>(n.get<uint64_t>(), 1u << 30));
      }
      decoders.push_back(std::move(s));
    } else if (t == "Metaspace") {
      DecodeStep s(DecodeStep::Metaspace, text_of(d, "replacement", "Metaspace"));
      s.drop_first = prepend_scheme(d, "decoder Metaspace") != Prepend::Never;
      decoders.push_back(std::move(s));
    } else {
      fail("{}: decoder {} is not implemented (Coil has ByteLevel, Replace, ByteFallback, Fuse, Strip and Metaspace)",
           origin, t);
    }
  }

  void parse(std::string_view text) {
    raw_text = text;
    json j;
    try {
      j = json::parse(text.begin(), text.end());
    } catch (const json::exception& e) {
      fail("{}: not a tokenizer.json ({})", origin, e.what());
    }
    try {
      parse_json(j);
    } catch (const json::exception& e) {
      fail("{}: malformed tokenizer.json ({})", origin, e.what());
    }
    raw_text = {};
  }

  // Whether cutting a word before a U+2581 that follows another character leaves the BPE's result
  // as it is. At such a cut the right symbol is always U+2581's own (it is in the vocabulary) or a
  // token merged from it, so its string starts with U+2581; the left symbol's string ends with the
  // character before (or is <unk> or a <0xXX>): no merge (a, b) may have b start with U+2581 and
  // a end otherwise. Unknowns do not fuse across the cut: U+2581 is known and ends a run.
  bool can_cut_before_meta() const {
    return char_id.count(0x2581) && !merge_joins_meta && !(unk >= 0 && ends_meta(id_to_token[static_cast<size_t>(unk)]));
  }

  void parse_json(const json& j) {
    if (!j.is_object()) fail("{}: not a tokenizer.json (not a JSON object)", origin);
    for (const char* k : {"truncation", "padding"})
      if (j.contains(k) && !j[k].is_null()) fail("{}: \"{}\" is set: not implemented (set it to null)", origin, k);
    const std::string model_where = "tokenizer.json";
    const json& model = need(j, "model", model_where);
    const size_t n_added = j.contains("added_tokens") && j["added_tokens"].is_array() ? j["added_tokens"].size() : 0;
    const size_t n_vocab = model.is_object() && model.contains("vocab") ? model["vocab"].size() : 0;
    max_id = static_cast<int64_t>(std::min<size_t>(2 * (n_vocab + n_added) + 1024, size_t{1} << 24));
    parse_model(model);
    parse_normalizer(j.value("normalizer", json()));
    parse_pre_tokenizer(j.value("pre_tokenizer", json()));
    size_t byte_levels = 0;
    for (const PreStep& st : steps) byte_levels += st.byte_level;
    if (byte_levels > 1) fail("{}: more than one ByteLevel pre-tokenizer is not implemented", origin);
    for (size_t i = 1; i < steps.size(); ++i)
      if (steps[i].metaspace && steps[i - 1].byte_level)
        fail("{}: pre-tokenizer Metaspace after ByteLevel is not implemented", origin);
    // Byte-level BPE (a ByteLevel pre-tokenizer) or character-level BPE (none: the symbols are
    // characters, unknown ones byte_fallback's <0xXX> tokens or unk).
    byte_level = byte_levels == 1;
    parse_post_processor(j.value("post_processor", json()));
    parse_decoder(j.value("decoder", json()));
    if (byte_level && byte_fallback)
      fail("{}: model.byte_fallback with a ByteLevel pre-tokenizer is not implemented", origin);
    if (byte_level && unigram) fail("{}: a Unigram model with a ByteLevel pre-tokenizer is not implemented", origin);
    if (byte_level && (!decoder_byte_level || !decoders.empty()))
      fail("{}: a ByteLevel pre-tokenizer needs the ByteLevel decoder alone (Coil implements no other decoder there)",
           origin);
    if (!byte_level && decoder_byte_level)
      fail("{}: the ByteLevel decoder without a ByteLevel pre-tokenizer is not implemented", origin);
    white_space = std::make_unique<Regex>("\\p{White_Space}", origin);
    word_char = std::make_unique<Regex>("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", origin);
    // Added tokens.
    if (j.contains("added_tokens")) {
      for (const json& a : j["added_tokens"]) {
        const int64_t id = need(a, "id", "added_tokens").get<int64_t>();
        if (id < 0 || id >= max_id) fail("{}: added token id {} is out of range", origin, id);
        AddedToken t{need(a, "content", "added_tokens").get<std::string>(),
                     static_cast<int32_t>(id),
                     flag(a, "single_word", false, "added_tokens"),
                     flag(a, "lstrip", false, "added_tokens"),
                     flag(a, "rstrip", false, "added_tokens"),
                     flag(a, "normalized", true, "added_tokens"),
                     flag(a, "special", false, "added_tokens")};
        if (t.content.empty()) fail("{}: added token {} is empty", origin, t.id);
        set_token(t.id, t.content);
        is_special[static_cast<size_t>(t.id)] = t.special;
        added.push_back(std::move(t));
      }
    }
    for (size_t i = 0; i < added.size(); ++i) {
      const AddedToken& t = added[i];
      if (!t.normalized) {
        raw_trie.add(t.content, static_cast<int>(i));
      } else {
        std::string n;
        normalize(t.content, n);
        if (!n.empty()) norm_trie.add(n, static_cast<int>(i));
      }
    }
    // Bytes: the vocabulary as bytes, and the decoder's bytes of every id.
    const ByteMap& bm = byte_map();
    for (int b = 0; b < 256; ++b) {
      auto it = vocab.find(bm.utf8[b]);
      byte_id[b] = it == vocab.end() ? -1 : it->second;
    }
    id_to_bytes.resize(id_to_token.size());
    for (size_t id = 0; id < id_to_token.size(); ++id) {
      bool all = for_each_cp(id_to_token[id], [](uint32_t) {});
      for_each_cp(id_to_token[id], [&](uint32_t cp) { all &= bm.byte.count(cp) > 0; });
      if (all) {
        std::string bytes;
        for_each_cp(id_to_token[id], [&](uint32_t cp) { bytes += static_cast<char>(bm.byte.at(cp)); });
        id_to_bytes[id] = bytes;
      } else {
        id_to_bytes[id] = id_to_token[id];
      }
    }
    // Character-level: the vocabulary's single characters and <0xXX> tokens.
    std::fill(std::begin(ascii_id), std::end(ascii_id), -1);
    std::fill(std::begin(fallback_id), std::end(fallback_id), -1);
    if (!byte_level) {
      for (const auto& [tok, id] : vocab) {
        if (!one_char(tok)) continue;
        const auto c0 = static_cast<unsigned char>(tok[0]);
        if (c0 < 0x80) {
          ascii_id[c0] = id;
        } else {
          uint32_t cp = 0;
          if (for_each_cp(tok, [&](uint32_t c) { cp = c; })) char_id[cp] = id;
        }
      }
      if (byte_fallback)
        for (int b = 0; b < 256; ++b) {
          auto it = vocab.find(fmt::format("<0x{:02X}>", b));
          if (it != vocab.end()) fallback_id[b] = it->second;
        }
    }
    if (ignore_merges)
      for (const auto& [tok, id] : vocab) raw_vocab[byte_level ? id_to_bytes[static_cast<size_t>(id)] : tok] = id;
    split_at_meta = !byte_level && !ignore_merges && !unigram && can_cut_before_meta();
    for (const auto* ids : {&prefix, &suffix})
      for (int32_t id : *ids)
        if (id >= vocab_size_now() || !assigned[static_cast<size_t>(id)])
          fail("{}: TemplateProcessing id {} is not a token", origin, id);
    // Special ids.
    auto named = [&](std::initializer_list<const char*> names) {
      for (const char* n : names)
        for (const AddedToken& t : added)
          if (t.special && t.content == n) return t.id;
      return -1;
    };
    bos = !prefix.empty() ? prefix.front() : named({"<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"});
    eos = !suffix.empty() ? suffix.back()
                          : named({"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>"});
    pad = named({"<|padding|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"});
  }
};

BpeTokenizer::BpeTokenizer() : impl_(std::make_unique<Impl>()) {}
BpeTokenizer::~BpeTokenizer() = default;

std::unique_ptr<BpeTokenizer> BpeTokenizer::parse(std::string_view json_text, const std::string& origin) {
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  t->impl_->origin = origin;
  t->impl_->parse(json_text);
  return t;
}

void BpeTokenizer::encode(std::string_view text, std::vector<int32_t>& out) const { impl_->encode(text, out); }

void BpeTokenizer::encode_with_specials(std::string_view text, std::vector<int32_t>& out) const {
  out.insert(out.end(), impl_->prefix.begin(), impl_->prefix.end());
  impl_->encode(text, out);
  out.insert(out.end(), impl_->suffix.begin(), impl_->suffix.end());
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string bytes;
  std::vector<std::string> tokens;
  for (int32_t id : ids) {
    COIL_CHECK(id >= 0 && id < vocab_size() && impl_->assigned[static_cast<size_t>(id)],
               "token id {} is not in the vocabulary of {}", id, impl_->origin);
    if (impl_->is_special[static_cast<size_t>(id)]) continue;
    if (impl_->byte_level) bytes += impl_->id_to_bytes[static_cast<size_t>(id)];
    else tokens.push_back(impl_->id_to_token[static_cast<size_t>(id)]);
  }
  if (!impl_->byte_level) bytes = impl_->decode_chars(tokens);
  std::string fixed;
  return replace_invalid_utf8(bytes, fixed) ? fixed : bytes;
}

std::string BpeTokenizer::piece(int32_t id) const {
  COIL_CHECK(id >= 0 && id < vocab_size(), "token id {} is not in the vocabulary of {}", id, impl_->origin);
  return impl_->id_to_token[static_cast<size_t>(id)];
}

int32_t BpeTokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

int32_t BpeTokenizer::token_id(std::string_view token) const {
  for (const AddedToken& t : impl_->added)
    if (t.content == token) return t.id;
  auto it = impl_->vocab.find(std::string(token));
  return it == impl_->vocab.end() ? -1 : it->second;
}

int32_t BpeTokenizer::bos() const { return impl_->bos; }
int32_t BpeTokenizer::eos() const { return impl_->eos; }
int32_t BpeTokenizer::pad() const { return impl_->pad; }

}  // namespace coil::data
