// Byte-level BPE from tokenizer.json (data/bpe.h) on small hand-made files: the merges, added
// tokens and their flags, the template, the special ids, invalid UTF-8, the Tokenizer facade, SFT
// and prepare with a tokenizer.json, and a one-line error for each bad or unimplemented input.
// Parity with `tokenizers` on real-sized files: tests/python/test_tokenizer_json_parity.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/bpe.h"
#include "data/shards.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace coil::data;

namespace {

// GPT-2's bytes_to_unicode, written out here independently of data/bpe.cpp.
std::string byte_char(int b) {
  int cp = b, n = 0;
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  if (!printable) {
    for (int x = 0; x < b; ++x)
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) s += static_cast<char>(cp);
  else s += static_cast<char>(0xC0 | (cp >> 6)), s += static_cast<char>(0x80 | (cp & 0x3F));
  return s;
}

const std::string G = byte_char(' ');  // "Ġ"

// Bytes 0..255 are ids 0..255; then the merges' tokens from 256 on, in order.
json base(const std::vector<std::pair<std::string, std::string>>& merges, bool array_merges = true) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  json m = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = id++;
    if (array_merges) m.push_back({a, b});
    else m.push_back(a + " " + b);
  }
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
          {"post_processor", {{"type", "ByteLevel"}, {"trim_offsets", false}}},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
                     {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab}, {"merges", m}}}};
}

void add_token(json& j, const std::string& content, int id, bool special, bool lstrip = false, bool rstrip = false,
               bool single_word = false, bool normalized = false) {
  j["added_tokens"].push_back({{"id", id}, {"content", content}, {"single_word", single_word}, {"lstrip", lstrip},
                               {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}});
}

std::unique_ptr<BpeTokenizer> parse(const json& j) { return BpeTokenizer::parse(j.dump(), "test.json"); }

std::vector<int32_t> enc(const BpeTokenizer& t, std::string_view s) {
  std::vector<int32_t> out;
  t.encode(s, out);
  return out;
}

std::string error_of(const std::string& text) {
  try {
    BpeTokenizer::parse(text, "bad.json");
  } catch (const coil::Error& e) {
    return e.what();
  }
  return "";
}

std::string error_of(const json& j) { return error_of(j.dump()); }

const std::string SP = "\xe2\x96\x81";  // U+2581, sentencepiece's meta space

// Character-level BPE with byte fallback as the Hub's Llama-2 tokenizer.json has it: <unk> <s> </s>
// as 0 1 2, the 256 <0xXX> tokens as 3..258, then a few characters and merges (259 on).
json char_base() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 3 + b;
  int id = 259;
  for (const std::string& t : {SP, std::string("a"), std::string("b"), std::string("c"), SP + "a", std::string("ab"),
                               SP + "ab", std::string("\xc3\xa9"), std::string("x")})
    vocab[t] = id++;
  json j = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", json::array()},
            {"normalizer", {{"type", "Sequence"},
                            {"normalizers", {{{"type", "Prepend"}, {"prepend", SP}},
                                             {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", SP}}}}}},
            {"pre_tokenizer", nullptr},
            {"post_processor", {{"type", "TemplateProcessing"},
                                {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}}}}}},
                                {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}}}}}}},
            {"decoder", {{"type", "Sequence"},
                         {"decoders", {{{"type", "Replace"}, {"pattern", {{"String", SP}}}, {"content", " "}},
                                       {{"type", "ByteFallback"}},
                                       {{"type", "Fuse"}},
                                       {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", "<unk>"}, {"fuse_unk", true},
                       {"byte_fallback", true}, {"ignore_merges", false}, {"vocab", vocab},
                       {"merges", json::array({json::array({SP, "a"}), json::array({"a", "b"}), json::array({SP + "a", "b"})})}}}};
  add_token(j, "<unk>", 0, true);
  add_token(j, "<s>", 1, true);
  add_token(j, "</s>", 2, true);
  return j;
}

std::vector<std::pair<std::string, std::string>> good_merges() {
  return {{G, "t"}, {"h", "e"}, {G + "t", "he"}, {"t", "he"}, {"c", "o"}, {"i", "l"}, {"co", "il"}};
}

}  // namespace

TEST(Bpe, MergesByRankInBothFileFormats) {
  for (bool arrays : {true, false}) {
    auto t = parse(base(good_merges(), arrays));
    // "the" -> t,h,e -> t,he -> the; " the" -> Ġ,t,h,e -> Ġt,h,e -> Ġt,he -> Ġthe.
    EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{259, 258}));
    EXPECT_EQ(enc(*t, "coil"), (std::vector<int32_t>{262}));  // c,o,i,l -> co,i,l -> co,il -> coil
    EXPECT_EQ(t->token_id("coil"), 262);
    EXPECT_EQ(enc(*t, "x!"), (std::vector<int32_t>{'x', '!'}));  // printable bytes are their own ids here
    EXPECT_EQ(enc(*t, "\n"), (std::vector<int32_t>{'\n'}));
    EXPECT_EQ(t->decode(enc(*t, "the coil\n\tx y")), "the coil\n\tx y");
    EXPECT_EQ(t->piece(258), G + "the");
    EXPECT_EQ(t->vocab_size(), 263);
  }
  // The leftmost of two equal-rank merges goes first: "hehe" -> he,he (not h,eh,e).
  auto t = parse(base(good_merges()));
  EXPECT_EQ(enc(*t, "hehe"), (std::vector<int32_t>{257, 257}));
  // Pre-tokens never merge across the regex's splits: "the1" -> the, 1.
  EXPECT_EQ(enc(*t, "the1"), (std::vector<int32_t>{259, '1'}));
}

