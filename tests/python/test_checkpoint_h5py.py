"""A checkpoint saved by 3 ranks, read from the outside: h5py reads every tensor of index.h5 as a
whole array (the virtual datasets stitch the rank files' rows, no fill values), the recorded
CRC-32s are zlib's of the files, the tokenizer is inside; `coil ckpt export-hf` gives a folder
transformers' MambaForCausalLM loads, with the checkpoint's weights, and whose logits match Coil's
within 1e-4."""
import json
import os
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MambaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
import tiny_data  # noqa: E402

COIL = os.environ["COIL"]
PROBE = os.environ["COIL_HF_PROBE"]
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")


def run(*args, mpi=0):
    cmd = [COIL, *map(str, args)]
    if mpi:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(mpi)] + cmd
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=MPI_ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    tiny_data.prepare(tmp, run)
    run("pretrain", "--config", "/dev/null", "--set", f"data.train={tmp / 'shards'}",
        "--set", f"data.tokenizer={tmp / 'tok.model'}", "--set", f"train.run_dir={tmp / 'run'}",
        "--set", "train.max_steps=3", "--set", "train.seq_len=32", "--set", "train.global_batch_size=3",
        "--set", "train.micro_batch_size=1", "--set", "train.threads=1", mpi=3)
    return tmp


def test_h5py_reads_every_tensor_whole(trained):
    ckpt = trained / "run" / "checkpoints" / "final"
    ranks = [h5py.File(ckpt / f"rank-{r:05d}-of-00003.h5", "r") for r in range(3)]
    with h5py.File(ckpt / "index.h5", "r") as index:
        assert index.attrs["format"] == b"coil.checkpoint" or index.attrs["format"] == "coil.checkpoint"
        assert index.attrs["step"] == 3 and index.attrs["world_size"] == 3
        names = [f"{g}/{n}" for g in ("model", "optimizer") for n in index[g]]
        assert "model/backbone.layers.1.mixer.in_proj.weight" in names
        assert any(n.startswith("optimizer/muon.") for n in names) and any(n.startswith("optimizer/adamw.") for n in names)
        for name in names:
            whole = index[name][:]
            assert whole.shape == index[name].shape and whole.dtype == np.float32
            assert not np.isnan(whole).any(), name  # NaN is the fill value of a missing source
            rows = np.concatenate([r[name][:] for r in ranks])  # rank r holds rows [r k, (r + 1) k)
            assert np.array_equal(whole, rows), name
        emb = index["model/backbone.embeddings.weight"]
        assert emb.shape == (304, 64) and [r[emb.name].shape[0] for r in ranks] == [102, 102, 100]
        files = json.loads(index.attrs["files"])
        for r, rec in enumerate(files):
            data = open(ckpt / rec["name"], "rb").read()
            assert rec["name"] == f"rank-{r:05d}-of-00003.h5"
            assert len(data) == rec["bytes"] and zlib.crc32(data) == rec["crc32"]
        assert index["tokenizer/model"][:].tobytes() == open(trained / "tok.model", "rb").read()
        assert "[model]" in str(index.attrs["config"])


def test_export_hf_loads_in_transformers_with_coils_logits(trained):
    ckpt = trained / "run" / "checkpoints" / "final"
    out = trained / "hf"
    run("ckpt", "export-hf", ckpt, out)
    model = MambaForCausalLM.from_pretrained(out).float().eval()
    # The exported weights are the checkpoint's, bit for bit.
    exported = load_file(out / "model.safetensors")
    with h5py.File(ckpt / "index.h5", "r") as index:
        for name in index["model"]:
            assert np.array_equal(exported[name].numpy(), index["model"][name][:]), name
    ids = torch.randint(300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    save_file({"input_ids": ids}, str(trained / "in.safetensors"))
    subprocess.run([PROBE, str(out), str(trained / "in.safetensors"), str(trained / "coil.safetensors")], check=True)
    got = load_file(trained / "coil.safetensors")["logits"]
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, err
