"""Landmark memory inference (Mohtashami & Jaggi 2023; the official mem-cache semantics): the
prompt is read chunk by chunk, each layer keeps its past blocks in a block cache
(memory/block_cache.py) and every query attends to its own chunk plus the top-k blocks whose
landmarks score highest.

- `memory_attention(...)`: one layer with the block memory (reference README steps 2–7);
- `memory_logits(...)`: the whole model (`LandmarkLM` params), one jitted call per chunk;
  `init_caches`, `memory_step`, `chunk_start` are its parts.

Positions (`positions=`). 'lm_benchmark' (default) is the official GPT code's mem-cache
(lm_benchmark/models/caches/mem_cache.py): the chunk starts at min(n, k + 1)·S + L for n blocks
seen, k retrieved, S = mem_freq + 1, L the trailing partial block. 'llama' is the official
LLaMA fine-tune's (llama/llama_mem.py, `LlamaAttention.forward` with `mem_freq`): queries at their
absolute position n·S + L + t, the k' = min(k, n) retrieved blocks (`top_k = min(cache_top_k,
num_mems)`) placed from `prefix_len = full_len - (k' + 1)·S`, the landmark of cached block c
scored at prefix_len + m·S + mem_freq (m = c - (n - k') + 1 for the last k' blocks, else 0), the
j-th chosen block's keys at prefix_len + j·S (+ S when it is one of the last k'). RoPE depends only
on differences, so this computes the same as rotating everything relative to prefix_len:
the chunk starts at (k' + 1)·S + L. For n > k the two modes agree; they differ while n <= k.
Selection 'max_over_tokens' is what the official LLaMA code forces with `offload_cache_to_cpu`
(the softmax over landmarks, then the max over the chunk's tokens, one choice per head).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memory import block_cache
from models import landmark, layers, transformer

SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")
POSITIONS = ("lm_benchmark", "llama")


def effective_top_k(cache: block_cache.BlockCache, top_k: int, positions: str) -> jax.Array:
    """The k whose slots place the blocks: top_k ('lm_benchmark'); min(top_k, blocks cached)
    ('llama': `top_k = min(cache_top_k, num_mems)`)."""
    if positions == "llama":
        return jnp.minimum(top_k, block_cache.num_cached(cache))
    return jnp.asarray(top_k, jnp.int32)


def chunk_start(cache: block_cache.BlockCache, top_k: int,
                positions: str = "lm_benchmark") -> jax.Array:
    """The chunk's first position: min(blocks seen, k + 1)·(mem_freq + 1) + L (README step 2);
    'llama': (min(k, blocks cached) + 1)·(mem_freq + 1) + L (see the module docstring)."""
    S = cache.block_len
    if positions == "llama":
        return (effective_top_k(cache, top_k, positions) + 1) * S + cache.tail_len
    return jnp.minimum(cache.num_blocks, top_k + 1) * S + cache.tail_len


def _rope(x, positions, *, base, interleaved, scaling=None):
    """Rotates x [..., D] at integer positions [...] with `layers.apply_rope`'s numerics."""
    D = x.shape[-1]
    flat = x.reshape(1, -1, 1, D)
    pos = jnp.broadcast_to(positions, x.shape[:-1]).reshape(-1)
    return layers.apply_rope(flat, pos, base=base, interleaved=interleaved,
                             scaling=scaling).reshape(x.shape)


def selection_index(selection) -> jax.Array:
    """int32 index into SELECTIONS of a name (checked), or a traced index as it is."""
    if isinstance(selection, str):
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not allowed; use one of {SELECTIONS}")
        return jnp.asarray(SELECTIONS.index(selection), jnp.int32)
    return jnp.asarray(selection, jnp.int32)


