#!/usr/bin/env bash
# One GPU visit in one command: install the carried wheels, then benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh OUTDIR [gpu_check.py options]     # on the GPU machine: OUTDIR=$OUT
#   bash benchmarks/gpu_check.sh /tmp/dry --tiny                   # CPU dry run (tiny shapes)
#
# The wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh) are installed with --no-deps into
# /tmp/iterfuse_site, which goes first on PYTHONPATH; without a .whl/ folder the installed
# packages are used as they are. Everything printed also goes to OUTDIR/console.log.
set -uo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--tiny] [gpu_check.py options]" >&2
  exit 2
fi
OUTDIR=$1
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
PYTHON=${PYTHON:-python3}
{
  echo "gpu_check.sh: $(date -u +%FT%TZ) on $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [[ "$PYVER" != "3.12" ]] && compgen -G ".whl/*.whl" > /dev/null; then
    echo "Python $PYVER here: the .whl/ wheels are for 3.12, using the installed packages"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    SITE=/tmp/iterfuse_site
    rm -rf "$SITE"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      echo "WARNING: installing .whl/*.whl failed; going on with the installed packages"
    fi
  else
    echo "no .whl/ folder: using the installed packages"
  fi
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
  "$PYTHON" -m benchmarks.gpu_check "$OUTDIR" "$@"
  rc=$?
  echo "gpu_check.sh: exit $rc at $(date -u +%FT%TZ)"
  exit $rc
} 2>&1 | tee "$OUTDIR/console.log"
