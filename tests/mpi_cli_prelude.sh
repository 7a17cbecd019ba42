# Sourced by the tests of `coil pretrain` under mpirun on this machine (test_mpi_cli.sh,
# test_hsdp_cli.sh), with $coil and $here (the tests folder) set: works in a fresh $tmp (removed on
# exit), lets Open MPI run as root with one thread a rank, sets $mpirun (oversubscribed, unbound) and
# `fail MESSAGE` (prints it; $failed becomes 1), prepares the tiny corpus (tok.model, shards/), and
# defines `compare A B [TOL]`.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mpirun=(mpirun --oversubscribe --bind-to none)
failed=0
fail() { echo "FAIL $*"; failed=1; }

python3 "$here/tiny_corpus.py" c.jsonl
"$coil" tokenizer train --input c.jsonl --vocab-size 300 --output tok >/dev/null || fail tokenizer
"$coil" data prepare --input c.jsonl --tokenizer tok.model --output shards >/dev/null || fail prepare
compare() {  # the losses and val losses of two runs, within $3 relative (default 1e-5)
  python3 -c '
import json, sys
a, b = ([json.loads(l) for l in open(f + "/metrics.jsonl")] for f in sys.argv[1:3])
assert len(a) == len(b), (len(a), len(b))
for x, y in zip(a, b):
    k = "loss" if "loss" in x else "val_loss"
    assert x["step"] == y["step"] and abs(x[k] - y[k]) <= float(sys.argv[3]) * abs(x[k]), (x, y)' "$1" "$2" "${3:-1e-5}"
}
