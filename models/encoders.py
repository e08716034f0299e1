"""Small frozen encoders used as DKVB backbones, and how to plug in your own.

The DKVB paper keeps the backbone frozen and precomputes every dataset's embeddings once
(Träuble et al. 2023, Sec. 4). Three in-repo encoders, each fitted on a dataset *other* than the
one the values are trained on:

- `raw_embed`: the flattened input itself.
- `PCA` (`fit_pca` / `pca_embed`): principal components fitted on another dataset (no labels).
- `ConvAutoencoder` (`ae_embed`): a small convolutional autoencoder fitted without labels on
  another dataset (`mnemax-train --config dkvb_encoder:ae`); its bottleneck is the embedding.
- `SmallCNN` (`cnn_embed`): a small CNN pre-trained *with labels* on another dataset
  (`mnemax-train --config dkvb_encoder:cnn`); its penultimate layer is the embedding. If the
  labels are the evaluation's classes, the embedding already separates them (a label leak for
  class-incremental claims); kept as an ablation.

This file holds the modules, their builders for the trainer (`build_autoencoder`, `build_cnn`)
and their frozen `embed` functions; the fitting is a trainer run (train/configs/dkvb_encoder.py,
objectives in train/objectives/encoders.py).

Pretrained CLIP and ResNet checkpoints (the paper's ResNet-50 and CLIP ViT-B/32) are loaded by
`models.pretrained.from_hf` and embedded, cached, by train/data/backbones.py
(`python -m eval.class_incremental --backbone DIR`). Your own backbone (e.g. DINO features):

    z_NxD = precompute_embeddings(my_embed_fn, x_N..., batch_size=256)   # any x -> [B, D] fn
    np.save("train_emb.npy", z_NxD)   # or save_embeddings(path, z=z, y=y)
    z_NxD, y_N = load_embeddings("train_emb.npz")

and hand `z_NxD` to `train.objectives.dkvb` (or give `KVBottleneck(encoder=my_embed_fn)` a
jax-traceable function).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ENCODERS = ("raw", "pca", "ae", "cnn")
# What each encoder's fitting sees of the fitting data's labels.
SUPERVISION = {"raw": "none", "pca": "none", "ae": "none", "cnn": "labels"}


def raw_embed(x: jax.Array) -> jax.Array:
    """[B, ...] -> [B, D] flattened float32 input."""
    return jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- PCA


@flax.struct.dataclass
class PCA:
    """mean_D and the top components_DxP (orthonormal columns) of the fitting data."""

    mean_D: jax.Array
    components_DxP: jax.Array


def fit_pca(x_NxD: np.ndarray, num_components: int) -> PCA:
    """PCA of [N, ...] data (flattened), by SVD in float64 on the host."""
    x = np.asarray(x_NxD, np.float64).reshape(len(x_NxD), -1)
    if not isinstance(num_components, int) or not 1 <= num_components <= min(x.shape):
        raise ValueError(f"num_components={num_components!r} must be an int in [1, {min(x.shape)}]")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:num_components].T
    # Fix each component's sign (largest-magnitude entry positive) so the fit is deterministic.
    sign = np.sign(comps[np.abs(comps).argmax(0), np.arange(num_components)])
    return PCA(mean_D=jnp.asarray(mean, jnp.float32), components_DxP=jnp.asarray(comps * sign,
                                                                                 jnp.float32))


def pca_embed(pca: PCA, x: jax.Array) -> jax.Array:
    """[B, ...] -> [B, P] projection onto the fitted components."""
    x_BxD = raw_embed(x)
    return jnp.dot(x_BxD - pca.mean_D, pca.components_DxP, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Two 3x3 conv layers + a dense embedding layer + a linear head (for pre-training only).

    Input [B, H, W] or [B, H, W, ch] images scaled to about [0, 1]; `embed_dim` features.
    """

    embed_dim: int = 64
    num_classes: int = 10
    width: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, *, return_embedding: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        h = nn.relu(nn.Conv(self.width, (3, 3), name="conv1")(x.astype(jnp.float32)))
        h = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=(2, 2), name="conv2")(h))
        h = h.reshape(h.shape[0], -1)
        z = nn.relu(nn.Dense(self.embed_dim, name="embed")(h))
        if return_embedding:
            return z
        return nn.Dense(self.num_classes, name="head")(z)


def cnn_embed(model: SmallCNN, params: dict, x: jax.Array) -> jax.Array:
    """[B, H, W(, ch)] -> [B, embed_dim] penultimate features of the frozen CNN."""
    return model.apply(params, jnp.asarray(x, jnp.float32), return_embedding=True)


# --------------------------------------------------------------------------- conv autoencoder


