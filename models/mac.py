"""Memory of Amortized Contexts (Tack et al. 2024, "Online Adaptation of Language Models with a
Memory of Amortized Contexts"), with CMT-style top-k selection (Li et al. 2024).

Three networks modulate a frozen decoder-only LM (`models/transformer.py`):

- amortization network g: document tokens [B, S] → modulation φ [B, T, D] (paper §3.1, eq. 2):
  an encoder over the tokens, T learnable query tokens cross-attending to it (an encoder–decoder,
  as MAC's T5), then a per-slot MLP  φ_t = x_t + W2_t tanh(W1_t LN(x_t)). The encoder is either
  a small RoPE encoder trained from scratch or, with `doc_encoder` / `question_encoder` set, a
  T5 encoder (`models/t5.py`, weights from a checkpoint: train/objectives/mac.py
  `params_from_hf`) over T5's own vocabulary; the T queries then work at that T5's width.
  Padding is masked in the cross-attention (the official code forgets to).
- aggregation network h: question tokens → z0 [B, T, D] by its own encoder–decoder, then
  `agg_blocks` pre-LN blocks  z ← z + MHA(LN z, LN C);  z ← z + FFN(LN z)  over the bank flattened
  to C [N·T, D]. No positions and no order-dependent mask, so the output is invariant to the order
  of documents and of slots (a validity mask only drops empty bank slots). Hierarchical
  aggregation (§3.3) chunks the bank's *entries* into groups of W documents, aggregates each group
  with the question, feeds the results back as a smaller bank and repeats, then does one flat pass.
  Optional CMT-style top-k keeps only the k documents most cosine-similar to the question.
- prefix network: each of the T aggregated slots is expanded to 2·L·P rows (slot i repeated
  ⌊2LP/T⌋ times, the first 2LP mod T slots once more), a per-row pre-LN residual FFN, and a reshape
  into per-layer prefix keys/values [L, 2, B, P, H, Dh] (P-tuning v2). The question/answer tokens
  then sit at positions P, P+1, … of the frozen LM.

    cfg = MACConfig(lm=TransformerConfig(vocab_size=320, width=32, num_layers=2, num_heads=4))
    mac = MAC(cfg)
    params = mac.init(key, docs_BxS, questions_BxQ)["params"]
    phi_BxTxD = mac.apply({"params": params}, docs_BxS, method=MAC.amortize)
    z_BxTxD = mac.apply({"params": params}, questions_BxQ, phi_NxTxD, method=MAC.aggregate)
    prefix_kv = mac.apply({"params": params}, z_BxTxD, method=MAC.prefix)
    logits = modulated_logits(cfg, lm_params, tokens_BxT, prefix_kv)

Padding: `pad_id` marks padding in g's and h's inputs (documents and questions), the padding id
of the tokenizer that made them (the byte tokenizer's PAD, or T5's <pad> = 0); the trainer config
sets it from the data's tokenizer. The LM's own inputs need no pad id here: they are causal, and
their loss weights and decoding lengths say which positions are real.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.t5 import T5Config, T5Encoder
from models.transformer import Transformer, TransformerConfig, as_dtype


@dataclasses.dataclass(frozen=True)
class MACConfig:
    lm: TransformerConfig                 # the frozen base LM (width D, L layers, H heads of Dh)
    num_tokens: int = 4                   # T: modulation slots per document (paper: 12–24)
    prefix_len: int = 2                   # P: prefix tokens per LM layer (P-tuning v2)
    enc_width: int = 32                   # width of g's and h's encoder–decoders
    enc_layers: int = 2                   # encoder blocks (bidirectional, RoPE)
    dec_layers: int = 1                   # decoder blocks (self-attn over T queries, cross-attn)
    enc_heads: int = 4                    # heads of the encoder–decoders
    agg_blocks: int = 4                   # aggregation blocks of h (paper: 4)
    agg_heads: int = 4                    # heads of h's cross-attention over the bank
    mlp_ratio: int = 4                    # FFN hidden = mlp_ratio · width
    prefix_hidden: int = 32               # hidden width of the per-row prefix FFN
    init_scale: float = 1.0               # weights ~ N(0, init_scale/fan_in); embeddings N(0, 1)
    prefix_gain_init: float = 1.0         # initial per-row gain of the prefix rows (0: no-op start)
    window: Optional[int] = None          # W: hierarchical chunk (documents); None = flat
    topk: Optional[int] = None            # CMT top-k documents before aggregating; None = all
    pad_id: int = 256                     # padding id of documents and questions (their
                                          # tokenizer's: byte PAD 256, T5 <pad> 0)
    doc_encoder: Optional[T5Config] = None       # g's encoder: a T5 encoder (None: RoPE, enc_*)
    question_encoder: Optional[T5Config] = None  # h's question encoder: a T5 encoder (None: RoPE)
    dtype: Any = jnp.float32              # compute dtype
    param_dtype: Any = jnp.float32        # parameters stay float32

    def __post_init__(self):
        if not isinstance(self.lm, TransformerConfig):
            raise ValueError(f"lm={self.lm!r} is not allowed; it must be a TransformerConfig")
        for name in ("num_tokens", "prefix_len", "enc_width", "enc_layers", "enc_heads",
                     "agg_blocks", "agg_heads", "mlp_ratio", "prefix_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is not allowed; it must be a positive integer")
        if self.dec_layers < 0 or not isinstance(self.dec_layers, int):
            raise ValueError(f"dec_layers={self.dec_layers!r} must be a non-negative integer")
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale > 0:
            raise ValueError(f"init_scale={self.init_scale!r} is not allowed; it must be > 0")
        if (isinstance(self.prefix_gain_init, bool)
                or not isinstance(self.prefix_gain_init, (int, float))
                or not self.prefix_gain_init >= 0):
            raise ValueError(f"prefix_gain_init={self.prefix_gain_init!r} is not allowed; it "
                             "must be a number >= 0")
        for name in ("window", "topk"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} is not allowed; use None or a positive integer")
        if self.window is not None and self.window < 2:
            raise ValueError(f"window={self.window} is not allowed; hierarchical aggregation "
                             "needs chunks of at least 2 documents (or None for flat)")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"pad_id={self.pad_id!r} is not allowed; use the tokenizer's padding "
                             "id (an integer >= 0)")
        for name in ("doc_encoder", "question_encoder"):
            t5 = getattr(self, name)
            if t5 is not None and not isinstance(t5, T5Config):
                raise ValueError(f"{name}={t5!r} is not allowed; use None or a T5Config")
            if t5 is not None and t5.d_model % self.enc_heads:
                raise ValueError(f"{name}.d_model={t5.d_model} must be divisible by "
                                 f"enc_heads={self.enc_heads}")
        if self.enc_width % self.enc_heads:
            raise ValueError(f"enc_width={self.enc_width} must be divisible by "
                             f"enc_heads={self.enc_heads}")
        if (self.enc_width // self.enc_heads) % 2:
            raise ValueError(f"enc_width/enc_heads={self.enc_width // self.enc_heads} must be even "
                             "(RoPE rotates pairs)")
        if self.lm.width % self.agg_heads:
            raise ValueError(f"lm.width={self.lm.width} must be divisible by "
                             f"agg_heads={self.agg_heads}")
        if self.lm.num_heads * self.lm.hd != self.lm.width:
            raise ValueError(f"lm.num_heads·lm.head_dim={self.lm.num_heads * self.lm.hd} must "
                             f"equal lm.width={self.lm.width}: prefix rows are reshaped to heads")
        if self.prefix_rows < self.num_tokens:
            raise ValueError(f"num_tokens={self.num_tokens} is not allowed: it must be at most "
                             f"2·L·P={self.prefix_rows} so that every slot reaches a prefix row")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def width(self) -> int:
        return self.lm.width

    @property
    def prefix_rows(self) -> int:
        """2·L·P: one row per (layer, key|value, prefix position)."""
        return 2 * self.lm.num_layers * self.prefix_len

    def replace(self, **kw) -> "MACConfig":
        return dataclasses.replace(self, **kw)


def fan_in_init(scale: float = 1.0, batch_axis=()):
    """N(0, scale/fan_in) (fan_in = the second-to-last axis; per-slot weights batch axis 0).

    MAC's networks are deep chains (document encoder → queries → φ → aggregation → prefix rows
    → the LM's attention); with the LM's fixed N(0, 0.02²) init the document's signal shrinks
    by ~0.16 at every residual stage and the prefix barely depends on it at the start, so
    stage 2 sat at the answer prior. Fan-in scaling keeps every stage O(1).
    """
    return nn.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=-2, out_axis=-1,
                                            batch_axis=batch_axis)


class _Dense(nn.Module):
    """`nn.DenseGeneral` (the same parameters, values and contraction) whose kernel is created in
    its full shape, so that its logical axis names also apply to multi-axis kernels under a mesh
    (DenseGeneral initialises a flattened kernel, which a mesh's sharding constraint rejects).
    The kernel's fan-in is the product of the contracted input axes."""
    features: Any                 # int or tuple of output axis sizes
    names: tuple                  # logical names of the kernel's axes (inputs, then outputs)
    axis: Any = -1                # contracted input axis or axes
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        n_in = len(axes)
        shape = tuple(x.shape[a] for a in axes) + feats
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "normal",
                                                in_axis=tuple(range(n_in)),
                                                out_axis=tuple(range(n_in, len(shape))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), shape,
                            self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.names[-len(feats):]), feats, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, ((axes, tuple(range(n_in))), ((), ())))
        return y if bias is None else y + bias


