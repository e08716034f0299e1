"""Landmark attention (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context
Length for Transformers"), matching the official `lm_benchmark` code (epfml/landmark-attention).

Contents
- `landmark_attention_weights(q, k, is_landmark) -> probs [B, H, T, T]` and
  `landmark_attention_dense(q, k, v, is_landmark)`: the grouped softmax (paper Eq. 2–4), written
  out densely; the reference for everything else.
- `landmark_attention(q, k, v, is_landmark)`: the same numbers, blockwise over queries (causal key
  ranges, one rematerialised tile at a time), registered as attention "landmark" — the one that trains.
- `LandmarkConfig`, `official_gpt_config`, `LandmarkLM`, `insert_landmarks`, `landmark_targets`,
  `landmark_positions` (the paper's positional jumps), `make_landmark_batch`.
- `params_from_torch(state_dict, config)`: the official GPT's state dict → mnemax params.
- `memory_attention(...)` (one layer with the block memory) and `memory_logits(...)` (the official
  mem-cache inference, one jitted call per chunk).

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
import os
from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memory import block_cache
from models import layers, transformer

SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


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


def grouped_softmax(s, key_is_landmark, key_block, query_block, visible):
    """The landmark grouped softmax on scores s [..., Tq, K] → probs [..., Tq, K] (s's dtype).

    key_is_landmark, key_block: [..., 1 or Tq, K] (bool, int32; block id = landmarks strictly before
    the key in this key sequence, so ids are non-decreasing along K); query_block: [..., Tq, 1];
    visible: [..., Tq, K] bool (causal/segment/validity mask). Maxima only stabilise (the result does
    not depend on them), so they are stop_gradient'ed and gradients are exact.
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
    return jnp.where(own, p_top, zero) + e_past * _gather_segments(f_blk, key_block)


def _check_qkv(q, k, v, is_landmark):
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


def _acc_dtype(x):
    return jnp.promote_types(jnp.float32, x.dtype)


def _tile_probs(q_tile, k_keys, is_lm, ids, q_start: int, segment_ids=None):
    """probs [B, H, Tq, K] for queries q_start + [0, Tq) over keys [0, K)."""
    B, Tq, H, D = q_tile.shape
    K = k_keys.shape[1]
    acc = _acc_dtype(q_tile)
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
    return grouped_softmax(s, key_lm, key_blk, q_blk, visible)


def landmark_attention_weights(q, k, is_landmark, *, segment_ids=None):
    """Grouped-softmax weights [B, H, T, T] (float32, or float64 for float64 inputs).

    q, k [B, T, H, D] (already rotated), is_landmark [B, T] bool; scores are q·k/sqrt(D).
    """
    is_landmark = _check_qkv(q, k, None, is_landmark)
    return _tile_probs(q, k, is_landmark, block_ids(is_landmark), 0, segment_ids)


def landmark_attention_dense(q, k, v, is_landmark, *, segment_ids=None):
    """y [B, T, H, D] = weights @ v with the full [B, H, T, T] weights (the reference version)."""
    p = landmark_attention_weights(q, k, is_landmark, segment_ids=segment_ids)
    y = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
    return y.astype(q.dtype)


def _periodic_tile(q_tile, k_keys, v_keys, start: int, block_len: int, segment_ids=None):
    """y [B, Tq, H, D] for queries start + [0, Tq) when landmarks sit exactly at t % S == S - 1.

    Keys [0, K) with K a multiple of S = block_len, reshaped to [NB, S] blocks: every segment
    reduction of `grouped_softmax` becomes a reduction over the last axis (no scatter/gather).
    Same formula: own block (j ≤ i, regular) and gates in one softmax, a softmax inside each earlier
    block scaled by its gate's probability; landmark values never reach the output.
    """
    B, Tq, H, D = q_tile.shape
    K = k_keys.shape[1]
    S = block_len
    NB = K // S
    acc = _acc_dtype(q_tile)
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
    w = (e * fac[..., None]).reshape(B, H, Tq, NB * S)
    return jnp.einsum("bhqk,bkhd->bqhd", w.astype(v_keys.dtype), v_keys).astype(q_tile.dtype)


def landmark_attention(q, k, v, is_landmark, *, segment_ids=None, q_block: int = 256,
                       mem_freq: Optional[int] = None):
    """Landmark attention y [B, T, H, D], blockwise over queries.

    Query tiles of `q_block` rows only score the causal key prefix [0, tile end), and each tile is
    rematerialised in the backward pass (jax.checkpoint), so at most one [B, H, q_block, T] weight
    tile exists at a time and the masked upper triangle is never computed. Same numbers as
    `landmark_attention_dense` (identical formula per row). Gradients by autodiff.

    mem_freq (static, optional): when given and is_landmark is exactly the training layout
    (landmark at t % (mem_freq+1) == mem_freq, as `insert_landmarks` makes), a reshape-based tile
    runs instead of the general segment reductions; any other is_landmark takes the general path
    (decided at run time with lax.cond, so the result never depends on the hint).
    """
    is_landmark = _check_qkv(q, k, v, is_landmark)
    if not isinstance(q_block, int) or q_block <= 0:
        raise ValueError(f"q_block={q_block!r} must be a positive integer")
    B, T, H, D = q.shape
    starts = list(range(0, T, q_block))

    def general(q, k, v, is_landmark, segment_ids):
        ids = block_ids(is_landmark)

        def tile(q_tile, k_keys, v_keys, is_lm, ids_, seg, start):
            p = _tile_probs(q_tile, k_keys, is_lm, ids_, start, seg)
            return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v_keys.dtype), v_keys).astype(q.dtype)

        outs = []
        for start in starts:
            end = min(start + q_block, T)
            fn = jax.checkpoint(functools.partial(tile, start=start))
            outs.append(fn(q[:, start:end], k[:, :end], v[:, :end], is_landmark, ids,
                           segment_ids))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    if mem_freq is None:
        return general(q, k, v, is_landmark, segment_ids)
    S = _check_mem_freq(mem_freq) + 1
    T_pad = -(-T // S) * S
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))

    def periodic(q, k, v, is_landmark, segment_ids):
        kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
        seg = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, T_pad - T)),
                                                       constant_values=-1)
        outs = []
        for start in starts:
            end = min(start + q_block, T)
            end_p = -(-end // S) * S
            fn = jax.checkpoint(functools.partial(_periodic_tile, start=start, block_len=S))
            outs.append(fn(q[:, start:end], kp[:, :end_p], vp[:, :end_p], segment_ids=seg))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    layout = (jnp.arange(T) % S) == S - 1
    is_layout = jnp.all(is_landmark == layout[None, :])
    return jax.lax.cond(is_layout, periodic, general, q, k, v, is_landmark, segment_ids)


# The attention functions LandmarkLM passes to the decoder (models.transformer.AttentionFn), by
# `model.attention`: blockwise ('landmark', the default) or the dense reference.
def _blockwise_attention_fn(q, k, v, *, is_landmark, segment_ids=None, q_block=256,
                            mem_freq=None, **unused):
    if unused:
        raise ValueError(f"landmark attention got unsupported arguments {sorted(unused)}")
    return landmark_attention(q, k, v, is_landmark, segment_ids=segment_ids, q_block=q_block,
                              mem_freq=mem_freq)


def _dense_attention_fn(q, k, v, *, is_landmark, segment_ids=None, mem_freq=None, **unused):
    if unused:
        raise ValueError(f"landmark attention got unsupported arguments {sorted(unused)}")
    return landmark_attention_dense(q, k, v, is_landmark, segment_ids=segment_ids)


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

    def __post_init__(self):
        _check_mem_freq(self.mem_freq)
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


def _as_landmark_config(config) -> LandmarkConfig:
    if not isinstance(config, LandmarkConfig):
        raise ValueError(f"config must be a LandmarkConfig, got {type(config).__name__}")
    return config


class LandmarkLM(nn.Module):
    """tokens [B, T] (landmarks already inserted) → logits [B, T, V] (float32, float64 for x64 runs).

    The baseline `Transformer` with landmark attention; same param tree (embed, block_i/{ln_1,
    attn/{query,key,value,out}, ln_2, mlp}, ln_f), so checkpoints and converters are shared.
    is_landmark [B, T] defaults to tokens == landmark_id (as the official code); positions [T] or
    [B, T] default to 0..T-1 (use `landmark_positions` for the paper's positional jumps).
    """
    config: LandmarkConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, positions=None, is_landmark=None, segment_ids=None,
                 return_hidden: bool = False):
        lc = _as_landmark_config(self.config)
        c = lc.model
        chex.assert_rank(tokens_BxT, 2)
        B, T = tokens_BxT.shape
        if is_landmark is None:
            is_landmark = tokens_BxT == lc.landmark_id
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
        return transformer.decoder_forward(
            c, tokens_BxT, positions=positions, segment_ids=segment_ids,
            attention_kwargs={"is_landmark": is_landmark, "mem_freq": lc.mem_freq},
            return_hidden=return_hidden, attention_fn=ATTENTION_FNS[c.attention])


