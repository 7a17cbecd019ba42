#!/usr/bin/env bash
# `coil pretrain` under mpirun: 3 ranks log the same losses as 1 process (within 1e-5 relative),
# a 3-rank checkpoint resumes on 2 ranks to the same losses, checkpoints saved on N ranks resume
# on M (every N, M in 1..4), SIGUSR1 stops a run with a checkpoint, two identical 2-rank runs write
# byte-identical rank files, and ranks started with different configurations stop at once with a
# non-zero exit.
#   tests/test_mpi_cli.sh path/to/coil
set -u
coil=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
source "$here/mpi_cli_prelude.sh"  # $tmp (the working folder), $mpirun, fail, tok.model, shards/, compare
args=(--config /dev/null --set data.train=shards --set data.val=shards --set data.tokenizer=tok.model
  --set train.seq_len=32 --set train.global_batch_size=6 --set train.micro_batch_size=1 --set train.max_steps=8
  --set train.eval_interval=4 --set train.eval_batches=2 --set train.checkpoint_interval=4 --set train.threads=1
  --set train.device=cpu)  # CPU ranks even where a GPU is visible (train.device = "auto" would take it)
"$coil" pretrain "${args[@]}" --set train.run_dir=one >one.log 2>&1 || fail "1 process: $(tail -1 one.log)"
"${mpirun[@]}" -np 3 "$coil" pretrain "${args[@]}" --set train.run_dir=three >three.log 2>&1 || fail "3 ranks: $(tail -3 three.log)"
compare one three || fail "3 ranks log other losses than 1 process"
# Mixed precision on 2 ranks (bf16 compute and gradient reduce-scatter, float32 master shards)
# tracks the float32 run within 1%.
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=bf16 --set train.dtype=bfloat16 \
  --set train.reduce_dtype=bfloat16 >bf16.log 2>&1 || fail "bf16 on 2 ranks: $(tail -3 bf16.log)"
compare one bf16 0.01 || fail "bf16 on 2 ranks does not track float32 within 1%"
grep -q "compute bfloat16, master weights and optimizer state float32, gradient reduce-scatter bfloat16" bf16.log ||
  fail "the bf16 run does not say its precision"
# float16 compute with dynamic loss scaling on 2 ranks (FSDP) tracks the float32 run within 1%.
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=fp16 --set train.dtype=float16 \
  >fp16.log 2>&1 || fail "float16 on 2 ranks: $(tail -3 fp16.log)"
grep -q "compute float16 with dynamic loss scaling (scale 65536, doubled after 2000 finite steps)" fp16.log ||
  fail "float16 on 2 ranks: the start-up line does not say float16 with loss scaling"
compare one fp16 0.01 || fail "float16 on 2 ranks does not track float32 within 1%"
# back_to_step4 RUN: the run's checkpoints after step 4 removed, latest pointing at step 4.
back_to_step4() { rm -rf "$1/checkpoints/step-00000008" "$1/checkpoints/final" && ln -sfn step-00000004 "$1/checkpoints/latest"; }
# Back to step 4 of the 3-rank run, resumed on 2 ranks.
back_to_step4 three
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=three --resume >resume.log 2>&1 ||
  fail "resume on 2 ranks: $(tail -3 resume.log)"
grep -q "resuming" resume.log || fail "the 2-rank run did not resume"
compare one three || fail "the run resumed on 2 ranks logs other losses"
# ZeRO-2 (gathered weights kept for the step) gives the same losses too; so does ZeRO-3 with each
# block recomputed in backward (train.activation_checkpointing).
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=zero2 --set train.reshard_after_forward=false \
  >zero2.log 2>&1 || fail "ZeRO-2 on 2 ranks: $(tail -3 zero2.log)"
compare one zero2 || fail "ZeRO-2 on 2 ranks logs other losses than 1 process"
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=ckpt --set train.activation_checkpointing=full \
  >ckpt.log 2>&1 || fail "activation checkpointing on 2 ranks: $(tail -3 ckpt.log)"
