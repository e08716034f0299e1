"""Gated SSM and Hawk (RG-LRU) recurrences, the bidirectional-prefix layer, the BiSSM LM.

Blouir et al. 2024, "Birdie: Advancing State Space Models with Reward-Driven Objectives and
Curricula" (§3.4, the gated SSM and its bidirectional prefix), and De et al. 2024, "Griffin"
(Hawk = RG-LRU blocks). Every recurrence is the first-order linear recurrence

    h_t = a_t ⊙ h_{t−1} + b_t                                   (float32, whatever the dtype)

computed with `jax.lax.associative_scan` over (a, b) pairs with the operator
(a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂), optionally in chunks (`chunk_size`), and one step at a
time for decoding (`recurrence_step`). `block_chunk` runs whole blocks in chunks (long prefills).

The bidirectional layer (Birdie §3.4) splits the state width Dh in two halves with the same
parameters and FLOPs as a causal layer:
  forward half  h_t = a_t h_{t−1} + b_t, with a_t := 0 at each packed sample's first token;
  reverse half  g_t = a_t g_{t+1} + b_t, with a_t := 0 unless t and t+1 are both prefix positions
                of the same sample. Suffix (generated) positions therefore carry only their own
                b_t, and the last prefix position never reads the generated part.
Prefix tokens see the whole prefix; generation is the forward recurrence from the state the prefix
left, so `prefill` + `step` equals the teacher-forced pass.

    cfg = SSMConfig(vocab_size=320, width=64, num_layers=2, mixer="gated", layer_pattern="bc")
    model = BiSSMLM(cfg)
    params = model.init(key, tokens_BxT)["params"]
    logits_BxTxV = model.apply({"params": params}, tokens_BxT, segment_ids=seg_BxT, prefix=pre_BxT)
    logits_BxPxV, state = model.apply({"params": params}, prompt_BxP, method=BiSSMLM.prefill)
    logits_BxV, state = model.apply({"params": params}, state, token_B, method=BiSSMLM.step)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models.transformer import as_dtype

F32 = jnp.float32
MIXERS = ("gated", "hawk")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SSMConfig:
    vocab_size: int                    # V: 320 for the byte tokenizer (train/data/tokenizer.py)
    width: int = 64                    # D: residual width
    state_width: Optional[int] = None  # Dh: recurrent state per layer (default D); even if any
                                       #     layer is bidirectional (two halves)
    num_layers: int = 2                # L: recurrent blocks
    mixer: str = "gated"               # 'gated' (Birdie §3.4) | 'hawk' (Griffin RG-LRU)
    layer_pattern: str = "bc"          # cycled over layers: 'b' bidirectional, 'c' causal
    mlp_hidden: int = 0                # >0: an MLP block after every recurrent block (Griffin)
    mlp: str = "gelu"                  # its kind, layers.MLP_KINDS ('geglu': Griffin's gated MLP)
    hawk_heads: int = 1                # Hawk: block-diagonal gate matrices W_a, W_x with H blocks
    conv_width: int = 4                # Hawk: causal depthwise Conv1D width
    hawk_c: float = 8.0                # Hawk: a = exp(−c·r·softplus(Λ)); Griffin's c = 8
    hawk_sqrt_max_grad: float = 1000.0  # Hawk: √(1 − a²)'s derivative bounded by this
                                        # (Griffin's 1000; near a = 1 the true one grows
                                        # without bound)
    a_min: float = 0.9                 # init range of the decay at r=1 (Hawk), of σ(b_f) (gated)
    a_max: float = 0.999
    tie_embeddings: bool = True        # lm head = embedding table transposed
    init_std: float = layers.DEFAULT_INIT_STD  # normal init of the embedding, the MLP kernels
                                               # and an untied head (mixers: LeCun normal)
    chunk_size: int = 0                # >0: chunked scan (associative within chunks of C steps)
    block_chunk: int = 0               # >0: each block runs in chunks of C positions (Block._chunked;
                                       #     long prefills: every intermediate [B, C, ·])
    remat: bool = False                # recompute each block in the backward pass (training
                                       #     memory: one block's activations, not every layer's)
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32           # compute dtype of the matmuls; recurrences stay float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_layers", "hawk_heads", "conv_width"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("mlp_hidden", "chunk_size", "block_chunk"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be an integer >= 0 (0 = off)")
        if self.state_width is not None and (not isinstance(self.state_width, (int, np.integer))
                                             or self.state_width <= 0):
            raise ValueError(f"state_width={self.state_width!r} must be a positive integer or None")
        if self.mlp not in layers.MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r} is not allowed; use one of {layers.MLP_KINDS}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r} is not allowed; use one of {MIXERS}")
        if not self.layer_pattern or set(self.layer_pattern) - {"b", "c"}:
            raise ValueError(f"layer_pattern={self.layer_pattern!r} is not allowed; use a "
                             "non-empty string of 'b' (bidirectional) and 'c' (causal), e.g. 'bc'")
        if any(self.bidirectional) and self.dh % 2:
            raise ValueError(f"state_width={self.dh} must be even when a layer is bidirectional "
                             f"(layer_pattern={self.layer_pattern!r}): the state is split "
                             "in halves")
        if self.mixer == "hawk" and self.dh % self.hawk_heads:
            raise ValueError(f"state_width={self.dh} must be divisible by hawk_heads="
                             f"{self.hawk_heads}")
        if not 0.0 < self.a_min < self.a_max < 1.0:
            raise ValueError(f"a_min={self.a_min}, a_max={self.a_max}: need 0 < a_min < a_max < 1")
        if self.hawk_c <= 0:
            raise ValueError(f"hawk_c={self.hawk_c} must be > 0")
        if not self.hawk_sqrt_max_grad > 0:
            raise ValueError(f"hawk_sqrt_max_grad={self.hawk_sqrt_max_grad} is not allowed; use "
                             "a bound > 0")
        layers.check_init_std(self.init_std)
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def dh(self) -> int:
        return self.state_width or self.width

    @property
    def bidirectional(self) -> tuple[bool, ...]:
        """Per layer: True where the layer is bidirectional ('b' in the cycled layer_pattern)."""
        p = self.layer_pattern
        return tuple(p[i % len(p)] == "b" for i in range(self.num_layers))

    def replace(self, **kw) -> "SSMConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "SSMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; allowed: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# The linear recurrence h_t = a_t h_{t-1} + b_t
# ---------------------------------------------------------------------------------------------
def _combine(e1, e2):
    """(a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂): apply step 1 then step 2."""
    a1, b1 = e1
    a2, b2 = e2
    return a1 * a2, a2 * b1 + b2


def _scan_assoc(a, b):
    return jax.lax.associative_scan(_combine, (a, b), axis=1)[1]


def _scan_chunked(a, b, chunk: int):
    """Associative scan inside chunks of `chunk` steps, a sequential carry across chunks."""
    B, T = a.shape[:2]
    rest = a.shape[2:]
    pad = (-T) % chunk
    if pad:  # padded steps come after every real one, so they change nothing that is kept
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(rest)
        a, b = jnp.pad(a, widths), jnp.pad(b, widths)
    n = a.shape[1] // chunk
    to_chunks = lambda x: jnp.moveaxis(x.reshape((B, n, chunk) + rest), 1, 0)  # noqa: E731

    def body(h, ab):
        a_c, b_c = ab                                              # [B, C, ...]
        a_cum, b_cum = jax.lax.associative_scan(_combine, (a_c, b_c), axis=1)
        h_c = a_cum * h[:, None] + b_cum
        return h_c[:, -1], h_c

    _, h = jax.lax.scan(body, jnp.zeros((B,) + rest, a.dtype), (to_chunks(a), to_chunks(b)))
    h = jnp.moveaxis(h, 0, 1).reshape((B, n * chunk) + rest)
    return h[:, :T]


def linear_recurrence(a_BxTxD, b_BxTxD, *, reverse: bool = False, chunk_size: int = 0,
                      h0_BxD: Optional[jax.Array] = None) -> jax.Array:
    """h [B,T,D] float32 with h_t = a_t ⊙ h_{t−1} + b_t, h_{−1} = h0 (default 0).

    reverse=True runs from the end: h_t = a_t ⊙ h_{t+1} + b_t, h_T = h0.
    chunk_size > 0 scans chunks of that many steps in parallel and carries the state across
    chunks sequentially (same result; log-depth only inside a chunk, for long sequences).
    """
    chex.assert_rank([a_BxTxD, b_BxTxD], 3)
    chex.assert_equal_shape([a_BxTxD, b_BxTxD])
    a, b = a_BxTxD.astype(F32), b_BxTxD.astype(F32)
    if reverse:
        a, b = a[:, ::-1], b[:, ::-1]
    if h0_BxD is not None:
        b = b.at[:, 0].add(a[:, 0] * h0_BxD.astype(F32))
    if chunk_size and a.shape[1] > chunk_size:
        h = _scan_chunked(a, b, chunk_size)
    else:
        h = _scan_assoc(a, b)
    return h[:, ::-1] if reverse else h


def sequential_recurrence(a_BxTxD, b_BxTxD, *, reverse: bool = False,
                          h0_BxD: Optional[jax.Array] = None) -> jax.Array:
    """The reference loop (lax.scan, one step at a time) for `linear_recurrence`."""
    a, b = a_BxTxD.astype(F32), b_BxTxD.astype(F32)
    h0 = jnp.zeros(a.shape[:1] + a.shape[2:], F32) if h0_BxD is None else h0_BxD.astype(F32)

    def body(h, ab):
        h = recurrence_step(h, *ab)
        return h, h

    _, h = jax.lax.scan(body, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
    return jnp.moveaxis(h, 0, 1)


def recurrence_step(h_BxD, a_BxD, b_BxD) -> jax.Array:
    """One decoding step of the recurrence: a ⊙ h + b, float32."""
    return a_BxD.astype(F32) * h_BxD.astype(F32) + b_BxD.astype(F32)


# ---------------------------------------------------------------------------------------------
# Packing masks
# ---------------------------------------------------------------------------------------------
def segment_starts(segment_ids_BxT) -> jax.Array:
    """[B,T] bool: True at each packed sample's first token (and at t = 0)."""
    s = segment_ids_BxT
    prev = jnp.concatenate([jnp.full_like(s[:, :1], -1), s[:, :-1]], axis=1)
    return (s != prev) | (jnp.arange(s.shape[1]) == 0)[None]


