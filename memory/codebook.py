"""Discrete key-value bottleneck codebooks (Träuble et al. 2023, "Discrete Key-Value Bottleneck").

A `Codebooks` pytree holds C codebooks. Codebook c has a fixed random projection
`projection_CxDxDk[c]` from the encoder's D-dim embedding to d_k, K frozen keys `keys_CxKxDk[c]`
and K trainable values `values_CxKxDv[c]`, plus how often each key was fetched while values were
trained (`usage_CxK`). Everything here is a pure function: a codebook goes into jit and comes out
of it; nothing is mutated in place.

Life cycle (paper Sec. 3 and Alg. 1):
1. `random_projection` — one Gaussian D x d_k matrix per codebook, unit-norm columns, frozen.
2. `init_keys_ema` — keys learnt by EMA vector quantisation (decay 0.95) on unlabelled data from
   *another* distribution, with dead-key replacement; frozen afterwards.
3. values start at zero and are the only thing trained (`models/kv_bottleneck.py`,
   `train/objectives/dkvb.py`); `count_usage` records which keys were fetched.
4. at test time `nearest_keys(..., mask_CxK=used_mask(usage))` snaps an input to its nearest
   *used* key, as the official code does.

`nearest_keys` computes squared L2 distances codebook-chunk by codebook-chunk, so the full
[B, C, K] distance tensor never exists at once (C=256, K=4096, B=256 would be 1 GiB in float32).
"""
from __future__ import annotations

import functools

import chex
import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Codebooks:
    """C codebooks of K (frozen key, trainable value) pairs.

    Attributes:
      projection_CxDxDk: fixed random projection per codebook, D = embedding dim (never trained).
      keys_CxKxDk: keys (frozen after `init_keys_ema`).
      values_CxKxDv: values, the only trainable part; zero at initialisation.
      usage_CxK: int32 count of how often each key was fetched during value training.
    """

    projection_CxDxDk: jax.Array
    keys_CxKxDk: jax.Array
    values_CxKxDv: jax.Array
    usage_CxK: jax.Array

    @property
    def num_codebooks(self) -> int:
        return self.keys_CxKxDk.shape[0]

    @property
    def num_keys(self) -> int:
        return self.keys_CxKxDk.shape[1]

    @property
    def key_dim(self) -> int:
        return self.keys_CxKxDk.shape[2]

    @property
    def value_dim(self) -> int:
        return self.values_CxKxDv.shape[2]

    @property
    def embed_dim(self) -> int:
        return self.projection_CxDxDk.shape[1]


def _check_positive(**fields) -> None:
    for name, v in fields.items():
        if not isinstance(v, (int,)) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive int")


# --------------------------------------------------------------------------- projection


def random_projection(rng: jax.Array, embed_dim: int, num_codebooks: int,
                      key_dim: int) -> jax.Array:
    """[C, D, d_k] Gaussian projection per codebook; each column has unit L2 norm over D.

    The paper projects the encoder output with a fixed random matrix per codebook (Sec. 3,
    "partitioning"); unit-norm columns keep every projected coordinate on the scale of the
    embedding, whatever D is.
    """
    _check_positive(embed_dim=embed_dim, num_codebooks=num_codebooks, key_dim=key_dim)
    w_CxDxDk = jax.random.normal(rng, (num_codebooks, embed_dim, key_dim), jnp.float32)
    return w_CxDxDk / jnp.linalg.norm(w_CxDxDk, axis=1, keepdims=True)


def project(z_BxD: jax.Array, projection_CxDxDk: jax.Array) -> jax.Array:
    """[B, D] embeddings -> [B, C, d_k] one query per codebook (float32)."""
    chex.assert_rank(z_BxD, 2)
    chex.assert_rank(projection_CxDxDk, 3)
    if z_BxD.shape[1] != projection_CxDxDk.shape[1]:
        raise ValueError(
            f"embedding dim z.shape[1]={z_BxD.shape[1]} does not match the projection's input dim "
            f"{projection_CxDxDk.shape[1]}")
    return jnp.einsum("bd,cdk->bck", z_BxD.astype(jnp.float32), projection_CxDxDk,
                      precision=jax.lax.Precision.HIGHEST)


