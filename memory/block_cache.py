"""Landmark attention's per-layer block cache (Mohtashami & Jaggi 2023, Sec. 3.2 / official `mem_cache`).

A fixed-shape pytree: a ring of the N most recent *complete* blocks (each `mem_freq` regular tokens
plus the landmark that closes it, S = mem_freq + 1 rows; keys stored WITHOUT rotary rotation, as the
official code does, so a block can be re-rotated at whatever slot position it is retrieved into)
and the incomplete trailing block (at most mem_freq regular tokens, never a landmark).

    cache = block_cache.init(batch=B, capacity=N, mem_freq=F, num_heads=H, head_dim=Dh)
    cache = block_cache.append(cache, keys_BxTxHxDh, values_BxTxHxDh, length)
    c, valid = block_cache.chronological_index(cache)      # [N] each slot's age order, [N] bool

Counters (`num_blocks`, `tail_len`) are int32 scalars shared by the batch (every row has seen the
same number of tokens); every array operation is per batch row, so batch rows never mix.
Nothing here is jitted itself: `append` is a pure function meant to be called inside jit.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class BlockCache:
    """One attention layer's landmark memory.

    keys, values: [B, N, S, H, Dh]; slot n holds the block with chronological id i where
      i ≡ n (mod N) (row S-1 of a block is its landmark token).
    tail_keys, tail_values: [B, S-1, H, Dh]; rows [0, tail_len) are the incomplete trailing block.
    num_blocks: [] int32, complete blocks ever appended (the ring holds min(num_blocks, N) of them).
    tail_len: [] int32, regular tokens in the trailing block (< S-1+1, i.e. ≤ mem_freq - 1 after a
      landmark-aligned append; the cache itself only relies on tail_len < S).
    """
    keys: jax.Array
    values: jax.Array
    tail_keys: jax.Array
    tail_values: jax.Array
    num_blocks: jax.Array
    tail_len: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def block_len(self) -> int:
        return self.keys.shape[2]

    @property
    def mem_freq(self) -> int:
        return self.keys.shape[2] - 1


def init(*, batch: int, capacity: int, mem_freq: int, num_heads: int, head_dim: int,
         dtype=jnp.float32) -> BlockCache:
    """An empty cache: capacity N complete blocks of mem_freq + 1 keys/values each."""
    for name, v in (("batch", batch), ("capacity", capacity), ("mem_freq", mem_freq),
                    ("num_heads", num_heads), ("head_dim", head_dim)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    S = mem_freq + 1
    blocks = jnp.zeros((batch, capacity, S, num_heads, head_dim), dtype)
    tail = jnp.zeros((batch, mem_freq, num_heads, head_dim), dtype)
    return BlockCache(keys=blocks, values=blocks, tail_keys=tail, tail_values=tail,
                      num_blocks=jnp.zeros((), jnp.int32), tail_len=jnp.zeros((), jnp.int32))


def num_cached(cache: BlockCache) -> jax.Array:
    """n = min(num_blocks, N): complete blocks currently held."""
    return jnp.minimum(cache.num_blocks, cache.capacity)


def chronological_index(cache: BlockCache) -> tuple[jax.Array, jax.Array]:
    """Per slot: c [N] int32, the block's rank among the held blocks (0 = oldest), and valid [N].

    Slot n holds block i ≡ n (mod N); the oldest held block is num_blocks - n, so c = (n - num_blocks)
    mod N once the ring has wrapped and c = n before.
    """
    N = cache.capacity
    slots = jnp.arange(N, dtype=jnp.int32)
    wrapped = cache.num_blocks >= N
    c = jnp.where(wrapped, jnp.mod(slots - cache.num_blocks, N), slots)
    return c, slots < num_cached(cache)


def slot_of_chronological(cache: BlockCache, c: jax.Array) -> jax.Array:
    """Inverse of `chronological_index`: the slot holding the c-th oldest held block."""
    N = cache.capacity
    return jnp.where(cache.num_blocks >= N, jnp.mod(c + cache.num_blocks, N), c)


def landmark_keys(cache: BlockCache) -> jax.Array:
    """[B, N, H, Dh]: each held block's landmark key (un-rotated)."""
    return cache.keys[:, :, -1]


