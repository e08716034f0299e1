"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer") as pure Linen: the encoder–decoder of Hugging Face's `T5ForConditionalGeneration`,
the encoder of `T5EncoderModel`, their checkpoints' conversion, and greedy decoding with a KV cache.

What makes it T5 and not `models/transformer.py`: RMS norm without mean or bias (`layers.RMSNorm`);
attention without the 1/√Dk scale (the init folds it into the query weights) and without biases,
with inner width H·Dk free of D; a learned relative position bias (bucketed distances, §2.1) made
by the first layer of each stack and added in every layer's self-attention (bidirectional buckets
in the encoder, causal in the decoder; none in cross-attention); a ReLU or gated-GELU (tanh) FFN;
and, with tied embeddings, the decoder output scaled by D^-0.5 before the transposed embedding.

    cfg = T5Config.from_hf(json.load(open("config.json")))
    params = {...}  # from convert_hf(cfg, read), or T5(cfg).init(key, ids_BxS, dec_BxT)["params"]
    logits_BxTxV = T5(cfg).apply({"params": params}, ids_BxS, dec_BxT, attention_mask_BxS=m_BxS)
    tokens_BxN = greedy_decode(T5(cfg), params, ids_BxS, 16, attention_mask_BxS=m_BxS)

Parameter tree (T5Encoder's is the same without `decoder` and `lm_head`):
    shared/embedding [V, D]                       ("vocab", "embed")
    encoder/rel_bias [buckets, H]                 (None, "heads")
    encoder/blocks_i/{ln_1,ln_2}/scale [D]        ("embed",)
    encoder/blocks_i/attn/{query,key,value} [D, H, Dk]   ("embed", "heads", "kv");  out [H, Dk, D]
    encoder/blocks_i/mlp/{wi | wi_0, wi_1} [D, F] ("embed", "mlp");  wo [F, D] ("mlp", "embed")
    encoder/ln_f/scale [D]
    decoder/...: as the encoder, each block with ln_1/attn (self), ln_2/cross_attn, ln_3/mlp
    lm_head/kernel [D, V] ("embed", "vocab")      only when tie_word_embeddings is False
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Optional

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models.transformer import as_dtype

F32 = jnp.float32
FEED_FORWARDS = ("relu", "gated-gelu", "gated-relu")

# config.json fields (HF T5Config) → T5Config fields, with HF's defaults for the ones it omits.
_HF_FIELDS = {
    "vocab_size": ("vocab_size", 32128), "d_model": ("d_model", 512), "d_kv": ("d_kv", 64),
    "d_ff": ("d_ff", 2048), "num_heads": ("num_heads", 8), "num_layers": ("num_layers", 6),
    "num_decoder_layers": ("num_decoder_layers", None),
    "relative_attention_num_buckets": ("relative_attention_num_buckets", 32),
    "relative_attention_max_distance": ("relative_attention_max_distance", 128),
    "feed_forward_proj": ("feed_forward", "relu"),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-6),
    "tie_word_embeddings": ("tie_word_embeddings", True),
    "decoder_start_token_id": ("decoder_start_token_id", None),
    "pad_token_id": ("pad_token_id", 0), "eos_token_id": ("eos_token_id", 1),
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int                         # V
    d_model: int = 512                      # D: residual width
    d_kv: int = 64                          # Dk: width of one head (H·Dk need not equal D)
    d_ff: int = 2048                        # F: FFN hidden width
    num_heads: int = 8                      # H
    num_layers: int = 6                     # encoder blocks
    num_decoder_layers: Optional[int] = None  # decoder blocks (None: num_layers)
    relative_attention_num_buckets: int = 32   # rows of each stack's relative bias table
    relative_attention_max_distance: int = 128  # distances ≥ this share the last bucket
    feed_forward: str = "relu"              # 'relu' | 'gated-gelu' (tanh GELU) | 'gated-relu'
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True        # head = shared embedding (after × D^-0.5)
    decoder_start_token_id: int = 0         # the decoder's first input (T5: the pad token)
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1                   # int, tuple of ints or None (greedy_decode never stops)
    dtype: Any = jnp.float32                # compute dtype
    param_dtype: Any = jnp.float32          # parameter dtype

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                     "num_decoder_layers", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if nb < 4:
            raise ValueError(f"relative_attention_num_buckets={nb} must be >= 4 (the encoder's "
                             "half has an exact and a log range)")
        if md <= nb // 2:
            raise ValueError(f"relative_attention_max_distance={md} must be > "
                             f"relative_attention_num_buckets // 2 = {nb // 2}")
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"feed_forward={self.feed_forward!r} is not allowed; use one of "
                             f"{FEED_FORWARDS}")
        if isinstance(self.layer_norm_epsilon, bool) or not (
                isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be a number > 0")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings={self.tie_word_embeddings!r} must be a bool")
        if not _is_int(self.decoder_start_token_id) or not (
                0 <= self.decoder_start_token_id < self.vocab_size):
            raise ValueError(f"decoder_start_token_id={self.decoder_start_token_id!r} must be a "
                             f"token id in [0, vocab_size={self.vocab_size})")
        if isinstance(self.eos_token_id, list):    # a config is hashed (jit's static argument)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not (v is None or _is_int(v) or (isinstance(v, tuple) and all(map(_is_int, v)))):
                raise ValueError(f"{name}={v!r} must be an integer, a tuple of them or None")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def inner(self) -> int:
        """H·Dk: the width of the concatenated heads."""
        return self.num_heads * self.d_kv

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict, *, encoder_only: bool = False, dtype=jnp.float32,
                param_dtype=jnp.float32) -> "T5Config":
        """A parsed HF config.json → T5Config (HF's defaults for omitted fields).

        Refuses what this module does not implement: a model_type other than 't5', a
        feed_forward_proj other than relu / gated-gelu / gated-relu, pruned heads, tied encoder and
        decoder, and (unless `encoder_only`, a T5EncoderModel's config) is_encoder_decoder False.
        Training-only fields (dropout_rate, initializer_factor, use_cache, ...) are ignored.
        """
        if hf.get("model_type") != "t5":
            raise ValueError(f"model_type={hf.get('model_type')!r} is not allowed; use 't5'")
        if not encoder_only and hf.get("is_encoder_decoder", True) is not True:
            raise ValueError(f"is_encoder_decoder={hf.get('is_encoder_decoder')!r} is not allowed "
                             "for the encoder-decoder T5; use True (or encoder_only=True)")
        if hf.get("tie_encoder_decoder", False):
            raise ValueError(f"tie_encoder_decoder={hf['tie_encoder_decoder']!r} is not allowed; "
                             "use False")
        if hf.get("pruned_heads"):
            raise ValueError(f"pruned_heads={hf['pruned_heads']!r} is not allowed; use {{}}")
        ff = hf.get("feed_forward_proj", "relu")
        if ff not in FEED_FORWARDS:
            raise ValueError(f"feed_forward_proj={ff!r} is not allowed; use one of {FEED_FORWARDS}")
        kw = {ours: hf[theirs] if hf.get(theirs) is not None else default
              for theirs, (ours, default) in _HF_FIELDS.items()}
        if kw["decoder_start_token_id"] is None:     # T5 starts decoding from the pad token
            kw["decoder_start_token_id"] = kw["pad_token_id"] or 0
        return cls(**kw, dtype=dtype, param_dtype=param_dtype)


