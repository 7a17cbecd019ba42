#!/usr/bin/env python3
"""Hybrid (Muon + AdamW) against AdamW alone, on the demo corpus, at the same step budget.

Each optimizer gets a small learning-rate sweep; every run uses configs/demo-pretrain.toml with
frequent evaluation. Reported: AdamW's best val loss over its sweep, and the steps each optimizer's
best run needs to first reach it (linear interpolation between evaluations). Target: the hybrid
needs <= 80% of AdamW's steps. Run after scripts/demo (it needs the demo data and tokenizer):

  python3 bench/muon_vs_adamw.py [--steps 300] [--eval-interval 20]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COIL = os.path.join(ROOT, "build", "bin", "coil")


def run(name, sets, args):
    run_dir = os.path.join(args.out, name)
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cmd = [COIL, "pretrain", "--config", os.path.join(ROOT, "configs", "demo-pretrain.toml"),
           "--set", f"train.run_dir={run_dir}", "--set", f"train.max_steps={args.steps}",
           "--set", f"train.eval_interval={args.eval_interval}", "--set", "train.checkpoint_interval=0",
           "--set", "train.log_interval=100"] + [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    evals = [(m["step"], m["val_loss"]) for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
             if "val_loss" in m]
    print(f"  {name:<28} best val loss {min(v for _, v in evals):.4f}  ({time.time() - t0:.0f} s)", flush=True)
    return evals


def steps_to_reach(evals, target):
    """The first step at which the val loss reaches target, interpolated between evaluations."""
    for (s0, v0), (s1, v1) in zip(evals, evals[1:]):
        if v1 <= target:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > target else s0
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--adamw-lrs", default="0.002,0.004,0.008")
    p.add_argument("--muon-lrs", default="0.01,0.02,0.04")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-muon"))
    args = p.parse_args()

    print(f"AdamW alone, {args.steps} steps:")
    adamw = {lr: run(f"adamw-{lr}", ["optim.use_muon=false", f"optim.learning_rate_adamw={lr}"], args)
             for lr in args.adamw_lrs.split(",")}
    best_lr = min(adamw, key=lambda lr: min(v for _, v in adamw[lr]))
    target = min(v for _, v in adamw[best_lr])
    print(f"Hybrid (Muon for in_proj/x_proj/out_proj, AdamW lr {best_lr} for the rest):")
    hybrid = {lr: run(f"hybrid-{lr}", [f"optim.learning_rate_muon={lr}", f"optim.learning_rate_adamw={best_lr}"], args)
              for lr in args.muon_lrs.split(",")}
    reach = {lr: steps_to_reach(ev, target) for lr, ev in hybrid.items()}
    adamw_steps = steps_to_reach(adamw[best_lr], target)
    reached = [s for s in reach.values() if s is not None]
    print(f"AdamW's best val loss: {target:.4f} (lr {best_lr}), reached at step {adamw_steps:.0f}")
    for lr, s in reach.items():
        print(f"  hybrid lr_muon {lr}: " + (f"reaches it at step {s:.0f}" if s is not None else "does not reach it"))
    if reached:
        best = min(reached)
        print(f"hybrid / AdamW steps to AdamW's best val loss: {best:.0f} / {adamw_steps:.0f} = "
              f"{best / adamw_steps:.2f} (target <= 0.80)")
    else:
        print("the hybrid did not reach AdamW's best val loss")
        sys.exit(1)


if __name__ == "__main__":
    main()