def _unbox(tree):
    return nn.meta.unbox(tree)


# ---------------------------------------------------------------------------------------------
# The trainer's model builder (train/trainer.py MODELS; the objective: train/objectives/landmark.py)
# ---------------------------------------------------------------------------------------------
_LANDMARK_FIELDS = ("mem_freq", "landmark_id", "pos_jump")


def config_from_dict(model_cfg: Mapping[str, Any]) -> LandmarkConfig:
    """A `LandmarkConfig` from a flat model config dict: the `TransformerConfig` fields plus
    mem_freq, landmark_id, pos_jump ('family' is ignored; attention defaults to 'landmark')."""
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


# ---------------------------------------------------------------------------------------------
# Converter from the official PyTorch state dict
# ---------------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def load_state_dict(source, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A state dict as numpy arrays from a mapping, an .npz path or a .safetensors path.

    `prefix` is stripped from names that carry it (e.g. "param/" in the reference vectors); the
    wrappers "_orig_mod." (torch.compile) and "module." (DDP) are stripped too.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".npz"):
            with np.load(path) as f:
                raw = {k: f[k] for k in f.files}
        elif path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ValueError("reading .safetensors needs the `safetensors` package") from e
            raw = load_file(path)
        else:
            raise ValueError(f"state dict path {path!r} must end in .npz or .safetensors")
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise ValueError(f"state dict must be a mapping or a path, got {type(source).__name__}")
    out = {}
    for name, value in raw.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        elif prefix:
            continue
        for w in _WRAPPER_PREFIXES:
            if name.startswith(w):
                name = name[len(w):]
        if hasattr(value, "detach"):          # a torch tensor, if the caller passes one
            value = value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out


