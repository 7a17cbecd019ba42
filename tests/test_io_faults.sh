#!/usr/bin/env bash
# Failing I/O during a run, on real file systems in a private mount namespace (root only; exit 77,
# skipped, where not root or where mounting is refused):
#   - a full disk (a 3 MB tmpfs as run_dir, a checkpoint every step), sync and async saves: the
#     saves that do not fit are warnings and training goes on, the final one fails with exit 1;
#   - a stop signal whose checkpoint does not fit: exit 1;
#   - a read-only run_dir (nothing can start: exit 1), and a read-only checkpoints/ folder (every
#     save a warning, exit 1 at the end);
#   - a rename that the file system refuses: the step folders step-N that a save renames its
#     step-N.tmp onto are made mount points while the run is stopped (SIGSTOP), so rename(2)
#     fails with EBUSY ("Device or resource busy"), one of them the final step's.
#   - a full ext2 disk (a loop device): no space can be reserved, HDF5's own writes fail;
#   - coil ckpt consolidate onto a full disk.
# Each time: no crash (exit status 1, never a signal), no HDF5 error stack, every stderr line a
# one-line Coil warning or error that names the file and the system's reason, no .tmp left, and
# `latest` still verifies (coil ckpt verify).
#   tests/test_io_faults.sh path/to/coil
set -u
coil=$(readlink -f "$1")
[ "$(id -u)" -eq 0 ] || { echo "skipped: needs root (mount)"; exit 77; }
if [ -z "${COIL_IO_FAULTS_NS:-}" ]; then
  # Every mount below lives in this private namespace and disappears with it.
  unshare -m --propagation private true 2>/dev/null || { echo "skipped: unshare -m refused"; exit 77; }
  COIL_IO_FAULTS_NS=1 exec unshare -m --propagation private "$0" "$@"
