"""Landmark attention speed: training attention and per-token memory inference vs dense attention.

    python -m benchmarks.landmark_attention [--lengths 512,1024,2048] [--contexts 4096,...,32768]
        [--official_kernel PATH/landmark-attention/llama/ltriton/flash_landmark_attention.py]
        [--tile_length 8192] [--tile_head_dims 64,128]

1. Training: forward+backward (grads of q, k, v) at each length T, B 1, H 8, D 64, mem_freq 63
   (a block is 64 tokens with its landmark), of
   - `models.landmark.landmark_attention`, impl "xla" (blockwise) and impl "pallas" (the
     backend's kernels: models/landmark_pallas.py on a GPU, models/landmark_pallas_tpu.py on a
     TPU, recorded as "kernel"; GPU/TPU only: interpret mode on CPU is too slow to time, so it
     is reported skipped there),
   - `jax.nn.dot_product_attention` causal (implementation "cudnn", FlashAttention in cuDNN,
     where it runs; else jax's default),
   - `models.layers.dot_product_attention` (dense causal XLA attention, the in-repo baseline),
   - the official fused Triton kernel of epfml/landmark-attention (`fused_landmark_attention(q,
     k, v, is_mem, sm_scale=None, block_size=64)`, layout [B, H, T, D]) when torch and triton
     import and --official_kernel names its file; skipped with the reason otherwise.
   Inputs are bfloat16 on accelerators and float32 on CPU (--dtype). A run that fails (e.g. out
   of memory: dense attention at 32k) is recorded with its error instead of a time. On an
   accelerator the Pallas kernels are first checked against the XLA path (float32, T 1024:
   largest differences of y and the gradients, `pallas_parity_float32`).
   Then, on a GPU or TPU, the Pallas kernel's tile sweep at T = --tile_length (8192), for each
   head dimension of --tile_head_dims (64, 128): fwd+bwd per configuration of `GPU_TILES`
   (block_q, block_k, num_warps, num_stages) or `TPU_TILES` (block_q, block_k), the kernel's
   default for that D first, with `jax.nn.dot_product_attention` timed beside; the fastest
   configuration and its ratio to it ("tile_sweep", one entry per D). The compile-only
   resources of the GPU ones (registers, spills, shared memory) come from
   `benchmarks.aot_compile --gpu_launch`.
2. Inference: one generated token (a chunk of one query) through
   `models.landmark_memory.memory_attention` with a block cache holding the whole context
   (context/64 blocks, top-k 4) vs one query against a full KV cache of the same context with
   dense attention.
Writes results/benchmarks/landmark_attention-DEVICE.json (medians, ratios) via the harness, after
every length and context ("complete": false until the last).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from memory import block_cache
from models import landmark as lmk
from models import landmark_memory
from models import layers

B, H, D = 1, 8, 64
MEM_FREQ = 63            # block of 64 tokens including its landmark
# The tile sweep's configurations (the kernel's default for the head dimension goes first,
# `sweep_tiles`). GPU: block_q, block_k, num_warps, num_stages, those that compile for an H100
# at T 8192, D 64 spilling at most 16 bytes (results/benchmarks/aot_compile-h100-tiles.json;
# at D 128 every 4-warp launch spills 120-392 bytes in dk/dv and the 8-warp ones at most 20,
# which the sweep at D 128 puts to the test); TPU: block_q, block_k (each compiles for a v4 and
# a v5e: benchmarks.aot_compile --blocks).
GPU_TILES = ((64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3),
             (128, 64, 8, 2))
TPU_TILES = ((128, 128), (256, 128), (128, 256), (256, 256))


def _timed(fn, *, runs: int, warmup: int) -> dict:
    """{"median_s", "min_s"} of fn(), or {"error": one line} when it fails (e.g. out of memory)."""
    try:
        t = harness.time_fn(fn, warmup=warmup, runs=runs)
    except Exception as e:  # noqa: BLE001 - a failed candidate is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"median_s": t["median_s"], "min_s": t["min_s"]}


def _fwd_bwd(attention, ct):
    """The jitted q, k, v gradients of sum(attention(q, k, v) · ct): one forward + backward."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * ct),
                            argnums=(0, 1, 2)))


def _cudnn_dpa(q, k, v, ct):
    """(fn, implementation) for jax.nn.dot_product_attention: cuDNN's where it compiles."""
    for impl in ("cudnn", None):
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        fn = _fwd_bwd(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl), ct)
        try:
            harness.block(fn(q, k, v))
        except Exception:  # noqa: BLE001 - cuDNN unavailable for this shape/dtype/device
            continue
        return fn, impl or "default"
    raise RuntimeError("jax.nn.dot_product_attention did not compile")


