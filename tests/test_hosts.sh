#!/usr/bin/env bash
# Two simulated hosts (slurm/local-cluster start --nodes 2: network + UTS namespaces node1, node2,
# addresses in 192.0.2.0/24 inside them only, an ssh stand-in, one slurmd per host):
#  - `coil launch --hosts node1:2,node2:2` (mpirun across the hosts) logs the same losses as 4
#    ranks on one host, bit for bit, and as 1 process within 1e-5; its lines carry [rank R host]
#    and the start-up line says 2 node(s) x 2 rank(s) per node; the veth carried the traffic;
#  - a run_dir node2 does not see (an empty tmpfs there): one error naming rank 2 and node2,
#    non-zero exit, nothing trained, no process left;
#  - the network model checked across hosts: HSDP 2 x 2 (shard within a host), node2's veth bytes
#    each way = bench/network_model.py's inter-node bytes within 10% (tests/test_network_bytes.sh
#    with NET_HOSTS=2 on this cluster);
#  - `sbatch --nodes=2 slurm/pretrain.sbatch` runs; a second such job, requeued mid-run (scontrol
#    requeue) and restricted to 1 node while pending, resumes from the checkpoint its 2-node run
#    wrote (resharded from 4 ranks to 2) and logs the losses and batch hashes of a replay that
#    changes world size at the same step (the first job's checkpoint of that step resumed on 1
#    node), exactly, and the first job's final loss within 1e-5; `slurm/sft.sbatch` runs on it.
# Skipped (exit 77) where not root, namespaces are refused, or Slurm / Open MPI are missing.
#   tests/test_hosts.sh path/to/coil
set -u
coil=$(realpath "$1")
src=$(cd "$(dirname "$0")/.." && pwd)
source "$src/tests/hosts_prelude.sh"  # skips where it cannot run; $tmp, $cluster, the exit trap
exports=$("$src/slurm/local-cluster" start --nodes 2 --share "$tmp" "$cluster") && eval "$exports" ||
  { echo "FAIL the 2-host cluster did not start"; exit 1; }
export SLURM_CONF OMPI_MCA_plm_rsh_agent OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
on() { "$src/slurm/local-cluster" exec "$cluster" "$@"; }
failed=0
fail() { echo "FAIL $*"; failed=1; }
cd "$tmp"
python3 "$src/tests/tiny_corpus.py" c.jsonl
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
args=(--config /dev/null --set data.train="$tmp/shards" --set data.tokenizer="$tmp/tok.model" --set model.d_model=32
  --set model.n_layer=2 --set train.seq_len=32 --set train.global_batch_size=8 --set train.micro_batch_size=1
  --set train.max_steps=6 --set train.eval_interval=0 --set train.checkpoint_interval=6 --set train.threads=1
  --set train.device=cpu)
losses() { python3 -c 'import json,sys; print(" ".join(repr(json.loads(l)["loss"]) for l in open(sys.argv[1]) if "loss" in l))' "$1/metrics.jsonl"; }

"$coil" pretrain "${args[@]}" --set train.run_dir="$tmp/one" >one.log 2>&1 || fail "1 process: $(tail -1 one.log)"
mpirun -np 4 --oversubscribe --bind-to none "$coil" pretrain "${args[@]}" --set train.run_dir="$tmp/four" >four.log 2>&1 ||
  fail "4 ranks on one host: $(tail -2 four.log)"
rx() { on "$1" cat /sys/class/net/eth0/statistics/rx_bytes; }
before=$(rx node2)
on node1 "$coil" launch --hosts node1:2,node2:2 --oversubscribe --iface 192.0.2.0/24 -- coil pretrain "${args[@]}" \
  --set train.run_dir="$tmp/two" >two.log 2>&1 || fail "2 hosts x 2 ranks: $(tail -3 two.log)"
moved=$(( $(rx node2) - before ))
[ -n "$(losses two)" ] && [ "$(losses two)" = "$(losses four)" ] || fail "2 hosts x 2 ranks: losses $(losses two), 4 ranks on one host $(losses four)"
python3 -c '
import sys
a, b = (list(map(float, s.split())) for s in sys.argv[1:3])
assert len(a) == len(b) == 6 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)' "$(losses one)" "$(losses two)" ||
  fail "2 hosts x 2 ranks: losses $(losses two), 1 process $(losses one)"