# ---------------------------------------------------------------------------------------------
# Relative position bias and attention
# ---------------------------------------------------------------------------------------------
def relative_position_bucket(rel, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """rel = key position − query position (int) → bucket in [0, num_buckets), as Mesh TF / HF.

    Bidirectional: half the buckets for keys after the query. Distances below half of a half are
    exact; larger ones share log-spaced buckets up to max_distance (float32 log, truncated, as HF).
    """
    rel = jnp.asarray(rel, jnp.int32)
    out = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # max(rel, max_exact): the log is only used where rel ≥ max_exact (no log(0) elsewhere).
    scaled = (jnp.log(jnp.maximum(rel, max_exact).astype(F32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return out + jnp.where(rel < max_exact, rel, large)


def attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS, bias_1xHxTxS=None) -> jax.Array:
    """softmax(q·kᵀ + bias) v per head, unscaled (T5); scores and softmax in float32.

    mask [B, T|1, S] bool (True = visible). Masked scores become the lowest float, as HF's additive
    mask leaves them, so a row with no visible key averages every value, as HF's does.
    """
    acc = jnp.promote_types(F32, q_BxTxHxK.dtype)
    s = jnp.einsum("bqhd,bkhd->bhqk", q_BxTxHxK, k_BxSxHxK, preferred_element_type=acc)
    if bias_1xHxTxS is not None:
        s = s + bias_1xHxTxS.astype(acc)
    s = jnp.where(mask_BxTxS[:, None], s, jnp.finfo(acc).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v_BxSxHxK.dtype), v_BxSxHxK)


def _param(module: nn.Module, name: str, shape, names, std: float):
    init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
    return module.param(name, init, shape, module.cfg.param_dtype)


class Attention(nn.Module):
    """Projections of T5's attention (HF T5Attention's q, k, v, o), no biases.

    Init as Mesh TF / HF: q ~ N(0, 1/(D·Dk)) (the missing 1/√Dk), k and v ~ N(0, 1/D),
    o ~ N(0, 1/(H·Dk)).
    """
    cfg: T5Config

    def setup(self):
        c = self.cfg
        D, H, K = c.d_model, c.num_heads, c.d_kv
        self.w_query = _param(self, "query", (D, H, K), ("embed", "heads", "kv"), (D * K) ** -0.5)
        self.w_key = _param(self, "key", (D, H, K), ("embed", "heads", "kv"), D ** -0.5)
        self.w_value = _param(self, "value", (D, H, K), ("embed", "heads", "kv"), D ** -0.5)
        self.w_out = _param(self, "out", (H, K, D), ("heads", "kv", "embed"), (H * K) ** -0.5)

    def _heads(self, x_BxTxD, w_DxHxK):
        dt = self.cfg.dtype
        y = jnp.einsum("btd,dhk->bthk", x_BxTxD.astype(dt), w_DxHxK.astype(dt))
        return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    def query(self, x_BxTxD):
        return self._heads(x_BxTxD, self.w_query)

    def key_value(self, x_BxSxD):
        return self._heads(x_BxSxD, self.w_key), self._heads(x_BxSxD, self.w_value)

    def out(self, y_BxTxHxK):
        dt = self.cfg.dtype
        return jnp.einsum("bthk,hkd->btd", y_BxTxHxK.astype(dt), self.w_out.astype(dt))

    def __call__(self, x_BxTxD, kv_BxSxD, mask_BxTxS, bias_1xHxTxS=None):
        k, v = self.key_value(kv_BxSxD)
        return self.out(attend(self.query(x_BxTxD), k, v, mask_BxTxS, bias_1xHxTxS))


class MLP(nn.Module):
    """HF T5DenseActDense wo(relu(wi x)), or T5DenseGatedActDense wo(act(wi_0 x) ⊙ wi_1 x)."""
    cfg: T5Config

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        D, F, dt = c.d_model, c.d_ff, c.dtype
        w_in = lambda name: _param(self, name, (D, F), ("embed", "mlp"), D ** -0.5)  # noqa: E731
        proj = lambda w: jnp.einsum("btd,df->btf", x_BxTxD.astype(dt), w.astype(dt))  # noqa: E731
        if c.feed_forward == "relu":
            h = jax.nn.relu(proj(w_in("wi")))
        else:
            act = (functools.partial(jax.nn.gelu, approximate=True)   # HF gelu_new
                   if c.feed_forward == "gated-gelu" else jax.nn.relu)
            h = act(proj(w_in("wi_0"))) * proj(w_in("wi_1"))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        w_out = _param(self, "wo", (F, D), ("mlp", "embed"), F ** -0.5)
        return jnp.einsum("btf,fd->btd", h, w_out.astype(dt))


def _norm(c: T5Config) -> nn.Module:
    # T5LayerNorm = x·rsqrt(mean(x²) + eps)·w with statistics in float32: layers.RMSNorm.
    return layers.RMSNorm(eps=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)


def _residual(x_BxTxD):
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class EncoderBlock(nn.Module):
    """x + attn(ln_1 x) (with the stack's bias), then x + mlp(ln_2 x)."""
    cfg: T5Config

    def setup(self):
        self.ln_1, self.attn = _norm(self.cfg), Attention(self.cfg)
        self.ln_2, self.mlp = _norm(self.cfg), MLP(self.cfg)

    def __call__(self, x_BxSxD, mask_Bx1xS, bias_1xHxSxS):
        h = self.ln_1(x_BxSxD)
        x = x_BxSxD + self.attn(h, h, mask_Bx1xS, bias_1xHxSxS)
        return _residual(x + self.mlp(self.ln_2(x)))


class DecoderBlock(nn.Module):
    """Causal self-attention (ln_1, attn), cross-attention to the encoder (ln_2, cross_attn), FFN
    (ln_3, mlp); each pre-norm and residual. `step` runs one new token against a KV cache."""
    cfg: T5Config

    def setup(self):
        c = self.cfg
        self.ln_1, self.attn = _norm(c), Attention(c)
        self.ln_2, self.cross_attn = _norm(c), Attention(c)
        self.ln_3, self.mlp = _norm(c), MLP(c)

    def _cross_and_mlp(self, x, cross_k, cross_v, cross_mask):
        y = attend(self.cross_attn.query(self.ln_2(x)), cross_k, cross_v, cross_mask)
        x = x + self.cross_attn.out(y)
        return _residual(x + self.mlp(self.ln_3(x)))

    def __call__(self, x_BxTxD, encoded_BxSxD, self_mask_BxTxT, cross_mask_Bx1xS, bias_1xHxTxT):
        h = self.ln_1(x_BxTxD)
        x = x_BxTxD + self.attn(h, h, self_mask_BxTxT, bias_1xHxTxT)
        k, v = self.cross_attn.key_value(encoded_BxSxD)
        return self._cross_and_mlp(x, k, v, cross_mask_Bx1xS)

    def cross_key_value(self, encoded_BxSxD):
        return self.cross_attn.key_value(encoded_BxSxD)

    def step(self, x_Bx1xD, layer: int, cache: "DecodeCache", bias_1xHx1xL):
        """One token at position cache.index through block `layer`: its key/value written into
        the cache there, its query attending to positions ≤ index. Returns (x, self_k, self_v),
        the caches [Ld, B, L, H, Dk] updated in place."""
        h = self.ln_1(x_Bx1xD)
        at = (layer, 0, cache.index, 0, 0)
        self_k, self_v = (
            jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), at)
            for c, new in zip((cache.self_k, cache.self_v), self.attn.key_value(h)))
        L = self_k.shape[2]
        mask = jnp.broadcast_to(jnp.arange(L) <= cache.index, (x_Bx1xD.shape[0], 1, L))
        y = attend(self.attn.query(h), self_k[layer], self_v[layer], mask, bias_1xHx1xL)
        x = x_Bx1xD + self.attn.out(y)
        x = self._cross_and_mlp(x, cache.cross_k[layer], cache.cross_v[layer], cache.cross_mask)
        return x, self_k, self_v


