#!/usr/bin/env bash
# One-shot GPU check (issue 10) for a lent H100/H200: under 8 minutes, one report file.
#
#   bash scripts/gpu_check.sh OUT_FOLDER [--only STEP ...]   (OUT_FOLDER gets gpu_check.md)
#
# The device machine has CuPy, PyTorch, numpy, mpi4py, pytest but no network: the wheels it
# lacks (nvidia-cudnn-frontend, lmdb, mlxtend for the demo) travel in .whl/ at the project root,
# fetched beforehand with  bash ../shared/gpu/fetch-wheels.sh mlxtend  (see ../shared/gpu/README.md),
# and the `run` call names .whl in carry. The checkout goes on PYTHONPATH (no pip install -e).
# Run call: carry [".whl", "owlnet/kernels/cpu/_native.so"].
# Steps, limits and the report: scripts/gpu_check.py.
set -euo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_FOLDER}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
site=/tmp/owlnet-site
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl 2>&1 | tail -3 > "$out/wheels.log" || true
fi
# The CPU kernels are a plain C library (ctypes): carry owlnet/kernels/cpu/_native.so built
# here, or let the machine's C compiler build it.
native=owlnet/kernels/cpu
if ! compgen -G "$native/_native*.so" > /dev/null && command -v gcc > /dev/null; then
    gcc -O3 -std=c11 -ffp-contract=fast -fno-math-errno -fPIC -shared "$native/native.c" \
        -o "$native/_native.so" -lm
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec python3 scripts/gpu_check.py "$out" "${@:2}"