def _dot_product_attention_times(q, k, v, ct, *, runs: int, warmup: int) -> dict:
    """fwd+bwd times of `_cudnn_dpa`'s function with its implementation, or {"error": why}."""
    try:
        dpa, impl = _cudnn_dpa(q, k, v, ct)
    except RuntimeError as e:
        return {"error": str(e)}
    return {**_timed(lambda: dpa(q, k, v), runs=runs, warmup=warmup), "implementation": impl}


def official_triton_times(path, T: int, dtype, *, runs: int, warmup: int) -> dict:
    """fwd+bwd of the official `fused_landmark_attention` (torch), or {"skipped": why}."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        return {"skipped": f"torch + triton not importable ({e})"}
    if not path:
        return {"skipped": "--official_kernel not given (the path of epfml/landmark-attention's "
                           "llama/ltriton/flash_landmark_attention.py)"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    try:
        spec = importlib.util.spec_from_file_location("flash_landmark_attention", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - a missing file or a triton it does not build with
        return {"error": f"loading {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(jnp.dtype(dtype).name,
                                                                    torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(T)
    q, k, v, ct = (torch.randn(B, H, T, D, device="cuda", dtype=tdt, generator=gen)
                   for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    is_mem = (torch.arange(T, device="cuda") % (MEM_FREQ + 1)) == MEM_FREQ

    def step():
        for x in (q, k, v):
            x.grad = None
        out = mod.fused_landmark_attention(q, k, v, is_mem, block_size=MEM_FREQ + 1)
        out.backward(ct)

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"median_s": statistics.median(times), "min_s": min(times)}


def _ratio(a: dict, b: dict):
    if "median_s" in a and "median_s" in b:
        return a["median_s"] / b["median_s"]
    return None


def pallas_parity(T: int, *, pallas_blocks, interpret: bool = False) -> dict:
    """Largest |pallas − xla| of y and of the q, k, v gradients, float32, compiled for the
    device (not interpret mode): checks the lowering's numbers before it is timed."""
    keys = jax.random.split(jax.random.key(T + 1), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in keys)
    is_lm = jnp.asarray((np.arange(T) % (MEM_FREQ + 1) == MEM_FREQ)[None])

    def value_and_grads(impl):
        f = lambda q, k, v: lmk.landmark_attention(  # noqa: E731
            q, k, v, is_lm, mem_freq=MEM_FREQ, impl=impl, pallas_blocks=pallas_blocks,
            interpret=interpret)
        y, vjp = jax.vjp(f, q, k, v)
        return (y, *vjp(ct))

    try:
        got = jax.jit(lambda: value_and_grads("pallas"))()
    except Exception as e:  # noqa: BLE001
        return {"T": T, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    want = jax.jit(lambda: value_and_grads("xla"))()
    names = ("y", "dq", "dk", "dv")
    return {"T": T, "max_abs_diff": {n: float(jnp.max(jnp.abs(a - b)))
                                     for n, a, b in zip(names, got, want)}}


def _training_inputs(T: int, dtype, head_dim: int = D):
    """q, k, v [B, T, H, head_dim] in `dtype` and a float32 cotangent, drawn from T."""
    keys = jax.random.split(jax.random.key(T), 4)
    shape = (B, T, H, head_dim)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)
    return q, k, v, ct.astype(jnp.float32)


def sweep_tiles(kernel: str, head_dim: int) -> list[tuple]:
    """The sweep's configurations for `kernel` at `head_dim`, the kernel's default first."""
    if kernel == "pallas_tpu":
        default, tiles = lmk.PALLAS_BLOCKS[kernel], TPU_TILES
    else:
        from models.landmark_pallas import DEFAULT_NUM_STAGES, default_num_warps
        default = (*lmk.PALLAS_BLOCKS[kernel], default_num_warps(head_dim), DEFAULT_NUM_STAGES)
        tiles = GPU_TILES
    return [tuple(default)] + [t for t in tiles if tuple(t) != tuple(default)]