class Stack(nn.Module):
    """HF T5Stack without the embedding: blocks → final norm. The relative bias table lives here
    (HF: block 0's `relative_attention_bias`); every block adds the bias it gives."""
    cfg: T5Config
    decoder: bool

    def setup(self):
        c = self.cfg
        self.rel_bias = _param(self, "rel_bias", (c.relative_attention_num_buckets, c.num_heads),
                               (None, "heads"), c.d_model ** -0.5)
        n, block = ((c.num_decoder_layers, DecoderBlock) if self.decoder
                    else (c.num_layers, EncoderBlock))
        self.blocks = [block(c) for _ in range(n)]
        self.ln_f = _norm(c)

    def position_bias(self, q_pos_T, k_pos_S):
        """[1, H, T, S] float32: the table's row for each (query, key) distance bucket."""
        c = self.cfg
        bucket = relative_position_bucket(
            k_pos_S[None, :] - q_pos_T[:, None], bidirectional=not self.decoder,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance)
        table = self.rel_bias.astype(jnp.promote_types(F32, self.rel_bias.dtype))
        return jnp.transpose(jnp.take(table, bucket, axis=0), (2, 0, 1))[None]

    def __call__(self, x_BxTxD, mask_BxTxT, encoded_BxSxD=None, cross_mask_Bx1xS=None):
        """Embedded tokens [B, T, D] → [B, T, D]. mask [B, 1 or T, T] (True = visible); the
        decoder also takes the encoder output and its key mask [B, 1, S]."""
        T = x_BxTxD.shape[1]
        pos = jnp.arange(T, dtype=jnp.int32)
        bias = self.position_bias(pos, pos)
        x = _residual(x_BxTxD)
        for blk in self.blocks:
            x = (blk(x, encoded_BxSxD, mask_BxTxT, cross_mask_Bx1xS, bias) if self.decoder
                 else blk(x, mask_BxTxT, bias))
        return self.ln_f(x)

    def cross_key_value(self, encoded_BxSxD):
        """Every decoder block's (k, v) of the encoder output, stacked: [Ld, B, S, H, Dk]."""
        kv = [blk.cross_key_value(encoded_BxSxD) for blk in self.blocks]
        return jnp.stack([k for k, _ in kv]), jnp.stack([v for _, v in kv])

    def step(self, x_Bx1xD, cache: "DecodeCache"):
        """The decoder on one token at position cache.index: (x [B, 1, D], cache advanced)."""
        L = cache.self_k.shape[2]
        # Row `index` of the full-sequence bias: query position index, keys 0..L-1.
        bias = self.position_bias(cache.index[None], jnp.arange(L, dtype=jnp.int32))
        x = x_Bx1xD
        for i, blk in enumerate(self.blocks):
            x, self_k, self_v = blk.step(x, i, cache, bias)
            cache = cache.replace(self_k=self_k, self_v=self_v)
        return self.ln_f(x), cache.replace(index=cache.index + 1)


