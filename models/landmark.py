"""Landmark attention (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context
Length for Transformers"), matching the official `lm_benchmark` code (epfml/landmark-attention).

Contents
- `landmark_attention_weights(q, k, is_landmark) -> probs [B, H, T, T]` and
  `landmark_attention_dense(q, k, v, is_landmark)`: the grouped softmax (paper Eq. 2–4), written
  out densely; the reference for everything else.
- `landmark_attention(q, k, v, is_landmark)`: the same numbers, blockwise over queries (causal key
  ranges, one rematerialised tile at a time), `LandmarkLM`'s attention "landmark": the one that
  trains; `impl="pallas"` runs the training layout through flash-style Pallas kernels instead:
  models/landmark_pallas.py (GPU, the Triton lowering) or models/landmark_pallas_tpu.py (TPU,
  Mosaic), by backend (`LandmarkConfig.attention_impl`).
- `LandmarkConfig`, `official_gpt_config`, `LandmarkLM`, `insert_landmarks`, `landmark_targets`,
  `landmark_positions` (the paper's positional jumps), `make_landmark_batch`.
- `config_from_dict`, `build_from_config`: the trainer's model builder (the objective is
  train/objectives/landmark.py).

Beside it: models/landmark_memory.py (memory inference with the block cache) and
models/landmark_convert.py (the official checkpoint → mnemax params).

Grouped softmax, in words (the reference README): a key's block id is the number of landmarks strictly
before it. For query i over keys j ≤ i: *own* keys are regular keys of i's block, *gates* are
landmarks of earlier blocks, *past* keys are regular keys of earlier blocks. One softmax runs over own
keys and gates (P_top); inside each earlier block a second softmax runs over its regular keys (W_in);
past key j gets P_top[gate of its block] · W_in[j]; landmark keys get 0. A gate that closes an empty
block (a window starting with a landmark) keeps its share of P_top, which is then lost, as in the
official code. No `max_groups` limit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, transformer

# ---------------------------------------------------------------------------------------------
# The grouped softmax on scores
# ---------------------------------------------------------------------------------------------
def _segment_reduce(x, ids, num_segments: int, kind: str):
    """Reduces x [..., K] over runs of equal ids [..., K] (non-decreasing, < num_segments) → [..., n]."""
    ids = jnp.broadcast_to(ids, x.shape)
    lead = x.shape[:-1]
    R = math.prod(lead)
    K = x.shape[-1]
    flat_ids = (ids.reshape(R, K) + (jnp.arange(R, dtype=ids.dtype) * num_segments)[:, None])
    op = {"max": jax.ops.segment_max, "sum": jax.ops.segment_sum}[kind]
    out = op(x.reshape(R * K), flat_ids.reshape(R * K), num_segments=R * num_segments,
             indices_are_sorted=True)
    return out.reshape(*lead, num_segments)


def _gather_segments(x_seg, ids):
    """x_seg [..., n] values per segment → [..., K] at each key's segment id."""
    ids = jnp.broadcast_to(ids, x_seg.shape[:-1] + ids.shape[-1:])
    return jnp.take_along_axis(x_seg, ids, axis=-1)