TEST(Bpe, AddedTokensSpecialIdsAndTemplate) {
  json j = base(good_merges());
  add_token(j, "<|endoftext|>", 263, true);
  add_token(j, "<|padding|>", 264, true);
  add_token(j, "<sep>", 265, true, /*lstrip=*/true, /*rstrip=*/true);
  add_token(j, "[w]", 266, false, false, false, /*single_word=*/true);
  auto t = parse(j);
  EXPECT_EQ(t->eos(), 263);
  EXPECT_EQ(t->pad(), 264);
  EXPECT_EQ(t->bos(), -1);
  EXPECT_EQ(enc(*t, "the<|endoftext|>the"), (std::vector<int32_t>{259, 263, 259}));
  EXPECT_EQ(t->decode({259, 263, 259}), "thethe");  // special tokens are skipped, as tokenizers' decode
  // lstrip and rstrip take the spaces around <sep> into the token.
  EXPECT_EQ(enc(*t, "the  <sep>  the"), (std::vector<int32_t>{259, 265, 259}));
  // single_word: only between non-word characters.
  EXPECT_EQ(enc(*t, "[w] x"), (std::vector<int32_t>{266, ' ', 'x'}));  // the byte ' ' is id 32 (Ġ)
  EXPECT_EQ(enc(*t, "a[w]"), (std::vector<int32_t>{'a', '[', 'w', ']'}));
  // A template: BOS before, EOS after.
  j["post_processor"] = {{"type", "Sequence"},
                         {"processors",
                          {{{"type", "ByteLevel"}, {"trim_offsets", false}},
                           {{"type", "TemplateProcessing"},
                            {"single", {{{"SpecialToken", {{"id", "<|padding|>"}, {"type_id", 0}}}},
                                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                        {{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}}}},
                            {"pair", json::array()},
                            {"special_tokens",
                             {{"<|padding|>", {{"id", "<|padding|>"}, {"ids", {264}}, {"tokens", {"<|padding|>"}}}},
                              {"<|endoftext|>", {{"id", "<|endoftext|>"}, {"ids", {263}}, {"tokens", {"<|endoftext|>"}}}}}}}}}};
  t = parse(j);
  std::vector<int32_t> ids;
  t->encode_with_specials("the", ids);
  EXPECT_EQ(ids, (std::vector<int32_t>{264, 259, 263}));
  EXPECT_EQ(t->bos(), 264);
  EXPECT_EQ(t->eos(), 263);
}

TEST(Bpe, InvalidUtf8IsReplacedAsPythonDoes) {
  std::string out;
  EXPECT_FALSE(replace_invalid_utf8("ok \xe2\x82\xac", out));
  // Python: bytes.decode("utf-8", errors="replace") of the same bytes.
  ASSERT_TRUE(replace_invalid_utf8("\xe2\x82 a\xff\xf0\x9f\x98", out));
  EXPECT_EQ(out, "\xef\xbf\xbd a\xef\xbf\xbd\xef\xbf\xbd");
  ASSERT_TRUE(replace_invalid_utf8("\xed\xa0\x80x", out));
  EXPECT_EQ(out, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdx");
  ASSERT_TRUE(replace_invalid_utf8("\xc0\xaf", out));
  EXPECT_EQ(out, "\xef\xbf\xbd\xef\xbf\xbd");
  ASSERT_TRUE(replace_invalid_utf8("\xf4\x90\x80\x80", out));
  EXPECT_EQ(out, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  auto t = parse(base(good_merges()));
  EXPECT_EQ(enc(*t, "the\xff"), enc(*t, "the\xef\xbf\xbd"));
}

TEST(Bpe, NormalizerAndSplitPreTokenizer) {
  json j = base(good_merges());
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}}}};
  auto t = parse(j);
  EXPECT_EQ(enc(*t, "e\xcc\x81"), enc(*t, "\xc3\xa9"));  // e + combining acute -> é
  // Split on "e", isolated, then ByteLevel without its regex: "the the" -> th, e, " th", e.
  auto split = [&](const json& pattern, const char* behavior, bool prefix) {
    j["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers",
                           {{{"type", "Split"}, {"pattern", pattern}, {"behavior", behavior}, {"invert", false}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", prefix}, {"use_regex", false}}}}};
    return parse(j);
  };
  t = split({{"Regex", "e"}}, "Isolated", false);
  EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{'t', 'h', 'e', 256, 'h', 'e'}));
  t = split({{"String", " "}}, "Removed", false);
  EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{259, 259}));
  t = split({{"String", " "}}, "Removed", true);  // add_prefix_space: each piece gets its space
  EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{258, 258}));
  t = split({{"Regex", "e"}}, "MergedWithPrevious", false);  // "the", " the" as the GPT-2 regex would
  EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{259, 258}));
  t = split({{"Regex", "t"}}, "MergedWithNext", false);  // "the ", "the"
  EXPECT_EQ(enc(*t, "the the"), (std::vector<int32_t>{259, ' ', 259}));
}