grep -q "^\[rank 0 node1\] pretrain: 2 node(s) x 2 rank(s) per node, 1 thread(s) per rank; node1: rank 0 cpu rank 1 cpu; node2: rank 2 cpu rank 3 cpu" two.log ||
  fail "2 hosts: no start-up line with the nodes and ranks ($(grep -m1 'node(s)' two.log))"
[ "$moved" -gt 1000000 ] || fail "2 hosts: node2 received only $moved bytes over its veth"
echo "2 hosts x 2 ranks: node2 received $moved bytes over the veth"

# The network model across hosts (HSDP 2 x 2: only the gradient all-reduce crosses the veth).
NET_HOSTS=2 NET_STEPS=6 NET_CLUSTER=$cluster "$src/tests/test_network_bytes.sh" "$coil" >net.log 2>&1 ||
  fail "the veth bytes against the model: $(grep -m1 -e FAIL -e Error -e error net.log)"
grep veth net.log

# A run_dir node2 does not see: an empty tmpfs there.
LOCAL_CLUSTER_PRIVATE=$tmp/private on node1 "$coil" launch --hosts node1:2,node2:2 --oversubscribe -- coil pretrain \
  "${args[@]}" --set train.run_dir="$tmp/private/run" >private.log 2>&1
rc=$?
[ $rc -ne 0 ] || fail "a run_dir node2 does not see: exit 0"
# Rank 0 says it in one line, then ends every rank (MPI_Abort).
[ "$(grep -c "coil: error: rank 0: train.run_dir $tmp/private/run is not shared by all ranks: rank 2 on host node2 does not see" private.log)" -eq 1 ] ||
  fail "a run_dir node2 does not see: no error naming rank 2 and node2 ($(grep -m1 error private.log))"
grep -q "step 1/" private.log && fail "a run_dir node2 does not see: it trained"
[ -e "$tmp/private/run/metrics.jsonl" ] && fail "a run_dir node2 does not see: metrics were written"
for ns in $(ip netns list | awk -v p="$(cat "$cluster/prefix")" '$1 ~ "^"p {print $1}'); do
  ip netns pids "$ns" | xargs -r ps -o comm= -p | grep -qx coil && fail "a coil process is left in $ns"
done

# Slurm: 2 nodes x 2 tasks, then SFT on the result.
cat >pre.toml <<EOF
[data]
train = "$tmp/shards"
tokenizer = "$tmp/tok.model"
[model]
d_model = 32
n_layer = 2
[train]
seq_len = 32
global_batch_size = 4
micro_batch_size = 1
max_steps = 12
eval_interval = 0
checkpoint_interval = 1
threads = 1
device = "cpu"
EOF
python3 -c '
import json
w = "the snake coils around a warm stone and sleeps while rain falls on green hills far away from town".split()
with open("alpaca.jsonl", "w") as f:
    for d in range(40): f.write(json.dumps({"instruction": "Say something about " + w[d % len(w)] + ".", "input": "",
                                             "output": " ".join(w[(d + i) % len(w)] for i in range(12))}) + "\n")'
sed -e "s|$tmp/shards|$tmp/alpaca.jsonl|" -e 's/seq_len = 32/seq_len = 128/' pre.toml >sft.toml
cpu=(--nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --output="$tmp/%x-%j.log")
wait_job() {  # until the job has left the queue (at most 3 minutes)
  for _ in $(seq 360); do on node1 squeue -h -j "$1" 2>/dev/null | grep -q . || return 0; sleep 0.5; done
  fail "job $1 did not finish"; on node1 scancel "$1"
}
a=$(cd "$src" && COIL=$coil CONFIG=$tmp/pre.toml RUN_DIR=$tmp/A on node1 sbatch --parsable "${cpu[@]}" slurm/pretrain.sbatch)
wait_job "$a"
grep -q "pretrain: done, 12 steps" "coil-pretrain-$a.log" || { fail "the 2-node job did not finish"; tail -5 "coil-pretrain-$a.log"; }
grep -q "pretrain: 2 node(s) x 2 rank(s) per node" "coil-pretrain-$a.log" || fail "the 2-node job did not run on 2 nodes"
# A 2-node job requeued mid-run (SIGTERM: the ranks save and stop), restricted to 1 node while it
# waits, resumes there from the checkpoint its 2-node run wrote (4 ranks resharded to 2).
b=$(cd "$src" && COIL=$coil CONFIG=$tmp/pre.toml RUN_DIR=$tmp/B on node1 sbatch --parsable "${cpu[@]}" slurm/pretrain.sbatch)
steps_done() { local c; c=$(grep -c '"loss"' "$1/metrics.jsonl" 2>/dev/null); echo "${c:-0}"; }
for _ in $(seq 900); do [ "$(steps_done B)" -ge 3 ] && break; sleep 0.1; done
on node1 scontrol requeue "$b" || fail "scontrol requeue $b"
for _ in $(seq 100); do on node1 squeue -h -j "$b" -o %T | grep -qx PENDING && break; sleep 0.2; done
on node1 scontrol update jobid="$b" NumNodes=1 NumCPUs=2 NumTasks=2 || fail "scontrol update $b NumNodes=1"
on node1 scontrol update jobid="$b" StartTime=now 2>/dev/null  # it would wait ~25 s otherwise
wait_job "$b"
k=$(sed -n 's/.*stopped by a signal after step \([0-9]*\).*/\1/p' "coil-pretrain-$b.log" | head -1)
if [ -z "$k" ] || [ "$k" -ge 12 ]; then
  fail "the requeued job did not stop mid-run with a checkpoint ($(grep -m1 stopped "coil-pretrain-$b.log"))"
