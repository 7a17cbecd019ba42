#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/ (committed; the total
stays well under 1 MB): small valid inputs and near misses of each format. Deterministic: the same
files on every run (gzip without a time stamp, zstd at a fixed level).

    <venv>/bin/python tests/fuzz/make_corpus.py [--coil build/bin/coil] [target ...]

The sentencepiece, tokenizer_text and checkpoint corpora are made by running coil (a tokenizer
trained by `coil tokenizer train`, a checkpoint of a 2-layer model by `coil pretrain`); the
safetensors corpus with the safetensors package and torch of the project venv.
"""
import argparse
import base64
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def gz(data):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def zst(data):
    return subprocess.run(["zstd", "-q", "-3", "-c", "--no-check"], input=data, stdout=subprocess.PIPE,
                          check=True).stdout


JSONL = {
    "docs.jsonl": '{"text": "The first document."}\n{"text": "A second one,\\nwith two lines."}\n',
    "unicode.jsonl": '{"text": "caf\\u00e9 \\ud83d\\ude00 \u65e5\u672c"}\n{"id": 3, "text": "\u00e9t\u00e9"}\n',
    "fields.jsonl": '{"id": 1, "text": "kept", "meta": {"a": [1, 2, {"b": null}]}}\n{"url": "x", "text": ""}\n',
    "bad-records.jsonl": '{"text": 5}\n{"txt": "no field"}\nnot json\n{"text": "ok"}\n[1, 2]\n{"text": "unterminated\n',
    "bad-utf8.jsonl": b'{"text": "\xff\xfe bad bytes"}\n{"text": "\\udc00 lone surrogate"}\n{"text": "fine"}\n',
    "blank-crlf.jsonl": '\n\r\n{"text": "crlf"}\r\n   \n{"text": "last, no newline"}',
    "long-line.jsonl": '{"text": "' + "x" * 300 + '"}\n{"text": "after the long one"}\n',
    "empty.jsonl": "",
    "deep.jsonl": '{"text": "d", "n": ' + "[" * 200 + "]" * 200 + "}\n",
}


def make_jsonl():
    for name, text in JSONL.items():
        data = text if isinstance(text, bytes) else text.encode()
        put("jsonl", name, data)
    docs = JSONL["docs.jsonl"].encode()
    both = docs + JSONL["unicode.jsonl"].encode()
    put("jsonl_gz", "docs.jsonl.gz", gz(docs))
    put("jsonl_gz", "members.jsonl.gz", gz(docs) + gz(JSONL["unicode.jsonl"].encode()))  # `cat a.gz b.gz`
    put("jsonl_gz", "truncated.jsonl.gz", gz(both)[:-9])
    put("jsonl_gz", "bad-records.jsonl.gz", gz(JSONL["bad-records.jsonl"].encode()))
    put("jsonl_gz", "long-line.jsonl.gz", gz(JSONL["long-line.jsonl"].encode()))
    put("jsonl_gz", "empty.jsonl.gz", gz(b""))
    put("jsonl_gz", "not-gzip.jsonl.gz", docs)
    put("jsonl_zst", "docs.jsonl.zst", zst(docs))
    put("jsonl_zst", "frames.jsonl.zst", zst(docs) + zst(JSONL["unicode.jsonl"].encode()))
    put("jsonl_zst", "truncated.jsonl.zst", zst(both)[:-5])
    put("jsonl_zst", "bad-records.jsonl.zst", zst(JSONL["bad-records.jsonl"].encode()))
    put("jsonl_zst", "long-line.jsonl.zst", zst(JSONL["long-line.jsonl"].encode()))
    put("jsonl_zst", "empty.jsonl.zst", zst(b""))
    put("jsonl_zst", "not-zstd.jsonl.zst", docs)


def make_alpaca():
    ex = [{"instruction": "Give a synonym of big.", "input": "", "output": "Large."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    put("alpaca", "array.json", json.dumps(ex, indent=2))
    put("alpaca", "lines.json", "".join(json.dumps(e) + "\n" for e in ex))
    put("alpaca", "unicode.json", json.dumps([{"instruction": "Tradui \u00e9t\u00e9", "input": "\U0001F600",
                                              "output": "\u590f"}], ensure_ascii=False))
    put("alpaca", "bad-fields.json", json.dumps([{"instruction": 1, "input": "", "output": "x"},
                                                {"instruction": "no output"}, "not an object", None,
                                                {"instruction": "ok", "output": "fine"}]))
    put("alpaca", "not-array.json", '{"instruction": "an object, not an array", "output": "x"}')
    put("alpaca", "truncated.json", json.dumps(ex)[:40])
    put("alpaca", "empty-array.json", "[]")
    put("alpaca", "nested.json", json.dumps([{"instruction": {"a": [1]}, "input": [], "output": "x"}]))


def make_config():
    for name in ["demo-pretrain.toml", "demo-sft.toml", "pretrain.toml", "sft.toml"]:
        shutil.copy(os.path.join(ROOT, "configs", name), os.path.join(CORPUS, "config", name))
    put("config", "overrides.toml", open(os.path.join(ROOT, "configs", "demo-pretrain.toml")).read() +
        "%%\ntrain.max_steps=7\noptim.adam_beta1=0.5\nmodel.d_model=32\ntrain.dtype=bfloat16\n"
        "data.streaming=true\ntrain.seq_len=1e3\n")
    put("config", "minimal.toml", '[model]\npreset = "tiny"\nn_layer = 2\n[train]\nmax_steps = 1\n')
    put("config", "bad-values.toml", '[optim]\nadam_beta1 = 1.5\n[train]\nseq_len = "long"\nwarmup = 3\n')
    put("config", "bad-toml.toml", '[train\nmax_steps = = 3\n"unterminated = 1\n')
    put("config", "types.toml", '[train]\nmax_steps = 9223372036854775807\nwatchdog_timeout = inf\n'
        'seed = -1\nrun_dir = """multi\nline"""\n[optim]\nlearning_rate_muon = nan\n[model]\nd_model = 1e3\n'
        '%%\ntrain.max_steps=-5\nnonsense\n=\ntrain.seq_len=\nmodel.expand=99999999999999999999\n')
    put("config", "tables.toml", '[model.nested]\nx = 1\n[[train]]\ny = 2\n[data]\ntrain = ["a", "b"]\n'
        'tokenizer = { path = "x" }\n')
    put("config", "mixture.toml", '[data]\ntrain = "a/shards, b/shards,, c"\ntrain_weights = "0.7, 0.3,1e400"\n'
        'val = "a/val, b/val"\n%%\ndata.train_weights=-1,nan\ndata.streaming=true\ndata.train=x,y\n')


def make_loader_state():
    def state(kind="shards", fingerprint="counted-7", next_sample=12, seed=5, **extra):
        s = {"kind": kind, "fingerprint": fingerprint, "seed": seed, "next_sample": next_sample, "epoch": 0,
             "record": 0, "offset": 0, "rank": 0, "world": 1}
        s.update(extra)
        return s

    def mixture(parts, start=0):
        return json.dumps({"mixture": [{"data": d, "quota": q, "seed": 9, "offset": o} for d, q, o in parts], "from": start})
    put("loader_state", "single.json", json.dumps(state()))
    put("loader_state", "mixture.json", json.dumps(state(fingerprint=mixture([("counted-7", 13, 4), ("counted-13", 7, 2)]))))
    put("loader_state", "mixture-changed.json", json.dumps(state(fingerprint=mixture([("counted-7", 5, 40), ("x", 1, 0)], 6))))
    put("loader_state", "mixture-huge.json", json.dumps(state(next_sample=2**62, fingerprint=mixture(
        [("counted-7", 2**62, 2**62), ("counted-13", 2**62, 1)], 3))))
    put("loader_state", "streaming.json", json.dumps(state("streaming", "streaming:1:32:abc", epoch=2, record=17, offset=3)))
    put("loader_state", "streaming-mixture.json", json.dumps(state(
        "streaming", json.dumps({"streaming_mixture": [{"name": "a.jsonl", "quota": 3}, {"name": "b", "quota": 1}], "from": 4}),
        parts=[state("streaming", "streaming:1:32:abc", record=5), state("streaming", "streaming:2:32:abc", epoch=1)])))
    put("loader_state", "streaming-named.json", json.dumps(state("streaming", "streaming:1:32:abc", next_sample=8,
                                                                 record=3, name="a.jsonl")))
    put("loader_state", "nested.json", json.dumps(state(parts=[state(parts=[state()])])))


def make_safetensors():
    import torch
    from safetensors.torch import save
    g = torch.Generator().manual_seed(0)
    put("safetensors", "dtypes.safetensors", save({
        "f32": torch.randn(2, 3, generator=g), "f64": torch.randn(3, generator=g).double(),
        "f16": torch.randn(2, 2, generator=g).half(), "bf16": torch.randn(4, generator=g).bfloat16(),
        "i64": torch.arange(3), "i32": torch.arange(4, dtype=torch.int32), "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)},
        metadata={"format": "pt"}))
    put("safetensors", "model.safetensors", save({
        "backbone.embeddings.weight": torch.randn(8, 4, generator=g),
        "backbone.layers.0.mixer.A_log": torch.randn(8, 2, generator=g),
        "backbone.norm_f.weight": torch.ones(4)}))

    def raw(header, data=b"", pad=True):
        h = json.dumps(header).encode()
        if pad:
            h += b" " * ((8 - len(h) % 8) % 8)
        return struct.pack("<Q", len(h)) + h + data

    f = struct.pack("<4f", 1, 2, 3, 4)
    put("safetensors", "bad-offsets.safetensors", raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 24]}}, f))
    put("safetensors", "bad-dtype.safetensors", raw({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, f))
    put("safetensors", "bad-shape.safetensors", raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]},
                                                      "b": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, f))
    put("safetensors", "missing-keys.safetensors", raw({"a": {"dtype": "F32"}, "__metadata__": {"k": "v"}}, f))
    put("safetensors", "header-too-long.safetensors", struct.pack("<Q", 1 << 40) + b"{}")
    put("safetensors", "not-json.safetensors", struct.pack("<Q", 6) + b"{nope}" + f)
    put("safetensors", "short.safetensors", b"\x10\x00\x00")


def run_coil(coil, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([coil, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def train_tokenizers(coil, tmp):
    lines = [json.dumps({"text": l}) for l in open(os.path.join(ROOT, "README.md")) if l.strip()]
    lines.append(json.dumps({"text": "caf\u00e9 \u00e9t\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u0416\u0443\u043a"}))
    with open(os.path.join(tmp, "train.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for kind in ["unigram", "bpe"]:
        run_coil(coil, "tokenizer", "train", "--input", "train.jsonl", "--output", "coil-" + kind, "--vocab-size",
                 "400", "--model-type", kind, "--threads", "1", cwd=tmp)


def make_sentencepiece(coil):
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizers(coil, tmp)
        for kind in ["unigram", "bpe"]:
            model = open(os.path.join(tmp, "coil-%s.model" % kind), "rb").read()
            put("sentencepiece", "coil-%s.model" % kind, model)
        put("sentencepiece", "truncated.model", model[: len(model) // 2])
        put("sentencepiece", "not-a-model.model", b"\x0a\x05hello\x12\x00")


def make_tokenizer_text():
    put("tokenizer_text", "ascii.txt", "The quick brown fox, 42 times.\n\tIndented  spaces   and\r\nCRLF.")
    put("tokenizer_text", "unicode.txt", "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u0416 \u200b zero width, \ufeff BOM")
    put("tokenizer_text", "markers.txt", "<s></s><pad><unk> ### Instruction:\n### Response:\n")
    put("tokenizer_text", "bytes.bin", bytes(range(256)))
    put("tokenizer_text", "empty.txt", "")


def checkpoint_folder(index, line, rank):
    """The checkpoint target's input for a folder: byte 0, the lengths of index.h5 and of
    index.h5.crc32 (4 bytes each, little-endian), then index.h5, index.h5.crc32, the rank file."""
    return b"\x00" + struct.pack("<II", len(index), len(line)) + index + line + rank


def make_checkpoint(coil):
    """A checkpoint of the smallest model coil trains (d_model 8, 1 layer, d_state 2, 400 ids), as a
    folder (index.h5, index.h5.crc32 and one rank file) and consolidated; the target's input is
    byte 0 (0: folder, 1: consolidated), then a folder's files (checkpoint_folder) or the one file."""
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizers(coil, tmp)
        with open(os.path.join(tmp, "tiny.toml"), "w") as f:
            f.write('[model]\npreset = "tiny"\nd_model = 8\nn_layer = 1\nd_state = 2\nexpand = 1\n'
                    '[data]\ntrain = "train.jsonl"\ntokenizer = "coil-unigram.model"\nstreaming = true\n'
                    '[train]\nrun_dir = "run"\nmax_steps = 1\nseq_len = 8\nglobal_batch_size = 2\n'
                    'micro_batch_size = 2\neval_interval = 0\nthreads = 1\nasync_checkpoint = false\n')
        run_coil(coil, "pretrain", "--config", "tiny.toml", cwd=tmp)
        ck = os.path.join(tmp, "run", "checkpoints", "step-00000001")
        run_coil(coil, "ckpt", "consolidate", ck, "consolidated.h5", cwd=tmp)
        index = open(os.path.join(ck, "index.h5"), "rb").read()
        line = open(os.path.join(ck, "index.h5.crc32"), "rb").read()
        rank = open(os.path.join(ck, "rank-00000-of-00001.h5"), "rb").read()
        consolidated = open(os.path.join(tmp, "consolidated.h5"), "rb").read()

    put("checkpoint", "folder.bin", checkpoint_folder(index, line, rank))
    put("checkpoint", "consolidated.bin", b"\x01" + consolidated)
    put("checkpoint", "rank-truncated.bin", checkpoint_folder(index, line, rank[: len(rank) // 3]))
    put("checkpoint", "no-rank-file.bin", checkpoint_folder(index, line, b""))
    put("checkpoint", "empty-checksum-line.bin", checkpoint_folder(index, b"", rank))


def make_hdf5_crashes():
    """The inputs on which HDF5 1.10.8 crashed (tests/fuzz/hdf5-crashes/, docs/RELIABILITY.md
    finding 7), in the target's layout of the time (a folder: byte 0, the index's length, index.h5,
    the rank file; consolidated: byte 1, the file), given the checksums that Coil records now: those
    of the seeds they are mutations of (the corpus of commit 58e65c2: rank-truncated.bin's index,
    one byte away; consolidated.bin, 19 bytes away). So they are damaged files as a reader meets
    them, which must now be one-line errors before HDF5 sees a byte."""
    crashes = os.path.join(HERE, "hdf5-crashes")
    old = gzip.open(os.path.join(crashes, "select-deserialize-overflow.bin.gz")).read()
    assert old[0] == 0
    (n,) = struct.unpack("<I", old[1:5])
    put("checkpoint", "hdf5-select-deserialize-overflow.bin",
        checkpoint_folder(old[5:5 + n], b"a86f66a0 34647 index.h5\n", old[5 + n:]))
    old = gzip.open(os.path.join(crashes, "link-table-free-segv.bin.gz")).read()
    assert old[0] == 1
    block = b"COIL-CRC32 e675ee45 %d\n" % (512 + 74753)
    put("checkpoint", "hdf5-link-table-free-segv.bin", b"\x01" + block.ljust(512, b"\x00") + old[1:])


def make_tokenizer_json():
    """Small BPE files in the pipelines Coil reads (byte-level GPT-2, GPT-NeoX, Llama-3 style; Llama-2
    and Mistral style with byte fallback), trained here with `tokenizers` on a few lines, a Unigram
    one, and near misses of them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    text = ["Hello world, it's 2026!", "\u4f60\u597d\uff0c\u4e16\u754c", "numbers 12345 and  spaces\t\ttabs",
            "caf\u00e9 na\u0131ve \U0001F600\u200d\U0001F4BB", "don't we'll I'm"] * 4

    def train(tok, specials):
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text, trainer)
        return tok.to_str()

    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    put("tokenizer_json", "gpt2.json", train(gpt2, ["<|endoftext|>"]))
    neox = Tokenizer(models.BPE())
    neox.normalizer = normalizers.NFC()
    neox.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    neox.decoder = decoders.ByteLevel()
    neox.post_processor = processors.ByteLevel(trim_offsets=False)
    put("tokenizer_json", "neox.json", train(neox, ["<|endoftext|>", "<|padding|>"]))
    llama = Tokenizer(models.BPE())
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    llama.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama.decoder = decoders.ByteLevel()
    llama_json = train(llama, ["<|begin_of_text|>", "<|end_of_text|>"])
    llama = Tokenizer.from_str(llama_json)
    llama.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", llama.token_to_id("<|begin_of_text|>"))])
    put("tokenizer_json", "llama3.json", llama.to_str())
    falcon = Tokenizer(models.BPE())
    falcon.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"), pre_tokenizers.ByteLevel(add_prefix_space=False),
        pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated")])
    falcon.decoder = decoders.ByteLevel()
    put("tokenizer_json", "falcon.json", train(falcon, ["<|endoftext|>"]))
    small = json.loads(gpt2.to_str())
    # Character-level BPE with byte fallback (Llama-2's pipeline, Mistral's Metaspace one), made as
    # the parity test makes them.
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    import tokenizer_json_cases
    with tempfile.TemporaryDirectory() as d:
        paths = tokenizer_json_cases.make_char_tokenizers(text, d, vocab_size=300)
        for name in ("llama2", "mistral"):
            put("tokenizer_json", name + ".json", json.dumps(json.load(open(paths[name])), ensure_ascii=False))
    # Unigram in the pipeline of tokenizers' SentencePieceUnigramTokenizer, with byte fallback.
    sp = "\u2581"
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), (sp, -2.5), (sp + "the", -3.25), ("e", -3.5), ("t", -3.75),
              ("h", -4.0), ("he", -4.5), (sp + "wor", -5.0), ("ld", -5.5), ("l", -6.0), ("o", -6.25), ("r", -6.5),
              ("d", -6.75), ("w", -7.0)] + [(f"<0x{b:02X}>", -9.0) for b in range(256)]
    uni = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    uni.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="always", split=True)
    uni.decoder = decoders.Sequence([decoders.Metaspace(replacement=sp, prepend_scheme="always", split=True),
                                     decoders.ByteFallback(), decoders.Fuse()])
    uni.add_special_tokens(["<s>", "</s>"])
    put("tokenizer_json", "unigram.json", json.dumps(json.loads(uni.to_str()), ensure_ascii=False))
    # The same with a small hand-made charsmap ("A" -> "a") in Precompiled, and WhitespaceSplit, as
    # transformers converts T5's and ALBERT's sentencepiece models.
    units = [0] * 512
    units[0], units[64], units[65] = 1 << 10, 0x41 | (1 << 8) | (1 << 10), 0x80000000
    charsmap = struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + b"a\0"
    t5 = json.loads(uni.to_str())
    t5["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    t5["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, t5["pre_tokenizer"]]}
    put("tokenizer_json", "t5-tiny.json", json.dumps(t5, ensure_ascii=False))
    put("tokenizer_json", "unknown-model.json", json.dumps(dict(small, model={"type": "WordPiece"})))
    put("tokenizer_json", "truncated.json", gpt2.to_str()[:500])
    put("tokenizer_json", "empty-object.json", "{}")


def make_parquet():
    """Small Parquet files as the Hub serves them (FineWeb's columns, Alpaca's), in several encodings,
    and near misses (a truncated file, a column that is not text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(table, **kw):
        buf = io.BytesIO()
        pq.write_table(table, buf, **kw)
        return buf.getvalue()

    texts = ["Hello world.", "", None, "\u4f60\u597d \U0001F600", "a" * 40, "last row"]
    fineweb = pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(len(texts))],
                        "token_count": list(range(len(texts)))})
    put("parquet", "fineweb.parquet", parquet(fineweb, row_group_size=2, compression="snappy"))
    put("parquet", "fineweb-zstd-dict.parquet", parquet(fineweb, row_group_size=4, compression="zstd", use_dictionary=True))
    put("parquet", "plain.parquet", parquet(fineweb, compression="none", use_dictionary=False))
    large = pa.table({"text": pa.array(texts, type=pa.large_string())})
    put("parquet", "large-string.parquet", parquet(large, compression="none"))
    whole = parquet(fineweb, row_group_size=2, compression="none")
    put("parquet", "truncated.parquet", whole[: len(whole) * 2 // 3])
    put("parquet", "int-text.parquet", parquet(pa.table({"text": [1, 2, 3]}), compression="none"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coil", default=os.path.join(ROOT, "build", "bin", "coil"))
    ap.add_argument("targets", nargs="*")
    args = ap.parse_args()
    makers = {"jsonl": make_jsonl, "alpaca": make_alpaca, "config": make_config, "safetensors": make_safetensors,
              "sentencepiece": lambda: make_sentencepiece(args.coil), "tokenizer_text": make_tokenizer_text,
              "checkpoint": lambda: make_checkpoint(args.coil), "hdf5_crashes": make_hdf5_crashes, "tokenizer_json": make_tokenizer_json,
              "parquet": make_parquet, "loader_state": make_loader_state}
    for t in args.targets or makers:
        makers[t]()


if __name__ == "__main__":
    main()