def _dense(features, names, *, dtype, param_dtype, name, axis=-1, use_bias=True,
           init_scale=1.0) -> _Dense:
    return _Dense(features, names, axis=axis, use_bias=use_bias, init_scale=init_scale,
                  dtype=dtype, param_dtype=param_dtype, name=name)


class MHA(nn.Module):
    """Multi-head attention x_q [B, Tq, Dq] over x_kv [B|1, S, Dk] → [B, Tq, out]; RoPE optional."""
    num_heads: int
    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_q, x_kv, key_mask=None, *, q_positions=None, k_positions=None):
        width = x_q.shape[-1]
        hd = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                  init_scale=self.init_scale)
        names = ("embed", "heads", "kv")
        q = _dense((self.num_heads, hd), names, name="query", **kw)(x_q)
        k = _dense((self.num_heads, hd), names, name="key", **kw)(x_kv)
        v = _dense((self.num_heads, hd), names, name="value", **kw)(x_kv)
        if q_positions is not None:
            q = layers.apply_rope(q, q_positions)
            k = layers.apply_rope(k, k_positions)
        y = layers.masked_attention(q, k, v, key_mask)
        return _dense(self.out_features, ("heads", "kv", "embed"), name="out", axis=(-2, -1),
                      **kw)(y)


def _ln(name, dtype, param_dtype):
    return layers.LayerNorm(eps=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


def _ffn(hidden, dtype, param_dtype, name, init_scale=1.0):
    """x → W2 gelu(W1 x), no biases: the LM's layers.MLP with MAC's fan-in init."""
    return layers.MLP(hidden, kind="gelu", dtype=dtype, param_dtype=param_dtype,
                      kernel_init=fan_in_init(init_scale), name=name)


class EncoderDecoder(nn.Module):
    """tokens [B, S] (pad = cfg.pad_id) → [B, T, D]: encoder, then T queries cross-attending.

    The encoder is bidirectional with a padding mask: `t5` (a T5 encoder, MAC's initialisation,
    parameters under "t5" as `models.t5.T5Encoder`'s) or, when None, RoPE blocks of width
    enc_width over the LM's vocabulary. The decoder's T learnable query tokens attend to each
    other and to the unpadded encoder states (as T5's decoder with T fixed input tokens, the way
    MAC uses T5), at the encoder's width; the output is projected to the LM width D.
    """
    cfg: MACConfig
    t5: Optional[T5Config] = None

    @nn.compact
    def __call__(self, tokens_BxS):
        c = self.cfg
        chex.assert_rank(tokens_BxS, 2)
        B, S = tokens_BxS.shape
        dt, pdt = c.dtype, c.param_dtype
        mask_BxS = tokens_BxS != c.pad_id
        if self.t5 is not None:
            E = self.t5.d_model
            enc = T5Encoder(self.t5, name="t5")(tokens_BxS, mask_BxS).astype(dt)
        else:
            E = c.enc_width
            emb = self.param("embedding", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("vocab", "embed")), (c.lm.vocab_size, E), pdt)
            x = jnp.take(emb, tokens_BxS, axis=0).astype(dt)
            pos = jnp.arange(S, dtype=jnp.int32)
            for i in range(c.enc_layers):
                h = _ln(f"enc_{i}_ln_1", dt, pdt)(x)
                x = x + MHA(c.enc_heads, E, dt, pdt, c.init_scale, name=f"enc_{i}_attn")(
                    h, h, mask_BxS, q_positions=pos, k_positions=pos)
                h = _ln(f"enc_{i}_ln_2", dt, pdt)(x)
                x = x + _ffn(c.mlp_ratio * E, dt, pdt, f"enc_{i}_mlp", c.init_scale)(h)
            enc = _ln("enc_ln_f", dt, pdt)(x)
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "embed")), (c.num_tokens, E), pdt)
        z = jnp.broadcast_to(queries.astype(dt)[None], (B, c.num_tokens, E))
        for i in range(c.dec_layers):
            h = _ln(f"dec_{i}_ln_1", dt, pdt)(z)
            z = z + MHA(c.enc_heads, E, dt, pdt, c.init_scale, name=f"dec_{i}_self")(h, h)
            h = _ln(f"dec_{i}_ln_2", dt, pdt)(z)
            z = z + MHA(c.enc_heads, E, dt, pdt, c.init_scale, name=f"dec_{i}_cross")(
                h, enc, mask_BxS)
            h = _ln(f"dec_{i}_ln_3", dt, pdt)(z)
            z = z + _ffn(c.mlp_ratio * E, dt, pdt, f"dec_{i}_mlp", c.init_scale)(h)
        if c.dec_layers == 0:  # queries read the document once
            z = z + MHA(c.enc_heads, E, dt, pdt, c.init_scale, name="dec_cross")(z, enc, mask_BxS)
        z = _ln("dec_ln_f", dt, pdt)(z)
        out = _dense(c.width, ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="proj",
                     init_scale=c.init_scale)(z)
        return nn.with_logical_constraint(out, ("batch", None, "embed"))


