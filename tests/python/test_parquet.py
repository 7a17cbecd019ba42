"""Parquet in, as the Hub has it: pyarrow writes FineWeb-style files, `coil` reads them.

The round trip: `coil tokenizer train` and `coil data prepare` on Parquet give the same tokenizer
and byte-identical token shards as on JSONL of the same rows (several row groups per file, snappy
and zstd pages, nulls, unicode). The progress lines of both commands, with stderr not a terminal
and COIL_PROGRESS_INTERVAL_S=0: documents and tokens that only grow, a share of the input that
ends at 100%, counts equal to the manifest's. Bad files fail with one line naming the file.
"""
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COIL = os.environ["COIL"]
WORDS = ["the", "selective", "scan", "state", "space", "model", "caf\u00e9", "\u65e5\u672c\u8a9e",
         "\"quoted\"", "tab\there", "line\nbreak", "\u2014", "emoji \U0001F600", "coil", "mamba"]


def fineweb_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
        rows.append({
            "text": None if i % 37 == 5 else text,  # a null text: an empty document, skipped
            "id": f"<urn:uuid:{seed:04d}-{i:08d}>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{seed}/{i}",
            "date": "2024-02-21T08:00:00Z",
            "file_path": "s3://commoncrawl/crawl-data/x.warc.gz",
            "language": "en",
            "language_score": 0.9,
            "token_count": len(text) // 4,
        })
    return rows


def write_both(tmp_path, files):
    """Each (name, rows, compression[, text type]) as name.parquet (row groups of 40) and as name.jsonl."""
    (tmp_path / "pq").mkdir()
    (tmp_path / "js").mkdir()
    for name, rows, compression, *text_type in files:
        table = pa.Table.from_pylist(rows)
        if text_type:  # large_string, or dictionary<string> as pyarrow writes a categorical column
            i = table.schema.get_field_index("text")
            column = table.column(i)
            column = column.dictionary_encode() if text_type[0] == "dictionary" else column.cast(text_type[0])
            table = table.set_column(i, "text", column)
        pq.write_table(table, tmp_path / "pq" / f"{name}.parquet", row_group_size=40, compression=compression)
        with open(tmp_path / "js" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    assert pq.ParquetFile(tmp_path / "pq" / "a.parquet").metadata.num_row_groups > 3


def coil(*args, env=None, check=True, cwd=None):
    r = subprocess.run([COIL, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})), cwd=cwd)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_round_trip_gives_the_same_tokenizer_and_shards(tmp_path):
    write_both(tmp_path, [("a", fineweb_rows(300, 1), "snappy"), ("b", fineweb_rows(170, 2), "zstd"),
                          ("c", fineweb_rows(90, 3), "snappy", pa.large_string()),
                          ("d", fineweb_rows(60, 4), "none", "dictionary")])
    assert pq.read_schema(tmp_path / "pq" / "d.parquet").field("text").type == pa.dictionary(pa.int32(), pa.string())
    for kind in ("pq", "js"):  # the same relative output prefix: the model records it
        (tmp_path / f"tok-{kind}").mkdir()
        coil("tokenizer", "train", "--input", tmp_path / kind, "--output", "tok", "--vocab-size", 300,
             "--threads", 1, cwd=tmp_path / f"tok-{kind}")
    model = (tmp_path / "tok-pq" / "tok.model").read_bytes()
    assert model == (tmp_path / "tok-js" / "tok.model").read_bytes()
    (tmp_path / "tok-js.model").write_bytes(model)
    for kind in ("pq", "js"):
        coil("data", "prepare", "--input", tmp_path / kind, "--tokenizer", tmp_path / "tok-js.model",
             "--output", tmp_path / f"out-{kind}", "--threads", 2, "--shard-tokens", 5000)
    names = sorted(p.name for p in (tmp_path / "out-js").glob("tokens-*"))
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "out-pq").glob("tokens-*"))
    for n in names:
        assert (tmp_path / "out-pq" / n).read_bytes() == (tmp_path / "out-js" / n).read_bytes(), n
    m_pq = json.loads((tmp_path / "out-pq" / "manifest.json").read_text())
    m_js = json.loads((tmp_path / "out-js" / "manifest.json").read_text())
    assert (m_pq["tokens"], m_pq["documents"], m_pq["shards"]) == (m_js["tokens"], m_js["documents"], m_js["shards"])
    # A null text is an empty document in Parquet (a nullable column); JSONL's "text": null is malformed.
    per_file = [sum(1 for i in range(n) if i % 37 == 5) for n in (300, 170, 90, 60)]
    assert m_pq["documents"] == 620 - sum(per_file)
    assert [i["skipped_empty"] for i in m_pq["inputs"]] == per_file
    assert [i["skipped_malformed"] for i in m_js["inputs"]] == per_file


LINE = re.compile(r"^(prepare|tokenizer): (\S+) documents, (?:(\S+) tokens, \S+ tokens/s|[\d.]+ MB/s), "
                  r"([\d.]+)% of ([\d.]+) MB, (?:ETA \S+|\S+ elapsed)$")


