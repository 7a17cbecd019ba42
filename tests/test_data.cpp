// Data: readers, tokenizer, prepared shards, packing, the global order across ranks, resume,
// streaming and SFT formatting. Tiny hand-made inputs, exact expected values.
#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <fstream>
#include <numeric>
#include <random>
#include <set>

#include "data/loader.h"
#include "data/mixture.h"
#include "data/parquet.h"
#include "data/reader.h"
#include "data/sft.h"
#include "data/shards.h"
#include "data/streaming.h"
#include "data/tokenizer.h"
#include <fmt/ranges.h>

#include "tests/test_util.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace coil::data;
using namespace coil::test;

namespace {

std::string gzip(const std::string& data) {
  z_stream z{};
  deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&z, data.size()) + 64, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::string zstd(const std::string& data) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3));
  return out;
}

std::vector<std::string> documents(const std::vector<std::string>& files, const ReadOptions& o = {},
                                   ReadStats* stats = nullptr) {
  std::vector<std::string> docs;
  for_each_document(files, o, [&](std::string&& t) { docs.push_back(t); }, stats);
  return docs;
}

// Deterministic English-like text: words from a small list, sentences, paragraphs.
std::string make_text(std::mt19937& rng, int words) {
  static const char* kWords[] = {"the", "model", "reads", "a", "long", "sequence", "of", "tokens", "and",
                                 "state", "space", "selective", "scan", "learns", "to", "remember", "what",
                                 "matters", "in", "text", "data", "from", "web", "pages", "snake", "coil"};
  static const char* kSyllables[] = {"ka", "lo", "mi", "tren", "sta", "vo", "qui", "zel", "dor", "pha", "un", "ex"};
  std::string s;
  for (int i = 0; i < words; ++i) {
    if (i % 4 == 3) {  // a made-up word, so that there is more to learn than the list
      for (int k = 0; k < 2 + static_cast<int>(rng() % 3); ++k) s += kSyllables[rng() % 12];
    } else {
      s += kWords[rng() % (sizeof kWords / sizeof *kWords)];
    }
    s += (i % 13 == 12) ? ".\n" : " ";
  }
  return s;
}

// A tokenizer trained once for all the tests of this file.
class Corpus : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(fs::temp_directory_path() / fmt::format("coil-test-corpus-{}", getpid()));
    fs::create_directories(*dir_);
    std::mt19937 rng(7);
    std::string jsonl;
    for (int i = 0; i < 400; ++i) {
      std::string text = make_text(rng, 20 + static_cast<int>(rng() % 200));
      if (i % 50 == 0) text += " héllo wörld ✓ 日本語\ttab";
      jsonl += nlohmann_escape(text);
    }
    write_file(*dir_ + "/corpus.jsonl", jsonl);
    TokenizerTrainOptions o;
    o.inputs = {*dir_ + "/corpus.jsonl"};
    o.output_prefix = *dir_ + "/tok";
    o.vocab_size = 400;
    o.threads = 2;
    train_tokenizer(o);
    tokenizer_ = new Tokenizer(*dir_ + "/tok.model");
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string nlohmann_escape(const std::string& text) {
    std::string out = "{\"text\": \"";
    for (char c : text) {
      if (c == '"' || c == '\\') out += '\\', out += c;
      else if (c == '\n') out += "\\n";
      else if (c == '\t') out += "\\t";
      else out += c;
    }
    return out + "\", \"id\": 1}\n";
  }
  static std::string* dir_;
  static Tokenizer* tokenizer_;
};
std::string* Corpus::dir_ = nullptr;
Tokenizer* Corpus::tokenizer_ = nullptr;

// Writes a prepared data set in the documented format (data/shards.h) from token ids.
void write_shards(const std::string& dir, const std::vector<std::vector<int32_t>>& docs, int32_t eos,
                  int64_t docs_per_shard) {
  fs::create_directories(dir);
  std::string shards;
  int64_t total = 0;
  int n = 0;
  for (size_t first = 0; first < docs.size(); first += static_cast<size_t>(docs_per_shard), ++n) {
    std::vector<uint16_t> tokens;
    std::vector<uint64_t> offsets{0};
    for (size_t d = first; d < std::min(docs.size(), first + static_cast<size_t>(docs_per_shard)); ++d) {
      tokens.insert(tokens.end(), docs[d].begin(), docs[d].end());
      tokens.push_back(static_cast<uint16_t>(eos));
      offsets.push_back(tokens.size());
    }
    write_file(fmt::format("{}/t{}.bin", dir, n), std::string(reinterpret_cast<char*>(tokens.data()), tokens.size() * 2));
    write_file(fmt::format("{}/t{}.idx", dir, n), std::string(reinterpret_cast<char*>(offsets.data()), offsets.size() * 8));
    shards += fmt::format("{}{{\"tokens_file\": \"t{}.bin\", \"index_file\": \"t{}.idx\", \"tokens\": {}, \"documents\": {}}}",
                          n ? ", " : "", n, n, tokens.size(), offsets.size() - 1);
    total += static_cast<int64_t>(tokens.size());
  }
  write_file(dir + "/manifest.json",
             fmt::format("{{\"format\": \"coil.tokens\", \"version\": 1, \"dtype\": \"uint16\", \"eos_id\": {}, "
                         "\"vocab_size\": 1000, \"tokenizer\": {{\"file\": \"x\", \"sha256\": \"abc\"}}, \"tokens\": {}, "
                         "\"documents\": {}, \"shards\": [{}], \"inputs\": []}}",
                         eos, total, docs.size(), shards));
}

std::vector<int32_t> row(const Batch& b, int64_t r) {
  return {b.tokens.begin() + r * b.cols, b.tokens.begin() + (r + 1) * b.cols};
}

}  // namespace

// ---- Readers --------------------------------------------------------------------------------------

TEST(Reader, JsonlPlainGzipAndZstdGiveTheSameDocuments) {
  TempDir dir;
  const std::string jsonl =
      "{\"text\": \"first doc\", \"id\": 1}\n"
      "{\"text\": \"second\\nwith a newline\", \"url\": \"x\"}\r\n"
      "\n"
      "{\"text\": \"\"}\n"
      "{\"text\": \"last line, no newline\"}";
  write_file(dir / "a.jsonl", jsonl);
  write_file(dir / "a.jsonl.gz", gzip(jsonl.substr(0, 40)) + gzip(jsonl.substr(40)));  // two gzip members
  write_file(dir / "a.jsonl.zst", zstd(jsonl));
  const std::vector<std::string> expected = {"first doc", "second\nwith a newline", "last line, no newline"};
  for (const char* name : {"a.jsonl", "a.jsonl.gz", "a.jsonl.zst"}) {
    ReadStats stats;
    ::testing::internal::CaptureStderr();
    EXPECT_EQ(documents({dir / name}, {}, &stats), expected) << name;
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_EQ(stats.records, 5);
    EXPECT_EQ(stats.documents, 3);
    EXPECT_EQ(stats.empty, 1);
    EXPECT_EQ(stats.malformed, 1);  // the blank line is not JSON
    EXPECT_NE(err.find(std::string(name) + ":3: skipped"), std::string::npos) << err;
  }
}

TEST(Reader, TextFieldIsConfigurable) {
  TempDir dir;
  write_file(dir / "a.jsonl", "{\"content\": \"abc\", \"text\": 5}\n");
  ReadOptions o;
  o.text_field = "content";
  EXPECT_EQ(documents({dir / "a.jsonl"}, o), std::vector<std::string>{"abc"});
}

TEST(Reader, MalformedRecordsAreCountedThenFatalPastTheLimit) {
  TempDir dir;
  write_file(dir / "bad.jsonl",
             "{\"text\": \"ok\"}\n"
             "{\"text\": \"unterminated}\n"
             "[1, 2]\n"
             "{\"body\": \"no text field\"}\n"
             "{\"text\": 42}\n"
             "{\"text\": \"bad \xff utf8\"}\n"
             "{\"text\": \"ok again\"}\n");
  ReadStats stats;
  ReadOptions o;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(documents({dir / "bad.jsonl"}, o, &stats), (std::vector<std::string>{"ok", "ok again"}));
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(stats.malformed, 5);
  for (int line : {2, 3, 4, 5, 6}) EXPECT_NE(err.find(fmt::format("bad.jsonl:{}: skipped", line)), std::string::npos) << err;
  EXPECT_NE(err.find("no \"text\" field"), std::string::npos);
  EXPECT_NE(err.find("UTF-8"), std::string::npos) << err;

  o.max_bad_records = 2;
  ::testing::internal::CaptureStderr();
  try {
    documents({dir / "bad.jsonl"}, o);
    FAIL() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:4:"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("more than 2 malformed"), std::string::npos) << e.what();
  }
  ::testing::internal::GetCapturedStderr();
  o.max_bad_records = 0;
  EXPECT_THROW(documents({dir / "bad.jsonl"}, o), coil::Error);
}

TEST(Reader, OverlongLinesAreSkippedWithoutBufferingThem) {
  TempDir dir;
  // A 100 MB line between two good ones, read with the default limit (64 MiB).
  {
    std::ofstream f(dir / "big.jsonl", std::ios::binary);
    f << "{\"text\": \"before\"}\n{\"text\": \"";
    std::string mb(1 << 20, 'x');
    for (int i = 0; i < 100; ++i) f << mb;
    f << "\"}\n{\"text\": \"after\"}\n";
  }
  ReadStats stats;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(documents({dir / "big.jsonl"}, {}, &stats), (std::vector<std::string>{"before", "after"}));
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("big.jsonl:2: skipped: record longer than"), std::string::npos);
  EXPECT_EQ(stats.too_long, 1);
  fs::remove(dir / "big.jsonl");
  // A small limit, and a text file (one record) past it.
  ReadOptions o;
  o.max_record_bytes = 10;
  write_file(dir / "a.txt", "more than ten bytes");
  stats = {};
  ::testing::internal::CaptureStderr();
  EXPECT_TRUE(documents({dir / "a.txt"}, o, &stats).empty());
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(stats.too_long, 1);
}

// Found by fuzzing (tests/fuzz/corpus/jsonl/long-line.jsonl, docs/RELIABILITY.md): a line longer
// than max_record_bytes that lay within one read chunk was returned whole; only lines crossing a
// chunk were skipped. Now every over-long line is skipped, the last one (no newline) too.
TEST(Reader, OverlongLinesWithinAChunkAreSkippedToo) {
  TempDir dir;
  write_file(dir / "s.jsonl", "{\"text\": \"a\"}\n{\"text\": \"" + std::string(40, 'x') +
                                  "\"}\n{\"text\": \"b\"}\n{\"text\": \"" + std::string(40, 'y') + "\"}");
  ReadOptions o;
  o.max_record_bytes = 20;
  ReadStats stats;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(documents({dir / "s.jsonl"}, o, &stats), (std::vector<std::string>{"a", "b"}));
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("s.jsonl:2: skipped: record longer than 20 bytes"), std::string::npos) << err;
  EXPECT_NE(err.find("s.jsonl:4: skipped: record longer than 20 bytes"), std::string::npos) << err;
  EXPECT_EQ(stats.too_long, 2);
  EXPECT_EQ(stats.documents, 2);
}

TEST(Reader, TruncatedOrCorruptCompressedFilesAreErrors) {
  TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 2000; ++i) jsonl += fmt::format("{{\"text\": \"document number {}\"}}\n", i);
  const std::string gz = gzip(jsonl), zs = zstd(jsonl);
  write_file(dir / "t.jsonl.gz", gz.substr(0, gz.size() / 2));
  write_file(dir / "t.jsonl.zst", zs.substr(0, zs.size() / 2));
  std::string bad = zs;
  bad[0] ^= 0x5a;  // not a zstd frame
  write_file(dir / "c.jsonl.zst", bad);
  write_file(dir / "n.jsonl.gz", "this is not gzip at all");
  auto message = [&](const std::string& name) {
    try {
      documents({dir / name});
    } catch (const coil::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  ::testing::internal::CaptureStderr();
  EXPECT_NE(message("t.jsonl.gz").find("t.jsonl.gz: truncated gzip"), std::string::npos) << message("t.jsonl.gz");
  EXPECT_NE(message("t.jsonl.zst").find("t.jsonl.zst: truncated zstd"), std::string::npos) << message("t.jsonl.zst");
  EXPECT_NE(message("c.jsonl.zst").find("c.jsonl.zst: corrupt zstd"), std::string::npos) << message("c.jsonl.zst");
  EXPECT_NE(message("n.jsonl.gz").find("n.jsonl.gz: corrupt gzip"), std::string::npos) << message("n.jsonl.gz");
  ::testing::internal::GetCapturedStderr();
}

TEST(Reader, PlainTextIsOneDocumentAndMustBeUtf8) {
  TempDir dir;
  write_file(dir / "a.txt", "line one\n\nline two\n");
  write_file(dir / "b.md", "bad \xc3\x28 byte");
  write_file(dir / "c.txt", "");
  ReadStats stats;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(documents({dir / "a.txt", dir / "b.md", dir / "c.txt"}, {}, &stats),
            std::vector<std::string>{"line one\n\nline two\n"});
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("b.md:1: skipped: invalid UTF-8 at byte 4"), std::string::npos);
  EXPECT_EQ(stats.malformed, 1);
  EXPECT_EQ(stats.empty, 1);
}

