"""DKVB nearest-key lookup: chunked vs naive dense. `python -m benchmarks.dkvb [--quick]`

Shapes (paper scale): C=256 codebooks, K=4096 keys each, d_k=14, B=256 queries. The naive
lookup materialises the [B, C, K] distance tensor (1 GiB in float32); the chunked one
(`memory.codebook.nearest_keys`) walks `chunk` codebooks at a time. Reports lookups per second
(queries x codebooks per second) and peak memory from the compiled HLO's memory analysis
(arguments + outputs + temporaries), writing results/benchmarks/dkvb-DEVICE.json.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks.harness import time_fn, write_result
from memory import codebook as cb


def memory_bytes(fn, *args) -> dict | None:
    """Bytes the compiled computation needs, from XLA's memory analysis (None if unavailable)."""
    try:
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "temp_size_in_bytes", "alias_size_in_bytes")
           if hasattr(m, k)}
    out["peak_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                         + out.get("temp_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--dk", type=int, default=14)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--chunks", default="8,32")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--no_naive", action="store_true", help="skip the dense baseline")
    a = p.parse_args(argv)
    if a.quick:
        a.C, a.K, a.B, a.runs = 16, 512, 64, 2
    r = jax.random.split(jax.random.PRNGKey(0), 2)
    q = jax.random.normal(r[0], (a.B, a.C, a.dk), jnp.float32)
    keys = jax.random.normal(r[1], (a.C, a.K, a.dk), jnp.float32)
    lookups = a.B * a.C
    results = {}
    ref = None
    if not a.no_naive:
        naive = jax.jit(cb.naive_nearest_keys)
        t = time_fn(lambda: naive(q, keys), runs=a.runs)
        ref = naive(q, keys)
        results["naive_dense"] = {"time": t, "lookups_per_s": lookups / t["median_s"],
                                  "memory": memory_bytes(cb.naive_nearest_keys, q, keys)}
    for chunk in (int(c) for c in a.chunks.split(",")):
        fn = jax.jit(lambda q, k, chunk=chunk: cb.nearest_keys(q, k, chunk=chunk))
        t = time_fn(lambda: fn(q, keys), runs=a.runs)
        res = {"time": t, "lookups_per_s": lookups / t["median_s"],
               "memory": memory_bytes(lambda q, k, chunk=chunk: cb.nearest_keys(q, k, chunk=chunk),
                                      q, keys)}
        if ref is not None:
            res["agrees_with_naive"] = float(jnp.mean(fn(q, keys) == ref))
        results[f"chunked_{chunk}"] = res
    if "naive_dense" in results:
        base = results["naive_dense"]
        for k, v in results.items():
            v["speed_vs_naive"] = v["lookups_per_s"] / base["lookups_per_s"]
            if v["memory"] and base["memory"]:
                v["peak_memory_vs_naive"] = v["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]
    write_result("dkvb", {"shapes": {"C": a.C, "K": a.K, "d_k": a.dk, "B": a.B},
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
