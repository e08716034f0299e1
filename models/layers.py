"""Shared layers: embeddings, norms, MLPs, RoPE, dense causal attention (XLA, or cuDNN's fused
kernel).

Layouts: activations x [B, T, D]; attention heads [B, T, H, Dh]. Every parameter carries logical axis
names (see `train/sharding.py` for the rules that map them onto the mesh).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype

# The value used for masked-out attention scores: finite, so an all-masked row gives a uniform
# (not NaN) softmax that the caller can zero out.
MASK_VALUE = -1e30

# Std of the normal init of weight matrices and embeddings (GPT-2's 0.02, sized for D ≈ 768;
# ~1/√D trains small widths much faster on associative recall). Configs expose it as `init_std`.
DEFAULT_INIT_STD = 0.02


def check_init_std(value) -> None:
    """Raises ValueError unless `value` is a positive number (a config's `init_std`)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
            or not value > 0):
        raise ValueError(f"init_std={value!r} must be a positive number")


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rescaling of RoPE's frequencies for context extension (Hugging Face's `rope_scaling`).

    kind 'linear': every frequency divided by `factor` (positions interpolated);
    kind 'llama3': Llama 3.1's — wavelengths longer than original_max_positions / low_freq_factor
    divided by `factor`, shorter than original_max_positions / high_freq_factor kept, a smooth
    blend between.
    """
    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling kind={self.kind!r} is not allowed; use 'linear' or "
                             "'llama3'")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling factor={self.factor!r} must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope_scaling high_freq_factor={self.high_freq_factor!r} must be "
                             f"> low_freq_factor={self.low_freq_factor!r}")

    def apply(self, inv_freq: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return inv_freq / self.factor
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = ((self.original_max_positions / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)


def rope_frequencies(dim: int, base: float = 10000.0,
                     scaling: Optional[RopeScaling] = None) -> jax.Array:
    """inv_freq [dim/2] = base^(-2i/dim), computed in float32 as the official landmark code does,
    then rescaled by `scaling` if given."""
    if dim % 2:
        raise ValueError(f"head_dim={dim} must be even for RoPE")
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)
    inv_freq = jnp.float32(base) ** (-exponent)
    return inv_freq if scaling is None else scaling.apply(inv_freq)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
               interleaved: bool = True, scaling: Optional[RopeScaling] = None) -> jax.Array:
    """Rotates x [B, T, H, D] by positions [T] or [B, T].

    `interleaved=True` rotates pairs (x0, x1), (x2, x3), ... (GPT-NeoX-J / official landmark code);
    `interleaved=False` rotates (x_i, x_{i+D/2}) (half rotation, as Llama). Frequencies are float32,
    then cast to x's dtype, so float64 runs match the official code bit for bit in the angles.
    """
    chex.assert_rank(x, 4)
    B, T, H, D = x.shape
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    if positions.shape[-1] != T:
        raise ValueError(f"positions has length {positions.shape[-1]}, x has T={T}")
    inv_freq = rope_frequencies(D, base, scaling).astype(x.dtype)                 # [D/2]
    angles = positions.astype(x.dtype)[..., None] * inv_freq              # [B|1, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]                                  # [B|1, T, 1, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        r1 = x1 * cos - x2 * sin
        r2 = x1 * sin + x2 * cos
        return jnp.stack([r1, r2], axis=-1).reshape(x.shape)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


# ---------------------------------------------------------------------------------------------
# Norms, embeddings, MLPs
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * scale; statistics in float32."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and, if `use_bias`, a bias (GPT-2's); without one it is the official
    landmark GPT's. Statistics in float32."""
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    ("embed",)),
                               (x.shape[-1],), self.param_dtype)
        return y.astype(self.dtype)


