#!/usr/bin/env bash
# The network model (bench/network_model.py, docs/SCALING.md) against bytes measured on the wire:
# 4 ranks in a network namespace of their own, Open MPI over TCP on its loopback only (the
# namespace's lo counts exactly this run's packets), HSDP 2 x 2 with Muon, gradient accumulation
# and evaluation. Two runs (2 and 6 steps) differ by 4 steps and their evaluations: the loopback's
# transmitted bytes of the difference (every rank's sends, headers included) equal the model's
# prediction within 10%. Skipped (exit 77) where network namespaces cannot be made (not root).
#   tests/test_network_bytes.sh path/to/coil
# Other layouts by hand: NET_SHARD=4 (FSDP over 4 ranks), NET_ZERO2=1 (reshard_after_forward = false).
# NET_HOSTS=2: the inter-node class instead, on two simulated hosts (slurm/local-cluster start
# --nodes 2; run it under `flock /tmp/coil-cluster.lock`): 2 ranks on each, shared memory within a
# host, TCP over the veth between them; node2's veth counters (sent and received, headers
# included) against the model's inter-node bytes of node2's 2 ranks (--ranks-per-node 2).
# NET_CLUSTER=DIR (with NET_HOSTS=2): a 2-host cluster running already (tests/test_hosts.sh's), left running.
# NET_STEPS="2 6" (the default): the two runs' lengths; NET_STEPS=6: one run, its start-up and final
# save counted in (about 1% of a 6-step run's veth bytes; what tests/test_hosts.sh does, to save a run).
set -u
coil=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
model="$here/../bench/network_model.py"
hosts=${NET_HOSTS:-1}
if ! unshare -n true 2>/dev/null || ! command -v ip >/dev/null; then
  echo "skipped: needs root (unshare -n) and ip(8) for a network namespace of its own"
  exit 77
fi
if [ "$hosts" = 2 ] && [ -z "${NET_CLUSTER:-}" ]; then
  for p in mpirun sbatch /usr/sbin/slurmctld /usr/sbin/munged; do
    command -v "$p" >/dev/null || { echo "skipped: $p is not installed (slurm/local-cluster needs it)"; exit 77; }
  done
