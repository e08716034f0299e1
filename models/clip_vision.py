"""CLIP's vision tower (Radford et al. 2021) in Linen, as Hugging Face's
`CLIPVisionModelWithProjection` computes it: one of DKVB's frozen backbones (Träuble et al. 2023
use CLIP ViT-B/32 features).

    pixels_BxHxWxC --patch conv (stride P)--> [B, N, D] --class token + learned positions-->
    [B, 1+N, D] --pre-LayerNorm--> L x (x + attn(ln_1 x); x + mlp(ln_2 x)) --class token-->
    post-LayerNorm --projection--> image_embeds_BxP

Inputs are NHWC (channels last, as every mnemax image), already resized and normalised by the
checkpoint's processor (`preprocess`); torch's CLIP takes NCHW, so `pixel_values.permute(0, 2, 3,
1)` is this module's input. Images must be `image_size` square (no position interpolation).
Parameters carry logical axis names (embed, heads, kv, mlp) like the Transformer's; softmax and
layer norms accumulate in float32.

`CLIPVisionConfig.from_hf` reads a `clip_vision_model` config.json (CLIPVisionModelWithProjection,
CLIPVisionModel has no projection and is refused) or a `clip` one (CLIPModel: `vision_config`
nested, `projection_dim` at the top; the text tower is left unread); `convert_hf` maps the
checkpoint's tensors (`vision_model.…`, `visual_projection.weight`) onto the Flax tree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models.transformer import as_dtype

# HF hidden_act → activation. quick_gelu is OpenAI CLIP's x·sigmoid(1.702x).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    width: int = 768                 # D (HF hidden_size)
    num_layers: int = 12             # L
    num_heads: int = 12              # H; D/H per head
    mlp_hidden: int = 3072           # F (HF intermediate_size)
    image_size: int = 224            # input H = W
    patch_size: int = 32             # P: N = (image_size / P)^2 patches
    num_channels: int = 3            # C
    projection_dim: int = 512        # image_embeds width
    act: str = "quick_gelu"          # one of ACTIVATIONS
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32         # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("width", "num_layers", "num_heads", "mlp_hidden", "image_size", "patch_size",
                  "num_channels", "projection_dim"):
            _positive_int(f, getattr(self, f))
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size="
                             f"{self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r} is not allowed; use one of {sorted(ACTIVATIONS)}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict, *, dtype=jnp.float32, param_dtype=jnp.float32
                ) -> "CLIPVisionConfig":
        """config.json of a CLIPVisionModelWithProjection (model_type clip_vision_model) or a
        CLIPModel (model_type clip) → the vision tower's config; unsupported fields refused."""
        kind = hf.get("model_type")
        if kind == "clip":
            vision = dict(hf.get("vision_config") or {})
            projection = hf.get("projection_dim", 512)
        elif kind == "clip_vision_model":
            vision, projection = hf, hf.get("projection_dim")
            if "CLIPVisionModel" in (hf.get("architectures") or []):
                raise ValueError("config.json field architectures=['CLIPVisionModel'] is not "
                                 "supported (no visual projection); allowed: "
                                 "CLIPVisionModelWithProjection or CLIPModel")
        else:
            raise ValueError(f"config.json field model_type={kind!r} is not allowed; use 'clip' "
                             "or 'clip_vision_model'")
        act = vision.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"config.json field hidden_act={act!r} is not supported; allowed: "
                             f"{sorted(ACTIVATIONS)}")
        return cls(width=vision.get("hidden_size", 768),
                   num_layers=vision.get("num_hidden_layers", 12),
                   num_heads=vision.get("num_attention_heads", 12),
                   mlp_hidden=vision.get("intermediate_size", 3072),
                   image_size=vision.get("image_size", 224),
                   patch_size=vision.get("patch_size", 32),
                   num_channels=vision.get("num_channels", 3),
                   projection_dim=projection if projection is not None else 512,
                   act=act, layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
                   dtype=dtype, param_dtype=param_dtype)


def _param(module: nn.Module, name: str, shape, names, init=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, names), shape,
                        module.cfg.param_dtype)


def _norm(c: CLIPVisionConfig, name: str) -> nn.Module:
    return layers.LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                            use_bias=True, name=name)


class Attention(nn.Module):
    """Bidirectional multi-head attention with biases (HF CLIPAttention), scores × head_dim^-0.5,
    softmax in float32."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        D, H, K, dt = c.width, c.num_heads, c.head_dim, c.dtype
        zeros = nn.initializers.zeros

        def heads(name):
            w = _param(self, name, (D, H, K), ("embed", "heads", "kv"))
            b = _param(self, name + "_bias", (H, K), ("heads", "kv"), zeros)
            y = jnp.einsum("btd,dhk->bthk", x_BxTxD.astype(dt), w.astype(dt)) + b.astype(dt)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        q, k, v = heads("query"), heads("key"), heads("value")
        s_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) * K ** -0.5
        p_BxHxTxT = jax.nn.softmax(s_BxHxTxT, axis=-1).astype(dt)
        y_BxTxHxK = jnp.einsum("bhqs,bshk->bqhk", p_BxHxTxT, v)
        w_out = _param(self, "out", (H, K, D), ("heads", "kv", "embed"))
        b_out = _param(self, "out_bias", (D,), ("embed",), zeros)
        return jnp.einsum("bthk,hkd->btd", y_BxTxHxK, w_out.astype(dt)) + b_out.astype(dt)


class MLP(nn.Module):
    """fc_out(act(fc_in x)) with biases (HF CLIPMLP)."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        D, F, dt = c.width, c.mlp_hidden, c.dtype
        zeros = nn.initializers.zeros
        w_in = _param(self, "fc_in", (D, F), ("embed", "mlp"))
        b_in = _param(self, "fc_in_bias", (F,), ("mlp",), zeros)
        h = ACTIVATIONS[c.act](jnp.einsum("btd,df->btf", x_BxTxD.astype(dt), w_in.astype(dt))
                               + b_in.astype(dt))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        w_out = _param(self, "fc_out", (F, D), ("mlp", "embed"))
        b_out = _param(self, "fc_out_bias", (D,), ("embed",), zeros)
        return jnp.einsum("btf,fd->btd", h, w_out.astype(dt)) + b_out.astype(dt)