@flax.struct.dataclass
class DecodeCache:
    """The decoder's state between tokens (a pytree: into and out of jit, no Linen collections).

    self_k, self_v [Ld, B, L, H, Dk]: self-attention keys/values of positions < index (L slots).
    cross_k, cross_v [Ld, B, S, H, Dk]: every decoder block's keys/values of the encoder output.
    cross_mask [B, 1, S] bool: the encoder positions visible to cross-attention.
    index int32 []: the position of the next token fed to `T5.decode_step`.
    """
    self_k: jax.Array
    self_v: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    cross_mask: jax.Array
    index: jax.Array


def _key_mask(mask_BxS, shape) -> jax.Array:
    """[B, 1, S] bool from an HF attention mask [B, S] (1 = visible) or None (all visible)."""
    if mask_BxS is None:
        return jnp.ones((shape[0], 1, shape[1]), bool)
    chex.assert_shape(mask_BxS, tuple(shape))
    return (jnp.asarray(mask_BxS) != 0)[:, None, :]


class _Embedded(nn.Module):
    """The shared embedding and the encoder: the part T5 and T5Encoder have in common."""
    cfg: T5Config

    def _setup_encoder(self):
        c = self.cfg
        # HF (Mesh TF) init: N(0, 1); the tied head's D^-0.5 keeps its logits O(1).
        self.shared = layers.Embed(c.vocab_size, c.d_model, dtype=c.dtype,
                                   param_dtype=c.param_dtype, init_std=1.0)
        self.encoder = Stack(c, decoder=False)

    def _encode(self, input_ids_BxS, attention_mask_BxS=None):
        chex.assert_rank(input_ids_BxS, 2)
        x = self.shared(input_ids_BxS)
        return self.encoder(x, _key_mask(attention_mask_BxS, input_ids_BxS.shape))


