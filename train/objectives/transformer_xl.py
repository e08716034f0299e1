"""The Transformer-XL baseline of landmark attention's Table 1 (Mohtashami & Jaggi 2023), the
trainer's OBJECTIVES["transformer_xl"], as the official `lm_benchmark` trains it
(`optim/transformer_xl.py: train_xl` with `--lm_cache kv_cache_train`,
`models/caches/kv_cache_train.py: KVLMCacheStorage`):

each row of `total_sequence_length` tokens (here: the run's seq_len) is read in pieces of
`piece_len` tokens (`--sequence_length`), in order; every layer's queries of a piece attend to the
keys/values of the `cache_len` tokens before the piece (`--mem_cache_size`: the newest tokens of
the earlier pieces of the same row, oldest dropped first) and, causally, to the piece's own, in one
softmax. Positions are absolute within the row (`KVLMCache.forward`: the piece starts at the
tokens seen so far; cached keys are rotated at their own positions). The cache is cleared at
every row (`clear_state`).

The cache is stop-gradient (Transformer-XL's SG(memory)): the official loop calls backward on
each piece's loss before the next piece runs, so no gradient crosses pieces there either. The
loss is the weighted mean over every token of the row (the official sums the pieces' mean
losses: the same direction, scaled by the number of pieces).

`xl_logits` is the same forward pass for evaluation (eval/landmark_perplexity.py: the pg19_xl
rows, `--lm_cache kv --mem_cache_size 256 --mid_length 256`).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from models import transformer


def _check(model, T: int, piece_len: int, cache_len: int) -> transformer.TransformerConfig:
    if not isinstance(model, transformer.Transformer) or model.cfg.attention != "dense":
        raise ValueError("objective 'transformer_xl' needs model.family='transformer' with "
                         f"attention 'dense'; got {type(model).__name__}")
    if not isinstance(piece_len, int) or piece_len < 1 or T % piece_len:
        raise ValueError(f"objective_config.piece_len={piece_len!r} must be a positive integer "
                         f"that divides the row length {T}")
    if not isinstance(cache_len, int) or cache_len < 0:
        raise ValueError(f"objective_config.cache_len={cache_len!r} must be an integer >= 0")
    return model.cfg


def _pieces(apply_fn, params, inputs_BxT, piece_len: int, cache_len: int, fn):
    """Scans the row's pieces with the XL cache; fn(logits [B, P, V], i) → per-piece output."""
    model = getattr(apply_fn, "__self__", None)
    B, T = inputs_BxT.shape
    cfg = _check(model, T, piece_len, cache_len)
    P, n = piece_len, T // piece_len
    cache0 = transformer.init_cache(cfg, B, cache_len + P)

    def body(cache, i):
        x = jax.lax.dynamic_slice_in_dim(inputs_BxT, i * P, P, axis=1)
        positions = i * P + jnp.arange(P, dtype=jnp.int32)
        logits, new = apply_fn({"params": params}, x, positions=positions, kv_cache=cache)
        # Keep the newest cache_len tokens at slots [0, cache_len) (KVLMCacheStorage's ring).
        total = new.length
        drop = jnp.maximum(total - cache_len, 0)
        k, v = (jax.lax.stop_gradient(jnp.roll(t, -drop, axis=2)) for t in (new.k, new.v))
        cache = transformer.KVCache(k, v, jnp.minimum(total, cache_len).astype(jnp.int32))
        return cache, fn(logits.astype(jnp.float32), i)

    _, out = jax.lax.scan(body, cache0, jnp.arange(n))
    return out


def xl_logits(apply_fn, params, inputs_BxT, *, piece_len: int, cache_len: int) -> jax.Array:
    """logits [B, T, V] (float32) of a Transformer read as Transformer-XL: pieces of piece_len
    tokens, each seeing the cache_len tokens before it (module docstring)."""
    chex.assert_rank(inputs_BxT, 2)
    out = _pieces(apply_fn, params, inputs_BxT, piece_len, cache_len, lambda lg, i: lg)
    n, B, P, V = out.shape
    return jnp.moveaxis(out, 0, 1).reshape(B, n * P, V)


def loss(apply_fn, params, batch, rng, *, step=None, memory=None, piece_len: int,
         cache_len: int):
    """The trainer's objective on batches {inputs, targets, weights} [B, T]: the XL forward pass
    (module docstring), then (Σ weighted cross-entropy, {"weight": Σw, "correct": Σ w·[argmax =
    target]}). Settings from config.objective_config: piece_len, cache_len."""
    del rng, step, memory   # deterministic; no memory of its own
    inputs = batch["inputs"]
    chex.assert_rank(inputs, 2)
    B, T = inputs.shape
    _check(getattr(apply_fn, "__self__", None), T, piece_len, cache_len)
    tgt = batch["targets"].reshape(B, T // piece_len, piece_len)
    w = batch["weights"].astype(jnp.float32).reshape(tgt.shape)

    def piece_sums(logits, i):
        y, wi = tgt[:, i], w[:, i]
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(ce * wi), jnp.sum(correct * wi)

    ce, correct = _pieces(apply_fn, params, inputs, piece_len, cache_len, piece_sums)
    return jnp.sum(ce), {"weight": jnp.sum(w), "correct": jnp.sum(correct)}


def check_config(config) -> None:
    """OBJECTIVE_CHECKS["transformer_xl"]: a dense transformer, and piece_len / cache_len that
    fit the row (seq_len)."""
    family = config.model.get("family", "transformer")
    if family != "transformer" or config.model.get("attention", "dense") != "dense":
        raise ValueError(f"objective 'transformer_xl' needs model.family='transformer' with "
                         f"attention 'dense', not {family!r}")
    o = config.get("objective_config", {})
    piece, cache = o.get("piece_len"), o.get("cache_len")
    if not isinstance(piece, int) or piece < 1 or config.seq_len % piece:
        raise ValueError(f"objective_config.piece_len={piece!r} must be a positive integer that "
                         f"divides seq_len={config.seq_len}")
    if not isinstance(cache, int) or cache < 0:
        raise ValueError(f"objective_config.cache_len={cache!r} must be an integer >= 0")
