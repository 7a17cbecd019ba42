#!/usr/bin/env bash
# The `coil` executable as a user meets it: --version, --help, and bad input answered with one
# line on stderr and a non-zero exit: 1 for bad data or files, 2 for a bad command line (never a
# crash: exit codes above 128 are signals).
#   tests/test_cli.sh path/to/coil
set -u
coil=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

# expect NAME WANT_RC STDERR_SUBSTRING -- ARGS...
expect() {
  local name=$1 want_rc=$2 needle=$3
  shift 4
  "$coil" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -eq "$want_rc" ] && grep -qF -- "$needle" "$tmp/out" "$tmp/err"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL $name: exit $rc (want $want_rc), output:"; cat "$tmp/out" "$tmp/err"
  fi
  if [ "$want_rc" -ne 0 ] && [ "$(wc -l <"$tmp/err")" -ne 1 ]; then
    failed=$((failed + 1)); echo "FAIL $name: error is not one line"; cat "$tmp/err"
  fi
}

expect version 0 "coil 0.1.0" -- --version
expect help 0 "Subcommands:" -- --help
expect model_help 0 "--smoke-steps" -- model --help
expect unknown_preset 1 "unknown model preset '7b' (known: tiny, 130m" -- model --preset 7b
expect missing_dir 1 "/nonexistent/config.json: cannot open" -- model --hf /nonexistent
mkdir -p "$tmp/hf"
echo '{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}' >"$tmp/hf/config.json"
head -c 5 /dev/zero >"$tmp/hf/model.safetensors"
expect truncated 1 "model.safetensors: truncated safetensors file (5 bytes, no header)" -- model --hf "$tmp/hf"
echo '{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 0}' >"$tmp/hf/config.json"
expect bad_config 1 "config.json: model config: vocab_size must be positive, got 0" -- model --hf "$tmp/hf"
expect bad_option 2 "coil: error: Could not convert: --batch = x" -- model --smoke-steps 1 --batch x
expect no_command 2 "coil: error: A subcommand is required" --
expect unknown_command 2 "coil: error: unknown command 'bogus' (commands: pretrain, sft, model, generate, chat, eval, tokenizer, data" -- bogus
expect smoke 0 "smoke run ok" -- model --preset tiny --smoke-steps 3 --seq-len 32

# Data: a tokenizer and shards from a small corpus (Debian's license texts), and bad input.
expect tokenizer_help 0 "--vocab-size" -- tokenizer train --help
expect no_subcommand 2 "A subcommand is required" -- data
i=0
for f in /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0 /usr/share/common-licenses/MPL-2.0; do
  python3 -c 'import json,sys; [print(json.dumps({"text": p})) for p in open(sys.argv[1]).read().split("\n\n") if p.strip()]' \
    "$f" >"$tmp/c$i.jsonl"
  i=$((i + 1))
done
gzip -k "$tmp/c1.jsonl" && mv "$tmp/c1.jsonl.gz" "$tmp/c1.json.gz"
expect tokenizer_train 0 "tokenizer: $tmp/tok.model (bpe" -- tokenizer train --input "$tmp/c*.jsonl" --vocab-size 500 \
  --model-type bpe --output "$tmp/tok" --threads 2
expect encode 0 "2 tokens" -- tokenizer encode --model "$tmp/tok.model" "### Response: the"
expect prepare 0 "documents from" -- data prepare --input "$tmp/c*" --tokenizer "$tmp/tok.model" --output "$tmp/s1" --threads 1
expect prepare_again 0 "documents from" -- data prepare --input "$tmp/c*" --tokenizer "$tmp/tok.model" --output "$tmp/s2" --threads 2
if cmp -s "$tmp/s1/tokens-00000.bin" "$tmp/s2/tokens-00000.bin" && cmp -s "$tmp/s1/manifest.json" "$tmp/s2/manifest.json"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); echo "FAIL prepare is not deterministic"
fi
expect inspect 0 "GNU GENERAL PUBLIC LICENSE" -- data inspect "$tmp/s1" --tokenizer "$tmp/tok.model"
expect prepare_exists 1 "already holds a prepared data set; pass --force" -- data prepare --input "$tmp/c0.jsonl" \
  --tokenizer "$tmp/tok.model" --output "$tmp/s1"
