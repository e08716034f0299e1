#!/usr/bin/env bash
# The wheels that benchmarks/accelerator.sh needs on the lent GPU machines and their image lacks,
# fetched on a host that reaches the package index (the GPU machines reach nothing) into .whl/
# (git-ignored), for the image's Python 3.12 on x86-64:
#
#     bash benchmarks/device_wheels.sh        # then carry `.whl` with the run
#
# The image holds jax 0.11.2 (CUDA 13), flax, optax, orbax-checkpoint, chex, absl-py, etils,
# numpy, torch and triton; it lacks ml-collections, grain, tensorflow-datasets and the packages
# below that those import. The list was found by importing the benchmarks and running
# `benchmarks.trainer --size tiny` and `benchmarks.landmark_attention` on a CPU in a Python 3.12
# venv holding the image's versions (jax/jaxlib 0.11.2, flax 0.12.10, optax 0.2.8, numpy 2.5.2)
# and these wheels alone. Versions: constraints.txt's. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in ml_collections grain array_record portpicker tensorflow-datasets tensorflow-metadata \
            immutabledict toml tensorboardX; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt) \
        || { echo "error: $name is not pinned in constraints.txt" >&2; exit 2; }
    pins+=("$pin")
done
PY=${PY:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "${pins[@]}"
# promise (tensorflow-datasets imports it) is published as a source archive only: pure Python,
# so a wheel built here installs there.
$PY -m pip wheel -q --no-deps -w .whl "$(grep -i '^promise==' constraints.txt)"
ls .whl
