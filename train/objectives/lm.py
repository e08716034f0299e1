"""Next-token cross-entropy on {"inputs", "targets", "weights"} batches.

An objective is `loss(apply_fn, params, batch, rng, *, step=None, memory=None) -> (loss_sum,
aux)`: the *sum* of weighted per-token losses (so gradient accumulation over micro-batches divides
once, by the total weight) and aux sums {"weight", "correct", ...} from which the trainer derives
mean loss and accuracy (and logs any other sum per weight). `step` is the optimizer step being
taken (traced; None at evaluation), for objectives that follow a schedule (MAC's bank
curriculum); `memory` is the train state's memory (TrainState.memory: a family's memory, hooks'
states), and aux["memory"] = {name: new value}, where an objective returns it, replaces those
entries after the step (DKVB's usage counts); settings an objective takes beyond these come from
config.objective_config as keywords.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(logits_BxTxV, targets_BxT, *, label_smoothing: float = 0.0):
    """Per-token cross-entropy in float32, and whether the argmax is right."""
    logits = logits_BxTxV.astype(jnp.float32)
    V = logits.shape[-1]
    onehot = jax.nn.one_hot(targets_BxT, V, dtype=jnp.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / V
    ce = optax.softmax_cross_entropy(logits, onehot)
    correct = (jnp.argmax(logits, -1) == targets_BxT).astype(jnp.float32)
    return ce, correct


def loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """Weighted next-token loss of a model called as apply_fn({'params': p}, inputs)."""
    del rng, step, memory  # kept for objectives that sample, follow a schedule or read memory
    logits = apply_fn({"params": params}, batch["inputs"])
    ce, correct = token_losses(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
