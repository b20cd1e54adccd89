#!/usr/bin/env bash
# Downloads, on this (networked) machine, the wheels the GPU machine's python3 (3.12, x86-64) lacks for the
# preparation: pydantic and zarr with their own needs, and datasets (imported by the tlora package). Into .whl/,
# which git ignores through .git/info/exclude; `benchmarks/gpu_check.sh` installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
py=.venv/bin/python
pins=()
for name in pydantic pydantic_core annotated-types typing-inspection zarr numcodecs donfig google-crc32c datasets dill \
            multiprocess gguf; do
  pins+=("$name==$($py -m pip show "$name" | awk '/^Version:/ {print $2}')")
done
$py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pins[@]}"
ls .whl
