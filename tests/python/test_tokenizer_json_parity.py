"""Coil's BPE and Unigram (data/bpe.h) against PyPI's `tokenizers`, on tokenizer.json files made
here (tests/python/tokenizer_json_cases.py): byte-level in the GPT-2, GPT-NeoX, Llama-3, StarCoder
(Digits) and Falcon (Punctuation, ByteLevel, then Digits and a Split on its characters)
configurations, character-level with byte fallback in the Llama-2 (also with ignore_merges, which
Coil merges without cutting words before U+2581), Mistral and Gemma ones and a splitting Metaspace,
and Unigram in `tokenizers`' SentencePieceUnigramTokenizer pipeline (Nmt, NFKC, a Regex Replace),
with byte fallback, and as transformers converts a sentencepiece model with nmt_nfkc (Precompiled,
WhitespaceSplit; trained by spm_train) (their normalizers change the text, so only decode ==
tokenizers' decode).

For every record: Coil's ids equal `tokenizers`' ids (without and with the post-processor's
special tokens), Coil's decode of them equals `tokenizers`' decode, and it is x itself (NFC(x) for
the NeoX file, whose normalizer is NFC) unless x holds a special token (decode skips those), or,
for the character-level files, x holds a U+2581 (decoded as a space, as sentencepiece does) or,
for those whose Metaspace decoder drops the first token's U+2581, x starts with a space (the
Llama-2 file's Strip drops only the prefix); the splitting Metaspace's decoder has no ByteFallback
(bytes decode as their "<0xXX>" text), so only its decode is compared. Invalid UTF-8: Coil's ids for the bytes equal
`tokenizers`' ids for bytes.decode("utf-8", "replace"). The text: COIL_PARITY_MB megabytes
(default 2: the demo corpus's text and a quarter as much text made to be hard); the recorded
10 MB run is `COIL_PARITY_MB=10 COIL_DEMO_DIR=<make-demo-data output> pytest ...`.
"""
import os
import subprocess
import sys
import unicodedata

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tokenizer_json_cases as cases  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

PROBE = os.environ.get("COIL_TOKENIZER_PROBE")
MB = float(os.environ.get("COIL_PARITY_MB", "2"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not PROBE:
        pytest.fail("COIL_TOKENIZER_PROBE is not set (ctest sets it)")
    d = tmp_path_factory.mktemp("bpe")
    corpus = cases.corpus_texts(int(MB * 0.75e6))
    paths = cases.make_tokenizers(corpus[:200], str(d))
    paths.update(cases.make_char_tokenizers(corpus[:200], str(d)))
    paths.update(cases.make_unigram_tokenizers(corpus[:200], str(d)))
    paths.update(cases.make_precompiled_tokenizer(corpus[:200], str(d)))
    texts = corpus + cases.hard_texts(int(MB * 0.25e6), seed=1)
    return d, paths, texts


def probe(tok_path, records, d, specials=False):
    rec, ids = os.path.join(d, "records.bin"), os.path.join(d, "ids.bin")
    cases.write_records(rec, records)
    subprocess.run([PROBE, tok_path, rec, ids] + (["--specials"] if specials else []), check=True,
                   capture_output=True, text=True)
    return cases.read_ids(ids), [b.decode("utf-8") for b in cases.read_records(ids + ".decoded")]


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


BYTE_LEVEL = ["gpt2", "neox", "llama3", "starcoder", "falcon"]
CHAR_LEVEL = ["llama2", "llama2_whole", "mistral", "gemma", "metaspace_split"]
UNIGRAM = ["unigram", "unigram_fallback", "t5"]


def round_trips(name, text):
    """Whether decode(encode(text)) is text itself for this file (see the module's docstring)."""
    if name == "metaspace_split" or name in UNIGRAM:  # bytes decode as "<0xXX>"; normalizers change text
        return False
    if name in CHAR_LEVEL and cases.SP in text:
        return False
    if name in ("mistral", "metaspace_split") and text[:1] == " ":
        return False
    return True


@pytest.mark.parametrize("name", BYTE_LEVEL + CHAR_LEVEL + UNIGRAM)
def test_ids_equal_tokenizers(setup, name):
    d, paths, texts = setup
    hf = Tokenizer.from_file(paths[name])
    total = sum(len(t.encode()) for t in texts)
    assert total >= MB * 0.9e6
    for specials in (False, True):
        want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=specials)]
        got, decoded = probe(paths[name], texts, d, specials)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                k = first_difference(g, w)
                pytest.fail(f"{name} record {i} (specials {specials}): token {k}: coil {g[k:k + 5]} tokenizers "
                            f"{w[k:k + 5]} {hf.decode(w[max(0, k - 3):k + 3])!r}")
        specials_in = [t for t in hf.get_added_tokens_decoder().values() if t.special]
        for i, (t, w, c) in enumerate(zip(texts, want, decoded)):
            assert c == hf.decode(w), f"{name} record {i}: decode differs from tokenizers'"
            if not any(s.content in t for s in specials_in) and round_trips(name, t):
                assert c == (unicodedata.normalize("NFC", t) if name == "neox" else t), f"{name} record {i}: round trip"
    if name == "llama3":
        assert want[0][0] == hf.token_to_id("<|begin_of_text|>")
    if name in CHAR_LEVEL or name == "unigram_fallback":  # the byte fallback and the template were exercised
        assert any(hf.id_to_token(i).startswith("<0x") for w in want for i in w)
        if name in CHAR_LEVEL and name != "metaspace_split":
            assert want[0][0] == hf.token_to_id("<bos>" if name == "gemma" else "<s>")
    if name in ("unigram", "t5"):  # unknown characters fused into one <unk>, and T5's trailing </s>
        unk = hf.token_to_id("<unk>")
        assert any(w.count(unk) for w in want) and want[0][-1] == hf.token_to_id("</s>")
    print(f"{name}: {len(texts)} records, {total} bytes, {sum(map(len, want))} tokens equal")


