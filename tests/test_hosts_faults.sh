#!/usr/bin/env bash
# Faults of a whole host, on two simulated hosts (slurm/local-cluster start --nodes 2), under
# `coil launch --hosts node1:2,node2:2 --max-restarts 1`:
#  - a link down (node2's veth set down) for longer than train.watchdog_timeout: the watchdog ends
#    the job with one line naming the rank and the operation it was stuck in; the launcher waits for
#    node2 to answer again (the test brings the link back up once the watchdog has spoken), starts the
#    job again on both hosts, and it ends with the losses and batch hashes of an undisturbed 4-rank
#    run, bit for bit (same world size);
#  - a lost node (node2: every process on it SIGKILLed, its link down) at a random step while a
#    checkpoint is being written: the launcher (--min-nodes 1) drops node2 after --host-wait, the job
#    resumes on node1's 2 ranks from the latest intact checkpoint (4 ranks resharded to 2), and ends
#    with the parameters and optimizer state (within 1e-6: bit for bit, in fact) of a replay without
#    faults that went from 4 to 2 ranks at the same step; every step saw the undisturbed run's batch.
# With PART = slurm (ctest hosts.slurm_lost), the same lost node under Slurm instead, on three
# simulated hosts (a slurmd on each; SlurmdTimeout 10 s): `sbatch --nodes=2 slurm/pretrain.sbatch`
# (--no-kill, MIN_NODES 1) on node1 + node2, node2 lost at a random step while a checkpoint is
# being written: Slurm marks node2 DOWN and ends the step, slurm/coil-job finds node2 gone and
# starts the step again on node1 alone (2 tasks), which resumes the latest intact checkpoint (4
# ranks resharded to 2); the job ends COMPLETED with the parameters and optimizer state of the
# replay that went from 4 to 2 ranks at the same step and its (step, loss, batch hash) lines, every
# step's batch the undisturbed run's, no coil process left. Then a job on node1 + node3 with MIN_NODES=2 loses node3: one line naming
# node3 and COIL_MIN_NODES, the job FAILED with exit 1, out of the queue within 120 s of the loss.
# Before these, MIN_NODES=x and MIN_NODES=3 (of 2 nodes): one line each, exit 1, no step started.
# Skipped (exit 77) where not root, namespaces are refused, or Slurm / Open MPI are missing.
#   tests/test_hosts_faults.sh path/to/coil path/to/python-with-h5py [launch|slurm]
#   (FAULT_SEED=n repeats a run)
set -u
coil=$(realpath "$1")
python=$2
part=${3:-launch}
[ "$part" = launch ] || [ "$part" = slurm ] || { echo "test_hosts_faults.sh: PART is launch or slurm, not '$part'" >&2; exit 2; }
src=$(cd "$(dirname "$0")/.." && pwd)
source "$src/tests/hosts_prelude.sh"  # skips where it cannot run; $tmp, $cluster, the exit trap
seed=${FAULT_SEED:-$(date +%s)}
RANDOM=$seed
echo "fault seed $seed (FAULT_SEED=$seed repeats these moments)"
failed=0
fail() { echo "FAIL $*"; failed=1; }
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }
cd "$tmp"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
python3 "$src/tests/tiny_corpus.py" c.jsonl
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
# A checkpoint every step (asynchronous saves): most moments of the run are inside a save.
steps=20
args=(--config /dev/null --set data.train="$tmp/shards" --set data.tokenizer="$tmp/tok.model" --set model.d_model=32
  --set model.n_layer=2 --set train.seq_len=32 --set train.global_batch_size=8 --set train.micro_batch_size=1
  --set train.max_steps=$steps --set train.eval_interval=0 --set train.checkpoint_interval=1 --set train.threads=1
  --set train.device=cpu)
