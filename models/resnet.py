"""ResNet (He et al. 2016) in Linen, as Hugging Face's `ResNetModel` computes it: one of DKVB's
frozen backbones (Träuble et al. 2023 use ResNet-50 features).

    pixels_BxHxWxC --7x7/2 conv, BN, act, 3x3/2 max pool--> stages of residual layers
    --global average pool--> pooled_BxC (HF pooler_output [B, C, 1, 1], flattened)

Layers are "bottleneck" (1x1 reduce to C/4, 3x3, 1x1 expand: ResNet-50/101/152) or "basic"
(two 3x3: ResNet-18/34), a projection shortcut (1x1 conv + BN) where the width or stride changes.
Every stage but the first halves the resolution in its first layer; the first does too with
`downsample_in_first_stage`; `downsample_in_bottleneck` moves a bottleneck's stride from its
3x3 to its first 1x1 conv (both as transformers' ResNetConfig defines them). Convolutions pad
k // 2 on every side, as torch does (not Flax's asymmetric "SAME" at stride 2).

Batch norm runs in inference mode only, with the checkpoint's running statistics: each norm's
`mean` and `var` sit in the params tree next to its `scale` and `bias` (the backbone is frozen, so
`model.apply({"params": p}, pixels)` needs no batch_stats collection). Inputs are NHWC (torch's
NCHW `pixel_values.permute(0, 2, 3, 1)`), normalised by the checkpoint's processor; any H, W
the strides allow. Conv kernels carry the logical axis names (None, None, "conv_in",
"conv_out"), which the default rules leave whole (ResNet-50 has 25M parameters: replicated).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import as_dtype

LAYER_TYPES = ("bottleneck", "basic")
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "silu": jax.nn.silu}
BN_EPS = 1e-5   # torch BatchNorm2d's default; transformers' ResNet does not change it


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    num_channels: int = 3                              # input C
    embedding_size: int = 64                           # stem width
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)   # each stage's output width
    depths: tuple[int, ...] = (3, 4, 6, 3)             # layers per stage
    layer_type: str = "bottleneck"                     # one of LAYER_TYPES
    act: str = "relu"                                  # one of ACTIVATIONS
    downsample_in_first_stage: bool = False            # stride 2 in the first stage too
    downsample_in_bottleneck: bool = False             # stride in the 1x1 reduce, not the 3x3
    dtype: Any = jnp.float32                           # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(self.depths))
        for name in ("num_channels", "embedding_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("hidden_sizes", "depths"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1
                            for x in v):
                raise ValueError(f"{name}={v!r} must be a non-empty list of positive integers")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"hidden_sizes={self.hidden_sizes} and depths={self.depths} must "
                             "have one entry per stage")
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type={self.layer_type!r} is not allowed; use one of "
                             f"{LAYER_TYPES}")
        if self.layer_type == "bottleneck" and any(h % 4 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes={self.hidden_sizes} must be divisible by 4 for "
                             "bottleneck layers (they reduce to a quarter)")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r} is not allowed; use one of {sorted(ACTIVATIONS)}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @classmethod
    def from_hf(cls, hf: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> "ResNetConfig":
        """config.json of a ResNetModel / ResNetForImageClassification → ResNetConfig."""
        if hf.get("model_type") != "resnet":
            raise ValueError(f"config.json field model_type={hf.get('model_type')!r} is not "
                             "allowed; use 'resnet'")
        for name, allowed in (("layer_type", LAYER_TYPES), ("hidden_act", tuple(ACTIVATIONS))):
            if hf.get(name, allowed[0]) not in allowed:
                raise ValueError(f"config.json field {name}={hf[name]!r} is not supported; "
                                 f"allowed: {list(allowed)}")
        for name in ("downsample_in_first_stage", "downsample_in_bottleneck"):
            if not isinstance(hf.get(name, False), bool):
                raise ValueError(f"config.json field {name}={hf[name]!r} must be true or false")
        return cls(num_channels=hf.get("num_channels", 3),
                   embedding_size=hf.get("embedding_size", 64),
                   hidden_sizes=tuple(hf.get("hidden_sizes", (256, 512, 1024, 2048))),
                   depths=tuple(hf.get("depths", (3, 4, 6, 3))),
                   layer_type=hf.get("layer_type", "bottleneck"),
                   act=hf.get("hidden_act", "relu"),
                   downsample_in_first_stage=hf.get("downsample_in_first_stage", False),
                   downsample_in_bottleneck=hf.get("downsample_in_bottleneck", False),
                   dtype=dtype, param_dtype=param_dtype)


class ConvNorm(nn.Module):
    """k x k conv (no bias, padding k // 2, `stride`) → batch norm with running statistics →
    activation (none if `act` is False). HF ResNetConvLayer / ResNetShortCut."""
    cfg: ResNetConfig
    features: int
    kernel: int
    stride: int = 1
    act: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC):
        c, k, dt = self.cfg, self.kernel, self.cfg.dtype
        pd = c.param_dtype
        init = nn.with_logical_partitioning(nn.initializers.he_normal(),
                                            (None, None, "conv_in", "conv_out"))
        w = self.param("kernel", init, (k, k, x_BxHxWxC.shape[-1], self.features), pd)
        y = jax.lax.conv_general_dilated(
            x_BxHxWxC.astype(dt), w.astype(dt), window_strides=(self.stride,) * 2,
            padding=((k // 2, k // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        vec = lambda name, init: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, ("conv_out",)), (self.features,), pd)
        scale, bias = vec("scale", nn.initializers.ones), vec("bias", nn.initializers.zeros)
        mean, var = vec("mean", nn.initializers.zeros), vec("var", nn.initializers.ones)
        # Inference-mode batch norm in float32: (y - running mean) / sqrt(running var + eps).
        yf = y.astype(jnp.float32)
        yf = (yf - mean) * (scale * jax.lax.rsqrt(var.astype(jnp.float32) + BN_EPS)) + bias
        if self.act:
            yf = ACTIVATIONS[c.act](yf)
        return yf.astype(dt)


class Layer(nn.Module):
    """One residual layer: act(branch(x) + shortcut(x)); the shortcut is a 1x1 conv + BN where
    the width or the stride changes, else the identity."""
    cfg: ResNetConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x_BxHxWxC):
        c, s, f = self.cfg, self.stride, self.features
        if c.layer_type == "bottleneck":
            r = f // 4
            s1, s3 = (s, 1) if c.downsample_in_bottleneck else (1, s)
            h = ConvNorm(c, r, 1, s1, name="conv_0")(x_BxHxWxC)
            h = ConvNorm(c, r, 3, s3, name="conv_1")(h)
            h = ConvNorm(c, f, 1, act=False, name="conv_2")(h)
        else:
            h = ConvNorm(c, f, 3, s, name="conv_0")(x_BxHxWxC)
            h = ConvNorm(c, f, 3, act=False, name="conv_1")(h)
        shortcut = x_BxHxWxC
        if x_BxHxWxC.shape[-1] != f or s != 1:
            shortcut = ConvNorm(c, f, 1, s, act=False, name="shortcut")(x_BxHxWxC)
        y = h.astype(jnp.float32) + shortcut.astype(jnp.float32)
        return ACTIVATIONS[c.act](y).astype(c.dtype)


class ResNet(nn.Module):
    """pixels_BxHxWxC (NHWC, normalised) → pooled_BxC (global average of the last stage); with
    `features=True` the dict {"pooler_output": [B, C], "last_hidden_state": [B, h, w, C]}."""
    cfg: ResNetConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC, *, features: bool = False):
        c = self.cfg
        if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[-1] != c.num_channels:
            raise ValueError(f"pixels have shape {tuple(pixels_BxHxWxC.shape)}; this ResNet "
                             f"wants [B, H, W, {c.num_channels}] (NHWC: torch's NCHW "
                             "pixel_values.permute(0, 2, 3, 1))")
        x = ConvNorm(c, c.embedding_size, 7, 2, name="stem")(pixels_BxHxWxC)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (width, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
            stride = 2 if (i > 0 or c.downsample_in_first_stage) else 1
            for j in range(depth):
                x = Layer(c, width, stride if j == 0 else 1, name=f"stage_{i}_{j}")(x)
        pooled_BxC = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(c.dtype)
        if features:
            return {"pooler_output": pooled_BxC, "last_hidden_state": x}
        return pooled_BxC


def example(c: ResNetConfig) -> tuple:
    """Arguments of `ResNet(c).init` after the rng: one 32x32 image."""
    return (jnp.zeros((1, 32, 32, c.num_channels), jnp.float32),)


# Tensors a checkpoint may hold that the backbone does not use: BN step counters, and the head
# of a ResNetForImageClassification (whose other names carry the prefix "resnet.").
UNUSED = r"(resnet\.)?.*num_batches_tracked|classifier\..*"


def convert_hf(c: ResNetConfig, read: Callable[[str], np.ndarray]
               ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(Flax path, array) for every parameter of ResNet(c) from ResNetModel names (without the
    optional "resnet." prefix). torch conv weights [out, in, kh, kw] become HWIO."""
    def conv_norm(hf: str, path: tuple[str, ...]):
        yield path + ("kernel",), read(hf + "convolution.weight").transpose(2, 3, 1, 0)
        for theirs, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                             ("running_var", "var")):
            yield path + (ours,), read(f"{hf}normalization.{theirs}")

    yield from conv_norm("embedder.embedder.", ("stem",))
    in_width = c.embedding_size
    for i, (width, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
        stride = 2 if (i > 0 or c.downsample_in_first_stage) else 1
        for j in range(depth):
            hf, ours = f"encoder.stages.{i}.layers.{j}.", f"stage_{i}_{j}"
            for k in range(3 if c.layer_type == "bottleneck" else 2):
                yield from conv_norm(f"{hf}layer.{k}.", (ours, f"conv_{k}"))
            if j == 0 and (in_width != width or stride != 1):
                yield from conv_norm(hf + "shortcut.", (ours, "shortcut"))
        in_width = width