def params_from_torch(state_dict, config: LandmarkConfig, *, prefix: str = "") -> dict:
    """Official lm_benchmark GPT state dict → params for `LandmarkLM(config)` / `Transformer`.

    state_dict: mapping of name → array, or a path to .npz / .safetensors (see `load_state_dict`).
    torch Linear weights are [out, in]; mnemax kernels are [in, ...]. `c_attn` rows are q|k|v, each
    split into heads as (H, Dh). Raises ValueError naming every missing or mis-shaped entry.
    """
    cfg = _as_landmark_config(config).model
    sd = load_state_dict(state_dict, prefix=prefix)
    C, H, Dh, V, F = cfg.width, cfg.num_heads, cfg.hd, cfg.vocab_size, cfg.hidden
    if H * Dh != C:
        raise ValueError(f"the official GPT needs num_heads·head_dim == width; got {H}·{Dh} != {C}")
    if cfg.mlp != "gelu" or cfg.norm != "layernorm":
        raise ValueError(f"the official GPT uses mlp='gelu' and norm='layernorm'; config has "
                         f"mlp={cfg.mlp!r}, norm={cfg.norm!r}")
    expected = {"transformer.wte.weight": (V, C), "transformer.ln_f.weight": (C,)}
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        expected.update({p + "ln_1.weight": (C,), p + "attn.c_attn.weight": (3 * C, C),
                         p + "attn.c_proj.weight": (C, C), p + "ln_2.weight": (C,),
                         p + "mlp.c_fc.weight": (F, C), p + "mlp.c_proj.weight": (C, F)})
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (V, C)
    problems = [f"missing {n!r} (expected shape {s})" for n, s in expected.items() if n not in sd]
    problems += [f"{n!r} has shape {tuple(sd[n].shape)}, expected {s}"
                 for n, s in expected.items() if n in sd and tuple(sd[n].shape) != s]
    if cfg.tie_embeddings and "lm_head.weight" in sd and "transformer.wte.weight" in sd:
        if sd["lm_head.weight"].shape != sd["transformer.wte.weight"].shape or not np.array_equal(
                sd["lm_head.weight"], sd["transformer.wte.weight"]):
            problems.append("'lm_head.weight' differs from 'transformer.wte.weight' but the config "
                            "ties embeddings (set tie_embeddings=False)")
    biases = sorted(n for n in sd if n.endswith(".bias"))
    if biases:
        problems.append(f"biases are not supported (config.bias=False in the official GPT): {biases}")
    if "transformer.wpe.freqs" in sd:
        ours = np.asarray(layers.rope_frequencies(Dh, cfg.rope_base), np.float64)
        theirs = np.asarray(sd["transformer.wpe.freqs"], np.float64)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=0):
            problems.append(f"'transformer.wpe.freqs' {theirs} do not match this config's RoPE "
                            f"frequencies {ours} (rope_base={cfg.rope_base})")
    if problems:
        raise ValueError("state dict does not fit the config: " + "; ".join(problems))
    # Semantic entries in mnemax layouts; placed into the tree `LandmarkLM.init` builds (so a leaf
    # that the model keeps under `kernel` gets it), with every shape checked against that tree.
    values: dict[str, np.ndarray] = {"embed/embedding": sd["transformer.wte.weight"],
                                     "ln_f/scale": sd["transformer.ln_f.weight"]}
    for i in range(cfg.num_layers):
        p, b = f"transformer.h.{i}.", f"block_{i}/"
        w = sd[p + "attn.c_attn.weight"]
        for j, name in enumerate(("query", "key", "value")):
            values[b + "attn/" + name] = w[j * C:(j + 1) * C].T.reshape(C, H, Dh)
        values[b + "attn/out"] = sd[p + "attn.c_proj.weight"].T.reshape(H, Dh, C)
        values[b + "ln_1/scale"] = sd[p + "ln_1.weight"]
        values[b + "ln_2/scale"] = sd[p + "ln_2.weight"]
        values[b + "mlp/fc_in"] = sd[p + "mlp.c_fc.weight"].T
        values[b + "mlp/fc_out"] = sd[p + "mlp.c_proj.weight"].T
    if not cfg.tie_embeddings:
        values["lm_head"] = sd["lm_head.weight"].T
    return _fill_param_tree(values, config)


