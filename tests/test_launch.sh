#!/usr/bin/env bash
# `coil launch`: bad input is a one-line error and no job; 2 ranks with rank-prefixed output; a
# rank killed with SIGKILL makes the job restart from its latest checkpoint and end with the
# losses of an unbroken run; with no restarts left the launcher exits non-zero; SIGUSR1 and
# SIGTERM to the launcher reach the ranks, which save and exit 0; a hung job is ended by the
# watchdog and restarted; a job failing with a configuration or usage error (exit 2) is not restarted.
#   tests/test_launch.sh path/to/coil
set -u
coil=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export OMP_NUM_THREADS=1
passed=0 failed=0
ok() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
# A job of this test still running: an mpirun started from this test's folder (other tests, run
# alongside by ctest -j, have jobs of their own).
left_running() {
  local p
  for p in $(pgrep -f "mpirun.*--tag-output"); do
    [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$tmp" ] && return 0
  done
  return 1
}

# expect NAME WANT_RC NEEDLE -- ARGS...: the exit status, the needle in the output, one-line errors.
expect() {
  local name=$1 want=$2 needle=$3
  shift 4
  "$coil" "$@" >out 2>err
  local rc=$?
  if [ $rc -eq "$want" ] && grep -qF -- "$needle" out err && { [ "$want" -eq 0 ] || [ "$(wc -l <err)" -eq 1 ]; }; then ok
  else fail "$name: exit $rc (want $want)"; cat out err; fi
}
cores=$(getconf _NPROCESSORS_ONLN)  # (nproc would follow OMP_NUM_THREADS)
expect too_many 1 "is more than this machine's $cores cores (add --oversubscribe" -- launch --nproc-per-node $((cores + 1)) -- coil --version
expect not_found 1 "launch: command not found: no-such-program" -- launch --nproc-per-node 1 -- no-such-program
expect no_command 2 "command is required" -- launch --nproc-per-node 1
expect zero 1 "--nproc-per-node must be >= 1" -- launch --nproc-per-node 0 -- coil --version
expect bad_flag 2 "--bogus" -- launch --nproc-per-node 1 --bogus -- coil --version
left_running && fail "a job was left running"
# The ranks' environment when the user forwards variables with Open MPI's mca_base_env_list (as
# tests/sanitizer/env.sh does), which Open MPI refuses to mix with -x: the launcher's
# OMP_NUM_THREADS joins that list, and the user's variable arrives too.
threads=$((cores / 2 > 0 ? cores / 2 : 1))
COIL_PROBE=probe-value OMPI_MCA_mca_base_env_list=COIL_PROBE expect env_list 0 "" -- launch --nproc-per-node 2 -- \
  sh -c 'echo "env $OMP_NUM_THREADS $COIL_PROBE"'
[ "$(grep -cx "\[rank [01]\] env $threads probe-value" out)" -eq 2 ] && ok || { fail "env_list: the ranks' environment"; cat out err; }
# A usage or configuration error in the job (bad TOML, an unknown key, a value of the wrong type, an
# unknown flag): coil exits 2 on every rank, and the launcher does not restart it (--max-restarts 3
# notwithstanding): exit 2, one line saying so, the error itself (from a rank: MPI_Abort may cut the
# other short).
printf '[train]\nmax_steps = "ten"\n' >wrong_type.toml
printf '[train\nmax_steps = 10\n' >syntax.toml
config_error() {  # config_error NAME REGEX COIL_ARGS...
  local name=$1 needle=$2
  shift 2
  "$coil" launch --nproc-per-node 2 --max-restarts 3 -- coil "$@" >"$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 2 ] && [ "$(grep -c '^coil launch: the job failed with status 2 (a usage or configuration error): not restarting it$' "$name.log")" -eq 1 ] &&
    ! grep -q "restart [0-9] of" "$name.log" && grep -Eq "^\[rank [01]\] coil: error: (rank [01]: )?$needle" "$name.log"; then ok
  else fail "$name: exit $rc (want 2, no restart, the error from a rank)"; cat "$name.log"; fi
}
config_error wrong_type "wrong_type.toml:2: train.max_steps must be an integer" pretrain --config wrong_type.toml --set train.run_dir=r1
config_error syntax "syntax.toml:1: " pretrain --config syntax.toml --set train.run_dir=r2
config_error unknown_key "--set train.bogus=1: unknown key train.bogus" pretrain --config /dev/null --set train.bogus=1
config_error usage "The following argument was not expected: --bogus" pretrain --config /dev/null --bogus
[ -e r1 ] || [ -e r2 ] && fail "a configuration error wrote a run_dir"
left_running && fail "a job was left running"

python3 "$here/tiny_corpus.py" c.jsonl
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
args=(--config /dev/null --set data.train=shards --set data.tokenizer=tok.model --set train.seq_len=32
  --set train.global_batch_size=4 --set train.micro_batch_size=1 --set train.max_steps=150 --set train.eval_interval=0
  --set train.checkpoint_interval=5 --set train.threads=1)
losses() { python3 -c 'import json,sys; print([(m["step"], m.get("loss")) for m in map(json.loads, open(sys.argv[1]))])' "$1"; }

expect unbroken 0 "[rank 0] pretrain: done, 150 steps" -- launch --nproc-per-node 2 -- coil pretrain "${args[@]}" --set train.run_dir=a
# A rank killed twice, at two moments: two restarts, each resuming; the same losses in the end.
"$coil" launch --nproc-per-node 2 --max-restarts 3 -- coil pretrain "${args[@]}" --set train.run_dir=b >b.log 2>&1 &
launcher=$!
for kill_at in 20 60; do
  for _ in $(seq 1200); do
    [ -e b/metrics.jsonl ] && [ "$(wc -l <b/metrics.jsonl)" -ge $kill_at ] && break; sleep 0.05
  done
  mpirun_pid=$(pgrep -P $launcher -x mpirun | head -1)
  rank=$(pgrep -P "$mpirun_pid" | tail -1)
  [ -n "$rank" ] && kill -9 "$rank"
  sleep 1
done
wait $launcher
rc=$?
[ $rc -eq 0 ] && ok || { fail "killed ranks: exit $rc"; tail -5 b.log; }
[ "$(grep -c 'restart [0-9] of 3' b.log)" -eq 2 ] && ok || { fail "killed ranks: not 2 restarts"; grep 'coil launch' b.log; }
grep -q "\[rank 0\] pretrain: resuming" b.log && ok || fail "killed ranks: no resume"
[ "$(losses a/metrics.jsonl)" = "$(losses b/metrics.jsonl)" ] && ok || fail "killed and restarted: other losses"
# No restarts left: the launcher exits non-zero with the job's status.
"$coil" launch --nproc-per-node 2 -- coil pretrain "${args[@]}" --set train.run_dir=c >c.log 2>&1 &
launcher=$!
for _ in $(seq 1200); do [ -e c/metrics.jsonl ] && [ "$(wc -l <c/metrics.jsonl)" -ge 10 ] && break; sleep 0.05; done
kill -9 "$(pgrep -P "$(pgrep -P $launcher -x mpirun | head -1)" | tail -1)"
wait $launcher
rc=$?
[ $rc -ne 0 ] && grep -q "coil launch: the job failed with status" c.log && ok || { fail "no restarts: exit $rc"; tail -3 c.log; }
# Signals to the launcher reach every rank: the run saves and stops, exit 0.
for sig in USR1 TERM; do
  "$coil" launch --nproc-per-node 2 -- coil pretrain "${args[@]}" --set train.run_dir=s$sig >s$sig.log 2>&1 &
  launcher=$!
  for _ in $(seq 1200); do [ -e s$sig/metrics.jsonl ] && [ "$(wc -l <s$sig/metrics.jsonl)" -ge 10 ] && break; sleep 0.05; done
  kill -$sig $launcher
  wait $launcher
  rc=$?
  [ $rc -eq 0 ] && grep -q "\[rank 0\] pretrain: stopped by a signal after step" s$sig.log && ok ||
    { fail "SIG$sig: exit $rc"; tail -5 s$sig.log; }
done
# A hang (a reader stuck on a FIFO nobody writes): the watchdog ends the job naming the rank and
# its last operation; the launcher restarts it (it hangs again) and then gives up with its status.
mkfifo stuck.jsonl
timeout 120 "$coil" launch --nproc-per-node 2 --max-restarts 1 -- coil pretrain "${args[@]}" --set data.streaming=true \
  --set data.train=stuck.jsonl --set train.watchdog_timeout=3 --set train.run_dir=h >h.log 2>&1
rc=$?
[ $rc -eq 3 ] && ok || { fail "hang: exit $rc (want 3)"; tail -5 h.log; }
[ "$(grep -c 'no progress for 3 s (train.watchdog_timeout = 3) at step 0; last operation: waiting for the data loader' h.log)" -ge 2 ] &&
  grep -q "restart 1 of 1" h.log && ok || { fail "hang: no watchdog message or restart"; grep -E "coil" h.log; }
left_running && fail "a job was left running"
echo "launch: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