def grouped_softmax(s, key_is_landmark, key_block, query_block, visible, keep=None):
    """The landmark grouped softmax on scores s [..., Tq, K] → probs [..., Tq, K] (s's dtype).

    key_is_landmark, key_block: [..., 1 or Tq, K] (bool, int32; block id = landmarks strictly before
    the key in this key sequence, so ids are non-decreasing along K); query_block: [..., Tq, 1];
    visible: [..., Tq, K] bool (causal/segment/validity mask). Maxima only stabilise (the result does
    not depend on them), so they are stop_gradient'ed and gradients are exact.
    keep [..., Tq, ≥ K + 1] (group dropout, `group_keep`): earlier block b's weights are scaled by
    keep[..., b] (0, or 1/(1-p)); own-block weights are not.
    """
    K = s.shape[-1]
    earlier = key_block < query_block
    own = visible & ~key_is_landmark & (key_block == query_block)
    gate = visible & key_is_landmark & earlier
    past = visible & ~key_is_landmark & earlier
    top = own | gate
    ninf = jnp.asarray(-jnp.inf, s.dtype)
    zero = jnp.zeros((), s.dtype)
    # P_top: softmax over own-block keys and gates (official "last section" + landmark buckets).
    m = jnp.max(jnp.where(top, s, ninf), axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, zero))
    e_top = jnp.where(top, jnp.exp(jnp.where(top, s, m) - m), zero)
    z = jnp.sum(e_top, axis=-1, keepdims=True)
    p_top = e_top / jnp.where(z > 0, z, 1)          # rows with nothing to attend stay 0 (official)
    # W_in: a softmax inside each earlier block, scaled by the P_top of the gate closing it.
    nseg = K + 1
    m_blk = _segment_reduce(jnp.where(past, s, ninf), key_block, nseg, "max")
    m_blk = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_blk), m_blk, zero))
    m_key = _gather_segments(m_blk, key_block)
    e_past = jnp.where(past, jnp.exp(jnp.where(past, s, m_key) - m_key), zero)
    d_blk = _segment_reduce(e_past, key_block, nseg, "sum")
    g_blk = _segment_reduce(jnp.where(gate, p_top, zero), key_block, nseg, "sum")  # gate b has id b
    f_blk = g_blk / jnp.where(d_blk > 0, d_blk, 1)
    if keep is not None:
        f_blk = f_blk * keep[..., :nseg].astype(f_blk.dtype)
    return jnp.where(own, p_top, zero) + e_past * _gather_segments(f_blk, key_block)


def check_qkv(q, k, v, is_landmark):
    chex.assert_rank(q, 4)
    if k.shape != q.shape:
        raise ValueError(f"k has shape {k.shape}; it must equal q's [B, T, H, D]={q.shape}")
    if v is not None and v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v has shape {v.shape}; its [B, T, H] must equal q's {q.shape[:3]}")
    is_landmark = jnp.asarray(is_landmark)
    if is_landmark.shape != q.shape[:2]:
        raise ValueError(f"is_landmark has shape {is_landmark.shape}; it must be [B, T]="
                         f"{q.shape[:2]}")
    if is_landmark.dtype != jnp.bool_:
        raise ValueError(f"is_landmark has dtype {is_landmark.dtype}; it must be bool")
    return is_landmark


def block_ids(is_landmark):
    """[B, T] int32: landmarks strictly before each position (a landmark has the id it closes)."""
    lm = is_landmark.astype(jnp.int32)
    return jnp.cumsum(lm, axis=-1) - lm


def acc_dtype(x):
    return jnp.promote_types(jnp.float32, x.dtype)


def group_keep(key, rate: float, shape_BxH, q_start: int, Tq: int, n: int):
    """Group dropout's scales [B, H, Tq, n]: 0 with probability `rate`, else 1 / (1 - rate), one
    per (row, head, query, earlier block) — the official `landmark_grouped_softmax`'s
    `dropout(group_prob, p_group_dropout)` (lm_benchmark models/landmark.py): a dropped block's
    weights all become 0, a kept one's are rescaled, the own block is never dropped. Query i's
    draws come from fold_in(key, i), so they do not depend on how queries are tiled."""
    rows = q_start + jnp.arange(Tq)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (*shape_BxH, n)))(rows)
    keep = (jnp.moveaxis(u, 0, 2) >= rate).astype(jnp.float32)      # [B, H, Tq, n]
    return keep / (1.0 - rate)


def _tile_probs(q_tile, k_keys, is_lm, ids, q_start: int, segment_ids=None, keep=None):
    """probs [B, H, Tq, K] for queries q_start + [0, Tq) over keys [0, K)."""
    B, Tq, H, D = q_tile.shape
    K = k_keys.shape[1]
    acc = acc_dtype(q_tile)
    s = jnp.einsum("bqhd,bkhd->bhqk", q_tile, k_keys, preferred_element_type=acc)
    s = s * (1.0 / math.sqrt(D))
    qpos = q_start + jnp.arange(Tq)
    visible = (jnp.arange(K)[None, :] <= qpos[:, None])[None, None]        # [1, 1, Tq, K]
    if segment_ids is not None:
        same = segment_ids[:, None, q_start:q_start + Tq, None] == segment_ids[:, None, None, :K]
        visible = visible & same
    visible = jnp.broadcast_to(visible, s.shape)
    key_lm = is_lm[:, None, None, :K]
    key_blk = ids[:, None, None, :K]
    q_blk = ids[:, None, q_start:q_start + Tq, None]
    return grouped_softmax(s, key_lm, key_blk, q_blk, visible, keep)


