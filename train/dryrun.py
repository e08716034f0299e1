"""Will a config fit a pod slice? Compile its train step for N devices without allocating it.

    python -m train.dryrun --config lm:paper --num_devices 16 --config.mesh.fsdp=-1 \
        --config.mesh.data=1

`--num_devices N` fakes N CPU devices (XLA's host platform device count, set before jax loads),
builds the run's mesh and shardings (train/trainer.py: setup), and lowers and compiles the
jitted train step on abstract inputs: the state from `jax.eval_shape` of the sharded init, a
batch of the config's shapes (text windows: inputs, targets, weights [B, seq_len]; precomputed
embeddings: z [B, *input_shape], y [B]; other data: one real row of the pipeline gives each
field's trailing shape and dtype). DKVB's codebooks, which read their keys' data at init, read
a keys.npz of zeros of the embeddings' width when the config's data_dir has none (the memory's
shapes depend only on that width). Nothing of the model's size is allocated. Prints one JSON
object:

    num_devices, mesh                  the mesh the config makes on N devices
    params_bytes_total                 every parameter, unsharded
    params_bytes_per_device            the largest device's share (under fsdp ≈ total / fsdp)
    optimizer_bytes_per_device         the optimizer state's share
    temp_bytes_per_device              the compiled step's scratch (XLA's memory analysis)
    argument_bytes_per_device          the step's inputs (state and batch) on one device
    total_bytes_per_device             arguments + scratch: what one chip must hold
    fits                               {chip: total ≤ its HBM} for common chips (HBM_BYTES)
    step_flops                         XLA's FLOP count of the compiled step (cost_analysis: one
                                       device's program × the devices), null where the backend
                                       gives none (XLA:GPU's compile-only devices give none)
    analytic_step_flops                for an LM (model family "transformer", lm.py): the
                                       trainer benchmark's MFU numerator for the step,
                                       flops_per_token (6·N + 12·L·T·D) × batch_size × seq_len;
                                       XLA's count adds the elementwise work and, under
                                       model.remat, the recomputed forward pass

`--out FILE` also writes it to FILE with what made it: the command, the git commit (and whether
tracked code differed from it), the host and the jax/flax versions (results/dryrun/*.json).

The compiled program is the CPU's: its scratch is indicative of an accelerator's, not equal to
it (fusion and layouts differ); the parameter and optimizer shares are exact.

`--topology NAME` (`v5e=4x4`, `v5p=2x2x1`, `v6e=2x2`; not with --num_devices) compiles for a
TPU slice instead, without one: the mesh is over libtpu's compile-only devices of NAME and the
step goes through XLA:TPU, so scratch and arguments (per device = per chip) are the TPU
program's own. The report adds

    device_kind                        the chip, as libtpu names it ("TPU v5 lite")
    num_chips                          the slice's chips (= num_devices)

and `fits` holds only that chip's entry (TPU_CHIPS → HBM_BYTES; empty for a chip not there).
v4 and tpu7x are refused (exit 2): libtpu shows their chips as 2 devices each, which
jax.make_mesh does not take. It needs libtpu, not a project dependency (exit 2 without it):

    pip install "jax[tpu]==<the installed jax version>"     # pins the matching libtpu

`--gpu NAME` (h100, a100: train.chips.GPU_TARGETS; not with --topology or --num_devices)
compiles for `--gpu_count N` (default 1) GPUs of that kind instead, without one: the CUDA
plugin's compile-only devices (topology 1x1xN) given XLA's target description of the chip, the
step through XLA:GPU, so scratch and arguments are the GPU program's own. The report adds
device_kind ("NVIDIA H100 80GB HBM3") and num_chips, and `fits` holds that chip's entry alone
(GPU_CHIPS → HBM_BYTES). It needs the CUDA plugin (exit 2 without it), not a CUDA install:

    pip install "jax-cuda12-plugin==<the installed jax version>"
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import app, flags

from train import chips
from train import main as train_main

# HBM per chip, bytes (vendors' figures).
HBM_BYTES = {"tpu_v4": 32 * 2**30, "tpu_v5e": 16 * 2**30, "tpu_v5p": 95 * 2**30,
             "tpu_v6e": 32 * 2**30, "tpu7x": 192 * 2**30, "h100_80g": 80 * 10**9,
             "h200": 141 * 10**9, "a100_80g": 80 * 10**9}

# A TPU's device_kind (libtpu's) → its HBM_BYTES entry.
TPU_CHIPS = {"TPU v4": "tpu_v4", "TPU v5 lite": "tpu_v5e", "TPU v5": "tpu_v5p",
             "TPU v5p": "tpu_v5p", "TPU v6 lite": "tpu_v6e", "TPU v6e": "tpu_v6e",
             "TPU7x": "tpu7x"}

# A GPU's device_kind (its GPU_TARGETS description) → its HBM_BYTES entry.
GPU_CHIPS = {"NVIDIA H100 80GB HBM3": "h100_80g", "NVIDIA A100-SXM4-80GB": "a100_80g"}

_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Fake CPU devices to compile for.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice (e.g. v5e=4x4) to compile for "
                                "with libtpu's compiler on its compile-only devices.")
_GPU = flags.DEFINE_string("gpu", None, "A GPU (h100, a100) to compile for with XLA:GPU on "
                           "the CUDA plugin's compile-only devices.")
_GPU_COUNT = flags.DEFINE_integer("gpu_count", 1, "With --gpu: how many GPUs.")
_COMMAND: list[str] = []      # the command line as given (run() sets it), for --out
_OUT = flags.DEFINE_string("out", None, "Also write the report to this JSON file, with the "
                           "command, the git commit and the versions it was made with.")


def _leaf_bytes(x, per_device: bool) -> int:
    shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
    n = 1
    for d in shape:
        n *= int(d)
    return n * x.dtype.itemsize


def tree_bytes(tree, *, per_device: bool = False) -> int:
    """Bytes of an abstract pytree (ShapeDtypeStructs with shardings), whole or one device's."""
    import jax
    return sum(_leaf_bytes(x, per_device) for x in jax.tree_util.tree_leaves(tree))