steps_done() { local c; c=$(grep -c '"loss"' "$1/metrics.jsonl" 2>/dev/null); echo "${c:-0}"; }
# wait_steps RUN_DIR N: until N steps are logged, or the launcher has ended, or 5 minutes passed.
wait_steps() {
  local until=$(($(date +%s) + 300))
  while [ "$(steps_done "$1")" -lt "$2" ] && kill -0 "$launcher" 2>/dev/null && [ "$(date +%s)" -lt $until ]; do sleep 0.05; done
}
hashes() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d = json.loads(l); "loss" in d and print(d["step"], d["loss"], d["batch_hash"])' "$1/metrics.jsonl"; }
only_hashes() { hashes "$1" | cut -d' ' -f1,3; }

# The undisturbed run, 4 ranks on one host (2 x 2 ranks on the hosts log the same losses bit for
# bit: hosts.two), every checkpoint kept for the replay.
mpirun -np 4 --oversubscribe --bind-to none "$coil" pretrain "${args[@]}" --set train.keep_last_k=0 \
  --set train.run_dir="$tmp/calm" >calm.log 2>&1 || fail "the undisturbed run: $(tail -2 calm.log)"
[ "$(hashes calm | wc -l)" -eq $steps ] || fail "the undisturbed run logged $(hashes calm | wc -l) steps"
echo "the undisturbed run: done ($(elapsed))"

cluster_do() { "$src/slurm/local-cluster" "$1" "$cluster" "${@:2}"; }
no_coil_left() {
  local ns
  for ns in $(ip netns list | awk -v p="$(cat "$cluster/prefix")" '$1 ~ "^"p {print $1}'); do
    ip netns pids "$ns" | xargs -r ps -o comm= -p | grep -qx coil && fail "a coil process is left in $ns"
  done
}
# resumed_on_node1 LOG WHAT NAME PREFIX: LOG shows a resume from a checkpoint saved on 4 ranks, on
# node1's 2 ranks (the start-up line after PREFIX), run to the end; sets $resumed to its step.
resumed_on_node1() {
  resumed=$(sed -n 's/.*pretrain: resuming .*(saved on 4 rank(s)) at step \([0-9]*\) of.*/\1/p' "$1" | head -1)
  [ -n "$resumed" ] && grep -q "$4pretrain: 1 node(s) x 2 rank(s) per node" "$1" &&
    grep -q "pretrain: done, $steps steps" "$1" || fail "$2: no resume on node1's 2 ranks to the end"
  echo "$3: resumed at step ${resumed:-?} on 2 ranks"
}