def reverse_keep(segment_ids_BxT, prefix_BxT) -> jax.Array:
    """[B,T] bool: where the reverse half may read g_{t+1}: t and t+1 both prefix, same sample."""
    s, p = segment_ids_BxT, prefix_BxT.astype(bool)
    nxt_s = jnp.concatenate([s[:, 1:], jnp.full_like(s[:, :1], -1)], axis=1)
    nxt_p = jnp.concatenate([p[:, 1:], jnp.zeros_like(p[:, :1])], axis=1)
    return p & nxt_p & (s == nxt_s)


def bidirectional_recurrence(a_BxTxD, b_BxTxD, *, segment_ids_BxT, prefix_BxT,
                             bidirectional: bool, chunk_size: int = 0) -> jax.Array:
    """The recurrence of one layer over packed rows, h [B,T,Dh] float32 (see the module docstring).

    Causal: the whole state runs forward, reset at each sample's first token.
    Bidirectional: the first Dh/2 channels run forward (reset at sample starts), the last Dh/2 run
    in reverse with the gate zeroed outside the prefix (`reverse_keep`). The zeroing is exact
    (`where`), so samples packed in one row are isolated bit for bit.
    """
    D = a_BxTxD.shape[-1]
    start = segment_starts(segment_ids_BxT)[..., None]
    if not bidirectional:
        a = jnp.where(start, 0.0, a_BxTxD.astype(F32))
        return linear_recurrence(a, b_BxTxD, chunk_size=chunk_size)
    half = D // 2
    keep = reverse_keep(segment_ids_BxT, prefix_BxT)[..., None]
    a_f = jnp.where(start, 0.0, a_BxTxD[..., :half].astype(F32))
    a_r = jnp.where(keep, a_BxTxD[..., half:].astype(F32), 0.0)
    # One scan of width Dh, as a causal layer: the reverse half runs on time-flipped inputs.
    a = jnp.concatenate([a_f, a_r[:, ::-1]], axis=-1)
    b = b_BxTxD.astype(F32)
    b = jnp.concatenate([b[..., :half], b[:, ::-1, half:]], axis=-1)
    h = linear_recurrence(a, b, chunk_size=chunk_size)
    return jnp.concatenate([h[..., :half], h[:, ::-1, half:]], axis=-1)