def train_step_times(T: int, dtype, *, runs: int, warmup: int, pallas_blocks,
                     official_kernel=None) -> dict:
    q, k, v, ct = _training_inputs(T, dtype)
    is_lm = jnp.asarray((np.arange(T) % (MEM_FREQ + 1) == MEM_FREQ)[None])

    def run(attention):   # fwd+bwd times
        step = _fwd_bwd(attention, ct)
        return _timed(lambda: step(q, k, v), warmup=warmup, runs=runs)

    out = {"T": T}
    out["dense_causal"] = run(lambda q, k, v: layers.dot_product_attention(q, k, v))
    # The XLA path's query tiles unroll in Python: at most 32 of them keeps 32k compilable.
    q_block = max(256, T // 32)
    out["landmark_xla"] = run(lambda q, k, v: lmk.landmark_attention(
        q, k, v, is_lm, mem_freq=MEM_FREQ, q_block=q_block))
    out["landmark_xla"]["q_block"] = q_block
    if jax.default_backend() in ("gpu", "tpu"):
        out["landmark_pallas"] = run(lambda q, k, v: lmk.landmark_attention(
            q, k, v, is_lm, mem_freq=MEM_FREQ, impl="pallas", pallas_blocks=pallas_blocks))
        kernel = lmk.resolve_impl("pallas")
        out["landmark_pallas"]["kernel"] = kernel
        out["landmark_pallas"]["blocks"] = list(pallas_blocks or lmk.PALLAS_BLOCKS[kernel])
    else:
        out["landmark_pallas"] = {"skipped": "no GPU/TPU: Pallas interpret mode on CPU is a "
                                             "correctness check (tests), too slow to time"}
    out["dot_product_attention"] = _dot_product_attention_times(q, k, v, ct, runs=runs,
                                                                warmup=warmup)
    out["official_triton"] = official_triton_times(official_kernel, T, dtype, runs=runs,
                                                   warmup=warmup)
    # Kept as before: "landmark_s" and "ratio" are the XLA landmark path against dense causal.
    out["dense_causal_s"] = out["dense_causal"].get("median_s")
    out["landmark_s"] = out["landmark_xla"].get("median_s")
    out["ratio"] = _ratio(out["landmark_xla"], out["dense_causal"])
    # Of the fastest runs: a shared machine's other jobs only ever add time.
    if "min_s" in out["landmark_xla"] and "min_s" in out["dense_causal"]:
        out["ratio_of_minima"] = out["landmark_xla"]["min_s"] / out["dense_causal"]["min_s"]
    out["pallas_over_dot_product_attention"] = _ratio(out["landmark_pallas"],
                                                      out["dot_product_attention"])
    out["pallas_over_official_triton"] = _ratio(out["landmark_pallas"], out["official_triton"])
    return out


def tile_sweep(T: int, dtype, *, kernel: str, tiles, runs: int, warmup: int, head_dim: int = D,
               interpret: bool = False) -> dict:
    """fwd+bwd of the Pallas kernel `kernel` ("pallas_gpu" / "pallas_tpu") at length T and
    head dimension head_dim for each tile configuration (GPU: block_q, block_k, num_warps,
    num_stages; TPU: block_q, block_k), called directly (the training layout), with
    `jax.nn.dot_product_attention` at the same shape timed beside: every configuration's times
    (or its error), the fastest, and the ratios of the fastest and of the first (the default)
    to dot_product_attention."""
    q, k, v, ct = _training_inputs(T, dtype, head_dim)
    if kernel == "pallas_tpu":
        from models.landmark_pallas_tpu import landmark_attention_pallas_tpu as fn
        names = ("block_q", "block_k")
    else:
        from models.landmark_pallas import landmark_attention_pallas as fn
        names = ("block_q", "block_k", "num_warps", "num_stages")
    rows = []
    for tile in tiles:
        args = dict(zip(names, tile))
        step = _fwd_bwd(lambda q, k, v, args=args: fn(
            q, k, v, mem_freq=MEM_FREQ, interpret=interpret, **args), ct)
        rows.append({**args, **_timed(lambda: step(q, k, v), runs=runs, warmup=warmup)})
    out = {"T": T, "D": head_dim, "kernel": kernel, "configs": rows}
    out["dot_product_attention"] = _dot_product_attention_times(q, k, v, ct, runs=runs,
                                                                warmup=warmup)
    timed = [r for r in rows if "median_s" in r]
    if timed:
        out["best"] = min(timed, key=lambda r: r["median_s"])
        out["best_over_dot_product_attention"] = _ratio(out["best"],
                                                        out["dot_product_attention"])
        out["default_over_dot_product_attention"] = _ratio(rows[0],
                                                           out["dot_product_attention"])
    return out


def inference_token_times(context: int, *, top_k: int, runs: int, warmup: int) -> dict:
    S = MEM_FREQ + 1
    n_blocks = context // S
    rng = np.random.default_rng(context)
    cache = block_cache.init(batch=B, capacity=n_blocks, mem_freq=MEM_FREQ, num_heads=H,
                             head_dim=D)
    blocks = rng.normal(size=(B, n_blocks, S, H, D)).astype(np.float32)
    cache = cache.replace(keys=jnp.asarray(blocks), values=jnp.asarray(blocks[..., ::-1]),
                          num_blocks=jnp.asarray(n_blocks, jnp.int32))
    q, k, v = (jnp.asarray(rng.normal(size=(B, 1, H, D)).astype(np.float32)) for _ in range(3))
    no_lm = jnp.zeros((B, 1), bool)
    mem = jax.jit(lambda q, k, v, c: landmark_memory.memory_attention(q, k, v, no_lm, c,
                                                                      top_k=top_k)[0])
    kv_k = jnp.asarray(rng.normal(size=(B, context, H, D)).astype(np.float32))
    kv_v = jnp.asarray(rng.normal(size=(B, context, H, D)).astype(np.float32))
    # Full-KV decoding: the new query sees all `context` cached keys (no causal mask needed).
    full = jax.jit(lambda q, kk, vv: layers.dot_product_attention(q, kk, vv, causal=False))
    tm = harness.time_fn(lambda: mem(q, k, v, cache), warmup=warmup, runs=runs)
    tf = harness.time_fn(lambda: full(q, kv_k, kv_v), warmup=warmup, runs=runs)
    return {"context": context, "cache_blocks": n_blocks, "top_k": top_k,
            "memory_s": tm["median_s"], "full_kv_s": tf["median_s"],
            "ratio": tm["median_s"] / tf["median_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=None, help="training lengths T (default: 2048,8192,"
                    "32768 on GPU/TPU, 512,1024,2048 on CPU)")
    ap.add_argument("--contexts", default="4096,8192,16384,32768", help="inference contexts")
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="training inputs (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--pallas_blocks", default=None,
                    help="Pallas query,key tile sizes (default: the kernel's, "
                         "models.landmark.PALLAS_BLOCKS)")
    ap.add_argument("--official_kernel", default=None,
                    help="path of epfml/landmark-attention's llama/ltriton/"
                         "flash_landmark_attention.py (needs torch + triton + CUDA)")
    ap.add_argument("--tile_length", type=int, default=8192,
                    help="GPU/TPU: the length of the Pallas kernel's tile sweep (0: none)")
    ap.add_argument("--tile_head_dims", default="64,128",
                    help="GPU/TPU: the head dimensions of the tile sweep")
    ap.add_argument("--out_dir", default=None)
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    accel = jax.default_backend() in ("gpu", "tpu")
    lengths = ints(a.lengths or ("2048,8192,32768" if accel else "512,1024,2048"))
    dtype = jnp.dtype(a.dtype or ("bfloat16" if accel else "float32"))
    blocks = tuple(ints(a.pallas_blocks)) if a.pallas_blocks else None
    parity = None
    if accel:   # the kernels' numbers on this device first: a wrong kernel is not worth timing
        parity = pallas_parity(1024, pallas_blocks=blocks)
        print(json.dumps({"pallas_parity_float32": parity}), flush=True)
    train, infer, sweep = [], [], []

    def save(complete: bool):
        payload = {"shapes": {"B": B, "H": H, "D": D, "block": MEM_FREQ + 1,
                              "training_dtype": dtype.name},
                   "training_fwd_bwd": train, "inference_per_token": infer,
                   "complete": complete}
        if parity is not None:
            payload["pallas_parity_float32"] = parity
        if sweep:
            payload["tile_sweep"] = sweep
        return harness.write_result("landmark_attention", payload, out_dir=a.out_dir,
                                    echo=complete)

    # Saved after every length and context: a run stopped part-way (a lent machine's time
    # limit) leaves what it measured, marked "complete": false.
    for T in lengths:
        train.append(train_step_times(T, dtype, runs=a.runs, warmup=a.warmup,
                                      pallas_blocks=blocks, official_kernel=a.official_kernel))
        save(False)
    if accel and a.tile_length:
        kernel = lmk.resolve_impl("pallas")
        for head_dim in ints(a.tile_head_dims):
            sweep.append(tile_sweep(a.tile_length, dtype, kernel=kernel, head_dim=head_dim,
                                    tiles=sweep_tiles(kernel, head_dim), runs=a.runs,
                                    warmup=a.warmup))
            save(False)
    for c in ints(a.contexts):
        infer.append(inference_token_times(c, top_k=a.top_k, runs=a.runs, warmup=a.warmup))
        save(False)
    return save(True)


if __name__ == "__main__":
    main()