class ConvAutoencoder(nn.Module):
    """Conv encoder -> `embed_dim` ReLU bottleneck -> transposed-conv decoder (no labels).

    Input [B, H, W] (one channel) or [B, H, W, channels] images in [0, 1] with (H, W) ==
    `image_hw` (both even). `__call__` returns reconstruction logits [B, H, W, channels] (a
    sigmoid gives pixels); `encode` the bottleneck [B, embed_dim].
    """

    embed_dim: int = 64
    width: int = 32
    image_hw: tuple[int, int] = (8, 8)
    channels: int = 1

    def setup(self):
        H, W = self.image_hw
        if H % 2 or W % 2:
            raise ValueError(f"image_hw={self.image_hw!r} must be two even ints (a stride-2 conv "
                             "is mirrored by a stride-2 transposed conv)")
        self.conv1 = nn.Conv(self.width, (3, 3), name="conv1")
        self.conv2 = nn.Conv(2 * self.width, (3, 3), strides=(2, 2), name="conv2")
        self.embed = nn.Dense(self.embed_dim, name="embed")
        # The decoder's first layer mirrors `embed`: back to conv2's feature-map shape.
        self.unembed = nn.Dense((H // 2) * (W // 2) * 2 * self.width, name="unembed")
        self.deconv1 = nn.ConvTranspose(self.width, (3, 3), strides=(2, 2), name="deconv1")
        self.deconv2 = nn.Conv(self.channels, (3, 3), name="deconv2")

    def encode(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        h = nn.relu(self.conv1(x.astype(jnp.float32)))
        h = nn.relu(self.conv2(h))
        return nn.relu(self.embed(h.reshape(h.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        H, W = self.image_hw
        z = self.encode(x)
        h = nn.relu(self.unembed(z)).reshape(z.shape[0], H // 2, W // 2, 2 * self.width)
        return self.deconv2(nn.relu(self.deconv1(h)))


def build_cnn(model_cfg: dict) -> SmallCNN:
    """train.trainer.MODELS["cnn"]: {embed_dim, num_classes, width}."""
    return SmallCNN(embed_dim=model_cfg["embed_dim"], num_classes=model_cfg["num_classes"],
                    width=model_cfg.get("width", 32))


def build_autoencoder(model_cfg: dict) -> ConvAutoencoder:
    """train.trainer.MODELS["autoencoder"]: {embed_dim, width, image_hw, channels}."""
    return ConvAutoencoder(embed_dim=model_cfg["embed_dim"], width=model_cfg.get("width", 32),
                           image_hw=tuple(model_cfg["image_hw"]),
                           channels=model_cfg.get("channels", 1))


def ae_embed(model: ConvAutoencoder, params: dict, x: jax.Array) -> jax.Array:
    """[B, H, W(, ch)] -> [B, embed_dim] bottleneck features of the frozen autoencoder."""
    return model.apply(params, jnp.asarray(x, jnp.float32), method=ConvAutoencoder.encode)


# --------------------------------------------------------------------------- plug-in backbones


def precompute_embeddings(embed_fn: Callable[[jax.Array], jax.Array], x: np.ndarray, *,
                          batch_size: int = 512) -> np.ndarray:
    """Runs any frozen `embed_fn(x_B...) -> [B, D]` over `x` in batches; returns [N, D] float32.

    The last batch is padded to `batch_size` so `embed_fn` compiles once.
    """
    n = len(x)
    if n == 0:
        raise ValueError("x is empty; nothing to embed")
    fn = jax.jit(embed_fn)
    out = []
    for s in range(0, n, batch_size):
        xb = np.asarray(x[s:s + batch_size])
        m = len(xb)
        if m < batch_size and n > batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - m, 0)])
        zb = np.asarray(fn(jnp.asarray(xb)), np.float32)
        out.append(zb[:m].reshape(m, -1))
    return np.concatenate(out)


def save_embeddings(path: str | pathlib.Path, *, z: np.ndarray,
                    y: np.ndarray | None = None) -> None:
    """Writes embeddings [N, D] (and labels [N]) to an .npz file for `load_embeddings`."""
    arrays = {"z": np.asarray(z, np.float32)}
    if y is not None:
        arrays["y"] = np.asarray(y, np.int32)
    np.savez(path, **arrays)


def load_embeddings(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads precomputed embeddings: an .npz with `z` [N, D] (and optional `y` [N]), or a .npy
    holding [N, D]. Returns (z_NxD float32, y_N int32 or None)."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        z = np.load(path)
        y = None
    elif path.suffix == ".npz":
        with np.load(path) as f:
            if "z" not in f:
                raise ValueError(f"{path}: an .npz of embeddings needs an array 'z'; has {list(f)}")
            z = f["z"]
            y = f["y"].astype(np.int32) if "y" in f else None
    else:
        raise ValueError(f"path={str(path)!r}: embeddings must be a .npy or .npz file")
    if z.ndim != 2:
        raise ValueError(f"{path}: embeddings have shape {z.shape}; expected [N, D]")
    if y is not None and len(y) != len(z):
        raise ValueError(f"{path}: {len(y)} labels for {len(z)} embeddings")
    return z.astype(np.float32), y