def abstract_batch(run):
    """The train batch's ShapeDtypeStructs [batch_size, ...], rows on the batch-parallel axes:
    trailing shapes and dtypes from one row of the config's data pipeline (text windows and
    precomputed embeddings: from the config, nothing read; Birdie's rows over a corpus that needs
    preparing: one row over the local prose, the same fields and shapes)."""
    import jax
    import numpy as np
    from train.data import pipeline
    c = run.config
    if c.data.name in ("text", "tfds"):     # token windows: no need to read (or have) the corpus
        T = c.seq_len
        one = {"inputs": np.zeros((1, T), np.int32), "targets": np.zeros((1, T), np.int32),
               "weights": np.zeros((1, T), np.float32)}
        if c.data.get("stream_mem_freq"):   # the official landmark layout's rows
            one["stream_phase"] = np.zeros((1, T), np.int32)
    elif c.data.name == "embeddings":       # train/data/embeddings.py's record: z [D], y
        one = {"z": np.zeros((1, *c.input_shape), np.float32), "y": np.zeros((1,), np.int32)}
    else:
        data = c.data
        if data.name == "birdie" and data.corpus in ("local_text", "tfds"):
            # a row's fields and shapes do not depend on the text: read one off the local prose
            data = data.copy_and_resolve_references()
            data.corpus, data.tokenizer = "text", "byte"
        one = next(iter(pipeline.make_dataset(data, split="train", seed=c.seed,
                                              global_batch_size=1, seq_len=c.get("seq_len", 0),
                                              process_index=0, process_count=1)))
    rows = run.batch_sharding.spec[0]
    out = {}
    for k, v in one.items():
        spec = jax.sharding.PartitionSpec(rows, *([None] * (v.ndim - 1)))
        out[k] = jax.ShapeDtypeStruct((c.batch_size,) + v.shape[1:], v.dtype,
                                      sharding=jax.sharding.NamedSharding(run.mesh, spec))
    return out