compare one ckpt || fail "activation checkpointing on 2 ranks logs other losses than 1 process"
# stop_and_resume RUN ARGS...: RUN on 2 ranks; a copy of it back at step 4 resumed on 2 ranks logs
# the same losses; back at step 4 again and resumed on 3 ranks (from the 2 ranks' positions), it
# runs to its end.
stop_and_resume() {
  local run=$1
  shift
  "${mpirun[@]}" -np 2 "$coil" pretrain "$@" --set train.run_dir=$run >$run.log 2>&1 || fail "$run: $(tail -3 $run.log)"
  cp -r $run ${run}b
  back_to_step4 ${run}b
  "${mpirun[@]}" -np 2 "$coil" pretrain "$@" --set train.run_dir=${run}b --resume >${run}b.log 2>&1 ||
    fail "$run resumed: $(tail -3 ${run}b.log)"
  compare $run ${run}b || fail "$run on 2 ranks, resumed, logs other losses"
  back_to_step4 ${run}b
  "${mpirun[@]}" -np 3 "$coil" pretrain "$@" --set train.run_dir=${run}b --resume >${run}3.log 2>&1 ||
    fail "$run resumed on 3 ranks: $(tail -3 ${run}3.log)"
  grep -q "pretrain: done, 8 steps" ${run}3.log || fail "$run resumed on 3 ranks did not finish: $(tail -3 ${run}3.log)"
}
# Streaming, and a streamed mixture (the file twice, 3:1: each part's positions merged on 3 ranks).
stop_and_resume s2 "${args[@]}" --set data.streaming=true --set data.train=c.jsonl
stop_and_resume m2 "${args[@]}" --set data.streaming=true --set "data.train=c.jsonl, ./c.jsonl" --set data.train_weights=3,1
grep -q "pretrain: part 1 ./c.jsonl: 25.00% of the rows (1 file(s), streamed)" m2.log || fail "the streamed mixture does not name its parts"
# The single stream back at step 4, resumed as a streamed mixture that it is part 0 of; the mixture
# back at step 4, resumed as its part 1 alone (the rows themselves: Corpus.StreamingMixture*).
cp -r s2 s2m && back_to_step4 s2m
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set data.streaming=true --set "data.train=c.jsonl, ./c.jsonl" \
  --set data.train_weights=3,1 --set train.run_dir=s2m --resume >s2m.log 2>&1 || fail "stream -> mixture: $(tail -3 s2m.log)"
grep -q "pretrain: the data mixture changed since step 4" s2m.log && grep -q "pretrain: done, 8 steps" s2m.log ||
  fail "the single stream did not go on as a streamed mixture: $(tail -3 s2m.log)"
"$coil" ckpt inspect s2m/checkpoints/final | grep -q "part 1 ./c.jsonl: epoch 0, record " || fail "s2m: no part 1 in its state"
cp -r m2 m2s && back_to_step4 m2s
"${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set data.streaming=true --set data.train=./c.jsonl \
  --set train.run_dir=m2s --resume >m2s.log 2>&1 || fail "mixture -> stream: $(tail -3 m2s.log)"
grep -q "pretrain: done, 8 steps" m2s.log || fail "the mixture did not go on as its part alone: $(tail -3 m2s.log)"
"$coil" ckpt inspect m2s/checkpoints/final | grep -q "streaming ./c.jsonl, rank 0 of 2: epoch " || fail "m2s: not a single stream"
# Resharding: 20 steps on N ranks, resumed on M ranks for 20 more, for every N, M in 1..4: the
# losses of the uninterrupted N-rank run, bit for bit when M = N, within 1e-5 otherwise.
rargs=("${args[@]}" --set train.global_batch_size=12 --set train.max_steps=40 --set train.checkpoint_interval=20
  --set train.eval_interval=20)
