"""scripts/export-hf-dataset on small local parquet and JSON files (no network).

Checks that the shards hold exactly the rows given, in order, --docs-per-shard rows each; that the
validation split is disjoint from the training split, covers the rest, and depends on the rows
alone (the same on a second run and when the rows come in another order); and that a bad input
fails with a one-line error.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export-hf-dataset"

# FineWeb's columns, with text that exercises JSON escaping and UTF-8.
FINEWEB_ROWS = [{
    "text": f"Document {i}.\nLine 2: \"quoted\", tab\there, caf\u00e9 \u2014 \u65e5\u672c {i * 7}",
    "id": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>",
    "dump": "CC-MAIN-2013-20",
    "url": f"http://example.com/page/{i}",
    "date": "2013-05-18T05:48:54Z",
    "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2013-20/segments/0/warc/0.warc.gz",
    "language": "en",
    "language_score": 0.5 + i / 100,
    "token_count": 10 + i,
} for i in range(23)]

# Alpaca's columns plus `text` (tatsu-lab/alpaca has one: the formatted prompt), which is dropped.
ALPACA_ROWS = [{
    "instruction": f"Give {i} reasons to test.",
    "input": "" if i % 3 else f"Context {i}\nwith \u00fcml\u00e4uts",
    "output": f"Reason {i}: tests catch \"bugs\".",
    "text": f"### Instruction:\nGive {i} reasons to test.",
} for i in range(17)]
ALPACA_FIELDS = ("instruction", "input", "output")


# The sanitizer run (scripts/test --sanitize, tests/sanitizer/env.sh) shares a loaded machine: three
# times the time, as tests/CMakeLists.txt gives every test there.
TIMEOUT = 120 * (3 if os.environ.get("COIL_SANITIZE") == "1" else 1)


def run(tmp_path, *args):
    """Runs the script offline, with the Hugging Face caches inside tmp_path."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def check_run(tmp_path, *args):
    result = run(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    return result


def decompress(path):
    data = path.read_bytes()
    if path.name.endswith(".zst"):
        try:
            import zstandard
            return zstandard.ZstdDecompressor().stream_reader(data).read()
        except ImportError:
            return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                                  check=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def shards(directory, split):
    """{shard name: [rows]} for one split, in name order."""
    found = {}
    for path in sorted(Path(directory).glob(f"{split}-*")):
        text = decompress(path).decode("utf-8")
        assert text.endswith("\n"), path
        found[path.name] = [json.loads(line) for line in text.splitlines()]
    return found


def rows_of(directory, split):
    return [row for rows in shards(directory, split).values() for row in rows]


def check_sharding(directory, split, rows, per_shard, extension):
    """Shards numbered from 0, per_shard rows each, the last one holding the rest."""
    found = shards(directory, split)
    assert list(found) == [f"{split}-{n:05d}{extension}" for n in range(len(found))]
    sizes = [len(r) for r in found.values()]
    full, rest = divmod(rows, per_shard)
    assert sizes == [per_shard] * full + ([rest] if rest else [])


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_fineweb_parquet_shards_and_split(tmp_path):
    write_parquet(tmp_path / "fineweb.parquet", FINEWEB_ROWS)
    out = tmp_path / "out"
    check_run(tmp_path, "--data-files", tmp_path / "fineweb.parquet", "--kind", "fineweb",
              "--output", out, "--docs-per-shard", 5, "--val-fraction", 0.3)

    train, val = rows_of(out, "train"), rows_of(out, "val")
    # Exactly the rows given, every field kept, `text` first, source order within each split.
    assert all(list(row) == list(FINEWEB_ROWS[0]) for row in train + val)
    val_ids = {row["id"] for row in val}
    assert train == [r for r in FINEWEB_ROWS if r["id"] not in val_ids]
    assert val == [r for r in FINEWEB_ROWS if r["id"] in val_ids]
    assert 0 < len(val) < len(FINEWEB_ROWS)  # 30% of 23 rows: both splits have some

    check_sharding(out, "train", len(train), 5, ".jsonl.zst")
    check_sharding(out, "val", len(val), 5, ".jsonl.zst")
    assert not list(out.glob("*.tmp"))

    # The same bytes on a second run; the same split when the rows come reversed.
    again = tmp_path / "again"
    check_run(tmp_path, "--data-files", tmp_path / "fineweb.parquet", "--output", again,
              "--docs-per-shard", 5, "--val-fraction", 0.3)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in again.iterdir())
    for path in out.iterdir():
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    write_parquet(tmp_path / "reversed.parquet", FINEWEB_ROWS[::-1])
    reversed_out = tmp_path / "reversed"
    check_run(tmp_path, "--data-files", tmp_path / "reversed.parquet", "--output", reversed_out,
              "--docs-per-shard", 5, "--val-fraction", 0.3)
    assert {row["id"] for row in rows_of(reversed_out, "val")} == val_ids

    # Shards of an earlier export are not mixed with new ones.
    result = run(tmp_path, "--data-files", tmp_path / "fineweb.parquet", "--output", out)
    assert result.returncode != 0 and "--overwrite" in result.stderr


def test_alpaca_json_gz(tmp_path):
    (tmp_path / "alpaca_data.json").write_text(json.dumps(ALPACA_ROWS, indent=4))
    out = tmp_path / "out"
    check_run(tmp_path, "--data-files", tmp_path / "alpaca_data.json", "--kind", "alpaca",
              "--output", out, "--docs-per-shard", 4, "--val-fraction", 0.25,
              "--compression", "gz")
    expected = [{k: r[k] for k in ALPACA_FIELDS} for r in ALPACA_ROWS]
    train, val = rows_of(out, "train"), rows_of(out, "val")
    assert all(list(row) == list(ALPACA_FIELDS) for row in train + val)
    assert 0 < len(val) < len(expected)
    assert train == [r for r in expected if r not in val]
    assert val == [r for r in expected if r in val]
    check_sharding(out, "train", len(train), 4, ".jsonl.gz")
    check_sharding(out, "val", len(val), 4, ".jsonl.gz")


def test_alpaca_jsonl_without_input_max_docs(tmp_path):
    # JSON Lines whose rows lack `input` (it becomes ""), uncompressed output, --max-docs.
    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in ALPACA_ROWS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = check_run(tmp_path, "--data-files", tmp_path / "rows.jsonl", "--kind", "alpaca",
                       "--output", out, "--max-docs", 7, "--compression", "none")
    assert [p.name for p in out.iterdir()] == ["train-00000.jsonl"]
    written = rows_of(out, "train")
    assert all(list(row) == list(ALPACA_FIELDS) for row in written)
    assert written == [{"instruction": r["instruction"], "input": "", "output": r["output"]}
                       for r in rows[:7]]
    assert "7 rows" in result.stdout


def test_fineweb_rows_without_text_fail(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    result = run(tmp_path, "--data-files", tmp_path / "rows.jsonl", "--output", tmp_path / "out")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("export-hf-dataset: error: row 0 has no text")
    assert not list((tmp_path / "out").glob("*"))  # no partial shard left behind


def test_missing_input_is_a_one_line_error(tmp_path):
    result = run(tmp_path, "--data-files", tmp_path / "missing.parquet",
                 "--output", tmp_path / "out")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export-hf-dataset: error:") and "missing.parquet" in lines[0]
    assert not (tmp_path / "out").exists()
