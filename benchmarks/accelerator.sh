#!/usr/bin/env bash
# The issue-22 benchmarks on one accelerator (an H100/H200), in one go or a step at a time:
#
#     bash benchmarks/accelerator.sh [--official PATH/TO/flash_landmark_attention.py] [STEP ...]
#
# Steps (all, in this order, when none is named):
#   350m       the trainer's step and real loop at GPT-3 Medium (below), the MFU goal's;
#   attention  landmark training attention fwd+bwd at T = 8k (the goal's), 2k and 32k: the
#              Pallas kernel, the XLA path, jax.nn.dot_product_attention (cuDNN where it runs)
#              and dense causal XLA attention, plus the official Triton kernel when --official
#              names its file and torch + triton import (JAX does not preallocate GPU memory
#              here, so torch has room); then the Pallas kernel's tile sweep at 8k (six launches
#              at D 64 and at D 128, each beside cuDNN's);
#   125m       as 350m at GPT-3 Small.
# A trainer step: bf16, attention 'auto' (cuDNN's flash attention on a GPU), then the real loop,
# then the same step on the XLA attention as the baseline; MFU against the chip's specification
# and the matmul peak measured in the same run.
# Each step writes NAME-DEVICE.json into $RESULTS (default: $OUT where set, the lent machine's
# folder that comes back, else results/benchmarks); `python -m eval.report` puts the committed
# ones in the README. The attention step saves after every length, a trainer size after its
# train step and after its real loop ("complete": false until each ends), so one stopped by the time
# limit still returns what it measured. A failed step does not stop the next; the script exits 1 naming them.
#
# A lent machine runs one command for at most 10 minutes, and a session has 15 minutes of device
# time in all, its start included: give it `350m` first, then at once (the machine stays warm for
# 30 s between calls) `attention`, then `125m` if time is left. Each goal's measurement goes first
# within its step (the real loop before the XLA baseline; 8k before 2k and 32k, the tile sweep
# and the inference rows after them), so a time limit costs the comparisons, not the goals.
# On the lent GPU machines (no network): their image lacks some packages the benchmarks import;
# run `bash benchmarks/device_wheels.sh` on a host with the package index first and carry `.whl`:
# this script installs it into /tmp/site. The official kernel is not part of this repository:
# copy llama/ltriton/flash_landmark_attention.py of github.com/epfml/landmark-attention into a
# git-ignored folder, carry that folder and pass the file with --official.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${RESULTS:-${OUT:-results/benchmarks}}
official=()
if [[ ${1:-} == --official ]]; then
    official=(--official_kernel "$2")
    shift 2
fi
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(350m attention 125m)
for s in "${steps[@]}"; do
    case $s in
        attention|125m|350m) ;;
        *) echo "error: step '$s' is unknown; use attention, 125m or 350m" >&2; exit 2;;
    esac
done
if [[ -d .whl ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the carried .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# JAX's persistent compilation cache: a trainer size's real loop then finds the step its
# fixed-batch timing compiled (benchmarks/trainer.py makes them one program) instead of compiling
# it again, and the tile sweep finds the 8k attention rows' programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mnemax-jax-cache}
mkdir -p "$RESULTS"
failed=()
for s in "${steps[@]}"; do
    echo "== $s ($(date -u +%H:%M:%S))"
    case $s in
        attention)
            XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m benchmarks.landmark_attention --runs 10 \
                --lengths 8192,2048,32768 --out_dir "$RESULTS" "${official[@]}" \
                || failed+=("$s");;
        125m|350m)
            # JAX's pool at 95 % of the GPU, not its default 75 % (62.8 GB of a lent H100's
            # 78 GiB): the 350M step with the XLA attention, the baseline beside cuDNN's, needs
            # 61.6 GB (results/dryrun/lm-350m-h100.json). Should it still fail, its error is
            # recorded and the run kept.
            XLA_PYTHON_CLIENT_MEM_FRACTION=.95 $PY -m benchmarks.trainer --size "$s" --devices 0 \
                --steps 10 --loop-steps 40 --log-every 10 --checkpoint-every 20 \
                --out "$RESULTS" || failed+=("$s");;
    esac
done
echo "== done ($(date -u +%H:%M:%S))"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "error: failed steps: ${failed[*]}" >&2
    exit 1
fi
