#!/usr/bin/env python3
"""`coil eval` against transformers on the same rows, one run, the same threads: a Coil checkpoint is
exported with `coil ckpt export-hf` and loaded as a MambaForCausalLM; both score the prepared shards
of --data (the stream EOS + each document + EOS, cut into rows of seq_len + 1 that overlap by one,
the last one shorter; no document masking, which transformers does not have). Prints each side's
loss (they must agree to 1e-5) and tokens/s of the scoring alone (Coil's from its --json, without
loading; transformers' timed around its forward passes), and their ratio.

  bench/eval_vs_transformers.py --coil build/bin/coil --checkpoint runs/demo-pretrain/checkpoints/final \\
      --data data/demo/shards-val [--seq-len 256] [--batch-size 8] [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import MambaForCausalLM


def stream_of(shards):
    """EOS, then the shards' tokens (each document is followed by its EOS there)."""
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    dtype = np.uint16 if manifest["dtype"] == "uint16" else np.uint32
    parts = [np.fromfile(os.path.join(shards, s["tokens_file"]), dtype=dtype) for s in manifest["shards"]]
    return np.concatenate([np.array([manifest["eos_id"]], dtype=np.int64)] + [p.astype(np.int64) for p in parts])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coil", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="a prepared directory (coil data prepare)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    torch.set_num_threads(a.threads)

    r = subprocess.run([a.coil, "eval", "--checkpoint", a.checkpoint, "--data", a.data, "--seq-len", str(a.seq_len),
                        "--batch-size", str(a.batch_size), "--document-masking", "false", "--device", "cpu", "--json"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"coil eval failed: {r.stderr}")
    coil = json.loads(r.stdout)

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([a.coil, "ckpt", "export-hf", a.checkpoint, os.path.join(tmp, "hf")], check=True,
                       capture_output=True, env=env)
        model = MambaForCausalLM.from_pretrained(os.path.join(tmp, "hf")).eval()
    stream = torch.from_numpy(stream_of(a.data))
    starts = list(range(0, len(stream) - 1, a.seq_len))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(starts), a.batch_size):
            rows = [stream[p:p + a.seq_len + 1] for p in starts[i:i + a.batch_size]]
            full = [x for x in rows if len(x) == a.seq_len + 1]
            groups = ([torch.stack(full)] if full else []) + [x.unsqueeze(0) for x in rows if len(x) != a.seq_len + 1]
            for g in groups:  # the whole rows together, the shorter last one alone (no padding needed)
                logits = model(g[:, :-1]).logits
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), g[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += g[:, 1:].numel()
    hf_seconds = time.perf_counter() - t0
    hf_loss = total / count

    print(f"rows of {a.seq_len}, {a.batch_size} a batch, {a.threads} threads, {count} targets")
    print(f"coil eval:    loss {coil['loss']:.6f}, {coil['targets'] / coil['seconds']:,.0f} tokens/s ({coil['seconds']:.2f} s)")
    print(f"transformers: loss {hf_loss:.6f}, {count / hf_seconds:,.0f} tokens/s ({hf_seconds:.2f} s)")
    rel = abs(coil["loss"] - hf_loss) / hf_loss
    print(f"loss relative difference {rel:.2e}; coil / transformers tokens/s: {hf_seconds / coil['seconds']:.2f}x")
    if coil["targets"] != count or rel > 1e-5:
        sys.exit("the two do not agree")


if __name__ == "__main__":
    main()