# replay NAME RESUMED: the undisturbed run's checkpoint of step RESUMED, resumed on 2 ranks of one
# host (in replay-NAME), must end with NAME's final parameters and optimizer state.
replay() {
  local name=$1 resumed=$2 d
  cp -r calm "replay-$name"
  for d in "replay-$name"/checkpoints/step-*; do [ $((10#${d##*step-})) -gt "$resumed" ] && rm -rf "$d"; done
  rm -rf "replay-$name/checkpoints/final"
  ln -sfn "$(printf 'step-%08d' "$resumed")" "replay-$name/checkpoints/latest"
  mpirun -np 2 --oversubscribe --bind-to none "$coil" pretrain "${args[@]}" --set train.run_dir="$tmp/replay-$name" \
    >"replay-$name.log" 2>&1 || fail "the replay of $name: $(tail -2 "replay-$name.log")"
  "$python" - "$name/checkpoints/final/index.h5" "replay-$name/checkpoints/final/index.h5" "$name" <<'EOF' ||
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r") for p in sys.argv[1:3])
names = []
a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) and n.split("/")[0] in ("model", "optimizer") else None)
worst = max(float(np.abs(a[n][()].astype(np.float64) - b[n][()]).max()) for n in names)
print(f"{sys.argv[3]} vs replay: {len(names)} tensors, largest difference {worst:.3g}")
sys.exit(0 if len(names) > 10 and worst <= 1e-6 else 1)
EOF
    fail "$name: the final state differs from the replay's"
}
if [ "$part" = slurm ]; then
  # --- A lost node under Slurm: three hosts, each job on two of them.
  exports=$("$src/slurm/local-cluster" start --nodes 3 --share "$tmp" "$cluster") && eval "$exports" ||
    { echo "FAIL the 3-host cluster did not start"; exit 1; }
  export SLURM_CONF
  echo "the 3-host cluster: up ($(elapsed))"
  : >empty.toml  # the settings are the --set options
  on() { cluster_do exec node1 "$@"; }
  job_state() { on scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\) .*ExitCode=\([0-9:]*\).*/\1 \2/p'; }
  # submit RUN_DIR NODES [VAR=VALUE...]: sbatch slurm/pretrain.sbatch on NODES (2 tasks each); prints the job id.
  submit() {
    local dir=$1 w=$2
    shift 2
    (cd "$src" && env COIL="$coil" CONFIG="$tmp/empty.toml" RUN_DIR="$tmp/$dir" "$@" "$src/slurm/local-cluster" exec "$cluster" \
      node1 sbatch --parsable --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --output="$tmp/$dir.log" \
      -w "$w" slurm/pretrain.sbatch "${args[@]:2}" --set train.keep_last_k=2)
  }
  # wait_job JOB SECONDS: until JOB has left the queue; fails (and cancels it) after SECONDS.
  wait_job() {
    local until=$(($(date +%s) + $2))
    while on squeue -h -j "$1" 2>/dev/null | grep -q .; do
      [ "$(date +%s)" -lt $until ] || { fail "job $1 still in the queue after $2 s"; on scancel "$1"; return 1; }
      sleep 0.5
    done
  }
  # wait_steps RUN_DIR N JOB: until N steps are logged, JOB has left the queue, or 5 minutes passed.
  wait_steps() {
    local until=$(($(date +%s) + 300)) i=0
    while [ "$(steps_done "$1")" -lt "$2" ] && [ "$(date +%s)" -lt $until ]; do
      i=$((i + 1))
      [ $((i % 20)) -ne 0 ] || on squeue -h -j "$3" 2>/dev/null | grep -q . || return 0
      sleep 0.05
    done
  }

  # A MIN_NODES that is not a node count of the job: one line, exit 1, no step started.
  for v in x 3; do
    j=$(submit "min-$v" node1,node2 MIN_NODES=$v) || fail "sbatch with MIN_NODES=$v"
    wait_job "$j" 120
    case $v in
      x) want="coil-job: error: COIL_MIN_NODES (the scripts' MIN_NODES) must be a whole number >= 1, not 'x'" ;;
      3) want="coil-job: error: COIL_MIN_NODES=3 (the scripts' MIN_NODES) is more than the job's 2 node(s)" ;;
    esac
    [ "$(cat "min-$v.log")" = "$want" ] || fail "MIN_NODES=$v: not the one line '$want': $(cat "min-$v.log")"
    [ "$(job_state "$j")" = "FAILED 1:0" ] || fail "MIN_NODES=$v: the job ended $(job_state "$j"), not FAILED 1:0"
    [ -e "min-$v" ] && fail "MIN_NODES=$v: a run directory was made"
  done

  lose_at=$((4 + RANDOM % 10))
  job=$(submit slurm node1,node2 MIN_NODES=1) || fail "sbatch on node1,node2"
  wait_steps slurm $lose_at "$job"
  until=$((SECONDS + 60))  # no process started in this loop: a save is short
  while ! compgen -G "slurm/checkpoints/*.tmp" >/dev/null && [ $SECONDS -lt $until ]; do :; done
  in_save=$(compgen -G "slurm/checkpoints/*.tmp")
  cluster_do lose node2
  lost_at=$(date +%s)
  echo "slurm: node2 lost after step $(steps_done slurm)${in_save:+, in the save $in_save} ($(elapsed))"
  [ -n "$in_save" ] || fail "slurm: no save in flight when node2 was lost"
  until=$((lost_at + 300)) down=""
  while ! grep -q "coil-job: lost node2" slurm.log && [ "$(date +%s)" -lt $until ]; do
    [ -z "$down" ] && on scontrol show node -o node2 | grep -q "State=DOWN" && down=$(( $(date +%s) - lost_at ))
    sleep 0.5
  done
  echo "slurm: Slurm marked node2 DOWN ${down:-?} s after the loss, coil-job dropped it after $(( $(date +%s) - lost_at )) s"
  wait_job "$job" 300
  echo "slurm: the job left the queue $(( $(date +%s) - lost_at )) s after the loss: $(job_state "$job") ($(elapsed))"
  grep -q "coil-job: lost node2 (state DOWN[^)]*); going on without it on 1 node(s), 2 task(s): node1 (COIL_MIN_NODES=1)" slurm.log ||
    fail "slurm: coil-job did not go on without node2: $(grep coil-job slurm.log)"
  resumed_on_node1 slurm.log slurm slurm ""
  [ "$(job_state "$job")" = "COMPLETED 0:0" ] || fail "slurm: the job ended $(job_state "$job"), not COMPLETED 0:0"
  no_coil_left

  # --- Fewer nodes left than MIN_NODES: one line, exit 1, no hang.
  bad=$(submit bad node1,node3 MIN_NODES=2) || fail "sbatch on node1,node3"
  wait_steps bad 2 "$bad"
  cluster_do lose node3
  lost_at=$(date +%s)
  wait_job "$bad" 120
  echo "slurm, MIN_NODES=2: node3 lost; the job left the queue $(( $(date +%s) - lost_at )) s later: $(job_state "$bad")"
  [ "$(grep -c "coil-job: error: the step failed (exit [0-9]*) and lost node3 (state DOWN[^)]*); 1 of the 2 node(s) answer, fewer than COIL_MIN_NODES=2: giving up" bad.log)" -eq 1 ] ||
    fail "slurm, MIN_NODES=2: not one line naming node3 and COIL_MIN_NODES: $(grep coil-job bad.log)"
  [ "$(grep -c "coil-job: error" bad.log)" -eq 1 ] || fail "slurm, MIN_NODES=2: more than one coil-job error"
  [ "$(job_state "$bad")" = "FAILED 1:0" ] || fail "slurm, MIN_NODES=2: the job ended $(job_state "$bad"), not FAILED 1:0"
  no_coil_left
  "$src/slurm/local-cluster" stop "$cluster" >/dev/null 2>&1  # the replay runs on this host
  unset SLURM_CONF OMPI_MCA_plm_rsh_agent LOCAL_CLUSTER
  [ -e "$cluster" ] && fail "the cluster was not stopped"
  echo "the cluster stopped ($(elapsed))"

  [ "$(only_hashes slurm)" = "$(only_hashes calm)" ] ||
    fail "slurm: the batch hashes differ: $(diff <(only_hashes calm) <(only_hashes slurm) | head -4)"
  "$coil" ckpt verify slurm/checkpoints/final >/dev/null || fail "slurm: the final checkpoint does not verify"
  if [ -n "$resumed" ]; then
    replay slurm "$resumed"
    [ "$(hashes slurm)" = "$(hashes replay-slurm)" ] ||
      fail "slurm: the (step, loss, batch hash) lines differ from the replay's: $(diff <(hashes replay-slurm) <(hashes slurm) | head -4)"
  fi
  [ "$failed" -eq 0 ] && echo "hosts_slurm_lost: ok ($(elapsed))"
  [ "$failed" -eq 0 ] || { echo "--- slurm.log"; grep -v '"loss"' slurm.log | tail -20; echo "--- bad.log"; tail -10 bad.log; }
  exit "$failed"
