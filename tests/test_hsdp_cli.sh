#!/usr/bin/env bash
# HSDP (train.data_parallel_shard_degree x train.data_parallel_replicate_degree) under mpirun:
# 2 x 2 logs the losses of 1 process and of FSDP over 4 ranks (within 1e-5 relative); its
# checkpoints hold each row once (the second replica's rank files hold no rows) and verify; a
# chain of resumes across layouts (HSDP 2x2 -> FSDP 4 -> 1 process -> HSDP 2x2) ends with the
# parameters and losses of 1 process straight through; degrees that do not multiply to the world
# size stop with one line naming both keys.
#   tests/test_hsdp_cli.sh path/to/coil   (COIL_PYTHON: a Python with h5py and numpy)
set -u
coil=$(realpath "$1")
py=${COIL_PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/mpi_cli_prelude.sh"  # $tmp (the working folder), $mpirun, fail, tok.model, shards/, compare
args=(--config /dev/null --set data.train=shards --set data.val=shards --set data.tokenizer=tok.model
  --set train.seq_len=32 --set train.global_batch_size=8 --set train.micro_batch_size=1 --set train.max_steps=8
  --set train.eval_interval=4 --set train.eval_batches=2 --set train.checkpoint_interval=2 --set train.threads=1
  --set train.device=cpu)
hsdp=(--set train.data_parallel_shard_degree=2 --set train.data_parallel_replicate_degree=2)
params_equal() {  # the model parameters of two checkpoints, each within 1e-5 (relative norm)
  "$py" -c '
import sys, h5py, numpy as np
a, b = (h5py.File(p + "/index.h5") for p in sys.argv[1:3])
names = []
a["model"].visit(lambda n: names.append(n) if isinstance(a["model"][n], h5py.Dataset) else None)
assert names
for n in names:
    x, y = a["model"][n][()], b["model"][n][()]
    assert x.shape == y.shape and np.isfinite(x).all(), n
    assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y), (n, np.linalg.norm(x - y) / np.linalg.norm(y))' "$1" "$2"
}
"$coil" pretrain "${args[@]}" --set train.run_dir=one >one.log 2>&1 || fail "1 process: $(tail -1 one.log)"
"${mpirun[@]}" -np 4 "$coil" pretrain "${args[@]}" --set train.run_dir=f4 >f4.log 2>&1 || fail "FSDP 4: $(tail -3 f4.log)"
"${mpirun[@]}" -np 4 "$coil" pretrain "${args[@]}" "${hsdp[@]}" --set train.run_dir=h22 >h22.log 2>&1 ||
  fail "HSDP 2x2: $(tail -3 h22.log)"
grep -q "HSDP: parameters sharded over 2 rank(s), 2 replica group(s)" h22.log || fail "HSDP 2x2: no start-up line"
compare one h22 || fail "HSDP 2x2 logs other losses than 1 process"
compare f4 h22 || fail "HSDP 2x2 logs other losses than FSDP 4"
params_equal h22/checkpoints/final one/checkpoints/final || fail "HSDP 2x2: other final parameters than 1 process"
# Each row once: the first replica's ranks (0, 1) hold every row, the second's (2, 3) none.
"$coil" ckpt verify h22/checkpoints/final >/dev/null || fail "HSDP 2x2: the checkpoint does not verify"
"$py" -c '
import sys, h5py
d = sys.argv[1]
idx = h5py.File(d + "/index.h5")
assert idx.attrs["shard_degree"] == 2 and idx.attrs["world_size"] == 4
f = [h5py.File(f"{d}/rank-{r:05d}-of-00004.h5") for r in range(4)]
names = []
idx.visit(lambda n: names.append(n) if n.startswith(("model/", "optimizer/")) and isinstance(idx[n], h5py.Dataset) else None)
for n in names:
    rows = idx[n].shape[0]
    assert f[0][n].shape[0] + f[1][n].shape[0] == rows, n
    assert f[2][n].shape[0] == 0 and f[3][n].shape[0] == 0, n' h22/checkpoints/final || fail "HSDP 2x2: rows not held once"
# Across layouts: HSDP 2x2 -> (step 2) FSDP 4 -> (step 4) 1 process -> (step 6) HSDP 2x2.
back_to() {  # run dir, step: later checkpoints removed, latest points at the step's
  rm -rf "$1"/checkpoints/final && for s in 2 4 6 8; do [ $s -gt $2 ] && rm -rf "$1/checkpoints/step-0000000$s"; done
  ln -sfn "step-0000000$2" "$1/checkpoints/latest"
}
cp -r h22 chain
back_to chain 2
"${mpirun[@]}" -np 4 "$coil" pretrain "${args[@]}" --set train.run_dir=chain --resume >c1.log 2>&1 || fail "HSDP -> FSDP 4: $(tail -3 c1.log)"
back_to chain 4
"$coil" pretrain "${args[@]}" --set train.run_dir=chain --resume >c2.log 2>&1 || fail "FSDP 4 -> 1 process: $(tail -3 c2.log)"
back_to chain 6
"${mpirun[@]}" -np 4 "$coil" pretrain "${args[@]}" "${hsdp[@]}" --set train.run_dir=chain --resume >c3.log 2>&1 ||
  fail "1 process -> HSDP 2x2: $(tail -3 c3.log)"
for k in c1 c2 c3; do grep -q "resuming" $k.log || fail "$k: did not resume"; done
compare one chain || fail "the chain of layouts logs other losses than 1 process"
params_equal chain/checkpoints/final one/checkpoints/final || fail "the chain of layouts ends with other parameters"
# Bad degrees: one line naming both keys, non-zero exit.
timeout 60 "${mpirun[@]}" -np 4 "$coil" pretrain "${args[@]}" --set train.data_parallel_shard_degree=3 \
  --set train.run_dir=bad >bad.log 2>&1
rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "bad degrees: exit $rc"
grep -q "train.data_parallel_shard_degree (3) x train.data_parallel_replicate_degree (1) must equal the world size (4 ranks)" bad.log ||
  fail "bad degrees: no message: $(tail -2 bad.log)"
[ "$failed" -eq 0 ] && echo "hsdp cli: ok"
exit "$failed"