fi
tmp=$(mktemp -d)
cleanup() {
  # Unmount everything under $tmp (innermost first), and delete only once nothing is mounted there.
  findmnt -rn -o TARGET | grep -F "$tmp/" | sort -r | while read -r m; do umount -l "$m"; done
  if findmnt -rn -o TARGET | grep -qF "$tmp/"; then
    echo "not deleting $tmp: something is still mounted inside"
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
mkdir "$tmp/probe"
mount -t tmpfs -o size=1m tmpfs "$tmp/probe" 2>/dev/null || { echo "skipped: mount refused"; exit 77; }
umount "$tmp/probe" && rmdir "$tmp/probe"
passed=0 failed=0
pass() { passed=$((passed + 1)); }
flunk() { failed=$((failed + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && cat "$2"; }

# A tokenizer and a prepared data set, on the ordinary disk.
for f in /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0; do
  python3 -c 'import json,sys; [print(json.dumps({"text": p})) for p in open(sys.argv[1]).read().split("\n\n") if p.strip()]' \
    "$f" >"$tmp/c$(basename "$f").jsonl"
done
"$coil" tokenizer train --input "$tmp/c*.jsonl" --vocab-size 500 --model-type bpe --output "$tmp/tok" --threads 2 >/dev/null &&
  "$coil" data prepare --input "$tmp/c*.jsonl" --tokenizer "$tmp/tok.model" --output "$tmp/data" --threads 1 >/dev/null ||
  { echo "FAIL setup"; exit 1; }
args=(--config /dev/null --set "data.train=$tmp/data" --set "data.tokenizer=$tmp/tok.model" --set train.seq_len=32
  --set train.global_batch_size=2 --set train.micro_batch_size=1 --set train.checkpoint_interval=1
  --set train.threads=1 --set train.device=cpu)

# check NAME RC WANT_RC ERR_FILE FINAL_NEEDLE WARN_NEEDLE CKPT_DIR
#   exit status; the last stderr line is "coil: error: ..." containing FINAL_NEEDLE; every other
#   line a "coil: warning: ..."; some warning contains WARN_NEEDLE (unless empty); no HDF5 text;
#   no .tmp left; latest verifies (when CKPT_DIR is given).
check() {
  local name=$1 rc=$2 want_rc=$3 err=$4 final=$5 warn=$6 dir=${7:-}
  if [ "$rc" -ne "$want_rc" ]; then flunk "$name: exit $rc, want $want_rc" "$err"; return; fi
  # (the paths' own $tmp left out: mktemp's random name may hold "H5" and a capital)
  if sed "s|$tmp|TMP|g" "$err" | grep -qE 'HDF5|H5[A-Z]|#0[0-9][0-9]:'; then flunk "$name: HDF5 talks on stderr" "$err"; return; fi
  if [ "$want_rc" -ne 0 ] && ! tail -n 1 "$err" | grep -q "^coil: error: .*$final"; then
    flunk "$name: the last line is not the error naming '$final'" "$err"; return
  fi
  if [ "$(grep -vc '^coil: warning: ' <(head -n -1 "$err"))" -ne 0 ]; then flunk "$name: a line that is no warning" "$err"; return; fi
  if [ -n "$warn" ] && ! grep -q "^coil: warning: .*$warn" "$err"; then flunk "$name: no warning naming '$warn'" "$err"; return; fi
  if [ -n "$dir" ]; then
    if ls -d "$dir"/*.tmp >/dev/null 2>&1; then flunk "$name: a .tmp is left"; ls "$dir"; return; fi
    if ! "$coil" ckpt verify "$dir/latest" >"$tmp/verify" 2>&1 || ! grep -q intact "$tmp/verify"; then
      flunk "$name: latest does not verify" "$tmp/verify"; return
    fi
  fi
  pass
}

# ---- A full disk: 3 MB hold two checkpoints of this model, not eight. ----
for async in false true; do
  m=$tmp/full-$async
  mkdir "$m" && mount -t tmpfs -o size=3m tmpfs "$m"
  "$coil" pretrain "${args[@]}" --set train.max_steps=8 --set train.async_checkpoint=$async --set "train.run_dir=$m/run" \
    >"$tmp/out" 2>"$tmp/err"
  rc=$?
  check "full_disk_async_$async" $rc 1 "$tmp/err" \
    "final checkpoint could not be saved (rank 0: $m/run/checkpoints/step-00000008.tmp/rank-00000-of-00001.h5: .*No space left on device)" \
    "step-0000000[0-9].tmp/rank-00000-of-00001.h5: .*No space left on device); the next checkpoint saves again" \
    "$m/run/checkpoints"
  grep -q "step 8/8" "$tmp/out" && pass || flunk "full_disk_async_$async: training did not go on to step 8" "$tmp/out"
  if [ $async = false ]; then  # coil ckpt consolidate onto a disk too small for it: one line, nothing left
    mkdir "$tmp/small" && mount -t tmpfs -o size=600k tmpfs "$tmp/small"
    "$coil" ckpt consolidate "$m/run/checkpoints/latest" "$tmp/small/one.h5" >"$tmp/out" 2>"$tmp/err"
    check consolidate_full_disk $? 1 "$tmp/err" "$tmp/small/one.h5.tmp: cannot reserve [0-9]* bytes for it: No space left on device" ""
    [ -z "$(ls -A "$tmp/small")" ] && pass || flunk "consolidate_full_disk: left $(ls "$tmp/small")"
    umount "$tmp/small" && rmdir "$tmp/small"
  fi
  umount "$m" && rmdir "$m"
done

# ---- Disks that fill at other moments of a save (before the fix, these sizes ended in a
# segmentation fault at exit: HDF5 kept a file whose metadata flush had failed). ----
for kb in 1148 1888 2924; do
  m=$tmp/full-$kb
  mkdir "$m" && mount -t tmpfs -o size=${kb}k tmpfs "$m"
  "$coil" pretrain "${args[@]}" --set train.max_steps=5 --set "train.run_dir=$m/run" >"$tmp/out" 2>"$tmp/err"
  check "full_disk_${kb}k" $? 1 "$tmp/err" "final checkpoint could not be saved (.*No space left on device)" "" \
    "$(ls -d "$m/run/checkpoints/latest" >/dev/null 2>&1 && echo "$m/run/checkpoints")"
  umount "$m" && rmdir "$m"
done

# ---- A full disk that cannot reserve space (ext2 has no fallocate): HDF5's own writes fail, and
# the message names the tensor; the files HDF5 could not close are dropped without a crash.
# Skipped where loop devices cannot be used. ----
if truncate -s 3M "$tmp/ext2.img" && mkfs.ext2 -q -F "$tmp/ext2.img" >/dev/null 2>&1 && mkdir "$tmp/ext2" &&
  mount -o loop "$tmp/ext2.img" "$tmp/ext2" 2>/dev/null; then
  for async in false true; do
    r=$tmp/ext2/run-$async
    "$coil" pretrain "${args[@]}" --set train.max_steps=8 --set train.async_checkpoint=$async --set "train.run_dir=$r" \
      >"$tmp/out" 2>"$tmp/err"
    check "ext2_full_async_$async" $? 1 "$tmp/err" "final checkpoint could not be saved (.*No space left on device)" \
      "rank-00000-of-00001.h5: writing \(model\|optimizer\)/[^ ]* failed: No space left on device" "$r/checkpoints"
    rm -rf "$r"
  done
  umount "$tmp/ext2" && rmdir "$tmp/ext2"
else
  echo "ext2 part skipped: no loop device"
fi
rm -f "$tmp/ext2.img"

# ---- A stop signal whose checkpoint does not fit: exit 1, not 0. ----
m=$tmp/full-stop
mkdir "$m" && mount -t tmpfs -o size=3m tmpfs "$m"
: >"$tmp/err"  # emptied first: the loop below must not find the previous run's warning
"$coil" pretrain "${args[@]}" --set train.max_steps=100000 --set train.async_checkpoint=true --set "train.run_dir=$m/run" \
  >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 1200); do grep -q "was not saved" "$tmp/err" && break; sleep 0.05; done
kill -TERM $pid
wait $pid
check full_disk_stop $? 1 "$tmp/err" "on a signal, and its checkpoint could not be saved (rank 0: .*No space left on device)" \
  "No space left on device" "$m/run/checkpoints"
umount "$m" && rmdir "$m"

# ---- A read-only run_dir: the run cannot start; one line, exit 1. ----
m=$tmp/ro
mkdir "$m" && mount -t tmpfs -o size=8m tmpfs "$m" && mount -o remount,ro "$m"
"$coil" pretrain "${args[@]}" --set train.max_steps=2 --set "train.run_dir=$m/run" >"$tmp/out" 2>"$tmp/err"
check read_only_run_dir $? 1 "$tmp/err" "train.run_dir: cannot create $m/run: Read-only file system" ""
[ "$(wc -l <"$tmp/err")" -eq 1 ] && pass || flunk "read_only_run_dir: not one line" "$tmp/err"
umount "$m" && rmdir "$m"

# ---- A read-only checkpoints folder: every save a warning, training goes on, exit 1 at the end. ----
for async in false true; do
  r=$tmp/ro-ckpt-$async
  mkdir -p "$r/checkpoints" && mount -t tmpfs -o size=8m,ro tmpfs "$r/checkpoints"
  "$coil" pretrain "${args[@]}" --set train.max_steps=3 --set train.async_checkpoint=$async --set "train.run_dir=$r" \
    >"$tmp/out" 2>"$tmp/err"
  check "read_only_checkpoints_async_$async" $? 1 "$tmp/err" \
    "final checkpoint could not be saved (rank 0: cannot create $r/checkpoints/step-00000003.tmp: Read-only file system)" \
    "(rank 0: cannot create $r/checkpoints/step-00000001.tmp: Read-only file system); the next checkpoint saves again"
  grep -q "step 3/3" "$tmp/out" && pass || flunk "read_only_checkpoints_async_$async: training did not go on" "$tmp/out"
  umount "$r/checkpoints"
done

# ---- A refused rename: step-00000030 and step-00000040 (the final one) are mount points. ----
for async in false true; do
  m=$tmp/rename-$async
  mkdir "$m" && mount -t tmpfs -o size=200m tmpfs "$m"
  ck=$m/run/checkpoints
  "$coil" pretrain "${args[@]}" --set train.max_steps=40 --set train.keep_last_k=0 --set train.async_checkpoint=$async \
    --set "train.run_dir=$m/run" >"$tmp/out" 2>"$tmp/err" &
  pid=$!
  for _ in $(seq 1200); do [ -e "$ck/step-00000001" ] && break; sleep 0.01; done
  kill -STOP $pid
  if [ -e "$ck/step-00000029" ]; then
    kill -CONT $pid; wait $pid
    flunk "rename_async_$async: the run was past step 29 before it could be stopped"
  else
    for s in 30 40; do mkdir "$ck/step-000000$s" && mount -t tmpfs -o size=1m tmpfs "$ck/step-000000$s"; done
    kill -CONT $pid
    wait $pid
    check "rename_async_$async" $? 1 "$tmp/err" \
      "final checkpoint could not be saved (cannot rename $ck/step-00000040 to $ck/step-00000040.old: Device or resource busy)" \
      "checkpoint step-00000030 was not saved (cannot rename $ck/step-00000030 to $ck/step-00000030.old: Device or resource busy)" \
      "$ck"
    [ "$(readlink "$ck/latest")" = step-00000039 ] && pass || flunk "rename_async_$async: latest is $(readlink "$ck/latest")"
    for s in 30 40; do umount "$ck/step-000000$s"; done
  fi
  umount "$m" && rmdir "$m"
done

echo "test_io_faults: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