// The expected ids and texts are what PyPI's `tokenizers` 0.23.3 gives for the same files (its
// Tokenizer.from_str of char_base()'s JSON and the variants below); the parity test compares
// trained files of these pipelines on megabytes of text.
TEST(Bpe, CharacterLevelWithByteFallbackAsLlama2) {
  auto t = parse(char_base());
  using V = std::vector<int32_t>;
  EXPECT_EQ(enc(*t, "ab ab"), (V{265, 265}));
  EXPECT_EQ(enc(*t, "a\xe4\xb8\xad" "b"), (V{263, 231, 187, 176, 261}));  // 中 as its three bytes
  EXPECT_EQ(enc(*t, "ab</s>ab"), (V{265, 2, 265}));  // the prefix before each piece
  EXPECT_EQ(enc(*t, " ab"), (V{259, 265}));
  EXPECT_EQ(enc(*t, ""), V{});
  EXPECT_EQ(enc(*t, "a\xc3\xa9\xc3\xbfz"), (V{263, 266, 198, 194, 125}));  // é in the vocabulary, ÿ and z not
  EXPECT_EQ(enc(*t, "x" + SP + "y"), (V{259, 267, 259, 124}));
  std::vector<int32_t> with;
  t->encode_with_specials("ab", with);
  EXPECT_EQ(with, (V{1, 265}));
  EXPECT_EQ(t->bos(), 1);
  EXPECT_EQ(t->eos(), 2);
  EXPECT_EQ(t->decode({265, 265}), "ab ab");
  EXPECT_EQ(t->decode({265, 2, 265}), "ab ab");
  EXPECT_EQ(t->decode({259, 265}), " ab");
  EXPECT_EQ(t->decode({263, 231, 187, 176, 261}), "a\xe4\xb8\xad" "b");
  EXPECT_EQ(t->decode({231, 187, 260}), "\xef\xbf\xbd\xef\xbf\xbd" "a");  // an incomplete character: U+FFFD a byte
  EXPECT_EQ(t->decode({259, 259, 265}), "  ab");
  EXPECT_EQ(t->decode(enc(*t, "x" + SP + "y")), "x y");
  // A character whose bytes are not all there is unknown; the unknown comes after the bytes of the
  // next character (tokenizers' order), and consecutive unknowns fuse only with fuse_unk.
  json j = char_base();
  j["model"]["vocab"].erase("<0xE4>");
  j["model"]["vocab"]["zz"] = 3 + 0xE4;
  t = parse(j);
  EXPECT_EQ(enc(*t, "\xe4\xb8\xad\xc3\xbf"), (V{259, 198, 194, 0}));
  EXPECT_EQ(enc(*t, "\xe4\xb8\xad\xe4\xb8\xadx"), (V{259, 0, 267}));
  j["model"]["fuse_unk"] = false;
  EXPECT_EQ(enc(*parse(j), "\xe4\xb8\xad\xe4\xb8\xadx"), (V{259, 0, 0, 267}));
  // A merge across "x|\u2581": words are not cut before U+2581 then (data/bpe.cpp, split_at_meta).
  j = char_base();
  j["model"]["vocab"][SP + "y"] = 268;
  j["model"]["vocab"]["y"] = 269;
  j["model"]["vocab"]["x" + SP + "y"] = 270;
  j["model"]["merges"].push_back({SP, "y"});
  j["model"]["merges"].push_back({"x", SP + "y"});
  t = parse(j);
  EXPECT_EQ(enc(*t, "x y"), (V{259, 270}));
  EXPECT_EQ(enc(*t, "ab x y ab"), (V{265, 259, 270, 265}));
  EXPECT_EQ(t->decode({265, 259, 270, 265}), "ab x y ab");
}

TEST(Bpe, MetaspacePreTokenizerAndDecoder) {
  using V = std::vector<int32_t>;
  json j = char_base();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", SP}, {"prepend_scheme", "first"}, {"split", false}};
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", SP}, {"prepend_scheme", "first"}, {"split", false}};
  auto t = parse(j);
  EXPECT_EQ(enc(*t, "ab</s>ab"), (V{265, 2, 264}));  // "first": no prefix after the special token
  EXPECT_EQ(enc(*t, "</s>ab"), (V{2, 264}));
  EXPECT_EQ(enc(*t, " ab  b"), (V{265, 259, 259, 261}));
  EXPECT_EQ(t->decode({265, 2, 264}), "abab");
  EXPECT_EQ(t->decode({265, 259, 259, 261}), "ab  b");
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", SP}, {"prepend_scheme", "always"}, {"split", true}};
  t = parse(j);
  EXPECT_EQ(enc(*t, "ab</s>ab"), (V{265, 2, 265}));
  EXPECT_EQ(enc(*t, "ab  ab x"), (V{265, 259, 265, 259, 267}));
  EXPECT_EQ(enc(*t, "abab"), (V{265, 264}));
  EXPECT_EQ(t->decode({265, 259, 265, 259, 267}), "ab  ab x");
}