def memory_attention(q, k, v, is_landmark, cache: block_cache.BlockCache, *, top_k: int,
                     selection="per_token_and_head", valid_len=None,
                     rope_base: float = 10000.0, rope_interleaved: bool = True,
                     rope_scaling: Optional[layers.RopeScaling] = None,
                     positions: str = "lm_benchmark", return_retrieved: bool = False):
    """One chunk of one attention layer with the landmark memory (reference README steps 2–7).

    q, k, v [B, T, H, Dh]: the chunk's projections, NOT rotated (this function rotates q and the
    chunk's keys at start + t, the trailing block at start - L + j, and each retrieved block at its
    slot). is_landmark [B, T] bool; valid_len: how many of the T rows are real (the rest is padding
    after them), default T. positions: 'lm_benchmark' | 'llama' (module docstring). Returns
    (y [B, T, H, Dh], the cache with the chunk appended) and, with
    return_retrieved, the chosen blocks' chronological ids [B, H, T, k] (-1 where none).
    """
    is_landmark = landmark.check_qkv(q, k, v, is_landmark)
    sel = selection_index(selection)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not allowed; use one of {POSITIONS}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer")
    if top_k > cache.capacity:
        raise ValueError(f"top_k={top_k} exceeds the cache capacity {cache.capacity} blocks")
    B, T, H, Dh = q.shape
    S, F = cache.block_len, cache.mem_freq
    acc = landmark.acc_dtype(q)
    scale = 1.0 / math.sqrt(Dh)
    rope = functools.partial(_rope, base=rope_base, interleaved=rope_interleaved,
                             scaling=rope_scaling)
    valid_len = jnp.asarray(T if valid_len is None else valid_len, jnp.int32)
    start = chunk_start(cache, top_k, positions)
    k_eff = effective_top_k(cache, top_k, positions)
    L = cache.tail_len
    t = jnp.arange(T)
    q_rot = rope(q, (start + t)[None, :, None])
    k_rot = rope(k, (start + t)[None, :, None])
    tail_k = rope(cache.tail_keys, (start - L + jnp.arange(F))[None, :, None])
    s_tail = jnp.einsum("bthd,bjhd->bhtj", q_rot, tail_k, preferred_element_type=acc) * scale
    s_chunk = jnp.einsum("bthd,bjhd->bhtj", q_rot, k_rot, preferred_element_type=acc) * scale
    tail_vis = jnp.broadcast_to(jnp.arange(F) < L, (B, H, T, F))
    chunk_vis = jnp.broadcast_to(t[None, :] <= t[:, None], (B, H, T, T))
    tail_lm = jnp.zeros((B, H, T, F), bool)
    chunk_lm = jnp.broadcast_to(is_landmark[:, None, None, :], (B, H, T, T))
    parts_s, parts_vis, parts_lm = [s_tail, s_chunk], [tail_vis, chunk_vis], [tail_lm, chunk_lm]
    retrieved = jnp.full((B, H, T, max(top_k, 1)), -1, jnp.int32)
    if top_k > 0:
        n = block_cache.num_cached(cache)
        c, slot_valid = block_cache.chronological_index(cache)              # [N], [N]
        m = jnp.where(c >= n - k_eff, c - (n - k_eff) + 1, 0)               # slot of each block
        lm_k = rope(block_cache.landmark_keys(cache), (m * S + F)[None, :, None])  # [B, N, H, Dh]
        s_lm = jnp.einsum("bthd,bnhd->bhtn", q_rot, lm_k, preferred_element_type=acc) * scale
        s_lm = jnp.where(slot_valid, s_lm, -jnp.inf)
        p_lm = jax.nn.softmax(s_lm, axis=-1)
        p_lm = jnp.where(slot_valid, p_lm, 0)                               # n = 0: no NaN
        # The selection is data (one compiled step serves all three); a constant folds away.
        real = (t < valid_len)[None, None, :, None]
        over_heads = jnp.max(p_lm, axis=1, keepdims=True)
        over_tokens = jnp.max(jnp.where(real, p_lm, 0), axis=2, keepdims=True)
        p_lm = jnp.where(sel == 1, over_heads, jnp.where(sel == 2, over_tokens, p_lm))
        # Ties cannot be resolved portably (official: torch.topk); valid blocks outrank empty slots.
        rank = jnp.where(slot_valid, p_lm, -1.0)
        _, chosen = jax.lax.top_k(rank, top_k)                               # [B, H, T, k] slots
        chosen_valid = slot_valid[chosen]
        chosen_c = jnp.where(chosen_valid, c[chosen], jnp.iinfo(jnp.int32).max)
        chosen_c = jnp.sort(chosen_c, axis=-1)                               # chronological order
        chosen_valid = chosen_c < jnp.iinfo(jnp.int32).max
        chosen_c = jnp.where(chosen_valid, chosen_c, 0)
        chosen_m = jnp.where(chosen_c >= n - k_eff, chosen_c - (n - k_eff) + 1, 0)
        slots = block_cache.slot_of_chronological(cache, chosen_c)
        mem_k, mem_v = block_cache.gather_blocks(cache, slots)              # [B, H, T, k, S, Dh]
        j = jnp.arange(top_k)
        pos = (j[:, None] * S + jnp.arange(S)[None, :]) + ((chosen_m > 0) * S)[..., None]
        mem_k = rope(mem_k, pos)
        s_mem = jnp.einsum("bhtd,bhtjsd->bhtjs", jnp.moveaxis(q_rot, 2, 1), mem_k,
                           preferred_element_type=acc).reshape(B, H, T, top_k * S) * scale
        mem_vis = jnp.repeat(chosen_valid, S, axis=-1)
        mem_lm = mem_vis & jnp.tile(jnp.arange(S) == F, top_k)
        parts_s.insert(0, s_mem)
        parts_vis.insert(0, mem_vis)
        parts_lm.insert(0, mem_lm)
        retrieved = jnp.where(chosen_valid, chosen_c + (cache.num_blocks - n), -1)
    s = jnp.concatenate(parts_s, axis=-1)
    vis = jnp.concatenate(parts_vis, axis=-1)
    lm = jnp.concatenate(parts_lm, axis=-1)
    ids = jnp.cumsum(lm.astype(jnp.int32), axis=-1) - lm.astype(jnp.int32)
    P = s.shape[-1] - T
    q_blk = jnp.take_along_axis(ids, (P + t)[None, None, :, None], axis=-1)   # [B, H, T, 1]
    probs = landmark.grouped_softmax(s, lm, ids, q_blk, vis)
    vd = v.dtype
    y = jnp.einsum("bhtj,bjhd->bthd", probs[..., P:].astype(vd), v)
    y = y + jnp.einsum("bhtj,bjhd->bthd", probs[..., P - F:P].astype(vd),
                       cache.tail_values.astype(vd))
    if top_k > 0:
        pm = probs[..., :top_k * S].reshape(B, H, T, top_k, S).astype(vd)
        y = y + jnp.einsum("bhtjs,bhtjsd->bthd", pm, mem_v.astype(vd))
    new_cache = block_cache.append(cache, k, v, valid_len)
    y = y.astype(q.dtype)
    if return_retrieved:
        return y, new_cache, retrieved
    return y, new_cache