else
  echo "the requeued job stopped after step $k on 2 nodes"
  grep -q "restart count 1) on 1 node(s), 2 task(s)" "coil-pretrain-$b.log" &&
    grep -q "pretrain: resuming .*/B/checkpoints/step-$(printf %08d "$k") (saved on 4 rank(s)) at step $k" "coil-pretrain-$b.log" &&
    grep -q "pretrain: 1 node(s) x 2 rank(s) per node" "coil-pretrain-$b.log" ||
    fail "the requeued job did not resume its 2-node checkpoint on 1 node: $(grep -e 'coil-job: job' -e resuming "coil-pretrain-$b.log")"
  grep -q "pretrain: done, 12 steps" "coil-pretrain-$b.log" || { fail "the requeued job did not finish"; tail -5 "coil-pretrain-$b.log"; }
  # The replay: the first job's step-k checkpoint (4 ranks) resumed on 1 node x 2 ranks.
  cp -r A R && rm -rf R/checkpoints/final && ln -sfn "step-$(printf %08d "$k")" R/checkpoints/latest
  for c in R/checkpoints/step-*; do [ "${c##*-}" -gt "$k" ] 2>/dev/null && rm -rf "$c"; done
  r=$(cd "$src" && COIL=$coil CONFIG=$tmp/pre.toml RUN_DIR=$tmp/R on node1 sbatch --parsable "${cpu[@]}" --nodes=1 slurm/pretrain.sbatch)
  wait_job "$r"
  grep -q "pretrain: resuming .*/R/checkpoints/step-$(printf %08d "$k") (saved on 4 rank(s)) at step $k" "coil-pretrain-$r.log" ||
    fail "the replay did not resume at step $k: $(grep -m1 -e resuming -e error "coil-pretrain-$r.log")"
  python3 -c '
import json, sys
b, r = ([(j["step"], j["loss"], j["batch_hash"]) for j in map(json.loads, open(f + "/metrics.jsonl")) if "loss" in j]
        for f in sys.argv[1:3])
assert len(b) == 12 and b == r, [x for x in zip(b, r) if x[0] != x[1]][:3] or (len(b), len(r))' B R ||
    fail "the requeued job does not log the replay's losses and batch hashes"
  python3 -c '
import json, sys
a, b = ([json.loads(l) for l in open(f + "/metrics.jsonl")][-1] for f in sys.argv[1:3])
assert a["step"] == b["step"] == 12 and abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)' A B ||
    fail "the requeued job does not end with the 2-node job's final loss (1e-5)"
fi
s=$(cd "$src" && COIL=$coil CONFIG=$tmp/sft.toml RUN_DIR=$tmp/S PRETRAINED=$tmp/A/checkpoints/final on node1 sbatch --parsable "${cpu[@]}" slurm/sft.sbatch)
wait_job "$s"
grep -q "sft: done" "coil-sft-$s.log" || { fail "the 2-node SFT job did not finish"; tail -5 "coil-sft-$s.log"; }
"$coil" ckpt verify S/checkpoints/final >/dev/null || fail "the 2-node SFT checkpoint does not verify"
[ "$failed" -eq 0 ] && echo "hosts: ok"
exit "$failed"