def _synthetic_keys(config, tmp: str):
    """`config`, or a copy whose data_dir is `tmp` with a keys.npz of zeros when DKVB's codebooks
    would read one that is not there: its width is the embeddings' (input_shape), and the
    memory's shapes (all the dry run takes from it) depend on neither its values nor its rows."""
    import numpy as np
    from train.data import embeddings
    settings = config.get("memory", {}).get("dkvb_codebooks")
    if settings is None or os.path.exists(os.path.join(str(config.data.data_dir), "keys.npz")):
        return config
    config = config.copy_and_resolve_references()
    config.data.data_dir = tmp
    rows = max(config.model.num_keys, settings.key_init_batch)
    embeddings.save(tmp, "keys", np.zeros((rows, *config.input_shape), np.float32))
    return config


def compile_train_step(config, devices=None):
    """(run, abstract state, abstract batch, compiled train step) for `config` on `devices`
    (default: every device); nothing of the model's size is allocated."""
    import tempfile
    import jax
    from train import trainer
    with tempfile.TemporaryDirectory(prefix="dryrun_") as tmp:
        run = trainer.setup(_synthetic_keys(config, tmp), devices=devices or jax.devices())
        state = trainer.abstract_state(run)
    batch = abstract_batch(run)
    return run, state, batch, trainer.make_train_step(run).lower(state, batch).compile()


def tpu_devices(topology: str) -> list:
    """libtpu's compile-only devices of a TPU slice (`v5e=4x4`, `v5p=2x2x1`), one a chip:
    compiling for them runs XLA:TPU; nothing can run on them. ValueError when libtpu does not
    know the name, or shows a chip as several devices (v4, tpu7x: jax.make_mesh takes one a
    chip, "megacore", and libtpu's compile-only v4 shows its 2 cores)."""
    from jax.experimental import topologies
    try:
        devices = list(topologies.get_topology_desc(topology, platform="tpu").devices)
    except Exception as e:          # libtpu's errors are RuntimeErrors (XlaRuntimeError)
        raise ValueError(f"--topology={topology}: {str(e).splitlines()[0]}") from e
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    if len(chips) != len(devices):
        raise ValueError(f"--topology={topology}: libtpu shows each {devices[0].device_kind} "
                         "chip as several devices and jax.make_mesh takes one a chip; "
                         "v5e, v5p and v6e topologies work")
    return devices


