#!/usr/bin/env bash
# Several-host bad input, on this one host (no namespaces to start): `coil launch` with a hostfile
# naming an unknown host, a host its ssh cannot reach, a line that is not Open MPI's syntax, more
# ranks than slots without --oversubscribe (and with it: the ranks run, with [rank R host]
# prefixes), a --min-nodes or --host-wait out of range: one line each, non-zero exit, nothing
# started. And a run_dir one rank does not see (that rank in a mount namespace of its own with an
# empty tmpfs on run_dir; root only): one error naming the rank and host, non-zero exit, nothing
# trained.
#   tests/test_hosts_input.sh path/to/coil
set -u
coil=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
command -v mpirun >/dev/null || { echo "skipped: mpirun is not installed"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
failed=0
fail() { echo "FAIL $*"; failed=1; }
# expect NAME NEEDLE -- ARGS...: exit status 1, the needle in the one line of output, no run_dir.
expect() {
  local name=$1 needle=$2
  shift 3
  "$coil" "$@" >"$name.log" 2>&1
  local rc=$?
  [ $rc -eq 1 ] || fail "$name: exit status $rc, not 1 ($(tail -1 "$name.log"))"
  grep -qF -- "$needle" "$name.log" || fail "$name: no '$needle' in: $(cat "$name.log")"
  [ "$(wc -l <"$name.log")" -eq 1 ] || fail "$name: more than one line: $(cat "$name.log")"
  [ -e run ] && fail "$name: a job ran (run/ exists)"
  rm -rf run
}
job=(-- coil pretrain --config /dev/null --set train.run_dir=run)
printf 'localhost slots=2\nno-such-host.invalid slots=2\n' >unknown
expect unknown "launch: unknown line 2: host 'no-such-host.invalid' is unknown here" -- launch --hostfile unknown "${job[@]}"
printf '#!/bin/sh\necho "ssh: connect to host $1 port 22: Connection refused" >&2\nexit 255\n' >deadssh
chmod +x deadssh
printf '192.0.2.77 slots=1\n' >dead
OMPI_MCA_plm_rsh_agent=$tmp/deadssh expect unreachable \
  "launch: dead line 1: cannot reach host '192.0.2.77' ($tmp/deadssh 192.0.2.77 true exited with status 255)" -- \
  launch --hostfile dead "${job[@]}"
printf 'localhost cpus=2\n' >syntax
expect syntax "launch: syntax line 1: 'cpus=2' is not Open MPI's hostfile syntax (host slots=N)" -- launch --hostfile syntax "${job[@]}"
printf 'localhost slots=0\n' >zero
expect zero_slots "launch: zero line 1: slots must be a whole number >= 1, not '0'" -- launch --hostfile zero "${job[@]}"
expect slots "launch: --hosts: --nproc-per-node 3 is more than host 'localhost''s 2 slot(s) (add --oversubscribe" -- \
  launch --hosts localhost:2 --nproc-per-node 3 "${job[@]}"
expect twice "launch: --hosts: host 'localhost' is named twice" -- launch --hosts localhost:1,localhost:1 "${job[@]}"
expect min_nodes "launch: --min-nodes must be from 1 to the 1 host(s) given, not 2" -- launch --hosts localhost:1 --min-nodes 2 "${job[@]}"
expect min_nodes_one_host "launch: --min-nodes is for several hosts (--hosts or --hostfile)" -- \
  launch --nproc-per-node 1 --min-nodes 1 "${job[@]}"
expect host_wait "launch: --host-wait must be >= 0 seconds, not -1" -- launch --hosts localhost:1 --host-wait -1 "${job[@]}"
expect both "launch: --hosts and --hostfile: give one of them, not both" -- launch --hosts localhost:1 --hostfile zero "${job[@]}"
# With --oversubscribe the same runs: 3 ranks on localhost's 2 slots, each line "[rank R localhost]".
"$coil" launch --hosts localhost:2 --nproc-per-node 3 --oversubscribe -- /bin/echo hello >over.log 2>&1 ||
  fail "--oversubscribe: $(tail -2 over.log)"
[ "$(grep -c '^\[rank [0-2] localhost\] hello$' over.log)" -eq 3 ] || fail "--oversubscribe: not 3 prefixed lines: $(cat over.log)"

# A run_dir rank 1 does not see: rank 1 in a mount namespace of its own, an empty tmpfs on run/.
if [ "$(id -u)" -eq 0 ] && unshare --mount true 2>/dev/null; then
  python3 "$here/tiny_corpus.py" c.jsonl
  "$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
  "$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
  args=(pretrain --config /dev/null --set data.train=shards --set data.tokenizer=tok.model --set model.d_model=32
    --set model.n_layer=2 --set train.seq_len=32 --set train.global_batch_size=2 --set train.micro_batch_size=1
    --set train.max_steps=2 --set train.eval_interval=0 --set train.threads=1 --set train.device=cpu
    --set train.run_dir="$tmp/run")
  mkdir run
  mpirun --oversubscribe --bind-to none -np 1 "$coil" "${args[@]}" : -np 1 unshare --mount sh -c \
    'mount -t tmpfs none "$0" && exec "$@"' "$tmp/run" "$coil" "${args[@]}" >private.log 2>&1
  rc=$?
  [ $rc -ne 0 ] || fail "a run_dir rank 1 does not see: exit 0"
  [ "$(grep -c "coil: error: rank 0: train.run_dir $tmp/run is not shared by all ranks: rank 1 on host $(hostname) does not see the file rank 0 ($(hostname)) wrote there" private.log)" -eq 1 ] ||
    fail "a run_dir rank 1 does not see: no one error naming rank 1 and its host: $(grep -m2 error private.log)"
  grep -q "step 1/" private.log && fail "a run_dir rank 1 does not see: it trained"
  [ -e run/metrics.jsonl ] && fail "a run_dir rank 1 does not see: metrics were written"
  # The same two ranks sharing run_dir train (the check passes and removes its file).
  mpirun --oversubscribe --bind-to none -np 2 "$coil" "${args[@]}" --set train.run_dir="$tmp/shared" >shared.log 2>&1 ||
    fail "2 ranks sharing run_dir: $(tail -2 shared.log)"
  grep -q "pretrain: 1 node(s) x 2 rank(s) per node, 1 thread(s) per rank; $(hostname): rank 0 cpu rank 1 cpu" shared.log ||
    fail "2 ranks: no start-up line with nodes, ranks and devices: $(grep -m1 'node(s)' shared.log)"
  [ -e shared/.coil-shared-check ] && fail "the run_dir check left its file"
else
  echo "note: not root or no mount namespaces: the unshared run_dir case is not run here"
fi
[ "$failed" -eq 0 ] && echo "hosts_input: ok"
exit "$failed"