def _last_segment_mask(segment_ids_BxT) -> jax.Array:
    return segment_ids_BxT == segment_ids_BxT[:, -1:]


# ---------------------------------------------------------------------------------------------
# Mixers: x [B,T,D] (already normed) → y [B,T,D]; step: x [B,D], state → y [B,D], state
# ---------------------------------------------------------------------------------------------
class _Projection(nn.Module):
    """x [..., D] → [..., *features] without bias; the kernel [D, *features] is created in its
    final shape (nn.DenseGeneral creates a flat kernel and reshapes it, which breaks a rank-3
    logical sharding constraint under a mesh). lecun-normal with fan-in D."""
    features: tuple
    names: tuple
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        n = len(self.features)
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, n + 1)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                            (x.shape[-1],) + tuple(self.features), self.param_dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=1)


def _dense(cfg: SSMConfig, features, names, name):
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    return _Projection(features, tuple(names), cfg.dtype, cfg.param_dtype, name=name)


def _uniform_init(lo: float, hi: float, fn):
    """Init whose values are fn(u), u ~ U[lo, hi]."""
    def init(key, shape, dtype=F32):
        return fn(jax.random.uniform(key, shape, F32, lo, hi)).astype(dtype)
    return init


class GatedSSM(nn.Module):
    """Birdie's gated SSM (§3.4): f = σ(W_f x + b_f), z = (W_z x) ⊙ σ(W_zg x), o = gelu(W_o x),
    h_t = f_t ⊙ h_{t−1} + z_t, y = W_out(o ⊙ h).

    b_f is our addition (zero-cost): it starts the forget gate in [a_min, a_max] so the state
    remembers from the first step, as Griffin initialises its decay.
    """
    cfg: SSMConfig
    bidirectional: bool

    def setup(self):
        c = self.cfg
        # W_f, W_z, W_zg, W_o fused in one [D, 4, Dh] matmul.
        self.w_in = _dense(c, (4, c.dh), ("embed", None, "mlp"), "w_in")
        logit = lambda u: jnp.log(u) - jnp.log1p(-u)  # noqa: E731
        self.b_f = self.param("b_f", nn.with_logical_partitioning(
            _uniform_init(c.a_min, c.a_max, logit), ("mlp",)), (c.dh,), c.param_dtype)
        self.w_out = _dense(c, c.width, ("mlp", "embed"), "w_out")

    def _gates(self, x):
        u = self.w_in(x)
        f = jax.nn.sigmoid(u[..., 0, :].astype(F32) + self.b_f)
        z = u[..., 1, :].astype(F32) * jax.nn.sigmoid(u[..., 2, :].astype(F32))
        o = layers.gelu_exact(u[..., 3, :])
        return f, z, o

    def chunk_inputs(self, x_BxCxD, segment_ids_BxC, conv):
        """One chunk's recurrence inputs for `Block`'s chunked pass: (a, b, aux, conv); the gated
        SSM has no convolution, so `conv` passes through."""
        del segment_ids_BxC
        f, z, o = self._gates(x_BxCxD)
        return f, z, o, conv

    def output(self, o, h):
        """y = W_out(o ⊙ h)."""
        return self.w_out(o * h.astype(o.dtype))

    def __call__(self, x_BxTxD, *, segment_ids_BxT, prefix_BxT, return_state: bool = False):
        f, z, o = self._gates(x_BxTxD)
        h = bidirectional_recurrence(f, z, segment_ids_BxT=segment_ids_BxT, prefix_BxT=prefix_BxT,
                                     bidirectional=self.bidirectional,
                                     chunk_size=self.cfg.chunk_size)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        y = self.output(o, h)
        if not return_state:
            return y
        return y, {"h": h[:, -1, : self.state_size]}

    @property
    def state_size(self) -> int:
        return self.cfg.dh // 2 if self.bidirectional else self.cfg.dh

    def init_state(self, batch: int) -> dict:
        return {"h": jnp.zeros((batch, self.state_size), F32)}

    def step(self, x_BxD, state):
        f, z, o = self._gates(x_BxD)
        n = self.state_size
        h_f = recurrence_step(state["h"], f[..., :n], z[..., :n])
        # The reverse half at a generated position: gate zeroed, so g_t = b_t (no state).
        h = jnp.concatenate([h_f, z[..., n:]], axis=-1)
        return self.output(o, h), {"h": h_f}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_grad(x, max_grad: float):
    """√x whose derivative 1/(2√x) is bounded by `max_grad` (where 4x < 1/max_grad²), as
    Griffin's RG-LRU does for √(1 − a²): the value is √x exactly."""
    return jnp.sqrt(x)


