#!/usr/bin/env bash
# The NCCL lookup (cmake/CoilNccl.cmake), configured alone in a throwaway CMake project (seconds, no
# LibTorch): found where it is (and says where); with the CUDA Toolkit's nccl.h and libnccl hidden
# in a mount namespace (as on a plain CUDA image, whose toolkit has no NCCL), still found, in the
# venv's nvidia-nccl wheel; with the wheel gone too, the configure fails with one line that names
# -DCOIL_NCCL=OFF; COIL_NCCL_ROOT is taken first. Skipped (exit 77) where a mount namespace cannot
# be made (not root, unshare refused) or the venv has no nvidia-nccl wheel.
#   tests/test_nccl_lookup.sh path/to/venv/python
set -u
py=${1:?usage: test_nccl_lookup.sh PYTHON}
src=$(cd "$(dirname "$0")/.." && pwd)

if [ "${COIL_NCCL_LOOKUP_INNER:-0}" != 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "skipped: a mount namespace needs root"; exit 77; }
  unshare --mount --propagation private true 2>/dev/null || { echo "skipped: unshare --mount refused"; exit 77; }
  wheel=$("$py" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)
  [ -n "$wheel" ] && [ -e "$wheel/include/nccl.h" ] ||
    { echo "skipped: $py has no nvidia-nccl wheel (scripts/setup installs torch with it)"; exit 77; }
  # Everything below runs in a mount namespace of its own: the bind mounts vanish with it.
  COIL_NCCL_LOOKUP_INNER=1 WHEEL=$wheel exec unshare --mount --propagation private "$0" "$@"
fi

tmp=$(mktemp -d)
# Clean-up never recurses into a bound original (an rm -rf there would delete the toolkit's real
# files): the mounts go first, the originals are bound read-only, their mount points are removed
# with rmdir only, and nothing is deleted while one of them is still mounted.
mounts=()
cleanup() {
  local m busy=0
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; done
  for m in "$tmp"/orig-*; do
    [ -d "$m" ] || continue
    mountpoint -q "$m" && busy=1 || rmdir "$m" || busy=1
  done
  [ $busy = 0 ] && [ "${KEEP:-0}" != 1 ] && rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
failed=0
fail() { echo "FAIL $*"; failed=1; }

mkdir -p "$tmp/probe"
cat >"$tmp/probe/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(nccl_lookup LANGUAGES CXX)
find_package(CUDAToolkit QUIET)
list(APPEND CMAKE_MODULE_PATH "$src/cmake")
include(CoilNccl)
coil_find_nccl(TRUE)
EOF
# configure NAME ARGS...: a fresh configure of the probe; its output in $tmp/NAME.log.
configure() {
  local name=$1
  shift
  rm -rf "$tmp/b-$name"
  cmake -S "$tmp/probe" -B "$tmp/b-$name" "$@" >"$tmp/$name.log" 2>&1
}
# The line the module prints: "NCCL 2.x.y: <library>, headers <dir> (from <where>)".
found_line() { grep -o 'NCCL [0-9.]*: .*' "$tmp/$1.log"; }

# 1. As the machine is.
configure plain -DCOIL_PYTHON="$py" || { cat "$tmp/plain.log"; fail "plain: the configure failed"; exit 1; }
line=$(found_line plain)
echo "as the machine is: $line"
lib=$(echo "$line" | sed 's/^NCCL [0-9.]*: \(.*\), headers .*/\1/')
inc=$(echo "$line" | sed 's/.*, headers \(.*\) (from .*/\1/')
[ -e "$lib" ] && [ -e "$inc/nccl.h" ] || fail "plain: '$lib' or '$inc/nccl.h' does not exist: $line"

# hide DIR PATTERN: DIR, in this namespace, without its entries named PATTERN. The original is bound
# at $tmp/orig-N first, so that the links of the stand-in folder lead to it and not to themselves.
n=0
hide() {
  local dir
  dir=$(realpath "$1")
  n=$((n + 1))
  mkdir -p "$tmp/orig-$n" "$tmp/shadow-$n"
  mount --bind "$dir" "$tmp/orig-$n" || { echo "skipped: mount --bind refused"; exit 77; }
  mounts=("$tmp/orig-$n" "${mounts[@]}")
  mount -o remount,bind,ro "$tmp/orig-$n" || { echo "FAIL cannot make the bound original read-only"; exit 1; }
  for e in "$tmp/orig-$n"/* "$tmp/orig-$n"/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    case ${e##*/} in $2) continue ;; esac
    ln -s "$e" "$tmp/shadow-$n/${e##*/}"
  done
  mount --bind "$tmp/shadow-$n" "$dir"
  mounts=("$dir" "${mounts[@]}")
}

# 2. The toolkit's (or wherever it was found) NCCL hidden: the wheel's is found.
if [[ $line != *"(from the venv's nvidia-nccl wheel)"* ]]; then
  hide "$inc" 'nccl*'
  hide "$(dirname "$lib")" 'libnccl*'
  [ -e "$inc/nccl.h" ] && fail "hiding: $inc/nccl.h is still visible"
  [ -e "$(dirname "$inc")" ] || fail "hiding: $(dirname "$inc") vanished"
fi
configure hidden -DCOIL_PYTHON="$py" || { cat "$tmp/hidden.log"; fail "hidden: the configure failed"; }
line=$(found_line hidden)
echo "toolkit's NCCL hidden: $line"
[[ $line == *"$WHEEL/lib/libnccl.so"*"(from the venv's nvidia-nccl wheel)" ]] ||
  fail "hidden: expected the wheel's NCCL ($WHEEL), got: $line"

# 3. COIL_NCCL_ROOT comes first.
configure root -DCOIL_PYTHON="$py" -DCOIL_NCCL_ROOT="$WHEEL" || fail "root: the configure failed"
[[ $(found_line root) == *"(from COIL_NCCL_ROOT $WHEEL)" ]] || fail "root: $(found_line root)"

# 4. No wheel either (a python without it): one line naming -DCOIL_NCCL=OFF, the configure fails.
printf '#!/bin/sh\nexit 1\n' >"$tmp/python-without-nccl"
chmod +x "$tmp/python-without-nccl"
if [ -e /usr/include/nccl.h ]; then
  echo "the system has NCCL (/usr/include/nccl.h): the not-found case is not checked here"
elif configure none -DCOIL_PYTHON="$tmp/python-without-nccl"; then
  fail "none: the configure succeeded without NCCL: $(found_line none)"
else
  msg=$(grep -A1 'CMake Error' "$tmp/none.log" | grep 'NCCL not found')
  echo "nowhere: $msg"
  [ "$(echo "$msg" | wc -l)" = 1 ] && [[ $msg == *"-DCOIL_NCCL=OFF"* ]] && [[ $msg == *"the CUDA Toolkit"* ]] &&
    [[ $msg == *"none in $tmp/python-without-nccl"* ]] || { cat "$tmp/none.log"; fail "none: the message is not one line naming -DCOIL_NCCL=OFF"; }
fi

[ $failed = 0 ] && echo "PASS the NCCL lookup"
exit $failed