def init_codebooks(rng: jax.Array, *, embed_dim: int, num_codebooks: int, num_keys: int,
                   key_dim: int, value_dim: int) -> Codebooks:
    """Codebooks with a random projection, keys ~ N(0, 1) (to be replaced by `init_keys_ema`),
    zero values and zero usage."""
    _check_positive(embed_dim=embed_dim, num_codebooks=num_codebooks, num_keys=num_keys,
                    key_dim=key_dim, value_dim=value_dim)
    rp, rk = jax.random.split(rng)
    return Codebooks(
        projection_CxDxDk=random_projection(rp, embed_dim, num_codebooks, key_dim),
        keys_CxKxDk=jax.random.normal(rk, (num_codebooks, num_keys, key_dim), jnp.float32),
        values_CxKxDv=jnp.zeros((num_codebooks, num_keys, value_dim), jnp.float32),
        usage_CxK=jnp.zeros((num_codebooks, num_keys), jnp.int32),
    )


# --------------------------------------------------------------------------- lookup


def squared_distances(q_BxCxDk: jax.Array, keys_CxKxDk: jax.Array) -> jax.Array:
    """Dense [B, C, K] squared L2 distances ||q - k||^2 (the naive baseline; O(B*C*K) memory)."""
    q = q_BxCxDk.astype(jnp.float32)
    k = keys_CxKxDk.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    cross_BxCxK = jnp.einsum("bcd,ckd->bck", q, k, precision=hp)
    return (jnp.sum(q * q, -1)[:, :, None] - 2.0 * cross_BxCxK + jnp.sum(k * k, -1)[None])


def _check_lookup_args(q_BxCxDk, keys_CxKxDk, mask_CxK, top_k):
    chex.assert_rank(q_BxCxDk, 3)
    chex.assert_rank(keys_CxKxDk, 3)
    C, K, Dk = keys_CxKxDk.shape
    if q_BxCxDk.shape[1:] != (C, Dk):
        raise ValueError(f"queries have shape {q_BxCxDk.shape}; expected [B, C={C}, d_k={Dk}]")
    if mask_CxK is not None:
        chex.assert_shape(mask_CxK, (C, K))
    if not isinstance(top_k, int) or not 1 <= top_k <= K:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, K={K}]")


