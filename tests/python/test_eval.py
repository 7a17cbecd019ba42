"""`coil eval` against transformers: a MambaForCausalLM imported with its GPT-NeoX-style
tokenizer.json (test_generate_hf's fixture) scores held-out text, and Coil's loss, target count and
bits per byte equal those computed here with transformers and `tokenizers` on the same rows (EOS,
each document + EOS, cut into rows of seq_len + 1 that overlap by one); with document masking,
each document scored from a fresh state; with --sft, the mean loss over the response tokens (and
EOS) of each example alone in the Alpaca template; under mpirun the ranks share the batches and the
first prints what one process prints; several data sets are each scored as alone, then tabled; bad
input is one line and exit 2 or 1."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from test_generate_hf import coil, hf, neox_tokenizer  # noqa: E402,F401  (hf: the fixture)

EOS = 0  # <|endoftext|>
DOCS = ["The snake coils around a warm stone and sleeps.", "Rain falls on green hills; the rivers rise.",
        "12 numbers: 3 4 5 6 7 8 9 10 11 12 13 14", "'quotes' é ü 日本 and more text to make it longer than a row",
        "a", "the end of the set, with a tail that runs past one row of the evaluation for sure"]


@pytest.fixture(scope="module")
def text(hf, tmp_path_factory):
    tmp, model, _ = hf
    path = tmp_path_factory.mktemp("eval") / "val.jsonl"
    with open(path, "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer.from_file(str(tmp / "hf-text" / "tokenizer.json"))
    return path, [tok.encode(d).ids for d in DOCS], tok


def loss_sum(model, inputs, targets):
    with torch.no_grad():
        logits = model(torch.tensor([inputs])).logits[0].double()
    return F.cross_entropy(logits, torch.tensor(targets), reduction="sum").item()


def run_eval(tmp, path, *args):
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", path, "--json", *args)
    return json.loads(r.stdout)


@pytest.mark.parametrize("seq_len,batch", [(16, 3), (7, 1), (512, 8)])
def test_loss_equals_transformers_on_the_same_rows(hf, text, seq_len, batch):
    tmp, model, _ = hf
    path, ids, _ = text
    stream = [EOS] + [t for d in ids for t in d + [EOS]]
    want = 0.0
    for p in range(0, len(stream) - 1, seq_len):  # rows overlap by one; the last one is shorter
        row = stream[p:p + seq_len + 1]
        want += loss_sum(model, row[:-1], row[1:])
    got = run_eval(tmp, path, "--seq-len", seq_len, "--batch-size", batch, "--document-masking", "false")
    assert got["targets"] == len(stream) - 1
    assert got["documents"] == len(DOCS)
    assert got["rows"] == math.ceil((len(stream) - 1) / seq_len)
    assert got["loss"] == pytest.approx(want / (len(stream) - 1), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want / (len(stream) - 1)), rel=1e-5)
    nbytes = sum(len(d.encode()) for d in DOCS)
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(want / math.log(2) / nbytes, rel=1e-5)


def test_document_masking_scores_each_document_from_a_fresh_state(hf, text):
    """One row holds everything; with masking each document (and its EOS) runs alone, and the next
    document's first token is predicted at its EOS, as training does (data/loader.h)."""
    tmp, model, _ = hf
    path, ids, _ = text
    docs = [[]] + ids  # the leading EOS is a document of its own
    want = 0.0
    for k, d in enumerate(docs):
        x = d + [EOS]
        targets = x[1:] + ([docs[k + 1][0]] if k + 1 < len(docs) else [])
        want += loss_sum(model, x[:len(targets)], targets)
    count = sum(len(d) + 1 for d in ids)
    got = run_eval(tmp, path, "--seq-len", 512, "--document-masking", "true")
    assert got["document_masking"] is True and got["rows"] == 1 and got["targets"] == count
    assert got["loss"] == pytest.approx(want / count, rel=1e-5)
    flowing = run_eval(tmp, path, "--seq-len", 512, "--document-masking", "false")
    assert abs(flowing["loss"] - got["loss"]) > 1e-3  # the resets change the score


def test_prepared_shards_score_as_the_text_they_were_prepared_from(hf, text, tmp_path):
    tmp, _, _ = hf
    path, _, _ = text
    coil("data", "prepare", "--input", path, "--tokenizer", tmp / "hf-text" / "tokenizer.json", "--output",
         tmp_path / "shards")
    for masking in ("false", "true"):
        want = run_eval(tmp, path, "--seq-len", 16, "--document-masking", masking)
        got = run_eval(tmp, tmp_path / "shards", "--seq-len", 16, "--document-masking", masking)
        assert got["loss"] == want["loss"] and got["targets"] == want["targets"] and got["rows"] == want["rows"]
        assert "bytes" not in got  # shards hold no text
    # Shards of another tokenizer are refused.
    neox_tokenizer(DOCS * 20, 300).save(str(tmp_path / "other.json"))
    coil("data", "prepare", "--input", path, "--tokenizer", tmp_path / "other.json", "--output", tmp_path / "sh2")
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "sh2", check=False)
    assert r.returncode == 1 and "was prepared with another tokenizer" in r.stderr, r.stderr