TEST(Reader, Utf8Validation) {
  size_t at = 0;
  EXPECT_TRUE(valid_utf8("plain ascii"));
  EXPECT_TRUE(valid_utf8("h\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x90\x8d"));
  EXPECT_FALSE(valid_utf8("ab\xc0\xaf", &at));  // overlong '/'
  EXPECT_EQ(at, 2u);
  EXPECT_FALSE(valid_utf8("\xed\xa0\x80"));     // a surrogate
  EXPECT_FALSE(valid_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(valid_utf8("abc\xe2\x9c", &at));   // cut short
  EXPECT_EQ(at, 3u);
}

TEST(Reader, AlpacaJsonArrayAndJsonlAgree) {
  TempDir dir;
  write_file(dir / "a.json",
             "[\n {\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"},\n"
             " {\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"},\n"
             " {\"instruction\": \"No input field.\", \"output\": \"Fine.\"}\n]\n");
  write_file(dir / "a.jsonl",
             "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}\n"
             "{\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n"
             "{\"instruction\": \"No input field.\", \"output\": \"Fine.\"}\n"
             "{\"instruction\": \"No output.\"}\n");
  ReadStats s1, s2;
  auto a = read_alpaca({dir / "a.json"}, {}, &s1);
  ::testing::internal::CaptureStderr();
  auto b = read_alpaca({dir / "a.jsonl"}, {}, &s2);
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("a.jsonl:4: skipped: no \"output\" field"), std::string::npos);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a[i].instruction, b[i].instruction);
    EXPECT_EQ(a[i].input, b[i].input);
    EXPECT_EQ(a[i].output, b[i].output);
  }
  EXPECT_EQ(a[1].input, "2 and 3");
  EXPECT_EQ(a[2].input, "");
  EXPECT_EQ(s2.malformed, 1);
  write_file(dir / "broken.json", "[\n{\"instruction\": \"x\", \"output\": \"y\"},\n{oops}\n]");
  try {
    read_alpaca({dir / "broken.json"}, {});
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("broken.json:3: not a valid JSON array"), std::string::npos) << e.what();
  }
}

// Built with Arrow (tests/test_parquet.cpp has the rest) or without it (-DCOIL_PARQUET=OFF): a
// .parquet input is read as Parquet, or refused with one line saying why, never read as text.
TEST(Reader, ParquetIsReadOrRefusedNeverTakenForText) {
  TempDir dir;
  write_file(dir / "x.parquet", "{\"text\": \"not parquet\"}\n");
  std::string e;
  try {
    documents({dir / "x.parquet"});
  } catch (const coil::Error& err) {
    e = err.what();
  }
  const std::string want = parquet_supported() ? "x.parquet: not a Parquet file (it does not start with PAR1)"
                                               : "x.parquet: this Coil was built without Parquet support";
  EXPECT_NE(e.find(want), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  EXPECT_THROW(read_alpaca({dir / "x.parquet"}, {}), coil::Error);
}

// Found by fuzz_alpaca (tests/fuzz/corpus/alpaca/number-overflow.json, docs/RELIABILITY.md): a
// number too large for a double in a JSON array escaped as nlohmann's out_of_range exception
// (std::terminate in `coil sft`), not a coil::Error.
TEST(Reader, AJsonArrayWithANumberTooLargeIsAOneLineError) {
  TempDir dir;
  write_file(dir / "big.json", "[\n  {\"instruction\": \"x\", \"input\": 1e999, \"output\": \"y\"}\n]");
  try {
    read_alpaca({dir / "big.json"}, {});
    FAIL() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_EQ(std::string(e.what()), (dir / "big.json") + ": not a valid JSON array: number overflow parsing '1e999'");
  }
}

// Found by fuzz_sentencepiece (tests/fuzz/corpus/sentencepiece/empty-piece.model): a model whose
// pieces break sentencepiece's trie builder made it throw its own exception (darts_clone's), which
// escaped Tokenizer::from_bytes; now the same one-line error as any other malformed model.
TEST(Tokenizer, AModelThatBreaksTheTrieBuilderIsAOneLineError) {
  std::ifstream in(COIL_FUZZ_CORPUS "/sentencepiece/empty-piece.model", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(bytes.empty());
  try {
    Tokenizer::from_bytes(bytes, "ck/tokenizer");
    FAIL() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("ck/tokenizer: not a sentencepiece model (", 0), 0u) << e.what();
    EXPECT_NE(std::string(e.what()).find("zero-length key"), std::string::npos) << e.what();
  }
}

// Found by fuzz_tokenizer_text (tests/fuzz/corpus/tokenizer_text/meta-space.txt): sentencepiece
// writes spaces as U+2581, so that character in the text itself came back as a space (and
// "###\u2581Response:" as the SFT marker). Coil's tokenizers are lossless for every valid UTF-8.
TEST(Tokenizer, TheMetaSpaceCharacterRoundTrips) {
  Tokenizer tok(COIL_FUZZ_CORPUS "/sentencepiece/coil-unigram.model");
  const std::string meta = "\xe2\x96\x81";
  for (const std::string& text : {meta, "a" + meta + "b c", meta + meta + " x " + meta, "###" + meta + "Response:\n"}) {
    const std::vector<int32_t> ids = tok.encode(text);
    EXPECT_EQ(tok.decode(ids), text);
  }
  // As its three UTF-8 bytes (the byte-fallback pieces), never as the piece that means a space.
  ASSERT_EQ(tok.encode(meta).size(), 3u);
  EXPECT_EQ(tok.piece(tok.encode(meta)[0]), "<0xE2>");
  EXPECT_EQ(tok.piece(tok.encode(meta)[1]), "<0x96>");
  EXPECT_EQ(tok.piece(tok.encode(meta)[2]), "<0x81>");
  EXPECT_EQ(tok.decode(tok.encode("a b")), "a b");  // real spaces are unchanged
}

TEST(Reader, ExpandInputs) {
  TempDir dir;
  fs::create_directories(dir / "sub");
  for (const char* n : {"b.jsonl", "a.jsonl", "c.txt", "sub/z.jsonl"}) write_file(dir / n, "{}");
  EXPECT_EQ(expand_inputs(dir / "*.jsonl"), (std::vector<std::string>{dir / "a.jsonl", dir / "b.jsonl"}));
  EXPECT_EQ(expand_inputs(dir / "c.txt," + dir / "sub"), (std::vector<std::string>{dir / "c.txt", dir / "sub/z.jsonl"}));
  try {
    expand_inputs(dir / "*.parquet");
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no file matches"), std::string::npos);
  }
  try {
    expand_inputs(dir / "missing.jsonl");
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no such file: " + dir / "missing.jsonl"), std::string::npos);
  }
  EXPECT_THROW(expand_inputs(""), coil::Error);
}

// ---- Tokenizer ------------------------------------------------------------------------------------

TEST_F(Corpus, TokenizerIsLosslessWithFixedSpecialTokens) {
  const Tokenizer& t = *tokenizer_;
  EXPECT_EQ(t.vocab_size(), 400);
  EXPECT_EQ(t.piece(0), "<unk>");
  EXPECT_EQ(t.piece(1), "<s>");
  EXPECT_EQ(t.piece(2), "</s>");
  EXPECT_EQ(t.piece(3), "<pad>");
  EXPECT_EQ(t.eos(), 2);
  EXPECT_EQ(t.pad(), 3);
  for (const std::string& text : {std::string("the model reads  a long\n\nsequence"), std::string("  leading spaces"),
                                  std::string("Ünïcödé → 🐍 and \t tabs\r\n"), std::string("never seen: ЖЖЖ qqq 12345")}) {
    std::vector<int32_t> ids = t.encode(text);
    EXPECT_EQ(t.decode(ids), text);
    for (int32_t id : ids) EXPECT_NE(id, 0) << "byte fallback means no <unk>";
  }
  // The markers of the SFT template are single tokens.
  for (const std::string& m : sft_markers()) EXPECT_EQ(t.encode(m).size(), 1u) << m;
  EXPECT_EQ(t.sha256(), sha256_file(*dir_ + "/tok.model"));
  EXPECT_EQ(t.sha256().size(), 64u);
}

TEST_F(Corpus, BpeTrainsTooAndBadSettingsAreErrors) {
  TempDir dir;
  TokenizerTrainOptions o;
  o.inputs = {*dir_ + "/corpus.jsonl"};
  o.output_prefix = dir / "bpe";
  o.vocab_size = 350;
  o.model_type = "bpe";
  o.threads = 2;
  train_tokenizer(o);
  Tokenizer bpe(dir / "bpe.model");
  EXPECT_EQ(bpe.vocab_size(), 350);
  EXPECT_EQ(bpe.decode(bpe.encode("the selective scan ✓")), "the selective scan ✓");
  o.model_type = "wordpiece";
  EXPECT_THROW(train_tokenizer(o), coil::Error);
  o.model_type = "unigram";
  o.vocab_size = 100;
  EXPECT_THROW(train_tokenizer(o), coil::Error);
  write_file(dir / "empty.jsonl", "{\"text\": \"\"}\n");
  o.vocab_size = 400;
  o.inputs = {dir / "empty.jsonl"};
  EXPECT_THROW(train_tokenizer(o), coil::Error);
  EXPECT_FALSE(fs::exists(dir / "bpe.tmp.model"));
  EXPECT_THROW(Tokenizer(dir / "nope.model"), coil::Error);
  write_file(dir / "junk.model", "not a model");
  EXPECT_THROW(Tokenizer(dir / "junk.model"), coil::Error);
}

TEST(Tokenizer, VocabularyMustFitTheModel) {
  EXPECT_NO_THROW(check_vocab_fits(32000, 32000, "t.model"));
  try {
    check_vocab_fits(50280, 32000, "t.model");
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.model has 50280 ids but the model's vocabulary has 32000"), std::string::npos);
  }
}

// ---- Prepared shards and packing ------------------------------------------------------------------

TEST(Shards, PackingIsExactAcrossShardBoundaries) {
  TempDir dir;
  // Documents 10 11 12 | 20 21 | 30 31 32 33, EOS = 2: the stream is
  // 10 11 12 2 20 21 2 30 31 32 33 2, cut into rows of 5 that overlap by one.
  for (int64_t per_shard : {1, 2, 3}) {
    const std::string d = dir / fmt::format("s{}", per_shard);
    write_shards(d, {{10, 11, 12}, {20, 21}, {30, 31, 32, 33}}, 2, per_shard);
    auto shards = std::make_shared<TokenShards>(d);
    EXPECT_EQ(shards->tokens(), 12);
    EXPECT_EQ(shards->documents(), 3);
    EXPECT_EQ(shards->document(1), (std::vector<int32_t>{20, 21}));
    EXPECT_EQ(shards->document(2), (std::vector<int32_t>{30, 31, 32, 33}));
    PackedSamples samples(shards, 4);
    ASSERT_EQ(samples.size(), 2);  // (12 - 1) / 4
    std::vector<int32_t> s(5);
    samples.fill(0, s.data(), nullptr);
    EXPECT_EQ(s, (std::vector<int32_t>{10, 11, 12, 2, 20}));
    samples.fill(1, s.data(), nullptr);
    EXPECT_EQ(s, (std::vector<int32_t>{20, 21, 2, 30, 31}));
    PackedSamples long_rows(shards, 11);
    ASSERT_EQ(long_rows.size(), 1);
    std::vector<int32_t> all(12);
    long_rows.fill(0, all.data(), nullptr);
    EXPECT_EQ(all, (std::vector<int32_t>{10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 2}));
    EXPECT_THROW(PackedSamples(shards, 12), coil::Error);  // not one whole row
  }
}

// data.document_masking: the documents of a row numbered from the shards' index, the EOS ending a
// document counted in it, whatever the shard boundaries; nothing when it is off.
TEST(Shards, DocumentNumbersFollowTheIndex) {
  TempDir dir;
  for (int64_t per_shard : {1, 2, 3}) {
    const std::string d = dir / fmt::format("s{}", per_shard);
    // The stream 10 11 12 2 | 20 21 2 | 30 31 32 33 2 (documents 0, 1, 2; EOS = 2).
    write_shards(d, {{10, 11, 12}, {20, 21}, {30, 31, 32, 33}}, 2, per_shard);
    auto shards = std::make_shared<TokenShards>(d);
    PackedSamples samples(shards, 4, true);
    ASSERT_TRUE(samples.has_seq_idx());
    std::vector<int32_t> idx(5);
    samples.fill_seq_idx(0, idx.data());  // 10 11 12 2 20
    EXPECT_EQ(idx, (std::vector<int32_t>{0, 0, 0, 0, 1})) << per_shard;
    samples.fill_seq_idx(1, idx.data());  // 20 21 2 30 31
    EXPECT_EQ(idx, (std::vector<int32_t>{0, 0, 0, 1, 1})) << per_shard;
    std::vector<int32_t> all(12);
    PackedSamples(shards, 11, true).fill_seq_idx(0, all.data());
    EXPECT_EQ(all, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2})) << per_shard;
    std::vector<int32_t> mid(4);
    shards->document_numbers(5, 4, mid.data());  // 21 2 30 31
    EXPECT_EQ(mid, (std::vector<int32_t>{0, 0, 1, 1})) << per_shard;
    // Through the loader: the batch carries them beside the tokens, row by row.
    auto source = std::make_shared<PackedSamples>(shards, 4, true);
    Batch b = global_batch(*source, 2, 9, 0);
    ASSERT_EQ(b.seq_idx.size(), b.tokens.size());
    for (int64_t r = 0; r < 2; ++r) {
      const bool first = b.tokens[static_cast<size_t>(r * 5)] == 10;
      EXPECT_EQ(std::vector<int32_t>(b.seq_idx.begin() + r * 5, b.seq_idx.begin() + r * 5 + 5),
                first ? (std::vector<int32_t>{0, 0, 0, 0, 1}) : (std::vector<int32_t>{0, 0, 0, 1, 1}));
    }
    EXPECT_TRUE(global_batch(PackedSamples(shards, 4), 2, 9, 0).seq_idx.empty());
  }
  // An index whose offsets do not rise to the shard's length is refused at open.
  write_shards(dir / "bad", {{5, 6, 7}, {8}}, 2, 2);
  const std::vector<uint64_t> offsets{0, 6, 6};  // document 1 empty: not even its EOS
  write_file(dir / "bad/t0.idx", std::string(reinterpret_cast<const char*>(offsets.data()), 24));
  try {
    TokenShards s(dir / "bad");
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("t0.idx: the document offsets do not rise"), std::string::npos) << e.what();
  }
}

