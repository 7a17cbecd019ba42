"""The tiny data the Python tests of `coil pretrain` and `coil sft` start from (test_checkpoint_h5py,
test_tensorboard, test_wandb_offline, test_sft_template): 200 JSONL documents of 40 words from a
15-word vocabulary in a fixed order, a 300-token tokenizer trained on them and their prepared shards.
"""
import json

WORDS = "the snake coils around a warm stone and sleeps while rain falls on green hills".split()


def prepare(folder, run):
    """Writes c.jsonl, tok.model and shards/ into folder (a pathlib.Path); `run(*args)` is the
    test's own way of running a coil command."""
    with open(folder / "c.jsonl", "w") as f:
        for d in range(200):
            f.write(json.dumps({"text": " ".join(WORDS[(d * 7 + i) % len(WORDS)] for i in range(40))}) + "\n")
    run("tokenizer", "train", "--input", folder / "c.jsonl", "--vocab-size", 300, "--output", folder / "tok")
    run("data", "prepare", "--input", folder / "c.jsonl", "--tokenizer", folder / "tok.model",
        "--output", folder / "shards")