TEST(Bpe, UnimplementedOrBadFilesAreOneLineErrors) {
  auto expect = [](const std::string& what, const std::string& part) {
    EXPECT_NE(what.find(part), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_EQ(what.rfind("bad.json", 0), 0u) << what;
  };
  expect(error_of(std::string("not json")), "not a tokenizer.json");
  expect(error_of(std::string("{}")), "has no \"model\"");
  json j = base(good_merges());
  j["normalizer"] = {{"type", "Lowercase"}};
  expect(error_of(j), "normalizer Lowercase is not implemented");
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect(error_of(j), "pre-tokenizer Whitespace is not implemented");
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {j["pre_tokenizer"], j["pre_tokenizer"]}}};
  expect(error_of(j), "more than one ByteLevel pre-tokenizer is not implemented");
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {j["pre_tokenizer"], {{"type", "Metaspace"}, {"replacement", "\xe2\x96\x81"}}}}};
  expect(error_of(j), "pre-tokenizer Metaspace after ByteLevel is not implemented");
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Punctuation"}, {"behavior", "Sideways"}};
  expect(error_of(j), "Punctuation.behavior Sideways is not one of tokenizers' behaviors");
  j = base(good_merges());
  j["pre_tokenizer"] = nullptr;
  expect(error_of(j), "the ByteLevel decoder without a ByteLevel pre-tokenizer is not implemented");
  j = base(good_merges());
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", "\xe2\x96\x81"}};
  expect(error_of(j), "a ByteLevel pre-tokenizer needs the ByteLevel decoder alone");
  j = base(good_merges());
  j["decoder"] = {{"type", "CTC"}};
  expect(error_of(j), "decoder CTC is not implemented");
  j = base(good_merges());
  j["decoder"] = nullptr;
  expect(error_of(j), "no decoder");
  j = base(good_merges());
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  expect(error_of(j), "post-processor RobertaProcessing is not implemented");
  j = base(good_merges());
  j["model"]["type"] = "WordPiece";
  expect(error_of(j), "model type WordPiece is not implemented");
  j = base(good_merges());
  j["model"]["dropout"] = 0.1;
  expect(error_of(j), "model.dropout is not implemented");
  j = base(good_merges());
  j["model"]["byte_fallback"] = true;
  expect(error_of(j), "byte_fallback with a ByteLevel pre-tokenizer is not implemented");
  j = base(good_merges());
  j["truncation"] = {{"max_length", 10}};
  expect(error_of(j), "\"truncation\" is set");
  j = base(good_merges());
  j["model"]["merges"].push_back({"zz", "q"});
  expect(error_of(j), "a token is not in the vocabulary");
  j = base(good_merges());
  j["model"]["merges"].push_back("a b c");
  expect(error_of(j), "is not two tokens");
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  expect(error_of(j), "regex does not compile");
  j = base(good_merges());
  j["model"]["vocab"]["x"] = "seven";
  expect(error_of(j), "is not an integer id");
  // Character-level pipelines.
  j = char_base();
  j["normalizer"]["normalizers"][1]["pattern"] = {{"Regex", "( +"}};
  expect(error_of(j), "Replace: regex does not compile");
  j = char_base();
  j["normalizer"]["normalizers"][0]["prepend"] = "";
  expect(error_of(j), "Prepend.prepend is not a non-empty string");
  j = char_base();
  j["decoder"] = {{"type", "ByteLevel"}};
  expect(error_of(j), "the ByteLevel decoder without a ByteLevel pre-tokenizer is not implemented");
  j = char_base();
  j["decoder"]["decoders"][3]["content"] = "ab";
  expect(error_of(j), "decoder Strip.content is not one character");
  j = char_base();
  j["decoder"]["decoders"][3]["start"] = -1;
  expect(error_of(j), "decoder Strip.start is not a count");
  j = char_base();
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", SP}, {"prepend_scheme", "sometimes"}};
  expect(error_of(j), "Metaspace.prepend_scheme \"sometimes\" is not always, first or never");
  j = char_base();
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "__"}};
  expect(error_of(j), "Metaspace.replacement \"__\" is not one character");
}