expect empty_glob 1 "no file matches $tmp/nothing*.jsonl" -- data prepare --input "$tmp/nothing*.jsonl" \
  --tokenizer "$tmp/tok.model" --output "$tmp/s3"
expect missing_tokenizer 1 "no tokenizer at $tmp/none.model" -- data prepare --input "$tmp/c0.jsonl" \
  --tokenizer "$tmp/none.model" --output "$tmp/s3"
expect small_vocab 1 "--vocab-size 100 is too small" -- tokenizer train --input "$tmp/c0.jsonl" --vocab-size 100 --output "$tmp/t2"
expect bad_model_type 2 "--model-type" -- tokenizer train --input "$tmp/c0.jsonl" --model-type wordpiece --output "$tmp/t2"
head -c 3000 "$tmp/c1.json.gz" >"$tmp/cut.jsonl.gz"
expect truncated_gz 1 "cut.jsonl.gz: truncated gzip stream" -- data prepare --input "$tmp/cut.jsonl.gz" \
  --tokenizer "$tmp/tok.model" --output "$tmp/s4"
printf '{"text": "fine"}\nnot json\n{"text": "fine too"}\n' >"$tmp/bad.jsonl"
expect strict 1 "bad.jsonl:2: " -- data prepare --input "$tmp/bad.jsonl" --tokenizer "$tmp/tok.model" --output "$tmp/s5" \
  --max-bad-records 0
expect not_prepared 1 "is not a prepared data set" -- data inspect "$tmp"

# Training: config errors, and a run killed with SIGKILL that resumes to the same losses.
printf '[train]\nmax_steps = 4\nmax_step = 5\n' >"$tmp/bad.toml"
expect unknown_key 2 "$tmp/bad.toml:3: unknown key train.max_step" -- pretrain --config "$tmp/bad.toml"
printf '[train]\nmax_steps = "four"\n' >"$tmp/bad.toml"
expect wrong_type 2 "$tmp/bad.toml:2: train.max_steps must be an integer" -- pretrain --config "$tmp/bad.toml"
expect missing_config 2 "cannot read config $tmp/none.toml" -- pretrain --config "$tmp/none.toml"
expect bad_set 2 "--set optim.lr=1: unknown key optim.lr" -- pretrain --config /dev/null --set optim.lr=1
expect bad_dtype 2 "--set train.dtype=float8: train.dtype must be \"float32\" or \"bfloat16\" or \"float16\", not \"float8\"" \
  -- pretrain --config /dev/null --set train.dtype=float8 --set "train.run_dir=$tmp/bad_dtype"
[ -e "$tmp/bad_dtype" ] && { failed=$((failed + 1)); echo "FAIL bad_dtype: the run directory was written"; }
# A model with no SSM state is refused before anything starts (with real data and tokenizer set,
# so that nothing but the range check stands in the way).
expect zero_d_state 2 "--set model.d_state=0: model.d_state must be >= 1, not 0" \
  -- pretrain --config /dev/null --set "data.train=$tmp/s1" --set "data.tokenizer=$tmp/tok.model" \
  --set train.max_steps=2 --set model.d_state=0 --set "train.run_dir=$tmp/zero_d_state"
[ -e "$tmp/zero_d_state" ] && { failed=$((failed + 1)); echo "FAIL zero_d_state: the run directory was written"; }
printf '[optim]\nwarmup_steps = 10\n[train]\nmax_steps = 5\n' >"$tmp/bad.toml"
expect warmup_past_steps 2 "$tmp/bad.toml:4: optim.warmup_steps (10) must be <= train.max_steps (5)" \
  -- pretrain --config "$tmp/bad.toml" --set "train.run_dir=$tmp/warmup_past_steps"