TEST(Shards, DamagedDataSetsAreErrors) {
  TempDir dir;
  write_shards(dir / "ok", {{5, 6, 7}, {8}}, 2, 1);
  write_file(dir / "ok/t1.bin", "x");  // the second shard cut short
  try {
    TokenShards s(dir / "ok");
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("t1.bin holds 1 bytes, its manifest says 4"), std::string::npos) << e.what();
  }
  EXPECT_THROW(TokenShards(dir / "missing"), coil::Error);
  fs::create_directories(dir / "bad");
  write_file(dir / "bad/manifest.json", "{\"format\": \"something else\"}");
  EXPECT_THROW(TokenShards(dir / "bad"), coil::Error);
}

TEST_F(Corpus, PrepareIsDeterministicAndMatchesTheTokenizer) {
  TempDir dir;
  write_file(dir / "b.jsonl.zst", zstd("{\"text\": \"the scan\"}\n{\"text\": \"\"}\n{\"text\": \"a coil\"}\n"));
  PrepareOptions o;
  o.inputs = {*dir_ + "/corpus.jsonl", dir / "b.jsonl.zst"};
  o.tokenizer = *dir_ + "/tok.model";
  o.shard_tokens = 5000;
  o.threads = 1;
  o.output = dir / "one";
  PrepareResult r1 = prepare_shards(o);
  o.threads = 3;
  o.output = dir / "three";
  PrepareResult r3 = prepare_shards(o);
  EXPECT_GT(r1.shards, 2);
  EXPECT_EQ(r1.shards, r3.shards);
  EXPECT_EQ(r1.stats.empty, 1);
  for (const auto& e : fs::directory_iterator(dir / "one"))
    EXPECT_EQ(read_bytes(e.path().string()), read_bytes(dir / "three/" + e.path().filename().string())) << e.path();
  // The documents are the inputs' documents, tokenized, in order; every one followed by EOS.
  std::vector<std::string> docs = documents(o.inputs);
  TokenShards shards(dir / "one");
  ASSERT_EQ(shards.documents(), static_cast<int64_t>(docs.size()));
  int64_t tokens = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::vector<int32_t> expected = tokenizer_->encode(docs[i]);
    EXPECT_EQ(shards.document(static_cast<int64_t>(i)), expected) << i;
    tokens += static_cast<int64_t>(expected.size()) + 1;
  }
  EXPECT_EQ(shards.tokens(), tokens);
  EXPECT_EQ(shards.tokenizer_sha256(), tokenizer_->sha256());
  std::vector<int32_t> last(2);
  shards.read(shards.tokens() - 2, 2, last.data());
  EXPECT_EQ(last, (std::vector<int32_t>{tokenizer_->encode("a coil").back(), 2}));
  // A second prepare into the same place needs --force, and then gives the same files.
  EXPECT_THROW(prepare_shards(o), coil::Error);
  o.force = true;
  prepare_shards(o);
  EXPECT_EQ(read_bytes(dir / "one/manifest.json"), read_bytes(dir / "three/manifest.json"));
  // No document at all is an error.
  write_file(dir / "empty.jsonl", "{\"text\": \"\"}\n");
  o.inputs = {dir / "empty.jsonl"};
  o.output = dir / "none";
  EXPECT_THROW(prepare_shards(o), coil::Error);
}

// ---- The global order -----------------------------------------------------------------------------

TEST(Order, PermutationIsABijection) {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 16ull, 17ull, 100ull, 1000ull, 4097ull, 65537ull}) {
    for (uint64_t key : {0ull, 1ull, 12345ull}) {
      Permutation p(n, key);
      std::vector<uint8_t> seen(n, 0);
      for (uint64_t i = 0; i < n; ++i) {
        uint64_t v = p(i);
        ASSERT_LT(v, n);
        ASSERT_FALSE(seen[v]) << "n=" << n;
        seen[v] = 1;
      }
    }
  }
  // Different keys give different orders, and the order is not the identity.
  Permutation a(1000, 1), b(1000, 2);
  int same = 0, fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += a(i) == b(i), fixed += a(i) == i;
  EXPECT_LT(same, 20);
  EXPECT_LT(fixed, 20);
  EXPECT_THROW(Permutation(0, 1), coil::Error);
}

namespace {

// 40 documents of distinct tokens: 100 + 10 * d + j.
std::shared_ptr<const PackedSamples> small_samples(const std::string& dir, int64_t seq_len) {
  std::vector<std::vector<int32_t>> docs;
  for (int d = 0; d < 40; ++d) {
    std::vector<int32_t> doc;
    for (int j = 0; j < 1 + d % 7; ++j) doc.push_back(100 + 10 * d + j);
    docs.push_back(doc);
  }
  write_shards(dir, docs, 2, 9);
  return std::make_shared<PackedSamples>(std::make_shared<TokenShards>(dir), seq_len);
}

// What all ranks of a world read at `steps` steps, put back together in rank order.
std::vector<Batch> run_world(std::shared_ptr<const SampleSource> source, int world, int64_t global, int64_t micro,
                             int64_t steps, uint64_t seed, const LoaderState* from = nullptr) {
  std::vector<std::unique_ptr<Loader>> loaders;
  for (int r = 0; r < world; ++r) {
    BatchGeometry g{source->cols() - 1, global, micro, r, world};
    loaders.push_back(make_indexed_loader(source, g, seed, r % 2 ? 0 : 3));
    if (from) loaders.back()->restore(*from);
  }
  std::vector<Batch> out;
  for (int64_t s = 0; s < steps; ++s) {
    Batch all;
    all.cols = source->cols();
    for (auto& l : loaders)
      for (int64_t m = 0; m < global / world / micro; ++m) {
        Batch b = l->next();
        all.rows += b.rows;
        all.tokens.insert(all.tokens.end(), b.tokens.begin(), b.tokens.end());
        all.mask.insert(all.mask.end(), b.mask.begin(), b.mask.end());
        all.seq_idx.insert(all.seq_idx.end(), b.seq_idx.begin(), b.seq_idx.end());
      }
    out.push_back(std::move(all));
  }
  return out;
}

// got[s] equals want[from + s] (tokens, mask and seq_idx) for every step s of got.
void expect_same_steps(const std::vector<Batch>& got, const std::vector<Batch>& want, size_t from, const std::string& what) {
  for (size_t s = 0; s < got.size(); ++s) {
    EXPECT_EQ(got[s].tokens, want[from + s].tokens) << what << " step " << s;
    EXPECT_EQ(got[s].mask, want[from + s].mask) << what << " step " << s;
    EXPECT_EQ(got[s].seq_idx, want[from + s].seq_idx) << what << " step " << s;
  }
}

}  // namespace

TEST(Order, GlobalBatchIsTheSameForAnyNumberOfRanks) {
  TempDir dir;
  auto source = small_samples(dir / "d", 6);
  ASSERT_GT(source->size(), 20);
  const int64_t global = 12, steps = 2 * source->size() / global + 2;  // past two epochs
  const std::pair<int, int64_t> worlds[] = {{1, 4}, {2, 3}, {3, 2}, {4, 3}};
  std::vector<Batch> reference;
  for (int64_t s = 0; s < steps; ++s) reference.push_back(global_batch(*source, global, 42, s));
  for (auto [world, micro] : worlds) {
    std::vector<Batch> got = run_world(source, world, global, micro, steps, 42);
    for (int64_t s = 0; s < steps; ++s) EXPECT_EQ(got[s].tokens, reference[s].tokens) << "world " << world << " step " << s;
  }
  // Each epoch visits every sample exactly once, in an order that changes with the epoch and seed.
  const int64_t S = source->size();
  std::vector<int32_t> tokens(static_cast<size_t>(source->cols()));
  std::map<std::vector<int32_t>, int64_t> index_of;  // the samples are distinct here
  for (int64_t i = 0; i < S; ++i) {
    source->fill(i, tokens.data(), nullptr);
    index_of[tokens] = i;
  }
  ASSERT_EQ(static_cast<int64_t>(index_of.size()), S);
  std::vector<int64_t> epoch0, epoch1;
  for (int64_t g = 0; g < 2 * S; ++g) {
    Batch b = global_batch(*source, 1, 42, g);
    (g < S ? epoch0 : epoch1).push_back(index_of.at(b.tokens));
  }
  std::vector<int64_t> sorted0 = epoch0, sorted1 = epoch1, all(static_cast<size_t>(S));
  std::sort(sorted0.begin(), sorted0.end());
  std::sort(sorted1.begin(), sorted1.end());
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(sorted0, all);
  EXPECT_EQ(sorted1, all);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_NE(global_batch(*source, global, 42, 0).tokens, global_batch(*source, global, 43, 0).tokens);
}

TEST(Order, ResumeGivesTheSameBatchesOnAnyNumberOfRanks) {
  TempDir dir;
  auto source = small_samples(dir / "d", 5);
  const int64_t global = 6;
  std::vector<Batch> straight = run_world(source, 2, global, 1, 10, 7);
  // Stop after 4 steps, save, restore (as JSON) on 1, 2 and 3 ranks.
  BatchGeometry g{5, global, 1, 0, 2};
  auto loader = make_indexed_loader(source, g, 7);
  for (int i = 0; i < 4 * 3; ++i) loader->next();
  LoaderState saved = LoaderState::from_json(loader->state().to_json());
  EXPECT_EQ(saved, loader->state());
  EXPECT_EQ(saved.next_sample, 4 * global);
  for (auto [world, micro] : {std::pair<int, int64_t>{1, 2}, {2, 1}, {3, 2}}) {
    std::vector<Batch> resumed = run_world(source, world, global, micro, 6, 0 /* the state's seed wins */, &saved);
    for (int s = 0; s < 6; ++s) EXPECT_EQ(resumed[s].tokens, straight[4 + s].tokens) << "world " << world;
  }
  // The state exists at step boundaries only, and belongs to its data.
  loader->next();
  EXPECT_THROW(loader->state(), coil::Error);
  auto other = small_samples(dir / "e", 4);
  auto wrong = make_indexed_loader(other, BatchGeometry{4, global, 1, 0, 1}, 7);
  EXPECT_THROW(wrong->restore(saved), coil::Error);
  EXPECT_THROW(LoaderState::from_json("{\"kind\": 1}"), coil::Error);
  // A streaming mixture's state holds its parts' states, one level deep.
  LoaderState mixed = saved, part = saved;
  part.epoch = 3, part.record = 17, part.offset = 5;
  mixed.parts = {part, saved};
  EXPECT_EQ(LoaderState::from_json(mixed.to_json()), mixed);
  EXPECT_FALSE(LoaderState::from_json(mixed.to_json()) == saved);
  LoaderState nested = saved;
  nested.parts = {mixed};
  EXPECT_NE(error_of([&] { LoaderState::from_json(nested.to_json()); }).find("not a data loader state (a part of parts)"),
            std::string::npos);
  EXPECT_THROW(make_indexed_loader(source, BatchGeometry{5, 7, 2, 0, 2}, 7), coil::Error);  // 7 % 4
}

// ---- SFT ------------------------------------------------------------------------------------------

// The sample of an example: tokens(prompt) + tokens(response) + EOS + padding, the mask 1 exactly on
// the response and its EOS; cut inside the response; dropped when no response token fits.
static void expect_exact_sample(const Tokenizer& t, const SftTemplate& templ, const AlpacaExample& ex) {
  const std::vector<int32_t> prompt = t.encode(templ.prompt(ex)), response = t.encode(ex.output);
  const int64_t p = static_cast<int64_t>(prompt.size()), n = static_cast<int64_t>(response.size());
  // Room for everything and padding.
  SftSample s;
  ASSERT_TRUE(make_sft_sample(t, ex, p + n + 4, s, templ));
  ASSERT_EQ(static_cast<int64_t>(s.tokens.size()), p + n + 5);
  for (int64_t i = 0; i < p + n + 5; ++i) {
    const int32_t expected = i < p ? prompt[i] : i < p + n ? response[i - p] : i == p + n ? t.eos() : t.pad();
    EXPECT_EQ(s.tokens[i], expected) << i;
    EXPECT_EQ(s.mask[i], i >= p && i <= p + n) << i;  // the response and its EOS
  }
  // Cut inside the response: the prompt and the start of the response stay.
  ASSERT_TRUE(make_sft_sample(t, ex, p, s, templ));  // p + 1 tokens: one response token
  EXPECT_EQ(std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + p), prompt);
  EXPECT_EQ(s.tokens[p], response[0]);
  EXPECT_EQ(std::count(s.mask.begin(), s.mask.end(), 1), 1);
  EXPECT_EQ(s.mask[p], 1);
  // No room for a response token: dropped.
  EXPECT_FALSE(make_sft_sample(t, ex, p - 1, s, templ));
}

