#!/usr/bin/env python3
"""What packing with the state reset at document boundaries (issue 19) does, measured with `coil`.

SFT (data.sft_packing), on an Alpaca-format train/val pair, the same model and seq_len:
  - throughput: padded (one example a row) against packed (several a row, seq_idx resetting the
    state between them), the same global batch of rows and the same number of steps: examples/s and
    response tokens/s from the runs' own timings (metrics.jsonl's elapsed_s between the first and
    the last logged step: no start-up, no evaluation);
  - quality at equal examples seen: padded with a global batch of G rows for S steps against packed
    with the batch of rows that holds about as many examples (G / rows ratio) for as many steps, so
    that both runs see the same examples in the same number of optimizer steps; both final models are
    then evaluated the same way (padded rows, the same whole-batch prefix of the val set).
Pretraining (data.document_masking) on prepared shards: runs with masking off and on, for several
seeds, each final model evaluated both ways (every document from a zero state, and the state flowing
across documents), at equal tokens.

Every evaluation is a run that starts from the checkpoint (SFT: train.pretrained_checkpoint_path;
pretraining: a copy of the final checkpoint resumed for one more step at a learning rate of 0)
and reads its step-0 / final val loss.

  bench/packing_effect.py sft --coil build/bin/coil --config configs/demo-sft.toml \
      --train data/demo/alpaca/train.json --val data/demo/alpaca/val.jsonl [--steps 200] [--seq-len 512]
  bench/packing_effect.py pretrain --coil build/bin/coil --config configs/demo-pretrain.toml [--seeds 0 1]
`sft --steps 0` measures the throughput only; `--concurrent` runs its padded and packed runs at the
same time, so that on a loaded machine both see the same load.
Prints a table; --json FILE writes the figures.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile


def start(coil, phase, config, sets, run_dir):
    cmd = [coil, phase, "--config", config, "--set", f"train.run_dir={run_dir}"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    log = open(run_dir + ".log", "w+")  # a file, not a pipe: two runs at once never block on output
    return cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log


def finish(cmd, p, log, run_dir):
    p.wait()
    log.seek(0)
    out = log.read()
    log.close()
    if p.returncode != 0:
        sys.exit(f"packing_effect: {' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return out, lines


def run(coil, phase, config, sets, run_dir):
    return finish(*start(coil, phase, config, sets, run_dir), run_dir)


def val_losses(lines):
    return {l["step"]: l["val_loss"] for l in lines if "val_loss" in l}


def seconds_per_step(lines):
    train = [l for l in lines if "loss" in l and "elapsed_s" in l]
    a, b = train[0], train[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def sft_summary(out):
    m = re.search(r"SFT data .*?: (\d+) examples \((\d+) dropped.*?\), (\d+) response tokens(?:, packed into (\d+) rows)?", out)
    if not m:
        sys.exit("packing_effect: no 'SFT data' summary line in the output")
    ex, _, resp, rows = m.groups()
    return int(ex), int(resp), int(rows) if rows else int(ex)


def sft(a, work):
    common = {"data.train": a.train, "data.val": a.val, "train.seq_len": a.seq_len, "train.log_interval": 5,
              "train.checkpoint_interval": 0, "train.seed": a.seed}
    if a.pretrained:
        common["train.pretrained_checkpoint_path"] = a.pretrained
    figures = {}
    # Throughput: the same rows per step, the same steps; --concurrent runs the two at once, so that
    # on a loaded machine both see the same load (each then gets about half of what is left).
    started = {}
    for mode in ("padded", "packed"):
        sets = dict(common, **{"data.sft_packing": str(mode == "packed").lower(), "train.max_steps": a.throughput_steps,
                               "train.global_batch_size": a.batch, "train.micro_batch_size": a.batch,
                               "train.eval_interval": 0})
        d = os.path.join(work, f"tp-{mode}")
        started[mode] = (start(a.coil, "sft", a.config, sets, d), d)
        if not a.concurrent:
            started[mode] = finish(*started[mode][0], d)
    for mode in ("padded", "packed"):
        out, lines = finish(*started[mode][0], started[mode][1]) if a.concurrent else started[mode]
        ex, resp, rows = sft_summary(out)
        rows_s = a.batch / seconds_per_step(lines)
        figures[mode] = {"examples": ex, "response_tokens": resp, "rows": rows, "rows_per_s": rows_s,
                         "examples_per_s": rows_s * ex / rows, "response_tokens_per_s": rows_s * resp / rows}
    pad, pk = figures["padded"], figures["packed"]
    print(f"SFT {a.train}, seq_len {a.seq_len}, {pad['examples']} examples; {pk['rows']} packed rows "
          f"({pad['rows'] / pk['rows']:.2f}x fewer); batch {a.batch} rows, {a.throughput_steps} steps each")
    for mode in ("padded", "packed"):
        f = figures[mode]
        print(f"  {mode:7s} {f['rows_per_s']:8.2f} rows/s {f['examples_per_s']:9.2f} examples/s "
              f"{f['response_tokens_per_s']:10.1f} response tokens/s")
    print(f"  packed / padded: {pk['examples_per_s'] / pad['examples_per_s']:.2f}x examples/s, "
          f"{pk['response_tokens_per_s'] / pad['response_tokens_per_s']:.2f}x response tokens/s, "
          f"{pk['rows_per_s'] / pad['rows_per_s']:.3f}x rows/s")

    if a.steps == 0:  # throughput only
        return figures
    # Quality at equal examples seen and equal optimizer steps.
    ratio = pad["rows"] / pk["rows"]
    packed_batch = max(1, round(a.batch / ratio))
    quality = {}
    for mode, batch in (("padded", a.batch), ("packed", packed_batch)):
        sets = dict(common, **{"data.sft_packing": str(mode == "packed").lower(), "train.max_steps": a.steps,
                               "train.global_batch_size": batch, "train.micro_batch_size": batch,
                               "train.eval_interval": 0, "train.checkpoint_interval": a.steps})
        d = os.path.join(work, f"q-{mode}")
        _, lines = run(a.coil, "sft", a.config, sets, d)
        examples = a.steps * batch * (1 if mode == "padded" else pk["examples"] / pk["rows"])
        # The same evaluation for both: padded rows, the first eval_batches x batch val examples.
        ev = dict(common, **{"data.sft_packing": "false", "train.max_steps": 1, "train.global_batch_size": a.batch,
                             "train.micro_batch_size": a.batch, "train.eval_interval": 1, "optim.warmup_steps": 0,
                             "train.eval_batches": a.eval_batches,
                             "train.pretrained_checkpoint_path": os.path.join(d, "checkpoints", "final")})
        _, ev_lines = run(a.coil, "sft", a.config, ev, d + "-eval")
        quality[mode] = {"batch_rows": batch, "examples_seen": examples, "val_loss": val_losses(ev_lines)[0]}
    print(f"  quality after {a.steps} steps: padded {a.batch} rows/step ({quality['padded']['examples_seen']:.0f} "
          f"examples) val loss {quality['padded']['val_loss']:.4f}; packed {packed_batch} rows/step "
          f"(~{quality['packed']['examples_seen']:.0f} examples) val loss {quality['packed']['val_loss']:.4f}")
    figures["quality"] = quality
    return figures


def pretrain(a, work):
    results = []
    for seed in a.seeds:
        for masking in ("false", "true"):
            d = os.path.join(work, f"pre-{seed}-{masking}")
            sets = {"train.seed": seed, "data.document_masking": masking, "train.max_steps": a.steps,
                    "train.eval_interval": 0, "train.checkpoint_interval": a.steps}
            _, lines = run(a.coil, "pretrain", a.config, sets, d)
            evals = {}
            for eval_masking in ("true", "false"):
                e = d + f"-eval-{eval_masking}"
                shutil.copytree(os.path.join(d, "checkpoints"), os.path.join(e, "checkpoints"), symlinks=True)
                ev = {"train.seed": seed, "data.document_masking": eval_masking, "train.max_steps": a.steps + 1,
                      "train.eval_interval": a.steps + 1, "train.eval_batches": a.eval_batches,
                      "train.checkpoint_interval": 0, "optim.learning_rate_muon": 0,
                      "optim.learning_rate_adamw": 0}
                _, ev_lines = run(a.coil, "pretrain", a.config, ev, e)
                evals[eval_masking] = val_losses(ev_lines)[a.steps + 1]
            tokens = max(l.get("tokens", 0) for l in lines)
            results.append({"seed": seed, "masking": masking, "tokens": tokens, "val_masked": evals["true"],
                            "val_unmasked": evals["false"]})
            print(f"  seed {seed} document_masking={masking:5s} {tokens} tokens: val loss, each document from "
                  f"zero {evals['true']:.4f}, state across documents {evals['false']:.4f}", flush=True)
    for masking in ("false", "true"):
        r = [x for x in results if x["masking"] == masking]
        print(f"  mean document_masking={masking:5s}: from zero {sum(x['val_masked'] for x in r) / len(r):.4f}, "
              f"across {sum(x['val_unmasked'] for x in r) / len(r):.4f} ({len(r)} seeds)")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sft")
    s.add_argument("--train", required=True)
    s.add_argument("--val", required=True)
    s.add_argument("--pretrained", default="", help="train.pretrained_checkpoint_path (default: the config's)")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch", type=int, default=16, help="rows per step of the padded runs")
    s.add_argument("--steps", type=int, default=200, help="steps of the quality runs (0: none, throughput only)")
    s.add_argument("--throughput-steps", type=int, default=30)
    s.add_argument("--concurrent", action="store_true", help="run the padded and packed throughput runs at once")
    s.add_argument("--eval-batches", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("pretrain")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    t.add_argument("--eval-batches", type=int, default=64)
    for q in (s, t):
        q.add_argument("--coil", default="build/bin/coil")
        q.add_argument("--config", required=True)
        q.add_argument("--json", default="")
        q.add_argument("--keep", default="", help="keep the runs in this folder (default: a temporary one)")
    a = p.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="packing-effect-")
    os.makedirs(work, exist_ok=True)
    try:
        figures = sft(a, work) if a.what == "sft" else pretrain(a, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        json.dump(figures, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