def param_shapes(config: LandmarkConfig) -> dict:
    """The (unboxed) ShapeDtypeStruct tree of `LandmarkLM(config)` params, without computing them."""
    T = config.mem_freq + 1
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    shapes = jax.eval_shape(lambda t: LandmarkLM(config).init(jax.random.key(0), t), tokens)
    return _unbox(shapes)["params"]


def _fill_param_tree(values: dict, config: LandmarkConfig) -> dict:
    shapes = param_shapes(config)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    out: dict = {}
    problems = []
    for path, leaf in flat.items():
        key = path[:-len("/kernel")] if path.endswith("/kernel") and path not in values else path
        if key not in values:
            problems.append(f"no converted value for mnemax param {path!r}")
            continue
        v = np.asarray(values[key])
        if v.shape != leaf.shape:
            problems.append(f"{path!r}: converted shape {v.shape}, the model expects {leaf.shape}")
            continue
        node = out
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = jnp.asarray(v, leaf.dtype)
    if problems:
        raise ValueError("converted params do not fit the model: " + "; ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# Memory inference: one attention layer with the block cache
# ---------------------------------------------------------------------------------------------
def chunk_start(cache: block_cache.BlockCache, top_k: int) -> jax.Array:
    """The chunk's first position: min(blocks seen, k + 1)·(mem_freq + 1) + L (README step 2)."""
    S = cache.block_len
    return jnp.minimum(cache.num_blocks, top_k + 1) * S + cache.tail_len


def _rope(x, positions, *, base, interleaved):
    """Rotates x [..., D] at integer positions [...] with `layers.apply_rope`'s numerics."""
    D = x.shape[-1]
    flat = x.reshape(1, -1, 1, D)
    pos = jnp.broadcast_to(positions, x.shape[:-1]).reshape(-1)
    return layers.apply_rope(flat, pos, base=base, interleaved=interleaved).reshape(x.shape)


def memory_attention(q, k, v, is_landmark, cache: block_cache.BlockCache, *, top_k: int,
                     selection: str = "per_token_and_head", valid_len=None,
                     rope_base: float = 10000.0, rope_interleaved: bool = True,
                     return_retrieved: bool = False):
    """One chunk of one attention layer with the landmark memory (reference README steps 2–7).

    q, k, v [B, T, H, Dh]: the chunk's projections, NOT rotated (this function rotates q and the
    chunk's keys at start + t, the trailing block at start - L + j, and each retrieved block at its
    slot). is_landmark [B, T] bool; valid_len: how many of the T rows are real (the rest is padding
    after them), default T. Returns (y [B, T, H, Dh], the cache with the chunk appended) and, with
    return_retrieved, the chosen blocks' chronological ids [B, H, T, k] (-1 where none).
    """
    is_landmark = _check_qkv(q, k, v, is_landmark)
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not allowed; use one of {SELECTIONS}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer")
    if top_k > cache.capacity:
        raise ValueError(f"top_k={top_k} exceeds the cache capacity {cache.capacity} blocks")
    B, T, H, Dh = q.shape
    S, F = cache.block_len, cache.mem_freq
    acc = _acc_dtype(q)
    scale = 1.0 / math.sqrt(Dh)
    rope = functools.partial(_rope, base=rope_base, interleaved=rope_interleaved)
    valid_len = jnp.asarray(T if valid_len is None else valid_len, jnp.int32)
    start = chunk_start(cache, top_k)
    L = cache.tail_len
    t = jnp.arange(T)
    q_rot = rope(q, (start + t)[None, :, None])
    k_rot = rope(k, (start + t)[None, :, None])
    tail_k = rope(cache.tail_keys, (start - L + jnp.arange(F))[None, :, None])
    s_tail = jnp.einsum("bthd,bjhd->bhtj", q_rot, tail_k, preferred_element_type=acc) * scale
    s_chunk = jnp.einsum("bthd,bjhd->bhtj", q_rot, k_rot, preferred_element_type=acc) * scale
    tail_vis = jnp.broadcast_to(jnp.arange(F) < L, (B, H, T, F))
    chunk_vis = jnp.broadcast_to(t[None, :] <= t[:, None], (B, H, T, T))
    tail_lm = jnp.zeros((B, H, T, F), bool)
    chunk_lm = jnp.broadcast_to(is_landmark[:, None, None, :], (B, H, T, T))
    parts_s, parts_vis, parts_lm = [s_tail, s_chunk], [tail_vis, chunk_vis], [tail_lm, chunk_lm]
    retrieved = jnp.full((B, H, T, max(top_k, 1)), -1, jnp.int32)
    if top_k > 0:
        n = block_cache.num_cached(cache)
        c, slot_valid = block_cache.chronological_index(cache)              # [N], [N]
        m = jnp.where(c >= n - top_k, c - (n - top_k) + 1, 0)               # slot of each block
        lm_k = rope(block_cache.landmark_keys(cache), (m * S + F)[None, :, None])  # [B, N, H, Dh]
        s_lm = jnp.einsum("bthd,bnhd->bhtn", q_rot, lm_k, preferred_element_type=acc) * scale
        s_lm = jnp.where(slot_valid, s_lm, -jnp.inf)
        p_lm = jax.nn.softmax(s_lm, axis=-1)
        p_lm = jnp.where(slot_valid, p_lm, 0)                               # n = 0: no NaN
        if selection == "max_over_heads":
            p_lm = jnp.broadcast_to(jnp.max(p_lm, axis=1, keepdims=True), p_lm.shape)
        elif selection == "max_over_tokens":
            real = (t < valid_len)[None, None, :, None]
            p_lm = jnp.broadcast_to(jnp.max(jnp.where(real, p_lm, 0), axis=2, keepdims=True),
                                    p_lm.shape)
        # Ties cannot be resolved portably (official: torch.topk); valid blocks outrank empty slots.
        rank = jnp.where(slot_valid, p_lm, -1.0)
        _, chosen = jax.lax.top_k(rank, top_k)                               # [B, H, T, k] slots
        chosen_valid = slot_valid[chosen]
        chosen_c = jnp.where(chosen_valid, c[chosen], jnp.iinfo(jnp.int32).max)
        chosen_c = jnp.sort(chosen_c, axis=-1)                               # chronological order
        chosen_valid = chosen_c < jnp.iinfo(jnp.int32).max
        chosen_c = jnp.where(chosen_valid, chosen_c, 0)
        chosen_m = jnp.where(chosen_c >= n - top_k, chosen_c - (n - top_k) + 1, 0)
        slots = block_cache.slot_of_chronological(cache, chosen_c)
        mem_k, mem_v = block_cache.gather_blocks(cache, slots)              # [B, H, T, k, S, Dh]
        j = jnp.arange(top_k)
        pos = (j[:, None] * S + jnp.arange(S)[None, :]) + ((chosen_m > 0) * S)[..., None]
        mem_k = rope(mem_k, pos)
        s_mem = jnp.einsum("bhtd,bhtjsd->bhtjs", jnp.moveaxis(q_rot, 2, 1), mem_k,
                           preferred_element_type=acc).reshape(B, H, T, top_k * S) * scale
        mem_vis = jnp.repeat(chosen_valid, S, axis=-1)
        mem_lm = mem_vis & jnp.tile(jnp.arange(S) == F, top_k)
        parts_s.insert(0, s_mem)
        parts_vis.insert(0, mem_vis)
        parts_lm.insert(0, mem_lm)
        retrieved = jnp.where(chosen_valid, chosen_c + (cache.num_blocks - n), -1)
    s = jnp.concatenate(parts_s, axis=-1)
    vis = jnp.concatenate(parts_vis, axis=-1)
    lm = jnp.concatenate(parts_lm, axis=-1)
    ids = jnp.cumsum(lm.astype(jnp.int32), axis=-1) - lm.astype(jnp.int32)
    P = s.shape[-1] - T
    q_blk = jnp.take_along_axis(ids, (P + t)[None, None, :, None], axis=-1)   # [B, H, T, 1]
    probs = grouped_softmax(s, lm, ids, q_blk, vis)
    vd = v.dtype
    y = jnp.einsum("bhtj,bjhd->bthd", probs[..., P:].astype(vd), v)
    y = y + jnp.einsum("bhtj,bjhd->bthd", probs[..., P - F:P].astype(vd),
                       cache.tail_values.astype(vd))
    if top_k > 0:
        pm = probs[..., :top_k * S].reshape(B, H, T, top_k, S).astype(vd)
        y = y + jnp.einsum("bhtjs,bhtjsd->bthd", pm, mem_v.astype(vd))
    new_cache = block_cache.append(cache, k, v, valid_len)
    y = y.astype(q.dtype)
    if return_retrieved:
        return y, new_cache, retrieved
    return y, new_cache


# ---------------------------------------------------------------------------------------------
# Memory inference: the whole model, chunk by chunk
# ---------------------------------------------------------------------------------------------
class _MemoryBlock(nn.Module):
    cfg: transformer.TransformerConfig
    top_k: int
    selection: str

    @nn.compact
    def __call__(self, x, is_landmark, cache, valid_len, with_retrieved: bool):
        c = self.cfg
        norm = lambda name: layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype,  # noqa: E731
                                             param_dtype=c.param_dtype, name=name)
        attn = transformer.Attention(c, name="attn")
        h = norm("ln_1")(x)
        # Position 0 rotates by the identity (cos 0 = 1, sin 0 = 0 exactly): un-rotated q, k, v.
        q, k, v = attn.qkv(h, jnp.zeros((x.shape[1],), jnp.int32))
        y, cache, retrieved = memory_attention(
            q, k, v, is_landmark, cache, top_k=self.top_k, selection=self.selection,
            valid_len=valid_len, rope_base=c.rope_base, rope_interleaved=c.rope_interleaved,
            return_retrieved=True)
        x = x + attn.out(y)
        h = norm("ln_2")(x)
        x = x + layers.MLP(c.hidden, c.mlp, dtype=c.dtype, param_dtype=c.param_dtype,
                           name="mlp")(h)
        return x, cache, (retrieved if with_retrieved else None)