fi

exports=$("$src/slurm/local-cluster" start --nodes 2 --share "$tmp" "$cluster") && eval "$exports" ||
  { echo "FAIL the 2-host cluster did not start"; exit 1; }
export SLURM_CONF OMPI_MCA_plm_rsh_agent
launch() {  # launch RUN_DIR LAUNCH_ARGS... -- PRETRAIN_ARGS...: on node1, in the background
  local dir=$1 largs=()
  shift
  while [ "$1" != -- ]; do largs+=("$1"); shift; done
  shift
  cluster_do exec node1 "$coil" launch --hosts node1:2,node2:2 --oversubscribe --max-restarts 1 "${largs[@]}" -- \
    coil pretrain "${args[@]}" --set train.run_dir="$tmp/$dir" "$@" </dev/null >"$dir.log" 2>&1 &
  launcher=$!
}

# --- A link down for longer than the watchdog's timeout.
down_at=$((3 + RANDOM % 8))
launch link --host-wait 120 -- --set train.watchdog_timeout=15 --set train.keep_last_k=2
wait_steps link $down_at
cluster_do link node2 down
echo "link: node2's link down after step $(steps_done link) ($(elapsed))"
while ! grep -q "no progress for" link.log && kill -0 "$launcher" 2>/dev/null; do sleep 0.1; done
cluster_do link node2 up
wait $launcher || fail "link down: the launcher exited $?: $(tail -3 link.log)"
echo "link: done ($(elapsed))"
# One watchdog line names the rank (the launcher's prefix says the same rank) and what it waited for.
grep -Eq '^\[rank ([0-3]) node[12]\] coil: error: rank \1: no progress for [0-9]+ s \(train.watchdog_timeout = 15\) at step [0-9]+; last operation: (forward and backward \(all-gathers, reduce-scatters\)|the all-reduce of the target count|the all-reduce of the loss and gradient norm|saving a checkpoint|committing a checkpoint)' link.log ||
  fail "link down: no watchdog line naming the rank and a collective: $(grep -m2 'no progress' link.log)"
