"""Deviceless ahead-of-time compilation of the landmark-attention Pallas kernels for TPUs and GPUs.

    python -m benchmarks.aot_compile [--tpu v4=1x1x1,v5e=1x1,...] [--gpu h100,a100]
        [--lengths 2048,8192] [--head_dims 64,128] [--dtypes bfloat16,float32]
        [--blocks Q,K] [--gpu_launch Q,K,W,S;...] [--out results/benchmarks/aot_compile.json]

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
first lines; for a GPU, also each kernel's resources as compiled for the chip (`resources`:
registers per thread, spill stores and loads and stack frame in bytes, from ptxas -v; threads,
grid and dynamic shared memory per program, from XLA's thunk sequence), which set how many
programs an SM holds at once and whether a tile spills, without a GPU to time it; plus
jax/jaxlib/libtpu/jax-cuda12-plugin and ptxas versions (`benchmarks.harness` fields, "device"
being the CPU host that compiled). Exits with a message when libtpu (for --tpu) or the
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
import contextlib
import importlib.metadata as md
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

# ptxas -v's report of each GPU kernel reaches XLA's log only at this verbosity, which jaxlib
# reads when it loads (so before `import jax`); compile_case reads it from file descriptor 2.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
os.environ.setdefault("TF_CPP_VMODULE", "subprocess_compilation=3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import harness  # noqa: E402
from train import chips  # noqa: E402

B, H = 1, 8
MEM_FREQ = 63            # block of 64 tokens including its landmark
OUT = harness.RESULTS / "aot_compile.json"
TPU_TOPOLOGIES = "v4=1x1x1,v5e=1x1,v5p=1x1x1,v6e=1x1,tpu7x=1x1x1,v3=1x1,v5e=2x2"
KERNELS = re.compile(r"landmark_attention(?:_tpu)?_(fwd|dkdv|dq)")
# ptxas -v, as XLA logs it (TF_CPP_VMODULE=subprocess_compilation=3), and XLA's thunk sequence.
PTXAS_ENTRY = re.compile(r"Compiling entry function 'landmark_attention_(fwd|dkdv|dq)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_RUN = re.compile(r"\] (\S*ptxas) \S+ -o ")          # the ptxas XLA ran
THUNK = re.compile(r"landmark_attention_(fwd|dkdv|dq) grid: \[([\d, ]+)\] "
                   r"threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")



def _first_lines(e: Exception, n: int = 4) -> list[str]:
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    return [ln[:400] for ln in lines[:n]]


@contextlib.contextmanager
def _stderr_into(path: pathlib.Path):
    """File descriptor 2 (where XLA's C++ logging writes) goes to `path` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def gpu_kernel_resources(ptxas_log: str, thunk_sequence: str) -> dict:
    """Per kernel (fwd, dkdv, dq): registers, spill_stores, spill_loads, stack_frame (ptxas -v
    in `ptxas_log`) and threads, grid, shared_memory (XLA's thunk sequence); a kernel ptxas did
    not report (XLA compiled it in-process, without logging) has only the latter."""
    out: dict = {}
    parts = PTXAS_ENTRY.split(ptxas_log)
    for name, text in zip(parts[1::2], parts[2::2]):
        frame, regs = PTXAS_FRAME.search(text), PTXAS_REGS.search(text)
        if frame and regs:
            out[name] = {"registers": int(regs[1]), "spill_stores": int(frame[2]),
                         "spill_loads": int(frame[3]), "stack_frame": int(frame[1])}
    for name, grid, threads, smem in THUNK.findall(thunk_sequence):
        out.setdefault(name, {}).update(
            threads=[int(x) for x in threads.split(",")], grid=[int(x) for x in grid.split(",")],
            shared_memory=int(smem))
    return dict(sorted(out.items()))


def _ptxas_versions(targets: list) -> dict:
    """{path: release line} of each ptxas XLA ran for the GPU cases."""
    paths = sorted({c["ptxas"] for t in targets for c in t.get("cases", []) if c.get("ptxas")})
    out = {}
    for path in paths:
        lines = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        out[path] = " ".join(lines.strip().splitlines()[-1:])
    return out


def compile_case(devices, platform: str, T: int, D: int, dtype, segments: bool,
                 kernel_args: dict) -> dict:
    """Compiles y and the q, k, v cotangents of the kernel for one shape on `devices` (for a
    GPU, with ptxas -v and XLA's dump of the thunk sequence: the kernels' resources)."""
    if platform == "tpu":
        from models.landmark_pallas_tpu import landmark_attention_pallas_tpu as kernel
    else:
        from models.landmark_pallas import landmark_attention_pallas as kernel
    mesh = jax.sharding.Mesh(np.array(devices), ("heads",))
    spec = P(None, None, "heads", None)

    def attention(q, k, v, *seg):
        return kernel(q, k, v, mem_freq=MEM_FREQ, segment_ids=seg[0] if seg else None,
                      **kernel_args)

    if len(devices) > 1:   # a pallas_call is not partitioned: one per chip, heads split
        attention = jax.shard_map(attention, mesh=mesh, in_specs=(spec,) * 3 + (P(),) * segments,
                                  out_specs=spec, check_vma=False)

    def fwd_bwd(q, k, v, ct, *seg):
        y, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *seg), q, k, v)
        return y, vjp(ct)

    x = jax.ShapeDtypeStruct((B, T, H, D), dtype, sharding=NamedSharding(mesh, spec))
    seg = [jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P()))]
    case = {"T": T, "D": D, "dtype": jnp.dtype(dtype).name, "segments": segments}
    with tempfile.TemporaryDirectory(prefix="aot_compile-") as tmp:
        tmp = pathlib.Path(tmp)
        options, log = {}, tmp / "stderr.txt"
        if platform == "gpu":
            options = {"xla_dump_to": str(tmp / "dump"), "xla_gpu_ptx_compiler_extra_flags": "-v"}
        t0 = time.perf_counter()
        try:
            with jax.set_mesh(mesh), _stderr_into(log):
                compiled = jax.jit(fwd_bwd).lower(x, x, x, x, *seg[:segments]).compile(
                    compiler_options=options)
        except Exception as e:  # noqa: BLE001 - a compiler's refusal is the result
            return {**case, "ok": False, "error": _first_lines(e)}
        out = {**case, "ok": True, "compile_s": round(time.perf_counter() - t0, 2),
               "kernels": sorted(set(KERNELS.findall(compiled.as_text())))}
        if platform == "gpu":
            thunks = "".join(f.read_text() for f in (tmp / "dump").glob("*thunk_sequence.txt"))
            text = log.read_text(errors="replace")
            out["resources"] = gpu_kernel_resources(text, thunks)
            if ran := PTXAS_RUN.search(text):
                out["ptxas"] = ran[1]
    return out