class T5Encoder(_Embedded):
    """HF T5EncoderModel: tokens [B, S] (mask [B, S], 1 = visible) → hidden [B, S, D]."""

    def setup(self):
        self._setup_encoder()

    def __call__(self, input_ids_BxS, attention_mask_BxS=None):
        return self._encode(input_ids_BxS, attention_mask_BxS)


class T5(_Embedded):
    """HF T5ForConditionalGeneration: (tokens [B, S], decoder tokens [B, T]) → logits [B, T, V]
    float32. Masks are HF's: [B, S] / [B, T], 1 (or True) = visible; None = all visible."""

    def setup(self):
        c = self.cfg
        self._setup_encoder()
        self.decoder = Stack(c, decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = nn.DenseGeneral(
                c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                         ("embed", "vocab")))

    def __call__(self, input_ids_BxS, decoder_input_ids_BxT, *, attention_mask_BxS=None,
                 decoder_attention_mask_BxT=None):
        encoded = self.encode(input_ids_BxS, attention_mask_BxS)
        return self.decode(encoded, decoder_input_ids_BxT, attention_mask_BxS=attention_mask_BxS,
                           decoder_attention_mask_BxT=decoder_attention_mask_BxT)

    def encode(self, input_ids_BxS, attention_mask_BxS=None):
        """tokens [B, S] → encoder output [B, S, D] (after its final norm)."""
        return self._encode(input_ids_BxS, attention_mask_BxS)

    def decode(self, encoded_BxSxD, decoder_input_ids_BxT, *, attention_mask_BxS=None,
               decoder_attention_mask_BxT=None):
        """Encoder output [B, S, D] and decoder tokens [B, T] → logits [B, T, V] float32.
        attention_mask_BxS: the encoder's (cross-attention); decoder_attention_mask_BxT: keys of
        the causal self-attention (HF's decoder_attention_mask)."""
        chex.assert_rank([encoded_BxSxD, decoder_input_ids_BxT], [3, 2])
        B, S, _ = encoded_BxSxD.shape
        T = decoder_input_ids_BxT.shape[1]
        cross = _key_mask(attention_mask_BxS, (B, S))
        causal = layers.causal_mask(T, T)[None]
        self_mask = causal & _key_mask(decoder_attention_mask_BxT, (B, T))
        x = self.shared(decoder_input_ids_BxT)
        x = self.decoder(x, self_mask, encoded_BxSxD.astype(self.cfg.dtype), cross)
        return self._logits(x)

    def _logits(self, x_BxTxD):
        c = self.cfg
        if c.tie_word_embeddings:
            logits = self.shared.attend(x_BxTxD * (c.d_model ** -0.5))
        else:
            logits = self.lm_head(x_BxTxD)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.promote_types(F32, logits.dtype))

    def init_cache(self, encoded_BxSxD, max_length: int, *, attention_mask_BxS=None) -> DecodeCache:
        """An empty cache for up to `max_length` decoder tokens, the cross-attention keys/values
        of `encoded_BxSxD` precomputed."""
        c = self.cfg
        B, S, _ = encoded_BxSxD.shape
        cross_k, cross_v = self.decoder.cross_key_value(encoded_BxSxD.astype(c.dtype))
        shape = (c.num_decoder_layers, B, max_length, c.num_heads, c.d_kv)
        return DecodeCache(
            self_k=jnp.zeros(shape, cross_k.dtype), self_v=jnp.zeros(shape, cross_v.dtype),
            cross_k=cross_k, cross_v=cross_v,
            cross_mask=_key_mask(attention_mask_BxS, (B, S)),
            index=jnp.zeros((), jnp.int32))

    def decode_step(self, cache: DecodeCache, token_B):
        """Feeds token [B] at position cache.index: (logits [B, V] float32 for the next token,
        the cache with index + 1). Its logits equal `decode`'s row `index` on the same tokens;
        feeding more than max_length tokens is not checked (under jit it cannot be)."""
        chex.assert_rank(token_B, 1)
        x, cache = self.decoder.step(self.shared(token_B[:, None]), cache)
        return self._logits(x)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model", "num_tokens"))
