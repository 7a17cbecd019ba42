"""Weights & Biases in offline mode (no network): a `coil pretrain` run and its resumption send, through
the sidecar, every step of metrics.jsonl to one W&B run. The offline run files (run-<id>.wandb) are
read back with wandb's own record type (wandb.proto.wandb_internal_pb2.Record) from the LevelDB-log
framing wandb writes them in. A sidecar that cannot start, or dies, is one warning and the run goes on."""
import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time

import pytest
from wandb.proto import wandb_internal_pb2

sys.path.insert(0, os.path.dirname(__file__))
import tiny_data  # noqa: E402

COIL = os.environ["COIL"]
HERE = os.path.dirname(os.path.abspath(__file__))
SIDECAR = os.path.join(HERE, "..", "..", "launch", "wandb_sidecar.py")


def run(*args):
    return subprocess.run([COIL, *map(str, args)], check=True, capture_output=True, text=True)


def records(path):
    """The Records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB log
    blocks of 32 KiB, each chunk a 7-byte header (CRC, length, type: full, first, middle, last)."""
    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a file still being written ends in a part of a chunk
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(buf)
            yield r


def read_run(path):
    """run id, config (key -> value), history (step -> {key: value}) of one offline run file."""
    run_id, config, history = None, {}, {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, history


def expected(metrics):
    """The scalars each metrics.jsonl line should give, as TensorBoard gets them."""
    out = {}
    for m in metrics:
        row = out.setdefault(m["step"], {})
        if "val_loss" in m:
            row.update({"val/loss": m["val_loss"], "val/ppl": m["val_ppl"]})
        else:
            row.update({"train/" + k: v for k, v in m.items()
                        if k not in ("step", "tokens", "elapsed_s") and isinstance(v, (int, float))
                        and not isinstance(v, bool)})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and prepared shards, made once for the tests of this file."""
    tmp_path = tmp_path_factory.mktemp("data")
    tiny_data.prepare(tmp_path, run)
    return tmp_path


def pretrain(data, run_dir, steps, *sets):
    return run("pretrain", "--config", "/dev/null", "--set", f"data.train={data / 'shards'}",
               "--set", f"data.val={data / 'shards'}", "--set", f"data.tokenizer={data / 'tok.model'}",
               "--set", f"train.run_dir={run_dir}", "--set", f"train.max_steps={steps}", "--set", "train.seq_len=32",
               "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2",
               "--set", "train.eval_interval=2", "--set", "train.eval_batches=1", "--set", "train.threads=2",
               *[x for s in sets for x in ("--set", s)])


def test_offline_run_holds_every_step_and_a_resumed_run_continues_it(data, tmp_path):
    run_dir = tmp_path / "run"
    wandb = ["metrics.wandb_project=coil-test", "metrics.wandb_mode=offline", "metrics.wandb_run_name=tiny"]
    first = pretrain(data, run_dir, 4, *wandb, "metrics.peak_tflops=0.001")  # an MFU, for the first 4 steps
    assert "warning" not in first.stderr, first.stderr
    run_id = open(run_dir / "wandb_run_id").read().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    first_metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    # The resumption: 2 more steps from the checkpoint of step 4, into the same W&B run.
    second = pretrain(data, run_dir, 6, *wandb)
    assert "resuming" in second.stdout and "warning" not in second.stderr, second.stderr
    assert open(run_dir / "wandb_run_id").read().strip() == run_id
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert metrics[:len(first_metrics)] == first_metrics

    files = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert len(files) == 2, files  # one per start, both of the run id
    # wandb's own command line sees both as runs to sync.
    dry = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "sync", "--dry-run",
                          *[os.path.dirname(f) for f in files]], capture_output=True, text=True, check=True)
    assert "Would sync 2 run(s)" in dry.stdout + dry.stderr and all(f in dry.stdout + dry.stderr for f in files), dry
    history, configs = {}, []
    for path in files:
        rid, config, h = read_run(path)
        assert rid == run_id
        assert not set(h) & set(history), "a step sent twice"
        history.update(h)
        configs.append(config)
    want = expected(metrics)
    assert sorted(history) == sorted(want) == list(range(7))  # every step, 0 (the first evaluation) to 6
    assert history == want  # the same numbers, bit for bit
    assert {"train/loss", "train/lr_muon", "train/lr_adamw", "train/grad_norm", "train/tokens_per_sec"} <= set(history[3])
    assert {"val/loss", "val/ppl"} <= set(history[6])
    assert "train/mfu" in history[3] and "train/mfu" not in history[6]  # the second run knows no peak
    # The resolved configuration is the run's hyperparameters, the same as config.toml's.
    assert configs[0]["train"]["max_steps"] == 4 and configs[1]["train"]["max_steps"] == 6
    assert configs[1]["metrics"]["wandb_project"] == "coil-test" and configs[1]["train"]["seq_len"] == 32
    assert configs[1]["model"]["d_model"] > 0


def test_a_sidecar_that_cannot_run_is_one_warning(data, tmp_path):
    offline = ["metrics.wandb_project=coil-test", "metrics.wandb_mode=offline"]
    missing = pretrain(data, tmp_path / "a", 2, *offline, "metrics.wandb_python=/nonexistent/python")
    warnings = [line for line in missing.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot start /nonexistent/python" in warnings[0], missing.stderr
    assert "done, 2 steps" in missing.stdout
    # A python that is there but the sidecar dies in it (here: a shell that rejects -c's script).
    dies = pretrain(data, tmp_path / "b", 2, *offline, "metrics.wandb_python=/bin/false")
    warnings = [line for line in dies.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "the W&B sidecar exited with status 1" in warnings[0], dies.stderr
    assert "done, 2 steps" in dies.stdout
    # A python without wandb (this one with its site-packages off): the warning names the error.
    bare = tmp_path / "python-without-site"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    no_wandb = pretrain(data, tmp_path / "c", 2, *offline, f"metrics.wandb_python={bare}")
    warnings = [line for line in no_wandb.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, no_wandb.stderr
    assert "exited with status 1: ModuleNotFoundError: No module named 'wandb'" in warnings[0], warnings[0]
    assert "done, 2 steps" in no_wandb.stdout


def test_follower_reads_appended_lines_and_starts_over_on_a_trimmed_file(tmp_path):
    spec = importlib.util.spec_from_file_location("wandb_sidecar", SIDECAR)
    sidecar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sidecar)
    path = tmp_path / "metrics.jsonl"
    f = sidecar.Follower(str(path))
    assert f.lines() == []  # not there yet
    path.write_bytes(b'{"step": 1}\n{"step": 2')
    assert f.lines() == [b'{"step": 1}']  # the half-written line waits
    with open(path, "ab") as out:
        out.write(b'}\n{"step": 3}\n')
    assert f.lines() == [b'{"step": 2}', b'{"step": 3}']
    path.write_bytes(b'{"step": 1}\n')  # trimmed (a resumed run): read again from the start
    assert f.lines() == [b'{"step": 1}']
    assert sidecar.scalars({"step": 1, "loss": 2.5, "tokens": 64, "elapsed_s": 1.0, "grad_norm": None,
                            "batch_hash": "ab", "skipped": False}) == {"train/loss": 2.5}
    assert sidecar.scalars({"step": 2, "val_loss": 1.0, "val_ppl": 2.718}) == {"val/loss": 1.0, "val/ppl": 2.718}
    assert sidecar.scalars({"step": 2, "val_loss": 1.0, "val_ppl": 2.718, "val_loss_parts": {"web": 0.9, "code": None}}) == \
        {"val/loss": 1.0, "val/ppl": 2.718, "val/loss/web": 0.9}
    # Trimmed and written past the old end before the next read: the bytes read last are gone.
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert len(f.lines()) == 2
    path.write_bytes(b'{"step": 1}\n{"step": 7}\n{"step": 8}\n{"step": 9}\n')
    assert f.lines() == [b'{"step": 1}', b'{"step": 7}', b'{"step": 8}', b'{"step": 9}']


def test_a_killed_run_leaves_a_sidecar_that_sends_what_was_written_and_finishes(data, tmp_path):
    """coil killed (SIGKILL: no destructor runs): the kernel closes the sidecar's pipe; the sidecar,
    in a process group of its own, sends the lines written so far, finishes the W&B run and exits."""
    run_dir = tmp_path / "killed"
    args = ["pretrain", "--config", "/dev/null", "--set", f"data.train={data / 'shards'}",
            "--set", f"data.tokenizer={data / 'tok.model'}", "--set", f"train.run_dir={run_dir}",
            "--set", "train.max_steps=100000", "--set", "train.seq_len=32", "--set", "train.global_batch_size=2",
            "--set", "train.micro_batch_size=2", "--set", "train.eval_interval=0", "--set", "train.threads=1",
            "--set", "metrics.wandb_project=coil-test", "--set", "metrics.wandb_mode=offline"]
    p = subprocess.Popen([COIL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(open(run_dir / "metrics.jsonl").readlines()) >= 3:
            break
        time.sleep(0.1)
    p.kill()
    p.wait()
    run_id = open(run_dir / "wandb_run_id").read().strip()
    steps = set()
    for line in open(run_dir / "metrics.jsonl"):
        try:
            steps.add(json.loads(line)["step"])
        except ValueError:
            pass  # a line cut by the kill
    assert len(steps) >= 3
    deadline = time.time() + 60
    while time.time() < deadline:  # the sidecar finishing on its own
        files = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
        if files and any(r.WhichOneof("record_type") == "exit" for r in records(files[0])):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the sidecar did not finish the W&B run after coil was killed")
    _, _, history = read_run(files[0])
    assert set(history) == steps
