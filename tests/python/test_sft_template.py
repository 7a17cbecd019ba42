"""A template of one's own (data.sft_template) end to end: `coil sft` trains with it (markers of several
tokens each), its checkpoint keeps it, and `coil generate --instruction`, `--prompts` and `coil chat`
put instructions in it: their answers equal `coil generate --prompt` of the filled-in template."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny_data  # noqa: E402

COIL = os.environ["COIL"]
TEMPLATE = "<|user|>\n{instruction}\n<|context|>\n{input}\n<|assistant|>\n{response}"
NO_INPUT = "<|user|>\n{instruction}\n<|assistant|>\n{response}"


def run(*args, stdin=None):
    return subprocess.run([COIL, *map(str, args)], check=True, capture_output=True, text=True, input=stdin).stdout


def test_sft_generate_and_chat_use_the_template_of_the_run(tmp_path):
    tiny_data.prepare(tmp_path, run)
    words = tiny_data.WORDS
    with open(tmp_path / "alpaca.jsonl", "w") as f:
        for d in range(40):
            f.write(json.dumps({"instruction": f"Say something about {words[d % len(words)]}.",
                                "input": words[d % 5] if d % 2 else "",
                                "output": " ".join(words[(d + i) % len(words)] for i in range(8))}) + "\n")
    common = ["--set", f"data.tokenizer={tmp_path / 'tok.model'}", "--set", "train.seq_len=48",
              "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=4", "--set", "train.threads=2"]
    run("pretrain", "--config", "/dev/null", "--set", f"data.train={tmp_path / 'shards'}",
        "--set", f"train.run_dir={tmp_path / 'pre'}", "--set", "train.max_steps=20", "--set", "train.eval_interval=0",
        *common)
    with open(tmp_path / "sft.toml", "w") as f:
        f.write(f'[data]\nsft_template = {json.dumps(TEMPLATE)}\nsft_template_no_input = {json.dumps(NO_INPUT)}\n')
    out = run("sft", "--config", tmp_path / "sft.toml", "--set", f"data.train={tmp_path / 'alpaca.jsonl'}",
              "--set", f"data.val={tmp_path / 'alpaca.jsonl'}", "--set", f"train.run_dir={tmp_path / 'sft'}",
              "--set", f"train.pretrained_checkpoint_path={tmp_path / 'pre' / 'checkpoints' / 'final'}",
              "--set", "train.max_steps=20", "--set", "train.eval_interval=20", "--set", "train.eval_batches=2", *common)
    assert "0 dropped" in out
    metrics = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0], val  # it learns in the template's format

    final = tmp_path / "sft" / "checkpoints" / "final"
    gen = ["--checkpoint", final, "--max-new-tokens", 6]
    cases = [("Say something about rain.", "", NO_INPUT), ("Say something about hills.", "warm", TEMPLATE)]
    for instruction, given, templ in cases:
        filled = templ.replace("{instruction}", instruction).replace("{input}", given).replace("{response}", "")
        answer = run("generate", *gen, "--instruction", instruction, "--input", given)
        assert run("generate", *gen, "--prompt", filled) == filled + answer
        if not given:  # chat: one instruction per line, no input
            assert run("chat", *gen, stdin=instruction + "\n") == answer
        with open(tmp_path / "prompts.jsonl", "w") as f:
            f.write(json.dumps({"instruction": instruction, "input": given}) + "\n")
        line = json.loads(run("generate", *gen, "--prompts", tmp_path / "prompts.jsonl"))
        assert line["prompt"] == filled and line["completion"] + "\n" == answer