[ -e "$tmp/warmup_past_steps" ] && { failed=$((failed + 1)); echo "FAIL warmup_past_steps: the run directory was written"; }
expect bad_device 2 "train.device must be \"auto\" or \"cpu\" or \"cuda\", not \"gpu\"" \
  -- pretrain --config /dev/null --set train.device=gpu --set "train.run_dir=$tmp/bad_device"
printf '[train]\nmax_steps = 4\nactivation_checkpointing = "some"\n' >"$tmp/bad.toml"
expect bad_checkpointing 2 "$tmp/bad.toml:3: train.activation_checkpointing must be \"none\" or \"full\", not \"some\"" -- \
  pretrain --config "$tmp/bad.toml"
train_args=(--config /dev/null --set "data.train=$tmp/s1" --set "data.val=$tmp/s2" --set "data.tokenizer=$tmp/tok.model"
  --set train.seq_len=32 --set train.global_batch_size=2 --set train.micro_batch_size=1 --set train.max_steps=30
  --set train.eval_interval=10 --set train.eval_batches=2 --set train.checkpoint_interval=2 --set train.threads=1
  --set train.device=cpu)  # CPU even where a GPU is visible: the resumed run must log the same losses bit for bit
expect no_checkpoint 1 "--resume: no checkpoint to resume from" -- pretrain "${train_args[@]}" --set "train.run_dir=$tmp/r0" --resume
expect straight 0 "pretrain: done, 30 steps" -- pretrain "${train_args[@]}" --set "train.run_dir=$tmp/r1"
# train.device = "auto" (the default) says what it chose; float16 says it scales the loss.
auto_args=("${train_args[@]}" --set train.device=auto --set train.max_steps=1 --set train.dtype=float16)
if nvidia-smi -L >/dev/null 2>&1; then want="device cuda:0 (auto: "; else want="device cpu (auto: no GPU visible), compute float16 with dynamic loss scaling"; fi
expect auto_device 0 "$want" -- pretrain "${auto_args[@]}" --set "train.run_dir=$tmp/auto"
"$coil" pretrain "${train_args[@]}" --set "train.run_dir=$tmp/r2" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 600); do [ -e "$tmp/r2/checkpoints/step-00000004" ] && break; sleep 0.05; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
expect resumed 0 "resuming" -- pretrain "${train_args[@]}" --set "train.run_dir=$tmp/r2" --resume
losses() { python3 -c 'import json,sys; print([(m["step"], m.get("loss"), m.get("val_loss")) for m in map(json.loads, open(sys.argv[1]))])' "$1"; }
if [ "$(losses "$tmp/r1/metrics.jsonl")" = "$(losses "$tmp/r2/metrics.jsonl")" ]; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); echo "FAIL killed and resumed run logs other losses than a straight run"
fi
expect generate 0 "GNU" -- generate --checkpoint "$tmp/r1/checkpoints/final" --prompt "GNU" --max-new-tokens 5

