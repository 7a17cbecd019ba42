"""tokenizer.json files made with PyPI's `tokenizers`, text to encode, and Coil's probe.

Shared by tests/python/test_tokenizer_json_parity.py and bench/tokenizer_vs_hf.py. The files
follow the pipelines of the Hub's GPT-2, GPT-NeoX and Llama-3 tokenizers (byte-level BPE) and of
Llama-2, Mistral and Gemma (character-level BPE with byte fallback, U+2581 for spaces), and Unigram
models as `tokenizers` trains them (with and without byte fallback), built from
`tokenizers`' own classes (no Hub downloads here) and trained on the demo corpus's text.
"""
import glob
import json
import os
import random
import struct
import subprocess

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus_texts(max_bytes):
    """Documents of the demo corpus: its JSONL.zst files when COIL_DEMO_DIR names a folder made by
    scripts/make-demo-data, else the Debian texts it is made from (Python docs, fortunes, WordNet)."""
    out, total = [], 0
    demo = os.environ.get("COIL_DEMO_DIR")
    if demo:
        for f in sorted(glob.glob(os.path.join(demo, "fineweb", "*.jsonl.zst"))):
            raw = subprocess.run(["zstd", "-dc", f], check=True, capture_output=True).stdout
            for line in raw.decode("utf-8").splitlines():
                t = json.loads(line)["text"]
                out.append(t)
                total += len(t.encode())
                if total >= max_bytes:
                    return out
        return out
    files = sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/**/*.txt", recursive=True))
    files += sorted(glob.glob("/usr/share/games/fortunes/*.u8")) + sorted(glob.glob("/usr/share/wordnet/data.*"))
    for f in files:
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for i in range(0, len(t), 20000):  # documents of at most 20k characters
            out.append(t[i:i + 20000])
            total += len(out[-1].encode())
            if total >= max_bytes:
                return out
    return out


# Pieces of text that are hard for a tokenizer.
HARD = [
    "日本語のテキスト、漢字とかな。", "中文分词测试：我们今天去北京。", "한국어 문장입니다.",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇩🇪 ❤️‍🔥 🧑🏿‍💻", "e\u0301 a\u0300\u0323 o\u0308\u0304 Å Å ﬁ ｆｕｌｌ ①②",
    "e\u0301\u0301\u0301 \u0915\u094d\u0937 \u0e01\u0e34\u0e48", "שלום עולם، مرحبا بالعالم ١٢٣ ۴۵۶", "\u202eRTL\u202c \u200f\u200e",
    "1234567890 3.14159 1,000,000 ١٢٣٤٥ 2026-12-01", "I'm you're we've they'll he'd it's DON'T 'S 'Ll",
    "    four spaces\t\ttabs\n\n\nnewlines\r\n\r\n  \n\t \u00a0\u3000 \u2003x", "\x00\x01\x07\x1b[31m\x7f\u0085\u2028\u2029",
    "ſ K ß ẞ İ ı ǅ Σσς", "<|endoftext|>", "<|padding|>", "<|begin_of_text|>", "<|end_of_text|>",
    "a<|sep|>b  <|sep|>  c", "[word] x[word] [word]y ([word])", "### Instruction:\n", "### Response:\n",
    "<s>", "</s>", "<unk>", "[INST]", "<tool>", "<bos>", "<eos>", "a</s>b <s> c", "\u2581", "x\u2581\u2581y",
    "   ", "  ", "\n", " ", "\t", "zero\u200bwidth\u200djoin\ufeffbom", "\U0001d54f\U0001d546 𝔘𝔫𝔦", "Ω≈ç√∫˜µ≤≥÷",
]
WORDS = ["the", "The", " cat", "function", "def", "return", "x", "'", "\"", "(", ")", "{", "}", "==", "→", "—", "…"]