class PerSlotMLP(nn.Module):
    """x [B, T, D] → x + W2_t tanh(W1_t LN(x_t)) with separate weights for every slot t."""
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BxTxD):
        _, T, D = x_BxTxD.shape
        init = nn.with_logical_partitioning
        w1 = self.param("w1", init(fan_in_init(self.init_scale, (0,)), (None, "embed", "mlp")),
                        (T, D, self.hidden), self.param_dtype)
        b1 = self.param("b1", init(nn.initializers.zeros, (None, "mlp")), (T, self.hidden),
                        self.param_dtype)
        w2 = self.param("w2", init(fan_in_init(self.init_scale, (0,)), (None, "mlp", "embed")),
                        (T, self.hidden, D), self.param_dtype)
        b2 = self.param("b2", init(nn.initializers.zeros, (None, "embed")), (T, D),
                        self.param_dtype)
        h = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(x_BxTxD)
        h = jnp.tanh(jnp.einsum("btd,tdh->bth", h, w1.astype(self.dtype)) + b1.astype(self.dtype))
        return x_BxTxD + jnp.einsum("bth,thd->btd", h, w2.astype(self.dtype)) + b2.astype(
            self.dtype)


class PerRowFFN(nn.Module):
    """rows [B, R, D] → γ_r ⊙ (rows + W2_r gelu(W1_r LN(rows_r))), separate weights for every
    row r; the per-row gain γ [R, D] starts at `gain_init` (0: the prefix starts as all-zero keys
    and values, i.e. the frozen LM is not disturbed at the start of meta-training)."""
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_scale: float = 1.0
    gain_init: float = 1.0

    @nn.compact
    def __call__(self, x_BxRxD):
        _, R, D = x_BxRxD.shape
        init = nn.with_logical_partitioning
        w1 = self.param("w1", init(fan_in_init(self.init_scale, (0,)), (None, "embed", "mlp")),
                        (R, D, self.hidden), self.param_dtype)
        b1 = self.param("b1", init(nn.initializers.zeros, (None, "mlp")), (R, self.hidden),
                        self.param_dtype)
        w2 = self.param("w2", init(fan_in_init(self.init_scale, (0,)), (None, "mlp", "embed")),
                        (R, self.hidden, D), self.param_dtype)
        b2 = self.param("b2", init(nn.initializers.zeros, (None, "embed")), (R, D),
                        self.param_dtype)
        gain = self.param("gain", init(nn.initializers.constant(self.gain_init), (None, "embed")),
                          (R, D), self.param_dtype)
        h = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(x_BxRxD)
        h = layers.gelu_exact(jnp.einsum("brd,rdh->brh", h, w1.astype(self.dtype))
                              + b1.astype(self.dtype))
        out = x_BxRxD + jnp.einsum("brh,rhd->brd", h, w2.astype(self.dtype)) + b2.astype(
            self.dtype)
        return out * gain.astype(self.dtype)