# kill -9 at five moments of a run that saves a checkpoint every step (async: some kills land in a
# save): latest is always an intact checkpoint, a cut save is only a .tmp; then SIGTERM: the step
# is finished, a checkpoint saved, exit 0; resumed, the run logs the losses of an unbroken run.
chaos=("${train_args[@]}" --set train.max_steps=150 --set train.checkpoint_interval=1 --set train.keep_last_k=3)
expect unbroken 0 "pretrain: done, 150 steps" -- pretrain "${chaos[@]}" --set "train.run_dir=$tmp/c1"
# Each kill waits for the run to commit a save of its own (latest moves on: progress, whatever the
# machine's speed); kills 1, 3 and 5 then wait for the next save to be in flight (a .tmp folder) and
# hit it, kills 2 and 4 come a moment later.
cut=0
for k in 1 2 3 4 5; do
  before=$(readlink "$tmp/c2/checkpoints/latest" 2>/dev/null)
  "$coil" pretrain "${chaos[@]}" --set "train.run_dir=$tmp/c2" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 3000); do
    now=$(readlink "$tmp/c2/checkpoints/latest" 2>/dev/null)
    [ -n "$now" ] && [ "$now" != "$before" ] && break
    sleep 0.01
  done
  if [ $((k % 2)) = 1 ]; then
    for _ in $(seq 1000); do ls -d "$tmp"/c2/checkpoints/*.tmp >/dev/null 2>&1 && break; sleep 0.005; done
  else
    sleep 0.$((RANDOM % 3 + 1))
  fi
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  ls -d "$tmp"/c2/checkpoints/*.tmp >/dev/null 2>&1 && cut=$((cut + 1))
  [ -e "$tmp/c2/checkpoints/latest" ] && expect "latest_after_kill_$k" 0 "intact" -- ckpt verify "$tmp/c2/checkpoints/latest"
done
if [ $cut -ge 1 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL no kill landed in a save"; fi
"$coil" pretrain "${chaos[@]}" --set "train.run_dir=$tmp/c2" >"$tmp/term.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "step [0-9]*[05]/150" "$tmp/term.log" && break; sleep 0.05; done
kill -TERM $pid; wait $pid; rc=$?
if [ $rc -eq 0 ] && grep -q "stopped by a signal after step" "$tmp/term.log"; then passed=$((passed + 1))
else failed=$((failed + 1)); echo "FAIL SIGTERM: exit $rc"; tail -3 "$tmp/term.log"; fi
expect after_term 0 "pretrain: done, 150 steps" -- pretrain "${chaos[@]}" --set "train.run_dir=$tmp/c2"
if [ "$(losses "$tmp/c1/metrics.jsonl")" = "$(losses "$tmp/c2/metrics.jsonl")" ]; then passed=$((passed + 1))
else failed=$((failed + 1)); echo "FAIL killed, stopped and resumed run logs other losses than an unbroken run"; fi
steps_kept=$(ls -d "$tmp"/c2/checkpoints/step-* | wc -l)
[ "$steps_kept" -le 4 ] && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL keep_last_k=3 kept $steps_kept"; }

# coil ckpt: inspect, verify (exit 1 on damage), consolidate, export-hf; generate from one file.
final="$tmp/r1/checkpoints/final"
expect ckpt_inspect 0 "model/backbone.layers.0.mixer.in_proj.weight" -- ckpt inspect "$final"
expect ckpt_inspect_data 0 "data: shards, next sample 60 (seed " -- ckpt inspect "$final"  # 30 steps of 2
expect ckpt_verify 0 "intact" -- ckpt verify "$final"
cp -rL "$final" "$tmp/damaged"
truncate -s 100 "$tmp/damaged/rank-00000-of-00001.h5"
expect ckpt_damaged 1 "is damaged or incomplete (1 problem(s)" -- ckpt verify "$tmp/damaged"
grep -q "(truncated)" "$tmp/out" && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL verify: no truncated line"; }
expect ckpt_consolidate 0 "-> $tmp/one.h5" -- ckpt consolidate "$final" "$tmp/one.h5"
expect ckpt_verify_one 0 "intact" -- ckpt verify "$tmp/one.h5"
expect ckpt_consolidate_exists 1 "exists; remove it first" -- ckpt consolidate "$final" "$tmp/one.h5"
"$coil" generate --checkpoint "$final" --prompt "GNU" --max-new-tokens 8 >"$tmp/g1" 2>&1
"$coil" generate --checkpoint "$tmp/one.h5" --prompt "GNU" --max-new-tokens 8 >"$tmp/g2" 2>&1
cmp -s "$tmp/g1" "$tmp/g2" && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL generate from one.h5 differs"; }
expect ckpt_export 0 "config.json, model.safetensors" -- ckpt export-hf "$final" "$tmp/hf"
[ -s "$tmp/hf/model.safetensors" ] && cmp -s "$tmp/hf/tokenizer.model" "$tmp/tok.model" && passed=$((passed + 1)) ||
  { failed=$((failed + 1)); echo "FAIL export-hf files"; }
expect ckpt_none 1 "no checkpoint at $tmp/nothing" -- ckpt inspect "$tmp/nothing"
expect ckpt_not 1 "not an HDF5 file" -- ckpt verify "$tmp/tok.model"
expect generate_damaged 1 "is damaged:" -- generate --checkpoint "$tmp/damaged" --prompt "GNU"

# generate --prompts: a batch (greedy) gives each prompt the continuation it gets alone; chat answers
# piped lines as generate --instruction does, and in a terminal (tmux) prompts, answers, quits.
printf 'GNU\nThe program\n{"prompt": "free software"}\n{"instruction": "Say hello."}\n' >"$tmp/prompts.txt"
"$coil" generate --checkpoint "$final" --prompts "$tmp/prompts.txt" --max-new-tokens 8 --batch-size 3 >"$tmp/batch.jsonl"
for p in "GNU" "The program" "free software"; do "$coil" generate --checkpoint "$final" --prompt "$p" --max-new-tokens 8; done >"$tmp/single"
"$coil" generate --checkpoint "$final" --instruction "Say hello." --max-new-tokens 8 >>"$tmp/single"
python3 - "$tmp/batch.jsonl" "$tmp/single" <<'EOF' && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL --prompts differs from single prompts"; }
import json, sys
batch = [json.loads(l) for l in open(sys.argv[1])]
want = ["GNU" + batch[0]["completion"], "The program" + batch[1]["completion"], "free software" + batch[2]["completion"],
        batch[3]["completion"]]
assert len(batch) == 4 and batch[3]["prompt"].endswith("### Response:\n"), batch
assert open(sys.argv[2]).read() == "".join(w + "\n" for w in want), (open(sys.argv[2]).read(), want)
EOF
expect prompts_missing 1 "--prompts: cannot read $tmp/none.txt" -- generate --checkpoint "$final" --prompts "$tmp/none.txt"
expect two_prompts 1 "give one of --prompt, --instruction" -- generate --checkpoint "$final" --prompt a --instruction b
expect top_p 1 "--top-p must be in (0, 1]" -- generate --checkpoint "$final" --prompt a --top-p 0 --temperature 1
printf 'Say hello.\nName a color.\n' | "$coil" chat --checkpoint "$final" --max-new-tokens 8 >"$tmp/chat" 2>&1
for q in "Say hello." "Name a color."; do "$coil" generate --checkpoint "$final" --instruction "$q" --max-new-tokens 8; done >"$tmp/chat_want"
cmp -s "$tmp/chat" "$tmp/chat_want" && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL chat (piped) answers differ"; }
answer=$(head -1 "$tmp/chat_want")
tmux -L coil-test kill-server 2>/dev/null
tmux -L coil-test new-session -d -s chat -x 160 -y 40 "$coil chat --checkpoint $final --max-new-tokens 8"
pane() { tmux -L coil-test capture-pane -p -t chat 2>/dev/null; }
for _ in $(seq 100); do pane | grep -q "^> " && break; sleep 0.1; done
tmux -L coil-test send-keys -t chat "Say hello." Enter
for _ in $(seq 100); do [ "$(pane | grep -c '^>')" -ge 2 ] && break; sleep 0.1; done
if pane | grep -q "^coil chat: " && [ -n "$answer" ] && pane | grep -qF -- "$answer" && [ "$(pane | grep -c '^>')" -ge 2 ]; then
  passed=$((passed + 1))
else failed=$((failed + 1)); echo "FAIL chat in tmux: want answer '$answer', pane:"; pane; fi
tmux -L coil-test send-keys -t chat "/quit" Enter
for _ in $(seq 50); do tmux -L coil-test has-session -t chat 2>/dev/null || break; sleep 0.1; done
tmux -L coil-test has-session -t chat 2>/dev/null && { failed=$((failed + 1)); echo "FAIL chat: /quit did not end it"; } || passed=$((passed + 1))
tmux -L coil-test kill-server 2>/dev/null

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
