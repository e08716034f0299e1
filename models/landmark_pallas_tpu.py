"""Landmark attention (Mohtashami & Jaggi 2023) as Pallas kernels for TPUs (the Mosaic lowering):
forward, backward, and a `jax.custom_vjp` tying them together.

    landmark_attention_pallas_tpu(q, k, v, mem_freq=F, segment_ids=None, block_q=128,
                                  block_k=128, interpret=False) -> y [B, T, H, D]

The same attention, layout and numbers as `models.landmark_pallas` (the GPU kernels; read its
docstring for the tiling of landmark blocks and the backward formulas): the padded block-aligned
key slots, the tile masks and the grouped-softmax weights of one tile (`_tile_masks`,
`_tile_weights`, `_bwd_tile`) are that module's, shared. What differs is how the work is laid
on the chip, in the style of the Pallas TPU flash attention:
- Every kernel's grid is (B·H, query tiles, key tiles) or (B·H, key tiles, query tiles) with the
  reduction axis last and "arbitrary" (the others "parallel"): one key tile (or query tile) is a
  block the pipeline brings into VMEM, and the running statistics live in VMEM scratch carried
  across the reduction axis — the forward pass's max m, sum l and output accumulator, the
  backward passes' dk, dv or dq accumulators — written out on the axis's last step.
- Causal tile skipping: a tile pair no query of which sees a key is skipped (`pl.when`), and
  its index map repeats the last useful block, so the pipeline fetches nothing new for it.
- Blocks respect the TPU's (8, 128) tiling: query tiles of block_q rows (a power of two ≥ 16),
  key tiles of bk = max(block_k, Pb) slots with block_k a power of two ≥ 128 (scores are
  [bq, bk] with keys on the 128 lanes), the head dimension padded to a power of two ≥ 16 (the
  full last dimension; a multiple of 128 above 128). Per-row statistics (the log-sum-exp, δ)
  and query segment ids are lane-replicated [T, 128] arrays, key segment ids sublane-replicated
  [8, K] ones, as the TPU flash attention lays them; between the passes the log-sum-exp is kept
  as [B·H, T] (one lane).
- Index arithmetic on vectors needs no integer division (blocks are found by shifts by the
  power of two Pb); scalar grid arithmetic divides.

`interpret=True` runs the kernels in TPU interpret mode on CPU (`pltpu.InterpretParams`:
simulated VMEM scratch and grid order), which is how tests check them; a TPU has not run them.
One `pallas_call` is not partitioned across devices: under a mesh,
`models.landmark.landmark_attention` runs it per shard (`shard_map`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from models import landmark_pallas as lp

LANES = 128       # a TPU vector register's lanes (last axis)
SUBLANES = 8      # ... and sublanes (second-to-last axis)


def _check_blocks(block_q, block_k):
    lp._check_block("block_q", block_q)
    lp._check_block("block_k", block_k)
    if block_k < LANES:
        raise ValueError(f"block_k={block_k!r} must be a power of two ≥ {LANES} on TPUs (key "
                         "slots are the scores' lanes)")


def _lanes(col):
    """A column [n, 1] → lane-replicated [n, LANES] (how row statistics are stored)."""
    return jnp.broadcast_to(col, (col.shape[0], LANES))


def _tile_index(g: lp._Geometry, iq, kt):
    """Query positions and global key slots of the tile pair (iq, kt), as full [bq, bk] iotas."""
    shape = (g.bq, g.bk)
    rows = iq * g.bq + lax.broadcasted_iota(jnp.int32, shape, 0)
    u = kt * g.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
    return rows, u


def _segments(g: lp._Geometry, sq_ref, sk_ref):
    """(query ids [bq, bk], key ids [1, bk]) from the lane-replicated query block [bq, LANES]
    and the sublane-replicated key block [SUBLANES, bk]; (None, None) without segments."""
    if sq_ref is None:
        return None, None
    return jnp.tile(sq_ref[...], (1, g.bk // LANES)), sk_ref[pl.ds(0, 1), :]


def _split_refs(refs, n_in: int, segments: bool):
    """Kernel refs → (inputs with the two segment refs, or Nones, at 3 and 4; the rest)."""
    n = n_in + (2 if segments else 0)
    ins, rest = list(refs[:n]), refs[n:]
    if not segments:
        ins[3:3] = [None, None]
    return ins, rest


def _fwd_kernel(*refs, g: lp._Geometry, segments: bool):
    (q_ref, k_ref, v_ref, sq_ref, sk_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(
        refs, 3, segments)
    iq, kt = pl.program_id(1), pl.program_id(2)
    ninf = jnp.float32(-jnp.inf)

    @pl.when(kt == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(kt < lp._num_key_tiles(g, iq))
    def _tile():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        rows, u = _tile_index(g, iq, kt)
        seg_q, seg_k = _segments(g, sq_ref, sk_ref)
        s = lp._dot(q, k, trans_b=True) * g.scale                 # [bq, bk]
        own, past, gate, local = lp._tile_masks(g, rows, u, seg_q, seg_k, kt)
        m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]      # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(jnp.where(own | gate, s, ninf), axis=1,
                                            keepdims=True))
        m_safe = jnp.where(m_new > ninf, m_new, 0.0)
        alpha = jnp.exp(m_prev - m_safe)                         # 0 while m is -inf
        w, p_top, _, _ = lp._tile_weights(g, s, own, past, gate, local, m_safe)
        acc_sc[...] = alpha * acc_sc[...] + lp._dot(w.astype(v.dtype), v)
        l_sc[...] = _lanes(alpha * l_prev + jnp.sum(p_top, axis=1, keepdims=True))
        m_sc[...] = _lanes(m_new)

    @pl.when(kt == g.NKT - 1)
    def _write():
        m, l = m_sc[...][:, :1], l_sc[...][:, :1]
        has = l > 0                              # a row with nothing to attend to outputs 0
        l_safe = jnp.where(has, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        m_safe = jnp.where(m > ninf, m, 0.0)
        lse_ref[...] = _lanes(jnp.where(has, m_safe + jnp.log(l_safe), jnp.inf))


def _dkdv_kernel(*refs, g: lp._Geometry, segments: bool):
    (q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref), (
        dk_ref, dv_ref, dk_sc, dv_sc) = _split_refs(refs, 6, segments)
    kt, iq = pl.program_id(1), pl.program_id(2)

    @pl.when(iq == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(iq >= lp._first_query_tile(g, kt))
    def _tile():
        q, do = q_ref[...], do_ref[...]
        rows, u = _tile_index(g, iq, kt)
        seg_q, seg_k = _segments(g, sq_ref, sk_ref)
        w, ds = lp._bwd_tile(g, q, k_ref[...], v_ref[...], do, lse_ref[...][:, :1],
                             delta_ref[...][:, :1], rows, u, seg_q, seg_k, kt)
        # Transposed in float32, then cast: the Pallas TPU flash attention's form of p^T @ dy.
        dv_sc[...] += lp._dot(w.T.astype(do.dtype), do)
        dk_sc[...] += lp._dot(ds.T.astype(q.dtype), q)

    @pl.when(iq == g.NQT - 1)
    def _write():
        dk_ref[...] = (dk_sc[...] * g.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, g: lp._Geometry, segments: bool):
    (q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref), (dq_ref, dq_sc) = (
        _split_refs(refs, 6, segments))
    iq, kt = pl.program_id(1), pl.program_id(2)

    @pl.when(kt == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(kt < lp._num_key_tiles(g, iq))
    def _tile():
        k = k_ref[...]
        rows, u = _tile_index(g, iq, kt)
        seg_q, seg_k = _segments(g, sq_ref, sk_ref)
        _, ds = lp._bwd_tile(g, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...][:, :1],
                             delta_ref[...][:, :1], rows, u, seg_q, seg_k, kt)
        dq_sc[...] += lp._dot(ds.astype(k.dtype), k)

    @pl.when(kt == g.NKT - 1)
    def _write():
        dq_ref[...] = (dq_sc[...] * g.scale).astype(dq_ref.dtype)


def _specs(g: lp._Geometry, H: int, *, keys_inner: bool):
    """BlockSpecs of a query tile, a key tile, the query-side [bq, LANES] blocks (segment ids,
    row statistics: same index), and the key segment ids [SUBLANES, bk], for the grid
    (B·H, query tiles, key tiles) (keys_inner) or (B·H, key tiles, query tiles). Skipped tile
    pairs map to the last pair that was (or the first that will be) computed, so the pipeline
    fetches no block for them."""
    if keys_inner:
        def tiles(bh, i, j):
            return i, jnp.minimum(j, lp._num_key_tiles(g, i) - 1)
    else:
        def tiles(bh, j, i):
            return jnp.minimum(jnp.maximum(i, lp._first_query_tile(g, j)), g.NQT - 1), j

    q = pl.BlockSpec((None, g.bq, g.Dp), lambda bh, a, b: (bh, tiles(bh, a, b)[0], 0))
    k = pl.BlockSpec((None, g.bk, g.Dp), lambda bh, a, b: (bh, tiles(bh, a, b)[1], 0))
    row = pl.BlockSpec((None, g.bq, LANES), lambda bh, a, b: (bh, tiles(bh, a, b)[0], 0))
    sq = pl.BlockSpec((None, g.bq, LANES), lambda bh, a, b: (bh // H, tiles(bh, a, b)[0], 0))
    sk = pl.BlockSpec((None, SUBLANES, g.bk), lambda bh, a, b: (bh // H, 0, tiles(bh, a, b)[1]))
    return q, k, row, sq, sk


def _call(kernel, g, segments, interpret, grid, in_specs, out_specs, out_shape, scratch, name,
          args, seg_args, sq_spec, sk_spec):
    if segments:
        in_specs = in_specs[:3] + [sq_spec, sk_spec] + in_specs[3:]
        args = args[:3] + seg_args + args[3:]
    return pl.pallas_call(
        functools.partial(kernel, g=g, segments=segments),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name)(*args)


def _forward(g, H, segments, interpret, qp, kp, vp, sq, sk):
    """(y [BH, Tq, Dp], lse [BH, Tq]) of the padded, head-merged inputs."""
    BH = qp.shape[0]
    q, k, row, sq_spec, sk_spec = _specs(g, H, keys_inner=True)
    f32 = jnp.float32
    op, lse = _call(
        _fwd_kernel, g, segments, interpret, (BH, g.NQT, g.NKT), [q, k, k], [q, row],
        [jax.ShapeDtypeStruct(qp.shape, qp.dtype), jax.ShapeDtypeStruct((BH, g.Tq, LANES), f32)],
        [pltpu.VMEM((g.bq, LANES), f32), pltpu.VMEM((g.bq, LANES), f32),
         pltpu.VMEM((g.bq, g.Dp), f32)],
        "landmark_attention_tpu_fwd", [qp, kp, vp], [sq, sk], sq_spec, sk_spec)
    return op, lse[:, :, 0]


def _backward(g, H, segments, interpret, qp, kp, vp, sq, sk, op, lse, dop):
    BH = qp.shape[0]
    f32 = jnp.float32
    delta = jnp.sum(op.astype(f32) * dop.astype(f32), axis=-1)           # δ_i = dy_i · y_i
    lse_l, delta_l = (jnp.broadcast_to(x[..., None], (BH, g.Tq, LANES)) for x in (lse, delta))
    args = [qp, kp, vp, dop, lse_l, delta_l]
    q, k, row, sq_spec, sk_spec = _specs(g, H, keys_inner=False)
    dk, dv = _call(
        _dkdv_kernel, g, segments, interpret, (BH, g.NKT, g.NQT), [q, k, k, q, row, row], [k, k],
        [jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        [pltpu.VMEM((g.bk, g.Dp), f32), pltpu.VMEM((g.bk, g.Dp), f32)],
        "landmark_attention_tpu_dkdv", args, [sq, sk], sq_spec, sk_spec)
    q, k, row, sq_spec, sk_spec = _specs(g, H, keys_inner=True)
    dq = _call(
        _dq_kernel, g, segments, interpret, (BH, g.NQT, g.NKT), [q, k, k, q, row, row], q,
        jax.ShapeDtypeStruct(qp.shape, qp.dtype), [pltpu.VMEM((g.bq, g.Dp), f32)],
        "landmark_attention_tpu_dq", args, [sq, sk], sq_spec, sk_spec)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attention(g, H, segments, interpret, qp, kp, vp, sq, sk):
    return _forward(g, H, segments, interpret, qp, kp, vp, sq, sk)[0]


def _attention_fwd(g, H, segments, interpret, qp, kp, vp, sq, sk):
    op, lse = _forward(g, H, segments, interpret, qp, kp, vp, sq, sk)
    return op, (qp, kp, vp, sq, sk, op, lse)


def _attention_bwd(g, H, segments, interpret, res, dop):
    qp, kp, vp, sq, sk, op, lse = res
    dq, dk, dv = _backward(g, H, segments, interpret, qp, kp, vp, sq, sk, op, lse, dop)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _merge_heads(x_BxHxNxD):
    B, H, N, D = x_BxHxNxD.shape
    return x_BxHxNxD.reshape(B * H, N, D)


def landmark_attention_pallas_tpu(q, k, v, *, mem_freq: int, segment_ids=None,
                                  block_q: int = 128, block_k: int = 128,
                                  interpret: bool = False):
    """Landmark attention y [B, T, H, D] for the training layout (a landmark at every
    t % (mem_freq + 1) == mem_freq), by the Mosaic (TPU) kernels; differentiable in q, k, v.

    Arguments as `models.landmark_pallas.landmark_attention_pallas`, except: block_k a power of
    two ≥ 128 (key slots are the lanes of a score tile), and interpret=True runs TPU interpret
    mode (`pltpu.InterpretParams`) on CPU. float32 or bfloat16 inputs (a TPU has no float64;
    bfloat16 needs TPU v4 or newer: Mosaic rejects bfloat16 matmuls on v3, "E2001:
    CompileTimeMosaicUnsupportedRhsType", benchmarks/aot_compile.py); statistics and
    accumulators are float32. The landmark layout is assumed, not checked: use
    `models.landmark.landmark_attention(..., impl="pallas_tpu")` when it may differ.
    """
    segment_ids = lp._check_args(q, k, v, mem_freq, segment_ids)
    _check_blocks(block_q, block_k)
    if q.dtype == jnp.float64:
        raise ValueError("q.dtype=float64 is not allowed on TPUs; use float32 or bfloat16")
    B, T, H, D = q.shape
    g = lp._Geometry.make(T, mem_freq, D, block_q, block_k)
    segments = segment_ids is not None
    if segments:
        sq, sk = lp._segment_slots(g, segment_ids)
        sq = jnp.broadcast_to(sq[:, :, None], (B, g.Tq, LANES))
        sk = jnp.broadcast_to(sk[:, None, :], (B, SUBLANES, g.Kp))
    else:
        sq = sk = None
    y = _attention(g, H, segments, bool(interpret), _merge_heads(lp._queries(g, q)),
                   _merge_heads(lp._keys(g, k)), _merge_heads(lp._keys(g, v)), sq, sk)
    return jnp.swapaxes(y.reshape(B, H, g.Tq, g.Dp)[:, :, :T, :D], 1, 2)