def expand_slots(phi_BxTxD: jax.Array, rows: int) -> jax.Array:
    """[B, T, D] → [B, rows, D]: slot i repeated ⌊rows/T⌋ times, the first rows mod T once more.

    Rows of one slot are contiguous: slot 0's copies, then slot 1's, … (rows ≥ T).
    """
    T = phi_BxTxD.shape[1]
    if rows < T:
        raise ValueError(f"rows={rows} must be at least T={T}")
    r, extra = divmod(rows, T)
    counts = [r + (1 if i < extra else 0) for i in range(T)]
    idx = jnp.asarray(sum(([i] * n for i, n in enumerate(counts)), []), jnp.int32)
    return jnp.take(phi_BxTxD, idx, axis=1)


def slot_keys(phi_NxTxD: jax.Array) -> jax.Array:
    """Unit-norm mean-pooled modulations [N, D]: the bank keys for CMT-style top-k."""
    m = jnp.mean(phi_NxTxD.astype(jnp.float32), axis=-2)
    return m * jax.lax.rsqrt(jnp.sum(m * m, -1, keepdims=True) + 1e-12)


class MAC(nn.Module):
    """The trainable part of MAC: g (`amortize`), h (`aggregate`) and the prefix FFN (`prefix`)."""
    cfg: MACConfig

    def setup(self):
        c = self.cfg
        dt, pdt = c.dtype, c.param_dtype
        self.doc_encoder = EncoderDecoder(c, c.doc_encoder, name="doc_encoder")
        self.slot_mlp = PerSlotMLP(c.mlp_ratio * c.width, dt, pdt, c.init_scale, name="slot_mlp")
        self.question_encoder = EncoderDecoder(c, c.question_encoder, name="question_encoder")
        self.agg_ln_q = [_ln(f"agg_{i}_ln_q", dt, pdt) for i in range(c.agg_blocks)]
        self.agg_ln_c = [_ln(f"agg_{i}_ln_c", dt, pdt) for i in range(c.agg_blocks)]
        self.agg_attn = [MHA(c.agg_heads, c.width, dt, pdt, c.init_scale, name=f"agg_{i}_attn")
                         for i in range(c.agg_blocks)]
        self.agg_ln_f = [_ln(f"agg_{i}_ln_f", dt, pdt) for i in range(c.agg_blocks)]
        self.agg_ffn = [_ffn(c.mlp_ratio * c.width, dt, pdt, f"agg_{i}_ffn", c.init_scale)
                        for i in range(c.agg_blocks)]
        self.prefix_ffn = PerRowFFN(c.prefix_hidden, dt, pdt, c.init_scale, c.prefix_gain_init,
                                    name="prefix_ffn")

    # -- g -------------------------------------------------------------------------------------
    def amortize(self, docs_BxS: jax.Array) -> jax.Array:
        """g: document tokens [B, S] → modulations φ [B, T, D]."""
        phi = self.slot_mlp(self.doc_encoder(docs_BxS))
        chex.assert_shape(phi, (docs_BxS.shape[0], self.cfg.num_tokens, self.cfg.width))
        return phi

    # -- h -------------------------------------------------------------------------------------
    def encode_question(self, questions_BxQ: jax.Array) -> jax.Array:
        """The question's encoder–decoder: tokens [B, Q] → z0 [B, T, D]."""
        return self.question_encoder(questions_BxQ)

    def _blocks(self, z_BxTxD, ctx_BxSxD, mask_BxS):
        """The aggregation blocks: z ← z + MHA(LN z, LN C); z ← z + FFN(LN z)."""
        for i in range(self.cfg.agg_blocks):
            z = z_BxTxD
            z = z + self.agg_attn[i](self.agg_ln_q[i](z), self.agg_ln_c[i](ctx_BxSxD), mask_BxS)
            z_BxTxD = z + self.agg_ffn[i](self.agg_ln_f[i](z))
        return z_BxTxD

    def _flat(self, z0_BxTxD, mem_BxNxTxD, valid_BxN):
        """One pass of the blocks over a bank [B|1, N, T, D] flattened to [B|1, N·T, D]."""
        Bm, N, T, D = mem_BxNxTxD.shape
        ctx = mem_BxNxTxD.reshape(Bm, N * T, D)
        mask = None if valid_BxN is None else jnp.repeat(valid_BxN, T, axis=1)
        return self._blocks(z0_BxTxD, ctx, mask)

    def aggregate_z0(self, z0_BxTxD: jax.Array, memory: jax.Array,
                     valid: Optional[jax.Array] = None, *, window: Optional[int] = None,
                     topk: Optional[int] = None) -> jax.Array:
        """h's memory pass from a question code z0 [B, T, D] over memory [N, T, D] or [B, N, T, D].

        valid [N] or [B, N] bool marks real entries (None = all). `window`/`topk` override the
        config (0 disables either). Hierarchical: while more than W documents remain, chunks of
        W documents are aggregated with the question and the chunk outputs form the next bank.
        """
        c = self.cfg
        window = c.window if window is None else (window or None)
        topk = c.topk if topk is None else (topk or None)
        B, T, D = z0_BxTxD.shape
        if memory.ndim == 3:
            memory = memory[None]
        chex.assert_rank(memory, 4)
        chex.assert_axis_dimension(memory, 2, T)
        chex.assert_axis_dimension(memory, 3, D)
        N = memory.shape[1]
        if valid is not None:
            valid = jnp.asarray(valid, bool)
            if valid.ndim == 1:
                valid = valid[None]
            if valid.shape[-1] != N or valid.shape[0] not in (1, B):
                raise ValueError(f"valid.shape={valid.shape} is not allowed: use [N] or [B, N] "
                                 f"with N={N}, B={B}")
        if memory.shape[0] not in (1, B):
            raise ValueError(f"memory.shape={memory.shape} is not allowed: use [N, T, D] or "
                             f"[B, N, T, D] with B={B}")
        if topk is not None and topk < N:
            # CMT: keep the k documents whose mean-pooled modulation is most cosine-similar to
            # the question's code; invalid entries never win.
            qk = slot_keys(z0_BxTxD)                                       # [B, D]
            mk = slot_keys(memory)                                         # [Bm, N, D]
            scores = jnp.einsum("bd,bnd->bn", qk, jnp.broadcast_to(mk, (B, N, D)))
            if valid is not None:
                scores = jnp.where(valid, scores, -jnp.inf)
            _, idx = jax.lax.top_k(scores, topk)                           # [B, k]
            memory = jnp.take_along_axis(jnp.broadcast_to(memory, (B, N, T, D)),
                                         idx[:, :, None, None], axis=1)
            if valid is not None:
                valid = jnp.take_along_axis(jnp.broadcast_to(valid, (B, N)), idx, axis=1)
            N = topk
        while window is not None and N > window:
            # Chunk over the bank's entries (not the question's length, as the official code).
            # A shared bank [1, N, T, D] stays shared: chunks are a batch axis C, and the
            # question's code broadcasts over it ([B, 1, T, D] → outputs [B, C, T, D]).
            n_chunks = -(-N // window)
            pad = n_chunks * window - N
            Bm, Bv = memory.shape[0], (1 if valid is None else valid.shape[0])
            mem = jnp.pad(memory, ((0, 0), (0, pad), (0, 0), (0, 0)))
            val = jnp.ones((1, N), bool) if valid is None else valid
            val = jnp.pad(val, ((0, 0), (0, pad)))                         # [Bv, C·W]
            ctx = mem.reshape(Bm, n_chunks, window * T, D)
            mask = jnp.repeat(val, T, axis=1).reshape(Bv, n_chunks, window * T)
            out = self._blocks(z0_BxTxD[:, None], ctx, mask)               # [B, C, T, D]
            memory = jnp.broadcast_to(out, (B, n_chunks, T, D))
            valid = val.reshape(Bv, n_chunks, window).any(-1)              # empty chunk: invalid
            N = n_chunks
        return self._flat(z0_BxTxD, memory, valid)

    def aggregate(self, questions_BxQ: jax.Array, memory: jax.Array,
                  valid: Optional[jax.Array] = None, *, window: Optional[int] = None,
                  topk: Optional[int] = None) -> jax.Array:
        """h: questions [B, Q] and memory [N, T, D] (or [B, N, T, D]) → aggregated φ* [B, T, D]."""
        z0 = self.encode_question(questions_BxQ)
        return self.aggregate_z0(z0, memory, valid, window=window, topk=topk)

    # -- prefix --------------------------------------------------------------------------------
    def prefix(self, phi_BxTxD: jax.Array) -> jax.Array:
        """φ* [B, T, D] → per-layer prefix keys/values [L, 2, B, P, H, Dh] (P-tuning v2)."""
        c = self.cfg
        B = phi_BxTxD.shape[0]
        rows = self.prefix_ffn(expand_slots(phi_BxTxD, c.prefix_rows))    # [B, 2LP, D]
        kv = rows.reshape(B, c.lm.num_layers, 2, c.prefix_len, c.lm.num_heads, c.lm.hd)
        return jnp.transpose(kv, (1, 2, 0, 3, 4, 5))

    def __call__(self, docs_BxS, questions_BxQ):
        """Init/one-shot path: every question aggregates the whole batch of documents."""
        phi = self.amortize(docs_BxS)
        return self.prefix(self.aggregate(questions_BxQ, phi))


def modulated_logits(cfg: MACConfig, lm_params, tokens_BxT: jax.Array,
                     prefix_kv: Optional[jax.Array] = None,
                     prefix_mask: Optional[jax.Array] = None) -> jax.Array:
    """The frozen LM's logits [B, T, V] with tokens at positions P, P+1, … after the prefix.

    prefix_kv None gives the unmodulated LM at the same position offset (the no-memory baseline).
    """
    B, T = tokens_BxT.shape
    P = cfg.prefix_len
    positions = P + jnp.arange(T, dtype=jnp.int32)
    if prefix_kv is not None and prefix_mask is None:
        prefix_mask = jnp.ones((B, P), bool)
    return Transformer(cfg.lm).apply({"params": lm_params}, tokens_BxT, positions=positions,
                                     prefix_kv=prefix_kv, prefix_mask=prefix_mask)
