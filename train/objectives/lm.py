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


def output_head(params) -> jax.Array:
    """The output projection [D, V] of a Transformer's params: the untied `lm_head` kernel, else
    the embedding table transposed."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["embed"]["embedding"].T


def chunked_token_losses(hidden_BxTxD, head_DxV, targets_BxT, chunk: int):
    """`token_losses` of logits = hidden @ head, computed `chunk` positions at a time and
    recomputed in the backward pass: the [B, T, V] logits never exist at once (peak [B, chunk,
    V]), which is what a large vocabulary (LLaMA's 32k–128k) needs. Same values as the unchunked
    loss up to float32 rounding."""
    B, T, D = hidden_BxTxD.shape
    if chunk <= 0 or T % chunk:
        raise ValueError(f"objective_config.ce_chunk={chunk} must be a positive divisor of the "
                         f"sequence length {T}")
    h = hidden_BxTxD.reshape(B, T // chunk, chunk, D).swapaxes(0, 1)
    y = targets_BxT.reshape(B, T // chunk, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h_BxCxD, y_BxC):
        logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, head_DxV.astype(h_BxCxD.dtype))
        return token_losses(logits, y_BxC)

    ce, correct = jax.lax.map(lambda a: one(*a), (h, y))
    return ce.swapaxes(0, 1).reshape(B, T), correct.swapaxes(0, 1).reshape(B, T)


def loss(apply_fn, params, batch, rng, *, step=None, memory=None, ce_chunk: int = 0):
    """Weighted next-token loss of a model called as apply_fn({'params': p}, inputs).

    ce_chunk (config.objective_config.ce_chunk; 0: off): the cross-entropy `ce_chunk` positions
    at a time from the final hidden states (`chunked_token_losses`; a Transformer's head)."""
    del rng, step, memory  # kept for objectives that sample, follow a schedule or read memory
    if ce_chunk:
        hidden = apply_fn({"params": params}, batch["inputs"], return_hidden=True)
        ce, correct = chunked_token_losses(hidden, output_head(params), batch["targets"],
                                           ce_chunk)
    else:
        logits = apply_fn({"params": params}, batch["inputs"])
        ce, correct = token_losses(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