TEST(Bpe, DigitsPunctuationAndPreTokenizersAfterByteLevel) {
  // Merges 12, .., the ByteLevel characters of "\u03b2" (bytes CE B2: "\u00ce\u00b2"), x1 and " x":
  // what each pre-tokenizer splits apart is not merged. The ids are `tokenizers`' for the same files.
  using V = std::vector<int32_t>;
  const std::string beta = byte_char(0xCE) + byte_char(0xB2);
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  auto with = [&](json pre) {
    json j = base({{"1", "2"}, {".", "."}, {byte_char(0xCE), byte_char(0xB2)}, {"x", "1"}, {G, "x"}});
    j["pre_tokenizer"] = pre;
    return parse(j);
  };
  auto seq = [](json a, json b) { return json{{"type", "Sequence"}, {"pretokenizers", {a, b}}}; };
  const std::string text = "x12 .. \u03b2 x1";
  EXPECT_EQ(enc(*with(byte_level), text), (V{120, 256, 32, 257, 32, 258, 260, 49}));
  EXPECT_EQ(enc(*with(seq({{"type", "Digits"}, {"individual_digits", true}}, byte_level)), text),
            (V{120, 49, 50, 32, 257, 32, 258, 260, 49}));
  EXPECT_EQ(enc(*with(seq({{"type", "Digits"}, {"individual_digits", false}}, byte_level)), text),
            (V{120, 256, 32, 257, 32, 258, 260, 49}));
  EXPECT_EQ(enc(*with(seq({{"type", "Punctuation"}, {"behavior", "Isolated"}}, byte_level)), text),
            (V{120, 256, 32, 46, 46, 32, 258, 260, 49}));
  EXPECT_EQ(enc(*with(seq({{"type", "Punctuation"}, {"behavior", "Contiguous"}}, byte_level)), text),
            (V{120, 256, 32, 257, 32, 258, 260, 49}));
  EXPECT_EQ(enc(*with(seq({{"type", "Punctuation"}}, byte_level)), text), (V{120, 256, 32, 46, 46, 32, 258, 260, 49}));
  // After ByteLevel, Digits sees its characters: B2's is U+00B2, a numeric, so "\u03b2" splits.
  EXPECT_EQ(enc(*with(seq(byte_level, {{"type", "Digits"}, {"individual_digits", false}})), text),
            (V{120, 256, 32, 257, 32, 206, 178, 260, 49}));
  EXPECT_EQ(with(seq(byte_level, {{"type", "Digits"}}))->decode({120, 256, 32, 206, 178}), "x12 \u03b2");
}

// A Unigram model (T5-style files; those `tokenizers` trains as Unigram) behind a splitting
// Metaspace: <unk> <s> </s> as 0 1 2, then U+2581 (3), a b c d (4-7), cd ab abc abcd (8-11),
// U+2581ab (12), x (13), and with byte_fallback three <0xXX> pieces (14-16). The expected ids are
// `tokenizers` 0.23.3's for the same files.
json unigram_base(bool byte_fallback = false) {
  json vocab = json::array({json::array({"<unk>", 0.0}), json::array({"<s>", 0.0}), json::array({"</s>", 0.0}),
                            json::array({SP, -2.0}), json::array({"a", -3.0}), json::array({"b", -3.0}),
                            json::array({"c", -3.0}), json::array({"d", -3.0}), json::array({"cd", -1.0}),
                            json::array({"ab", -2.0}), json::array({"abc", -5.0}), json::array({"abcd", -0.5}),
                            json::array({SP + "ab", -1.5}), json::array({"x", -4.0})});
  if (byte_fallback)
    for (const char* b : {"<0x79>", "<0xC3>", "<0xA9>"}) vocab.push_back(json::array({b, -9.0}));
  json metaspace = {{"type", "Metaspace"}, {"replacement", SP}, {"prepend_scheme", "always"}, {"split", true}};
  json j = {{"version", "1.0"},      {"truncation", nullptr}, {"padding", nullptr},    {"added_tokens", json::array()},
            {"normalizer", nullptr}, {"pre_tokenizer", metaspace}, {"post_processor", nullptr}, {"decoder", metaspace},
            {"model", {{"type", "Unigram"}, {"unk_id", 0}, {"vocab", vocab}, {"byte_fallback", byte_fallback}}}};
  add_token(j, "<s>", 1, true);
  add_token(j, "</s>", 2, true);
  return j;
}

