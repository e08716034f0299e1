"""DKVB classifier (Träuble et al. 2023, "Discrete Key-Value Bottleneck"), Fig. 1:

    x --frozen encoder--> z_BxD --fixed projection--> q_BxCxDk --nearest key per codebook-->
    idx_BxC --fetch--> v_BxCxDv --decoder--> logits_BxV

The codebooks (`memory.codebook.Codebooks`) are an input, not Linen params: the model is a pure
function of (decoder params, codebooks, x). Training differentiates w.r.t. `codebooks.values`
only (plus the linear decoder's params when that decoder is used); keys, projection and encoder
sit behind `stop_gradient`, so they get no gradient even if a caller differentiates the whole
codebook pytree.

Decoders:
- "vote" (the paper's, parameter-free): logits = mean over codebooks of the fetched values; the
  value dim must equal the number of classes.
- "linear": logits = Dense(mean over codebooks of the fetched values); trainable, so it can
  forget — kept as the option the paper ablates.
"""
from __future__ import annotations

from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from memory import codebook as cb

DECODERS = ("vote", "linear")


class KVBottleneck(nn.Module):
    """Frozen encoder -> projection -> codebook lookup -> fetched values -> decoder.

    Attributes:
      num_classes: V, number of output classes.
      decoder: "vote" (parameter-free mean of fetched values, needs d_v == V) or "linear".
      encoder: frozen `embed(x) -> z_BxD`; None means `x` already is the [B, D] embedding (the
        usual case: embeddings are precomputed once per dataset, as in the paper).
      lookup_chunk: codebooks per step in the chunked nearest-key search.
    """

    num_classes: int
    decoder: str = "vote"
    encoder: Callable[[jax.Array], jax.Array] | None = None
    lookup_chunk: int = 8

    def _validate(self, codebooks: cb.Codebooks) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r} is not allowed; use one of {DECODERS}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes!r} must be an int >= 2")
        if self.decoder == "vote" and codebooks.value_dim != self.num_classes:
            raise ValueError(
                f"decoder='vote' needs value_dim == num_classes, got value_dim="
                f"{codebooks.value_dim} and num_classes={self.num_classes}; the voting decoder "
                "averages fetched values as logits (use decoder='linear' for other value dims)")

    def embed(self, x: jax.Array) -> jax.Array:
        """[B, ...] inputs -> [B, D] frozen embeddings (no gradient)."""
        z = x if self.encoder is None else self.encoder(x)
        z = z.reshape(z.shape[0], -1)
        return jax.lax.stop_gradient(z.astype(jnp.float32))

    def lookup(self, x: jax.Array, codebooks: cb.Codebooks, *,
               restrict_to_used: bool = False) -> jax.Array:
        """[B, ...] inputs -> idx_BxC nearest (used) key per codebook."""
        q_BxCxDk = cb.project(self.embed(x), jax.lax.stop_gradient(codebooks.projection_CxDxDk))
        mask = cb.used_mask(codebooks.usage_CxK) if restrict_to_used else None
        return cb.nearest_keys(q_BxCxDk, jax.lax.stop_gradient(codebooks.keys_CxKxDk), mask,
                               chunk=self.lookup_chunk)

    def decode(self, values_CxKxDv: jax.Array, idx_BxC: jax.Array) -> jax.Array:
        """Fetched values of keys `idx_BxC` -> logits_BxV (float32)."""
        v_BxCxDv = cb.fetch(values_CxKxDv, idx_BxC).astype(jnp.float32)
        pooled_BxDv = jnp.mean(v_BxCxDv, axis=1)
        if self.decoder == "vote":
            return pooled_BxDv
        return nn.Dense(self.num_classes, name="linear_decoder",
                        kernel_init=nn.initializers.zeros)(pooled_BxDv)

    @nn.compact
    def __call__(self, x: jax.Array, codebooks: cb.Codebooks, *, idx_BxC: jax.Array | None = None,
                 restrict_to_used: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns (logits_BxV, idx_BxC).

        Args:
          x: [B, ...] inputs (or [B, D] embeddings when `encoder` is None). Ignored when
            `idx_BxC` is given.
          codebooks: the memory; only `values_CxKxDv` receives gradient.
          idx_BxC: precomputed key indices (keys and projection are frozen, so lookups of a
            fixed training set can be computed once).
          restrict_to_used: snap each input to its nearest *used* key (test time).
        """
        self._validate(codebooks)
        if idx_BxC is None:
            idx_BxC = self.lookup(x, codebooks, restrict_to_used=restrict_to_used)
        chex.assert_shape(idx_BxC, (None, codebooks.num_codebooks))
        logits_BxV = self.decode(codebooks.values_CxKxDv, idx_BxC)
        chex.assert_shape(logits_BxV, (idx_BxC.shape[0], self.num_classes))
        return logits_BxV, idx_BxC
