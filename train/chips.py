"""Accelerator chips' dense matmul peaks from their specifications, for MFU (benchmarks/trainer.py,
and eval/report.py for committed files). No imports: anything may read it."""
from __future__ import annotations

# Dense (no sparsity) matmul peaks from the vendors' specifications, FLOP/s per chip, by a
# lower-case substring of jax's `device_kind` (first match wins): bfloat16 = float16.
SPEC_PEAKS = (
    ("h100 pcie", {"bfloat16": 756e12}),
    ("h100", {"bfloat16": 989.4e12}),       # SXM (NVIDIA H100 datasheet)
    ("h200", {"bfloat16": 989.4e12}),       # same compute as the H100 SXM
    ("a100", {"bfloat16": 312e12}),
    ("tpu v4", {"bfloat16": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12}),  # v5e
    ("tpu v5e", {"bfloat16": 197e12}),
    ("tpu v5", {"bfloat16": 459e12}),       # v5p
    ("tpu v6 lite", {"bfloat16": 918e12}),  # v6e (Trillium)
    ("tpu v6e", {"bfloat16": 918e12}),
)


def spec_peak(device_kind: str, dtype: str) -> float | None:
    """The specification's dense peak FLOP/s of one chip of `device_kind` in `dtype`, or None
    (a CPU, an unlisted chip, or float32, whose matmul precision varies by backend)."""
    dtype = "bfloat16" if dtype == "float16" else dtype
    kind = device_kind.lower()
    for key, peaks in SPEC_PEAKS:
        if key in kind:
            return peaks.get(dtype)
    return None
