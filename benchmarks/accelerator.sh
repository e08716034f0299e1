#!/usr/bin/env bash
# The issue-22 benchmarks on one accelerator, in one go (about 10 minutes on an H100/H200):
#
#     bash benchmarks/accelerator.sh [PATH/TO/flash_landmark_attention.py]
#
# 1. landmark training attention fwd+bwd at T = 2k / 8k / 32k: the Pallas kernel, the XLA path,
#    jax.nn.dot_product_attention (cuDNN where it runs) and dense causal XLA attention, plus the
#    official Triton kernel when its file is given and torch + triton import;
# 2. the trainer's step and real loop at GPT-3 Small and Medium (125M, 350M parameters), bf16,
#    MFU against the chip's specification and against the matmul peak measured in the same run;
#    attention 'auto' (cuDNN's flash attention on a GPU), with the same step on the XLA attention
#    timed beside it.
# Each writes results/benchmarks/NAME-DEVICE.json; `python -m eval.report` puts them in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
official=()
if [[ $# -ge 1 ]]; then official=(--official_kernel "$1"); fi
$PY -m benchmarks.landmark_attention --runs 10 "${official[@]}"
$PY -m benchmarks.trainer --size 125m --devices 0 --steps 10 --loop-steps 40 --log-every 10 \
    --checkpoint-every 20
$PY -m benchmarks.trainer --size 350m --devices 0 --steps 10 --loop-steps 40 --log-every 10 \
    --checkpoint-every 20
