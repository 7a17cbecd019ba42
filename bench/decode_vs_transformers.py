"""Decoding on CPU: Coil's recurrent step against transformers' MambaForCausalLM.generate (greedy,
its cached path) on the same weights and threads, measured in one run: tokens/s at batch 1 and 16
after a 100-token prompt, and Coil's time per token after 100 and after 4000 tokens of context.
Both hold the weights in float32, and in bfloat16 (transformers: the model cast with
.to(torch.bfloat16); Coil: --dtype bfloat16, matrices in bfloat16, arithmetic in float32). Coil's
bfloat16 is compared with the faster of transformers' two. This machine is noisy (a shared VM), so
the measurements run in --rounds rounds, transformers and Coil alternating, and each figure is the
best of its rounds (transformers' bfloat16, 5x slower than its float32 here, runs in the first only).

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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bench-decode", default="build/bin/bench_decode")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, layers, vocab = PRESETS[args.preset]
    model32 = MambaForCausalLM(MambaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab)).eval()
    batches = [int(b) for b in args.batch.split(",")]
    dtypes = ["float32", "bfloat16"]

    def generate_seconds(model, ids, new):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t0)
        assert out.shape[1] == ids.shape[1] + new
        return best

    model16 = MambaForCausalLM(model32.config).eval().to(torch.bfloat16)
    model16.load_state_dict(model32.state_dict())
    prompts = {b: torch.randint(vocab, (b, args.prompt)) for b in batches}
    hf, coil = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model32.save_pretrained(tmp, safe_serialization=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        for rnd in range(args.rounds):
            for dtype, model in [("float32", model32), ("bfloat16", model16)][: 2 if rnd == 0 else 1]:
                for b in batches:
                    ids = prompts[b]
                    per_token = (generate_seconds(model, ids, args.new + 1) - generate_seconds(model, ids, 1)) / args.new
                    hf[dtype, b] = max(hf.get((dtype, b), 0), b / per_token)
                    print(f"round {rnd} transformers {dtype} batch {b}: {per_token * 1e3:.1f} ms per step", flush=True)
            for dtype in dtypes:
                r = subprocess.run([args.bench_decode, "--hf", tmp, "--batch", args.batch, "--prompt", str(args.prompt),
                                    "--new", str(args.new), "--long", str(args.long), "--weights", dtype],
                                   env=env, check=True, capture_output=True, text=True)
                print(f"round {rnd} Coil {dtype}:\n{r.stdout}", end="", flush=True)
                got = json.loads(r.stdout.strip().splitlines()[-1])
                best = coil.setdefault(dtype, got)
                for b in batches:
                    best["tokens_per_sec"][str(b)] = max(best["tokens_per_sec"][str(b)], got["tokens_per_sec"][str(b)])
                for k in ("ms_per_token_short", "ms_per_token_long"):
                    if k in got:
                        best[k] = min(best[k], got[k])
                if "ms_per_token_long" in best:
                    best["long_over_short"] = best["ms_per_token_long"] / best["ms_per_token_short"]
    print(f"\n{args.preset}, {args.threads} threads, greedy, after a {args.prompt}-token prompt (tokens/s)")
    print(f"{'batch':>5} {'transformers f32':>17} {'bf16':>7} {'Coil f32':>9} {'bf16':>7}  {'f32 vs f32':>10} "
          f"{'bf16 vs best':>12}")
    for b in batches:
        t32, t16 = hf["float32", b], hf["bfloat16", b]
        c32, c16 = (coil[d]["tokens_per_sec"][str(b)] for d in dtypes)
        print(f"{b:5d} {t32:17.1f} {t16:7.1f} {c32:9.1f} {c16:7.1f}  {c32 / t32:9.2f}x {c16 / max(t32, t16):11.2f}x")
    for dtype in dtypes:
        if "long_over_short" in coil[dtype]:
            c = coil[dtype]
            print(f"Coil {dtype} per token: {c['ms_per_token_short']:.2f} ms after {args.prompt} tokens, "
                  f"{c['ms_per_token_long']:.2f} ms after {args.long}: ratio {c['long_over_short']:.3f}")


if __name__ == "__main__":
    main()