def _check_group_dropout(group_dropout, key):
    if not isinstance(group_dropout, (int, float)) or not 0 <= group_dropout < 1:
        raise ValueError(f"group_dropout={group_dropout!r} must be a number in [0, 1)")
    return bool(group_dropout) and key is not None


def landmark_attention_weights(q, k, is_landmark, *, segment_ids=None, group_dropout=0.0,
                               dropout_key=None):
    """Grouped-softmax weights [B, H, T, T] (float32, or float64 for float64 inputs).

    q, k [B, T, H, D] (already rotated), is_landmark [B, T] bool; scores are q·k/sqrt(D).
    group_dropout p with a `dropout_key`: each earlier block's weights dropped with probability
    p (kept ones scaled by 1/(1-p); `group_keep`); without a key, no dropout.
    """
    is_landmark = check_qkv(q, k, None, is_landmark)
    keep = None
    if _check_group_dropout(group_dropout, dropout_key):
        B, T, H, _ = q.shape
        keep = group_keep(dropout_key, group_dropout, (B, H), 0, T, T + 1)
    return _tile_probs(q, k, is_landmark, block_ids(is_landmark), 0, segment_ids, keep)


def landmark_attention_dense(q, k, v, is_landmark, *, segment_ids=None, group_dropout=0.0,
                             dropout_key=None):
    """y [B, T, H, D] = weights @ v with the full [B, H, T, T] weights (the reference version)."""
    p = landmark_attention_weights(q, k, is_landmark, segment_ids=segment_ids,
                                   group_dropout=group_dropout, dropout_key=dropout_key)
    y = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
    return y.astype(q.dtype)


def _periodic_tile(q_tile, k_keys, v_keys, start: int, block_len: int, segment_ids=None,
                   keep=None):
    """y [B, Tq, H, D] for queries start + [0, Tq) when landmarks sit exactly at t % S == S - 1.

    Keys [0, K) with K a multiple of S = block_len, reshaped to [NB, S] blocks: every segment
    reduction of `grouped_softmax` becomes a reduction over the last axis (no scatter/gather).
    Same formula: own block (j ≤ i, regular) and gates in one softmax, a softmax inside each earlier
    block scaled by its gate's probability; landmark values never reach the output. keep
    [B, H, Tq, ≥ NB]: group dropout's scales of the earlier blocks (`group_keep`).
    """
    B, Tq, H, D = q_tile.shape
    K = k_keys.shape[1]
    S = block_len
    NB = K // S
    acc = acc_dtype(q_tile)
    s = jnp.einsum("bqhd,bkhd->bhqk", q_tile, k_keys, preferred_element_type=acc)
    s5 = (s * (1.0 / math.sqrt(D))).reshape(B, H, Tq, NB, S)
    i = start + jnp.arange(Tq)
    qb = (i // S)[:, None]                                          # [Tq, 1]
    b = jnp.arange(NB)[None, :]                                     # [1, NB]
    j = b[..., None] * S + jnp.arange(S)                            # [1, NB, S]
    regular = jnp.arange(S) < S - 1
    own5 = ((b == qb)[..., None] & regular & (j <= i[:, None, None]))   # [Tq, NB, S]
    past5 = (b < qb)[..., None] & regular
    gate = b < qb                                                   # [Tq, NB]
    if segment_ids is not None:
        same = (segment_ids[:, start:start + Tq, None] == segment_ids[:, None, :K])
        same5 = same.reshape(B, 1, Tq, NB, S)
        own5, past5 = own5 & same5, past5 & same5
        gate = gate & same5[..., S - 1]
    ninf = jnp.asarray(-jnp.inf, acc)
    zero = jnp.zeros((), acc)
    s_lm = s5[..., S - 1]                                           # [B, H, Tq, NB]
    m = jnp.maximum(jnp.max(jnp.where(own5, s5, ninf), axis=(-2, -1)),
                    jnp.max(jnp.where(gate, s_lm, ninf), axis=-1))[..., None]
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, zero))  # [B, H, Tq, 1]
    m_blk = jnp.max(jnp.where(past5, s5, ninf), axis=-1)
    m_blk = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_blk), m_blk, zero))
    own_blk = (b == qb)
    stab = jnp.where(own_blk, m, m_blk)                             # [B, H, Tq, NB]
    valid5 = own5 | past5
    e = jnp.exp(jnp.where(valid5, s5 - stab[..., None], ninf))      # one exp for both levels
    e_gate = jnp.exp(jnp.where(gate, s_lm - m, ninf))
    z = jnp.sum(jnp.where(own_blk, jnp.sum(e, -1), zero), -1, keepdims=True) + jnp.sum(
        e_gate, -1, keepdims=True)
    inv_z = 1 / jnp.where(z > 0, z, 1)
    d_blk = jnp.sum(e, axis=-1)
    # An earlier block's d_blk holds its max term exp(0) = 1, so it is 0 or >= 1. The own block's
    # (stabilised by the top-level max) can be denormal; it is not a divisor there, and dividing
    # by it in the discarded branch would still put 0 · inf = NaN into the gradient.
    d_safe = jnp.where(own_blk | (d_blk <= 0), 1, d_blk)
    fac = jnp.where(own_blk, inv_z, e_gate * inv_z / d_safe)
    if keep is not None:
        fac = fac * jnp.where(own_blk, 1, keep[..., :NB].astype(fac.dtype))
    w = (e * fac[..., None]).reshape(B, H, Tq, NB * S)
    return jnp.einsum("bhqk,bkhd->bqhd", w.astype(v_keys.dtype), v_keys).astype(q_tile.dtype)