def hard_texts(n_bytes, seed):
    """Random mixes of the hard pieces, words, random code points and long runs."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_bytes:
        parts = []
        for _ in range(rng.randint(1, 60)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(HARD))
            elif r < 0.6:
                parts.append(rng.choice(WORDS))
            elif r < 0.7:
                parts.append(rng.choice([" ", "\t", "\n", "\r\n", "0", "9", "'s", "\u00a0"]) * rng.randint(1, 40))
            elif r < 0.85:  # assigned code points of old planes (Unicode <= 12, which every library agrees on)
                cps = []
                while len(cps) < rng.randint(1, 8):
                    c = rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x370, 0x1FFF), rng.randint(0x3000, 0x9FFF),
                                    rng.randint(0xAC00, 0xD7A3), rng.randint(0x1F300, 0x1F5FF)])
                    if not 0xD800 <= c <= 0xDFFF:
                        cps.append(c)
                parts.append("".join(map(chr, cps)))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 20))))
        t = "".join(parts)
        out.append(t)
        total += len(t.encode())
    return out


def invalid_utf8_records(seed, n=400):
    """Byte strings with invalid UTF-8 (lone continuation bytes, truncated sequences, overlongs,
    surrogates, bytes F5..FF) inside valid text."""
    rng = random.Random(seed)
    bad = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80",
           b"\xff", b"\xfe\xfe", b"\xe0\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc2 "]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(bad) if rng.random() < 0.4 else rng.choice(HARD + WORDS).encode())
        out.append(b"".join(parts))
    return out


def train(tok, texts, vocab_size, specials):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def make_tokenizers(texts, out_dir, vocab_size=4000):
    """Writes gpt2.json, neox.json, llama3.json, starcoder.json, falcon.json under out_dir; returns
    {name: path}."""
    paths = {}
    # GPT-2: ByteLevel pre-tokenizer (GPT-2's regex, no prefix space), ByteLevel decoder and
    # post-processor, <|endoftext|>; plus added tokens with lstrip/rstrip and single_word.
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    train(t, texts, vocab_size, ["<|endoftext|>"])
    t.add_special_tokens([AddedToken("<|sep|>", lstrip=True, rstrip=True)])
    t.add_tokens([AddedToken("[word]", single_word=True, normalized=False)])
    paths["gpt2"] = os.path.join(out_dir, "gpt2.json")
    t.save(paths["gpt2"])
    # GPT-NeoX: NFC, ByteLevel(add_prefix_space=False), <|endoftext|> 0 and <|padding|> 1, and
    # added tokens for runs of spaces (normalized, not special), as the NeoX file has.
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=True)
    train(t, texts, vocab_size, ["<|endoftext|>", "<|padding|>"])
    t.add_tokens([AddedToken(" " * n, normalized=True) for n in (2, 3, 4, 8, 16)])
    paths["neox"] = os.path.join(out_dir, "neox.json")
    t.save(paths["neox"])
    # Llama-3: Split with Llama-3's regex, then ByteLevel without its regex; BPE with
    # ignore_merges; TemplateProcessing with <|begin_of_text|>.
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    train(t, texts, vocab_size, specials)
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    j = json.loads(t.to_str())
    j["model"]["ignore_merges"] = True
    paths["llama3"] = os.path.join(out_dir, "llama3.json")
    Tokenizer.from_str(json.dumps(j)).save(paths["llama3"])
    # StarCoder: each digit alone (Digits, individual), then ByteLevel.
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    train(t, texts, vocab_size, ["<|endoftext|>"])
    paths["starcoder"] = os.path.join(out_dir, "starcoder.json")
    t.save(paths["starcoder"])
    # Falcon: runs of punctuation (Punctuation, contiguous), ByteLevel, then on its characters runs
    # of digits and their groups of three (Digits, Split).
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated", invert=False)])
    t.decoder = decoders.ByteLevel()
    train(t, texts, vocab_size, [">>TITLE<<", ">>ABSTRACT<<", "<|endoftext|>"])
    paths["falcon"] = os.path.join(out_dir, "falcon.json")
    t.save(paths["falcon"])
    return paths


SP = "\u2581"  # sentencepiece's meta space


def make_char_tokenizers(texts, out_dir, vocab_size=3000):
    """Writes llama2.json, llama2_whole.json, mistral.json, gemma.json, metaspace_split.json under out_dir (returns
    {name: path}): character-level BPE with byte_fallback (the 256 <0xXX> tokens after the
    specials, as the Hub's files have them), trained with a small alphabet so that rare characters
    fall back to bytes, in the pipelines of the Hub's Llama-2 (Prepend + Replace normalizer, no
    pre-tokenizer, the Replace/ByteFallback/Fuse/Strip decoder), Mistral (Metaspace with
    prepend_scheme "first", no split), Gemma (Replace only, no Strip) and a Metaspace that splits
    ("always")."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  limit_alphabet=120)
    trainer_tok.train_from_iterator(texts, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    def vocab_with(first):
        vocab = {t: i for i, t in enumerate(first)}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
            if t not in vocab and t not in specials:
                vocab[t] = len(vocab)
        return vocab

    def bpe(first, fuse_unk=True):
        return Tokenizer(models.BPE(vocab_with(first), merges, unk_token="<unk>", byte_fallback=True,
                                    fuse_unk=fuse_unk))

    def save(t, name):
        paths[name] = os.path.join(out_dir, name + ".json")
        t.save(paths[name])

    paths = {}
    # Llama-2 (and TinyLlama, Mistral v0.1): <unk> <s> </s> as 0 1 2, a template with <s>.
    t = bpe(specials)
    t.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    t.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in specials])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    save(t, "llama2")
    # The same with ignore_merges: Coil then merges each piece whole (no cut before U+2581).
    j = json.loads(t.to_str())
    j["model"]["ignore_merges"] = True
    save(Tokenizer.from_str(json.dumps(j)), "llama2_whole")
    # Mistral (later files): Metaspace pre-tokenizer and decoder with prepend_scheme "first"; an
    # added special token and an added non-special one.
    t = bpe(specials)
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.Metaspace(replacement=SP, prepend_scheme="first", split=False),
                                   decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in specials + ["[INST]"]])
    t.add_tokens([AddedToken("<tool>", normalized=False, special=False)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save(t, "mistral")
    # Gemma: <pad> <eos> <bos> <unk>, spaces replaced, no prefix, no Strip; unknowns not fused.
    gemma_specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    t = bpe(gemma_specials, fuse_unk=False)
    t.normalizer = normalizers.Replace(" ", SP)
    t.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in gemma_specials])
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    save(t, "gemma")
    # Metaspace that splits at every U+2581, prefix always, its decoder alone (so <0xXX> tokens
    # decode as their text).
    t = bpe(specials)
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    t.decoder = decoders.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    t.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in specials])
    save(t, "metaspace_split")
    return paths