class _MemoryLM(nn.Module):
    """One chunk of raw tokens through the model with per-layer block caches."""
    cfg: LandmarkConfig
    top_k: int
    selection: str

    @nn.compact
    def __call__(self, raw_BxM, n_raw, caches, with_retrieved: bool = False):
        lc = self.cfg
        c = lc.model
        B, M = raw_BxM.shape
        F = lc.mem_freq
        L = caches[0].tail_len                      # raw tokens since the last landmark
        i = jnp.arange(M)
        aug_pos = i + (L + i) // F                  # where raw token i lands
        closes = ((L + i + 1) % F == 0) & (i < n_raw)   # a landmark follows raw token i
        T = M + (F - 1 + M) // F                    # static bound on the augmented length
        valid_len = n_raw + (L + n_raw) // F        # rows after it (a padded last chunk) are dropped
        tokens = jnp.zeros((B, T), raw_BxM.dtype).at[:, aug_pos].set(raw_BxM)
        lm_pos = jnp.where(closes, aug_pos + 1, T)  # T: out of range, dropped
        tokens = tokens.at[:, lm_pos].set(lc.landmark_id, mode="drop")
        is_landmark = jnp.zeros((B, T), bool).at[:, lm_pos].set(True, mode="drop")
        embed = layers.Embed(c.vocab_size, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
                             name="embed")
        x = embed(tokens)
        new_caches, retrieved = [], []
        for li in range(c.num_layers):
            x, cache, r = _MemoryBlock(c, self.top_k, self.selection, name=f"block_{li}")(
                x, is_landmark, caches[li], valid_len, with_retrieved)
            new_caches.append(cache)
            retrieved.append(r)
        x = layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                             name="ln_f")(x)
        x = jnp.take(x, aug_pos, axis=1)            # landmark rows dropped (README step 8)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.DenseGeneral(c.vocab_size, use_bias=False, dtype=c.dtype,
                                     param_dtype=c.param_dtype, name="lm_head")(x)
        logits = logits.astype(jnp.promote_types(jnp.float32, logits.dtype))
        out = (logits, tuple(new_caches))
        if with_retrieved:
            out = out + (tuple(retrieved),)
        return out