def naive_nearest_keys(q_BxCxDk: jax.Array, keys_CxKxDk: jax.Array,
                       mask_CxK: jax.Array | None = None) -> jax.Array:
    """Top-1 lookup through the dense [B, C, K] distance tensor (benchmark/test baseline)."""
    _check_lookup_args(q_BxCxDk, keys_CxKxDk, mask_CxK, 1)
    d_BxCxK = squared_distances(q_BxCxDk, keys_CxKxDk)
    if mask_CxK is not None:
        d_BxCxK = jnp.where(mask_CxK[None], d_BxCxK, jnp.inf)
    return jnp.argmin(d_BxCxK, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_k", "chunk"))
def nearest_keys(q_BxCxDk: jax.Array, keys_CxKxDk: jax.Array, mask_CxK: jax.Array | None = None,
                 *, top_k: int = 1, chunk: int = 8) -> jax.Array:
    """Index of the nearest key (squared L2) in each codebook, `chunk` codebooks at a time.

    Args:
      q_BxCxDk: projected queries.
      keys_CxKxDk: keys.
      mask_CxK: optional bool; False keys are never returned (test-time "nearest used key").
        A codebook whose mask is all False returns index 0 for every query.
      top_k: number of nearest keys to return.
      chunk: codebooks per step; peak scratch memory is about B * chunk * K floats.

    Returns:
      idx_BxC (int32) when top_k == 1, else idx_BxCxk ordered nearest first.
    """
    _check_lookup_args(q_BxCxDk, keys_CxKxDk, mask_CxK, top_k)
    C, K, _ = keys_CxKxDk.shape
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int")
    if mask_CxK is None:
        mask_CxK = jnp.ones((C, K), bool)
    q_CxBxDk = jnp.swapaxes(q_BxCxDk, 0, 1)

    def one_codebook(args):
        q_BxDk, k_KxDk, m_K = args
        q_BxDk = q_BxDk.astype(jnp.float32)
        k_KxDk = k_KxDk.astype(jnp.float32)
        d_BxK = (jnp.sum(q_BxDk * q_BxDk, -1)[:, None]
                 - 2.0 * jnp.dot(q_BxDk, k_KxDk.T, precision=jax.lax.Precision.HIGHEST)
                 + jnp.sum(k_KxDk * k_KxDk, -1)[None])
        d_BxK = jnp.where(m_K[None], d_BxK, jnp.inf)
        if top_k == 1:
            return jnp.argmin(d_BxK, axis=-1).astype(jnp.int32)
        _, idx_Bxk = jax.lax.top_k(-d_BxK, top_k)
        return idx_Bxk.astype(jnp.int32)

    # lax.map with batch_size vmaps `chunk` codebooks per step: only B x chunk x K distances live.
    idx_Cx = jax.lax.map(one_codebook, (q_CxBxDk, keys_CxKxDk, mask_CxK), batch_size=min(chunk, C))
    return jnp.swapaxes(idx_Cx, 0, 1)


def fetch(values_CxKxDv: jax.Array, idx_BxC: jax.Array) -> jax.Array:
    """[B, C, d_v] values of the selected keys. Its gradient w.r.t. the values is a scatter-add,
    so keys that no item fetched get exactly zero gradient."""
    chex.assert_rank(values_CxKxDv, 3)
    chex.assert_rank(idx_BxC, 2)
    C = values_CxKxDv.shape[0]
    return values_CxKxDv[jnp.arange(C)[None, :], idx_BxC]


def count_usage(usage_CxK: jax.Array, idx_BxC: jax.Array,
                weight_B: jax.Array | None = None) -> jax.Array:
    """Adds one to `usage_CxK[c, idx[b, c]]` for every item b (with weight_B != 0 if given)."""
    C, K = usage_CxK.shape
    chex.assert_shape(idx_BxC, (None, C))
    ones_BxC = jnp.ones(idx_BxC.shape, usage_CxK.dtype)
    if weight_B is not None:
        ones_BxC = ones_BxC * (weight_B[:, None] != 0).astype(usage_CxK.dtype)
    counts_CxK = jax.vmap(lambda i, w: jnp.zeros((K,), usage_CxK.dtype).at[i].add(w),
                          in_axes=(1, 1))(idx_BxC, ones_BxC)
    return usage_CxK + counts_CxK


def used_mask(usage_CxK: jax.Array) -> jax.Array:
    """Bool [C, K]: keys fetched at least once while values were trained. A codebook that was
    never used at all keeps every key allowed, so a lookup there stays defined."""
    used = usage_CxK > 0
    return jnp.where(jnp.any(used, axis=1, keepdims=True), used, True)


# --------------------------------------------------------------------------- key init


@flax.struct.dataclass
class EMAState:
    """Running EMA k-means statistics. Invariant: keys == embed_sum / cluster_size (smoothed),
    so keys are never shrunk by a size/sum mismatch (the bug after a k-means start in the
    official code and in vector-quantize-pytorch, which copy the keys into the sums but the counts
    into the sizes)."""

    keys_CxKxDk: jax.Array
    cluster_size_CxK: jax.Array
    embed_sum_CxKxDk: jax.Array
    num_replaced: jax.Array  # int32 scalar: dead keys replaced so far


def _assign_stats(z_BxCxDk, keys_CxKxDk, weight_B, chunk):
    K = keys_CxKxDk.shape[1]
    idx_BxC = nearest_keys(z_BxCxDk, keys_CxKxDk, chunk=chunk)
    w = weight_B.astype(jnp.float32)
    counts_CxK = jax.vmap(lambda i: jnp.zeros((K,), jnp.float32).at[i].add(w), in_axes=1)(idx_BxC)
    sums_CxKxDk = jax.vmap(
        lambda i, z: jnp.zeros((K, z.shape[-1]), jnp.float32).at[i].add(z * w[:, None]),
        in_axes=(1, 1))(idx_BxC, z_BxCxDk.astype(jnp.float32))
    return idx_BxC, counts_CxK, sums_CxKxDk


def ema_state_from_keys(keys_CxKxDk: jax.Array,
                        cluster_size_CxK: jax.Array | None = None) -> EMAState:
    """EMA state whose sums are consistent with `keys` (embed_sum = keys * cluster_size)."""
    if cluster_size_CxK is None:
        cluster_size_CxK = jnp.ones(keys_CxKxDk.shape[:2], jnp.float32)
    cs = jnp.maximum(cluster_size_CxK.astype(jnp.float32), 1e-3)
    return EMAState(keys_CxKxDk=keys_CxKxDk.astype(jnp.float32), cluster_size_CxK=cs,
                    embed_sum_CxKxDk=keys_CxKxDk.astype(jnp.float32) * cs[..., None],
                    num_replaced=jnp.zeros((), jnp.int32))


def ema_step(state: EMAState, z_BxCxDk: jax.Array, rng: jax.Array, *, decay: float = 0.95,
             dead_threshold: float = 0.0, weight_B: jax.Array | None = None,
             chunk: int = 8) -> EMAState:
    """One EMA vector-quantisation step on a batch, then dead-key replacement.

    cluster_size <- decay * cluster_size + (1 - decay) * counts
    embed_sum    <- decay * embed_sum    + (1 - decay) * sum of assigned queries
    keys         <- embed_sum / cluster_size
    Keys whose EMA cluster size is below `dead_threshold` are moved onto random batch items, and
    their statistics reset consistently (size = 1, sum = the item).
    """
    B = z_BxCxDk.shape[0]
    if weight_B is None:
        weight_B = jnp.ones((B,), jnp.float32)
    _, counts_CxK, sums_CxKxDk = _assign_stats(z_BxCxDk, state.keys_CxKxDk, weight_B, chunk)
    cs = decay * state.cluster_size_CxK + (1.0 - decay) * counts_CxK
    es = decay * state.embed_sum_CxKxDk + (1.0 - decay) * sums_CxKxDk
    # A key with no assignment keeps its position: its size and sum decay by the same factor.
    keys = es / jnp.maximum(cs, 1e-12)[..., None]

    C, K, _ = keys.shape
    dead_CxK = cs < dead_threshold
    # Replacement candidates: random items of this batch (only items with weight > 0).
    logits_B = jnp.where(weight_B > 0, 0.0, -jnp.inf)
    pick_CxK = jax.random.categorical(rng, logits_B, shape=(C, K))
    cand_CxKxDk = jnp.swapaxes(z_BxCxDk, 0, 1)[jnp.arange(C)[:, None], pick_CxK].astype(jnp.float32)
    keys = jnp.where(dead_CxK[..., None], cand_CxKxDk, keys)
    cs = jnp.where(dead_CxK, 1.0, cs)
    es = jnp.where(dead_CxK[..., None], cand_CxKxDk, es)
    return EMAState(keys_CxKxDk=keys, cluster_size_CxK=cs, embed_sum_CxKxDk=es,
                    num_replaced=state.num_replaced + jnp.sum(dead_CxK).astype(jnp.int32))


SEEDINGS = ("kmeans++", "random")


def kmeans_plus_plus(rng: jax.Array, z_NxDk: jax.Array, num_keys: int) -> jax.Array:
    """[K, d_k] k-means++ seeds: each next seed is a data point drawn with probability
    proportional to its squared distance to the nearest seed so far (Arthur & Vassilvitskii)."""
    N = z_NxDk.shape[0]
    r0, r = jax.random.split(rng)
    first = z_NxDk[jax.random.randint(r0, (), 0, N)]
    keys = jnp.zeros((num_keys, z_NxDk.shape[1]), jnp.float32).at[0].set(first)
    d2_N = jnp.sum((z_NxDk - first) ** 2, -1)

    def body(i, carry):
        keys, d2_N = carry
        # All-zero distances (fewer distinct points than keys) give uniform logits.
        j = jax.random.categorical(jax.random.fold_in(r, i), jnp.log(jnp.maximum(d2_N, 1e-30)))
        keys = keys.at[i].set(z_NxDk[j])
        return keys, jnp.minimum(d2_N, jnp.sum((z_NxDk - z_NxDk[j]) ** 2, -1))

    keys, _ = jax.lax.fori_loop(1, num_keys, body, (keys, d2_N))
    return keys


def kmeans_step(keys_CxKxDk: jax.Array, z_NxCxDk: jax.Array, *, chunk: int = 8):
    """One Lloyd iteration (keys with no points stay). Returns (keys, counts_CxK)."""
    w = jnp.ones((z_NxCxDk.shape[0],), jnp.float32)
    _, counts_CxK, sums_CxKxDk = _assign_stats(z_NxCxDk, keys_CxKxDk, w, chunk)
    means = sums_CxKxDk / jnp.maximum(counts_CxK, 1.0)[..., None]
    return jnp.where((counts_CxK > 0)[..., None], means, keys_CxKxDk), counts_CxK


def init_keys_ema(rng: jax.Array, z_NxCxDk: jax.Array, *, num_keys: int, decay: float = 0.95,
                  epochs: int = 10, batch_size: int = 256, kmeans_iters: int = 0,
                  dead_fraction: float = 0.1, chunk: int = 8,
                  seeding: str = "kmeans++") -> EMAState:
    """Learns [C, K, d_k] keys by EMA vector quantisation on projected unlabelled data.

    Keys start on data points chosen per codebook by k-means++ seeding (`seeding="kmeans++"`,
    K sequential passes over N points, so O(K * N * C * d_k); use `seeding="random"` for very
    large K * N) or uniformly at random (`"random"`). Optionally `kmeans_iters` Lloyd
    iterations on all of `z` come first (a k-means start); the EMA statistics are then seeded
    consistently (sum = key * count) so the EMA steps that follow do not shrink the keys. Then
    `epochs` passes of EMA steps over shuffled batches; a key whose EMA cluster size drops below
    `dead_fraction` times the mean size of a key (batch_size / K) is replaced by a batch item.

    Args:
      z_NxCxDk: projected data (`project(embeddings, projection)`), from a distribution other than
        the one the values are trained on.
    Returns the final EMAState; `.keys_CxKxDk` are the keys.
    """
    chex.assert_rank(z_NxCxDk, 3)
    _check_positive(num_keys=num_keys, epochs=epochs, batch_size=batch_size)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay!r} must be in (0, 1)")
    if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ValueError(f"kmeans_iters={kmeans_iters!r} must be an int >= 0")
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding={seeding!r} is not allowed; use one of {SEEDINGS}")
    if not dead_fraction >= 0.0:
        raise ValueError(f"dead_fraction={dead_fraction!r} must be >= 0")
    return _init_keys_ema(rng, z_NxCxDk, num_keys=num_keys, decay=decay, epochs=epochs,
                          batch_size=batch_size, kmeans_iters=kmeans_iters,
                          dead_fraction=dead_fraction, chunk=chunk, seeding=seeding)


