#!/usr/bin/env python3
"""Encode speed on one thread: Coil's BPE and Unigram (data/bpe.h) against PyPI's `tokenizers`, on the
same text and the same tokenizer.json files (byte-level GPT-2, GPT-NeoX and Llama-3 style,
character-level with byte fallback in Llama-2, Mistral and Gemma style, and Unigram, made by
tests/python/tokenizer_json_cases.py), side by side in one run. Each side encodes every document
once, from a fresh process state (an empty word cache), and the tokens counted are checked equal.

  build/bin/tokenizer_probe must exist (scripts/build tokenizer_probe).
  python bench/tokenizer_vs_hf.py [--mb 8] [--probe build/bin/tokenizer_probe]
  COIL_DEMO_DIR=<make-demo-data output> takes the demo corpus's JSONL.zst as the text.
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
import tokenizer_json_cases as cases  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of text to encode")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--probe", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "bin",
                                                    "tokenizer_probe"))
    a = ap.parse_args()
    docs = cases.corpus_texts(int(a.mb * 1e6))
    lines = [l for t in docs for l in t.splitlines(keepends=True)]
    with tempfile.TemporaryDirectory() as d:
        paths = cases.make_tokenizers(docs[:1000], d, vocab_size=a.vocab)
        char = cases.make_char_tokenizers(docs[:1000], d, vocab_size=a.vocab)
        # llama2_whole (ignore_merges) is merged without the cut before U+2581: the cut's worth.
        paths.update({k: char[k] for k in ("llama2", "llama2_whole", "mistral", "gemma")})
        paths.update(cases.make_unigram_tokenizers(docs[:1000], d, vocab_size=min(a.vocab, 16000)))
        paths.update(cases.make_precompiled_tokenizer(docs[:1000], d, vocab_size=min(a.vocab, 16000)))
        for unit, texts in (("documents", docs), ("lines", lines)):
            bench(a, paths, unit, texts, d)


def bench(a, paths, unit, texts, d):
        nbytes = sum(len(t.encode()) for t in texts)
        rec = os.path.join(d, "records.bin")
        cases.write_records(rec, texts)
        print(f"{len(texts)} {unit}, {nbytes / 1e6:.1f} MB; vocabulary {a.vocab}; one thread each")
        for name, path in paths.items():
            hf = Tokenizer.from_file(path)
            t0 = time.perf_counter()
            n_hf = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
            s_hf = time.perf_counter() - t0
            out = subprocess.run([a.probe, path, rec, "--bench"], check=True, capture_output=True, text=True).stdout
            coil = json.loads(out)
            assert coil["tokens"] == n_hf, f"{name}: coil {coil['tokens']} tokens, tokenizers {n_hf}"
            print(f"{name:12s} tokenizers {n_hf / s_hf / 1e6:6.2f} M tokens/s   coil {coil['tokens_per_s'] / 1e6:6.2f} "
                  f"M tokens/s   coil/tokenizers {coil['tokens_per_s'] * s_hf / n_hf:5.2f}x   ({n_hf} tokens)")


if __name__ == "__main__":
    main()