def _greedy(model: T5, params, input_ids_BxS, attention_mask_BxS, num_tokens: int):
    variables = {"params": params}
    encoded = model.apply(variables, input_ids_BxS, attention_mask_BxS, method=T5.encode)
    cache = model.apply(variables, encoded, num_tokens, attention_mask_BxS=attention_mask_BxS,
                        method=T5.init_cache)
    start = jnp.full((input_ids_BxS.shape[0],), model.cfg.decoder_start_token_id, jnp.int32)

    def body(carry, _):
        cache, token = carry
        logits, cache = model.apply(variables, cache, token, method=T5.decode_step)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, nxt), nxt

    _, out = jax.lax.scan(body, (cache, start), None, length=num_tokens)
    return jnp.moveaxis(out, 0, 1)


def greedy_decode(model: T5, params, input_ids_BxS, num_tokens: int, *,
                  attention_mask_BxS=None) -> jax.Array:
    """Greedy generation: int32 [B, num_tokens], the tokens after cfg.decoder_start_token_id
    (no early stop at EOS). Encodes once, then one jitted scan of `T5.decode_step`."""
    if not _is_int(num_tokens) or num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens!r} must be a positive integer")
    return _greedy(model, params, input_ids_BxS, attention_mask_BxS, int(num_tokens))


# ---------------------------------------------------------------------------------------------
# Hugging Face state dict → params
# ---------------------------------------------------------------------------------------------
# What `convert_hf(..., encoder_only=True)` leaves unread in a full checkpoint (HF's
# T5EncoderModel ignores these too: its _keys_to_ignore_on_load_unexpected).
ENCODER_ONLY_UNUSED = ("decoder.", "lm_head.")


