// Hugging Face's tokenizer.json, giving the ids that PyPI's `tokenizers` gives, token for token: BPE
// in both kinds the Hub's files come in, and Unigram:
//   byte-level (GPT-2, GPT-NeoX, Llama-3, Qwen): a ByteLevel pre-tokenizer, last; the symbols are
//     the bytes of each word;
//   character-level (Llama-2, TinyLlama, Mistral, Gemma): no ByteLevel; spaces become U+2581 (a
//     normalizer's Prepend/Replace, or a Metaspace pre-tokenizer), the symbols are characters,
//     and with byte_fallback a character missing from the vocabulary becomes its bytes' <0xXX>
//     tokens (else unk);
//   Unigram (files `tokenizers` trains, e.g. SentencePieceUnigramTokenizer's, and those converted
//     from sentencepiece models: T5, ALBERT, XLM-R): pieces with scores, the best path through
//     them (Viterbi), unknowns fused, byte_fallback as above.
//
// The pipeline, in `tokenizers`' order:
//   1. added tokens (the file's "added_tokens") whose "normalized" is false are cut out of the raw
//      text first (leftmost-longest, with their single_word / lstrip / rstrip rules);
//   2. the rest is normalized (NFC, NFD, NFKC, NFKD through utf8proc; Nmt; Precompiled, a
//      sentencepiece charsmap over grapheme clusters; Prepend; Replace with a string or a regex; a
//      Sequence of them), and the added tokens whose "normalized" is true are cut out of the
//      normalized text;
//   3. the pre-tokenizer splits each remaining piece into words: ByteLevel (GPT-2's regex unless
//      use_regex is false; add_prefix_space), Split (the file's own regex or string, with its
//      behavior and invert), Digits, Punctuation, WhitespaceSplit, Metaspace (' ' -> its replacement, its
//      prepend_scheme, split), a Sequence of them (steps after ByteLevel see its characters, as
//      Falcon's Digits and Split do), or none (the piece is one word). Regexes run in PCRE2 (UTF, UCP, JIT);
//      `tokenizers` runs Oniguruma, whose \s is Unicode's White_Space, so \s and \S are spelled so;
//   4. each word goes through the BPE merges (lowest rank first, leftmost on ties, the same
//      priority queue as `tokenizers`), or the Unigram's Viterbi (its scores read as serde_json
//      reads them, since an ulp decides ties), with a per-thread word cache (word -> ids);
//   5. with specials, the post-processor's template (TemplateProcessing's "single", or
//      ByteLevel's, which adds nothing) puts its BOS/EOS around the ids.
// decode() skips special added tokens (as `tokenizers`' decode does by default). Byte-level: the
// ByteLevel decoder, the bytes of each token joined, invalid UTF-8 in the result becoming U+FFFD
// (as Rust's from_utf8_lossy). Character-level: the file's chain of Replace, ByteFallback, Fuse,
// Strip and Metaspace decoders over the tokens, then joined.
//
// Invalid UTF-8 in encode's input: `tokenizers` only takes valid strings (Python's str cannot hold
// invalid bytes), so Coil replaces each maximal invalid subsequence by U+FFFD, exactly as Python's
// bytes.decode("utf-8", errors="replace") does: encode(b) equals `tokenizers`' encode of that
// decoded string. (Coil's readers reject records with invalid UTF-8 before they get here.)
//
// Any component, option or flag of the file that this code does not implement is a one-line
// coil::Error naming it, never a silent difference.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace coil::data {

class BpeTokenizer {
 public:
  // Parses a tokenizer.json held in memory; `origin` names it in errors. The entry point of
  // fuzzing: any bytes give a tokenizer or a coil::Error.
  static std::unique_ptr<BpeTokenizer> parse(std::string_view json, const std::string& origin);
  ~BpeTokenizer();

  // Appends the ids of `text` (tokenizers' encode(text, add_special_tokens=False)). Thread-safe.
  void encode(std::string_view text, std::vector<int32_t>& out) const;
  // The same, with the post-processor's special tokens (add_special_tokens=True).
  void encode_with_specials(std::string_view text, std::vector<int32_t>& out) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;  // the token as the file writes it
  int32_t vocab_size() const;          // 1 + the largest id of the vocabulary and added tokens
  int32_t token_id(std::string_view token) const;  // -1 when absent

  // Special ids, -1 when the file has none: BOS is the template's leading special token, else an
  // added special token named <|begin_of_text|>, <s>, <|startoftext|>, <bos>; EOS the template's
  // trailing special token, else one named <|endoftext|>, <|end_of_text|>, </s>, <eos>,
  // <|im_end|>, <|eot_id|>; PAD one named <|padding|>, <pad>, <|pad|>, [PAD], <|finetune_right_pad_id|>.
  int32_t bos() const;
  int32_t eos() const;
  int32_t pad() const;

  struct Impl;

 private:
  BpeTokenizer();
  std::unique_ptr<Impl> impl_;
};

// Replaces each maximal invalid UTF-8 subsequence by U+FFFD (Python's errors="replace"); returns
// false (and leaves `out` alone) when `text` is valid already.
bool replace_invalid_utf8(std::string_view text, std::string& out);

}  // namespace coil::data
