#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the cp312 manylinux x86_64 wheels that the GPU machine's image
# lacks (benchmarks/gpu_wheels.txt), builds a wheel where PyPI has only a source archive (pure
# Python), then checks every requirement against the image and prints the sizes.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # then: device run with carry [".whl"]
#
# The device tool carries at most 64 MiB of working tree; these wheels take about 11 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' | while read -r spec; do
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec" 2> /dev/null; then
    echo "no cp312 wheel of $spec on the index: building one from its source archive"
    "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$spec"
  fi
done
# One version per distribution: an old download of another version would break the install.
"$PYTHON" - <<'PY'
import collections, pathlib, sys
wanted = {}
for line in pathlib.Path("benchmarks/gpu_wheels.txt").read_text().splitlines():
  line = line.split("#")[0].strip()
  if line:
    name, version = line.split("==")
    wanted[name.replace("-", "_").replace(".", "_").lower()] = version
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
  name, version = wheel.name.split("-")[:2]
  if wanted.get(name.lower()) != version:
    print(f"removing {wheel.name}: not in benchmarks/gpu_wheels.txt")
    wheel.unlink()
PY
"$PYTHON" -m benchmarks.gpu_image check-wheels "$DEST"
du -sh "$DEST"
