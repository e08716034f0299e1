"""Decoder-only transformer LM with a pluggable attention.

The baseline for every comparison in mnemax, the body of the landmark LM and MAC's frozen base LM
(per-layer prefix keys/values). Pre-norm blocks, RoPE, no biases. The attention is a function
passed down to every block (`decoder_forward(..., attention_fn=...)`): `Transformer` uses dense
attention (`layers.dot_product_attention`); `models.landmark.LandmarkLM` passes landmark attention.

    cfg = TransformerConfig(vocab_size=320, width=64, num_layers=2, num_heads=4)
    model = Transformer(cfg)
    params = model.init(key, tokens_BxT)["params"]
    logits_BxTxV = model.apply({"params": params}, tokens_BxT)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "float64": jnp.float64}


def as_dtype(d: Any) -> Any:
    if isinstance(d, str):
        if d not in _DTYPES:
            raise ValueError(f"dtype={d!r} is not allowed; use one of {sorted(_DTYPES)}")
        return _DTYPES[d]
    return d


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int                    # V: byte vocabulary 320 by default (train/data/tokenizer.py)
    width: int = 64                    # D: residual width
    num_layers: int = 2                # L
    num_heads: int = 4                 # H
    head_dim: Optional[int] = None     # Dh: defaults to D // H
    num_kv_heads: Optional[int] = None  # Hkv: grouped-query attention (LLaMA); None = H
    mlp_hidden: Optional[int] = None   # defaults to 4·D
    mlp: str = "gelu"                  # 'gelu' (exact) | 'gelu_tanh' | 'swiglu'
    norm: str = "rmsnorm"              # 'rmsnorm' | 'layernorm' (with a bias iff `bias`)
    bias: bool = False                 # biases in every projection, MLP and LayerNorm (GPT-2)
    positions: str = "rope"            # 'rope' | 'learned' (GPT-2: a table of max_positions rows)
    max_positions: int = 0             # rows of the learned position table ('learned' only)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True        # lm head = embedding table transposed
    rope_base: float = 10000.0
    rope_interleaved: bool = True      # pairs (x0,x1),(x2,x3)… ; False = half rotation
    rope_scaling: Optional[layers.RopeScaling] = None  # context-extension rescaling (a dict of
                                                       # RopeScaling's fields is accepted)
    attention: str = "dense"           # 'dense' (Transformer); 'landmark' | 'landmark_dense'
                                       # (models.landmark.LandmarkLM)
    attention_impl: str = "xla"        # dense attention's implementation (layers.DENSE_IMPLS):
                                       # 'xla' (scores materialised), 'cudnn' (cuDNN's flash
                                       # attention; GPUs, bfloat16/float16), 'splash' (Pallas
                                       # TPU splash attention) or 'auto' (the backend's kernel
                                       # where it serves the call, else xla)
    dtype: Any = jnp.float32           # compute dtype (bfloat16 on accelerators)
    param_dtype: Any = jnp.float32     # parameters stay float32 (float64 for parity runs)
    remat: bool = False                # rematerialise each block in the backward pass
    remat_policy: str = "full"         # with remat: what a block keeps (REMAT_POLICIES)
    scan_layers: bool = False          # the blocks as one nn.scan over stacked parameters
                                       # (params["blocks"]["block"], leading axis "layers"): one block
                                       # compiled instead of L; `unstack_layers` converts
    init_std: float = layers.DEFAULT_INIT_STD  # normal init of every weight matrix and the
                                               # embedding (see layers.DEFAULT_INIT_STD)
    prefix_lm: bool = False            # read `prefix` (Birdie's prompt) bidirectionally:
                                       # prefix-LM attention, causal after the prompt
    window: int = 0                    # >0: sliding-window attention, each query sees its
                                       # `window` most recent tokens (dense attention only;
                                       # 0: full causal attention)

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_layers", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads} "
                             "(or set head_dim)")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions={self.positions!r} is not allowed; use 'rope' or "
                             "'learned'")
        if self.positions == "learned" and self.max_positions <= 0:
            raise ValueError(f"max_positions={self.max_positions!r} must be a positive integer "
                             "with positions='learned'")
        if self.positions == "rope" and self.hd % 2:
            raise ValueError(f"head_dim={self.hd} must be even (RoPE rotates pairs)")
        if self.num_kv_heads is not None and (
                not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0
                or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads={self.num_kv_heads!r} must be a positive divisor of "
                             f"num_heads={self.num_heads}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, layers.RopeScaling):
            object.__setattr__(self, "rope_scaling", layers.RopeScaling(**dict(self.rope_scaling)))
        if self.mlp not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"mlp={self.mlp!r} is not allowed; use 'gelu', 'gelu_tanh' or 'swiglu'")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm={self.norm!r} is not allowed; use 'rmsnorm' or 'layernorm'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not allowed; use one of "
                             f"{sorted(REMAT_POLICIES)}")
        layers.check_init_std(self.init_std)
        if self.attention_impl not in layers.DENSE_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not allowed; use one of "
                             f"{layers.DENSE_IMPLS}")
        if self.attention != "dense" and self.attention_impl != "xla":
            raise ValueError(f"attention_impl={self.attention_impl!r} is for dense attention; "
                             f"attention={self.attention!r} takes its implementation from "
                             "models.landmark.LandmarkConfig.attention_impl")
        if self.attention_impl in layers.KERNEL_BACKENDS:
            why = ("prefix_lm=True (the kernel runs causal self-attention)" if self.prefix_lm
                   else layers.cudnn_serves(as_dtype(self.dtype), self.hd)
                   if self.attention_impl == "cudnn" else "")
            if why:
                raise ValueError(f"attention_impl={self.attention_impl!r} is not allowed with "
                                 f"{why}; use 'auto' (xla where the kernel does not serve) or "
                                 "'xla'")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window={self.window!r} is not allowed; use an integer >= 0 "
                             "(0: full causal attention)")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def hd(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.width

    def replace(self, **kw) -> "TransformerConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; allowed: {sorted(names)}")
        return cls(**d)


# What a rematerialised block keeps for the backward pass (jax.checkpoint_policies): 'full'
# keeps nothing (recomputes the block), 'dots' keeps every matmul's output, 'dots_no_batch' the
# matmuls without a batch dimension (the projections, not attention's scores).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """A `scan_layers` model's params as the per-layer tree (block_0 … block_{L-1}) of the same
    model without it (KV-cache decoding, Hugging Face export)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(num_layers):
        out[f"block_{i}"] = jax.tree_util.tree_map(lambda x: x[i], params["blocks"]["block"])
    return out