# impl values: "pallas" is the backend's kernel, "pallas_gpu" / "pallas_tpu" one of them by name
# (either runs on CPU in interpret mode, which is how tests check both).
IMPLS = ("xla", "pallas", "pallas_gpu", "pallas_tpu", "auto")
PALLAS_IMPLS = ("pallas_gpu", "pallas_tpu")
PALLAS_BLOCKS = {"pallas_gpu": (64, 64), "pallas_tpu": (128, 128)}    # each kernel's default tiles


def resolve_impl(impl: str, *, mem_freq=None, dropout: bool = False) -> str:
    """'xla', 'pallas_gpu' or 'pallas_tpu' for `landmark_attention`'s impl. 'pallas' is the
    backend's kernel: the Mosaic one (models/landmark_pallas_tpu.py) on the tpu backend, else
    the Triton-style one (models/landmark_pallas.py; on CPU only in interpret mode). 'auto' is
    'pallas' on the gpu and tpu backends when the kernels serve the call (mem_freq given, no
    group dropout), else 'xla'. The backend is the one traced for (`layers.target_backend`: the
    mesh's devices where one is set, so a dry run for a GPU or TPU picks their kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    backend = layers.target_backend()
    if impl == "auto":
        serves = backend in ("gpu", "tpu") and mem_freq is not None and not dropout
        impl = "pallas" if serves else "xla"
    if impl == "pallas":
        return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    return impl


def landmark_attention(q, k, v, is_landmark, *, segment_ids=None, q_block: int = 256,
                       mem_freq: Optional[int] = None, group_dropout: float = 0.0,
                       dropout_key=None, impl: str = "xla", interpret: bool = False,
                       pallas_blocks: Optional[tuple[int, int]] = None):
    """Landmark attention y [B, T, H, D], blockwise over queries.

    Query tiles of `q_block` rows only score the causal key prefix [0, tile end), and each tile is
    rematerialised in the backward pass (jax.checkpoint), so at most one [B, H, q_block, T] weight
    tile exists at a time and the masked upper triangle is never computed. Same numbers as
    `landmark_attention_dense` (identical formula per row). Gradients by autodiff.

    mem_freq (static, optional): when given and is_landmark is exactly the training layout
    (landmark at t % (mem_freq+1) == mem_freq, as `insert_landmarks` makes), a reshape-based tile
    runs instead of the general segment reductions; any other is_landmark takes the general path
    (decided at run time with lax.cond, so the result never depends on the hint).

    group_dropout p with a `dropout_key` (training): the official group dropout (`group_keep`);
    both paths and `landmark_attention_dense` draw the same scales for the same key.

    impl (static): "xla" (the default) is the above; "pallas" runs the training layout through
    flash-style Pallas kernels (forward and backward; the same numbers to float32 rounding):
    models/landmark_pallas_tpu.py (Mosaic) on the tpu backend, models/landmark_pallas.py
    (Triton style) elsewhere; "pallas_tpu" / "pallas_gpu" name one of them whatever the backend
    (off its backend only with interpret=True). A kernel needs mem_freq, takes no group
    dropout, and sends any other is_landmark to the general XLA path under the same lax.cond;
    "auto" is "pallas" on the gpu and tpu backends when it serves the call, else "xla"
    (`resolve_impl`). interpret: run the kernels in Pallas interpret mode (CPU; tests; TPU
    interpret mode for the Mosaic kernels). pallas_blocks: the kernel's (query, key) tile
    sizes, powers of two ≥ 16 (the key tile ≥ 128 for the Mosaic kernels); None: the kernel's
    default (`PALLAS_BLOCKS`).
    """
    is_landmark = check_qkv(q, k, v, is_landmark)
    if not isinstance(q_block, int) or q_block <= 0:
        raise ValueError(f"q_block={q_block!r} must be a positive integer")
    B, T, H, D = q.shape
    starts = list(range(0, T, q_block))
    dropout = _check_group_dropout(group_dropout, dropout_key)
    requested = impl
    impl = resolve_impl(impl, mem_freq=mem_freq, dropout=dropout)
    if impl in PALLAS_IMPLS:
        backend = layers.target_backend()
        if not interpret and backend != {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}[impl]:
            raise ValueError(f"impl={requested!r} is not allowed on the {backend} backend "
                             "without interpret=True (slow; tests); use impl='auto' or 'xla'")
        if mem_freq is None:
            raise ValueError(f"mem_freq=None is not allowed with impl={requested!r}: the kernel "
                             "runs the training layout; pass mem_freq, or use impl='xla'")
        if dropout:
            raise ValueError(f"group_dropout={group_dropout!r} is not allowed with "
                             f"impl={requested!r} (no dropout in the kernel); use impl='xla' or "
                             "group_dropout=0")
        if pallas_blocks is None:
            pallas_blocks = PALLAS_BLOCKS[impl]
        min_k = 128 if impl == "pallas_tpu" else 16
        if (not isinstance(pallas_blocks, (tuple, list)) or len(pallas_blocks) != 2
                or not all(isinstance(b, int) and b >= m and not b & (b - 1)
                           for b, m in zip(pallas_blocks, (16, min_k)))):
            raise ValueError(f"pallas_blocks={pallas_blocks!r} must be two powers of two (query "
                             f"tile ≥ 16, key tile ≥ {min_k}) for impl={requested!r}")

    def keep_of(start, end):
        if not dropout:
            return None
        return group_keep(dropout_key, group_dropout, (B, H), start, end - start, T + 1)

    def general(q, k, v, is_landmark, segment_ids):
        ids = block_ids(is_landmark)

        def tile(q_tile, k_keys, v_keys, is_lm, ids_, seg, start, end):
            p = _tile_probs(q_tile, k_keys, is_lm, ids_, start, seg, keep_of(start, end))
            return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v_keys.dtype), v_keys).astype(q.dtype)

        outs = []
        for start in starts:
            end = min(start + q_block, T)
            fn = jax.checkpoint(functools.partial(tile, start=start, end=end))
            outs.append(fn(q[:, start:end], k[:, :end], v[:, :end], is_landmark, ids,
                           segment_ids))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    if mem_freq is None:
        return general(q, k, v, is_landmark, segment_ids)
    S = _check_mem_freq(mem_freq) + 1
    T_pad = -(-T // S) * S
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))

    def periodic(q, k, v, is_landmark, segment_ids):
        if impl in PALLAS_IMPLS:
            if impl == "pallas_tpu":
                from models.landmark_pallas_tpu import landmark_attention_pallas_tpu as fn
            else:
                from models.landmark_pallas import landmark_attention_pallas as fn
            kernel = functools.partial(fn, mem_freq=S - 1, block_q=pallas_blocks[0],
                                       block_k=pallas_blocks[1], interpret=interpret)
            return layers.per_shard(kernel, q, k, v, segment_ids)
        kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
        seg = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, T_pad - T)),
                                                       constant_values=-1)
        outs = []
        for start in starts:
            end = min(start + q_block, T)
            end_p = -(-end // S) * S
            fn = jax.checkpoint(functools.partial(_periodic_tile, start=start, block_len=S))
            outs.append(fn(q[:, start:end], kp[:, :end_p], vp[:, :end_p], segment_ids=seg,
                           keep=keep_of(start, end)))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    layout = (jnp.arange(T) % S) == S - 1
    is_layout = jnp.all(is_landmark == layout[None, :])
    return jax.lax.cond(is_layout, periodic, general, q, k, v, is_landmark, segment_ids)


# The attention functions LandmarkLM passes to the decoder (models.transformer.AttentionFn), by
# `model.attention`: blockwise ('landmark', the default) or the dense reference.
def _blockwise_attention_fn(q, k, v, *, is_landmark, segment_ids=None, q_block=256,
                            mem_freq=None, group_dropout=0.0, group_dropout_key=None,
                            impl="xla", **unused):
    if unused:
        raise ValueError(f"landmark attention got unsupported arguments {sorted(unused)}")
    return landmark_attention(q, k, v, is_landmark, segment_ids=segment_ids, q_block=q_block,
                              mem_freq=mem_freq, group_dropout=group_dropout,
                              dropout_key=group_dropout_key, impl=impl)


def _dense_attention_fn(q, k, v, *, is_landmark, segment_ids=None, mem_freq=None,
                        group_dropout=0.0, group_dropout_key=None, impl="xla", **unused):
    del impl  # the dense reference has one implementation
    if unused:
        raise ValueError(f"landmark attention got unsupported arguments {sorted(unused)}")
    return landmark_attention_dense(q, k, v, is_landmark, segment_ids=segment_ids,
                                    group_dropout=group_dropout, dropout_key=group_dropout_key)


ATTENTION_FNS = {"landmark": _blockwise_attention_fn, "landmark_dense": _dense_attention_fn}


# ---------------------------------------------------------------------------------------------
# Landmark tokens, targets, positions
# ---------------------------------------------------------------------------------------------
def _check_mem_freq(mem_freq):
    if not isinstance(mem_freq, (int, np.integer)) or isinstance(mem_freq, bool) or mem_freq <= 0:
        raise ValueError(f"mem_freq={mem_freq!r} must be a positive integer")
    return int(mem_freq)


def insert_landmarks(tokens, mem_freq: int, landmark_id: int):
    """tokens [B, T] → [B, T + T // mem_freq] with `landmark_id` after every mem_freq-th token."""
    mem_freq = _check_mem_freq(mem_freq)
    tokens = jnp.asarray(tokens)
    chex.assert_rank(tokens, 2)
    B, T = tokens.shape
    n = T // mem_freq
    full = tokens[:, :n * mem_freq].reshape(B, n, mem_freq)
    lm = jnp.full((B, n, 1), landmark_id, tokens.dtype)
    body = jnp.concatenate([full, lm], axis=-1).reshape(B, n * (mem_freq + 1))
    return jnp.concatenate([body, tokens[:, n * mem_freq:]], axis=1)


def landmark_mask(T: int, mem_freq: int) -> jax.Array:
    """[T_aug] bool for an augmented length T_aug: True at inserted landmark slots."""
    mem_freq = _check_mem_freq(mem_freq)
    t = jnp.arange(T)
    return (t % (mem_freq + 1)) == mem_freq


def landmark_targets(targets, mem_freq: int, *, ignore_index: int = -1):
    """Targets [B, T] of the raw inputs → [B, T + T // mem_freq] for the augmented inputs.

    A regular input keeps its target (so the token followed by a landmark predicts the token after
    the landmark); landmark slots get `ignore_index`.
    """
    return insert_landmarks(targets, mem_freq, ignore_index)


def landmark_positions(is_landmark, *, key=None, max_jump: int = 0):
    """Positions [B, T] int32: 0..T-1 plus, with max_jump > 0, the paper's positional jumps.

    Jumps (official `rotary_mem_jump`, `pos_jump_on_mem`): after each landmark the following positions
    shift by a uniform integer in [0, max_jump), cumulatively.
    """
    is_landmark = jnp.asarray(is_landmark)
    chex.assert_rank(is_landmark, 2)
    B, T = is_landmark.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if not max_jump:
        return pos
    if not isinstance(max_jump, int) or max_jump < 0:
        raise ValueError(f"max_jump={max_jump!r} must be a non-negative integer")
    if key is None:
        raise ValueError("landmark_positions with max_jump > 0 needs a PRNG key")
    r = jax.random.randint(key, (B, T), 0, max_jump, dtype=jnp.int32)
    jumps = jnp.cumsum(jnp.where(is_landmark, r, 0), axis=-1)
    return pos + jnp.pad(jumps[:, :-1], ((0, 0), (1, 0)))


def make_landmark_batch(tokens, mem_freq: int, landmark_id: int, *, ignore_index: int = -1,
                        key=None, max_jump: int = 0) -> dict:
    """A training batch from raw tokens [B, T + 1]: inputs/targets [B, T_aug], is_landmark, positions."""
    tokens = jnp.asarray(tokens)
    chex.assert_rank(tokens, 2)
    inputs = insert_landmarks(tokens[:, :-1], mem_freq, landmark_id)
    targets = landmark_targets(tokens[:, 1:], mem_freq, ignore_index=ignore_index)
    is_landmark = jnp.broadcast_to(landmark_mask(inputs.shape[1], mem_freq), inputs.shape)
    return {"inputs": inputs, "targets": targets, "is_landmark": is_landmark,
            "positions": landmark_positions(is_landmark, key=key, max_jump=max_jump)}


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LandmarkConfig:
    model: transformer.TransformerConfig   # the body; attention must be 'landmark' or 'landmark_dense'
    mem_freq: int = 50                     # regular tokens per block (paper: block length 50)
    landmark_id: int = 0                   # token id of the landmark (an extra vocabulary entry)
    pos_jump: int = 0                      # training only: positional jumps in [0, pos_jump) after
                                           # each landmark (paper's augmentation; 0 = off)
    group_dropout: float = 0.0             # training only: each earlier block dropped from a
                                           # query's attention with this probability (official
                                           # --group_dropout; 0 = off)
    attention_impl: str = "xla"            # 'landmark' attention's implementation (IMPLS):
                                           # 'xla' (blockwise), 'pallas' (the backend's Pallas
                                           # kernels: landmark_pallas_tpu.py on tpu,
                                           # landmark_pallas.py on gpu), 'pallas_gpu' /
                                           # 'pallas_tpu' (one by name) or 'auto' (pallas on
                                           # gpu and tpu, else xla: a run evaluated on CPU)

    def __post_init__(self):
        _check_mem_freq(self.mem_freq)
        if (not isinstance(self.group_dropout, (int, float)) or isinstance(self.group_dropout, bool)
                or not 0 <= self.group_dropout < 1):
            raise ValueError(f"group_dropout={self.group_dropout!r} must be a number in [0, 1)")
        if self.attention_impl not in IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} must be one of {IMPLS}")
        if (self.attention_impl in ("pallas",) + PALLAS_IMPLS and self.group_dropout
                and self.model.attention == "landmark"):
            raise ValueError(f"attention_impl={self.attention_impl!r} is not allowed with "
                             f"group_dropout={self.group_dropout} (no dropout in the kernel); "
                             "use 'xla' or 'auto'")
        if not isinstance(self.pos_jump, int) or self.pos_jump < 0:
            raise ValueError(f"pos_jump={self.pos_jump!r} must be a non-negative integer")
        if self.model.attention not in ATTENTION_FNS:
            raise ValueError(f"model.attention={self.model.attention!r} must be 'landmark' or "
                             "'landmark_dense'")
        if not 0 <= self.landmark_id < self.model.vocab_size:
            raise ValueError(f"landmark_id={self.landmark_id} must be in [0, vocab_size="
                             f"{self.model.vocab_size})")

    def replace(self, **kw) -> "LandmarkConfig":
        return dataclasses.replace(self, **kw)