fields() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d = json.loads(l); print(d["step"], repr(d.get("loss")), repr(d.get("val_loss")), repr(d.get("grad_norm")))' "$1/metrics.jsonl"; }
exact() { cmp -s <(fields "$1") <(fields "$2"); }
for n in 1 2 3 4; do
  "${mpirun[@]}" -np $n "$coil" pretrain "${rargs[@]}" --set train.run_dir=n$n >n$n.log 2>&1 || fail "40 steps on $n: $(tail -3 n$n.log)"
  for m in 1 2 3 4; do
    rm -rf r$n$m && cp -r n$n r$n$m
    rm -rf r$n$m/checkpoints/step-00000040 && ln -sfn step-00000020 r$n$m/checkpoints/latest
    "${mpirun[@]}" -np $m "$coil" pretrain "${rargs[@]}" --set train.run_dir=r$n$m >r$n$m.log 2>&1 ||
      fail "saved on $n, resumed on $m: $(tail -3 r$n$m.log)"
    grep -q "resuming .*step-00000020 (saved on $n rank(s)) at step 20" r$n$m.log || fail "saved on $n, resumed on $m: did not resume"
    if [ $n = $m ]; then exact n$n r$n$m || fail "saved and resumed on $n: not bit for bit"
    else compare n$n r$n$m || fail "saved on $n, resumed on $m: other losses"; fi
    rm -rf r$n$m
  done
done
# Each step saw the same global batch on 1, 2, 3 and 4 ranks: the logged batch hashes are equal.
hashes() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d = json.loads(l); "loss" in d and print(d["step"], d["batch_hash"])' "$1/metrics.jsonl"; }
[ "$(hashes n1 | wc -l)" -eq 40 ] || fail "batch hashes: not one per step"
for n in 2 3 4; do cmp -s <(hashes n1) <(hashes n$n) || fail "batch hashes on $n ranks differ from 1 rank's"; done
[ "$(hashes n1 | cut -d' ' -f2 | sort -u | wc -l)" -eq 40 ] || fail "batch hashes: two steps with the same hash"
# SIGUSR1 (what Slurm sends before a time limit) to mpirun: every rank finishes its step, the
# checkpoint is saved, exit 0; the run then resumes from it.
"${mpirun[@]}" -np 2 "$coil" pretrain "${rargs[@]}" --set train.max_steps=100000 --set train.run_dir=usr1 >usr1.log 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "step 3/" usr1.log 2>/dev/null && break; sleep 0.05; done
kill -USR1 $pid
wait $pid
rc=$?
[ $rc -eq 0 ] || fail "SIGUSR1: exit $rc: $(tail -3 usr1.log)"
grep -q "stopped by a signal after step" usr1.log || fail "SIGUSR1: no stop message: $(tail -3 usr1.log)"
stop_step=$(sed -n 's/.*stopped by a signal after step \([0-9]*\).*/\1/p' usr1.log)
[ -n "$stop_step" ] && [ "$(readlink usr1/checkpoints/latest)" = "$(printf 'step-%08d' "$stop_step")" ] ||
  fail "SIGUSR1: latest is not the stop step's checkpoint"
"$coil" ckpt verify usr1/checkpoints/latest >/dev/null || fail "SIGUSR1: the checkpoint does not verify"
# Two identical 2-rank runs write byte-identical rank files (each rank's CPU generator is seeded
# with train.seed + rank; HDF5 records no times); test_train's IdenticalRunsWriteIdenticalCheckpoints
# compares index.h5 too (equal but for elapsed_s).
for k in same1 same2; do
  "${mpirun[@]}" -np 2 "$coil" pretrain "${args[@]}" --set train.run_dir=same >$k.log 2>&1 || fail "$k: $(tail -3 $k.log)"
  mv same $k
done
for f in same1/checkpoints/step-0000000{4,8}/rank-*.h5; do
  cmp -s "$f" "same2/${f#same1/}" || fail "identical 2-rank runs: ${f#same1/} differs"
done
[ "$(ls same1/checkpoints/step-00000008/rank-*.h5 | wc -l)" -eq 2 ] || fail "identical 2-rank runs: not 2 rank files"
# Different configurations on different ranks: every rank stops, non-zero, quickly.
timeout 60 "${mpirun[@]}" -np 2 sh -c "exec \"$coil\" pretrain ${args[*]} --set train.run_dir=mixed --set train.seed=\$OMPI_COMM_WORLD_RANK" \
  >mixed.log 2>&1
rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "mixed configs: exit $rc"
grep -q "runs another configuration than rank" mixed.log || fail "mixed configs: no error message"
[ "$failed" -eq 0 ] && echo "mpi cli: ok"
exit "$failed"
