"""A small benchmark harness: warm-up, median of N timed runs, JSON with device and versions.

Every benchmark compares against an in-repo baseline measured in the same run and writes
`results/benchmarks/NAME-DEVICE.json` via `write_result` (committed: `python -m eval.report`
builds the README's benchmarks table from these files).
"""
from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def block(x):
    """Waits for every array in a pytree."""
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, runs: int = 5) -> dict:
    """Median wall time of `fn()` (which must return arrays to wait on) in seconds."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs,
            "times_s": times}


def device_info() -> dict:
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "processor": platform.processor() or platform.machine(),
    }


def device_tag() -> str:
    d = jax.devices()[0]
    kind = d.device_kind if d.platform != "cpu" else "cpu"
    return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_result(name: str, payload: dict, *, out_dir: pathlib.Path | None = None,
                 echo: bool = True) -> pathlib.Path:
    """Writes results/benchmarks/NAME-DEVICE.json (or OUT_DIR/...): `payload` with the device,
    the versions and the time; prints the document (`echo`) or else one line naming the file.
    Writing again replaces the file (a benchmark that saves as it goes)."""
    out_dir = pathlib.Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_tag()}.json"
    doc = {"benchmark": name, "device": device_info(), "versions": versions(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)        # a run killed mid-write leaves the previous file whole
    print(json.dumps(doc) if echo else f"wrote {path}")
    return path
