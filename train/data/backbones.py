"""Pretrained vision backbones (models.pretrained: CLIP's vision tower, ResNet) as DKVB's frozen
encoders (Träuble et al. 2023, Sec. 4): every dataset is embedded once, the embeddings cached on
disk and reused by every learner and every later run.

    bb = load_backbone("/models/clip-vit-base-patch32", mesh=mesh)    # a save_pretrained folder
    z_NxD = embed_images(bb, x_NxHxWxC)          # float32 [0, 1] NHWC images → [N, D] float32
    z_NxD = cached_embeddings(bb, x_NxHxWxC, cache_dir=DIR, name="cifar10-train")

Preprocessing follows the checkpoint's preprocessor_config.json (when the folder has one):
images are resized to the processor's crop size (bicubic, `jax.image.resize`; for CIFAR's square
images the processors' shortest-edge resize and centre crop come to the same square) and
normalised by its image_mean / image_std. Without that file: the model's own image_size (CLIP)
or 224 (ResNet), and CLIP's or ImageNet's mean and std. This is close to, not bit-equal with,
the PIL-based processors of transformers (a different bicubic kernel at the borders).

Embedding is sharded over the mesh: the parameters are placed by `from_hf(mesh=, rules=)`,
each batch of images is split over the mesh's batch axes ('data', 'fsdp'), and the jitted
backbone runs once per batch shape (the last batch padded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import pretrained
from models.clip_vision import CLIPVision
from train import sharding as shd
from train.data import embeddings

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A loaded backbone: model, params (placed on `mesh`), its preprocessing, and `digest`, the
    sha256 of its folder's config, processor and weight files (a cache key)."""
    path: str
    model: nn.Module
    params: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str
    mesh: Any = None
    rules: Any = None

    @property
    def kind(self) -> str:
        return "clip" if isinstance(self.model, CLIPVision) else "resnet"


def _processor(directory: str) -> dict:
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _digest(directory: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name in ("config.json", "preprocessor_config.json") or name.endswith(".safetensors"):
            h.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:12]


def backbone_spec(path: str) -> dict:
    """What embedding with the checkpoint at `path` will do, without reading its weights:
    {"model_type", "image_size", "mean", "std", "embed_dim"} (embed_dim from the module's
    abstract output). A ValueError names what is unsupported."""
    directory = pretrained.resolve(path)
    hf = pretrained.read_config(directory)
    kind = hf.get("model_type")
    if kind not in ("clip", "clip_vision_model", "resnet"):
        raise ValueError(f"backbone {path!r} has config.json field model_type={kind!r}; a DKVB "
                         "backbone must be one of 'clip', 'clip_vision_model', 'resnet'")
    family = pretrained._family(hf)
    cfg = family.config(hf)
    model = family.module(cfg)
    proc = _processor(directory)
    clip = kind != "resnet"
    crop = proc.get("crop_size") or {}
    size = crop.get("height") if isinstance(crop, dict) else crop
    size = int(size or (cfg.image_size if clip else 224))
    if clip and size != cfg.image_size:
        raise ValueError(f"backbone {path!r}: preprocessor crop_size={size} differs from the "
                         f"model's image_size={cfg.image_size}")
    mean = tuple(proc.get("image_mean", CLIP_MEAN if clip else IMAGENET_MEAN))
    std = tuple(proc.get("image_std", CLIP_STD if clip else IMAGENET_STD))
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
    return {"model_type": kind, "image_size": size, "mean": mean, "std": std,
            "embed_dim": int(np.prod(abstract.shape[1:]))}


def load_backbone(path: str, *, mesh=None, rules=None) -> Backbone:
    """The backbone at `path` (a save_pretrained folder, or a hub id when online), its params
    on `mesh` under `rules` (default: every device on the 'data' axis, the default rules)."""
    spec = backbone_spec(path)
    directory = pretrained.resolve(path)
    if mesh is None:
        mesh = shd.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    rules = rules or shd.DEFAULT_RULES
    model, params = pretrained.from_hf(directory, mesh=mesh, rules=rules)
    return Backbone(path=str(path), model=model, params=params, image_size=spec["image_size"],
                    mean=spec["mean"], std=spec["std"], digest=_digest(directory), mesh=mesh,
                    rules=rules)


def preprocess(bb: Backbone, x_BxHxWxC: jax.Array) -> jax.Array:
    """[B, H, W, 3] images in [0, 1] → [B, S, S, 3] resized (bicubic) and normalised."""
    x = jnp.asarray(x_BxHxWxC, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images have shape {tuple(x.shape)}; expected [B, H, W, 3] (NHWC) in "
                         "[0, 1]")
    S = bb.image_size
    if x.shape[1:3] != (S, S):
        x = jax.image.resize(x, (x.shape[0], S, S, 3), method="bicubic")
    return (x - jnp.asarray(bb.mean, jnp.float32)) / jnp.asarray(bb.std, jnp.float32)


def embed_images(bb: Backbone, x_NxHxWxC: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """[N, D] float32 features of `bb` (CLIP: image_embeds; ResNet: pooled, flattened) for images
    [N, H, W, 3] in [0, 1], in batches split over the mesh's batch axes."""
    n = len(x_NxHxWxC)
    if n == 0:
        raise ValueError("x is empty; nothing to embed")
    shards = bb.mesh.shape["data"] * bb.mesh.shape["fsdp"]
    b = min(batch_size, n)
    b = -(-b // shards) * shards                 # whole rows per device
    in_sharding = shd.batch_sharding(bb.mesh, bb.rules, ndim=4)

    @jax.jit
    def fn(params, x):
        z = bb.model.apply({"params": params}, preprocess(bb, x))
        return z.reshape(z.shape[0], -1).astype(jnp.float32)

    out = []
    with jax.set_mesh(bb.mesh):
        for s in range(0, n, b):
            xb = np.asarray(x_NxHxWxC[s:s + b], np.float32)
            m = len(xb)
            if m < b:
                xb = np.concatenate([xb, np.repeat(xb[-1:], b - m, 0)])
            zb = fn(bb.params, jax.device_put(xb, in_sharding))
            out.append(np.asarray(jax.device_get(zb))[:m])
    return np.concatenate(out)


def cached_embeddings(bb: Backbone, x_NxHxWxC: np.ndarray, *, cache_dir, name: str,
                      batch_size: int = 256) -> tuple[np.ndarray, pathlib.Path]:
    """(z [N, D], path): the embeddings of `x` read from CACHE_DIR/backbone-DIGEST/NAME-XHASH.npz
    when there (DIGEST: the checkpoint's files; XHASH: the images' bytes and the preprocessing),
    else computed by `embed_images` and written there."""
    h = hashlib.sha256(np.ascontiguousarray(x_NxHxWxC).tobytes())
    h.update(json.dumps([bb.image_size, bb.mean, bb.std]).encode())
    folder = pathlib.Path(cache_dir) / f"backbone-{bb.digest}"
    split = f"{name}-{h.hexdigest()[:12]}"
    path = folder / f"{split}.npz"
    if path.exists():
        z, _ = embeddings.load(str(folder), split)
        return z, path
    z = embed_images(bb, x_NxHxWxC, batch_size=batch_size)
    embeddings.save(folder, split, z)
    return z, path
