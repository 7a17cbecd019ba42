"""Hugging Face round trips and greedy parity: a transformers MambaForCausalLM (random weights, its
own config) saved with save_pretrained becomes a Coil checkpoint with `coil ckpt import-hf`; Coil's
greedy decoding from it equals transformers' greedy `generate`, token for token, for prompts
shorter and longer than the conv window; `coil ckpt export-hf` gives back the same weights bit for
bit; decoding with the matrices in bfloat16 (--dtype) equals transformers on the rounded weights; a
GPT-NeoX-style tokenizer.json made here with `tokenizers` goes into the checkpoint, and Coil's
greedy text equals transformers' greedy `generate` decoded by `tokenizers`; bad folders are one-line
errors."""
import json
import os
import subprocess

import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import MambaConfig, MambaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
import tokenizer_json_cases as cases  # noqa: E402

COIL = os.environ["COIL"]
ENV = dict(os.environ, OMP_NUM_THREADS="2")


def coil(*args, check=True):
    r = subprocess.run([COIL, *map(str, args)], capture_output=True, text=True, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"coil {' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    # Not a Coil preset's shape (d_state 8, 3 layers): the imported config must carry it.
    config = MambaConfig(hidden_size=48, num_hidden_layers=3, vocab_size=320, state_size=8, expand=2,
                         conv_kernel=4, eos_token_id=None, pad_token_id=0)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():  # away from the init's symmetric values, so that tokens differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    r = coil("ckpt", "import-hf", tmp / "hf", tmp / "ck")  # no tokenizer: ids in, ids out
    # The same model with a GPT-NeoX-style tokenizer.json of the model's 320 ids, as
    # state-spaces/mamba-*-hf ships one.
    (tmp / "hf-text").mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(tmp / "hf" / f, tmp / "hf-text" / f)
    tok = neox_tokenizer(cases.corpus_texts(300_000), 320)
    assert tok.get_vocab_size() == 320
    tok.save(str(tmp / "hf-text" / "tokenizer.json"))
    r_text = coil("ckpt", "import-hf", tmp / "hf-text", tmp / "ck-text")
    return tmp, model, r.stdout + r_text.stdout


def neox_tokenizer(texts, vocab_size):
    """GPT-NeoX's pipeline (NFC, ByteLevel without a prefix space, <|endoftext|> 0, <|padding|> 1)."""
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=True)
    t.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


def test_import_reports_tokenizer_and_model_keys(hf):
    tmp, _, out = hf
    assert "no tokenizer (pass --tokenizer" in out
    assert f"tokenizer {tmp / 'hf-text' / 'tokenizer.json'}" in out
    assert "d_state = 8" in out and "n_layer = 3" in out
    coil("ckpt", "verify", tmp / "ck")


@pytest.mark.parametrize("prompt", [[7], [3, 200, 41], list(range(11, 40, 3))])
def test_greedy_equals_transformers(hf, prompt):
    tmp, model, _ = hf
    new = 48
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", ",".join(map(str, prompt)),
             "--max-new-tokens", new)
    got = list(map(int, r.stdout.split()))
    assert got == want
    assert len(set(got)) > 3  # a real sequence, not one token repeated


def test_greedy_text_equals_transformers_decoded_by_tokenizers(hf):
    """Text in, text out with the imported tokenizer.json: Coil's completion of each prompt equals
    transformers' greedy generate from `tokenizers`' ids, decoded by `tokenizers` (EOS <|endoftext|>
    ends both)."""
    tmp, model, _ = hf
    tok = Tokenizer.from_file(str(tmp / "hf-text" / "tokenizer.json"))
    prompts = ["the snake", "Rain falls on green hills and", "12 numbers: 3 4 5", "'quotes' é ü 日本",
               "a warm stone\nand"]
    with open(tmp / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    new = 24
    r = coil("generate", "--checkpoint", tmp / "ck-text", "--prompts", tmp / "prompts.jsonl", "--max-new-tokens", new)
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["prompt"] for g in got] == prompts
    texts = []
    for p, g in zip(prompts, got):
        ids = tok.encode(p).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=0,
                                 pad_token_id=1)[0, len(ids):].tolist()
        assert g["completion"] == tok.decode(out), p
        texts.append(g["completion"])
    assert len(set(texts)) > 2  # real completions, not one string
    # `coil tokenizer encode` with the tokenizer.json prints tokenizers' ids.
    r = coil("tokenizer", "encode", "--model", tmp / "hf-text" / "tokenizer.json", prompts[1])
    ids = [int(line.split("\t")[0]) for line in r.stdout.splitlines()[:-1]]
    assert ids == tok.encode(prompts[1]).ids


