# Sourced by scripts/setup and scripts/build: where the shared, per-machine state lives.
COIL_CACHE=${COIL_CACHE:-$HOME/.cache/coil}
TORCH_VERSION=2.11.0
VENV=$COIL_CACHE/venv-torch$TORCH_VERSION
# Where NVIDIA's nvcc wheel puts the compiler, for machines without a CUDA Toolkit.
venv_nvcc() { compgen -G "$VENV/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; }