def make_norm(kind: str, *, eps: float, dtype, param_dtype, name: str,
              use_bias: bool = False) -> nn.Module:
    """RMSNorm ('rmsnorm', never a bias) or LayerNorm ('layernorm', a bias if `use_bias`)."""
    if kind == "rmsnorm":
        return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "layernorm":
        return LayerNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                         name=name)
    raise ValueError(f"norm={kind!r} is not allowed; use 'rmsnorm' or 'layernorm'")


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives the tied output projection."""
    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD

    def setup(self):
        init = nn.initializers.normal(stddev=self.init_std)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, tokens_BxT):
        # The table whole along D (under fsdp: gathered, as every weight is) so that the lookup
        # keeps the tokens' batch sharding instead of gathering the whole batch's tokens.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD):
        return jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding.astype(self.dtype))


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


MLP_KINDS = ("gelu", "gelu_tanh", "swiglu", "geglu")


class MLP(nn.Module):
    """GELU (x → W2 gelu(W1 x)), SwiGLU (x → W2 (silu(Wg x) ⊙ W1 x)) or GeGLU (x → W2 (gelu(Wg x)
    ⊙ W1 x), Griffin's gated MLP); biases if `use_bias`.

    x [..., D] → [..., D]; a [B, T, D] input's hidden activations are constrained to the logical
    axes (batch, length, mlp)."""
    hidden: int
    kind: str = "gelu"            # 'gelu' (exact), 'gelu_tanh', 'swiglu' or 'geglu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD  # normal init of the kernels
    kernel_init: Optional[Callable] = None   # replaces the normal(init_std) init (MAC: fan-in)
    use_bias: bool = False                   # GPT-2's biases (zero-initialised)

    @nn.compact
    def __call__(self, x_BxTxD):
        D = x_BxTxD.shape[-1]
        init = self.kernel_init or nn.initializers.normal(stddev=self.init_std)
        dense = lambda n, shape_names, name: nn.DenseGeneral(  # noqa: E731
            n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(init, shape_names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, shape_names[1:]))
        h = dense(self.hidden, ("embed", "mlp"), "fc_in")(x_BxTxD)
        if self.kind == "gelu":
            h = gelu_exact(h)
        elif self.kind == "gelu_tanh":
            h = jax.nn.gelu(h, approximate=True)
        elif self.kind in ("swiglu", "geglu"):
            g = dense(self.hidden, ("embed", "mlp"), "fc_gate")(x_BxTxD)
            h = (jax.nn.silu(g) if self.kind == "swiglu" else gelu_exact(g)) * h
        else:
            raise ValueError(f"mlp={self.kind!r} is not allowed; use one of {MLP_KINDS}")
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(D, ("mlp", "embed"), "fc_out")(h)


# ---------------------------------------------------------------------------------------------
# Dense causal attention (the baseline every attention is compared against)
# ---------------------------------------------------------------------------------------------
def causal_mask(q_len: int, k_len: int, *, offset: int = 0, window: int = 0) -> jax.Array:
    """[q_len, k_len] bool: query i (at absolute index offset+i) sees keys j ≤ offset+i; with
    window > 0 only the last `window` of them (j > offset+i − window: sliding-window
    attention)."""
    qi = jnp.arange(q_len)[:, None] + offset
    kj = jnp.arange(k_len)[None, :]
    mask = kj <= qi
    return mask & (kj > qi - window) if window else mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          causal: bool = True,
                          q_offset=0,
                          segment_ids: Optional[jax.Array] = None,
                          prompt: Optional[jax.Array] = None,
                          prefix_k: Optional[jax.Array] = None,
                          prefix_v: Optional[jax.Array] = None,
                          prefix_mask: Optional[jax.Array] = None,
                          window: int = 0,
                          key_valid: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention, q, k, v [B, T, H, Dh] → [B, T, H, Dh]; scores and softmax in float32.

    q_offset (int or int32 scalar, causal only): the queries sit at key positions q_offset..
    q_offset+T-1 of k and v, which may be longer than q (KV-cache decoding: keys past the last
    query are masked).
    segment_ids [B, T]: packed samples attend only within their segment.
    prompt [B, T] bool (causal only): prefix-LM attention, the prompt positions also see every
    later prompt position (of their own segment); the positions after it stay causal.
    prefix_k/prefix_v [B, P, H, Dh] with prefix_mask [B, P] (True = visible): extra keys every query
    sees (P-tuning v2 prefixes for MAC). A row with no visible key returns zeros.
    window (int, causal only; 0: off): each query sees only the `window` most recent keys, itself
    included (sliding-window attention; with `prompt`, the prompt's bidirectional part is kept).
    key_valid [B or 1, S] bool: keys marked False are never attended (a ring cache's empty slots).
    """
    chex.assert_rank([q, k, v], 4)
    if window and not causal:
        raise ValueError(f"window={window} (sliding-window attention) needs causal=True")
    B, T, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    acc = jnp.promote_types(jnp.float32, q.dtype)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    mask = jnp.ones((B, 1, T, k.shape[1]), bool)
    if causal:
        mask = mask & causal_mask(T, k.shape[1], offset=q_offset, window=window)[None, None]
        if prompt is not None:
            chex.assert_shape(prompt, (B, T))
            mask = mask | (prompt[:, None, :, None] & prompt[:, None, None, :])
    elif prompt is not None:
        raise ValueError("prompt (prefix-LM attention) needs causal=True")
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if prefix_k is not None:
        if prefix_v is None or prefix_mask is None:
            raise ValueError("prefix_k needs prefix_v and prefix_mask")
        sp = jnp.einsum("bqhd,bkhd->bhqk", q, prefix_k, preferred_element_type=acc) * scale
        s = jnp.concatenate([sp, s], axis=-1)
        pm = jnp.broadcast_to(prefix_mask[:, None, None, :], (B, 1, T, prefix_k.shape[1]))
        mask = jnp.concatenate([pm, mask], axis=-1)
        v = jnp.concatenate([prefix_v, v], axis=1)
    s = jnp.where(mask, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask.any(-1, keepdims=True), p, 0.0)
    y = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
    return y.astype(q.dtype)


# Implementations of the dense causal attention (TransformerConfig.attention_impl): "xla" is
# `dot_product_attention` above (the [B, H, T, T] scores materialised); "cudnn" is cuDNN's fused
# flash attention through `jax.nn.dot_product_attention` (GPUs; bfloat16 or float16); "splash"
# is the Pallas TPU splash attention (jax.experimental.pallas.ops.tpu; Mosaic); "auto" is cudnn
# on the gpu backend and splash on the tpu backend where they serve the call, else "xla".
DENSE_IMPLS = ("xla", "cudnn", "splash", "auto")
KERNEL_BACKENDS = {"cudnn": "gpu", "splash": "tpu"}
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128     # and a multiple of 8 (every cuDNN GPU; Hopper also takes 256)
SPLASH_BLOCKS = (512, 256, 128)   # the splash kernel's tile: the largest of these dividing T


def target_backend() -> str:
    """The platform ("cpu", "gpu", "tpu") a computation being traced is for: that of the mesh set
    by `jax.sharding.use_abstract_mesh` or `jax.set_mesh` (the trainer sets one; a dry run's
    is over compile-only GPU or TPU devices while the host's backend is the CPU), else
    `jax.default_backend()`."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return getattr(device, "platform", None) or jax.default_backend()


def dense_attention(impl: str) -> Callable:
    """The dense causal attention function of `impl` (DENSE_IMPLS): `dot_product_attention`
    for "xla", else `fused_attention` with that impl."""
    if impl not in DENSE_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not allowed; use one of {DENSE_IMPLS}")
    if impl == "xla":
        return dot_product_attention
    return functools.partial(fused_attention, impl=impl)


def cudnn_serves(dtype, head_dim: int) -> str:
    """'' when cuDNN's flash attention takes heads of this dtype and size, else why not."""
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"dtype={jnp.dtype(dtype).name} (cuDNN takes {' or '.join(CUDNN_DTYPES)})"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return (f"head_dim={head_dim} (cuDNN takes a multiple of 8 up to "
                f"{CUDNN_MAX_HEAD_DIM})")
    return ""


def splash_serves(seq_len: int) -> str:
    """'' when the splash kernel tiles a row of `seq_len` tokens, else why not."""
    if seq_len % SPLASH_BLOCKS[-1]:
        return f"seq_len={seq_len} (the splash kernel takes multiples of {SPLASH_BLOCKS[-1]})"
    return ""


def dense_kernel(impl: str, backend: str, *, dtype, head_dim: int, seq_len: int,
                 segments: bool = False, interpret: bool = False) -> tuple[str, str]:
    """(kernel, why) for causal self-attention over whole rows of `seq_len` tokens: the kernel
    `impl` names ("cudnn", "splash"; under "auto" the `backend`'s, "xla" where it has none) and
    '' when that kernel takes these heads (`segments`: packed rows), else why not. interpret:
    the kernel's reference (`fused_attention`), for which cuDNN's dtype and size limits do not
    hold."""
    if impl == "auto":
        kernel = {b: name for name, b in KERNEL_BACKENDS.items()}.get(backend, "xla")
    elif impl in KERNEL_BACKENDS:
        kernel = impl
    else:
        raise ValueError(f"impl={impl!r} is not allowed; use one of "
                         f"{tuple(KERNEL_BACKENDS) + ('auto',)}")
    if kernel == "splash":
        return kernel, splash_serves(seq_len)
    if kernel == "cudnn":
        if segments:
            return kernel, "segment_ids (the kernel runs causal self-attention)"
        return kernel, "" if interpret else cudnn_serves(dtype, head_dim)
    return kernel, ""


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
                    interpret: bool = False, causal: bool = True, q_offset=0,
                    segment_ids: Optional[jax.Array] = None,
                    prompt: Optional[jax.Array] = None,
                    prefix_k: Optional[jax.Array] = None,
                    prefix_v: Optional[jax.Array] = None,
                    prefix_mask: Optional[jax.Array] = None,
                    window: int = 0,
                    key_valid: Optional[jax.Array] = None) -> jax.Array:
    """`dot_product_attention`'s contract, with the training layout (causal self-attention over
    the whole row, optionally sliding-window) through a fused kernel: no [B, H, T, T] scores in
    memory, and the blocks above the diagonal (or outside the window) skipped.
    - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the window as its
      local_window_size (window - 1, 0); no packed rows.
    - "splash": the Pallas TPU splash attention with a causal (or local) mask, packed rows as
      its segment ids, under `shard_map` over the batch and heads where a mesh is set.
    impl "cudnn" / "splash": that kernel, or a ValueError on another backend (the kernel's: gpu,
    tpu) and for calls it does not serve (prompt, prefix keys, non-causal attention; cuDNN:
    segment_ids and `cudnn_serves`; splash: `splash_serves`). "auto": the backend's kernel where
    it serves the call, else `dot_product_attention`. Under every impl, decoding (a KV cache:
    q_offset other than 0, keys longer than the queries, key_valid) runs `dot_product_attention`:
    one new token against the cache leaves nothing to fuse.
    interpret: run the kernel's reference on any backend (tests on CPU): splash in Pallas
    interpret mode, cuDNN's call through jax's unfused implementation ("xla") of it (which takes
    float32 and any head size)."""
    xla = functools.partial(dot_product_attention, q, k, v, causal=causal, q_offset=q_offset,
                            segment_ids=segment_ids, prompt=prompt, prefix_k=prefix_k,
                            prefix_v=prefix_v, prefix_mask=prefix_mask, window=window,
                            key_valid=key_valid)
    if (key_valid is not None or q.shape[1] != k.shape[1] or not isinstance(q_offset, int)
            or q_offset != 0):
        return xla()
    backend = target_backend()
    kernel, why = dense_kernel(impl, backend, dtype=q.dtype, head_dim=q.shape[-1],
                               seq_len=q.shape[1], segments=segment_ids is not None,
                               interpret=interpret)
    if kernel == "xla":
        return xla()
    unfused = [name for name, x in (("prompt", prompt), ("prefix_k", prefix_k)) if x is not None]
    if not causal:
        unfused.append("causal=False")
    if unfused:
        why = f"{unfused[0]} (the kernel runs causal self-attention)"
    runs_here = interpret or backend == KERNEL_BACKENDS[kernel]
    if impl != "auto":
        if not runs_here:
            raise ValueError(f"attention_impl={impl!r} needs the {KERNEL_BACKENDS[impl]} "
                             f"backend, not {backend}; use 'auto' (the backend's kernel, else "
                             "xla) or 'xla'")
        if why:
            raise ValueError(f"attention_impl={impl!r} is not allowed with {why}; use 'auto' "
                             "(xla where the kernel does not serve) or 'xla'")
    if why or not runs_here:
        return xla()
    if kernel == "cudnn":
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         local_window_size=(window - 1, 0) if window else None,
                                         implementation="xla" if interpret else "cudnn")
        return y.astype(q.dtype)
    kernel_fn = functools.partial(_splash, window=window, interpret=interpret)
    return per_shard(kernel_fn, q, k, v, segment_ids)