def init_caches(config: LandmarkConfig, batch: int, cache_blocks: int) -> tuple:
    """One empty `BlockCache` per layer (keys/values in the model's compute dtype)."""
    c = _as_landmark_config(config).model
    return tuple(block_cache.init(batch=batch, capacity=cache_blocks, mem_freq=config.mem_freq,
                                  num_heads=c.num_heads, head_dim=c.hd, dtype=c.dtype)
                 for _ in range(c.num_layers))


@functools.partial(jax.jit, static_argnames=("config", "top_k", "selection", "with_retrieved"))
def memory_step(params, raw_BxM, caches, n_raw=None, *, config: LandmarkConfig, top_k: int,
                selection: str = "per_token_and_head", with_retrieved: bool = False):
    """One chunk of raw tokens [B, M] → (logits [B, M, V], new caches[, retrieved per layer]).

    n_raw (traced scalar, default M): only the first n_raw tokens are real; the rest is padding whose
    logits are meaningless and which never enters the cache (so a short last chunk reuses the
    compiled step of the full-length ones).
    """
    if n_raw is None:
        n_raw = raw_BxM.shape[1]
    return _MemoryLM(config, top_k, selection).apply({"params": params}, raw_BxM,
                                                     jnp.asarray(n_raw, jnp.int32), caches,
                                                     with_retrieved)