# ---------------------------------------------------------------------------------------------
# Memory inference: the whole model, chunk by chunk
# ---------------------------------------------------------------------------------------------
class _MemoryBlock(nn.Module):
    cfg: transformer.TransformerConfig
    top_k: int
    positions: str = "lm_benchmark"

    @nn.compact
    def __call__(self, x, is_landmark, cache, valid_len, selection, with_retrieved: bool):
        c = self.cfg
        norm = lambda name: layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype,  # noqa: E731
                                             param_dtype=c.param_dtype, use_bias=c.bias,
                                             name=name)
        attn = transformer.Attention(c, name="attn")
        h = norm("ln_1")(x)
        # Position 0 rotates by the identity (cos 0 = 1, sin 0 = 0 exactly): un-rotated q, k, v.
        q, k, v = attn.qkv(h, jnp.zeros((x.shape[1],), jnp.int32))
        # Grouped-query attention: each key/value head serves H / Hkv query heads; the cache keeps
        # the repeated heads (as `Attention` repeats them before its attention function).
        group = c.num_heads // c.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        y, cache, retrieved = memory_attention(
            q, k, v, is_landmark, cache, top_k=self.top_k, selection=selection,
            valid_len=valid_len, rope_base=c.rope_base, rope_interleaved=c.rope_interleaved,
            rope_scaling=c.rope_scaling, positions=self.positions, return_retrieved=True)
        x = x + attn.out(y)
        h = norm("ln_2")(x)
        x = x + layers.MLP(c.hidden, c.mlp, dtype=c.dtype, param_dtype=c.param_dtype,
                           use_bias=c.bias, name="mlp")(h)
        return x, cache, (retrieved if with_retrieved else None)


