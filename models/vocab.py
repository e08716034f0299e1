"""Vocabulary growth of a trained model: new embedding rows when a tokenizer gains specials.

`resize_embeddings(table_VxD, new_vocab)` appends new_vocab - V rows, each the mean of the old
rows (as transformers' `resize_token_embeddings(..., mean_resizing=True)` centres them): a new
special (PAD, LANDMARK, ...; train/data/tokenizer.py: Tokenizer.add_special_tokens) then starts
as an average token rather than a random one, so the logits of a pretrained model stay close to
where they were until training moves it. `axis=1` grows an untied output head [D, V] the same
way (new columns = the mean column).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def resize_embeddings(table_VxD, new_vocab: int, *, axis: int = 0):
    """The table with rows V..new_vocab-1 (along `axis`) equal to the mean of rows 0..V-1.

    A numpy array gives a numpy array, a jax.Array a jax.Array, in the table's dtype (the mean
    is taken in float32 or wider). new_vocab == V returns the table unchanged.
    """
    if table_VxD.ndim != 2:
        raise ValueError(f"table has shape {table_VxD.shape}; allowed: rank 2 ([V, D], or "
                         "[D, V] with axis=1)")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis={axis} is not allowed; allowed: 0 (rows [V, D]) or 1 ([D, V])")
    vocab = table_VxD.shape[axis]
    if new_vocab < vocab:
        raise ValueError(f"new_vocab={new_vocab} is not allowed: the table already has {vocab} "
                         f"entries; allowed: >= {vocab} (rows are only ever added)")
    if new_vocab == vocab:
        return table_VxD
    xp = jnp if isinstance(table_VxD, jax.Array) else np
    acc = xp.promote_types(table_VxD.dtype, xp.float32)
    mean = xp.mean(table_VxD.astype(acc), axis=axis, keepdims=True).astype(table_VxD.dtype)
    shape = list(table_VxD.shape)
    shape[axis] = new_vocab - vocab
    return xp.concatenate([table_VxD, xp.broadcast_to(mean, shape)], axis=axis)