def memory_logits(params, config: LandmarkConfig, raw_tokens, *, chunk_len: int, top_k: int,
                  cache_blocks: Optional[int], selection: str = "per_token_and_head",
                  return_retrieved: bool = False):
    """The official mem-cache inference: raw tokens [B, T_raw] (no landmarks) → logits [B, T_raw, V].

    Chunks of `chunk_len` raw tokens, each one jitted call; landmarks are inserted across chunks,
    each layer keeps a ring of `cache_blocks` complete blocks (None: enough for the whole input, the
    unbounded-context mode) and retrieves `top_k` blocks per token and head (`selection`).
    """
    config = _as_landmark_config(config)
    raw_tokens = jnp.asarray(raw_tokens)
    if raw_tokens.ndim != 2:
        raise ValueError(f"raw_tokens has shape {raw_tokens.shape}; it must be [B, T_raw]")
    if not isinstance(chunk_len, int) or chunk_len <= 0:
        raise ValueError(f"chunk_len={chunk_len!r} must be a positive integer")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not allowed; use one of {SELECTIONS}")
    B, T_raw = raw_tokens.shape
    if cache_blocks is None:
        cache_blocks = max(T_raw // config.mem_freq, top_k, 1)
    if not isinstance(cache_blocks, int) or cache_blocks <= 0:
        raise ValueError(f"cache_blocks={cache_blocks!r} must be a positive integer (or None)")
    if not isinstance(top_k, int) or not 0 <= top_k <= cache_blocks:
        raise ValueError(f"top_k={top_k!r} must be an integer in [0, cache_blocks={cache_blocks}]")
    params = _unbox(params)
    caches = init_caches(config, B, cache_blocks)
    outs, retrieved = [], []
    for s in range(0, T_raw, chunk_len):
        chunk = raw_tokens[:, s:s + chunk_len]
        n = chunk.shape[1]
        if n < chunk_len:                          # pad: one compiled step for every chunk
            chunk = jnp.pad(chunk, ((0, 0), (0, chunk_len - n)))
        res = memory_step(params, chunk, caches, n, config=config, top_k=top_k,
                          selection=selection, with_retrieved=return_retrieved)
        outs.append(res[0][:, :n])
        caches = res[1]
        if return_retrieved:
            retrieved.append(res[2])
    logits = jnp.concatenate(outs, axis=1)
    if return_retrieved:
        return logits, retrieved
    return logits