class _MemoryLM(nn.Module):
    """One chunk of raw tokens through the model with per-layer block caches."""
    cfg: landmark.LandmarkConfig
    top_k: int
    positions: str = "lm_benchmark"

    @nn.compact
    def __call__(self, raw_BxM, n_raw, caches, selection, with_retrieved: bool = False):
        lc = self.cfg
        c = lc.model
        B, M = raw_BxM.shape
        F = lc.mem_freq
        L = caches[0].tail_len                      # raw tokens since the last landmark
        i = jnp.arange(M)
        aug_pos = i + (L + i) // F                  # where raw token i lands
        closes = ((L + i + 1) % F == 0) & (i < n_raw)   # a landmark follows raw token i
        T = M + (F - 1 + M) // F                    # static bound on the augmented length
        valid_len = n_raw + (L + n_raw) // F        # rows after it (a padded last chunk) are dropped
        tokens = jnp.zeros((B, T), raw_BxM.dtype).at[:, aug_pos].set(raw_BxM)
        lm_pos = jnp.where(closes, aug_pos + 1, T)  # T: out of range, dropped
        tokens = tokens.at[:, lm_pos].set(lc.landmark_id, mode="drop")
        is_landmark = jnp.zeros((B, T), bool).at[:, lm_pos].set(True, mode="drop")
        embed = layers.Embed(c.vocab_size, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
                             name="embed")
        x = embed(tokens)
        new_caches, retrieved = [], []
        for li in range(c.num_layers):
            x, cache, r = _MemoryBlock(c, self.top_k, self.positions, name=f"block_{li}")(
                x, is_landmark, caches[li], valid_len, selection, with_retrieved)
            new_caches.append(cache)
            retrieved.append(r)
        x = layers.make_norm(c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                             use_bias=c.bias, name="ln_f")(x)
        x = jnp.take(x, aug_pos, axis=1)            # landmark rows dropped (README step 8)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.DenseGeneral(c.vocab_size, use_bias=False, dtype=c.dtype,
                                     param_dtype=c.param_dtype, name="lm_head")(x)
        logits = logits.astype(jnp.promote_types(jnp.float32, logits.dtype))
        out = (logits, tuple(new_caches))
        if with_retrieved:
            out = out + (tuple(retrieved),)
        return out


def init_caches(config: landmark.LandmarkConfig, batch: int, cache_blocks: int) -> tuple:
    """One empty `BlockCache` per layer (keys/values in the model's compute dtype)."""
    c = landmark.as_landmark_config(config).model
    return tuple(block_cache.init(batch=batch, capacity=cache_blocks, mem_freq=config.mem_freq,
                                  num_heads=c.num_heads, head_dim=c.hd, dtype=c.dtype)
                 for _ in range(c.num_layers))


def memory_step(params, raw_BxM, caches, n_raw=None, *, config: landmark.LandmarkConfig, top_k: int,
                selection: str = "per_token_and_head", with_retrieved: bool = False,
                positions: str = "lm_benchmark"):
    """One chunk of raw tokens [B, M] → (logits [B, M, V], new caches[, retrieved per layer]).

    n_raw (traced scalar, default M): only the first n_raw tokens are real; the rest is padding whose
    logits are meaningless and which never enters the cache (so a short last chunk reuses the
    compiled step of the full-length ones). The selection is passed as data: the three share one
    compiled step.
    """
    if n_raw is None:
        n_raw = raw_BxM.shape[1]
    return _memory_step(params, raw_BxM, caches, jnp.asarray(n_raw, jnp.int32),
                        selection_index(selection), config=config, top_k=top_k,
                        with_retrieved=with_retrieved, positions=positions)


@functools.partial(jax.jit, static_argnames=("config", "top_k", "with_retrieved", "positions"))
def _memory_step(params, raw_BxM, caches, n_raw, sel, *, config, top_k, with_retrieved, positions):
    return _MemoryLM(config, top_k, positions).apply({"params": params}, raw_BxM, n_raw, caches,
                                                     sel, with_retrieved)


