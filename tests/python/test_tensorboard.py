"""A short `coil pretrain` run: its TensorBoard event file, read by tensorboard's own reader, holds
the same scalars as metrics.jsonl."""
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(__file__))
import tiny_data  # noqa: E402

COIL = os.environ["COIL"]


def run(*args):
    subprocess.run([COIL, *map(str, args)], check=True, capture_output=True, text=True)


def test_event_file_matches_metrics(tmp_path):
    tiny_data.prepare(tmp_path, run)
    run_dir = tmp_path / "run"
    run("pretrain", "--config", "/dev/null", "--set", f"data.train={tmp_path / 'shards'}",
        "--set", f"data.val={tmp_path / 'shards'}", "--set", f"data.tokenizer={tmp_path / 'tok.model'}",
        "--set", f"train.run_dir={run_dir}", "--set", "train.max_steps=4", "--set", "train.seq_len=32",
        "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2",
        "--set", "train.eval_interval=2", "--set", "train.eval_batches=1", "--set", "train.threads=2")
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    events = os.listdir(run_dir / "tb")
    assert len(events) == 1 and "tfevents" in events[0]
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr_muon", "train/lr_adamw", "train/grad_norm", "val/loss"} <= set(acc.Tags()["scalars"])
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    val = {e.step: e.value for e in acc.Scalars("val/loss")}
    assert loss == pytest.approx({m["step"]: m["loss"] for m in metrics if "loss" in m}, rel=1e-6)
    assert val == pytest.approx({m["step"]: m["val_loss"] for m in metrics if "val_loss" in m}, rel=1e-6)
    assert sorted(val) == [0, 2, 4]