grep -q "coil launch: the job failed with status .*; restart 1 of 1 on 4 rank(s) on node1:2,node2:2" link.log ||
  fail "link down: no restart on both hosts: $(grep 'coil launch' link.log)"
grep -q "pretrain: resuming .* at step" link.log && grep -q "pretrain: done, $steps steps" link.log ||
  fail "link down: the job did not resume and finish"
[ "$(hashes link)" = "$(hashes calm)" ] ||
  fail "link down: the losses or batches differ from the undisturbed run's: $(diff <(hashes calm) <(hashes link) | head -4)"

# --- A lost node, at a random step, while a checkpoint is being written.
lose_at=$((4 + RANDOM % 10))
launch lost --min-nodes 1 --host-wait 3 -- --set train.keep_last_k=2
wait_steps lost $lose_at
while ! compgen -G "lost/checkpoints/*.tmp" >/dev/null && kill -0 "$launcher" 2>/dev/null; do :; done
in_save=$(compgen -G "lost/checkpoints/*.tmp")
cluster_do lose node2
echo "lost: node2 lost after step $(steps_done lost)${in_save:+, in the save $in_save} ($(elapsed))"
[ -n "$in_save" ] || fail "lost: no save in flight when node2 was lost"
wait $launcher || fail "lost node: the launcher exited $?: $(tail -3 lost.log)"
echo "lost: done ($(elapsed))"
grep -q "coil launch: cannot reach host 'node2' (.* node2 true exited with status 255) after [0-9]* s; going on without it on 1 host(s) (--min-nodes 1)" lost.log &&
  grep -q "coil launch: the job failed with status .*; restart 1 of 1 on 2 rank(s) on node1:2" lost.log ||
  fail "lost node: the launcher did not go on without node2: $(grep 'coil launch' lost.log)"
resumed_on_node1 lost.log "lost node" lost "\[rank 0 node1\] "
no_coil_left
"$src/slurm/local-cluster" stop "$cluster" >/dev/null 2>&1  # the replay runs on this host
unset OMPI_MCA_plm_rsh_agent SLURM_CONF
echo "the cluster stopped ($(elapsed))"
[ "$(only_hashes lost)" = "$(only_hashes calm)" ] ||
  fail "lost node: the batch hashes differ: $(diff <(only_hashes calm) <(only_hashes lost) | head -4)"
"$coil" ckpt verify lost/checkpoints/final >/dev/null || fail "lost node: the final checkpoint does not verify"

# The replay: the undisturbed run's checkpoint of that step, resumed on 2 ranks of one host.
[ -n "$resumed" ] && replay lost "$resumed"
[ "$failed" -eq 0 ] && echo "hosts_faults: ok"
[ "$failed" -eq 0 ] || { echo "--- link.log"; grep -v '"loss"' link.log | tail -15; echo "--- lost.log"; tail -15 lost.log; }
exit "$failed"