fi
tmp=$(mktemp -d)
cluster=$tmp/cluster
[ -n "${NET_CLUSTER:-}" ] && cluster=$NET_CLUSTER
trap '[ "$hosts" = 2 ] && [ -z "${NET_CLUSTER:-}" ] && "$here/../slurm/local-cluster" stop "$cluster" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
cd "$tmp"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
failed=0
fail() { echo "FAIL $*"; failed=1; }
runs=(${NET_STEPS:-2 6})
first=0 last=${runs[-1]}
[ ${#runs[@]} -eq 2 ] && first=${runs[0]}
echo 0 >tx0; echo 0 >rx0

python3 "$here/tiny_corpus.py" c.jsonl
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
# Open MPI over TCP on lo only; the collectives' algorithms fixed to those the model assumes
# (ring all-gather and all-reduce, butterfly reduce-scatter: (p - 1) / p of the buffer per rank;
# linear gather and scatter).
links=(--mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo)
# Two hosts: shared memory within a host, TCP between them (the veth carries only inter-node bytes).
[ "$hosts" = 2 ] && links=(--host node1:2,node2:2 --mca btl tcp,vader,self --mca btl_tcp_if_include 192.0.2.0/24
  --mca oob_tcp_if_include 192.0.2.0/24)
mca=("${links[@]}" --mca coll_tuned_use_dynamic_rules 1 --mca coll_tuned_allgather_algorithm 4 --mca coll_tuned_allreduce_algorithm 4
  --mca coll_tuned_reduce_scatter_block_algorithm 4 --mca coll_tuned_gather_algorithm 1
  --mca coll_tuned_scatter_algorithm 1)
args=(--config /dev/null --set data.train=$tmp/shards --set data.val=$tmp/shards --set data.tokenizer=$tmp/tok.model
  --set model.d_model=64 --set model.n_layer=2
  --set train.seq_len=32 --set train.global_batch_size=8 --set train.micro_batch_size=1
  --set train.eval_interval=2 --set train.eval_batches=2 --set train.checkpoint_interval=0 --set train.threads=1
  --set train.device=cpu --set train.data_parallel_shard_degree=${NET_SHARD:-2}
  --set train.data_parallel_replicate_degree=$((4 / ${NET_SHARD:-2})) --set train.reshard_after_forward=$([ "${NET_ZERO2:-0}" = 1 ] && echo false || echo true))
zero2=(); [ "${NET_ZERO2:-0}" = 1 ] && zero2=(--zero2)
cat >measure.sh <<EOS
set -e
ip link set lo up
tx() { awk '/^ *lo:/ { print \$10 }' /proc/net/dev; }
for steps in ${runs[*]}; do
  before=\$(tx)
  mpirun --oversubscribe --bind-to none -np 4 ${mca[*]} "$coil" pretrain ${args[*]} --set train.max_steps=\$steps \
    --set train.run_dir=run\$steps >run\$steps.log 2>&1
  echo \$((\$(tx) - before)) >tx\$steps
done
EOS
if [ "$hosts" = 2 ]; then
  if [ -z "${NET_CLUSTER:-}" ]; then
    exports=$("$here/../slurm/local-cluster" start --nodes 2 --share "$tmp" "$cluster") && eval "$exports" ||
      { echo "FAIL the 2-host cluster did not start"; exit 1; }
  fi
  export OMPI_MCA_plm_rsh_agent=$cluster/ssh
  on() { "$here/../slurm/local-cluster" exec "$cluster" "$@"; }
  veth() { on node2 cat /sys/class/net/eth0/statistics/$1_bytes; }
  for steps in ${runs[*]}; do
    tx=$(veth tx) rx=$(veth rx)
    timeout 300 "$here/../slurm/local-cluster" exec "$cluster" node1 mpirun --bind-to none -np 4 "${mca[@]}" "$coil" \
      pretrain "${args[@]}" --set train.max_steps=$steps --set train.run_dir="$tmp/run$steps" >run$steps.log 2>&1 ||
      fail "the run of $steps steps on 2 hosts: $(tail -3 run$steps.log)"
    echo $(($(veth tx) - tx)) >tx$steps
    echo $(($(veth rx) - rx)) >rx$steps
  done
else
  timeout 600 unshare -n bash measure.sh || fail "the runs in a network namespace: $(tail -3 run*.log)"
fi
evals() { grep -c val_loss "$1/metrics.jsonl"; }
if [ "$failed" -eq 0 ]; then
  vocab=$(sed -n 's/.*vocab=\([0-9]*\).*/\1/p' run$last.log | head -1)
  n=$((last - first))
  measured=$(($(cat tx$last) - $(cat tx$first)))
  evals_per_step=$(python3 -c "print(($(evals run$last) - $( [ $first -gt 0 ] && evals run$first || echo 0)) / $n)")
  geometry=(--d-model 64 --n-layer 2 --vocab "${vocab:-300}" --world 4 --shard "${NET_SHARD:-2}" "${zero2[@]}" --micro-batches 2
    --eval-batches 2 --evals-per-step "$evals_per_step" --json)
  if [ "$hosts" = 2 ]; then
    # node2's 2 ranks' inter-node bytes, each way; Open MPI's butterfly reduce-scatter (fixed above).
    per_rank=$(python3 "$model" "${geometry[@]}" --ranks-per-node 2 --reduce-scatter butterfly |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["inter"])')
    received=$(($(cat rx$last) - $(cat rx$first)))
    python3 -c "
t, r, p = $measured, $received, 2 * $n * $per_rank
print(f'veth bytes of $n steps, node2 (2 of 4 ranks; shard ${NET_SHARD:-2}, zero2 ${NET_ZERO2:-0}): sent {t}, received {r}, '
      f'predicted {p:.0f} each way, ratios {t / p:.4f} {r / p:.4f}')
assert abs(t / p - 1) <= 0.10 and abs(r / p - 1) <= 0.10, 'measured and predicted differ by more than 10%'" ||
      fail "measured != predicted"
  else
    per_rank=$(python3 "$model" "${geometry[@]}" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["intra"] + d["inter"])')
    python3 -c "
m, p = $measured, 4 * $n * $per_rank
print(f'network bytes of $n steps on 4 ranks (shard ${NET_SHARD:-2}, zero2 ${NET_ZERO2:-0}): measured {m}, predicted {p:.0f}, ratio {m / p:.4f}')
assert abs(m / p - 1) <= 0.10, 'measured and predicted differ by more than 10%'" || fail "measured != predicted"
  fi
fi
[ "$failed" -eq 0 ] && echo "network bytes: ok"
exit "$failed"