@functools.partial(jax.jit, static_argnames=("num_keys", "epochs", "batch_size", "kmeans_iters",
                                             "chunk", "seeding"))
def _init_keys_ema(rng, z_NxCxDk, *, num_keys, decay, epochs, batch_size, kmeans_iters,
                   dead_fraction, chunk, seeding):
    N, C, _ = z_NxCxDk.shape
    z = z_NxCxDk.astype(jnp.float32)
    r_init, r_loop = jax.random.split(rng)
    if seeding == "kmeans++":
        keys = jax.vmap(kmeans_plus_plus, in_axes=(0, 1, None))(
            jax.random.split(r_init, C), z, num_keys)
    else:
        # Different random data points per codebook (with replacement when N < K).
        pick_CxK = jax.vmap(
            lambda r: jax.random.choice(r, N, (num_keys,), replace=N < num_keys)
        )(jax.random.split(r_init, C))
        keys = jnp.swapaxes(z, 0, 1)[jnp.arange(C)[:, None], pick_CxK]
    if kmeans_iters:
        def lloyd(k, _):
            return kmeans_step(k, z, chunk=chunk)[0], None
        keys, _ = jax.lax.scan(lloyd, keys, None, length=kmeans_iters)
        _, counts = kmeans_step(keys, z, chunk=chunk)
        # Seed the EMA with per-batch counts: the EMA size is on the scale of one batch.
        state = ema_state_from_keys(keys, counts * (min(batch_size, N) / N))
    else:
        state = ema_state_from_keys(keys, jnp.full((C, num_keys), min(batch_size, N) / num_keys))

    B = min(batch_size, N)
    steps = -(-N // B)
    dead_threshold = dead_fraction * B / num_keys

    def epoch(state, r):
        r_perm, r_steps = jax.random.split(r)
        perm = jax.random.permutation(r_perm, N)
        perm = jnp.concatenate([perm, perm[: steps * B - N]])  # wrap around: full batches only
        batches = perm.reshape(steps, B)

        def step(state, xs):
            ix, rs = xs
            return ema_step(state, z[ix], rs, decay=decay, dead_threshold=dead_threshold,
                            chunk=chunk), None

        state, _ = jax.lax.scan(step, state, (batches, jax.random.split(r_steps, steps)))
        return state, None

    state, _ = jax.lax.scan(epoch, state, jax.random.split(r_loop, epochs))
    return state
