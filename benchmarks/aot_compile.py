"""Deviceless ahead-of-time compilation of the landmark-attention Pallas kernels for TPUs and GPUs.

    python -m benchmarks.aot_compile [--tpu v4=1x1x1,v5e=1x1,...] [--gpu h100,a100]
        [--lengths 2048,8192] [--head_dims 64,128] [--dtypes bfloat16,float32]
        [--blocks Q,K] [--out results/benchmarks/aot_compile.json]

No TPU or GPU is needed: for each target this builds compile-only devices (a TPU topology from
libtpu, `jax.experimental.topologies.get_topology_desc(NAME, platform="tpu")`, or a GPU one
from the CUDA plugin given XLA's `GpuTargetConfigProto` of the chip, `platform="cuda"`,
`topology="1x1x1"`, `target_config=...`), a mesh over them, and runs
`jax.jit(fwd_bwd).lower(ShapeDtypeStructs on that mesh).compile()`, where fwd_bwd is y and the
q, k, v cotangents (`jax.vjp`) of the kernel entry point at B 1, H 8, mem_freq 63 (the
benchmark's layout, blocks of 64): `models.landmark_pallas_tpu.landmark_attention_pallas_tpu`
for TPUs, `models.landmark_pallas.landmark_attention_pallas` for GPUs. So the three
`pallas_call`s (forward, dk/dv, dq) go through the real backend compilers — Mosaic inside
libtpu, Triton inside the CUDA plugin — which the tests' lowering checks cannot reach; nothing
runs. Each case is compiled with and without segment ids, for every length, head dimension and
dtype; a topology of several devices (v5e=2x2; v3, v4 and tpu7x chips also show 2 cores each)
runs the kernels per device under `shard_map` with the heads split across them. v3 is in the
default list to record that Mosaic rejects its bfloat16 matmuls (the kernels need v4+ for those).

Writes one JSON (`--out`): per target, the topology and device kind, and per case the shapes,
"ok" with the compile seconds and the kernels found in the compiled module, or the error's
first lines; plus jax/jaxlib/libtpu/jax-cuda12-plugin versions (`benchmarks.harness` fields,
"device" being the CPU host that compiled). Exits with a message when libtpu (for --tpu) or the
CUDA plugin (for --gpu) is not installed. They are not project dependencies; in a separate venv:

    python3.13 -m venv /tmp/aotvenv
    /tmp/aotvenv/bin/pip install -c constraints.txt "jax[tpu]==0.12.0.1" \\
        "jax-cuda12-plugin==0.12.0.1" chex flax   # jax[tpu] pins libtpu 0.0.50.*
    PYTHONPATH=$PWD /tmp/aotvenv/bin/python -m benchmarks.aot_compile

Host setup, found on a CPU-only machine: libtpu needs no environment variables for compile-only
topologies (TPU_SKIP_MDS_QUERY=1 and TPU_WORKER_HOSTNAMES=localhost are set by default only to
skip its metadata-server query and quiet its warnings); the CUDA plugin needs neither CUDA
libraries nor a driver once jax_platforms is "cpu" (set here), which skips its CUDA version
check. Traces run under `jax.set_mesh(mesh)`: with no TPU backend, the Mosaic lowering of the
integer division in the kernels' index maps asks the current mesh which TPU it targets.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import harness
from train import chips

B, H = 1, 8
MEM_FREQ = 63            # block of 64 tokens including its landmark
OUT = harness.RESULTS / "aot_compile.json"
TPU_TOPOLOGIES = "v4=1x1x1,v5e=1x1,v5p=1x1x1,v6e=1x1,tpu7x=1x1x1,v3=1x1,v5e=2x2"
KERNELS = re.compile(r"landmark_attention(?:_tpu)?_(fwd|dkdv|dq)")



def _first_lines(e: Exception, n: int = 4) -> list[str]:
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    return [ln[:400] for ln in lines[:n]]


def compile_case(devices, platform: str, T: int, D: int, dtype, segments: bool,
                 blocks: dict) -> dict:
    """Compiles y and the q, k, v cotangents of the kernel for one shape on `devices`."""
    if platform == "tpu":
        from models.landmark_pallas_tpu import landmark_attention_pallas_tpu as kernel
    else:
        from models.landmark_pallas import landmark_attention_pallas as kernel
    mesh = jax.sharding.Mesh(np.array(devices), ("heads",))
    spec = P(None, None, "heads", None)

    def attention(q, k, v, *seg):
        return kernel(q, k, v, mem_freq=MEM_FREQ, segment_ids=seg[0] if seg else None, **blocks)

    if len(devices) > 1:   # a pallas_call is not partitioned: one per chip, heads split
        attention = jax.shard_map(attention, mesh=mesh, in_specs=(spec,) * 3 + (P(),) * segments,
                                  out_specs=spec, check_vma=False)

    def fwd_bwd(q, k, v, ct, *seg):
        y, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *seg), q, k, v)
        return y, vjp(ct)

    x = jax.ShapeDtypeStruct((B, T, H, D), dtype, sharding=NamedSharding(mesh, spec))
    seg = [jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P()))]
    case = {"T": T, "D": D, "dtype": jnp.dtype(dtype).name, "segments": segments}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jax.jit(fwd_bwd).lower(x, x, x, x, *seg[:segments]).compile()
    except Exception as e:  # noqa: BLE001 - a compiler's refusal is the result
        return {**case, "ok": False, "error": _first_lines(e)}
    kernels = sorted(set(KERNELS.findall(compiled.as_text())))
    return {**case, "ok": True, "compile_s": round(time.perf_counter() - t0, 2),
            "kernels": kernels}


def compile_target(platform: str, name: str, cases, blocks: dict) -> dict:
    from jax.experimental import topologies
    out = {"platform": platform, "topology": name}
    try:
        devices = (topologies.get_topology_desc(name, platform="tpu").devices
                   if platform == "tpu" else chips.gpu_devices(name))
    except Exception as e:  # noqa: BLE001
        return {**out, "ok": False, "error": _first_lines(e)}
    out.update(device_kind=devices[0].device_kind, devices=len(devices))
    print(f"{platform} {name}: {devices[0].device_kind} x{len(devices)}", flush=True)
    results = []
    for T, D, dtype, segments in cases:
        r = compile_case(devices, platform, T, D, dtype, segments, blocks)
        print("  ", json.dumps(r)[:300], flush=True)
        results.append(r)
    return {**out, "ok": all(r["ok"] for r in results), "cases": results}


def _versions() -> dict:
    out = harness.versions()
    for pkg in ("libtpu", "jax-cuda12-plugin"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpu", default=TPU_TOPOLOGIES, help="TPU topology names ('' for none)")
    ap.add_argument("--gpu", default=",".join(chips.GPU_TARGETS),
                    help=f"GPU targets among {sorted(chips.GPU_TARGETS)} ('' for none)")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--head_dims", default="64,128")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--blocks", default=None,
                    help="the kernels' query,key tiles (default: each kernel's own)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    tpus, gpus = split(a.tpu), split(a.gpu)
    if unknown := sorted(set(gpus) - set(chips.GPU_TARGETS)):
        sys.exit(f"aot_compile: GPU targets {unknown} are unknown; "
                 f"allowed: {sorted(chips.GPU_TARGETS)}")
    if tpus and not chips.has_compiler("tpu"):
        sys.exit("aot_compile: libtpu is not installed, so there is no TPU compiler: "
                 'pip install "jax[tpu]==<your jax version>" (see this module\'s docstring), '
                 "or pass --tpu ''")
    if gpus and not chips.has_compiler("gpu"):
        sys.exit("aot_compile: the CUDA plugin is not installed, so there is no GPU compiler: "
                 'pip install "jax-cuda12-plugin==<your jax version>", or pass --gpu \'\'')
    chips.compile_only_env()
    jax.config.update("jax_platforms", "cpu")    # compile-only: no backend but the host's
    blocks = {}
    if a.blocks:
        blocks = dict(zip(("block_q", "block_k"), (int(b) for b in split(a.blocks))))
    cases = [(T, D, jnp.dtype(dt), seg) for T in map(int, split(a.lengths))
             for D in map(int, split(a.head_dims)) for dt in split(a.dtypes)
             for seg in (False, True)]
    targets = ([compile_target("tpu", t, cases, blocks) for t in tpus]
               + [compile_target("gpu", g, cases, blocks) for g in gpus])
    doc = {"benchmark": "aot_compile", "device": harness.device_info(), "versions": _versions(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shapes": {"B": B, "H": H, "mem_freq": MEM_FREQ, "blocks": blocks or "default"},
           "targets": targets}
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{path}: {sum(t['ok'] for t in targets)} of {len(targets)} targets compiled every case")
    return path


if __name__ == "__main__":
    main()