def stack_layers(params: dict, num_layers: int) -> dict:
    """The inverse of `unstack_layers`: per-layer blocks stacked into params["blocks"]."""
    blocks = [params[f"block_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["blocks"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def num_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


# attention_fn(q, k, v, **kwargs) → y, all [B,T,H,Dh]; kwargs: `segment_ids`, the prefix
# (`prefix_k`, `prefix_v`, `prefix_mask`) and whatever a family passes in `attention_kwargs`.
AttentionFn = Callable[..., jax.Array]


class KVCache(NamedTuple):
    """Keys and values of the tokens decoded so far, for every layer: k, v [L, B, S, Hkv, Dh]
    (S: the most tokens the cache holds; keys rotated at their positions) and `length`, an int32
    scalar: how many tokens were read (the next token goes to slot `length`).

    With sliding-window attention (cfg.window = W) a cache of S = W slots is a ring buffer: token
    p sits in slot p mod W, so the cache keeps the window's W tokens however many were read
    (`length` then counts every token read and may exceed S)."""
    k: jax.Array
    v: jax.Array
    length: jax.Array


def init_cache(cfg: TransformerConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (compute dtype)."""
    shape = (cfg.num_layers, batch, max_len, cfg.kv_heads, cfg.hd)
    return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype),
                   jnp.zeros((), jnp.int32))


class Attention(nn.Module):
    """Multi-head self-attention: x [B,T,D] → [B,T,D]; projections [D,H,Dh] (keys and values
    [D,Hkv,Dh]: grouped-query attention shares each of Hkv heads among H/Hkv query heads), biases
    if cfg.bias; `attention_fn` combines the projected heads (default: dense causal softmax
    attention)."""
    cfg: TransformerConfig
    attention_fn: AttentionFn = layers.dot_product_attention

    def setup(self):
        c = self.cfg
        param = lambda name, shape, names, init: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, names), shape, c.param_dtype)
        normal, zeros = nn.initializers.normal(c.init_std), nn.initializers.zeros
        self.w_query = param("query", (c.width, c.num_heads, c.hd), ("embed", "heads", "kv"),
                             normal)
        self.w_key = param("key", (c.width, c.kv_heads, c.hd), ("embed", "heads", "kv"), normal)
        self.w_value = param("value", (c.width, c.kv_heads, c.hd), ("embed", "heads", "kv"),
                             normal)
        self.w_out = param("out", (c.num_heads, c.hd, c.width), ("heads", "kv", "embed"), normal)
        if c.bias:
            self.b_query = param("query_bias", (c.num_heads, c.hd), ("heads", "kv"), zeros)
            self.b_key = param("key_bias", (c.kv_heads, c.hd), ("heads", "kv"), zeros)
            self.b_value = param("value_bias", (c.kv_heads, c.hd), ("heads", "kv"), zeros)
            self.b_out = param("out_bias", (c.width,), ("embed",), zeros)

    def _proj(self, x_BxTxD, w_DxHxK, b_HxK=None):
        c = self.cfg
        y = jnp.einsum("btd,dhk->bthk", x_BxTxD.astype(c.dtype), w_DxHxK.astype(c.dtype))
        return y if b_HxK is None else y + b_HxK.astype(c.dtype)

    def out(self, y_BxTxHxK):
        c = self.cfg
        y = jnp.einsum("bthk,hkd->btd", y_BxTxHxK.astype(c.dtype), self.w_out.astype(c.dtype))
        return y + self.b_out.astype(c.dtype) if c.bias else y

    def qkv(self, x_BxTxD, positions):
        """Projected heads: q [B,T,H,Dh], k and v [B,T,Hkv,Dh]; q and k rotated at `positions`
        (cfg.positions 'rope'), v not."""
        c = self.cfg
        bias = (self.b_query, self.b_key, self.b_value) if c.bias else (None,) * 3
        q, k, v = (self._proj(x_BxTxD, w, b) for w, b in
                   zip((self.w_query, self.w_key, self.w_value), bias))
        if c.positions == "learned":
            return q, k, v
        rope = lambda t: layers.apply_rope(t, positions, base=c.rope_base,  # noqa: E731
                                           interleaved=c.rope_interleaved, scaling=c.rope_scaling)
        return rope(q), rope(k), v

    def __call__(self, x_BxTxD, positions, *, segment_ids=None, prefix_k=None, prefix_v=None,
                 prefix_mask=None, attention_kwargs=None, cache=None):
        """y [B,T,D]; with `cache` = (k [B,S,Hkv,Dh], v, length): (y, (k, v)), the new keys and
        values written at slots length..length+T-1 and the queries attending to every slot up to
        their own (dense attention only)."""
        c = self.cfg
        q, k, v = self.qkv(x_BxTxD, positions)
        names = ("batch", "length", "heads", "kv")
        q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
        kwargs = dict(attention_kwargs or {})
        if cache is not None and c.window and cache[0].shape[1] == c.window:
            return self._ring(q, k, v, cache, kwargs)
        if cache is not None:
            k_all, v_all, start = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_all, k.astype(k_all.dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_all, v.astype(v_all.dtype), start, axis=1)
            cache, kwargs["q_offset"] = (k, v), start
        if segment_ids is not None:
            kwargs["segment_ids"] = segment_ids
        if prefix_k is not None:
            kwargs.update(prefix_k=prefix_k, prefix_v=prefix_v, prefix_mask=prefix_mask)
        group = c.num_heads // c.kv_heads
        y = self.attention_fn(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2),
                              **kwargs)
        y = self.out(nn.with_logical_constraint(y, names))
        return y if cache is None else (y, cache)

    def _ring(self, q, k, v, cache, kwargs):
        """Sliding-window decoding with a ring cache of W = cfg.window slots (see `KVCache`):
        the ring, put in the order of its tokens' positions (length - W .. length - 1; slots of
        positions < 0 are empty), then the T new keys; the queries attend with the window's
        mask; the last W of those keys, back in slot order, are the new ring."""
        c, (k_all, v_all, start) = self.cfg, cache
        W, T = c.window, q.shape[1]
        shift = jnp.mod(start, W)
        k_cat = jnp.concatenate([jnp.roll(k_all, -shift, axis=1), k.astype(k_all.dtype)], axis=1)
        v_cat = jnp.concatenate([jnp.roll(v_all, -shift, axis=1), v.astype(v_all.dtype)], axis=1)
        valid = (start - W + jnp.arange(W + T) >= 0)[None]
        group = c.num_heads // c.kv_heads
        y = self.attention_fn(q, jnp.repeat(k_cat, group, axis=2),
                              jnp.repeat(v_cat, group, axis=2),
                              **{**kwargs, "q_offset": W, "key_valid": valid})
        y = self.out(nn.with_logical_constraint(y, ("batch", "length", "heads", "kv")))
        back = jnp.mod(start + T, W)
        return y, (jnp.roll(k_cat[:, -W:], back, axis=1), jnp.roll(v_cat[:, -W:], back, axis=1))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm x), then x + mlp(norm x). With `cache` (see
    `Attention.__call__`): (x, the layer's new (k, v))."""
    cfg: TransformerConfig
    attention_fn: AttentionFn = layers.dot_product_attention

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, prefix_k=None, prefix_v=None,
                 prefix_mask=None, attention_kwargs=None, cache=None):
        c = self.cfg
        norm = lambda name: layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype,  # noqa: E731
                                             param_dtype=c.param_dtype, use_bias=c.bias,
                                             name=name)
        h = norm("ln_1")(x)
        attn = Attention(c, self.attention_fn, name="attn")
        y = attn(h, positions, segment_ids=segment_ids, prefix_k=prefix_k, prefix_v=prefix_v,
                 prefix_mask=prefix_mask, attention_kwargs=attention_kwargs, cache=cache)
        if cache is not None:
            y, cache = y
        x = x + y
        h = norm("ln_2")(x)
        x = x + layers.MLP(c.hidden, c.mlp, dtype=c.dtype, param_dtype=c.param_dtype,
                           init_std=c.init_std, use_bias=c.bias, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x if cache is None else (x, cache)


class Transformer(nn.Module):
    """tokens [B,T] → logits [B,T,V] (float32).

    positions [T] or [B,T] (default 0..T-1), segment_ids [B,T] for packed rows,
    prefix [B,T] bool (cfg.prefix_lm only): the prompt, attended bidirectionally (Birdie's
    prefix-LM Transformer; packed samples stay isolated by segment_ids),
    prefix_kv [L, 2, B, P, H, Dh] with prefix_mask [B, P]: per-layer prefix keys/values (not rotated),
    attention_kwargs: passed to the attention function (e.g. {"is_landmark": [B,T] bool}).
    attention_fn: every block's attention (`AttentionFn`); None: dense (`cfg.attention` 'dense', by
    `cfg.attention_impl`).
    kv_cache (`KVCache`, dense attention only): decode T new tokens after the cache's `length`
    (positions default to length..length+T-1); returns (logits, the updated cache).
    """
    cfg: TransformerConfig
    attention_fn: Optional[AttentionFn] = None

    @nn.compact
    def __call__(self, tokens_BxT, *, positions=None, segment_ids=None, prefix=None,
                 prefix_kv=None, prefix_mask=None, attention_kwargs=None,
                 return_hidden: bool = False, kv_cache: Optional[KVCache] = None):
        c = self.cfg
        if self.attention_fn is None and c.attention != "dense":
            raise ValueError(f"attention={c.attention!r} is not allowed in Transformer without an "
                             "attention_fn: use 'dense' (landmark attention: "
                             "models.landmark.LandmarkLM)")
        if prefix is not None:
            if not c.prefix_lm:
                raise ValueError("prefix is given but prefix_lm=False: a causal Transformer reads "
                                 "no prefix; set prefix_lm=True for prefix-LM attention")
            attention_kwargs = {**(attention_kwargs or {}), "prompt": prefix.astype(bool)}
        chex.assert_rank(tokens_BxT, 2)
        B, T = tokens_BxT.shape
        if kv_cache is not None and (self.attention_fn is not None or prefix is not None
                                     or segment_ids is not None or prefix_kv is not None):
            raise ValueError("kv_cache decoding takes dense causal attention without prefix, "
                             "segment_ids or prefix_kv")
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
            if kv_cache is not None:
                positions = positions + kv_cache.length
        if c.window:
            if self.attention_fn is not None:
                raise ValueError(f"window={c.window} needs dense attention (attention_fn=None)")
            attention_kwargs = {**(attention_kwargs or {}), "window": c.window}
        if prefix_kv is not None:
            chex.assert_shape(prefix_kv, (c.num_layers, 2, B, None, c.num_heads, c.hd))
            if prefix_mask is None:
                prefix_mask = jnp.ones(prefix_kv.shape[2:4], bool)
        return decoder_forward(c, tokens_BxT, positions=positions, segment_ids=segment_ids,
                               prefix_kv=prefix_kv, prefix_mask=prefix_mask,
                               attention_kwargs=attention_kwargs, return_hidden=return_hidden,
                               attention_fn=(self.attention_fn
                                             or layers.dense_attention(c.attention_impl)),
                               kv_cache=kv_cache)


def decoder_forward(c: TransformerConfig, tokens_BxT, *, positions, segment_ids=None,
                    prefix_kv=None, prefix_mask=None, attention_kwargs=None,
                    return_hidden: bool = False,
                    attention_fn: AttentionFn = layers.dot_product_attention,
                    kv_cache: Optional[KVCache] = None, layer_attention_kwargs=None):
    """Embed → blocks → final norm → logits. Call it from inside a compact `__call__`: the
    submodules (embed, block_i, ln_f, lm_head) are created in the caller's scope, so every model
    built on it (Transformer, LandmarkLM) has the same parameter tree. Every block's attention
    is `attention_fn` (see `AttentionFn`). With `kv_cache`: (logits or hidden, the new cache).
    layer_attention_kwargs: None, or one dict per layer added to block i's attention_kwargs
    (e.g. a dropout key per layer)."""
    embed = layers.Embed(c.vocab_size, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
                         init_std=c.init_std, name="embed")
    x = embed(tokens_BxT)
    if c.positions == "learned":
        x = x + layers.Embed(c.max_positions, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
                             init_std=c.init_std, name="pos_embed")(positions)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block_cls = (nn.remat(Block, policy=REMAT_POLICIES[c.remat_policy]) if c.remat else Block)
    if c.scan_layers:
        if kv_cache is not None or prefix_kv is not None or layer_attention_kwargs is not None:
            raise ValueError("scan_layers=True runs the full forward only: kv_cache, prefix_kv "
                             "and per-layer attention kwargs need scan_layers=False (convert "
                             "the parameters with transformer.unstack_layers)")
        scanned = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=c.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(c, attention_fn, block_cls, name="blocks")(
            x, positions, segment_ids, attention_kwargs)
        return _head(c, embed, x, return_hidden)
    new_k, new_v = [], []
    for i in range(c.num_layers):
        pk = pv = None
        if prefix_kv is not None:
            pk, pv = prefix_kv[i, 0], prefix_kv[i, 1]
        block = block_cls(c, attention_fn, name=f"block_{i}")
        kwargs = attention_kwargs
        if layer_attention_kwargs is not None:
            kwargs = {**(attention_kwargs or {}), **layer_attention_kwargs[i]}
        if kv_cache is None:
            x = block(x, positions, segment_ids, pk, pv, prefix_mask, kwargs)
        else:
            layer_cache = (kv_cache.k[i], kv_cache.v[i], kv_cache.length)
            x, (k, v) = block(x, positions, None, None, None, None, kwargs, layer_cache)
            new_k.append(k)
            new_v.append(v)
    if kv_cache is not None:
        cache = KVCache(jnp.stack(new_k), jnp.stack(new_v),
                        kv_cache.length + tokens_BxT.shape[1])
        return _head(c, embed, x, return_hidden), cache
    return _head(c, embed, x, return_hidden)


class _ScanBody(nn.Module):
    """One block as an nn.scan body: (x, broadcast inputs) → (x, None)."""
    cfg: TransformerConfig
    attention_fn: AttentionFn
    block_cls: Any

    @nn.compact
    def __call__(self, x, positions, segment_ids, attention_kwargs):
        block = self.block_cls(self.cfg, self.attention_fn, name="block")
        return block(x, positions, segment_ids, None, None, None, attention_kwargs), None


def _head(c: TransformerConfig, embed: layers.Embed, x, return_hidden: bool):
    """Final norm, then the hidden states or the logits."""
    x = layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                         use_bias=c.bias, name="ln_f")(x)
    return x if return_hidden else _logits(c, embed, x)