def _splash(q, k, v, *, segment_ids=None, window: int = 0, interpret: bool = False):
    """The splash kernel on q, k, v [B, T, H, Dh] (one device's shard): causal, or local with
    `window`; segment_ids [B, T] keep packed rows apart."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    B, T, H, Dh = q.shape
    b = next(b for b in SPLASH_BLOCKS if T % b == 0)
    mask = (sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0) if window
            else sm.CausalMask((T, T)))
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * H), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)     # noqa: E731  [B, H, T, Dh]
    q = heads_first(q) * jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)   # the kernel does not scale
    k, v = heads_first(k), heads_first(v)
    if segment_ids is None:
        y = jax.vmap(kernel)(q, k, v)
    else:
        y = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
            q, k, v, segment_ids)
    return heads_first(y).astype(q.dtype)


def per_shard(kernel, q, k, v, segment_ids):
    """kernel(q, k, v, segment_ids=...) on each device's shard of the batch and heads when a mesh
    with more than one device is set (`jax.set_mesh` / `use_abstract_mesh`): a `pallas_call` is
    not partitioned by the compiler, so it runs under `shard_map` with q, k, v split as the
    logical axes 'batch' and 'heads' say (flax's current rules; an axis that does not divide
    stays whole). Without such a mesh: kernel(...) as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids=segment_ids)
    B, _, H, _ = q.shape
    axes = []
    for name, n in zip(("batch", "heads"), (B, H)):
        a = nn.logical_to_mesh_axes((name,))[0]
        size = math.prod(mesh.shape[x] for x in ((a,) if isinstance(a, str) else a or ()))
        axes.append(a if n % size == 0 else None)
    spec = jax.sharding.PartitionSpec(axes[0], None, axes[1], None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, segment_ids=None), mesh=mesh,
                             in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
    seg_spec = jax.sharding.PartitionSpec(axes[0], None)
    return jax.shard_map(lambda q, k, v, s: kernel(q, k, v, segment_ids=s), mesh=mesh,
                         in_specs=(spec,) * 3 + (seg_spec,), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------
# Bidirectional attention with a key mask (MAC's encoders and aggregation)
# ---------------------------------------------------------------------------------------------
def masked_attention(q, k, v, key_mask=None):
    """q [..., Tq, H, Dh], k/v [..., S, H, Dh], key_mask [..., S] bool → [..., Tq, H, Dh].

    Scores and softmax in float32; a row with no visible key returns zeros. Leading axes
    broadcast (a bank shared by every question has batch 1; hierarchical chunks add an axis).
    """
    acc = jnp.promote_types(jnp.float32, q.dtype)
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=acc)
    s = s / math.sqrt(q.shape[-1])
    if key_mask is not None:
        m = key_mask[..., None, None, :]
        s = jnp.where(m, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    if key_mask is not None:
        p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    y = jnp.einsum("...hqk,...khd->...qhd", p.astype(v.dtype), v)
    return y.astype(q.dtype)


def unbox(tree):
    """A param tree without Flax's partitioning boxes (`nn.with_logical_partitioning`)."""
    return nn.meta.unbox(tree)
