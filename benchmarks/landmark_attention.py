"""Landmark attention speed: training attention and per-token memory inference vs dense attention.

    python -m benchmarks.landmark_attention [--lengths 512,1024,2048] [--contexts 4096,...,32768]

1. Training: forward+backward of `models.landmark.landmark_attention` (blockwise, mem_freq 63 so a
   block is 64 tokens with its landmark) vs `models.layers.dot_product_attention` (dense causal),
   B 1, H 8, D 64, at each length T.
2. Inference: one generated token (a chunk of one query) through
   `models.landmark_memory.memory_attention` with a block cache holding the whole context
   (context/64 blocks, top-k 4) vs one query against a full KV cache of the same context with
   dense attention.
Writes results/benchmarks/landmark_attention-DEVICE.json (medians, ratios) via the harness.
"""
from __future__ import annotations

import argparse

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


def train_step_times(T: int, *, runs: int, warmup: int) -> dict:
    keys = jax.random.split(jax.random.key(T), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in keys)
    is_lm = jnp.asarray((np.arange(T) % (MEM_FREQ + 1) == MEM_FREQ)[None])

    def fwd_bwd(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))

    dense = fwd_bwd(lambda q, k, v: layers.dot_product_attention(q, k, v))
    landmark = fwd_bwd(lambda q, k, v: lmk.landmark_attention(q, k, v, is_lm, mem_freq=MEM_FREQ))
    td = harness.time_fn(lambda: dense(q, k, v), warmup=warmup, runs=runs)
    tl = harness.time_fn(lambda: landmark(q, k, v), warmup=warmup, runs=runs)
    return {"T": T, "dense_causal_s": td["median_s"], "landmark_s": tl["median_s"],
            "ratio": tl["median_s"] / td["median_s"]}


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
    ap.add_argument("--lengths", default="512,1024,2048", help="training lengths T")
    ap.add_argument("--contexts", default="4096,8192,16384,32768", help="inference contexts")
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out_dir", default=None)
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    train = [train_step_times(T, runs=a.runs, warmup=a.warmup) for T in ints(a.lengths)]
    infer = [inference_token_times(c, top_k=a.top_k, runs=a.runs, warmup=a.warmup)
             for c in ints(a.contexts)]
    payload = {"shapes": {"B": B, "H": H, "D": D, "block": MEM_FREQ + 1},
               "training_fwd_bwd": train, "inference_per_token": infer}
    return harness.write_result("landmark_attention", payload, out_dir=a.out_dir)


if __name__ == "__main__":
    main()
