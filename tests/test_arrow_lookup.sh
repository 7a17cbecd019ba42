#!/usr/bin/env bash
# The Arrow/Parquet lookup (cmake/CoilArrow.cmake), configured alone in a throwaway CMake project (no
# LibTorch): found in the venv's pyarrow by default and says so; COIL_ARROW_ROOT is taken first (a
# prefix made of links to the wheel's folders) and one that holds no Arrow is a one-line configure
# error; a build of the other C++ ABI (-D_GLIBCXX_USE_CXX11_ABI=0) is refused; with no Arrow at all
# (a Python without pyarrow) AUTO configures without Parquet and warns, ON fails naming
# -DCOIL_PARQUET=OFF, and OFF does not look. A program linked against what was found runs without
# LD_LIBRARY_PATH (RUNPATH). Skipped (exit 77) when the venv has no pyarrow.
#   tests/test_arrow_lookup.sh path/to/venv/python
set -u
py=${1:?usage: test_arrow_lookup.sh PYTHON}
src=$(cd "$(dirname "$0")/.." && pwd)
"$py" -c 'import pyarrow' 2>/dev/null || { echo "skipped: $py has no pyarrow"; exit 77; }
inc=$("$py" -c 'import pyarrow; print(pyarrow.get_include())')
libdir=$("$py" -c 'import pyarrow; print(pyarrow.get_library_dirs()[0])')

tmp=$(mktemp -d)
cleanup() {
  # The prefix's two links go first, by name, so nothing below ever reaches into the wheel.
  rm -f "$tmp/prefix/include" "$tmp/prefix/lib"
  [ "${KEEP:-0}" = 1 ] || rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
failed=0
fail() { echo "FAIL $*"; failed=1; }

mkdir -p "$tmp/probe"
cat >"$tmp/probe/CMakeLists.txt" <<EOP
cmake_minimum_required(VERSION 3.25)
project(arrow_lookup LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 17)
list(APPEND CMAKE_MODULE_PATH "$src/cmake")
include(CoilArrow)
coil_find_arrow()
message(STATUS "probe: found=\${COIL_ARROW_FOUND} from=\${COIL_ARROW_FROM} version=\${COIL_ARROW_VERSION}")
if(COIL_ARROW_FOUND)
  add_executable(probe probe.cpp)
  set_target_properties(probe PROPERTIES CXX_STANDARD 20)
  target_link_libraries(probe PRIVATE coil::parquet)
endif()
EOP
cat >"$tmp/probe/probe.cpp" <<'EOP'
#include <arrow/api.h>
#include <cstdio>
int main() { std::printf("arrow %s\n", arrow::GetBuildInfo().version_string.c_str()); }
EOP
configure() {
  local name=$1
  shift
  rm -rf "$tmp/b-$name"
  cmake -S "$tmp/probe" -B "$tmp/b-$name" "$@" >"$tmp/$name.log" 2>&1
}
probe_line() { grep -o 'probe: .*' "$tmp/$1.log"; }
# A log with CMake's line wrapping undone, for matching whole messages.
joined() { tr '\n' ' ' <"$tmp/$1.log" | tr -s ' '; }

# 1. The venv's pyarrow, by default; the program runs with no LD_LIBRARY_PATH.
if configure venv -DCOIL_PYTHON="$py"; then
  probe_line venv | grep -q "found=TRUE from=pyarrow .* of $py version=[0-9]" || fail "venv: $(probe_line venv)"
  if cmake --build "$tmp/b-venv" >"$tmp/venv-build.log" 2>&1; then
    out=$(env -u LD_LIBRARY_PATH "$tmp/b-venv/probe") || fail "venv: the probe does not run: $out"
    [[ $out == "arrow "* ]] || fail "venv: probe printed '$out'"
  else
    fail "venv: the probe does not build (tail of $tmp/venv-build.log:) $(tail -3 "$tmp/venv-build.log")"
  fi
else
  fail "venv: configure failed: $(tail -5 "$tmp/venv.log")"
fi

# 2. COIL_ARROW_ROOT first (a prefix of links to the wheel's folders), even with a Python without pyarrow.
mkdir -p "$tmp/prefix"
ln -s "$inc" "$tmp/prefix/include"
ln -s "$libdir" "$tmp/prefix/lib"
configure root -DCOIL_PYTHON=/nonexistent -DCOIL_ARROW_ROOT="$tmp/prefix"
probe_line root | grep -q "found=TRUE from=COIL_ARROW_ROOT $tmp/prefix" || fail "root: $(probe_line root)"
if configure badroot -DCOIL_PYTHON="$py" -DCOIL_ARROW_ROOT="$tmp/nothing-here"; then
  fail "badroot: configured"
else
  joined badroot | grep -q "COIL_ARROW_ROOT=$tmp/nothing-here holds no Arrow with Parquet" ||
    fail "badroot: $(grep -m1 -A2 'CMake Error' "$tmp/badroot.log")"
fi

# 3. The other C++ ABI does not link, so the wheel is refused (AUTO: a warning, no Parquet).
configure abi -DCOIL_PYTHON="$py" -DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI=0
probe_line abi | grep -q "found=FALSE" || fail "abi: $(probe_line abi)"
joined abi | grep -q "_GLIBCXX_USE_CXX11_ABI" || fail "abi: the warning does not name the ABI"

# 4. No Arrow anywhere (unless the system has one: then it must say so).
configure none -DCOIL_PYTHON=/nonexistent
if probe_line none | grep -q "found=TRUE"; then
  probe_line none | grep -q "from=the system" || fail "none: $(probe_line none)"
else
  grep -q "Parquet: off" "$tmp/none.log" || fail "none: no warning"
  if configure on -DCOIL_PYTHON=/nonexistent -DCOIL_PARQUET=ON; then
    fail "on: configured without Arrow"
  else
    joined on | grep -q "COIL_PARQUET=ON but no usable Arrow/Parquet: .*/nonexistent.*-DCOIL_PARQUET=OFF" ||
      fail "on: $(grep -m1 -A3 'CMake Error' "$tmp/on.log")"
  fi
fi
configure off -DCOIL_PYTHON="$py" -DCOIL_PARQUET=OFF
probe_line off | grep -q "found=FALSE from=not looked for (COIL_PARQUET=OFF)" || fail "off: $(probe_line off)"

[ $failed = 0 ] && echo "arrow lookup: all cases as expected"
exit $failed