def test_bfloat16_decoding_equals_transformers_on_the_rounded_weights(hf):
    """--dtype bfloat16 holds the matrices in bfloat16 and computes in float32: its greedy tokens are
    transformers' greedy tokens for a float32 model whose matrices were rounded to bfloat16."""
    tmp, model, _ = hf
    rounded = MambaForCausalLM(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2:  # embeddings (tied head), in_proj, x_proj, dt_proj.weight, out_proj
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    prompts = torch.randint(320, (4, 6), generator=torch.Generator().manual_seed(1))
    new = 64
    with torch.no_grad():
        want = rounded.generate(prompts, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        full = model.generate(prompts, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    # The rounding matters: float32 and bfloat16 weights part ways on some of these prompts.
    assert (want != full).any(1).sum() >= 2
    for prompt, w in zip(prompts.tolist(), want[:, 6:].tolist()):
        r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", new, "--dtype", "bfloat16")
        assert list(map(int, r.stdout.split())) == w


def test_export_gives_back_the_weights(hf):
    tmp, model, _ = hf
    coil("ckpt", "export-hf", tmp / "ck", tmp / "back")
    back = load_file(tmp / "back" / "model.safetensors")
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


def test_export_writes_the_tokenizer_json_back(hf):
    tmp, _, _ = hf
    r = coil("ckpt", "export-hf", tmp / "ck-text", tmp / "back-text")
    assert "tokenizer.json (BPE)" in r.stdout
    assert (tmp / "back-text" / "tokenizer.json").read_bytes() == (tmp / "hf-text" / "tokenizer.json").read_bytes()
    assert not (tmp / "back-text" / "tokenizer.model").exists()


def test_bad_input(hf, tmp_path):
    tmp, _, _ = hf
    r = coil("ckpt", "import-hf", tmp_path / "none", tmp_path / "x", check=False)
    assert r.returncode == 1 and "config.json: cannot open" in r.stderr and len(r.stderr.splitlines()) == 1
    r = coil("ckpt", "import-hf", tmp / "hf", tmp / "ck", check=False)
    assert r.returncode == 1 and "exists" in r.stderr
    r = coil("generate", "--checkpoint", tmp / "ck", "--prompt", "hello", check=False)
    assert r.returncode == 1 and "holds no tokenizer" in r.stderr
    r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", "1,x", check=False)
    assert r.returncode == 1 and "'x' is not a token id" in r.stderr
    r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", "1,999", check=False)
    assert r.returncode == 1 and "outside [0, 320)" in r.stderr
    r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", "1", "--dtype", "float16", check=False)
    assert r.returncode == 1 and "--dtype must be float32 or bfloat16, got 'float16'" in r.stderr
    if not torch.cuda.is_available():
        r = coil("generate", "--checkpoint", tmp / "ck", "--prompt-ids", "1", "--device", "cuda", check=False)
        assert r.returncode == 1 and "--device cuda: CUDA is not available here" in r.stderr, r.stderr


def test_sft_from_an_imported_model(hf, tmp_path):
    """An imported model fine-tunes with Coil's SFT (the [model] keys that import-hf prints, the
    tokenizer.json it came with), its val loss falls, and it generates after."""
    tmp, _, out = hf
    words = "the snake coils around a warm stone and sleeps while rain falls on green hills".split()
    with open(tmp_path / "alpaca.jsonl", "w") as f:
        for d in range(40):
            f.write(json.dumps({"instruction": f"Say {words[d % len(words)]}.", "input": "",
                                "output": " ".join(words[(d + i) % len(words)] for i in range(6))}) + "\n")
    with open(tmp_path / "alpaca-val.jsonl", "w") as f:
        for d in range(40, 48):
            f.write(json.dumps({"instruction": f"Say {words[d % len(words)]}.", "input": "",
                                "output": " ".join(words[(d + i) % len(words)] for i in range(6))}) + "\n")
    model_keys = [line.replace(" ", "") for line in out.split("[model]\n")[-1].splitlines() if "=" in line]
    sets = [a for kv in model_keys for a in ("--set", "model." + kv)]
    r = coil("sft", "--config", "/dev/null", *sets, "--set", f"data.train={tmp_path / 'alpaca.jsonl'}",
             "--set", f"data.tokenizer={tmp / 'hf-text' / 'tokenizer.json'}",
             "--set", f"train.pretrained_checkpoint_path={tmp / 'ck-text'}",
             "--set", f"data.val={tmp_path / 'alpaca-val.jsonl'}",
             "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "train.max_steps=12", "--set", "train.seq_len=256",
             "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2", "--set", "train.eval_interval=4")
    assert "starting from the pretrained weights of" in r.stdout and "sft: done, 12 steps" in r.stdout, r.stdout
    vals = [float(line.split("val loss ")[1].split()[0]) for line in r.stdout.splitlines() if "| val loss " in line]
    assert len(vals) >= 2 and vals[-1] < vals[0], r.stdout
    r = coil("generate", "--checkpoint", tmp_path / "run" / "checkpoints" / "final", "--instruction", "Say snake.",
             "--max-new-tokens", 5)
    assert r.returncode == 0