def test_several_checkpoints_in_one_call(hf, text, tmp_path):
    """A line each, in order (an uncommitted .tmp skipped); the consolidated copy of a checkpoint scores
    as the checkpoint does."""
    tmp, _, _ = hf
    path, _, _ = text
    coil("ckpt", "consolidate", tmp / "ck-text", tmp_path / "one.h5")
    (tmp_path / "step-00000009.tmp").mkdir()  # a save in progress, as a glob of step-* finds it
    r = coil("eval", "--checkpoint", tmp / "ck-text", tmp_path / "step-00000009.tmp", tmp_path / "one.h5", "--data", path,
             "--json", "--seq-len", 16)
    assert "skipping" in r.stderr and "step-00000009.tmp" in r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["checkpoint"] for g in lines] == [str(tmp / "ck-text"), str(tmp_path / "one.h5")]
    assert lines[0]["loss"] == lines[1]["loss"] and lines[0]["targets"] == lines[1]["targets"]


def test_several_data_sets_in_one_call(hf, text, tmp_path):
    """Each set scored on its own, as a call of its own scores it (a JSON line each, with its data); the
    text output ends with a table, a row per checkpoint and a column per set's short name."""
    tmp, _, _ = hf
    path = tmp_path / "val.jsonl"  # beside the others: their short names are then "val" and "short"
    shutil.copy(text[0], path)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:2]))
    coil("data", "prepare", "--input", path, "--tokenizer", tmp / "hf-text" / "tokenizer.json", "--output",
         tmp_path / "shards")
    sets = [path, tmp_path / "shards", short]
    alone = [run_eval(tmp, d, "--seq-len", 16) for d in sets]
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", *sets, "--json", "--seq-len", 16)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["data"] for g in lines] == [str(d) for d in sets]
    for got, want in zip(lines, alone):
        assert got["loss"] == want["loss"] and got["targets"] == want["targets"] and got["rows"] == want["rows"]
    assert lines[2]["documents"] == 2 and lines[2]["loss"] != lines[0]["loss"]
    # Two checkpoints (the second a consolidated copy) by two sets: the table.
    coil("ckpt", "consolidate", tmp / "ck-text", tmp_path / "one.h5")
    r = coil("eval", "--checkpoint", tmp / "ck-text", tmp_path / "one.h5", "--data", path, short, "--seq-len", 16)
    out = r.stdout.splitlines()
    at = out.index("eval: loss (perplexity), a row per checkpoint, a column per data set")
    assert out[at + 1].split() == ["checkpoint", "val", "short"]
    cell = lambda g: f"{g['loss']:.4f} ({math.exp(g['loss']):.2f})"
    for row, checkpoint in zip(out[at + 2:], [tmp / "ck-text", tmp_path / "one.h5"]):
        assert row.split() == [str(checkpoint), *cell(alone[0]).split(), *cell(alone[2]).split()], out
    assert len(out) == at + 4
    # A set that does not read stops the call, naming it.
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", path, tmp_path / "nothing*.jsonl", check=False)
    assert r.returncode == 1 and "no file matches" in r.stderr and "nothing*.jsonl" in r.stderr, r.stderr


def test_max_tokens_stops_after_the_document_that_reaches_it(hf, text):
    tmp, _, _ = hf
    path, ids, _ = text
    got = run_eval(tmp, path, "--seq-len", 16, "--max-tokens", len(ids[0]) + 2)
    assert got["documents"] == 2 and got["targets"] == len(ids[0]) + len(ids[1]) + 2


def test_sft_loss_is_the_mean_over_responses_of_each_example_alone(hf, text, tmp_path):
    tmp, model, _ = hf
    _, _, tok = text
    examples = [{"instruction": "Say snake.", "input": "", "output": "snake snake"},
                {"instruction": "Add the numbers.", "input": "3 4", "output": "7"},
                {"instruction": "Describe the rain on the hills.", "input": "", "output": "It falls, soft and green."}]
    with open(tmp_path / "sft.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    want, count = 0.0, 0
    for e in examples:
        if e["input"]:
            prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      f"{e['instruction']}\n\n### Input:\n{e['input']}\n\n### Response:\n")
        else:
            prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      f"the request.\n\n### Instruction:\n{e['instruction']}\n\n### Response:\n")
        p, r = tok.encode(prompt).ids, tok.encode(e["output"]).ids + [EOS]
        x = p + r
        with torch.no_grad():
            logits = model(torch.tensor([x[:-1]])).logits[0].double()
        want += F.cross_entropy(logits[len(p) - 1:], torch.tensor(r), reduction="sum").item()
        count += len(r)
    got = run_eval(tmp, tmp_path / "sft.jsonl", "--sft", "--seq-len", 256, "--batch-size", 2)
    assert got["examples"] == 3 and got["targets"] == count
    assert got["loss"] == pytest.approx(want / count, rel=1e-5)
    assert "bits_per_byte" not in got


MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               COIL_PROGRESS_INTERVAL_S="3600")  # the progress line: the final one only
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"]


def mpi_eval(ranks, *args):
    return subprocess.run(MPIRUN + ["-np", str(ranks), os.environ["COIL"], "eval", *map(str, args)],
                          capture_output=True, text=True, env=MPI_ENV)


@pytest.mark.parametrize("ranks,seq_len,batch", [(3, 7, 1), (2, 16, 3), (3, 512, 8)])
def test_ranks_share_the_batches_and_give_the_result_of_one_process(hf, text, ranks, seq_len, batch):
    """Text (every rank scores batches: 7 / 1 gives 31 batches; 512 / 8 gives one, so two ranks score
    none), and SFT examples: the same counts, the same loss up to the order of the double additions, one
    line. The one process is a rank alone under mpirun: one thread, as each rank has (with two its
    float32 sums would differ in the last bits)."""
    tmp, _, _ = hf
    path, _, _ = text
    args = ["--checkpoint", tmp / "ck-text", "--data", path, "--json", "--seq-len", seq_len, "--batch-size", batch]
    one = json.loads(mpi_eval(1, *args).stdout)
    r = mpi_eval(ranks, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    got = json.loads(lines[0])
    for key in ("targets", "rows", "documents", "bytes"):
        assert got[key] == one[key], key
    assert got["loss"] == pytest.approx(one["loss"], rel=1e-12)
    assert r.stderr.count("eval: ") == 1, r.stderr  # the first rank's progress line only

    sft = tmp / "sft-ranks.jsonl"
    with open(sft, "w") as f:
        for i in range(7):
            f.write(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))})
                    + "\n")
    args = ["--checkpoint", tmp / "ck-text", "--data", sft, "--sft", "--seq-len", 160, "--batch-size", 1, "--json"]  # a row each
    one = json.loads(mpi_eval(1, *args).stdout)
    r = mpi_eval(ranks, *args)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["targets"], got["rows"], got["examples"]) == (one["targets"], one["rows"], 7)
    assert one["rows"] == 7
    assert got["loss"] == pytest.approx(one["loss"], rel=1e-12)


def test_an_error_on_one_rank_ends_them_all(hf, text, tmp_path):
    """Rank 0 scores good data and waits in the final all-reduce; rank 1 (its own command line, MPI's
    MPMD form) has none: its error must end rank 0 too, not leave it waiting forever."""
    tmp, _, _ = hf
    path, _, _ = text
    eval_of = lambda data: [os.environ["COIL"], "eval", "--checkpoint", str(tmp / "ck-text"), "--data", str(data)]
    r = subprocess.run(MPIRUN + ["-np", "1", *eval_of(path), ":", "-np", "1", *eval_of(tmp_path / "nothing*.jsonl")],
                       capture_output=True, text=True, env=MPI_ENV, timeout=120)
    assert r.returncode == 1 and "no file matches" in r.stderr, r.stderr


def test_bad_input(hf, tmp_path):
    tmp, _, _ = hf
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "nothing*.jsonl", check=False)
    assert r.returncode == 1 and "no file matches" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    (tmp_path / "empty.jsonl").write_text("")
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "empty.jsonl", check=False)
    assert r.returncode == 1 and "no document to score" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "empty.jsonl", "--batch-size", 0, check=False)
    assert r.returncode == 1 and "--batch-size must be >= 1, got 0" in r.stderr
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "empty.jsonl", "--document-masking", "yes",
             check=False)
    assert r.returncode == 2 and "--document-masking" in r.stderr
    r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "empty.jsonl", "--dtype", "fp8", check=False)
    assert r.returncode == 2 and "--dtype" in r.stderr
    if not torch.cuda.is_available():
        r = coil("eval", "--checkpoint", tmp / "ck-text", "--data", tmp_path / "empty.jsonl", "--device", "cuda",
                 check=False)
        assert r.returncode == 1 and "--device cuda: CUDA is not available here" in r.stderr, r.stderr
    r = coil("eval", "--checkpoint", tmp / "ck", "--data", tmp_path / "empty.jsonl", check=False)
    assert r.returncode == 1 and "holds no tokenizer" in r.stderr
    r = coil("eval", "--checkpoint", tmp_path / "no-checkpoint", "--data", tmp_path / "empty.jsonl", check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "no-checkpoint" in r.stderr, r.stderr
