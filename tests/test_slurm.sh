#!/usr/bin/env bash
# slurm/pretrain.sbatch, sft.sbatch and eval.sbatch on a real one-node Slurm (slurm/local-cluster),
# with a tiny CPU config and 2 tasks: a job runs to its checkpoint and metrics; a job requeued mid-run
# (scontrol requeue: SIGTERM, then the job starts again) saves, resumes from its checkpoint and ends
# with the same final loss as the undisturbed one; the SFT script runs on the result; the eval
# script scores its checkpoints as one process does; a missing setting fails the job at once with
# a clear message. Skipped (exit 77) where Slurm cannot be
# started (not root, or Slurm not installed).
#   tests/test_slurm.sh path/to/coil
set -u
coil=$(realpath "$1")
src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "skipped: starting a Slurm cluster needs root"; exit 77; }
command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && command -v munged >/dev/null || [ -x /usr/sbin/munged ] ||
  { echo "skipped: Slurm or munge is not installed (scripts/setup installs them)"; exit 77; }
tmp=$(mktemp -d)
cluster=$tmp/cluster
trap '"$src/slurm/local-cluster" stop "$cluster" >/dev/null 2>&1; [ "${KEEP:-0}" = 1 ] || rm -rf "$tmp"' EXIT
eval "$("$src/slurm/local-cluster" start "$cluster")" || { echo "FAIL the local cluster did not start"; exit 1; }
failed=0
fail() { echo "FAIL $*"; failed=1; }
cd "$tmp"
python3 "$src/tests/tiny_corpus.py" c.jsonl
python3 -c '
import json
w = "the snake coils around a warm stone and sleeps while rain falls on green hills far away from town".split()
with open("alpaca.jsonl", "w") as f:
    for d in range(60): f.write(json.dumps({"instruction": "Say something about " + w[d % len(w)] + ".", "input": "",
                                             "output": " ".join(w[(d + i) % len(w)] for i in range(12))}) + "\n")'
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
cat >pre.toml <<EOF
[data]
train = "$tmp/shards"
tokenizer = "$tmp/tok.model"
[train]
seq_len = 32
global_batch_size = 4
micro_batch_size = 1
max_steps = 300
eval_interval = 0
checkpoint_interval = 5
threads = 1
EOF
cat >sft.toml <<EOF
[data]
train = "$tmp/alpaca.jsonl"
tokenizer = "$tmp/tok.model"
[train]
seq_len = 256
global_batch_size = 4
micro_batch_size = 1
max_steps = 20
eval_interval = 0
checkpoint_interval = 10
threads = 1
EOF
cpu=(--ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --output="$tmp/%x-%j.log")
submit() { (cd "$src" && sbatch --parsable "${cpu[@]}" "$@"); }
slow=1; [ "${COIL_SANITIZE:-0}" = 1 ] && slow=3  # under AddressSanitizer (scripts/test --sanitize)
wait_job() {  # until the job has left the queue (at most 4 minutes; 12 under the sanitizers)
  for _ in $(seq $((480 * slow))); do squeue -h -j "$1" 2>/dev/null | grep -q . || return 0; sleep 0.5; done
  fail "job $1 did not finish"; scancel "$1"
}
final_loss() { python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1]["loss"])' "$1"; }

a=$(COIL=$coil CONFIG=$tmp/pre.toml RUN_DIR=$tmp/A submit "$src/slurm/pretrain.sbatch")
b=$(COIL=$coil CONFIG=$tmp/pre.toml RUN_DIR=$tmp/B submit "$src/slurm/pretrain.sbatch")
for _ in $(seq 600); do [ -f B/metrics.jsonl ] && [ "$(wc -l <B/metrics.jsonl)" -ge 80 ] && break; sleep 0.1; done
scontrol requeue "$b" || fail "scontrol requeue"
sleep 2
scontrol update jobid="$b" StartTime=now 2>/dev/null  # it would wait ~25 s otherwise
wait_job "$a"
wait_job "$b"
grep -q "pretrain: done, 300 steps" "coil-pretrain-$a.log" || { fail "job A did not finish"; tail -5 "coil-pretrain-$a.log"; }
grep -q "stopped by a signal after step" "coil-pretrain-$b.log" || fail "requeued job B did not stop with a checkpoint"
grep -q "restart count 1" "coil-pretrain-$b.log" && grep -q "pretrain: resuming .*/B/checkpoints/step-" "coil-pretrain-$b.log" ||
  fail "requeued job B did not resume from its checkpoint"
