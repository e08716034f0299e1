"""Fixed-capacity key-value bank: keys [N, Dk], values [N, *value_shape], ring-buffer writes.

A `Bank` is a `flax.struct.dataclass` pytree; every function here is pure and returns a new bank,
so a bank goes into `jax.jit`, comes out, is checkpointed and sharded like any array. The entry
axis N carries the logical axis name 'memory' (`logical_axes`), so one bank can span devices;
`topk` then reads it in two stages (top-k per shard, merge of the candidates) and never gathers
the whole bank onto one device.

Users: MAC's bank of per-document modulations (values [N, T, D], one `write` with M=1 per
document, append-only until full), and any model that wants a retrieval memory.

Conventions of the read (`topk`):
- scores are dot products q . k, accumulated in float32. `precision` defaults to HIGHEST: with
  DEFAULT a float32 bank on an H200 (TF32 matmuls) returned 4 of 512 top-16 indices different
  from a float64 reference (N=65536, Dk=64), while HIGHEST matched it and cost no measurable
  time (the top-k dominates); on TPU DEFAULT would round keys to bfloat16;
- empty slots never win: internally their score is -inf and a valid entry's score is clamped to
  at least `finfo(float32).min`, so every valid entry ranks above every empty slot;
- ties go to the lowest slot index (as `lax.top_k`, which is stable); the sharded read keeps
  this order, so it returns the same indices as the unsharded read (exactly, whenever the two
  matmuls round a score the same way; exact ties included);
- when fewer than k entries are valid, the extra results are defined and NaN-free:
  `valid=False`, `score=finfo(float32).min`, `index=0` (always safe to gather), `value=0`.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

# The logical axis name of the entry axis (see train/sharding.py for the rules).
MEMORY_AXIS = "memory"

# Score given to results past the number of valid entries: finite, so downstream softmaxes and
# losses stay NaN-free; the `valid` mask says which results are real.
EMPTY_SCORE = float(jnp.finfo(jnp.float32).min)

AxisNames = Union[str, Sequence[str]]

# jax >= 0.8 can type an all_gather result as invariant over the gathered axes, which lets
# shard_map check that the merged top-k is replicated; older jax needs the check off.
_GATHER_INVARIANT = "to" in inspect.signature(jax.lax.all_gather).parameters


@struct.dataclass
class Bank:
    """keys [N, Dk], values [N, *value_shape], valid [N] bool, step [N] int32, cursor/count [].

    step[n] is the write number (0, 1, 2, ...) of the entry in slot n, -1 while the slot is empty;
    cursor is the slot the next write goes to; count is the number of entries written so far.
    Capacity and shapes are static: they come from the array shapes.
    """
    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    step: jax.Array
    cursor: jax.Array
    count: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    @property
    def value_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    @property
    def dtype(self):
        return self.keys.dtype


class TopK(NamedTuple):
    """Result of `topk` for Q queries: scores/indices/valid [Q, k], values [Q, k, *value_shape]."""
    scores: jax.Array   # [Q, k] float32, descending; EMPTY_SCORE where not valid
    indices: jax.Array  # [Q, k] int32 slot indices; 0 where not valid
    values: jax.Array   # [Q, k, *value_shape]; zeros where not valid
    valid: jax.Array    # [Q, k] bool


class Entries(NamedTuple):
    """All slots of a bank, oldest entry first, empty slots last (see `read_all`)."""
    keys: jax.Array     # [N, Dk]
    values: jax.Array   # [N, *value_shape]
    valid: jax.Array    # [N] bool
    step: jax.Array     # [N] int32
    slots: jax.Array    # [N] int32: the slot each row came from


# ---------------------------------------------------------------------------------------------
# Construction and writes
# ---------------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a positive int")
    return value


def init(capacity: int, key_dim: int, value_shape: Union[int, Sequence[int]], *,
         dtype=jnp.float32, value_dtype=None) -> Bank:
    """An empty bank: keys [capacity, key_dim], values [capacity, *value_shape] (zeros).

    `dtype` is the key dtype and, unless `value_dtype` is given, the value dtype. `value_shape`
    may be () for scalar values or an int for vectors.
    """
    _positive_int("capacity", capacity)
    _positive_int("key_dim", key_dim)
    if isinstance(value_shape, int) and not isinstance(value_shape, bool):
        value_shape = (value_shape,)
    try:
        value_shape = tuple(value_shape)
    except TypeError:
        raise ValueError(f"value_shape={value_shape!r} is not allowed: it must be a tuple of "
                         "positive ints") from None
    for d in value_shape:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"value_shape={value_shape!r} is not allowed: it must be a tuple of "
                             "positive ints")
    value_dtype = dtype if value_dtype is None else value_dtype
    return Bank(
        keys=jnp.zeros((capacity, key_dim), dtype),
        values=jnp.zeros((capacity, *value_shape), value_dtype),
        valid=jnp.zeros((capacity,), jnp.bool_),
        step=jnp.full((capacity,), -1, jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def write(bank: Bank, keys: jax.Array, values: jax.Array, *,
          mask: Optional[jax.Array] = None) -> Bank:
    """Writes keys [M, Dk] and values [M, *value_shape] at the cursor, wrapping (ring buffer).

    Entries are written in order, so once the bank is full each write evicts the oldest entries.
    If more than N entries are written at once, only the last N are kept (as if written one by
    one). `mask` [M] bool (optional, may be traced) skips entries, e.g. padding documents: the
    kept entries are packed into consecutive slots. Slots that are not written stay bitwise
    unchanged. Inputs are cast to the bank's dtypes. Jittable; shapes are checked at trace time.
    """
    keys = jnp.asarray(keys)
    values = jnp.asarray(values)
    if keys.ndim != 2 or keys.shape[1] != bank.key_dim:
        raise ValueError(f"keys.shape={keys.shape} is not allowed: keys must be [M, key_dim] with "
                         f"key_dim={bank.key_dim}")
    m = keys.shape[0]
    if values.shape != (m, *bank.value_shape):
        raise ValueError(f"values.shape={values.shape} is not allowed: values must be "
                         f"[M, *value_shape] = {(m, *bank.value_shape)}")
    if mask is None:
        mask = jnp.ones((m,), jnp.bool_)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != (m,):
            raise ValueError(f"mask.shape={mask.shape} is not allowed: mask must be [M] = ({m},)")
        mask = mask.astype(jnp.bool_)
    if m == 0:
        return bank
    n_slots = bank.capacity
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1          # [M] order among the written entries
    n_written = rank[-1] + 1
    # Entries that a later entry of this same write would overwrite are dropped, so every kept
    # entry has its own slot and the scatter is deterministic.
    keep = mask & (rank >= n_written - n_slots)
    # Slot n_slots is out of range: the scatter drops those entries.
    slot = jnp.where(keep, (bank.cursor + rank) % n_slots, n_slots)
    step = bank.count + rank
    new = bank.replace(
        keys=bank.keys.at[slot].set(keys.astype(bank.keys.dtype), mode="drop"),
        values=bank.values.at[slot].set(values.astype(bank.values.dtype), mode="drop"),
        valid=bank.valid.at[slot].set(True, mode="drop"),
        step=bank.step.at[slot].set(step.astype(jnp.int32), mode="drop"),
        cursor=((bank.cursor + n_written) % n_slots).astype(jnp.int32),
        count=(bank.count + n_written).astype(jnp.int32),
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(new, bank)
    return new


# ---------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------
def num_valid(bank: Bank) -> jax.Array:
    """Number of valid entries, scalar int32."""
    return jnp.sum(bank.valid, dtype=jnp.int32)


def gather(bank: Bank, indices: jax.Array) -> jax.Array:
    """values [*indices.shape, *value_shape] of the slots `indices` (int, in [0, N); clamped)."""
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices.dtype={indices.dtype} is not allowed: indices must be integers")
    return jnp.take(bank.values, indices, axis=0, mode="clip")


def read_all(bank: Bank) -> Entries:
    """Every slot, oldest entry first and empty slots last (ties impossible: steps are unique).

    For aggregating over the whole bank (MAC's aggregation network). This reorders the entry
    axis, so on a sharded bank XLA moves the bank between devices; use it for small banks.
    """
    order_key = jnp.where(bank.valid, bank.step, jnp.iinfo(jnp.int32).max)
    slots = jnp.argsort(order_key, stable=True).astype(jnp.int32)
    return Entries(keys=bank.keys[slots], values=bank.values[slots], valid=bank.valid[slots],
                   step=bank.step[slots], slots=slots)


def _check_query(bank: Bank, queries: jax.Array, k) -> None:
    if queries.ndim != 2 or queries.shape[1] != bank.key_dim:
        raise ValueError(f"queries.shape={queries.shape} is not allowed: queries must be "
                         f"[Q, key_dim] with key_dim={bank.key_dim}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= bank.capacity:
        raise ValueError(f"k={k!r} is not allowed: it must be an int in [1, capacity] with "
                         f"capacity={bank.capacity}")


def _masked_scores(queries, keys, valid, precision) -> jax.Array:
    """scores [Q, N] float32: q . k for valid slots (at least EMPTY_SCORE), -inf for empty ones."""
    scores = jnp.einsum("qd,nd->qn", queries, keys, precision=precision,
                        preferred_element_type=jnp.float32)
    return jnp.where(valid[None, :], jnp.maximum(scores, EMPTY_SCORE), -jnp.inf)


def _finalize(scores, indices, values, valid) -> TopK:
    """Replaces results that are not valid entries with the defined, NaN-free ones."""
    value_mask = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    return TopK(scores=jnp.where(valid, scores, EMPTY_SCORE),
                indices=jnp.where(valid, indices, 0).astype(jnp.int32),
                values=jnp.where(value_mask, values, jnp.zeros((), values.dtype)),
                valid=valid)


def _all_gather(x, axis):
    """x [Q, c, ...] on each shard -> [Q, S*c, ...], shard-major (= global index order)."""
    if _GATHER_INVARIANT:
        return jax.lax.all_gather(x, axis, axis=1, tiled=True, to="invarying")
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _num_shards(mesh, axis: tuple[str, ...]) -> int:
    n = 1
    for name in axis:
        n *= mesh.shape[name]
    return n


def topk(bank: Bank, queries: jax.Array, k: int, *, mesh=None, axis: Optional[AxisNames] = None,
         precision=jax.lax.Precision.HIGHEST) -> TopK:
    """The k entries with the largest dot-product score for each query [Q, Dk].

    Returns `TopK(scores [Q, k], indices [Q, k], values [Q, k, *value_shape], valid [Q, k])`,
    scores descending, ties to the lowest index; see the module docstring for empty slots.
    `k`, `mesh`, `axis`, `precision` are static (`jax.jit(topk, static_argnames=...)`).

    Sharded read: with `axis` (a mesh axis name or a tuple of names, over which the entry axis
    is split; `mesh` defaults to the mesh set by `jax.set_mesh`), each shard takes the top-k of
    its own N/S entries inside `jax.shard_map` (global index = shard offset + local index), the
    S·k candidates (scores, indices, values) are all-gathered over `axis`, and a second top-k
    merges them. Only candidates move between devices, never the bank. Queries are replicated.
    The result equals the unsharded read: a shard's local winners include every entry that can
    win globally, and the gathered candidates are ordered by shard, i.e. by global index, so
    the stable merge breaks ties exactly as the unsharded top-k does.
    """
    queries = jnp.asarray(queries)
    _check_query(bank, queries, k)
    n_queries = queries.shape[0]
    if mesh is not None and axis is None:
        raise ValueError("axis=None is not allowed with a mesh: name the mesh axis (or axes) "
                         "that the entry axis is sharded over")

    if axis is None:
        scores = _masked_scores(queries, bank.keys, bank.valid, precision)     # [Q, N]
        scores, indices = jax.lax.top_k(scores, k)                              # [Q, k]
        out = _finalize(scores, indices, bank.values[indices], bank.valid[indices])
    else:
        axis = (axis,) if isinstance(axis, str) else tuple(axis)
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                raise ValueError(f"mesh=None is not allowed with axis={axis}: pass a mesh or set "
                                 "one with jax.set_mesh")
        for name in axis:
            if name not in mesh.axis_names:
                raise ValueError(f"axis={axis} is not allowed: {name!r} is not one of the mesh "
                                 f"axes {tuple(mesh.axis_names)}")
        n_shards = _num_shards(mesh, axis)
        if bank.capacity % n_shards:
            raise ValueError(f"capacity={bank.capacity} is not allowed with axis={axis}: it must "
                             f"be divisible by the number of shards, {n_shards}")
        local_k = min(k, bank.capacity // n_shards)

        def local_topk(q, keys, values, valid):
            # keys [N/S, Dk], values [N/S, ...], valid [N/S]: this shard's slots.
            scores = _masked_scores(q, keys, valid, precision)                 # [Q, N/S]
            scores, local = jax.lax.top_k(scores, local_k)                     # [Q, kl]
            offset = jax.lax.axis_index(axis) * keys.shape[0]
            cand = (scores, local + offset, values[local], valid[local])
            # [Q, S*kl, ...], ordered by shard: stage two sees candidates by global index.
            scores, glob, cand_values, cand_valid = (_all_gather(x, axis) for x in cand)
            scores, pos = jax.lax.top_k(scores, k)                             # [Q, k]
            pick = lambda x: jnp.take_along_axis(  # noqa: E731
                x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)
            return _finalize(scores, pick(glob), pick(cand_values), pick(cand_valid))

        out = jax.shard_map(
            local_topk, mesh=mesh,
            in_specs=(P(), P(axis, None), P(axis), P(axis)),
            out_specs=TopK(P(), P(), P(), P()), check_vma=_GATHER_INVARIANT,
        )(queries, bank.keys, bank.values, bank.valid)

    chex.assert_shape([out.scores, out.indices, out.valid], (n_queries, k))
    chex.assert_shape(out.values, (n_queries, k, *bank.value_shape))
    return out


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------
def logical_axes(bank: Bank) -> Bank:
    """A Bank of `PartitionSpec`s of logical axis names: ('memory', None) for keys,
    ('memory', None, ...) for values, ('memory',) for valid/step, () for cursor/count.

    PartitionSpecs are pytree leaves, so the result maps straight onto mesh shardings with
    `nn.logical_to_mesh_sharding(logical_axes(bank), mesh, rules)`; `tuple(spec)` gives the
    plain tuple of names. Works on abstract banks (`jax.eval_shape(init, ...)`).
    """
    return _specs(bank, MEMORY_AXIS)


def mesh_axes(bank: Bank, axis: Optional[AxisNames]) -> Bank:
    """A Bank of mesh `PartitionSpec`s with the entry axis split over `axis` (name or names),
    for callers that shard without logical rules: `jax.jit(..., out_shardings=...)`."""
    if axis is not None and not isinstance(axis, str):
        axis = tuple(axis)
    return _specs(bank, axis)


def _specs(bank: Bank, entry) -> Bank:
    n_value_dims = len(bank.values.shape) - 1
    return Bank(keys=P(entry, None), values=P(entry, *([None] * n_value_dims)),
                valid=P(entry), step=P(entry), cursor=P(), count=P())
