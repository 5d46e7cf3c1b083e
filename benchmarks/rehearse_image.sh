#!/usr/bin/env bash
# Rehearses a GPU visit on the CPU with the GPU image's versions: Python 3.12, jax/jaxlib 0.11.2,
# numpy 2.5.2, torch 2.11.0, flax 0.12.10, optax, orbax-checkpoint, timm and the others known
# (benchmarks/gpu_image.py IMAGE_VERSIONS: a session's pip list and what the first visit printed),
# the image's other packages at their newest compatible versions, no TensorFlow, and the wheels
# of .whl/ installed on top, as the visit installs them. What gpu_image.py's simulation cannot show
# (it runs this machine's versions) shows here: an API that changed between jax 0.10 and 0.11, a
# package the code needs that only TensorFlow brought.
#
#   bash benchmarks/rehearse_image.sh VENV dry OUTDIR        # gpu_check.sh OUTDIR --tiny in it
#   bash benchmarks/rehearse_image.sh VENV pytest [ARGS]     # the test suite (or ARGS) in it
#
# VENV is created on first use with $PYTHON312 (default: python3.12, else pyenv's installed 3.12),
# about 6 GiB: torch's CUDA wheels come along, unused on a CPU. .whl/ is fetched first if missing
# (benchmarks/fetch_gpu_wheels.sh).
set -euo pipefail
if [[ $# -lt 2 || ( "$2" != dry && "$2" != pytest ) || ( "$2" == dry && $# -lt 3 ) ]]; then
  echo "usage: bash benchmarks/rehearse_image.sh VENV dry OUTDIR | VENV pytest [ARGS]" >&2
  exit 2
fi
VENV=$1
MODE=$2
shift 2
cd "$(dirname "$0")/.."
if ! compgen -G ".whl/*.whl" > /dev/null; then
  bash benchmarks/fetch_gpu_wheels.sh
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  if [[ -z "${PYTHON312:-}" ]]; then
    PYTHON312=python3.12
    # Under pyenv, `python3.12` is a shim that refuses to run unless 3.12 is a selected
    # version: take an installed 3.12 directly.
    if ! "$PYTHON312" -c "" 2> /dev/null && command -v pyenv > /dev/null; then
      PYTHON312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2> /dev/null | tail -1 || true)
    fi
  fi
  if [[ -z "$PYTHON312" ]] || ! "$PYTHON312" -c "" 2> /dev/null; then
    echo "rehearse_image: no working Python 3.12 (PYTHON312=${PYTHON312:-}); set PYTHON312" >&2
    exit 1
  fi
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  REQS=$(mktemp)
  "$VENV/bin/python" -m pip install -q packaging
  "$VENV/bin/python" -m benchmarks.gpu_image rehearsal-requirements .whl > "$REQS"
  echo "rehearse_image: installing into $VENV: $(tr '\n' ' ' < "$REQS")"
  "$VENV/bin/python" -m pip install -q -r "$REQS"
  rm -f "$REQS"
fi
"$VENV/bin/python" -m pip install -q --no-index --no-deps .whl/*.whl
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, importlib.util, sys
versions = {n: md.version(n) for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                        "numpy", "torch")}
print(f"rehearse_image: Python {sys.version.split()[0]}, "
      + ", ".join(f"{k} {v}" for k, v in versions.items())
      + f"; tensorflow {'PRESENT' if importlib.util.find_spec('tensorflow') else 'absent'}")
PY
if [[ "$MODE" == dry ]]; then
  PYTHON="$VENV/bin/python" JAX_PLATFORMS=cpu bash benchmarks/gpu_check.sh "$1" --tiny "${@:2}"
else
  JAX_PLATFORMS=cpu "$VENV/bin/python" -m pytest -q "${@:-tests}"
fi