grep -q "pretrain: done, 300 steps" "coil-pretrain-$b.log" || { fail "job B did not finish"; tail -5 "coil-pretrain-$b.log"; }
[ "$(final_loss A/metrics.jsonl)" = "$(final_loss B/metrics.jsonl)" ] || fail "requeued job: final loss $(final_loss B/metrics.jsonl), undisturbed $(final_loss A/metrics.jsonl)"
"$coil" ckpt verify B/checkpoints/final >/dev/null || fail "job B's final checkpoint does not verify"

s=$(COIL=$coil CONFIG=$tmp/sft.toml RUN_DIR=$tmp/S PRETRAINED=$tmp/B/checkpoints/final submit "$src/slurm/sft.sbatch")
wait_job "$s"
grep -q "sft: done, 20 steps" "coil-sft-$s.log" || { fail "the SFT job did not finish"; tail -5 "coil-sft-$s.log"; }
"$coil" ckpt verify S/checkpoints/final >/dev/null || fail "the SFT checkpoint does not verify"

# slurm/eval.sbatch: 2 tasks score pretraining's checkpoints (a glob) as one process with one thread does.
e=$(COIL=$coil CHECKPOINT="$tmp/B/checkpoints/step-000000[12]0" DATA=$tmp/c.jsonl submit "$src/slurm/eval.sbatch" --json --seq-len 16)
wait_job "$e"
OMP_NUM_THREADS=1 "$coil" eval --checkpoint "$tmp"/B/checkpoints/step-000000[12]0 --data c.jsonl --json --seq-len 16 >eval-one.jsonl 2>/dev/null ||
  fail "coil eval on one process"
python3 - "coil-eval-$e.log" eval-one.jsonl <<'PY' || fail "the eval job differs from one process (coil-eval-$e.log)"
import json, sys
job = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
one = [json.loads(l) for l in open(sys.argv[2])]
assert len(one) == 2 and len(job) == len(one), (len(job), len(one))
for j, o in zip(job, one):
    assert j["checkpoint"] == o["checkpoint"] and j["targets"] == o["targets"] and j["rows"] == o["rows"], (j, o)
    assert abs(j["loss"] - o["loss"]) <= 1e-12 * abs(o["loss"]), (j["loss"], o["loss"])
PY
d=$(COIL=$coil submit "$src/slurm/eval.sbatch")
wait_job "$d"
grep -q "eval.sbatch: error: DATA is empty" "coil-eval-$d.log" || fail "eval without DATA: no clear error"

m=$(COIL=$coil CONFIG=$tmp/missing.toml RUN_DIR=$tmp/M submit "$src/slurm/pretrain.sbatch")
wait_job "$m"
grep -q "coil-job: error: CONFIG=$tmp/missing.toml does not exist" "coil-pretrain-$m.log" || fail "a missing config: no clear error"
[ -e "$tmp/M" ] && fail "a missing config left a run directory"
n=$(COIL=$coil CONFIG=$tmp/sft.toml RUN_DIR=$tmp/N PRETRAINED=$tmp/nothing submit "$src/slurm/sft.sbatch")
wait_job "$n"
grep -q "sft.sbatch: error: PRETRAINED=$tmp/nothing does not exist" "coil-sft-$n.log" || fail "a missing pretrained checkpoint: no clear error"
[ "$failed" -eq 0 ] && echo "slurm: ok"
exit "$failed"