TEST(Bpe, UnigramTakesTheBestPathAsTokenizersDoes) {
  using V = std::vector<int32_t>;
  auto t = parse(unigram_base());
  EXPECT_EQ(enc(*t, "abcdacdxx"), (V{3, 11, 4, 8, 13, 13}));  // tokenizers' own doc example, after U+2581
  EXPECT_EQ(enc(*t, "ab yy cd"), (V{12, 3, 0, 3, 8}));         // unknowns in a row: one <unk>
  EXPECT_EQ(enc(*t, "a\u00e9\u00e9b</s>c"), (V{3, 4, 0, 5, 2, 3, 6}));
  EXPECT_EQ(enc(*t, "xyx"), (V{3, 13, 0, 13}));
  EXPECT_EQ(t->decode({12, 3, 0, 3, 8}), "ab <unk> cd");
  EXPECT_EQ(t->decode({3, 11, 4, 8, 13, 13}), "abcdacdxx");
  // byte_fallback: an unknown run becomes its bytes' <0xXX> pieces when all are there, else <unk>.
  t = parse(unigram_base(true));
  EXPECT_EQ(enc(*t, "ab yy cd"), (V{12, 3, 14, 14, 3, 8}));
  EXPECT_EQ(enc(*t, "a\u00e9\u00e9b</s>c"), (V{3, 4, 15, 16, 15, 16, 5, 2, 3, 6}));
  EXPECT_EQ(enc(*t, "xzy"), (V{3, 13, 0}));
  // No unk_id: text in the pieces encodes; an unknown character is an error naming it.
  json j = unigram_base();
  j["model"]["unk_id"] = nullptr;
  t = parse(j);
  EXPECT_EQ(enc(*t, "ab cd"), (V{12, 3, 8}));
  try {
    enc(*t, "aq");
    ADD_FAILURE() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"q\" is in no piece of the Unigram model, and the model has no unk_id"),
              std::string::npos) << e.what();
  }
  // A tie that an ulp decides: U+2581 p pp with these scores; (s + p) + pp and (s + pp) + p are
  // equal for the doubles nearest the digits, but not for the doubles serde_json makes of them, and
  // tokenizers takes "pp p". Read with the nearest doubles, Coil would say "p pp" (4 5).
  const std::string tie = R"({"normalizer": null, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
      "prepend_scheme": "always", "split": true}, "decoder": {"type": "Metaspace", "replacement": "\u2581",
      "prepend_scheme": "always", "split": true}, "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": false,
      "vocab": [["<unk>", 0.0], ["<s>", 0.0], ["</s>", 0.0], ["\u2581", -5.628150632454997],
                ["p", -7.301906431843474], ["pp", -3.9294758067348843]]},
      "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                        "normalized": false, "special": true}]})";
  EXPECT_EQ(enc(*BpeTokenizer::parse(tie, "tie.json"), "ppp"), (V{3, 5, 4}));
}

// A charsmap for the normalizer Precompiled, made by hand: a darts-clone trie of 512 units with
// one key, "A" (root offset 1, the unit at 1 ^ 'A' = 64 labelled 'A' with a leaf at 64 ^ 1), whose
// replacement is "a"; as base64, as files hold it.
std::string tiny_charsmap() {
  std::vector<uint32_t> units(512, 0);
  units[0] = 1u << 10;
  units[64] = 0x41u | (1u << 8) | (1u << 10);
  units[65] = 0x80000000u;  // a leaf: value 0, the offset of "a"
  std::string blob(4, '\0');
  const auto size = static_cast<uint32_t>(units.size() * 4);
  std::memcpy(blob.data(), &size, 4);
  blob.append(reinterpret_cast<const char*>(units.data()), size);
  blob += std::string("a\0", 2);
  static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < blob.size(); i += 3) {
    uint32_t v = 0;
    for (size_t k = 0; k < 3; ++k) v = v << 8 | (i + k < blob.size() ? static_cast<unsigned char>(blob[i + k]) : 0);
    for (size_t k = 0; k < 4; ++k) out += i + k <= blob.size() ? kAlphabet[v >> (18 - 6 * k) & 63] : '=';
  }
  return out;
}