def make_unigram_tokenizers(texts, out_dir, vocab_size=2000):
    """Writes unigram.json and unigram_fallback.json under out_dir (returns {name: path}): Unigram
    models trained with `tokenizers`' UnigramTrainer (<unk> <s> </s> as 0 1 2). unigram: the pipeline
    of `tokenizers`' SentencePieceUnigramTokenizer (Nmt, NFKC, runs of spaces replaced by a Regex;
    a splitting Metaspace, its decoder) with T5's template ("$A </s>"); unigram_fallback: the same
    pieces and the 256 <0xXX> ones with byte_fallback, NFC and runs of white space (a \\s+ Regex)
    replaced by a space, a Metaspace that does not split ("first"), and a Metaspace, ByteFallback,
    Fuse decoder."""
    specials = ["<unk>", "<s>", "</s>"]
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    t.decoder = decoders.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    t.train_from_iterator(texts, trainer)
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    paths = {"unigram": os.path.join(out_dir, "unigram.json")}
    t.save(paths["unigram"])
    pieces = [tuple(v) for v in json.loads(t.to_str())["model"]["vocab"]]
    f = Tokenizer(models.Unigram(pieces + [(f"<0x{b:02X}>", 0.0) for b in range(256)], unk_id=0, byte_fallback=True))
    f.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")])
    f.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first", split=False)
    f.decoder = decoders.Sequence([decoders.Metaspace(replacement=SP, prepend_scheme="first", split=False),
                                   decoders.ByteFallback(), decoders.Fuse()])
    f.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in specials])
    paths["unigram_fallback"] = os.path.join(out_dir, "unigram_fallback.json")
    f.save(paths["unigram_fallback"])
    return paths