def step_flops(compiled, num_devices: int) -> Optional[float]:
    """XLA's FLOP count of `compiled` (one device's SPMD program) × `num_devices`, or None where
    the backend gives no cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):       # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops) * num_devices


def analytic_step_flops(config, params) -> Optional[float]:
    """The trainer benchmark's MFU numerator for one step of `config` (an LM: model family
    "transformer"), None for other models."""
    if config.model.get("family") != "transformer":
        return None
    from train.chips import matmul_flops_per_token
    per_token = matmul_flops_per_token(config, params)["flops_per_token"]
    return float(per_token * config.batch_size * config.seq_len)


def dry_run(config, devices=None) -> dict:
    """The report above for `config` on `devices` (default: every device); on TPU or GPU
    devices also the chip and `fits` of that chip alone."""
    from train import sharding as shd
    run, state, batch, compiled = compile_train_step(config, devices)
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    args = int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0
    if not args:
        args = tree_bytes(state, per_device=True) + tree_bytes(batch, per_device=True)
    total = args + temp
    devices = list(run.mesh.devices.flat)
    report = {"num_devices": len(devices), "mesh": shd.describe(run.mesh),
              "params_bytes_total": tree_bytes(state.params),
              "params_bytes_per_device": tree_bytes(state.params, per_device=True),
              "optimizer_bytes_per_device": tree_bytes(state.opt_state, per_device=True),
              "temp_bytes_per_device": temp, "argument_bytes_per_device": args,
              "total_bytes_per_device": total,
              "fits": {chip: total <= hbm for chip, hbm in HBM_BYTES.items()},
              "step_flops": step_flops(compiled, len(devices)),
              "analytic_step_flops": analytic_step_flops(run.config, state.params)}
    if devices[0].platform == "cpu":
        return report
    kind = devices[0].device_kind
    chip = {**TPU_CHIPS, **GPU_CHIPS}.get(kind)     # tpu_devices, gpu_devices: one device a chip
    return {**report, "device_kind": kind, "num_chips": len(devices),
            "fits": {} if chip is None else {chip: total <= HBM_BYTES[chip]}}


def provenance(argv: Sequence[str]) -> dict:
    """What made a report: the command (without --out), the checkout's commit and whether a
    tracked file outside results/ differed from it, the host and the versions."""
    import subprocess
    from importlib import metadata
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args, skip = [], False
    for a in argv[1:]:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        args.append(a)

    def git(*a):
        try:
            r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    topology, gpu = _flag(argv, "topology"), _flag(argv, "gpu")
    host = f"on a host of {os.cpu_count()} cores"
    device = (f"tpu {topology} (libtpu {metadata.version('libtpu')}'s compile-only devices and "
              f"XLA:TPU compiler, {host})" if topology is not None else
              f"gpu {gpu} x{_flag(argv, 'gpu_count') or 1} (jax-cuda12-plugin "
              f"{metadata.version('jax-cuda12-plugin')}'s compile-only devices and XLA:GPU "
              f"compiler, {host})" if gpu is not None else
              f"cpu (fake host devices), {os.cpu_count()} cores")
    return {"command": " ".join(["python -m train.dryrun", *args]),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": None if status is None else bool(status),
            "device": device,
            "versions": {p: metadata.version(p) for p in ("jax", "flax")}}


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    config = train_main._CONFIG.value
    if config is None:
        print("error: --config must be given", file=sys.stderr)
        return 2
    made_by = provenance(_COMMAND) if _OUT.value else None   # the checkout the run starts from
    try:
        devices = (tpu_devices(_TOPOLOGY.value) if _TOPOLOGY.value else
                   chips.gpu_devices(_GPU.value, _GPU_COUNT.value) if _GPU.value else None)
        report = dry_run(config, devices)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({**made_by, **report}, f, indent=1)
            f.write("\n")
    return 0


def _flag(argv: Sequence[str], name: str) -> Optional[str]:
    """--NAME's value in `argv` (`--NAME=V` or `--NAME V`), None when not given."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _devices_env(argv: Sequence[str]) -> None:
    """The environment jax must load in: N fake CPU devices, or (--topology, --gpu) libtpu's or
    the CUDA plugin's compile-only devices beside the CPU, which stays the default backend (and
    spares the plugin its CUDA checks)."""
    from importlib import metadata
    from train.chips import GPU_TARGETS, compile_only_env, has_compiler
    os.environ["JAX_PLATFORMS"] = "cpu"
    if (gpu := _flag(argv, "gpu")) is not None:
        if _flag(argv, "topology") is not None or _flag(argv, "num_devices") is not None:
            _fail("--gpu excludes --topology and --num_devices: give one")
        if gpu not in GPU_TARGETS:
            _fail(f"--gpu={gpu} is unknown; use one of {', '.join(sorted(GPU_TARGETS))}")
        if not has_compiler("gpu"):
            _fail("--gpu needs the CUDA plugin: "
                  f'pip install "jax-cuda12-plugin=={metadata.version("jax")}"')
        return
    if _flag(argv, "topology") is not None:
        if _flag(argv, "num_devices") is not None:
            _fail("--topology and --num_devices exclude each other: give one")
        if not has_compiler("tpu"):
            _fail(f'--topology needs libtpu: pip install "jax[tpu]=={metadata.version("jax")}"')
        compile_only_env()
        return
    try:
        n = int(_flag(argv, "num_devices") or _NUM_DEVICES.default)
    except ValueError:
        n = 0
    if n < 1:
        _fail("--num_devices must be an integer >= 1")
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={n}"])


def run(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m train.dryrun`: sets up the devices before jax loads, then parses like
    mnemax-train (configs by name or path, one-line errors)."""
    argv = list(sys.argv if argv is None else argv)
    _COMMAND[:] = argv
    _devices_env(argv)
    try:
        argv = train_main.resolve_config_flag(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    app.run(main, argv=argv, flags_parser=train_main.parse_flags)


if __name__ == "__main__":
    run()