def number(s):
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    return float(s[:-1]) * scale[s[-1]] if s[-1] in scale else float(s)


def progress_lines(stderr, what):
    lines = [l for l in stderr.splitlines() if l.startswith(what + ":")]
    parsed = []
    for l in lines:
        m = LINE.match(l)
        assert m, l
        parsed.append((number(m.group(2)), number(m.group(3)) if m.group(3) else 0.0, float(m.group(4))))
    return parsed


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    write_both(tmp_path, [("a", fineweb_rows(400, 3), "snappy"), ("b", fineweb_rows(200, 4), "snappy")])
    env = {"COIL_PROGRESS_INTERVAL_S": "0"}
    for kind in ("pq", "js"):
        r = coil("tokenizer", "train", "--input", tmp_path / kind, "--output", tmp_path / f"tok-{kind}",
                 "--vocab-size", 300, "--threads", 1, env=env)
        assert "\r" not in r.stderr
        lines = progress_lines(r.stderr, "tokenizer")
        assert len(lines) > 10
        assert [l[2] for l in lines] == sorted(l[2] for l in lines) and lines[-1][2] == 100.0
        docs = [l[0] for l in lines]
        assert docs == sorted(docs) and docs[-1] == 600 - sum(1 for n in (400, 200) for i in range(n) if i % 37 == 5)

        r = coil("data", "prepare", "--input", tmp_path / kind, "--tokenizer", tmp_path / f"tok-{kind}.model",
                 "--output", tmp_path / f"out-{kind}", "--threads", 1, env=env)
        assert "\r" not in r.stderr
        lines = progress_lines(r.stderr, "prepare")
        manifest = json.loads((tmp_path / f"out-{kind}" / "manifest.json").read_text())
        assert len(lines) > 10
        for i in range(3):
            values = [l[i] for l in lines]
            assert values == sorted(values), (kind, i)
        assert lines[-1][0] == manifest["documents"]
        assert abs(lines[-1][1] - manifest["tokens"]) <= 0.005 * manifest["tokens"] + 0.5  # printed as 12.3k
        assert lines[-1][2] == 100.0
    # The default interval (10 s) prints only the final line of a job this short.
    r = coil("data", "prepare", "--input", tmp_path / "pq", "--tokenizer", tmp_path / "tok-pq.model",
             "--output", tmp_path / "out-quiet", "--threads", 1)
    assert len(progress_lines(r.stderr, "prepare")) == 1


def test_progress_on_a_terminal_is_one_line_rewritten_in_place(tmp_path):
    import pty
    write_both(tmp_path, [("a", fineweb_rows(400, 6), "snappy")])
    coil("tokenizer", "train", "--input", tmp_path / "js", "--output", tmp_path / "tok", "--vocab-size", 300)
    master, slave = pty.openpty()
    p = subprocess.Popen([COIL, "data", "prepare", "--input", tmp_path / "pq", "--tokenizer", tmp_path / "tok.model",
                          "--output", tmp_path / "out", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=slave,
                         env=dict(os.environ, COIL_PROGRESS_INTERVAL_S="0"))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=120) == 0
    text = out.decode()
    # Every line of progress starts with a carriage return and clears the rest of the line; only
    # the last one ends with a line end.
    draws = text.split("\r")
    updates = [d for d in draws if d.startswith("prepare: ")]
    assert len(updates) > 10, text[:500]
    assert all(d.endswith("\x1b[K") and LINE.match(d[:-3]) for d in updates), updates[:3]
    assert draws[-1] == "\n" and text.count("\n") == 1  # the pty writes the last line end as \r\n
    assert "100.0% of" in updates[-1]


def test_bad_files_are_one_line_errors(tmp_path):
    write_both(tmp_path, [("a", fineweb_rows(200, 5), "snappy")])
    coil("tokenizer", "train", "--input", tmp_path / "js", "--output", tmp_path / "tok", "--vocab-size", 300)
    good = (tmp_path / "pq" / "a.parquet").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.parquet").write_bytes(good[: len(good) // 2])
    (bad / "json.parquet").write_text('{"text": "hello"}\n')
    pq.write_table(pa.table({"text": [1, 2, 3]}), bad / "ints.parquet")
    pq.write_table(pa.table({"content": ["x", "y"]}), bad / "nocol.parquet")
    cases = {"cut.parquet": "damaged or truncated Parquet file",
             "json.parquet": "not a Parquet file",
             "ints.parquet": 'column "text" holds int64, not strings',
             "nocol.parquet": 'no column "text" (its columns: content)'}
    for name, words in cases.items():
        for args in (["data", "prepare", "--output", tmp_path / f"o-{name}", "--tokenizer", tmp_path / "tok.model"],
                     ["tokenizer", "train", "--output", tmp_path / f"t-{name}", "--vocab-size", 300]):
            r = coil(*args, "--input", bad / name, check=False)
            assert r.returncode != 0
            errors = [l for l in r.stderr.splitlines() if l.startswith("coil: error:")]
            assert len(errors) == 1, r.stderr
            assert str(bad / name) in errors[0] and words in errors[0], errors[0]