@pytest.mark.parametrize("name", BYTE_LEVEL + CHAR_LEVEL + UNIGRAM)
def test_invalid_utf8_as_replaced(setup, name):
    d, paths, _ = setup
    hf = Tokenizer.from_file(paths[name])
    records = cases.invalid_utf8_records(seed=2)
    got, decoded = probe(paths[name], records, d)
    want = [e.ids for e in hf.encode_batch([r.decode("utf-8", "replace") for r in records], add_special_tokens=False)]
    assert got == want
    assert decoded == [hf.decode(w) for w in want]


def test_every_code_point_alone(setup):
    """Each assigned code point of the BMP's old blocks, alone and between letters: the regexes'
    classes (\\s, \\p{L}, \\p{N}, punctuation) and NFC agree with `tokenizers`'."""
    d, paths, _ = setup
    texts = []
    for start in range(0, 0x3000, 64):
        cps = [c for c in range(start, start + 64) if not 0xD800 <= c <= 0xDFFF]
        texts.append("".join(f"a{chr(c)} {chr(c)}1{chr(c)}\n" for c in cps))
    for name in ("neox", "llama3", "falcon", "llama2", "mistral", "unigram", "unigram_fallback", "t5"):
        hf = Tokenizer.from_file(paths[name])
        got, _ = probe(paths[name], texts, d)
        want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert not bad, f"{name}: blocks starting at {[hex(i * 64) for i in bad[:5]]}"


def test_unimplemented_or_damaged_component_is_one_line_error(setup, tmp_path):
    import json
    _, paths, _ = setup
    j = json.load(open(paths["gpt2"]))
    j["normalizer"] = {"type": "Lowercase"}
    bad = tmp_path / "lower.json"
    bad.write_text(json.dumps(j))
    rec = tmp_path / "r.bin"
    cases.write_records(rec, ["x"])
    r = subprocess.run([PROBE, str(bad), str(rec), str(tmp_path / "ids.bin")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "normalizer Lowercase is not implemented" in r.stderr
    j["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    bad.write_text(json.dumps(j))
    r = subprocess.run([PROBE, str(bad), str(rec), str(tmp_path / "ids.bin")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "the precompiled_charsmap is not a sentencepiece charsmap (3 bytes, a trie of 0)" in r.stderr


@pytest.mark.parametrize("pattern", [{"Regex": "\\s+"}, {"String": "e"}, {"Regex": "x*"}])
def test_split_behaviors(setup, tmp_path, pattern):
    """Split with every behavior, inverted or not, and a pattern with empty matches, as in tokenizers."""
    import json
    d, paths, _ = setup
    texts = cases.hard_texts(20000, seed=9)
    base = json.load(open(paths["llama3"]))
    for behavior in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]:
        for invert in (False, True):
            base["pre_tokenizer"]["pretokenizers"][0] = {"type": "Split", "pattern": pattern, "behavior": behavior,
                                                         "invert": invert}
            path = tmp_path / "split.json"
            path.write_text(json.dumps(base))
            want = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(texts, add_special_tokens=False)]
            got, _ = probe(str(path), texts, d)
            assert got == want, f"{pattern} {behavior} invert={invert}"


@pytest.mark.parametrize("pattern", [" {2,}", "\\s+", "x*", "[aeiou]+|\\p{N}"])
def test_replace_with_a_regex(setup, tmp_path, pattern):
    """The normalizer Replace with a Regex (empty matches too), into a string and into nothing, as in
    tokenizers."""
    import json
    d, paths, _ = setup
    texts = cases.hard_texts(20000, seed=11)
    base = json.load(open(paths["unigram"]))
    for content in ("Q", ""):
        base["normalizer"] = {"type": "Replace", "pattern": {"Regex": pattern}, "content": content}
        path = tmp_path / "replace.json"
        path.write_text(json.dumps(base))
        want = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(texts, add_special_tokens=False)]
        got, _ = probe(str(path), texts, d)
        assert got == want, f"{pattern!r} -> {content!r}"