TEST(Bpe, PrecompiledNormalizerAsTokenizersRunsIt) {
  // "A" -> "a"; a grapheme cluster under 6 bytes is looked up whole and takes the rule of its
  // shortest prefix that has one, so "A" + U+0301 becomes "a" (the accent goes, as in tokenizers);
  // a longer cluster goes a character at a time. WhitespaceSplit then Metaspace, as the converted
  // files of T5 or ALBERT have them. The ids are tokenizers' for the same file.
  using V = std::vector<int32_t>;
  json j = unigram_base();
  j["model"]["vocab"] = json::array({json::array({"<unk>", 0.0}), json::array({"<s>", 0.0}), json::array({"</s>", 0.0}),
                                     json::array({SP, -2.0}), json::array({"a", -3.0}), json::array({"B", -3.0}),
                                     json::array({"x", -3.0}), json::array({"A", -3.0}), json::array({"\u0301", -3.0})});
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", tiny_charsmap()}};
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "WhitespaceSplit"}}, j["pre_tokenizer"]}}};
  const auto t = parse(j);
  EXPECT_EQ(enc(*t, "A"), (V{3, 4}));
  EXPECT_EQ(enc(*t, "AB"), (V{3, 4, 5}));
  EXPECT_EQ(enc(*t, "A\u0301x"), (V{3, 4, 6}));
  EXPECT_EQ(enc(*t, "A\u0301\u0301\u0301"), (V{3, 4, 8, 8, 8}));
  EXPECT_EQ(enc(*t, "x \tA\u0301  B\n"), (V{3, 6, 3, 4, 3, 5}));
  // Bad charsmaps: not base64, too short, a trie longer than the blob.
  for (const auto& [charsmap, part] : std::vector<std::pair<std::string, std::string>>{
           {"***", "Precompiled.precompiled_charsmap is not base64"},
           {"AAAA", "the precompiled_charsmap is not a sentencepiece charsmap (3 bytes, a trie of 0)"},
           {"/wAAAAAA", "the precompiled_charsmap is not a sentencepiece charsmap (6 bytes, a trie of 255)"}}) {
    j["normalizer"]["precompiled_charsmap"] = charsmap;
    const std::string what = error_of(j);
    EXPECT_NE(what.find(part), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
}

TEST(Bpe, BadUnigramFilesAreOneLineErrors) {
  auto expect = [](const json& j, const std::string& part) {
    const std::string what = error_of(j);
    EXPECT_NE(what.find(part), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  };
  json j = unigram_base();
  j["model"]["vocab"] = json::object();
  expect(j, "model.vocab of a Unigram model is not a non-empty list of [piece, score]");
  j = unigram_base();
  j["model"]["vocab"][4] = json::array({"a", "high"});
  expect(j, "model.vocab[4] is not [piece, score]");
  j = unigram_base();
  j["model"]["vocab"][4] = json::array({"a", -1.0, 7});
  expect(j, "model.vocab[4] is not [piece, score]");
  j = unigram_base();
  j["model"]["unk_id"] = 14;
  expect(j, "model.unk_id 14 is not an id of the vocabulary (14 pieces)");
  j = unigram_base();
  j["model"]["unk_id"] = -1;
  expect(j, "model.unk_id -1 is not an id of the vocabulary");
  j = unigram_base();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  j["decoder"] = {{"type", "ByteLevel"}};
  expect(j, "a Unigram model with a ByteLevel pre-tokenizer is not implemented");
  std::string huge = unigram_base().dump();
  huge.replace(huge.find("-0.5"), 4, "-1e400");
  const std::string what = error_of(huge);
  EXPECT_NE(what.find("not a tokenizer.json ([json.exception.out_of_range.406] number overflow parsing '-1e400')"),
            std::string::npos) << what;
}

TEST(Bpe, TokenizerFacadeFileBytesAndThreads) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("coil-test-bpe-{}", getpid());
  fs::create_directories(dir);
  json j = base(good_merges());
  add_token(j, "<|endoftext|>", 263, true);
  std::ofstream(dir / "tokenizer.json") << j.dump(1);
  const Tokenizer a((dir / "tokenizer.json").string());
  std::ifstream in(dir / "tokenizer.json");
  const Tokenizer b = Tokenizer::from_bytes(std::string(std::istreambuf_iterator<char>(in), {}), "ckpt: tokenizer");
  EXPECT_TRUE(a.is_bpe_json());
  EXPECT_TRUE(b.is_bpe_json());
  EXPECT_EQ(a.sha256(), b.sha256());
  EXPECT_EQ(a.sha256(), sha256_file((dir / "tokenizer.json").string()));
  EXPECT_EQ(a.eos(), 263);
  EXPECT_EQ(a.pad(), 263);  // no PAD: EOS pads
  EXPECT_EQ(a.vocab_size(), 264);
  const std::string text = "the coil the coil\nhe said: 'the' 123";
  EXPECT_EQ(a.encode(text), b.encode(text));
  EXPECT_EQ(a.decode(a.encode(text)), text);
  EXPECT_THROW(a.decode({999}), coil::Error);
  // Many threads at once give the same ids.
  std::vector<std::vector<int32_t>> got(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      for (int k = 0; k < 200; ++k) got[static_cast<size_t>(i)] = a.encode(text + std::to_string(k % 7));
    });
  for (auto& th : threads) th.join();
  for (const auto& g : got) EXPECT_EQ(g, a.encode(text + "3"));
  // A JSON that is not a tokenizer is an error naming it.
  std::ofstream(dir / "junk.json") << "{\"model\": 3}";
  EXPECT_THROW(Tokenizer((dir / "junk.json").string()), coil::Error);
  fs::remove_all(dir);
}

TEST(Bpe, SftMaskIsExactWithATokenizerJson) {
  json j = base(good_merges());
  add_token(j, "<|endoftext|>", 263, true);
  add_token(j, "### Response:", 264, false);  // one marker as an added token, the others as text
  const Tokenizer t = Tokenizer::from_bytes(j.dump(), "sft.json");
  AlpacaExample ex{"Name the coil.", "the coil", "The coil is the coil."};
  const std::vector<int32_t> prompt = t.encode(alpaca_prompt(ex)), response = t.encode(ex.output);
  EXPECT_NE(std::find(prompt.begin(), prompt.end(), 264), prompt.end());
  const int64_t p = static_cast<int64_t>(prompt.size()), n = static_cast<int64_t>(response.size());
  SftSample s;
  ASSERT_TRUE(make_sft_sample(t, ex, p + n + 3, s));
  ASSERT_EQ(static_cast<int64_t>(s.tokens.size()), p + n + 4);
  for (int64_t i = 0; i < p + n + 4; ++i) {
    const int32_t expected = i < p ? prompt[i] : i < p + n ? response[i - p] : 263;  // EOS, then EOS as PAD
    EXPECT_EQ(s.tokens[i], expected) << i;
    EXPECT_EQ(s.mask[i], i >= p && i <= p + n) << i;  // the response and its EOS, never the padding
  }
  EXPECT_EQ(t.decode(std::vector<int32_t>(s.tokens.begin() + p, s.tokens.begin() + p + n)), ex.output);
}

