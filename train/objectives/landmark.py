"""Landmark attention's training objective (Mohtashami & Jaggi 2023), the trainer's
OBJECTIVES["landmark"]: next-token loss on raw batches, with landmarks inserted inside the jitted
step. The objective contract is train/objectives/lm.py's.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from models import landmark


def _augment_like(x_BxT, mem_freq: int):
    """x [B, T] → [B, T + T // mem_freq] with each inserted slot a copy of the value before it."""
    B, T = x_BxT.shape
    n = T // mem_freq
    full = x_BxT[:, :n * mem_freq].reshape(B, n, mem_freq)
    body = jnp.concatenate([full, full[..., -1:]], axis=-1).reshape(B, n * (mem_freq + 1))
    return jnp.concatenate([body, x_BxT[:, n * mem_freq:]], axis=1)


def _stream_layout(batch, mem_freq: int):
    """The official layout (train/data/token_stream.py): raw rows [B, T] whose landmarks follow
    the inputs with stream_phase == mem_freq - 1 → padded rows [B, T + mem_freq - 1] in which
    they follow every mem_freq-th entry, so `insert_landmarks` (and the attention's periodic
    fast path) apply: row b is shifted right by its phase φ_b = stream_phase[b, 0] and padded on
    both sides. Returns (inputs, targets, weights, segment_ids, shift φ_b [B, 1]); pads weigh 0
    and have segment 0 (the real tokens 1), so attention never crosses between them."""
    phase = batch["stream_phase"]
    B, T = phase.shape
    shift = phase[:, :1]                                            # [B, 1]
    t = jnp.arange(T + mem_freq - 1)[None, :] - shift               # raw index of each slot
    valid = (t >= 0) & (t < T)
    idx = jnp.clip(t, 0, T - 1)
    take = lambda x: jnp.take_along_axis(x, idx, axis=1)             # noqa: E731
    inputs = jnp.where(valid, take(batch["inputs"]), 0)
    targets = jnp.where(valid, take(batch["targets"]), 0)
    weights = jnp.where(valid, take(batch["weights"].astype(jnp.float32)), 0.0)
    return inputs, targets, weights, valid.astype(jnp.int32), shift


def loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """The trainer's objective (OBJECTIVES["landmark"]) on raw batches {inputs, targets, weights}
    [B, T] (+ optional segment_ids, or stream_phase): landmarks are inserted here, inside the
    jitted step.

    A token followed by a landmark predicts the token after it; landmark slots weigh 0; positions
    get the paper's jumps when the model's `pos_jump` > 0 (drawn from `rng`). Landmarks follow
    every mem_freq-th token of each row, or, when the batch has `stream_phase` (the official
    lm_benchmark layout, train/data/token_stream.py), every mem_freq-th token of the stream the
    row was cut from (positions then count from the row's first token, as the official window's).
    In training (`step` given) the model's `group_dropout` drops whole retrieved blocks (a key
    drawn from `rng`). Returns (sum of weighted cross-entropies, {"weight": Σw,
    "correct": Σ w·[argmax = target]}). `apply_fn` must be a `LandmarkLM`'s bound `apply` (its
    config says mem_freq and landmark_id).
    """
    del memory  # no memory
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, landmark.LandmarkLM):
        raise ValueError("objective 'landmark' needs model.family='landmark' (apply_fn of a "
                         f"LandmarkLM); got {type(model).__name__}")
    lc = model.config
    F = lc.mem_freq
    chex.assert_rank(batch["inputs"], 2)
    kwargs = {}
    shift = 0
    if "stream_phase" in batch:
        if "segment_ids" in batch:
            raise ValueError("a landmark batch has both stream_phase and segment_ids; the "
                             "official stream layout (data.windows='random') packs no segments")
        inputs, raw_targets, raw_weights, seg, shift = _stream_layout(batch, F)
        kwargs["segment_ids"] = _augment_like(seg, F)
    else:
        inputs, raw_targets, raw_weights = batch["inputs"], batch["targets"], batch["weights"]
        if "segment_ids" in batch:
            kwargs["segment_ids"] = _augment_like(batch["segment_ids"], F)
    aug = landmark.insert_landmarks(inputs, F, lc.landmark_id)
    targets = landmark.landmark_targets(raw_targets, F, ignore_index=0)
    weights = landmark.insert_landmarks(raw_weights.astype(jnp.float32), F, 0)
    B, T_aug = aug.shape
    is_lm = jnp.broadcast_to(landmark.landmark_mask(T_aug, F), (B, T_aug))
    if lc.group_dropout and step is not None:
        rng, kwargs["group_dropout_key"] = jax.random.split(rng)
    positions = landmark.landmark_positions(is_lm, key=rng, max_jump=lc.pos_jump) - shift
    logits = apply_fn({"params": params}, aug, positions=positions, is_landmark=is_lm, **kwargs)
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = logz - picked
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(ce * weights), {"weight": jnp.sum(weights),
                                   "correct": jnp.sum(correct * weights)}


def check_config(config) -> None:
    """OBJECTIVE_CHECKS["landmark"]: rows in the official stream layout (data.stream_mem_freq)
    place landmarks every model.mem_freq tokens of the stream, so the two must agree."""
    stream = config.data.get("stream_mem_freq", 0)
    if stream and stream != config.model.get("mem_freq"):
        raise ValueError(f"data.stream_mem_freq={stream} is not allowed with model.mem_freq="
                         f"{config.model.get('mem_freq')}; use the same value (or 0: landmarks "
                         "every mem_freq tokens of each row)")
    if stream and config.data.get("windows") != "random":
        raise ValueError(f"data.stream_mem_freq={stream} needs data.windows='random' (rows cut "
                         "from one token stream)")
