# Sourced by scripts/build and scripts/test under COIL_SANITIZE=1: the sanitizers' run-time options,
# exported so every instrumented process gets them, however it is started (CTest, the test scripts,
# Python's subprocess, mpirun's ranks, `coil launch`'s children).
_coil_san_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# protect_shadow_gap=0: the CUDA driver maps memory where ASan's shadow gap would be (harmless on CPU).
# fast_unwind_on_malloc=0: full allocation stacks (DWARF), about 4x slower with LibTorch, but the only
# stacks that still name Open MPI's libraries after it unloads its components (lsan.supp needs them).
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:protect_shadow_gap=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:fast_unwind_on_malloc=0"
export LSAN_OPTIONS="suppressions=$_coil_san_dir/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# Open MPI's mpirun passes these to every rank (as `-x NAME` would).
export OMPI_MCA_mca_base_env_list="ASAN_OPTIONS;LSAN_OPTIONS;UBSAN_OPTIONS"
# What the tests read to scale their own waits (scripts/test --sanitize sets it too).
export COIL_SANITIZE=1
unset _coil_san_dir