class Block(nn.Module):
    """Pre-norm encoder layer: x + attn(ln_1 x), then + mlp(ln_2 x)."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        x_BxTxD = x_BxTxD + Attention(self.cfg, name="attn")(_norm(self.cfg, "ln_1")(x_BxTxD))
        x_BxTxD = x_BxTxD + MLP(self.cfg, name="mlp")(_norm(self.cfg, "ln_2")(x_BxTxD))
        return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class CLIPVision(nn.Module):
    """pixels_BxHxWxC (NHWC, normalised) → image_embeds_BxP; with `features=True` the dict
    {"image_embeds": [B, P], "pooler_output": [B, D] (class token after the post-LayerNorm),
    "last_hidden_state": [B, 1 + N, D]}, named as transformers names them."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC, *, features: bool = False):
        c = self.cfg
        S, C = c.image_size, c.num_channels
        if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[1:] != (S, S, C):
            raise ValueError(f"pixels have shape {tuple(pixels_BxHxWxC.shape)}; this CLIP wants "
                             f"[B, {S}, {S}, {C}] (NHWC: torch's NCHW pixel_values.permute(0, 2, "
                             "3, 1), resized to image_size)")
        P, D, dt = c.patch_size, c.width, c.dtype
        kernel = _param(self, "patch_embed", (P, P, C, D), (None, None, None, "embed"))
        patches = jax.lax.conv_general_dilated(
            pixels_BxHxWxC.astype(dt), kernel.astype(dt), window_strides=(P, P),
            padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        B = patches.shape[0]
        patches_BxNxD = patches.reshape(B, -1, D)      # row-major patches, as torch's flatten(2)
        cls = _param(self, "class_embed", (D,), ("embed",), nn.initializers.normal(1.0))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (B, 1, D)), patches_BxNxD], 1)
        pos = _param(self, "pos_embed", (1 + c.num_patches, D), (None, "embed"))
        x_BxTxD = nn.with_logical_constraint(x + pos.astype(dt), ("batch", "length", "embed"))
        x_BxTxD = _norm(c, "ln_pre")(x_BxTxD)
        for i in range(c.num_layers):
            x_BxTxD = Block(c, name=f"block_{i}")(x_BxTxD)
        pooled_BxD = _norm(c, "ln_post")(x_BxTxD[:, 0])
        w = _param(self, "projection", (D, c.projection_dim), ("embed", None))
        embeds_BxP = jnp.einsum("bd,dp->bp", pooled_BxD, w.astype(dt))
        chex.assert_shape(embeds_BxP, (B, c.projection_dim))
        if features:
            return {"image_embeds": embeds_BxP, "pooler_output": pooled_BxD,
                    "last_hidden_state": x_BxTxD}
        return embeds_BxP


def example(c: CLIPVisionConfig) -> tuple:
    """Arguments of `CLIPVision(c).init` after the rng: one image."""
    return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


# Tensors of a CLIPModel checkpoint the vision tower does not use (and buffers some files keep).
UNUSED = r"text_model\..*|text_projection\.weight|logit_scale|.*position_ids"


def convert_hf(c: CLIPVisionConfig, read: Callable[[str], np.ndarray]
               ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(Flax path, array) for every parameter of CLIPVision(c) from HF names. torch Linear
    weights are [out, in] (ours [in, ...], heads split (H, K) in HF's view order); the patch
    conv's [D, C, P, P] becomes HWIO [P, P, C, D]."""
    D, H, K = c.width, c.num_heads, c.head_dim
    v = "vision_model."
    yield ("patch_embed",), read(v + "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
    yield ("class_embed",), read(v + "embeddings.class_embedding")
    yield ("pos_embed",), read(v + "embeddings.position_embedding.weight")
    for hf_name, name in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        yield (name, "scale"), read(f"{v}{hf_name}.weight")
        yield (name, "bias"), read(f"{v}{hf_name}.bias")
    for i in range(c.num_layers):
        h, b = f"{v}encoder.layers.{i}.", f"block_{i}"
        for hf_name, name in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            yield (b, name, "scale"), read(f"{h}{hf_name}.weight")
            yield (b, name, "bias"), read(f"{h}{hf_name}.bias")
        for hf_name, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            yield (b, "attn", name), read(f"{h}self_attn.{hf_name}.weight").T.reshape(D, H, K)
            yield (b, "attn", name + "_bias"), read(f"{h}self_attn.{hf_name}.bias").reshape(H, K)
        yield (b, "attn", "out"), read(h + "self_attn.out_proj.weight").T.reshape(H, K, D)
        yield (b, "attn", "out_bias"), read(h + "self_attn.out_proj.bias")
        for hf_name, name in (("fc1", "fc_in"), ("fc2", "fc_out")):
            yield (b, "mlp", name), read(f"{h}mlp.{hf_name}.weight").T
            yield (b, "mlp", name + "_bias"), read(f"{h}mlp.{hf_name}.bias")
    yield ("projection",), read("visual_projection.weight").T