// The SFT sample of ex (in a row one token longer than it) holds the prompt's ids, the response's
// and EOS (2), the mask exactly on the response and its EOS.
void expect_exact_sft_mask(const Tokenizer& t, const AlpacaExample& ex) {
  const std::vector<int32_t> prompt = t.encode(alpaca_prompt(ex)), response = t.encode(ex.output);
  const int64_t p = static_cast<int64_t>(prompt.size()), n = static_cast<int64_t>(response.size());
  SftSample s;
  ASSERT_TRUE(make_sft_sample(t, ex, p + n + 2, s));
  ASSERT_EQ(static_cast<int64_t>(s.tokens.size()), p + n + 3);
  for (int64_t i = 0; i < p + n + 3; ++i) {
    const int32_t expected = i < p ? prompt[i] : i < p + n ? response[i - p] : 2;
    EXPECT_EQ(s.tokens[i], expected) << i;
    EXPECT_EQ(s.mask[i], i >= p && i <= p + n) << i;
  }
}

TEST(Bpe, SftMaskIsExactWithACharacterLevelFile) {
  // Llama-2 style: each encode call starts with the Prepend's U+2581, as sentencepiece's dummy
  // prefix does; the mask still covers exactly the response and its EOS.
  const Tokenizer t = Tokenizer::from_bytes(char_base().dump(), "llama2.json");
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
  EXPECT_EQ(t.pad(), 2);  // no PAD: EOS pads
  AlpacaExample ex{"Name a cab.", "", "a cab, \xe4\xb8\xad"};
  expect_exact_sft_mask(t, ex);
  EXPECT_EQ(t.decode(t.encode(ex.output)), ex.output);
  EXPECT_EQ(t.decode(t.encode(alpaca_prompt(ex))), alpaca_prompt(ex));
}

TEST(Bpe, SftMaskIsExactWithAUnigramFile) {
  // A Unigram file behind a Metaspace that prepends U+2581 to every piece of text: the prompt and
  // the response are encoded apart, so the mask covers exactly the response and its EOS.
  const Tokenizer t = Tokenizer::from_bytes(unigram_base().dump(), "unigram.json");
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
  EXPECT_EQ(t.pad(), 2);
  AlpacaExample ex{"Name a cab.", "", "ab cd abcd x"};
  expect_exact_sft_mask(t, ex);
  EXPECT_EQ(t.encode(ex.output), (std::vector<int32_t>{12, 3, 8, 3, 11, 3, 13}));
  EXPECT_EQ(t.decode(t.encode(ex.output)), ex.output);
}

TEST(Bpe, PrepareWithATokenizerJson) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("coil-test-bpe-prep-{}", getpid());
  fs::create_directories(dir);
  json j = base(good_merges());
  add_token(j, "<|endoftext|>", 263, true);
  std::ofstream(dir / "tokenizer.json") << j.dump();
  std::ofstream(dir / "docs.jsonl") << "{\"text\": \"the coil\"}\n{\"text\": \"he\\u00e9 the\"}\n";
  PrepareOptions o;
  o.inputs = {(dir / "docs.jsonl").string()};
  o.tokenizer = (dir / "tokenizer.json").string();
  o.output = (dir / "out").string();
  o.threads = 2;
  prepare_shards(o);
  const Tokenizer t(o.tokenizer);
  TokenShards shards((dir / "out").string());
  ASSERT_EQ(shards.documents(), 2);
  EXPECT_EQ(shards.document(0), t.encode("the coil"));
  EXPECT_EQ(shards.document(1), t.encode("he\xc3\xa9 the"));
  EXPECT_EQ(shards.eos(), 263);
  EXPECT_EQ(shards.tokenizer_sha256(), t.sha256());
  fs::remove_all(dir);
}

TEST(Bpe, HostileFilesAreErrorsNotCrashes) {
  // Ids far beyond the vocabulary, wrong types where objects are expected: errors, bounded memory.
  json j = base(good_merges());
  j["model"]["vocab"]["huge"] = 1 << 23;
  EXPECT_THROW(parse(j), coil::Error);
  j = base(good_merges());
  add_token(j, "<x>", 0, true);
  j["added_tokens"][0]["id"] = 5'000'000'000LL;
  EXPECT_THROW(parse(j), coil::Error);
  j = base(good_merges());
  j["added_tokens"] = "nope";
  EXPECT_THROW(parse(j), coil::Error);
  j = base(good_merges());
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", 7}, {"behavior", "Isolated"}};
  EXPECT_THROW(parse(j), coil::Error);
  j = base(good_merges());
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}}}}}},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {100000}}}}}}};
  EXPECT_THROW(parse(j), coil::Error);
  j = base(good_merges());
  j["model"]["merges"] = {{1, 2}};
  EXPECT_THROW(parse(j), coil::Error);
  for (const char* text : {"", "[", "{\"model\": {\"type\": \"BPE\", \"vocab\": [], \"merges\": []}}", "{\"model\": null}",
                           "\xff\xfe{}"})
    EXPECT_THROW(BpeTokenizer::parse(text, "bad.json"), coil::Error) << text;
}