def compile_target(platform: str, name: str, cases, kernel_args: dict) -> dict:
    """Every case compiled for one TPU topology or GPU; kernel_args: the kernel's tiles (and a
    GPU's num_warps, num_stages)."""
    from jax.experimental import topologies
    out = {"platform": platform, "topology": name}
    try:
        devices = (topologies.get_topology_desc(name, platform="tpu").devices
                   if platform == "tpu" else chips.gpu_devices(name))
    except Exception as e:  # noqa: BLE001
        return {**out, "ok": False, "error": _first_lines(e)}
    out.update(device_kind=devices[0].device_kind, devices=len(devices))
    print(f"{platform} {name}: {devices[0].device_kind} x{len(devices)} {kernel_args or ''}",
          flush=True)
    results = []
    for T, D, dtype, segments in cases:
        r = compile_case(devices, platform, T, D, dtype, segments, kernel_args)
        print("  ", json.dumps(r)[:300], flush=True)
        results.append(r)
    return {**out, "ok": all(r["ok"] for r in results), "cases": results}


def _versions(targets: list) -> dict:
    out = harness.versions()
    for pkg in ("libtpu", "jax-cuda12-plugin"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if ptxas := _ptxas_versions(targets):
        out["ptxas"] = ptxas
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
    ap.add_argument("--gpu_launch", default=None,
                    help="GPU: ';'-separated block_q,block_k,num_warps,num_stages, each GPU "
                         "target compiled once per launch (default: the kernel's own, --blocks)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    tpus, gpus = split(a.tpu), split(a.gpu)
    if unknown := sorted(set(gpus) - set(chips.GPU_TARGETS)):
        sys.exit(f"aot_compile: GPU targets {unknown} are unknown; "
                 f"allowed: {sorted(chips.GPU_TARGETS)}")
    blocks = {}
    if a.blocks:
        blocks = dict(zip(("block_q", "block_k"), (int(b) for b in split(a.blocks))))
    launches = [dict(blocks)]
    if a.gpu_launch:
        entries = [x.split(",") for x in a.gpu_launch.split(";") if x]
        if bad := [",".join(x) for x in entries if len(x) != 4 or not all(map(str.isdigit, x))]:
            sys.exit(f"aot_compile: --gpu_launch entries {bad} are not four integers "
                     "block_q,block_k,num_warps,num_stages")
        keys = ("block_q", "block_k", "num_warps", "num_stages")
        launches = [dict(zip(keys, map(int, x))) for x in entries]
    if tpus and not chips.has_compiler("tpu"):
        sys.exit("aot_compile: libtpu is not installed, so there is no TPU compiler: "
                 'pip install "jax[tpu]==<your jax version>" (see this module\'s docstring), '
                 "or pass --tpu ''")
    if gpus and not chips.has_compiler("gpu"):
        sys.exit("aot_compile: the CUDA plugin is not installed, so there is no GPU compiler: "
                 'pip install "jax-cuda12-plugin==<your jax version>", or pass --gpu \'\'')
    chips.compile_only_env()
    jax.config.update("jax_platforms", "cpu")    # compile-only: no backend but the host's
    cases = [(T, D, jnp.dtype(dt), seg) for T in map(int, split(a.lengths))
             for D in map(int, split(a.head_dims)) for dt in split(a.dtypes)
             for seg in (False, True)]
    targets = ([compile_target("tpu", t, cases, blocks) for t in tpus]
               + [{**compile_target("gpu", g, cases, launch), "launch": launch or "default"}
                  for g in gpus for launch in launches])
    doc = {"benchmark": "aot_compile", "device": harness.device_info(),
           "versions": _versions(targets),
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