def official_gpt_config(*, vocab_size: int, n_embd: int, n_head: int, n_layer: int, mem_freq: int,
                        landmark_id: int, dtype=jnp.float32) -> LandmarkConfig:
    """The official lm_benchmark GPT: pre-LayerNorm (weight only, eps 1e-5), exact GELU 4× MLP,
    interleaved RoPE base 1e4, tied embeddings, no biases. dtype float64 (with x64 enabled) computes
    and stores parameters in float64 for parity runs."""
    dt = transformer.as_dtype(dtype)
    model = transformer.TransformerConfig(
        vocab_size=vocab_size, width=n_embd, num_layers=n_layer, num_heads=n_head,
        mlp="gelu", norm="layernorm", norm_eps=1e-5, tie_embeddings=True, rope_base=10000.0,
        rope_interleaved=True, attention="landmark", dtype=dt,
        param_dtype=dt if dt == jnp.float64 else jnp.float32)
    return LandmarkConfig(model=model, mem_freq=mem_freq, landmark_id=landmark_id)


def as_landmark_config(config) -> LandmarkConfig:
    if not isinstance(config, LandmarkConfig):
        raise ValueError(f"config must be a LandmarkConfig, got {type(config).__name__}")
    return config


class LandmarkLM(nn.Module):
    """tokens [B, T] (landmarks already inserted) → logits [B, T, V] (float32, float64 for x64 runs).

    The baseline `Transformer` with landmark attention; same param tree (embed, block_i/{ln_1,
    attn/{query,key,value,out}, ln_2, mlp}, ln_f), so checkpoints and converters are shared.
    is_landmark [B, T] defaults to tokens == landmark_id (as the official code); positions [T] or
    [B, T] default to 0..T-1 (use `landmark_positions` for the paper's positional jumps).
    group_dropout_key (training): with config.group_dropout > 0, every layer drops blocks with
    its own key (fold_in(key, layer)); None: no dropout (evaluation).
    """
    config: LandmarkConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, positions=None, is_landmark=None, segment_ids=None,
                 return_hidden: bool = False, group_dropout_key=None):
        lc = as_landmark_config(self.config)
        c = lc.model
        chex.assert_rank(tokens_BxT, 2)
        B, T = tokens_BxT.shape
        if is_landmark is None:
            is_landmark = tokens_BxT == lc.landmark_id
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
        # mem_freq and the dropout rate are bound into the attention function, not passed with
        # the arrays: under remat (model.remat) every block argument is traced, and they must
        # stay static.
        layer_kwargs = None
        if lc.group_dropout and group_dropout_key is not None:
            layer_kwargs = [{"group_dropout_key": jax.random.fold_in(group_dropout_key, i)}
                            for i in range(c.num_layers)]
        return transformer.decoder_forward(
            c, tokens_BxT, positions=positions, segment_ids=segment_ids,
            attention_kwargs={"is_landmark": is_landmark}, return_hidden=return_hidden,
            layer_attention_kwargs=layer_kwargs,
            attention_fn=functools.partial(ATTENTION_FNS[c.attention], mem_freq=lc.mem_freq,
                                           group_dropout=lc.group_dropout,
                                           impl=lc.attention_impl))