TEST_F(Corpus, SftTemplateAndMaskAreExact) {
  AlpacaExample with{"Add the numbers.", "2 and 3", "The sum is 5."};
  AlpacaExample without{"Name a snake.", "", "A coil."};
  EXPECT_EQ(alpaca_prompt(with),
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
            "### Input:\n2 and 3\n\n### Response:\n");
  EXPECT_EQ(alpaca_prompt(without),
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nName a snake.\n\n### Response:\n");
  const SftTemplate alpaca;
  EXPECT_EQ(alpaca.prompt(with), alpaca_prompt(with));
  EXPECT_EQ(alpaca.id(), "");
  for (const AlpacaExample& ex : {with, without}) expect_exact_sample(*tokenizer_, alpaca, ex);
}

// A template of one's own, with markers that are several tokens each, and its no-input variant.
TEST_F(Corpus, SftTemplateOfOnesOwnKeepsTheMaskExact) {
  const Tokenizer& t = *tokenizer_;
  const SftTemplate chat("<|user|>\n{instruction}\n<|context|>\n{input}\n<|assistant|>\n{response}",
                         "<|user|>\n{instruction}\n<|assistant|>\n{response}");
  for (const char* marker : {"<|user|>\n", "\n<|assistant|>\n", "<|context|>"})
    EXPECT_GT(t.encode(marker).size(), 2u) << marker << " should be several tokens";
  AlpacaExample with{"Add the numbers.", "2 and 3", "The sum is 5."};
  AlpacaExample without{"Name a snake {input}.", "", "A coil."};  // a slot in the data is text
  EXPECT_EQ(chat.prompt(with), "<|user|>\nAdd the numbers.\n<|context|>\n2 and 3\n<|assistant|>\n");
  EXPECT_EQ(chat.prompt(without), "<|user|>\nName a snake {input}.\n<|assistant|>\n");
  for (const AlpacaExample& ex : {with, without}) expect_exact_sample(t, chat, ex);
  // Without a no-input variant, {input} is empty; literal braces stay text.
  const SftTemplate plain("Q{ {instruction} [{input}] {not a slot}\nA: {response}", "");
  EXPECT_EQ(plain.prompt(without), "Q{ Name a snake {input}. [] {not a slot}\nA: ");
  expect_exact_sample(t, plain, without);
  EXPECT_NE(plain.id(), chat.id());
  EXPECT_EQ(plain.id().size(), 16u);
  // The data's fingerprint names the template (a resume with another template is other data).
  TempDir dir;
  write_file(dir / "sft.jsonl", "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"hi\"}\n");
  const std::vector<std::string> files{dir / "sft.jsonl"};
  EXPECT_NE(SftDataset(files, t, 256, {}, 1, chat).fingerprint(), SftDataset(files, t, 256, {}, 1).fingerprint());
  EXPECT_EQ(SftDataset(files, t, 256, {}, 1, chat)[0].tokens[0], t.encode("<|user|>")[0]);
}

TEST(SftTemplate, BadTemplatesAreErrors) {
  const std::pair<const char*, const char*> bad[] = {
      {"{instruction} {input}", "must have one {response} slot, not 0"},
      {"{input} {response}", "must have one {instruction} slot, not 0"},
      {"{instruction} {input} {response}.", "must end with {response}"},
      {"{instruction} {output} {response}", "has an unknown slot {output}"},
      {"{instruction} {instruction} {input} {response}", "must have one {instruction} slot, not 2"},
      {"{instruction} {response} {response}", "must have one {response} slot, not 2"},
      {"{instruction}: {response}", "must have one {input} slot, not 0"},
  };
  for (const auto& [text, message] : bad) {
    EXPECT_NE(SftTemplate::problem(text, false).find(message), std::string::npos) << text;
    try {
      SftTemplate(text, "");
      ADD_FAILURE() << text << " was accepted";
    } catch (const coil::Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("the SFT template ") + message), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(SftTemplate::problem("{instruction} {input} {response}", false), "");
  EXPECT_EQ(SftTemplate::problem("{instruction} {response}", true), "");
  EXPECT_NE(SftTemplate::problem("{instruction} {input} {response}", true).find("must have no {input} slot"), std::string::npos);
  EXPECT_THROW(SftTemplate("{instruction} {input} {response}", "{instruction} {input} {response}"), coil::Error);
  EXPECT_THROW(SftTemplate::from_config("alpaca", "{instruction} {response}"), coil::Error);
  EXPECT_EQ(SftTemplate::from_config("alpaca", "").id(), "");
}

TEST_F(Corpus, SftDatasetDropsAndCountsAndOrdersIndependentlyOfRanks) {
  TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 30; ++i)
    jsonl += fmt::format("{{\"instruction\": \"Say {}.\", \"input\": \"{}\", \"output\": \"the model {}\"}}\n", i,
                         i % 3 == 0 ? std::string(i * 40, 'x') : "", i);
  write_file(dir / "sft.jsonl", jsonl);
  const int64_t seq_len = 120;
  auto ds = std::make_shared<SftDataset>(std::vector<std::string>{dir / "sft.jsonl"}, *tokenizer_, seq_len, ReadOptions{}, 2);
  int expected_dropped = 0;
  for (int i = 0; i < 30; ++i) {
    SftSample s;
    AlpacaExample ex{fmt::format("Say {}.", i), i % 3 == 0 ? std::string(i * 40, 'x') : "", fmt::format("the model {}", i)};
    expected_dropped += !make_sft_sample(*tokenizer_, ex, seq_len, s);
  }
  EXPECT_GT(expected_dropped, 0);
  EXPECT_EQ(ds->dropped(), expected_dropped);
  EXPECT_EQ(ds->size(), 30 - expected_dropped);
  std::vector<Batch> one = run_world(ds, 1, 4, 2, 12, 3), three = run_world(ds, 2, 4, 1, 12, 3);
  for (int s = 0; s < 12; ++s) {
    EXPECT_EQ(one[s].tokens, three[s].tokens);
    EXPECT_EQ(one[s].mask, three[s].mask);
    EXPECT_EQ(one[s].mask.size(), one[s].tokens.size());
  }
}

// ---- Streaming ------------------------------------------------------------------------------------

namespace {

std::vector<std::vector<int32_t>> drain(Loader& l, int batches) {
  std::vector<std::vector<int32_t>> rows;
  for (int i = 0; i < batches; ++i) {
    Batch b = l.next();
    for (int64_t r = 0; r < b.rows; ++r) rows.push_back(row(b, r));
  }
  return rows;
}

}  // namespace

TEST_F(Corpus, StreamingPacksThisRanksRecordsAndResumesExactly) {
  TempDir dir;
  // One file: the order of files plays no part, and rank r's records are r, r + N, ...
  std::vector<std::string> texts;
  std::mt19937 rng(3);
  std::string jsonl;
  for (int i = 0; i < 60; ++i) {
    texts.push_back(make_text(rng, 3 + static_cast<int>(rng() % 30)));
    jsonl += Corpus::nlohmann_escape(texts.back());
  }
  write_file(dir / "s.jsonl.zst", zstd(jsonl));
  const int64_t L = 16;
  for (int world : {1, 3}) {
    for (int rank = 0; rank < world; ++rank) {
      StreamingOptions o;
      o.files = {dir / "s.jsonl.zst"};
      o.tokenizer = *dir_ + "/tok.model";
      o.geometry = BatchGeometry{L, 2 * world, 2, rank, world};
      o.threads = 1 + rank % 2;
      auto loader = make_streaming_loader(o);
      std::vector<std::vector<int32_t>> rows = drain(*loader, 5);
      // The expected stream: this rank's documents with their EOS, rows overlapping by one.
      std::vector<int32_t> stream;
      for (size_t i = static_cast<size_t>(rank); stream.size() < 10 * L + 1; i += static_cast<size_t>(world)) {
        std::vector<int32_t> ids = tokenizer_->encode(texts[i % texts.size()]);
        stream.insert(stream.end(), ids.begin(), ids.end());
        stream.push_back(2);
      }
      for (size_t r = 0; r < rows.size(); ++r)
        EXPECT_EQ(rows[r], std::vector<int32_t>(stream.begin() + r * L, stream.begin() + r * L + L + 1))
            << "world " << world << " rank " << rank << " row " << r;
      // Resume from the state after 5 batches: the next batches are those of an unbroken run.
      LoaderState saved = LoaderState::from_json(loader->state().to_json());
      std::vector<std::vector<int32_t>> more = drain(*loader, 40);  // wraps into the next epochs
      o.threads = 2;
      auto resumed = make_streaming_loader(o);
      resumed->restore(saved);
      EXPECT_EQ(drain(*resumed, 40), more) << "world " << world << " rank " << rank;
    }
  }
}

TEST_F(Corpus, StreamingAcrossWorldSizesSkipsNoDocument) {
  TempDir dir;
  std::string a, b;
  for (int i = 0; i < 50; ++i) (i < 25 ? a : b) += fmt::format("{{\"text\": \"the model {}\"}}\n", i);
  write_file(dir / "a.jsonl", a);
  write_file(dir / "b.jsonl", b);
  std::vector<LoaderState> states;
  for (int rank = 0; rank < 2; ++rank) {
    StreamingOptions o;
    o.files = {dir / "a.jsonl", dir / "b.jsonl"};
    o.tokenizer = *dir_ + "/tok.model";
    o.geometry = BatchGeometry{8, 2, 1, rank, 2};
    auto l = make_streaming_loader(o);
    drain(*l, 3 + rank * 2);  // rank 1 is further on
    states.push_back(l->state());
  }
  LoaderState merged = merge_streaming_states(states, 2, 3);
  EXPECT_EQ(merged.world, 3);
  EXPECT_EQ(merged.rank, 2);
  EXPECT_EQ(merged.offset, 0);
  EXPECT_EQ(merged.record, std::min(states[0].record, states[1].record));
  EXPECT_LE(merged.record, std::max(states[0].record, states[1].record));
  // The merged state restores on the new world; the old one does not.
  StreamingOptions o;
  o.files = {dir / "a.jsonl", dir / "b.jsonl"};
  o.tokenizer = *dir_ + "/tok.model";
  o.geometry = BatchGeometry{8, 3, 1, 2, 3};
  auto l = make_streaming_loader(o);
  EXPECT_THROW(l->restore(states[0]), coil::Error);
  l->restore(merged);
  EXPECT_EQ(l->next().rows, 1);
}

// A streaming mixture: the row at global position g (whatever the number of ranks) is the next row
// of part Interleave.at(g)'s own stream on that rank; the state resumes exactly, merges across
// numbers of ranks part by part, and resumed with other weights and a new part, each part that
// was there goes on from its state.
TEST_F(Corpus, StreamingMixtureTakesTurnsOverTheGlobalRowsAndResumes) {
  TempDir dir;
  std::string a, b, c;
  for (int i = 0; i < 40; ++i) {
    a += fmt::format("{{\"text\": \"the model {} learns\"}}\n", i);
    b += fmt::format("{{\"text\": \"a tokenizer of {} words and more of them\"}}\n", i);
    c += fmt::format("{{\"text\": \"data {}\"}}\n", i);
  }
  write_file(dir / "a.jsonl", a);
  write_file(dir / "b.jsonl", b);
  write_file(dir / "c.jsonl", c);
  const int64_t L = 8, G = 4;
  auto options = [&](const std::string& file, uint64_t seed, int rank, int world, int64_t micro) {
    StreamingOptions o;
    o.files = {dir / file};
    o.tokenizer = *dir_ + "/tok.model";
    o.geometry = BatchGeometry{L, G, micro, rank, world};
    o.seed = seed;
    o.threads = 1;
    return o;
  };
  auto mixture = [&](int rank, int world, int64_t micro, std::vector<std::string> files, std::vector<double> weights) {
    std::vector<StreamingOptions> parts;
    for (size_t k = 0; k < files.size(); ++k) parts.push_back(options(files[k], 10 + k, rank, world, micro));
    return make_streaming_mixture(std::move(parts), files, weights);
  };
  const Interleave mix(apportion(int64_t{1} << 20, {3, 1}, {"a", "b"}));
  const int64_t steps = 6;
  for (int world : {1, 2}) {
    // The global rows of `steps` steps, and what each rank's part streams give.
    std::vector<std::vector<int32_t>> global(static_cast<size_t>(steps * G));
    std::vector<LoaderState> states;
    for (int rank = 0; rank < world; ++rank) {
      auto loader = mixture(rank, world, 1, {"a.jsonl", "b.jsonl"}, {3, 1});
      std::vector<std::unique_ptr<Loader>> own;
      for (const char* f : {"a.jsonl", "b.jsonl"}) own.push_back(make_streaming_loader(options(f, own.size() + 10, rank, world, 1)));
      const int64_t per = G / world;
      for (int64_t s = 0; s < steps; ++s) {
        if (s == 3) states.push_back(LoaderState::from_json(loader->state().to_json()));
        for (int64_t j = 0; j < per; ++j) {
          const int64_t g = s * G + rank * per + j;
          const std::vector<int32_t> got = row(loader->next(), 0);
          EXPECT_EQ(got, row(own[mix.at(g).part]->next(), 0)) << "world " << world << " row " << g;
          global[static_cast<size_t>(g)] = got;
        }
      }
    }
    EXPECT_EQ(states[0].next_sample, 3 * G);
    // Resumed at step 3 on the same world: the same rows.
    for (int rank = 0; rank < world; ++rank) {
      auto resumed = mixture(rank, world, 1, {"a.jsonl", "b.jsonl"}, {3, 1});
      resumed->restore(states[static_cast<size_t>(rank)]);
      EXPECT_EQ(resumed->state().fingerprint, states[static_cast<size_t>(rank)].fingerprint);
      for (int64_t s = 3; s < steps; ++s)
        for (int64_t j = 0; j < G / world; ++j)
          EXPECT_EQ(row(resumed->next(), 0), global[static_cast<size_t>(s * G + rank * (G / world) + j)]) << s << " " << j;
    }
    if (world == 2) {
      // Merged onto one rank: each part's states merged on its own, the interleave where it was.
      const LoaderState one = merge_streaming_states(states, 0, 1);
      EXPECT_EQ(one.next_sample, 3 * G);
      for (size_t p = 0; p < 2; ++p) EXPECT_EQ(one.parts[p], merge_streaming_states({states[0].parts[p], states[1].parts[p]}, 0, 1));
      auto merged = mixture(0, 1, 2, {"a.jsonl", "b.jsonl"}, {3, 1});
      EXPECT_THROW(merged->restore(states[1]), coil::Error);  // rank 1 of 2
      merged->restore(one);
      EXPECT_EQ(merged->next().rows, 2);
    }
  }
  // Resumed as a:b:c = 1:1:3 (c new): a and b go on from their states, c from its start, and the
  // interleave of the new shares starts at the saved step.
  auto saved = mixture(0, 1, 2, {"a.jsonl", "b.jsonl"}, {3, 1});
  for (int i = 0; i < 4; ++i) saved->next();
  const LoaderState at2 = saved->state();
  const std::vector<std::string> where = describe_streaming_state(at2);  // as coil ckpt inspect prints it
  ASSERT_EQ(where.size(), 3u);
  EXPECT_EQ(where[0], "streaming mixture of 2 parts, rank 0 of 1: next global row 8");
  EXPECT_EQ(where[2], fmt::format("part 1 b.jsonl: epoch {}, record {}, {} tokens of it used", at2.parts[1].epoch,
                                  at2.parts[1].record, at2.parts[1].offset));
  EXPECT_GT(at2.parts[1].record + at2.parts[1].offset, 0);
  auto changed = mixture(0, 1, 1, {"a.jsonl", "b.jsonl", "c.jsonl"}, {1, 1, 3});
  changed->restore(at2);
  EXPECT_NE(changed->state().fingerprint, at2.fingerprint);
  std::vector<std::unique_ptr<Loader>> own;
  for (size_t k = 0; k < 3; ++k) {
    own.push_back(make_streaming_loader(options(std::string(1, static_cast<char>('a' + k)) + ".jsonl", 10 + k, 0, 1, 1)));
    if (k < 2) own.back()->restore(at2.parts[k]);
  }
  const Interleave next(apportion(int64_t{1} << 20, {1, 1, 3}, {"a", "b", "c"}));  // a period of 5, not of 8
  for (int64_t g = 0; g < 12; ++g) EXPECT_EQ(row(changed->next(), 0), row(own[next.at(g).part]->next(), 0)) << g;
  // Refused: a state with no part in common.
  EXPECT_NE(error_of([&] { mixture(0, 1, 1, {"c.jsonl", "a.jsonl "}, {1, 1})->restore(at2); })
                .find("the saved loader state belongs to other data (none of its parts, a.jsonl, b.jsonl, is in this run's data)"),
            std::string::npos);
  // A single stream goes on as the part of its name in a mixture (the others from their starts),
  // and a mixture's part of that name as a single stream; the global row carries over.
  auto named = [&](const std::string& file, uint64_t seed, int64_t micro) {
    StreamingOptions o = options(file, seed, 0, 1, micro);
    o.name = file;
    return make_streaming_loader(o);
  };
  auto single = named("b.jsonl", 1, 2);
  for (int i = 0; i < 6; ++i) single->next();  // 3 steps of G = 4 rows
  const LoaderState alone = LoaderState::from_json(single->state().to_json());
  EXPECT_EQ(alone.name, "b.jsonl");
  EXPECT_EQ(alone.next_sample, 3 * G);
  EXPECT_EQ(describe_streaming_state(alone)[0],
            fmt::format("streaming b.jsonl, rank 0 of 1: epoch {}, record {}, {} tokens of it used", alone.epoch,
                        alone.record, alone.offset));
  auto grown = mixture(0, 1, 1, {"a.jsonl", "b.jsonl"}, {1, 3});
  grown->restore(alone);
  EXPECT_EQ(grown->state().next_sample, 3 * G);
  own.clear();
  own.push_back(make_streaming_loader(options("a.jsonl", 10, 0, 1, 1)));
  own.push_back(make_streaming_loader(options("b.jsonl", 1, 0, 1, 1)));
  own[1]->restore(alone);
  const Interleave one_three(apportion(int64_t{1} << 20, {1, 3}, {"a", "b"}));
  for (int64_t g = 0; g < 8; ++g) EXPECT_EQ(row(grown->next(), 0), row(own[one_three.at(g).part]->next(), 0)) << g;
  EXPECT_EQ(grown->state().next_sample, 5 * G);
  auto shrunk = named("b.jsonl", 7, 1);
  shrunk->restore(at2);
  EXPECT_EQ(shrunk->state().next_sample, at2.next_sample);
  auto b_alone = make_streaming_loader(options("b.jsonl", 0, 0, 1, 1));
  b_alone->restore(at2.parts[1]);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(row(shrunk->next(), 0), row(b_alone->next(), 0)) << i;
  // Refused: a single stream that is no part of the mixture, one saved without a name, and a
  // mixture none of whose parts is the single stream.
  EXPECT_NE(error_of([&] { mixture(0, 1, 1, {"a.jsonl", "c.jsonl"}, {1, 1})->restore(alone); })
                .find("the saved loader state belongs to other data (its stream, b.jsonl, is not a part of this run's "
                      "mixture: a.jsonl, c.jsonl)"),
            std::string::npos);
  auto plain = make_streaming_loader(options("a.jsonl", 1, 0, 1, 1));
  EXPECT_NE(error_of([&] { mixture(0, 1, 1, {"a.jsonl", "b.jsonl"}, {1, 1})->restore(plain->state()); })
                .find("the saved loader state is a single stream's that names no data.train entry"),
            std::string::npos);
  EXPECT_NE(error_of([&] { named("c.jsonl", 1, 1)->restore(at2); })
                .find("the saved loader state belongs to other data (a streamed mixture of a.jsonl, b.jsonl; this run "
                      "streams c.jsonl alone, none of its parts)"),
            std::string::npos);
}

TEST_F(Corpus, StreamingReportsBadFilesInsteadOfHanging) {
  TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 3000; ++i) jsonl += fmt::format("{{\"text\": \"document {}\"}}\n", i);
  const std::string zs = zstd(jsonl);
  write_file(dir / "t.jsonl.zst", zs.substr(0, zs.size() - 10));
  StreamingOptions o;
  o.files = {dir / "t.jsonl.zst"};
  o.tokenizer = *dir_ + "/tok.model";
  o.geometry = BatchGeometry{64, 4, 4, 0, 1};
  auto l = make_streaming_loader(o);
  try {
    for (int i = 0; i < 1000; ++i) l->next();
    FAIL() << "expected an error";
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated zstd"), std::string::npos) << e.what();
  }
  // Nothing usable at all: an error after one pass, not an endless loop.
  write_file(dir / "empty.jsonl", "{\"text\": \"\"}\n{\"text\": \"\"}\n");
  o.files = {dir / "empty.jsonl"};
  auto e = make_streaming_loader(o);
  EXPECT_THROW(e->next(), coil::Error);
}