def _logits(c: TransformerConfig, embed: layers.Embed, x):
    if c.tie_embeddings:
        logits = embed.attend(x)
    else:
        logits = nn.DenseGeneral(
            c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                     ("embed", "vocab")),
            name="lm_head")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.promote_types(jnp.float32, logits.dtype))


def greedy_generate(model: Transformer, params, prompt_BxP, num_tokens: int, *,
                    with_logits: bool = False):
    """int32 [B, num_tokens]: the tokens greedy decoding appends to prompt_BxP (no early stop);
    with_logits: (tokens, the logits [B, num_tokens, V] each token was chosen from).
    The prompt is read in one pass into a `KVCache` of P + num_tokens slots, then one token per
    step attends to the cache. Call it under `jax.jit` (num_tokens static) for speed."""
    B, P = prompt_BxP.shape
    variables = {"params": params}
    cache = init_cache(model.cfg, B, P + num_tokens)
    logits, cache = model.apply(variables, prompt_BxP, kv_cache=cache)

    def body(carry, _):
        logits_BxV, cache = carry
        tok = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logits, cache = model.apply(variables, tok[:, None], kv_cache=cache)
        return (logits[:, -1], cache), (tok, logits_BxV)

    _, (tokens, step_logits) = jax.lax.scan(body, (logits[:, -1], cache), None,
                                            length=num_tokens)
    tokens = jnp.moveaxis(tokens, 0, 1)
    return (tokens, jnp.moveaxis(step_logits, 0, 1)) if with_logits else tokens
