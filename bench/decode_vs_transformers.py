"""Decoding on CPU: Coil's recurrent step against transformers' MambaForCausalLM.generate (greedy,
its cached path) on the same weights and threads, measured in one run: tokens/s at batch 1 and 16
after a 100-token prompt, and Coil's time per token after 100 and after 4000 tokens of context.

    ~/.cache/coil/venv-torch2.11.0/bin/python bench/decode_vs_transformers.py [--preset 130m] [--threads 2]

transformers' per-token time = (generate(new + 1 tokens) - generate(1 token)) / new, so that its
prefill cancels out; Coil's bench_decode times the steps after its prefill."""
import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

PRESETS = {"tiny": (64, 2, 512), "130m": (768, 24, 50280), "370m": (1024, 48, 50280)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="130m", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--long", type=int, default=4000)
    ap.add_argument("--bench-decode", default="build/bin/bench_decode")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, layers, vocab = PRESETS[args.preset]
    model = MambaForCausalLM(MambaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab)).eval()
    batches = [int(b) for b in args.batch.split(",")]

    def generate_seconds(ids, new):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t0)
        assert out.shape[1] == ids.shape[1] + new
        return best

    hf = {}
    for b in batches:
        ids = torch.randint(vocab, (b, args.prompt))
        per_token = (generate_seconds(ids, args.new + 1) - generate_seconds(ids, 1)) / args.new
        hf[b] = b / per_token
        print(f"transformers batch {b}: {per_token * 1e3:.1f} ms per step, {hf[b]:.1f} tokens/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run([args.bench_decode, "--hf", tmp, "--batch", args.batch, "--prompt", str(args.prompt),
                            "--new", str(args.new), "--long", str(args.long)],
                           env=env, check=True, capture_output=True, text=True)
    print(r.stdout, end="")
    coil = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{args.preset}, {args.threads} threads, greedy, after a {args.prompt}-token prompt")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'Coil tok/s':>11} {'ratio':>6}")
    for b in batches:
        c = coil["tokens_per_sec"][str(b)]
        print(f"{b:5d} {hf[b]:19.1f} {c:11.1f} {c / hf[b]:6.2f}x")
    if "long_over_short" in coil:
        print(f"Coil per token: {coil['ms_per_token_short']:.2f} ms after {args.prompt} tokens, "
              f"{coil['ms_per_token_long']:.2f} ms after {args.long}: ratio {coil['long_over_short']:.3f}")


if __name__ == "__main__":
    main()