// data.document_masking on streamed data: the packer numbers the documents of each row.
TEST_F(Corpus, StreamingNumbersTheDocumentsOfEachRow) {
  TempDir dir;
  std::vector<std::string> texts;
  std::mt19937 rng(5);
  std::string jsonl;
  for (int i = 0; i < 30; ++i) {
    texts.push_back(make_text(rng, 1 + static_cast<int>(rng() % 12)));
    jsonl += Corpus::nlohmann_escape(texts.back());
  }
  write_file(dir / "s.jsonl", jsonl);
  const int64_t L = 16;
  StreamingOptions o;
  o.files = {dir / "s.jsonl"};
  o.tokenizer = *dir_ + "/tok.model";
  o.geometry = BatchGeometry{L, 2, 2, 0, 1};
  o.document_masking = true;
  auto loader = make_streaming_loader(o);
  std::vector<int32_t> stream, doc;  // the stream and each position's document
  for (size_t i = 0; stream.size() < 8 * L + 1; ++i) {
    std::vector<int32_t> ids = tokenizer_->encode(texts[i % texts.size()]);
    ids.push_back(2);
    stream.insert(stream.end(), ids.begin(), ids.end());
    doc.insert(doc.end(), ids.size(), static_cast<int32_t>(i));
  }
  for (int step = 0; step < 4; ++step) {
    Batch b = loader->next();
    ASSERT_EQ(b.seq_idx.size(), b.tokens.size());
    for (int64_t r = 0; r < b.rows; ++r) {
      const size_t at = static_cast<size_t>((step * 2 + r) * L);
      std::vector<int32_t> want;
      for (int64_t j = 0; j <= L; ++j) want.push_back(doc[at + j] - doc[at]);
      EXPECT_EQ(row(b, r), std::vector<int32_t>(stream.begin() + at, stream.begin() + at + L + 1));
      EXPECT_EQ(std::vector<int32_t>(b.seq_idx.begin() + r * b.cols, b.seq_idx.begin() + (r + 1) * b.cols), want)
          << "row " << step * 2 + r;
    }
  }
  o.document_masking = false;
  EXPECT_TRUE(make_streaming_loader(o)->next().seq_idx.empty());
}

// ---- SFT packing ----------------------------------------------------------------------------------

namespace {

std::shared_ptr<const SftDataset> packing_examples(const std::string& dir, const Tokenizer& tok, int64_t seq_len) {
  fs::create_directories(dir);
  std::string jsonl;
  std::mt19937 rng(11);
  for (int i = 0; i < 80; ++i) {
    std::string out = make_text(rng, 1 + static_cast<int>(rng() % (i % 9 == 0 ? 200 : 20)));
    for (char& c : out)
      if (c == '\n' || c == '"' || c == '\\' || c == '\t') c = ' ';
    jsonl += fmt::format("{{\"instruction\": \"Say {}.\", \"input\": \"{}\", \"output\": \"{}\"}}\n", i,
                         i % 4 == 0 ? "some context" : "", out);
  }
  write_file(dir + "/sft.jsonl", jsonl);
  // A template of one's own (data.sft_template), short enough for the test tokenizer's seq_len.
  const SftTemplate templ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}",
                          "### Instruction:\n{instruction}\n\n### Response:\n{response}");
  return std::make_shared<SftDataset>(std::vector<std::string>{dir + "/sft.jsonl"}, tok, seq_len, ReadOptions{}, 2, templ);
}

std::vector<int32_t> slice(const std::vector<int32_t>& v, int64_t from, int64_t n) {
  return {v.begin() + from, v.begin() + from + n};
}

}  // namespace

// Each packed row is its examples back to back, each exactly as padded SFT makes it (tokens, and
// mask but for the first token), numbered by seq_idx, then padding (PAD, mask 0, a number of its
// own); every example once per epoch, in an order of (seed, epoch).
TEST_F(Corpus, SftPackedRowsReproduceEachExample) {
  TempDir dir;
  const int64_t seq_len = 160;
  auto ds = packing_examples(dir.str(), *tokenizer_, seq_len);
  ASSERT_EQ(ds->dropped(), 0);
  int64_t cut = 0;
  for (int64_t i = 0; i < ds->size(); ++i) cut += (*ds)[i].length == seq_len + 1;
  EXPECT_GT(cut, 0);  // some are cut, as today
  PackedSftSamples packed(ds, 3);
  const int64_t cols = seq_len + 1;
  int64_t first_row = 0;
  std::vector<int64_t> epoch_rows;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    const int64_t rows = packed.rows_in_epoch(3, epoch);
    epoch_rows.push_back(rows);
    EXPECT_LT(rows, ds->size() / 2);  // several examples to a row
    std::vector<int64_t> seen;
    int64_t targets = 0;
    for (int64_t r = 0; r < rows; ++r) {
      Batch b = global_batch(packed, 1, 3, first_row + r);
      ASSERT_EQ(b.cols, cols);
      ASSERT_EQ(b.seq_idx.size(), static_cast<size_t>(cols));
      const std::vector<int64_t> ex = packed.row_examples(3, epoch, r);
      ASSERT_FALSE(ex.empty());
      int64_t at = 0;
      for (size_t k = 0; k < ex.size(); ++k) {
        const SftSample& s = (*ds)[ex[k]];
        EXPECT_EQ(slice(b.tokens, at, s.length), slice(s.tokens, 0, s.length));
        EXPECT_EQ(b.mask[static_cast<size_t>(at)], 0);
        EXPECT_EQ(std::vector<uint8_t>(b.mask.begin() + at + 1, b.mask.begin() + at + s.length),
                  std::vector<uint8_t>(s.mask.begin() + 1, s.mask.begin() + s.length));
        EXPECT_EQ(slice(b.seq_idx, at, s.length), std::vector<int32_t>(static_cast<size_t>(s.length), static_cast<int32_t>(k)));
        if (s.length < cols) {
          EXPECT_EQ(b.tokens[static_cast<size_t>(at + s.length - 1)], tokenizer_->eos());
        }
        at += s.length;
        seen.push_back(ex[k]);
      }
      EXPECT_LE(at, cols);
      EXPECT_EQ(slice(b.tokens, at, cols - at), std::vector<int32_t>(static_cast<size_t>(cols - at), ds->pad()));
      EXPECT_EQ(std::count(b.mask.begin() + at, b.mask.end(), 1), 0);
      EXPECT_EQ(slice(b.seq_idx, at, cols - at), std::vector<int32_t>(static_cast<size_t>(cols - at), static_cast<int32_t>(ex.size())));
      targets += std::count(b.mask.begin(), b.mask.end(), 1);
    }
    EXPECT_EQ(targets, packed.target_tokens());
    std::vector<int64_t> sorted = seen, all(static_cast<size_t>(ds->size()));
    std::sort(sorted.begin(), sorted.end());
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all) << "epoch " << epoch;
    first_row += rows;
  }
  EXPECT_EQ(packed.size(), epoch_rows[0]);
  // Another epoch or another seed packs another order.
  EXPECT_NE(packed.row_examples(3, 0, 0), packed.row_examples(3, 1, 0));
  EXPECT_NE(packed.row_examples(3, 0, 0), packed.row_examples(4, 0, 0));
  // The padded data's state does not restore into the packed loader.
  auto padded = make_indexed_loader(ds, BatchGeometry{seq_len, 2, 1, 0, 1}, 3, 0);
  auto as_packed = make_indexed_loader(std::make_shared<PackedSftSamples>(ds, 3), BatchGeometry{seq_len, 2, 1, 0, 1}, 3, 0);
  EXPECT_THROW(as_packed->restore(padded->state()), coil::Error);
}