# ---------------------------------------------------------------------------------------------
# The trainer's model builder (train/trainer.py MODELS; the objective: train/objectives/landmark.py)
# ---------------------------------------------------------------------------------------------
_LANDMARK_FIELDS = ("mem_freq", "landmark_id", "pos_jump", "group_dropout", "attention_impl")


def config_from_dict(model_cfg: Mapping[str, Any]) -> LandmarkConfig:
    """A `LandmarkConfig` from a flat model config dict: the `TransformerConfig` fields plus
    mem_freq, landmark_id, pos_jump, group_dropout, attention_impl ('family' is ignored;
    attention defaults to 'landmark')."""
    d = dict(model_cfg)
    d.pop("family", None)
    missing = [f for f in ("mem_freq", "landmark_id") if f not in d]
    if missing:
        raise ValueError(f"landmark model config is missing {missing} (mem_freq: regular tokens "
                         "per block; landmark_id: the landmark token, e.g. tokenizer.LANDMARK)")
    lm = {f: d.pop(f) for f in _LANDMARK_FIELDS if f in d}
    d.setdefault("attention", "landmark")
    return LandmarkConfig(model=transformer.TransformerConfig.from_dict(d), **lm)


def build_from_config(model_cfg: Mapping[str, Any]) -> "LandmarkLM":
    """The trainer's builder (MODELS["landmark"]): model config dict → `LandmarkLM`."""
    return LandmarkLM(config_from_dict(model_cfg))
