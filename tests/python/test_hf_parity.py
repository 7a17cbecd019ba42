"""Coil's Mamba against Hugging Face transformers' MambaForCausalLM (its pure-PyTorch path, CPU).

A randomly initialized transformers model is saved with save_pretrained; Coil loads the directory
(tests/hf_probe) and must give the same logits, loss and parameter gradients, in float32 within
1e-4 relative (to each tensor's largest entry), and in float64 within 1e-6.

Where float32 cannot resolve 1e-4 at all, the bound is transformers' own float32 error: the
distance between its float32 and float64 results. (For the 24 layers of the 130m shape that is
about 5e-4 on the logits; transformers keeps the norms and the scan in float32 even in a float64
model, so its float64 results are no exact truth either.) Two implementations that each carry
that much float32 error differ by about sqrt(2) times it, so Coil must stay within twice
transformers' own error: no less accurate than transformers.
"""
import copy
import os
import subprocess
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM

PROBE = os.environ.get("COIL_HF_PROBE", "build/bin/hf_probe")
RTOL = 1e-4

# Parameters of every kind whose gradients are compared (layer 0 and the last layer).
KINDS = ["norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
         "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.A_log",
         "mixer.D", "mixer.out_proj.weight"]


def rel_err(got, want):
    """max |got - want| relative to max |want|: the tensor's own scale."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name,hidden,layers,vocab,batch,seq", [
    ("tiny", 64, 2, 512, 2, 64),
    ("130m", 768, 24, 50280, 1, 96),
])
def test_logits_loss_and_gradients_match_transformers(name, hidden, layers, vocab, batch, seq):
    torch.manual_seed(0)
    config = MambaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                         residual_in_fp32=True, tie_word_embeddings=True)
    model = MambaForCausalLM(config).float()
    # Move the parameters with symmetric initial values (A_log rows, D = 1, norms = 1) off them, so
    # that a permutation or a wrong axis cannot go unnoticed.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or n.endswith("A_log"):
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(vocab, (batch, seq))
    ref = {dtype: run_transformers(model, ids, dtype) for dtype in (torch.float32, torch.float64)}

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_file({"input_ids": ids}, os.path.join(tmp, "in.safetensors"))
        coil = {torch.float32: run_coil(tmp, []), torch.float64: run_coil(tmp, ["float64"])}

    checked = ["logits", "loss", "grad/backbone.embeddings.weight", "grad/backbone.norm_f.weight"]
    for layer in (0, layers - 1):
        checked += [f"grad/backbone.layers.{layer}.{k}" for k in KINDS]
    for key in checked:
        noise = rel_err(ref[torch.float32][key].double(), ref[torch.float64][key])
        err32 = rel_err(coil[torch.float32][key].double(), ref[torch.float32][key].double())
        err64 = rel_err(coil[torch.float64][key], ref[torch.float64][key])
        print(f"{name} {key}: float32 {err32:.1e}, float64 {err64:.1e}, transformers' own {noise:.1e}")
        assert err32 < max(RTOL, 2 * noise), f"{name}: float32 {key} differs by {err32:.2e}"
        assert err64 < max(1e-6, noise), f"{name}: float64 {key} differs by {err64:.2e}"


def run_transformers(model, ids, dtype):
    m = copy.deepcopy(model).to(dtype)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    res = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    res.update({"grad/" + n: p.grad for n, p in m.named_parameters()})
    return res


def run_coil(hf_dir, extra):
    out_path = os.path.join(hf_dir, "out.safetensors")
    res = subprocess.run([PROBE, hf_dir, os.path.join(hf_dir, "in.safetensors"), out_path] + extra,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return load_file(out_path)