def gather_blocks(cache: BlockCache, slots_BxHxTxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blocks chosen per (batch, head, query, j): keys and values [B, H, T, K, S, Dh].

    slots [B, H, T, K] int (clipped into range; the caller masks invalid choices).
    """
    B, N, S, H, Dh = cache.keys.shape
    kt = jnp.moveaxis(cache.keys, 3, 1)      # [B, H, N, S, Dh]
    vt = jnp.moveaxis(cache.values, 3, 1)
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    s = jnp.clip(slots_BxHxTxK, 0, N - 1)
    return kt[b, h, s], vt[b, h, s]


def append(cache: BlockCache, keys: jax.Array, values: jax.Array, length=None) -> BlockCache:
    """Appends the first `length` rows of keys/values [B, T, H, Dh] after the trailing block.

    The concatenation (trailing block, new rows) is cut into complete blocks of S rows, which enter
    the ring oldest first (only the newest N survive when more than N complete at once), and the
    remainder becomes the new trailing block. The caller guarantees that landmarks sit at the end of
    every S rows (the official store asserts the same); `length` may be a traced scalar (padded
    chunks), default T.
    """
    B, T, H, Dh = keys.shape
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have one shape")
    if keys.shape[0] != cache.keys.shape[0] or keys.shape[2:] != cache.keys.shape[3:]:
        raise ValueError(f"keys {keys.shape} do not fit the cache [B, N, S, H, Dh]="
                         f"{cache.keys.shape}")
    N, S = cache.capacity, cache.block_len
    F = S - 1
    length = jnp.asarray(T if length is None else length, jnp.int32)
    L = cache.tail_len
    # Right-align the trailing block so that the valid rows of buf are one run [F - L, F + length).
    off = F - L
    tail_idx = jnp.arange(F) - off                                   # row r ← tail[r - off]
    align = lambda t: jnp.take(t, jnp.clip(tail_idx, 0, F - 1), axis=1)  # noqa: E731
    buf_k = jnp.concatenate([align(cache.tail_keys), keys.astype(cache.keys.dtype)], axis=1)
    buf_v = jnp.concatenate([align(cache.tail_values), values.astype(cache.values.dtype)], axis=1)
    total = L + length
    n_new = total // S                                                # complete blocks formed
    max_new = (F + T) // S                                            # static bound
    width = F + T
    if max_new > 0:
        b = jnp.arange(max_new)
        rows = off + b[:, None] * S + jnp.arange(S)[None, :]          # [max_new, S]
        rows = jnp.clip(rows, 0, width - 1).reshape(-1)
        blk_k = jnp.take(buf_k, rows, axis=1).reshape(B, max_new, S, H, Dh)
        blk_v = jnp.take(buf_v, rows, axis=1).reshape(B, max_new, S, H, Dh)
        # Only the newest N of the new blocks survive; they go to distinct slots (i mod N).
        keep = (b < n_new) & (b >= n_new - N)
        slots = jnp.where(keep, jnp.mod(cache.num_blocks + b, N), N)  # N = out of range: dropped
        new_keys = cache.keys.at[:, slots].set(blk_k, mode="drop")
        new_values = cache.values.at[:, slots].set(blk_v, mode="drop")
    else:
        new_keys, new_values = cache.keys, cache.values
    rest = off + n_new * S + jnp.arange(F)
    rest = jnp.clip(rest, 0, width - 1)
    return BlockCache(keys=new_keys, values=new_values,
                      tail_keys=jnp.take(buf_k, rest, axis=1),
                      tail_values=jnp.take(buf_v, rest, axis=1),
                      num_blocks=(cache.num_blocks + n_new).astype(jnp.int32),
                      tail_len=(total - n_new * S).astype(jnp.int32))
