"""Objectives that fit DKVB's small frozen backbones (models/encoders.py) on another dataset,
for the shared trainer (train/configs/dkvb_encoder.py):

- "reconstruct" (`reconstruct_loss`): a `ConvAutoencoder` fitted by reconstruction alone, on
  "images" batches without labels, so its embedding cannot have been shaped by the classes it
  is later evaluated on;
- "classify" (`classify_loss`): a `SmallCNN` pre-trained with labels (the supervised ablation).

Both follow train/objectives/lm.py's contract: (sum of per-item losses, {"weight", "correct"}).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def _images(batch) -> jnp.ndarray:
    """[B, H, W, C] float32 images of an "images" batch ([B, H, W] gets one channel)."""
    x = jnp.asarray(batch["images"], jnp.float32)
    return x[..., None] if x.ndim == 3 else x


def reconstruct_loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """Per-pixel sigmoid cross-entropy between the reconstruction logits and the pixel
    intensities (ink fractions or colour levels in [0, 1]); weight = the number of pixels, so
    the mean is the per-pixel loss. Reads only batch["images"]."""
    del rng, step, memory
    x = _images(batch)
    bce = optax.sigmoid_binary_cross_entropy(apply_fn({"params": params}, x), x)
    return jnp.sum(bce), {"weight": jnp.float32(bce.size), "correct": jnp.float32(0.0)}


def classify_loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """Cross-entropy of the labels batch["labels"] [B]; accuracy from the argmax."""
    del rng, step, memory
    logits = apply_fn({"params": params}, _images(batch))
    labels = jnp.asarray(batch["labels"], jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(ce), {"weight": jnp.float32(ce.shape[0]), "correct": jnp.sum(correct)}
