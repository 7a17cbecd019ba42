#!/usr/bin/env bash
# The `coil` executable as a user meets it: --version, --help, and bad input answered with one
# line on stderr and a non-zero exit: 1 for bad data or files, 2 for a bad command line (never a
# crash: exit codes above 128 are signals).
#   tests/test_cli.sh path/to/coil
set -u
coil=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

# expect NAME WANT_RC STDERR_SUBSTRING -- ARGS...
expect() {
  local name=$1 want_rc=$2 needle=$3
  shift 4
  "$coil" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -eq "$want_rc" ] && grep -qF -- "$needle" "$tmp/out" "$tmp/err"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL $name: exit $rc (want $want_rc), output:"; cat "$tmp/out" "$tmp/err"
  fi
  if [ "$want_rc" -ne 0 ] && [ "$(wc -l <"$tmp/err")" -ne 1 ]; then
    failed=$((failed + 1)); echo "FAIL $name: error is not one line"; cat "$tmp/err"
  fi
}

expect version 0 "coil 0.1.0" -- --version
expect help 0 "Subcommands:" -- --help
expect model_help 0 "--smoke-steps" -- model --help
expect unknown_preset 1 "unknown model preset '7b' (known: tiny, 130m" -- model --preset 7b
expect missing_dir 1 "/nonexistent/config.json: cannot open" -- model --hf /nonexistent
mkdir -p "$tmp/hf"
echo '{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}' >"$tmp/hf/config.json"
head -c 5 /dev/zero >"$tmp/hf/model.safetensors"
expect truncated 1 "model.safetensors: truncated safetensors file (5 bytes, no header)" -- model --hf "$tmp/hf"
echo '{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 0}' >"$tmp/hf/config.json"
expect bad_config 1 "config.json: model config: vocab_size must be positive, got 0" -- model --hf "$tmp/hf"
expect bad_option 2 "coil: error: Could not convert: --batch = x" -- model --smoke-steps 1 --batch x
expect no_command 2 "coil: error: A subcommand is required" --
expect unknown_command 2 "coil: error: unknown command 'bogus' (commands: model" -- bogus
expect smoke 0 "smoke run ok" -- model --preset tiny --smoke-steps 3 --seq-len 32

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
