"""The whole sharding story: the mesh, the logical-axis rules, sharded init, multi-host start-up.

Mesh axes (Auto axis types, so the logical rules below drive the partitioning):
  data   pure data parallelism: the batch is split, parameters are replicated;
  fsdp   data parallelism with parameters and optimizer state split over 'embed' (ZeRO-3 style);
  model  tensor parallelism: heads, MLP hidden units and the vocabulary are split.

Every parameter carries logical names (`nn.with_logical_partitioning`); the table below maps a
logical name to mesh axes. A config may override entries with `config.sharding_rules`.

  logical    mesh axes        what has it
  batch      (data, fsdp)     activations [B, ...], data batches
  length     -                sequence positions
  embed      fsdp             residual width D of every weight
  heads      model            attention heads H
  kv         -                head dim Dh
  mlp        model            MLP hidden units
  vocab      model            embedding rows / logits V
  memory     (data, fsdp)     memory-bank entries N (memory/bank.py)
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("memory", ("data", "fsdp")),
    ("codebook", None),
    ("keys", None),
    ("layers", None),
    ("state", None),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves {data, fsdp, model} (one of them may be -1 = the rest) against num_devices."""
    sizes = []
    for ax in MESH_AXES:
        v = int(mesh_cfg.get(ax, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, ax))
        if v == 0 or v < -1:
            raise ValueError(f"mesh.{ax}={v} is not allowed; use a positive size or -1 (the rest)")
        sizes.append(v)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not "
                             f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                         f"{num_devices} are available; sizes must multiply to the device count "
                         "(use -1 for 'the rest')")
    return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh with Auto axis types over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with `config.sharding_rules` ({logical: mesh axes or None}) applied on top."""
    overrides = dict(config.get("sharding_rules", None) or {}) if hasattr(config, "get") else {}
    known = {k for k, _ in DEFAULT_RULES}
    for k, v in overrides.items():
        if k not in known:
            raise ValueError(
                f"sharding_rules has unknown logical axis {k!r}; known: {sorted(known)}")
        for ax in (v if isinstance(v, (tuple, list)) else [v]):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"sharding_rules[{k!r}]={v!r}: mesh axes are {MESH_AXES}")
    return tuple((k, tuple(overrides[k]) if isinstance(overrides.get(k), list) else
                  overrides.get(k, v)) for k, v in DEFAULT_RULES)


def logical_to_mesh_sharding(logical_tree: Any, mesh: Mesh, rules) -> Any:
    """Pytree of logical PartitionSpecs → pytree of NamedShardings on `mesh`."""
    specs = nn.logical_to_mesh(logical_tree, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding for a [B, ...] data batch: B over the rule for 'batch'."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def check_batch(batch_size: int, mesh: Mesh, rules, *, field: str = "batch_size") -> None:
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
    n = math.prod(mesh.shape[a] for a in axes)
    if batch_size <= 0 or batch_size % n:
        raise ValueError(f"{field}={batch_size} must be a positive multiple of the batch-parallel "
                         f"mesh size {n} (mesh axes {axes})")
    if batch_size % jax.process_count():
        raise ValueError(f"{field}={batch_size} must be divisible by the process count "
                         f"{jax.process_count()}")


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """ValueError naming the first leaf whose shape the mesh cannot split evenly."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    shard_leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), s in zip(flat, shard_leaves):
        for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(s.spec) + (None,) * leaf.ndim)):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(s.mesh.shape[a] for a in axes)
            if size % n:
                name = jax.tree_util.keystr(path)
                raise ValueError(
                    f"parameter {name} has shape {tuple(leaf.shape)}: dimension {dim} ({size}) "
                    f"is not divisible by mesh axes {axes} of size {n}; change the model config "
                    "or the mesh (or map that logical axis to None in sharding_rules)")


def drop_empty_boxes(tree: Any) -> Any:
    """`tree` with every logically partitioned box that holds no array replaced by its content
    (the optax.MaskedNode an optimizer keeps for frozen parameters, train/optim.py), so that
    the boxed tree, its specs and the unboxed tree have the same structure."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.Partitioned) and not jax.tree_util.tree_leaves(
            x.value) else x, tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def sharded_init(init_fn, mesh: Mesh, rules, *args):
    """Runs `init_fn(*args)` (which returns a pytree of boxed, logically named leaves) directly
    into its shardings: eval_shape → logical specs → jit(out_shardings). No device ever holds
    a full replica of a sharded leaf. Returns (unboxed state, its shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    logical = nn.get_partition_spec(abstract)
    shardings = logical_to_mesh_sharding(logical, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.unbox(boxed), shardings


def maybe_initialize_distributed(flag: Optional[bool] = None, *,
                                 heartbeat_timeout_s: Optional[int] = None) -> bool:
    """Calls jax.distributed.initialize() when the run is multi-process.

    Multi-process when `flag` is True, or when the environment says so: MNEMAX_DISTRIBUTED=1,
    a JAX coordinator address (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID), SLURM with more than one task, or a TPU pod slice (TPU_WORKER_HOSTNAMES
    with several hosts). Returns whether it initialised.

    A process that stops sending heartbeats for `heartbeat_timeout_s` (JAX's default: 100 s)
    is declared dead and every other process aborts with "Terminating process because the JAX
    distributed service detected fatal errors ... another task died", instead of waiting in a
    collective forever; relaunching every process resumes from the last complete checkpoint.
    """
    env = os.environ
    if flag is None:
        flag = (env.get("MNEMAX_DISTRIBUTED") == "1"
                or "JAX_COORDINATOR_ADDRESS" in env
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if not flag:
        return False
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
    # CPU collectives across processes (tests, laptops); no effect on GPU/TPU. Must not touch
    # the backend before initialize(), so it is set unconditionally.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # a jax without the option uses its default
        pass
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def describe(mesh: Mesh) -> str:
    return " × ".join(f"{n}={s}" for n, s in mesh.shape.items())


def per_device_bytes(tree: Any) -> int:
    """Largest number of bytes any one device holds of `tree` (for checking sharded init)."""
    per = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values()) if per else 0


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
