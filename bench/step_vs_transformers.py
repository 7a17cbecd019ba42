"""One training step (forward + backward, 1 x 1024 tokens) of the same Mamba weights in Coil and in
transformers' MambaForCausalLM (its pure-PyTorch path: the path a CPU user of transformers runs),
with the same number of threads, measured in one run. Prints both and the tokens/s ratio.

    ~/.cache/coil/venv-torch2.11.0/bin/python bench/step_vs_transformers.py [--preset 130m] [--threads 2]

--device cuda: both on the GPU in mixed precision (float32 weights, bfloat16 compute: transformers
under torch.autocast, Coil with --dtype bfloat16), with --batch sequences per step; transformers uses
its CUDA kernels if mamba_ssm and causal_conv1d are installed, else its pure-PyTorch path (printed).

    python3 bench/step_vs_transformers.py --device cuda --preset 130m --seq-len 2048 --batch 8
"""
import argparse
import os
import re
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
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2, help="timed Coil steps (after a warm-up)")
    ap.add_argument("--hf-reps", type=int, default=1,
                    help="timed transformers steps; no warm-up: at 1 x 1024 one step takes minutes")
    ap.add_argument("--bench-step", default="build/bin/bench_step")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    cuda = args.device == "cuda"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, layers, vocab = PRESETS[args.preset]
    model = MambaForCausalLM(MambaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab))
    ids = torch.randint(vocab, (args.batch, args.seq_len))
    if cuda:
        model, ids = model.cuda(), ids.cuda()
        try:
            from transformers.models.mamba import modeling_mamba as mm
            fast = bool(getattr(mm, "is_fast_path_available", False))
        except ImportError:
            fast = False
        print(f"transformers on CUDA: {'mamba_ssm kernels' if fast else 'pure-PyTorch path (no mamba_ssm kernels)'}")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        step()  # warm-up
    t_hf = float("inf")
    for rep in range(args.hf_reps):
        t0 = time.perf_counter()
        step()
        t_hf = min(t_hf, time.perf_counter() - t0)
        print(f"transformers step {rep + 1}/{args.hf_reps}: {t_hf:.3f} s", flush=True)
    if cuda:
        model = model.cpu()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cmd = [args.bench_step, "--hf", tmp, "--seq-len", str(args.seq_len), "--reps", str(args.reps),
               "--batch", str(args.batch)]
        if cuda:
            cmd += ["--device", "cuda", "--dtype", "bfloat16"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    print(out, end="")
    fields = dict(re.findall(r"(\w+)=([0-9.]+)", out.splitlines()[-1]))
    t_coil = float(fields["coil_step_seconds"])
    tokens = args.seq_len * args.batch
    where = "CUDA, bf16 autocast" if cuda else f"{args.threads} threads"
    print(f"transformers MambaForCausalLM, {where}: {t_hf:.3f} s ({tokens / t_hf:.0f} tokens/s)")
    print(f"Coil                         , {where}: {t_coil:.3f} s ({tokens / t_coil:.0f} tokens/s)")
    print(f"speed-up (tokens/s ratio): {t_hf / t_coil:.1f}x")


if __name__ == "__main__":
    main()