def _proto_fields(data):
    """The (field number, value) pairs of a protobuf message (varints as ints, the rest as bytes)."""
    i, out = 0, []
    def varint():
        nonlocal i
        v = shift = 0
        while True:
            b = data[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v
    while i < len(data):
        key = varint()
        field, kind = key >> 3, key & 7
        if kind == 0:
            out.append((field, varint()))
        elif kind == 1:
            out.append((field, data[i:i + 8]))
            i += 8
        elif kind == 2:
            n = varint()
            out.append((field, data[i:i + n]))
            i += n
        elif kind == 5:
            out.append((field, data[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"protobuf wire type {kind}")
    return out


def make_precompiled_tokenizer(texts, out_dir, vocab_size=2000):
    """Writes t5.json under out_dir (returns {"t5": path}): what transformers' converter makes of a
    sentencepiece Unigram model with the nmt_nfkc normalization (T5, ALBERT, XLM-R style): the
    model's pieces and scores, the normalizer Precompiled (the model's charsmap) then a Regex
    Replace of runs of spaces, WhitespaceSplit + Metaspace, T5's "$A </s>". The sentencepiece model
    is trained here by Debian's spm_train and read with a few lines of protobuf."""
    text = os.path.join(out_dir, "spm-text.txt")
    with open(text, "w") as f:
        for t in texts:
            f.write(t.replace("\0", " ") + "\n")
    prefix = os.path.join(out_dir, "spm-nfkc")
    subprocess.run(["spm_train", f"--input={text}", f"--model_prefix={prefix}", f"--vocab_size={vocab_size}",
                    "--model_type=unigram", "--normalization_rule_name=nmt_nfkc", "--character_coverage=0.995",
                    "--num_threads=1", "--minloglevel=2"], check=True, capture_output=True)
    fields = _proto_fields(open(prefix + ".model", "rb").read())
    pieces, unk_id, charsmap = [], None, None
    for field, value in fields:
        if field == 1:  # SentencePiece: piece, score, type (2: unknown)
            p = dict(_proto_fields(value))
            kind = p.get(3, 1)
            if kind == 2:
                unk_id = len(pieces)
            pieces.append((p[1].decode(), struct.unpack("<f", p[2])[0] if 2 in p else 0.0))
        elif field == 3:  # NormalizerSpec: name, precompiled_charsmap
            charsmap = dict(_proto_fields(value))[2]
    t = Tokenizer(models.Unigram(pieces, unk_id=unk_id))
    t.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")])
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always")])
    t.decoder = decoders.Metaspace(replacement=SP, prepend_scheme="always")
    eos = [p for p, _ in pieces].index("</s>")
    t.add_special_tokens(["</s>"])
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    path = os.path.join(out_dir, "t5.json")
    t.save(path)
    return {"t5": path}


def write_records(path, records):
    with open(path, "wb") as f:
        for r in records:
            b = r if isinstance(r, bytes) else r.encode("utf-8")
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def read_records(path):
    out, data, i = [], open(path, "rb").read(), 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def read_ids(path):
    out = []
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        out.append(list(struct.unpack_from(f"<{n}i", data, i)))
        i += 4 * n
    return out