// The packing is a function of (seed, epoch): the same global batches on 1, 2 and 3 ranks, across
// epochs, and a resume mid-epoch on any number of ranks continues the unbroken run exactly.
TEST_F(Corpus, SftPackingIsIndependentOfRanksAndResumesExactly) {
  TempDir dir;
  const int64_t seq_len = 160;
  auto packed = std::make_shared<PackedSftSamples>(packing_examples(dir.str(), *tokenizer_, seq_len), 5);
  const int64_t global = 6, steps = 2 * packed->size() / global + 2;  // into a third epoch
  std::vector<Batch> reference;
  for (int64_t s = 0; s < steps; ++s) reference.push_back(global_batch(*packed, global, 5, s));
  for (auto [world, micro] : {std::pair<int, int64_t>{1, 3}, {2, 1}, {3, 2}}) {
    expect_same_steps(run_world(packed, world, global, micro, steps, 5), reference, 0, fmt::format("world {}", world));
  }
  // Stop after 3 steps on 2 ranks (mid-epoch), save, restore on 1, 2 and 3 ranks; the next 8 steps
  // run into the next epoch.
  std::vector<Batch> straight = run_world(packed, 2, global, 1, 3 + 8, 5);
  auto loader = make_indexed_loader(packed, BatchGeometry{seq_len, global, 1, 0, 2}, 5);
  for (int i = 0; i < 3 * 3; ++i) loader->next();
  LoaderState saved = LoaderState::from_json(loader->state().to_json());
  EXPECT_EQ(saved.next_sample, 3 * global);
  ASSERT_GT(3 * global + 8 * global, packed->size());
  ASSERT_LT(saved.next_sample, packed->size());
  // A fresh process: a new source (its caches empty) and the state's seed, not the run's.
  auto fresh = std::make_shared<PackedSftSamples>(packing_examples((dir / "again"), *tokenizer_, seq_len), 0);
  for (auto [world, micro] : {std::pair<int, int64_t>{1, 2}, {2, 1}, {3, 2}}) {
    expect_same_steps(run_world(fresh, world, global, micro, 8, 0, &saved), straight, 3, fmt::format("world {}", world));
  }
}

namespace {

// Best fit decreasing written plainly: per window of `window` positions, longest first (ties: the
// earlier position), each into the row with the least room that fits it (ties: the row opened
// first; a linear scan), else a new row. The rows of each window, their positions sorted, in the
// order they were opened (no shuffle).
std::vector<std::vector<std::vector<int64_t>>> reference_bfd(const std::vector<int64_t>& lengths, int64_t cols, int64_t window) {
  std::vector<std::vector<std::vector<int64_t>>> windows;
  for (int64_t from = 0; from < static_cast<int64_t>(lengths.size()); from += window) {
    std::vector<int64_t> ks;
    for (int64_t k = from; k < std::min<int64_t>(from + window, static_cast<int64_t>(lengths.size())); ++k) ks.push_back(k);
    std::stable_sort(ks.begin(), ks.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    std::vector<std::vector<int64_t>> rows;
    std::vector<int64_t> used;
    for (int64_t k : ks) {
      int64_t best = -1;
      for (size_t r = 0; r < rows.size(); ++r)
        if (used[r] + lengths[k] <= cols && (best < 0 || used[r] > used[best])) best = static_cast<int64_t>(r);
      if (best < 0) {
        rows.emplace_back();
        used.push_back(0);
        best = static_cast<int64_t>(rows.size()) - 1;
      }
      rows[best].push_back(k);
      used[best] += lengths[k];
    }
    for (auto& row : rows) std::sort(row.begin(), row.end());
    windows.push_back(rows);
  }
  return windows;
}

std::vector<std::vector<int64_t>> rows_of(const SftPacking& p) {
  std::vector<std::vector<int64_t>> rows;
  for (int64_t r = 0; r < p.rows(); ++r) rows.emplace_back(p.order.begin() + p.row_start[r], p.order.begin() + p.row_start[r + 1]);
  return rows;
}

// Lengths of Alpaca's shape for rows of `cols`: mostly short, a long tail, some a whole row.
std::vector<int64_t> alpaca_like_lengths(int64_t n, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> lengths;
  for (int64_t i = 0; i < n; ++i) {
    double x = 40 + std::exp(4.3 + 0.9 * std::normal_distribution<double>(0, 1)(rng));
    lengths.push_back(std::clamp<int64_t>(static_cast<int64_t>(x), 1, cols));
  }
  return lengths;
}

}  // namespace

// Hand-packed cases. 3 3 3 7 7 7 into rows of 10: the longest first, each 3 into the first of the
// rows with 3 free, {3 7} three times (first fit in the given order needs 4 rows). 6 5 4 3 2 2:
// the 4 into the 6's row (the least room), {6 4} {5 3 2} {2}; the same list reversed packs alike.
TEST(SftPacking, BestFitDecreasingPacksKnownLists) {
  auto sorted_rows = [](const SftPacking& p) {
    std::vector<std::vector<int64_t>> rows = rows_of(p);
    std::sort(rows.begin(), rows.end());
    return rows;
  };
  EXPECT_EQ(sorted_rows(pack_best_fit_decreasing({3, 3, 3, 7, 7, 7}, 10, 6, 7)),
            (std::vector<std::vector<int64_t>>{{0, 3}, {1, 4}, {2, 5}}));
  EXPECT_EQ(sorted_rows(pack_best_fit_decreasing({6, 5, 4, 3, 2, 2}, 10, 6, 7)),
            (std::vector<std::vector<int64_t>>{{0, 2}, {1, 3, 4}, {5}}));
  EXPECT_EQ(sorted_rows(pack_best_fit_decreasing({2, 2, 3, 4, 5, 6}, 10, 6, 7)),
            (std::vector<std::vector<int64_t>>{{0, 2, 4}, {1}, {3, 5}}));
  // Windows of 3: 3 3 3 then 7 7 7 apart, 4 rows: {0 1 2} then the 7s one a row.
  EXPECT_EQ(sorted_rows(pack_best_fit_decreasing({3, 3, 3, 7, 7, 7}, 10, 3, 7)),
            (std::vector<std::vector<int64_t>>{{0, 1, 2}, {3}, {4}, {5}}));
  EXPECT_THROW(pack_best_fit_decreasing({3, 11}, 10, 6, 7), coil::Error);  // longer than a row
  EXPECT_THROW(pack_best_fit_decreasing({3, 0}, 10, 6, 7), coil::Error);
}

// On Alpaca-like lengths, in windows: each window holds the rows a plain BFD makes of it (so the
// same fill), shuffled; every position once, no row over cols; the same key packs the same rows in
// the same order, another key the same rows in another order.
TEST(SftPacking, BestFitDecreasingMatchesAPlainReference) {
  const int64_t cols = 513, window = 700;
  const std::vector<int64_t> lengths = alpaca_like_lengths(2000, cols, 3);  // 3 windows, the last short
  ASSERT_GT(std::count(lengths.begin(), lengths.end(), cols), 0);
  const SftPacking p = pack_best_fit_decreasing(lengths, cols, window, 42);
  const auto reference = reference_bfd(lengths, cols, window);
  ASSERT_EQ(reference.size(), 3u);
  const std::vector<std::vector<int64_t>> rows = rows_of(p);
  std::vector<int64_t> seen;
  size_t at = 0, ref_rows = 0;
  bool shuffled = false;
  for (const auto& ref : reference) {
    ref_rows += ref.size();
    ASSERT_LE(at + ref.size(), rows.size());
    std::vector<std::vector<int64_t>> got(rows.begin() + at, rows.begin() + at + ref.size());
    shuffled |= got != ref;
    std::sort(got.begin(), got.end());
    std::vector<std::vector<int64_t>> want = ref;
    std::sort(want.begin(), want.end());
    EXPECT_EQ(got, want) << "window " << &ref - reference.data();
    at += ref.size();
  }
  EXPECT_EQ(rows.size(), ref_rows);
  EXPECT_TRUE(shuffled);
  for (const auto& row : rows) {
    int64_t used = 0;
    for (int64_t k : row) used += lengths[k];
    EXPECT_LE(used, cols);
    EXPECT_TRUE(std::is_sorted(row.begin(), row.end()));
    seen.insert(seen.end(), row.begin(), row.end());
  }
  std::sort(seen.begin(), seen.end());
  std::vector<int64_t> all(lengths.size());
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(seen, all);
  // Fuller than first fit over the lengths as they come (one pass, every row open).
  std::vector<int64_t> first_fit;
  for (int64_t len : lengths) {
    auto r = std::find_if(first_fit.begin(), first_fit.end(), [&](int64_t used) { return used + len <= cols; });
    if (r == first_fit.end()) first_fit.push_back(len); else *r += len;
  }
  EXPECT_LT(rows.size(), first_fit.size());
  const SftPacking again = pack_best_fit_decreasing(lengths, cols, window, 42);
  EXPECT_EQ(again.order, p.order);
  EXPECT_EQ(again.row_start, p.row_start);
  std::vector<std::vector<int64_t>> other = rows_of(pack_best_fit_decreasing(lengths, cols, window, 43)), sorted = rows;
  EXPECT_NE(other, rows);
  std::sort(other.begin(), other.end());
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(other, sorted);
}

// The packed SFT source's epoch is that BFD of the epoch's order (one window here): rebuilt from
// scratch it is the same; another epoch is another packing.
TEST_F(Corpus, SftPackingIsBestFitDecreasingOfTheEpochsOrder) {
  TempDir dir;
  const int64_t seq_len = 160;
  auto ds = packing_examples(dir.str(), *tokenizer_, seq_len);
  const int64_t n = ds->size();
  ASSERT_LE(n, PackedSftSamples::kPackWindow);
  PackedSftSamples packed(ds, 9), again(ds, 9);
  std::vector<std::vector<std::vector<int64_t>>> epochs;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> examples, lengths;
    for (int64_t k = 0; k < n; ++k) {
      examples.push_back(sample_at(epoch * n + k, n, 9));
      lengths.push_back((*ds)[examples.back()].length);
    }
    auto want = reference_bfd(lengths, seq_len + 1, n)[0];
    for (auto& row : want)
      for (int64_t& k : row) k = examples[k];
    const int64_t rows = packed.rows_in_epoch(9, epoch);
    ASSERT_EQ(rows, static_cast<int64_t>(want.size())) << "epoch " << epoch;
    EXPECT_EQ(again.rows_in_epoch(9, epoch), rows);
    std::vector<std::vector<int64_t>> got;
    for (int64_t r = 0; r < rows; ++r) {
      got.push_back(packed.row_examples(9, epoch, r));
      EXPECT_EQ(again.row_examples(9, epoch, r), got.back()) << "epoch " << epoch << " row " << r;
    }
    epochs.push_back(got);
    std::vector<int64_t> position(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) position[examples[k]] = k;
    for (const auto& row : got)  // a row keeps the epoch's order
      EXPECT_TRUE(std::is_sorted(row.begin(), row.end(), [&](int64_t a, int64_t b) { return position[a] < position[b]; }));
    // The same rows as the reference: compared as sets (each row's examples sorted, the rows sorted).
    for (auto* rows_ : {&got, &want}) {
      for (auto& row : *rows_) std::sort(row.begin(), row.end());
      std::sort(rows_->begin(), rows_->end());
    }
    EXPECT_EQ(got, want) << "epoch " << epoch;
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
}

// data.sft_packing with a train.seq_len shorter than the template itself: one line naming the keys.
TEST_F(Corpus, SftPackingRefusesASeqLenShorterThanTheTemplate) {
  const SftTemplate alpaca;
  const int64_t t = sft_template_tokens(*tokenizer_, alpaca);
  EXPECT_GT(t, 10) << t;
  EXPECT_NO_THROW(check_sft_packing(*tokenizer_, alpaca, t));
  try {
    check_sft_packing(*tokenizer_, alpaca, t - 1);
    FAIL();
  } catch (const coil::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(fmt::format("data.sft_packing: train.seq_len {} is shorter than the SFT template itself ({} tokens)",
                                    t - 1, t)), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos);
  }
  // A template of one's own counts its own tokens.
  const SftTemplate own("Q: {instruction} {input}\nA: {response}", "");
  EXPECT_LT(sft_template_tokens(*tokenizer_, own), t);
  EXPECT_NO_THROW(check_sft_packing(*tokenizer_, own, sft_template_tokens(*tokenizer_, own)));
  EXPECT_THROW(check_sft_packing(*tokenizer_, own, sft_template_tokens(*tokenizer_, own) - 1), coil::Error);
}