def _sqrt_fwd(x, max_grad):
    return jnp.sqrt(x), x


def _sqrt_bwd(max_grad, x, g):
    return (g / jnp.sqrt(jnp.maximum(4.0 * x, 1.0 / max_grad ** 2)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def causal_conv(u_BxTxD, w_WxD, bias_D, segment_ids_BxT) -> jax.Array:
    """Depthwise causal conv [B,T,D]: out_t = Σ_k w[k] u_{t−k} + bias, within the sample only."""
    W = w_WxD.shape[0]
    T = u_BxTxD.shape[1]
    out = u_BxTxD * w_WxD[0] + bias_D
    for k in range(1, W):
        if k >= T:
            break
        shifted = jnp.pad(u_BxTxD, ((0, 0), (k, 0), (0, 0)))[:, :T]
        same = jnp.pad(segment_ids_BxT, ((0, 0), (k, 0)), constant_values=-1)[:, :T]
        same = (same == segment_ids_BxT)[..., None]
        out = out + jnp.where(same, shifted, 0.0) * w_WxD[k]
    return out


class Hawk(nn.Module):
    """Hawk's recurrent block (Griffin §2.4): u = Conv1D(W_in x) (causal, width 4),
    r = σ(W_a u + b_a), i = σ(W_x u + b_x), a = exp(−c·r·softplus(Λ)),
    h_t = a ⊙ h_{t−1} + √(1−a²) ⊙ (i ⊙ u), y = W_out(gelu(W_gate x) ⊙ h).

    W_a, W_x are block-diagonal with `hawk_heads` blocks (Griffin's layout; 1 block = dense).
    """
    cfg: SSMConfig
    bidirectional: bool

    def setup(self):
        c = self.cfg
        H = c.hawk_heads
        Dk = c.dh // H
        self.w_in = _dense(c, (2, c.dh), ("embed", None, "mlp"), "w_in")  # [W_in | W_gate]
        self.conv_w = self.param("conv_w", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0 / math.sqrt(c.conv_width)), (None, "mlp")),
            (c.conv_width, c.dh), c.param_dtype)
        self.conv_b = self.param("conv_b", nn.with_logical_partitioning(
            nn.initializers.zeros, ("mlp",)), (c.dh,), c.param_dtype)
        self.w_gates = self.param("w_gates", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=2,
                                             out_axis=3, batch_axis=(0, 1)),
            (None, "heads", "kv", None)), (2, H, Dk, Dk), c.param_dtype)  # [W_a, W_x]
        self.b_gates = self.param("b_gates", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, "mlp")), (2, c.dh), c.param_dtype)
        # softplus(Λ) = −log(a0) with a0 ~ U[a_min, a_max]: the decay at r = 1 starts there.
        inv_softplus = lambda y: y + jnp.log(-jnp.expm1(-y))  # noqa: E731
        self.lam = self.param("lam", nn.with_logical_partitioning(_uniform_init(
            c.a_min, c.a_max, lambda a0: inv_softplus(-jnp.log(a0))), ("mlp",)),
            (c.dh,), c.param_dtype)
        self.w_out = _dense(c, c.width, ("mlp", "embed"), "w_out")

    @property
    def state_size(self) -> int:
        return self.cfg.dh // 2 if self.bidirectional else self.cfg.dh

    def _rglru_inputs(self, u):
        """u [..., Dh] (after the conv) → (a, b) of the recurrence, float32."""
        c = self.cfg
        H = c.hawk_heads
        uf = u.astype(F32)
        uh = uf.reshape(uf.shape[:-1] + (H, c.dh // H))
        g = jnp.einsum("...hi,ghij->...ghj", uh, self.w_gates.astype(F32))
        g = g.reshape(uf.shape[:-1] + (2, c.dh)) + self.b_gates
        r, i = jax.nn.sigmoid(g[..., 0, :]), jax.nn.sigmoid(g[..., 1, :])
        log_a = -c.hawk_c * r * jax.nn.softplus(self.lam.astype(F32))
        a = jnp.exp(log_a)
        # √(1 − a²), stable near a = 1, its derivative bounded (Griffin's SqrtBoundDerivative)
        mult = sqrt_bounded_grad(-jnp.expm1(2.0 * log_a), c.hawk_sqrt_max_grad)
        return a, mult * (i * uf)

    def chunk_inputs(self, x_BxCxD, segment_ids_BxC, conv):
        """One chunk's recurrence inputs for `Block`'s chunked pass: (a, b, gate, conv), where
        conv = (the last W−1 pre-conv inputs [B, W−1, Dh], their segment ids [B, W−1]) carries
        the convolution across the chunk boundary (masked by segment, as `causal_conv`)."""
        c = self.cfg
        u_pre, gate = self._inputs(x_BxCxD)
        buf, buf_seg = conv
        W1 = c.conv_width - 1
        full = jnp.concatenate([buf.astype(u_pre.dtype), u_pre], axis=1)
        full_seg = jnp.concatenate([buf_seg, segment_ids_BxC], axis=1)
        u = causal_conv(full, self.conv_w.astype(u_pre.dtype), self.conv_b.astype(u_pre.dtype),
                        full_seg)[:, W1:]
        a, b = self._rglru_inputs(u)
        return a, b, gate, (full[:, -W1:].astype(F32), full_seg[:, -W1:])

    def _inputs(self, x):
        """x → (u_pre: W_in x before the conv, gate: gelu(W_gate x))."""
        v = self.w_in(x)
        return v[..., 0, :], layers.gelu_exact(v[..., 1, :])

    def output(self, gate, h):
        """y = W_out(gate ⊙ h)."""
        return self.w_out(gate * h.astype(gate.dtype))

    def __call__(self, x_BxTxD, *, segment_ids_BxT, prefix_BxT, return_state: bool = False):
        c = self.cfg
        u_pre, gate = self._inputs(x_BxTxD)
        u = causal_conv(u_pre, self.conv_w.astype(u_pre.dtype), self.conv_b.astype(u_pre.dtype),
                        segment_ids_BxT)
        a, b = self._rglru_inputs(u)
        h = bidirectional_recurrence(a, b, segment_ids_BxT=segment_ids_BxT, prefix_BxT=prefix_BxT,
                                     bidirectional=self.bidirectional, chunk_size=c.chunk_size)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        y = self.output(gate, h)
        if not return_state:
            return y
        # The conv buffer holds the last W−1 pre-conv inputs of the last sample (zeros before it).
        keep = _last_segment_mask(segment_ids_BxT)[..., None]
        buf = jnp.where(keep, u_pre, 0.0).astype(F32)
        W1 = c.conv_width - 1
        buf = jnp.pad(buf, ((0, 0), (W1, 0), (0, 0)))[:, buf.shape[1]:]
        return y, {"h": h[:, -1, : self.state_size], "conv": buf}

    def init_state(self, batch: int) -> dict:
        c = self.cfg
        return {"h": jnp.zeros((batch, self.state_size), F32),
                "conv": jnp.zeros((batch, c.conv_width - 1, c.dh), F32)}

    def step(self, x_BxD, state):
        c = self.cfg
        u_pre, gate = self._inputs(x_BxD)
        full = jnp.concatenate([state["conv"].astype(u_pre.dtype), u_pre[:, None]], axis=1)
        w = self.conv_w.astype(u_pre.dtype)
        # out_t = Σ_k w[k] u_{t−k}, summed in the same order as `causal_conv`.
        u = full[:, -1] * w[0] + self.conv_b.astype(u_pre.dtype)
        for k in range(1, c.conv_width):
            u = u + full[:, -1 - k] * w[k]
        a, b = self._rglru_inputs(u)
        n = self.state_size
        h_f = recurrence_step(state["h"], a[..., :n], b[..., :n])
        h = jnp.concatenate([h_f, b[..., n:]], axis=-1)
        y = self.output(gate, h)
        return y, {"h": h_f, "conv": full[:, 1:].astype(F32)}


# ---------------------------------------------------------------------------------------------
# The LM
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm x), then (mlp_hidden > 0) x + mlp(norm x)."""
    cfg: SSMConfig
    bidirectional: bool

    def setup(self):
        c = self.cfg
        self.norm = layers.RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        mixer_cls = GatedSSM if c.mixer == "gated" else Hawk
        self.mixer = mixer_cls(c, self.bidirectional)
        if c.mlp_hidden:
            self.mlp_norm = layers.RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
            self.mlp = layers.MLP(c.mlp_hidden, c.mlp, dtype=c.dtype, param_dtype=c.param_dtype,
                                  init_std=c.init_std)

    def _mlp(self, x):
        if self.cfg.mlp_hidden:
            x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x

    def __call__(self, x, segment_ids, prefix, return_state: bool = False):
        C = self.cfg.block_chunk
        if C and x.shape[1] > C and not self.is_initializing():
            return self._chunked(x, segment_ids, prefix, return_state)
        out = self.mixer(self.norm(x), segment_ids_BxT=segment_ids, prefix_BxT=prefix,
                         return_state=return_state)
        y, state = out if return_state else (out, None)
        x = self._mlp(x + y.astype(x.dtype))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, state) if return_state else x

    def _chunked(self, x, segment_ids, prefix, return_state: bool):
        """The block in chunks of C = cfg.block_chunk positions (same result as one pass): norm,
        mixer inputs, a scan inside the chunk started from the carried state, output and MLP, so
        every intermediate is [B, C, ·] and the work per chunk is fixed (prefill time linear in T,
        no T-sized temporaries beyond the activations). A bidirectional layer sweeps forward
        (forward half) and then backward over the chunks (reverse half, then the output and MLP).
        The row is left-padded to a whole number of chunks with zero inputs in a segment of its
        own, which the segment masks keep out of every real position."""
        c = self.cfg
        C, Dh = c.block_chunk, c.dh
        B, T, _ = x.shape
        pad = (-T) % C
        n = (T + pad) // C
        if pad:
            x = jnp.concatenate([jnp.zeros((B, pad) + x.shape[2:], x.dtype), x], axis=1)
            segment_ids = jnp.concatenate(
                [jnp.broadcast_to(segment_ids[:, :1] - 1, (B, pad)), segment_ids], axis=1)
            prefix = jnp.concatenate([jnp.zeros((B, pad), bool), prefix], axis=1)
        start = segment_starts(segment_ids)[..., None]
        keep = reverse_keep(segment_ids, prefix)[..., None]

        def chunks(a):                                   # [B, n·C, ...] → [n, B, C, ...]
            return jnp.moveaxis(a.reshape((B, n, C) + a.shape[2:]), 1, 0)

        def unchunk(a):
            return jnp.moveaxis(a, 0, 1).reshape((B, n * C) + a.shape[3:])

        conv0 = None
        if c.mixer == "hawk":
            conv0 = (jnp.zeros((B, c.conv_width - 1, Dh), F32),
                     jnp.full((B, c.conv_width - 1), -1, segment_ids.dtype))
        n_fwd = Dh // 2 if self.bidirectional else Dh
        scan = functools.partial(nn.scan, variable_broadcast="params",
                                 split_rngs={"params": False})

        def forward(mdl, carry, xs):
            h0, conv = carry
            x_c, seg_c, start_c, keep_c = xs
            a, b, aux, conv = mdl.mixer.chunk_inputs(mdl.norm(x_c), seg_c, conv)
            a, b = a.astype(F32), b.astype(F32)
            a_f = jnp.where(start_c, 0.0, a[..., :n_fwd])
            h = linear_recurrence(a_f, b[..., :n_fwd], h0_BxD=h0)
            if not mdl.bidirectional:
                out = mdl._mlp(x_c + mdl.mixer.output(aux, h).astype(x_c.dtype))
                return (h[:, -1], conv), out
            a_r = jnp.where(keep_c, a[..., n_fwd:], 0.0)
            return (h[:, -1], conv), (h, a_r, b[..., n_fwd:], aux)

        xs = (chunks(x), chunks(segment_ids), chunks(start), chunks(keep))
        (h_last, conv), ys = scan(forward)(self, (jnp.zeros((B, n_fwd), F32), conv0), xs)
        if self.bidirectional:
            def backward(mdl, g0, xs):
                x_c, h_c, a_r, b_r, aux = xs
                g = linear_recurrence(a_r, b_r, reverse=True, h0_BxD=g0)
                y = mdl.mixer.output(aux, jnp.concatenate([h_c, g], axis=-1))
                return g[:, 0], mdl._mlp(x_c + y.astype(x_c.dtype))

            _, ys = scan(backward, reverse=True)(self, jnp.zeros((B, Dh - n_fwd), F32),
                                                 (chunks(x),) + ys)
        x = unchunk(ys)[:, pad:]
        if not return_state:
            return x
        state = {"h": h_last}
        if conv is not None:   # the last W−1 pre-conv inputs of the last sample (zeros before)
            buf, buf_seg = conv
            state["conv"] = jnp.where((buf_seg == segment_ids[:, -1:])[..., None], buf, 0.0)
        return x, state

    def init_state(self, batch: int):
        return self.mixer.init_state(batch)

    def step(self, x_BxD, state):
        y, state = self.mixer.step(self.norm(x_BxD), state)
        return self._mlp(x_BxD + y.astype(x_BxD.dtype)), state


class BiSSMLM(nn.Module):
    """tokens [B,T] → logits [B,T,V] float32, with recurrent decoding.

    segment_ids [B,T] (default all 1): packed samples never see each other.
    prefix [B,T] bool (default all False): the prompt positions that bidirectional layers read in
    both directions (Birdie's prefix; the start-generating token and the target are not prefix).
    """
    cfg: SSMConfig

    def setup(self):
        c = self.cfg
        self.embed = layers.Embed(c.vocab_size, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
                                  init_std=c.init_std)
        # remat: Block.__call__ under jax.checkpoint; its return_state (argument 4, self being 0)
        # is a Python bool, so static. Parameters are the same either way.
        block_cls = nn.remat(Block, static_argnums=(4,)) if c.remat else Block
        self.blocks = [block_cls(c, bidir) for bidir in c.bidirectional]
        self.final_norm = layers.RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if not c.tie_embeddings:
            self.lm_head = nn.DenseGeneral(
                c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                         ("embed", "vocab")))

    def _logits(self, x):
        """x [B,T,D] or [B,D] → float32 logits [B,T,V] or [B,V]."""
        squeeze = x.ndim == 2
        x = self.final_norm(x[:, None] if squeeze else x)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return (logits[:, 0] if squeeze else logits).astype(F32)

    def _check(self, tokens_BxT, segment_ids, prefix):
        chex.assert_rank(tokens_BxT, 2)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens_BxT.shape, jnp.int32)
        if prefix is None:
            prefix = jnp.zeros(tokens_BxT.shape, bool)
        chex.assert_shape([segment_ids, prefix], tokens_BxT.shape)
        return segment_ids, prefix.astype(bool)

    def __call__(self, tokens_BxT, *, segment_ids=None, prefix=None):
        segment_ids, prefix = self._check(tokens_BxT, segment_ids, prefix)
        x = nn.with_logical_constraint(self.embed(tokens_BxT), ("batch", "length", "embed"))
        for blk in self.blocks:
            x = blk(x, segment_ids, prefix, False)
        logits = self._logits(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def prefill(self, prompt_BxP, *, segment_ids=None):
        """Reads a prompt as the prefix: (logits [B,P,V], decode state after its last token).

        Every position of the last sample in each row is a prefix position (left padding in
        another segment id is allowed). Continue with `step` from the start-generating token.
        """
        segment_ids, _ = self._check(prompt_BxP, segment_ids, None)
        prefix = _last_segment_mask(segment_ids)
        x = self.embed(prompt_BxP)
        states = []
        for blk in self.blocks:
            x, s = blk(x, segment_ids, prefix, True)   # return_state, positional (remat: static)
            states.append(s)
        return self._logits(x), tuple(states)

    def init_state(self, batch: int):
        """The decode state of an empty prompt: per layer {'h': [B, Dh or Dh/2]} (+ 'conv')."""
        return tuple(blk.init_state(batch) for blk in self.blocks)

    def step(self, state, token_B):
        """One generated token: (logits [B,V] for the next one, new state)."""
        chex.assert_rank(token_B, 1)
        x = self.embed(token_B)
        new = []
        for blk, s in zip(self.blocks, state):
            x, s = blk.step(x, s)
            new.append(s)
        return self._logits(x), tuple(new)


def init_decode_state(cfg: SSMConfig, batch: int):
    """`BiSSMLM.init_state` without parameters."""
    out = []
    for bidir in cfg.bidirectional:
        n = cfg.dh // 2 if bidir else cfg.dh
        s = {"h": jnp.zeros((batch, n), F32)}
        if cfg.mixer == "hawk":
            s["conv"] = jnp.zeros((batch, cfg.conv_width - 1, cfg.dh), F32)
        out.append(s)
    return tuple(out)


def decode(model: BiSSMLM, params, tokens_BxT, prompt_len: int):
    """Teacher-forced decoding: prefill tokens[:, :P], then `step` through the rest.

    Returns logits [B,T,V] that equal `model.apply(params, tokens, prefix=pos < P)`.
    """
    B, T = tokens_BxT.shape
    variables = {"params": params}
    if prompt_len > 0:
        logits_p, state = model.apply(variables, tokens_BxT[:, :prompt_len], method=BiSSMLM.prefill)
    else:
        logits_p, state = jnp.zeros((B, 0, model.cfg.vocab_size), F32), init_decode_state(
            model.cfg, B)

    def body(state, tok):
        logits, state = model.apply(variables, state, tok, method=BiSSMLM.step)
        return state, logits

    _, logits_s = jax.lax.scan(body, state, jnp.moveaxis(tokens_BxT[:, prompt_len:], 1, 0))
    return jnp.concatenate([logits_p, jnp.moveaxis(logits_s, 0, 1)], axis=1)


def greedy_generate(model: BiSSMLM, params, prompt_BxP, first_token_B, num_tokens: int, *,
                    segment_ids=None):
    """Greedy continuation: prefill the prompt, feed `first_token` (start-generating), then the
    argmax each step. Returns tokens [B, num_tokens] (the generated ones, first_token excluded)."""
    variables = {"params": params}
    B = prompt_BxP.shape[0]
    if prompt_BxP.shape[1]:
        _, state = model.apply(variables, prompt_BxP, segment_ids=segment_ids,
                               method=BiSSMLM.prefill)
    else:
        state = init_decode_state(model.cfg, B)

    def body(carry, _):
        state, tok = carry
        logits, state = model.apply(variables, state, tok, method=BiSSMLM.step)
        nxt = jnp.argmax(logits, axis=-1).astype(tok.dtype)
        return (state, nxt), nxt

    _, out = jax.lax.scan(body, (state, first_token_B), None, length=num_tokens)
    return jnp.moveaxis(out, 0, 1)


def build_from_config(model_cfg: dict) -> BiSSMLM:
    """The trainer's builder (train/trainer.py MODELS['ssm']): a dict of SSMConfig fields
    (plus 'family') → BiSSMLM."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    d.pop("family", None)
    return BiSSMLM(SSMConfig.from_dict(d))
