#!/usr/bin/env python3
"""Writes Alpaca-format JSONL whose lengths follow Stanford Alpaca's: for SFT packing measurements.

The demo's WordNet instructions (scripts/make-demo-data) are short and alike (about 80 tokens in
the Alpaca template); tatsu-lab/alpaca's examples are about 170 tokens on average in the template,
with a long tail (a few percent past 512). This script draws examples of that shape, with no
download: an instruction of ~10 words, an input in 40% of them (~15 words), and a response whose
length in words is log-normal (median 72, sigma 0.9: mean ~109 words, ~3% above 400, a few past
2,000), the words drawn from a fixed list of common English words. Deterministic: the same --seed
gives the same file. With the demo's tokenizer (trained on the demo corpus) 20,000 examples come to
a mean of 169 tokens an example in the Alpaca template, cut at 513 (docs/PERFORMANCE.md);
`bench_sft_packing` prints the figure.

  bench/alpaca_like.py --output alpaca_like.jsonl [--examples 20000] [--seed 0]
"""
import argparse
import json
import math
import random

WORDS = """the of and to in is that for it as with was on be by this are or from at an which have not
but all were they one can more has their there been if would will when who so what no out up into
about than them only other new some could time these two may then do first any like now my such
make over our even most after also made many must before back through where much should well
people down own just because good each those very long great little world still men year way work
life day part between both being under never same another know while last might us great old
number system water small found large place become state high home general form end often world
under model data sequence state memory learn train token language answer question write word
sentence example list give explain describe simple reason result value change point case group
problem fact number hand order play line right area family house city country story study book
light heart mind voice music color river mountain ocean forest animal garden plant food table
window door road street school friend teacher student parent child doctor science history nature
""".split()


def sentence(rng, n):
    words = [rng.choice(WORDS) for _ in range(max(1, n))]
    words[0] = words[0].capitalize()
    out, k = [], 0
    for w in words:  # a full stop every ~12 words
        out.append(w)
        k += 1
        if k >= 12 and rng.random() < 0.3:
            out[-1] += "."
            k = 0
    return " ".join(out).rstrip(".") + "."


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--median-words", type=float, default=72.0, help="median response length in words")
    ap.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of the response length")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with open(a.output, "w") as f:
        for _ in range(a.examples):
            instruction = sentence(rng, int(rng.lognormvariate(math.log(10), 0.4)))
            inp = sentence(rng, int(rng.lognormvariate(math.log(15), 0.6))) if rng.random() < 0.4 else ""
            output = sentence(rng, int(rng.lognormvariate(math.log(a.median_words), a.sigma)) + 1)
            f.write(json.dumps({"instruction": instruction, "input": inp, "output": output}) + "\n")


if __name__ == "__main__":
    main()