// ---- Mixtures (data/mixture.h) --------------------------------------------------------------------

namespace {

// n samples of `cols` tokens, sample i all base + i: each names its part and index.
class Numbered : public SampleSource {
 public:
  Numbered(int64_t n, int32_t base, int64_t cols = 5, std::string kind = "shards")
      : n_(n), base_(base), cols_(cols), kind_(std::move(kind)) {}
  int64_t size() const override { return n_; }
  int64_t cols() const override { return cols_; }
  int64_t target_tokens() const override { return n_ * (cols_ - 1); }
  bool has_mask() const override { return false; }
  void fill(int64_t i, int32_t* tokens, uint8_t*) const override {
    std::fill(tokens, tokens + cols_, base_ + static_cast<int32_t>(i));
  }
  std::string kind() const override { return kind_; }
  std::string fingerprint() const override { return fmt::format("numbered-{}-{}", base_, n_); }

 private:
  int64_t n_;
  int32_t base_;
  int64_t cols_;
  std::string kind_;
};

// The sample at mixture position g, as (part, index), from its tokens: part k's numbers start at 1000 k.
std::pair<int, int64_t> which(const SampleSource& mix, int64_t g, uint64_t seed) {
  Batch b = global_batch(mix, 1, seed, g);
  return {b.tokens[0] / 1000, b.tokens[0] % 1000};
}

}  // namespace

TEST(Mixture, ApportionIsByLargestRemainders) {
  const std::vector<std::string> names = {"a", "b", "c", "d"};
  auto of = [&](int64_t n, std::vector<double> w) {
    return apportion(n, w, std::vector<std::string>(names.begin(), names.begin() + static_cast<long>(w.size())));
  };
  EXPECT_EQ(of(100, {1, 1, 1}), (std::vector<int64_t>{34, 33, 33}));
  EXPECT_EQ(of(10, {0.7, 0.3}), (std::vector<int64_t>{7, 3}));
  EXPECT_EQ(of(7, {1, 2, 4}), (std::vector<int64_t>{1, 2, 4}));
  EXPECT_EQ(of(3, {1, 1}), (std::vector<int64_t>{2, 1}));                  // a tie: the lower index
  EXPECT_EQ(of(10, {3, 5, 12}), (std::vector<int64_t>{2, 2, 6}));         // 1.5 2.5 6: remainders .5 .5 0
  EXPECT_EQ(of(1000003, {3, 1}), (std::vector<int64_t>{750002, 250001}));  // sums to n
  EXPECT_NE(error_of([&] { of(100, {1, 0.001}); })
                .find("the weight 0.001 of b is less than one sample in an epoch of the mixture (100 samples): raise it"),
            std::string::npos);
  EXPECT_NE(error_of([&] { of(100, {1, 0}); }).find("the weight of b must be a finite number > 0, not 0"), std::string::npos);
  EXPECT_THROW(of(100, {-1, 1}), coil::Error);
  EXPECT_THROW(of(100, {1, std::nan("")}), coil::Error);
}

// Interleave against a plain merge: every part's samples (k, i) sorted by due time (2i + 1) / 2n_k
// (compared exactly, as (2i + 1) n_j against (2i' + 1) n_k), ties by part.
TEST(Mixture, InterleaveIsAMergeByDueTime) {
  std::mt19937 rng(3);
  std::vector<std::vector<int64_t>> cases = {{1}, {1, 1}, {2, 3}, {3, 5, 7}, {10, 1, 1}, {4, 4, 2, 6}, {1, 13}};
  for (int r = 0; r < 100; ++r) {
    std::vector<int64_t> q(1 + rng() % 8);
    for (auto& n : q) n = 1 + static_cast<int64_t>(rng() % 40);
    cases.push_back(q);
  }
  for (const auto& q : cases) {
    const Interleave mix(q);
    const int64_t S = std::accumulate(q.begin(), q.end(), int64_t{0}), E = 3;
    std::vector<std::pair<size_t, int64_t>> ref;
    for (size_t k = 0; k < q.size(); ++k)
      for (int64_t i = 0; i < (E + 1) * q[k]; ++i) ref.emplace_back(k, i);
    std::sort(ref.begin(), ref.end(), [&](const auto& a, const auto& b) {
      const int64_t ta = (2 * a.second + 1) * q[b.first], tb = (2 * b.second + 1) * q[a.first];
      return ta != tb ? ta < tb : a.first < b.first;
    });
    std::vector<int64_t> seen(q.size(), 0);
    double worst = 0;  // the largest distance from a part's share over all prefixes
    for (int64_t g = 0; g < E * S; ++g) {
      const Interleave::Place p = mix.at(g);
      ASSERT_EQ(p.part, ref[g].first) << "quotas " << fmt::format("{}", fmt::join(q, ",")) << " g " << g;
      ASSERT_EQ(p.index, ref[g].second) << g;
      EXPECT_EQ(mix.rank(p.part, p.index), g);
      for (size_t k = 0; k < q.size(); ++k) {
        EXPECT_EQ(mix.before(k, g), seen[k]) << k << " " << g;
        // Even: within one of the share at every prefix, exact at each epoch's end.
        worst = std::max(worst, std::abs(static_cast<double>(seen[k]) - static_cast<double>(g * q[k]) / S));
        if (g % S == 0) {
          EXPECT_EQ(seen[k], g / S * q[k]);
        }
      }
      ++seen[p.part];
    }
    // Measured over these cases: 0.5 with two parts (as Webster's method gives), 1.22 with up to 8.
    EXPECT_LE(worst, q.size() == 1 ? 0.0 : q.size() == 2 ? 0.5 : 1.5) << fmt::format("{}", fmt::join(q, ","));
  }
  // Large numbers: quotas of a billion, positions past 10^15 (128-bit products inside).
  const Interleave big({1000000007, 3, 123456789});
  for (int64_t g : {int64_t{0}, int64_t{1}, int64_t{999999999999999}, int64_t{1} << 52, (int64_t{1} << 52) + 1}) {
    const Interleave::Place p = big.at(g);
    EXPECT_EQ(big.rank(p.part, p.index), g);
    EXPECT_EQ(big.before(p.part, g), p.index);
    EXPECT_EQ(big.before(p.part, g + 1), p.index + 1);
  }
  // An epoch of S positions shifts every rank by S, across the switch from 64- to 128-bit arithmetic
  // (near i = 2^61 / the largest quota).
  const std::vector<int64_t> n = big.quotas();
  const int64_t S = std::accumulate(n.begin(), n.end(), int64_t{0});
  for (size_t k = 0; k < n.size(); ++k)
    for (int64_t i : {0, 5, 77})
      for (int64_t m : {1, 3, 1000, 1000000}) {
        const int64_t epochs = k == 1 ? m * 1000 : m;  // reach past the switch for the small part too
        EXPECT_EQ(big.rank(k, i + epochs * n[k]), big.rank(k, i) + epochs * S) << k << " " << i << " " << epochs;
      }
  EXPECT_THROW(Interleave({3, 0}), coil::Error);
}

// Parts of 10 and 20 samples weighted 2:1: an epoch of the mixture is 30 samples, 20 of part 0 (two
// passes over it) and 10 of part 1 (half of it). Each epoch holds exactly those counts; over two
// epochs every sample of part 0 appears 4 times and every one of part 1 once; each part's samples
// come in its own order, positions 0, 1, 2, ... one after the other, with its own seed.
TEST(Mixture, EachEpochHoldsEachPartsQuotaAndEachPartWalksItsOwnEpochs) {
  auto a = std::make_shared<Numbered>(10, 0), b = std::make_shared<Numbered>(20, 1000);
  const uint64_t seed = 9;
  MixedSamples mix({a, b}, {"a", "b"}, {2, 1}, seed);
  ASSERT_EQ(mix.size(), 30);
  EXPECT_EQ(mix.quotas(), (std::vector<int64_t>{20, 10}));
  EXPECT_EQ(mix.target_tokens(), 30 * 4);
  std::map<std::pair<int, int64_t>, int> seen;
  std::vector<int> in_epoch(2, 0);
  std::vector<int64_t> next(2, 0);
  std::vector<std::pair<int, int64_t>> order;
  for (int64_t g = 0; g < 60; ++g) {
    const auto [part, index] = which(mix, g, 0);
    order.emplace_back(part, index);
    ++seen[{part, index}];
    in_epoch[g / 30] += part == 0;
    EXPECT_EQ(index, sample_at(next[part]++, part ? 20 : 10, MixedSamples::part_seed(seed, part))) << g;
    EXPECT_EQ(static_cast<int>(mix.locate(g).part), part);
  }
  EXPECT_EQ(in_epoch, (std::vector<int>{20, 20}));
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ((seen[{0, i}]), 4) << i;
  for (int64_t i = 0; i < 20; ++i) EXPECT_EQ((seen[{1, i}]), 1) << i;
  EXPECT_EQ(seen.size(), 30u);
  MixedSamples other({a, b}, {"a", "b"}, {2, 1}, seed + 1);  // the seed orders each part
  std::vector<std::pair<int, int64_t>> reordered;
  for (int64_t g = 0; g < 60; ++g) reordered.push_back(which(other, g, 0));
  EXPECT_NE(order, reordered);
  // fill() numbers the parts one after the other.
  std::vector<int32_t> t(5);
  mix.fill(12, t.data(), nullptr);
  EXPECT_EQ(t[0], 1002);
}

// Without weights each part's share is its size: an epoch of the mixture is one epoch of each.
TEST(Mixture, WithoutWeightsAnEpochVisitsEverySampleOnce) {
  auto a = std::make_shared<Numbered>(7, 0), b = std::make_shared<Numbered>(13, 1000), c = std::make_shared<Numbered>(3, 2000);
  MixedSamples mix({a, b, c}, {"a", "b", "c"}, {}, 4);
  EXPECT_EQ(mix.quotas(), (std::vector<int64_t>{7, 13, 3}));
  for (int e = 0; e < 2; ++e) {
    std::set<std::pair<int, int64_t>> epoch;
    for (int64_t g = e * 23; g < (e + 1) * 23; ++g) epoch.insert(which(mix, g, 4));
    EXPECT_EQ(epoch.size(), 23u) << e;
  }
  const std::vector<std::string> lines = mix.describe("sequences");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[1], "part 1 b: 56.52% (13 of the 23 sequences of an epoch: its 13 1x)");
}

namespace {

// What a world of ranks reads in `steps` steps from `loader`-like sources, as (part, index) pairs
// of Numbered samples.
std::vector<std::pair<int, int64_t>> numbered(const std::vector<Batch>& batches) {
  std::vector<std::pair<int, int64_t>> out;
  for (const Batch& b : batches)
    for (int64_t r = 0; r < b.rows; ++r) out.emplace_back(b.tokens[r * b.cols] / 1000, b.tokens[r * b.cols] % 1000);
  return out;
}

// Part `part` of what was read, as positions of its own order with `seed`: they must be 0, 1, 2, ...
void expect_own_order(const std::vector<std::pair<int, int64_t>>& read, int part, int64_t size, uint64_t seed,
                      int64_t expected_count) {
  int64_t next = 0;
  for (const auto& [p, index] : read)
    if (p == part) {
      EXPECT_EQ(index, sample_at(next, size, seed)) << "part " << part << " sample " << next;
      ++next;
    }
  EXPECT_EQ(next, expected_count) << "part " << part;
}

}  // namespace