def memory_logits(params, config: landmark.LandmarkConfig, raw_tokens, *, chunk_len: int,
                  top_k: int, cache_blocks: Optional[int], selection: str = "per_token_and_head",
                  positions: str = "lm_benchmark", return_retrieved: bool = False):
    """The official mem-cache inference: raw tokens [B, T_raw] (no landmarks) → logits
    [B, T_raw, V].

    Chunks of `chunk_len` raw tokens, each one jitted call; landmarks are inserted across chunks,
    each layer keeps a ring of `cache_blocks` complete blocks (None: enough for the whole input, the
    unbounded-context mode) and retrieves `top_k` blocks per token and head (`selection`), placed
    at `positions` ('lm_benchmark' | 'llama', see the module docstring).
    """
    config = landmark.as_landmark_config(config)
    raw_tokens = np.asarray(raw_tokens)          # chunks are cut on the host: no eager op compiles
    if raw_tokens.ndim != 2:
        raise ValueError(f"raw_tokens has shape {raw_tokens.shape}; it must be [B, T_raw]")
    if not isinstance(chunk_len, int) or chunk_len <= 0:
        raise ValueError(f"chunk_len={chunk_len!r} must be a positive integer")
    selection_index(selection)
    B, T_raw = raw_tokens.shape
    if cache_blocks is None:
        cache_blocks = max(T_raw // config.mem_freq, top_k, 1)
    if not isinstance(cache_blocks, int) or cache_blocks <= 0:
        raise ValueError(f"cache_blocks={cache_blocks!r} must be a positive integer (or None)")
    if not isinstance(top_k, int) or not 0 <= top_k <= cache_blocks:
        raise ValueError(f"top_k={top_k!r} must be an integer in [0, cache_blocks={cache_blocks}]")
    params = layers.unbox(params)
    caches = init_caches(config, B, cache_blocks)
    outs, retrieved = [], []
    for s in range(0, T_raw, chunk_len):
        chunk = raw_tokens[:, s:s + chunk_len]
        n = chunk.shape[1]
        if n < chunk_len:                          # pad: one compiled step for every chunk
            chunk = np.pad(chunk, ((0, 0), (0, chunk_len - n)))
        res = memory_step(params, chunk, caches, n, config=config, top_k=top_k,
                          selection=selection, with_retrieved=return_retrieved,
                          positions=positions)
        outs.append(np.asarray(res[0])[:, :n])
        caches = res[1]
        if return_retrieved:
            retrieved.append(res[2])
    logits = jnp.asarray(np.concatenate(outs, axis=1))
    if return_retrieved:
        return logits, retrieved
    return logits


def memory_generate(params, config: landmark.LandmarkConfig, prompt_BxP, num_tokens: int, *,
                    chunk_len: int, top_k: int, cache_blocks: Optional[int] = None,
                    selection: str = "per_token_and_head", positions: str = "lm_benchmark"
                    ) -> jax.Array:
    """int32 [B, num_tokens]: greedy decoding with the block memory, as the official LLaMA
    generation (llama/llama_mem.py `prepare_inputs_for_generation`): the prompt [B, P] (raw
    tokens, rows of one length) is read in chunks of `chunk_len` tokens, then every generated
    token is a chunk of its own that attends to the trailing partial block, itself and the top_k
    retrieved blocks (a landmark is inserted after it when it completes a block). Logits are the
    regular tokens' (landmark rows are never read). cache_blocks None: enough for the prompt and
    the generated tokens (unbounded); pass one value for prompts of several lengths to reuse the
    two compiled steps (chunk_len tokens, one token)."""
    config = landmark.as_landmark_config(config)
    prompt_BxP = np.asarray(prompt_BxP)
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1:
        raise ValueError(f"prompt has shape {prompt_BxP.shape}; it must be [B, P] with P >= 1")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r} must be a positive integer")
    if not isinstance(chunk_len, int) or chunk_len <= 0:
        raise ValueError(f"chunk_len={chunk_len!r} must be a positive integer")
    selection_index(selection)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not allowed; use one of {POSITIONS}")
    B, P = prompt_BxP.shape
    if cache_blocks is None:
        cache_blocks = max((P + num_tokens) // config.mem_freq, top_k, 1)
    if not isinstance(top_k, int) or not 0 <= top_k <= cache_blocks:
        raise ValueError(f"top_k={top_k!r} must be an integer in [0, cache_blocks={cache_blocks}]")
    params = layers.unbox(params)
    caches = init_caches(config, B, cache_blocks)
    kw = dict(config=config, top_k=top_k, positions=positions)
    sel = selection_index(selection)
    prompt = np.asarray(prompt_BxP)              # chunks are cut on the host: no eager op compiles
    for s in range(0, P, chunk_len):
        chunk = prompt[:, s:s + chunk_len]
        n = chunk.shape[1]
        if n < chunk_len:
            chunk = np.pad(chunk, ((0, 0), (0, chunk_len - n)))
        tok, caches = _step_greedy(params, chunk, caches, n, sel, **kw)
    out = [tok]
    for _ in range(num_tokens - 1):
        tok, caches = _step_greedy(params, tok[:, None], caches, 1, sel, **kw)
        out.append(tok)
    return jnp.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "top_k", "positions"))
def _step_greedy(params, raw_BxM, caches, n_raw, sel, *, config, top_k, positions):
    """(argmax of the logits after raw token n_raw - 1 [B] int32, new caches): `memory_step`."""
    logits, caches = _memory_step(params, raw_BxM, caches, n_raw, sel, config=config,
                                  top_k=top_k, with_retrieved=False, positions=positions)
    last = jax.lax.dynamic_index_in_dim(logits, n_raw - 1, axis=1, keepdims=False)
    return jnp.argmax(last, axis=-1).astype(jnp.int32), caches