def convert_hf(cfg: T5Config, read: Callable[[str], np.ndarray], *, encoder_only: bool = False
               ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields (param path in the Flax tree, numpy array in the Flax layout and cfg.param_dtype)
    for every parameter of T5(cfg) (or T5Encoder(cfg)), reading HF tensors by their state-dict names
    with `read(name)`, each name at most once. With encoder_only, a full checkpoint's names that
    start with ENCODER_ONLY_UNUSED are not read.

    `read` raises KeyError or ValueError (models.pretrained's reader) for a name the checkpoint
    lacks: the optional names are read only when present — the tied copies
    `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` and (tied head)
    `lm_head.weight`, which must equal `shared.weight`, and old checkpoints' unused
    `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`. A wrong shape raises
    ValueError naming the tensor. torch Linear weights are [out, in]; ours [in, ...] (heads split
    as (H, Dk), HF's view order).
    """
    D, H, K, F, V = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
    dtype = np.dtype(cfg.param_dtype)

    def checked(name, a, shape):
        a = np.asarray(a)
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}; the config (d_model={D}, num_heads={H}, "
                             f"d_kv={K}, d_ff={F}, vocab_size={V}) expects {shape}")
        return a

    def get(name, shape):
        return checked(name, read(name), shape)

    def optional(name, shape):
        try:
            a = read(name)
        except (KeyError, ValueError):
            return None
        return checked(name, a, shape)

    def out(path, a):
        return tuple(path), np.ascontiguousarray(a, dtype=dtype)

    copies = ["shared.weight", "encoder.embed_tokens.weight"]
    if not encoder_only:
        copies.append("decoder.embed_tokens.weight")
    found = {n: a for n in copies if (a := optional(n, (V, D))) is not None}
    if not found:
        raise ValueError(f"the checkpoint has none of {copies} (the shared embedding)")
    shared = next(iter(found.values()))
    for n, a in found.items():
        if not np.array_equal(a, shared):
            raise ValueError(f"{n} differs from {next(iter(found))}: tied copies must be equal")
    yield out(("shared", "embedding"), shared)

    stacks = [("encoder", False, cfg.num_layers)]
    if not encoder_only:
        stacks.append(("decoder", True, cfg.num_decoder_layers))
    ff_in = ("wi",) if cfg.feed_forward == "relu" else ("wi_0", "wi_1")
    for stack, is_dec, n in stacks:
        yield out((stack, "rel_bias"), get(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relative_attention_num_buckets, H)))
        for i in range(n):
            pre, here = f"{stack}.block.{i}.layer", (stack, f"blocks_{i}")
            sublayers = [("SelfAttention", "attn")] + ([("EncDecAttention", "cross_attn")]
                                                        if is_dec else [])
            for j, (theirs, ours) in enumerate(sublayers):
                yield out(here + (f"ln_{j + 1}", "scale"),
                          get(f"{pre}.{j}.layer_norm.weight", (D,)))
                for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
                    w = get(f"{pre}.{j}.{theirs}.{p}.weight", (H * K, D))
                    yield out(here + (ours, name), w.T.reshape(D, H, K))
                w = get(f"{pre}.{j}.{theirs}.o.weight", (D, H * K))
                yield out(here + (ours, "out"), w.T.reshape(H, K, D))
            j = len(sublayers)
            yield out(here + (f"ln_{j + 1}", "scale"), get(f"{pre}.{j}.layer_norm.weight", (D,)))
            for name in ff_in:
                yield out(here + ("mlp", name), get(f"{pre}.{j}.DenseReluDense.{name}.weight",
                                                    (F, D)).T)
            yield out(here + ("mlp", "wo"), get(f"{pre}.{j}.DenseReluDense.wo.weight", (D, F)).T)
        yield out((stack, "ln_f", "scale"), get(f"{stack}.final_layer_norm.weight", (D,)))
    if encoder_only:
        return
    # Old checkpoints carry a cross-attention bias HF never uses (its
    # _keys_to_ignore_on_load_unexpected): read, so the caller sees it used, and dropped.
    optional("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
             (cfg.relative_attention_num_buckets, H))
    if cfg.tie_word_embeddings:
        head = optional("lm_head.weight", (V, D))
        if head is not None and not np.array_equal(head, shared):
            raise ValueError("lm_head.weight differs from shared.weight but tie_word_embeddings "
                             "is True: tied copies must be equal")
    else:
        yield out(("lm_head", "kernel"), get("lm_head.weight", (V, D)).T)
