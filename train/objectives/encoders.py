"""Fitting the small frozen DKVB backbones of `models/encoders.py` on another dataset.

- `fit_autoencoder(rng, x)`: a `ConvAutoencoder` fitted by reconstruction alone. It takes no
  labels, so its embedding cannot have been shaped by the classes it is later evaluated on.
- `fit_cnn(rng, x, y)`: a `SmallCNN` pre-trained with labels (the supervised ablation).

Both run Adam over shuffled mini-batches as one jitted `lax.scan` (epochs outside, batches
inside); deterministic for a given `rng`. The last partial batch of an epoch is dropped.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.encoders import ConvAutoencoder, SmallCNN
from train import optim


def _check_fit_args(n: int, epochs: int, batch_size: int, learning_rate: float) -> None:
    if n < 1:
        raise ValueError("x is empty; an encoder needs fitting data")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive int")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0")


def _adam_epochs(loss_fn: Callable[..., jax.Array], params, data: tuple[jax.Array, ...],
                 rng: jax.Array, *, epochs: int, batch_size: int, learning_rate: float):
    """Minimises `loss_fn(params, *batch)` with Adam; `data` arrays share their leading axis N."""
    N = data[0].shape[0]
    B = min(batch_size, N)
    steps = N // B
    tx, _ = optim.make_optimizer(optim.optim(lr=learning_rate))   # Adam, constant rate

    @jax.jit
    def run(params, r):
        def epoch(carry, re):
            perm = jax.random.permutation(re, N)[: steps * B].reshape(steps, B)

            def step(carry, ix):
                params, opt = carry
                g = jax.grad(loss_fn)(params, *(a[ix] for a in data))
                upd, opt = tx.update(g, opt, params)
                return (optax.apply_updates(params, upd), opt), None

            return jax.lax.scan(step, carry, perm)[0], None

        (params, _), _ = jax.lax.scan(epoch, (params, tx.init(params)),
                                      jax.random.split(r, epochs))
        return params

    return run(params, rng)


def fit_autoencoder(rng: jax.Array, x_NxHxW: np.ndarray, *, embed_dim: int = 64,
                    epochs: int = 15, batch_size: int = 128,
                    learning_rate: float = 3e-3) -> tuple[ConvAutoencoder, dict]:
    """Fits a `ConvAutoencoder` to [N, H, W] or [N, H, W, ch] images in [0, 1]; returns
    (module, params).

    Loss: per-pixel sigmoid cross-entropy between the reconstruction logits and the pixel
    intensities (ink fractions or colour levels in [0, 1]). No labels are taken.
    """
    x = jnp.asarray(x_NxHxW, jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"x_NxHxW has shape {tuple(x.shape)}; expected [N, H, W] or "
                         "[N, H, W, ch] images")
    _check_fit_args(x.shape[0], epochs, batch_size, learning_rate)
    model = ConvAutoencoder(embed_dim=embed_dim, image_hw=(int(x.shape[1]), int(x.shape[2])),
                            channels=int(x.shape[3]))
    r_init, r_loop = jax.random.split(rng)
    params = model.init(r_init, x[:1])

    def loss_fn(p, xb):
        return optax.sigmoid_binary_cross_entropy(model.apply(p, xb), xb).mean()

    return model, _adam_epochs(loss_fn, params, (x,), r_loop, epochs=epochs,
                               batch_size=batch_size, learning_rate=learning_rate)


def fit_cnn(rng: jax.Array, x_NxHxW: np.ndarray, y_N: np.ndarray, *, num_classes: int,
            embed_dim: int = 64, epochs: int = 15, batch_size: int = 128,
            learning_rate: float = 3e-3) -> tuple[SmallCNN, dict]:
    """Pre-trains a `SmallCNN` with labels (Adam, cross-entropy); returns (module, params)."""
    x = jnp.asarray(x_NxHxW, jnp.float32)
    y = jnp.asarray(y_N, jnp.int32)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y_N has shape {tuple(y.shape)}; expected ({x.shape[0]},), one label "
                         "per image")
    _check_fit_args(x.shape[0], epochs, batch_size, learning_rate)
    model = SmallCNN(embed_dim=embed_dim, num_classes=num_classes)
    r_init, r_loop = jax.random.split(rng)
    params = model.init(r_init, x[:1])

    def loss_fn(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    return model, _adam_epochs(loss_fn, params, (x, y), r_loop, epochs=epochs,
                               batch_size=batch_size, learning_rate=learning_rate)
