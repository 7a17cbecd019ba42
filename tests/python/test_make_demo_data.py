"""scripts/make-demo-data: the demo corpus from Debian's Python docs, fortunes and WordNet.

Builds the corpus twice and checks that the runs give byte-identical files, that the rows have
FineWeb's and Alpaca's shapes, that training and validation are disjoint, and that the sizes are
those of a small demo. The source packages must be installed (scripts/setup does that); the test
never installs them.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make-demo-data"

FINEWEB_FIELDS = ["text", "id", "dump", "url", "date", "file_path", "language", "language_score",
                  "token_count"]
ALPACA_FIELDS = ["instruction", "input", "output"]


def zstd_decompress(path):
    return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout


def tree(directory):
    """{relative path: bytes} for every file under directory."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The output of two runs: (first, second)."""
    outputs = []
    for run in ("first", "second"):
        out = tmp_path_factory.mktemp(run) / "demo"
        result = subprocess.run([str(SCRIPT), "--no-install", "--output", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "fineweb train" in result.stdout and "alpaca train" in result.stdout
        outputs.append(out)
    return outputs


def fineweb_rows(path):
    # Strict UTF-8: a malformed byte fails here.
    return [json.loads(line) for line in zstd_decompress(path).decode("utf-8").splitlines()]


def test_runs_are_byte_identical(demo):
    first, second = tree(demo[0]), tree(demo[1])
    assert sorted(first) == ["alpaca/train.json", "alpaca/val.jsonl",
                             "fineweb/train-00000.jsonl.zst", "fineweb/train-00001.jsonl.zst",
                             "fineweb/train-00002.jsonl.zst", "fineweb/train-00003.jsonl.zst",
                             "fineweb/val-00000.jsonl.zst"]
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name


def test_fineweb_shards(demo):
    out = demo[0] / "fineweb"
    train = [fineweb_rows(p) for p in sorted(out.glob("train-*.jsonl.zst"))]
    val = fineweb_rows(out / "val-00000.jsonl.zst")
    assert all(train), "an empty train shard"
    everything = [row for shard in train for row in shard] + val
    for row in everything:
        assert list(row) == FINEWEB_FIELDS
        assert isinstance(row["text"], str) and row["text"].strip()
        row["text"].encode("utf-8")  # no lone surrogates
        assert re.fullmatch(r"<urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-"
                            r"[0-9a-f]{12}>", row["id"])
        assert row["url"].startswith("file:///usr/share/")
        assert row["file_path"].startswith("/usr/share/")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["date"])
        assert row["dump"] == "debian-12" and row["language"] == "en"
        assert row["language_score"] == 1.0
        assert row["token_count"] == len(row["text"].split())

    ids = [row["id"] for row in everything]
    assert len(set(ids)) == len(ids), "duplicate ids (or a document in both train and val)"
    assert 0.02 <= len(val) / len(everything) <= 0.10

    # All three sources, in shards of similar size: several MB of text in all.
    for source in ("/python3.11/html/_sources/", "/games/fortunes/", "/wordnet/"):
        assert any(source in row["url"] for row in everything), source
    sizes = [sum(len(row["text"].encode()) for row in shard) for shard in train]
    assert 5e6 <= sum(sizes) <= 20e6, sizes
    assert max(sizes) <= 1.5 * min(sizes), sizes
    assert "\n" in everything[0]["text"]  # newlines kept


def test_alpaca(demo):
    out = demo[0] / "alpaca"
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    val_lines = (out / "val.jsonl").read_text(encoding="utf-8").splitlines()
    val = [json.loads(line) for line in val_lines]
    assert isinstance(train, list)
    assert 5_000 <= len(train) <= 100_000
    assert 0.02 <= len(val) / (len(train) + len(val)) <= 0.10
    for example in train + val:
        assert list(example) == ALPACA_FIELDS
        assert all(isinstance(example[k], str) for k in ALPACA_FIELDS)
        assert example["instruction"] and example["output"]
        assert not example["output"][0].islower() and example["output"][-1] in ".?!", example
    # Validation asks about words that training never mentions.
    def words(examples):
        return {re.search(r'"(.+)"', e["instruction"]).group(1) if not e["input"]
                else e["input"].split(" (")[0] for e in examples}
    assert not words(train) & words(val)
    kinds = {e["instruction"].split('"')[0] for e in train}
    assert {"What does the word ", "Define the following word.", "Use the word ",
            "Give a synonym for the word "} <= kinds
