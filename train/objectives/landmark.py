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


def loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """The trainer's objective (OBJECTIVES["landmark"]) on raw batches {inputs, targets, weights}
    [B, T] (+ optional segment_ids): landmarks are inserted here, inside the jitted step.

    A token followed by a landmark predicts the token after it; landmark slots weigh 0; positions
    get the paper's jumps when the model's `pos_jump` > 0 (drawn from `rng`). Returns
    (sum of weighted cross-entropies, {"weight": Σw, "correct": Σ w·[argmax = target]}).
    `apply_fn` must be a `LandmarkLM`'s bound `apply` (its config says mem_freq and landmark_id).
    """
    del step, memory  # no schedule, no memory
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, landmark.LandmarkLM):
        raise ValueError("objective 'landmark' needs model.family='landmark' (apply_fn of a "
                         f"LandmarkLM); got {type(model).__name__}")
    lc = model.config
    F = lc.mem_freq
    inputs = batch["inputs"]
    chex.assert_rank(inputs, 2)
    aug = landmark.insert_landmarks(inputs, F, lc.landmark_id)
    targets = landmark.landmark_targets(batch["targets"], F, ignore_index=0)
    weights = landmark.insert_landmarks(batch["weights"].astype(jnp.float32), F, 0)
    B, T_aug = aug.shape
    is_lm = jnp.broadcast_to(landmark.landmark_mask(T_aug, F), (B, T_aug))
    positions = landmark.landmark_positions(is_lm, key=rng, max_jump=lc.pos_jump)
    kwargs = {}
    if "segment_ids" in batch:
        kwargs["segment_ids"] = _augment_like(batch["segment_ids"], F)
    logits = apply_fn({"params": params}, aug, positions=positions, is_landmark=is_lm, **kwargs)
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = logz - picked
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(ce * weights), {"weight": jnp.sum(weights),
                                   "correct": jnp.sum(correct * weights)}
