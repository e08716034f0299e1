"""MFU's two sides: accelerator chips' dense matmul peaks from their specifications, and an LM's
model FLOPs per token (benchmarks/trainer.py, train/dryrun.py; eval/report.py for committed
files); and XLA's target description of the GPUs that compile-only devices stand for
(benchmarks/aot_compile.py, train/dryrun.py --gpu), with what builds compile-only devices on a
host without the chips. No imports at load: anything may read it."""
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


def matmul_flops_per_token(config, params) -> dict:
    """An LM's model FLOPs per token, forward + backward, the standard estimate (Kaplan et al.
    2020; PaLM, Chowdhery et al. 2022, appendix B): 6·N + 12·L·T·D. N counts the parameters that
    take part in a matmul per token: every parameter except the input embedding table when
    embeddings are untied (a lookup, not a matmul); with tied embeddings the table is the LM head
    and is counted once. 12·L·T·D is attention's QKᵀ and AV, without the causal-mask saving.
    Norm scales are counted in N (a negligible overcount)."""
    from models.transformer import num_params
    m = config.model
    n_total = int(num_params(params))
    n_embed_lookup = 0 if m.tie_embeddings else m.vocab_size * m.width
    n = n_total - n_embed_lookup
    L, T, D = m.num_layers, config.seq_len, m.width
    dense = 6 * n
    attention = 12 * L * T * D
    return {"n_params_total": n_total, "n_params_matmul": n, "dense_flops_per_token": dense,
            "attention_flops_per_token": attention, "flops_per_token": dense + attention}


# XLA's GpuTargetConfigProto of each chip (xla/tools/hlo_opt/gpu_specs/*.txtpb).
_GPU_INFO = """gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: {smem_core} threads_per_core_limit: 2048
  core_count: {cores} fpus_per_core: {fpus} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {bandwidth}
  l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin} cuda_compute_capability {{ major: {cc} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 }}
platform_name: "CUDA" device_description_str: "{name}"
"""
GPU_TARGETS = {
    "h100": _GPU_INFO.format(smem_core=233472, cores=132, fpus=128, bandwidth=3352320000000,
                             l2=52428800, clock=1.98, memory=84978434048, smem_optin=232448,
                             cc=9, name="NVIDIA H100 80GB HBM3"),
    "a100": _GPU_INFO.format(smem_core=167936, cores=108, fpus=64, bandwidth=2039040000000,
                             l2=41943040, clock=1.41, memory=85100068864, smem_optin=166912,
                             cc=8, name="NVIDIA A100-SXM4-80GB"),
}


# The module that brings each platform's compiler to a host without its chips.
COMPILERS = {"tpu": "libtpu", "gpu": "jax_plugins.xla_cuda12"}


def has_compiler(platform: str) -> bool:
    """Whether `platform`'s compiler ("tpu": libtpu; "gpu": the CUDA plugin) is installed."""
    import importlib.util
    try:
        return importlib.util.find_spec(COMPILERS[platform]) is not None
    except ModuleNotFoundError:     # its parent package (jax_plugins) is missing
        return False


def compile_only_env() -> None:
    """Sets (by default) what libtpu needs on a host without TPUs: no metadata server to ask,
    no multi-process lock to take (no chip is claimed). Call before jax loads its backends."""
    import os
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def gpu_devices(name: str, count: int = 1) -> list:
    """The CUDA plugin's `count` compile-only devices of GPU `name` (a GPU_TARGETS key), one
    node (topology 1x1xCOUNT): compiling for them runs XLA:GPU; nothing can run on them.
    ValueError for a count below 1."""
    from jax.experimental import topologies
    if count < 1:
        raise ValueError(f"--gpu_count={count} must be >= 1")
    return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                             target_config=GPU_TARGETS[name]).devices)
