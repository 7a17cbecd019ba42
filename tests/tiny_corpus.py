"""Writes the tiny corpus the shell tests train on: 300 JSONL documents of 60 words from a
20-word vocabulary, in a fixed order.   python3 tests/tiny_corpus.py OUT.jsonl"""
import json
import sys

words = "the snake coils around a warm stone and sleeps while rain falls on green hills far away from town".split()
with open(sys.argv[1], "w") as f:
    for d in range(300):
        f.write(json.dumps({"text": " ".join(words[(d * 7 + i * 3) % len(words)] for i in range(60))}) + "\n")