// A run resumed with another mixture (weights changed, a part added) goes on from the saved step
// with the new quotas: every part's samples still come in its own order, with none skipped or
// seen twice; a new part starts at its beginning. The state saved after the change resumes on any
// number of ranks. A single data set's run resumed as a mixture continues that set likewise.
TEST(Mixture, ChangingTheMixtureGoesOnFromWhereEachPartWas) {
  auto a = std::make_shared<Numbered>(10, 0), b = std::make_shared<Numbered>(20, 1000), c = std::make_shared<Numbered>(7, 2000);
  using Parts = std::vector<std::shared_ptr<const SampleSource>>;
  const int64_t global = 6;
  auto first = std::make_shared<MixedSamples>(Parts{a, b}, std::vector<std::string>{"a", "b"}, std::vector<double>{1, 1}, 3);
  std::vector<Batch> before = run_world(first, 2, global, 1, 5, 3);
  auto loader = make_indexed_loader(first, BatchGeometry{4, global, 1, 0, 1}, 3);
  for (int i = 0; i < 5 * global; ++i) loader->next();
  const LoaderState saved = LoaderState::from_json(loader->state().to_json());
  // Resumed as a:b:c = 1:2:1, the new mixture made with another seed (the saved parts keep theirs).
  auto second = std::make_shared<MixedSamples>(Parts{a, b, c}, std::vector<std::string>{"a", "b", "c"},
                                               std::vector<double>{1, 2, 1}, 99);
  EXPECT_EQ(second->quotas(), (std::vector<int64_t>{9, 19, 9}));  // 37 apportioned 1:2:1
  std::vector<Batch> after = run_world(second, 3, global, 2, 20, 0, &saved);
  std::vector<std::pair<int, int64_t>> read = numbered(before), then = numbered(after);
  std::vector<int> count(3, 0);
  for (size_t i = 0; i < 37; ++i) ++count[static_cast<size_t>(then[i].first)];
  EXPECT_EQ(count, (std::vector<int>{9, 19, 9}));  // the new shares from the step of the change
  read.insert(read.end(), then.begin(), then.end());
  int64_t of_a = 0, of_b = 0;
  for (const auto& r : read) of_a += r.first == 0, of_b += r.first == 1;
  expect_own_order(read, 0, 10, MixedSamples::part_seed(3, 0), of_a);
  expect_own_order(read, 1, 20, MixedSamples::part_seed(3, 1), of_b);
  expect_own_order(read, 2, 7, MixedSamples::part_seed(99, 2), static_cast<int64_t>(read.size()) - of_a - of_b);
  const Interleave shares({9, 19, 9});  // one epoch of 15 + 15 before, 120 samples after
  EXPECT_EQ(of_a, 15 + shares.before(0, 120));
  EXPECT_EQ(of_b, 15 + shares.before(1, 120));
  // The state after the change holds its segment: resumed on 1 and 2 ranks, the same batches.
  auto mid = make_indexed_loader(second, BatchGeometry{4, global, 1, 0, 1}, 0);
  mid->restore(saved);
  for (int i = 0; i < 8 * global; ++i) mid->next();
  const LoaderState later = LoaderState::from_json(mid->state().to_json());
  EXPECT_NE(later.fingerprint, second->fingerprint());  // from and offsets are in it
  // describe_state (coil ckpt inspect) says where each part is: how many of its samples were read.
  std::vector<int64_t> upto(3, 0);
  for (const auto& r : numbered(before)) ++upto[static_cast<size_t>(r.first)];  // the 30 before the change
  for (size_t i = 0; i < 8 * global; ++i) ++upto[static_cast<size_t>(then[i].first)];
  const std::vector<std::string> lines = describe_state(later);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0], "shards, next sample 78: a mixture of 3 parts, as it is since sample 30");
  for (size_t k = 0; k < 3; ++k)
    EXPECT_EQ(lines[k + 1].rfind(fmt::format("part {}: next sample {} of its own order, {:.2f}% (data numbered-{}-", k,
                                             upto[k], 100.0 * second->quotas()[k] / 37, 1000 * k), 0), 0u) << lines[k + 1];
  EXPECT_EQ(describe_state(saved)[1].rfind("part 0: next sample 15 of its own order, 50.00% (data numbered-0-10)", 0), 0u);
  for (auto [world, micro] : {std::pair<int, int64_t>{1, 3}, {2, 1}}) {
    std::vector<Batch> resumed = run_world(second, world, global, micro, 12, 0, &later);
    for (int s = 0; s < 12; ++s) EXPECT_EQ(resumed[s].tokens, after[8 + s].tokens) << "world " << world << " step " << s;
  }
  // A single data set's run (a alone, seed 3) resumed as a mixture a:c: a goes on in its own order.
  std::vector<Batch> alone = run_world(a, 1, global, 2, 4, 3);
  auto plain = make_indexed_loader(a, BatchGeometry{4, global, 2, 0, 1}, 3);
  for (int i = 0; i < 4 * 3; ++i) plain->next();
  auto ac = std::make_shared<MixedSamples>(Parts{a, c}, std::vector<std::string>{"a", "c"}, std::vector<double>{}, 7);
  const LoaderState plain_state = plain->state();
  std::vector<std::pair<int, int64_t>> seq = numbered(alone), more = numbered(run_world(ac, 2, global, 1, 6, 0, &plain_state));
  seq.insert(seq.end(), more.begin(), more.end());
  int64_t a_count = 0;
  for (const auto& r : seq) a_count += r.first == 0;
  expect_own_order(seq, 0, 10, 3, a_count);
  EXPECT_GT(a_count, 4 * global);
  // Data with no part in common is refused.
  auto strangers = std::make_shared<MixedSamples>(Parts{std::make_shared<Numbered>(5, 3000), c},
                                                  std::vector<std::string>{"x", "c"}, std::vector<double>{}, 1);
  for (std::shared_ptr<const SampleSource> other : Parts{strangers, c})
    EXPECT_NE(error_of([&] { make_indexed_loader(other, BatchGeometry{4, global, 1, 0, 1}, 0)->restore(saved); })
                  .find("the saved loader state belongs to other data (none of its parts is in this run's data)"),
              std::string::npos);
  // Down to one of its parts alone: b goes on in its own order, and the state after that resumes
  // on any number of ranks as it is (its fingerprint kept: not a change of mixture).
  std::vector<std::pair<int, int64_t>> only_b = numbered(before), b_after = numbered(run_world(b, 2, global, 1, 4, 0, &saved));
  for (const auto& r : b_after) EXPECT_EQ(r.first, 1);
  only_b.insert(only_b.end(), b_after.begin(), b_after.end());
  expect_own_order(only_b, 1, 20, MixedSamples::part_seed(3, 1), 15 + 4 * global);
  auto just_b = make_indexed_loader(b, BatchGeometry{4, global, 2, 0, 1}, 0);
  just_b->restore(saved);
  for (int i = 0; i < 2 * 3; ++i) just_b->next();
  const LoaderState b_state = LoaderState::from_json(just_b->state().to_json());
  auto again = make_indexed_loader(b, BatchGeometry{4, global, 1, 0, 1}, 0);
  again->restore(b_state);
  EXPECT_EQ(again->state().fingerprint, b_state.fingerprint);
  std::vector<Batch> b_resumed = run_world(b, 3, global, 2, 2, 0, &b_state);
  std::vector<Batch> b_straight = run_world(b, 1, global, 6, 4, 0, &saved);
  for (int s = 0; s < 2; ++s) EXPECT_EQ(b_resumed[s].tokens, b_straight[2 + s].tokens) << s;
}

// A mixture of prepared data sets with document numbers (and one of packed SFT sets) gives the same
// global batches on any number of ranks, and resumes exactly from a saved state on another.
TEST_F(Corpus, MixtureIsIndependentOfRanksAndResumesExactly) {
  TempDir dir;
  std::vector<std::vector<int32_t>> docs_a, docs_b;
  for (int d = 0; d < 30; ++d) docs_a.push_back(std::vector<int32_t>(1 + d % 5, 100 + d));
  for (int d = 0; d < 12; ++d) docs_b.push_back(std::vector<int32_t>(2 + d % 9, 500 + d));
  write_shards(dir / "a", docs_a, 2, 7);
  write_shards(dir / "b", docs_b, 2, 5);
  auto part = [&](const char* name) {
    return std::make_shared<PackedSamples>(std::make_shared<TokenShards>(dir / name), 4, /*document_masking=*/true);
  };
  auto shards = std::make_shared<MixedSamples>(std::vector<std::shared_ptr<const SampleSource>>{part("a"), part("b")},
                                               std::vector<std::string>{"a", "b"}, std::vector<double>{1, 3}, 5);
  const int64_t seq_len = 160;
  auto packed = [&](const std::string& sub, uint64_t seed) -> std::shared_ptr<const SampleSource> {
    return std::make_shared<PackedSftSamples>(packing_examples(dir / sub, *tokenizer_, seq_len), seed);
  };
  auto sft = std::make_shared<MixedSamples>(
      std::vector<std::shared_ptr<const SampleSource>>{packed("s0", MixedSamples::part_seed(5, 0)),
                                                       packed("s1", MixedSamples::part_seed(5, 1))},
      std::vector<std::string>{"s0", "s1"}, std::vector<double>{2, 1}, 5);
  for (const auto& mix : {std::shared_ptr<const MixedSamples>(shards), std::shared_ptr<const MixedSamples>(sft)}) {
    ASSERT_TRUE(mix->has_seq_idx());
    const int64_t global = 6, steps = 2 * mix->size() / global + 2;  // into a third epoch
    std::vector<Batch> reference;
    for (int64_t s = 0; s < steps; ++s) reference.push_back(global_batch(*mix, global, 5, s));
    for (auto [world, micro] : {std::pair<int, int64_t>{1, 3}, {2, 1}, {3, 2}}) {
      expect_same_steps(run_world(mix, world, global, micro, steps, 5), reference, 0,
                        fmt::format("{} world {}", mix->kind(), world));
    }
    auto loader = make_indexed_loader(mix, BatchGeometry{mix->cols() - 1, global, 1, 0, 2}, 5);
    for (int i = 0; i < 3 * 3; ++i) loader->next();
    const LoaderState saved = LoaderState::from_json(loader->state().to_json());
    for (auto [world, micro] : {std::pair<int, int64_t>{1, 2}, {3, 1}}) {
      expect_same_steps(run_world(mix, world, global, micro, steps - 3, 0, &saved), reference, 3,
                        fmt::format("{} world {}", mix->kind(), world));
    }
  }
  // Each row of the shards mixture is a row of one of its parts, with its document numbers.
  Batch first = global_batch(*shards, shards->size(), 5, 0);
  for (int64_t r = 0; r < first.rows; ++r) {
    const MixedSamples::Place at = shards->locate(r);
    Batch own = global_batch(*part(at.part ? "b" : "a"), 1, MixedSamples::part_seed(5, at.part), at.position);
    EXPECT_EQ(row(first, r), own.tokens) << r;
    EXPECT_EQ(std::vector<int32_t>(first.seq_idx.begin() + r * first.cols, first.seq_idx.begin() + (r + 1) * first.cols),
              own.seq_idx) << r;
  }
  // One of its parts alone goes on from a mixture's state where that part was.
  auto loader = make_indexed_loader(shards, BatchGeometry{4, 6, 1, 0, 1}, 5);
  for (int i = 0; i < 6; ++i) loader->next();  // one step of 6 rows
  int64_t of_a = 0;
  for (int64_t g = 0; g < 6; ++g) of_a += shards->locate(g).part == 0;
  auto alone = make_indexed_loader(part("a"), BatchGeometry{4, 6, 1, 0, 1}, 0);
  alone->restore(loader->state());
  for (int64_t i = 0; i < 3; ++i)
    EXPECT_EQ(alone->next().tokens, global_batch(*part("a"), 1, MixedSamples::part_seed(5, 0), of_a + i).tokens) << i;
}

// Sizes and positions past what the interleave's arithmetic holds, and damaged saved states (as
// fuzz_loader_state found: quotas of 2^62 overflowed their sum), are one-line errors.
TEST(Mixture, HugeSizesAndDamagedStatesAreErrors) {
  EXPECT_NE(error_of([] { Interleave({int64_t{1} << 40, 1}); }).find("a mixture of more than 2^40 samples an epoch"),
            std::string::npos);
  const Interleave mix({3, 5});
  EXPECT_NE(error_of([&] { mix.at((int64_t{1} << 61) + 1); }).find("is outside [0, 2^61]"), std::string::npos);
  EXPECT_EQ(mix.at(int64_t{1} << 61).index, mix.before(mix.at(int64_t{1} << 61).part, int64_t{1} << 61));
  auto a = std::make_shared<Numbered>(10, 0), b = std::make_shared<Numbered>(20, 1000);
  auto m = std::make_shared<MixedSamples>(std::vector<std::shared_ptr<const SampleSource>>{a, b},
                                          std::vector<std::string>{"a", "b"}, std::vector<double>{}, 1);
  LoaderState s = make_indexed_loader(m, BatchGeometry{4, 2, 1, 0, 1}, 1)->state();
  auto damaged = [&](const std::string& from, const std::string& to) {
    LoaderState d = s;
    const size_t at = d.fingerprint.find(from);
    EXPECT_NE(at, std::string::npos) << d.fingerprint;
    d.fingerprint.replace(at, from.size(), to);
    return error_of([&] { make_indexed_loader(m, BatchGeometry{4, 2, 1, 0, 1}, 1)->restore(d); });
  };
  EXPECT_NE(damaged("\"offset\":0", "\"offset\":4611686018427387904").find("bad loader state: a mixture part with quota 10 and offset"),
            std::string::npos);
  EXPECT_NE(damaged("\"quota\":10", "\"quota\":-1").find("bad loader state: a mixture part with quota -1"), std::string::npos);
  EXPECT_NE(damaged("\"from\":0", "\"from\":\"x\"").find("the saved loader state's mixture is damaged"), std::string::npos);
  s.next_sample = int64_t{1} << 62;
  EXPECT_NE(error_of([&] { make_indexed_loader(m, BatchGeometry{4, 2, 1, 0, 1}, 1)->restore(s); }).find("bad loader state: next sample"),
            std::string::npos);
}

TEST(Mixture, PartsOfAnotherShapeOrKindAreErrors) {
  auto a = std::make_shared<Numbered>(10, 0);
  using Parts = std::vector<std::shared_ptr<const SampleSource>>;
  using Names = std::vector<std::string>;
  EXPECT_NE(error_of([&] { MixedSamples({a, std::make_shared<Numbered>(4, 1000, 9)}, Names{"a", "b"}, {}, 0); })
                .find("b and a give samples of another shape: a mixture's parts share seq_len and settings"),
            std::string::npos);
  EXPECT_NE(error_of([&] { MixedSamples({a, std::make_shared<Numbered>(4, 1000, 5, "sft")}, Names{"a", "b"}, {}, 0); })
                .find("b is sft data and a is shards data: a mixture's parts are of one kind"),
            std::string::npos);
  EXPECT_THROW(MixedSamples(Parts{}, Names{}, {}, 0), coil::Error);
  EXPECT_THROW(MixedSamples(Parts{a, a}, Names{"a", "b"}, {1, 2, 3}, 0), coil::Error);
}
