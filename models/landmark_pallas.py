"""Landmark attention (Mohtashami & Jaggi 2023) as flash-style Pallas kernels: forward, backward,
and a `jax.custom_vjp` tying them together.

    landmark_attention_pallas(q, k, v, mem_freq=F, segment_ids=None, block_q=64, block_k=64,
                              num_warps=None, num_stages=2, interpret=False) -> y [B, T, H, D]

The layout is the training one (`models.landmark.insert_landmarks`): a landmark at every
t % S == S - 1, S = mem_freq + 1. The numbers are `models.landmark.landmark_attention`'s (the
grouped softmax of `grouped_softmax`): for query i in block qb = i // S, one softmax runs over
its own block's regular keys j ≤ i and the landmarks ("gates") of earlier blocks; an earlier
block's regular keys share its gate's probability through a softmax inside the block. Landmark
values never reach the output. Callers that may hold another layout go through
`models.landmark.landmark_attention(..., impl="pallas")` (on a GPU; `impl="pallas_gpu"`
anywhere), which checks the layout at run time.

How the kernels tile it
- Keys are laid out block-aligned: each landmark block of S keys is padded to Pb = next power of
  two ≥ S slots (zeros, masked), so a key tile of bk = max(block_k, Pb) slots holds R = bk / Pb
  whole landmark blocks and every statistic of the in-block softmax (its max and sum) is a
  reduction inside one tile (the price: Pb − S wasted slots per block, e.g. 13 of 64 for the
  paper's blocks of 50 + 1). This is what lets the backward pass recompute the weights from the
  per-row top-level log-sum-exp alone, as in FlashAttention; it is also how the official Triton
  kernel (epfml/landmark-attention, llama/ltriton) works, with one block per tile.
- Forward (grid: query tiles × B × H): the online softmax of FlashAttention over the top-level
  items (own keys and gates); a gate's "value" is its block's in-block average of v, formed in
  the same tile, so one matmul w @ v per tile carries both levels. Writes y and the top-level
  lse [B, H, T].
- Backward: two kernels, dk/dv (grid: key tiles × B × H, loop over the query tiles that see
  them) and dq (grid: query tiles × B × H, loop over key tiles), each recomputing the tile's
  weights. With δ_i = dy_i · y_i, dp_j = dy_i · v_j and u_b the block average:
  own key: ds = p_j (dp_j − δ); gate of block b: ds = p_g (dy·u_b − δ); past key j of b:
  ds = p_g q_j (dp_j − dy·u_b), where q_j is j's in-block probability.
- Scores, softmax statistics and accumulators are float32 (float64 for float64 inputs); the two
  matmuls with weights take v's (or q's) dtype, as `models.landmark` does.

Lowering: `pl.pallas_call` with static block shapes (block sizes are powers of two ≥ 16, the
head dimension padded to a power of two ≥ 16) and loops of `lax.fori_loop` whose bounds are
scalar functions of the program id, in the style of the Triton lowering (whole-sequence key
blocks sliced with `pl.ds`, row statistics as 1-D vectors; compiler parameters are Triton's on
GPU). The TPU kernels (models/landmark_pallas_tpu.py: key tiles on the grid, VMEM scratch,
lane-replicated row statistics) share this module's geometry, padding and tile math
(`_tile_masks`, `_tile_weights`, `_bwd_tile`), which is why those take their per-row values as
columns [bq, 1] and their indices as broadcastable arrays. `interpret=True` runs the kernels on
CPU (what the tests do). One `pallas_call` is not partitioned across devices: under a mesh,
`models.landmark.landmark_attention` runs it per shard (`shard_map`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _check_block(name: str, value) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or value < 16
            or value & (value - 1)):
        raise ValueError(f"{name}={value!r} must be a power of two ≥ 16")
    return value


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (optionally transposed) with float32 accumulation (float64 for float64 inputs)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    acc = jnp.promote_types(jnp.float32, a.dtype)
    # Full float32 products on GPUs too (no TF32), so float32 inputs give float32 results.
    prec = lax.Precision.HIGHEST if a.dtype in (jnp.float32, jnp.float64) else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=acc)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static sizes shared by the three kernels (hashable: a custom_vjp static argument)."""
    T: int            # sequence length
    S: int            # landmark block: mem_freq keys + its landmark
    Pb: int           # padded slots per landmark block (power of two ≥ S)
    bk: int           # key tile (slots)
    R: int            # whole landmark blocks per key tile
    bq: int           # query tile
    NB: int           # landmark blocks (the last may be partial)
    NBp: int          # ... rounded up to whole key tiles
    Kp: int           # padded key slots
    NKT: int          # key tiles
    Tq: int           # padded queries
    NQT: int          # query tiles
    Dp: int           # padded head dimension
    scale: float      # 1 / sqrt(D)

    @classmethod
    def make(cls, T: int, mem_freq: int, D: int, block_q: int, block_k: int) -> "_Geometry":
        S = mem_freq + 1
        Pb = _next_pow2(S)
        bk = max(block_k, Pb)
        R = bk // Pb
        NB = -(-T // S)
        NBp = -(-NB // R) * R
        Tq = -(-T // block_q) * block_q
        return cls(T=T, S=S, Pb=Pb, bk=bk, R=R, bq=block_q, NB=NB, NBp=NBp, Kp=NBp * Pb,
                   NKT=NBp * Pb // bk, Tq=Tq, NQT=Tq // block_q, Dp=max(16, _next_pow2(D)),
                   scale=1.0 / math.sqrt(D))


def _tile_masks(g: _Geometry, rows, u, seg_q, seg_k, kt):
    """Masks of query rows against key slots, broadcast together: own (regular keys of the row's
    block, j ≤ i), past (regular keys of earlier blocks), gate (landmarks of earlier blocks), and
    each slot's tile-local landmark-block index (0..R-1).

    rows (query positions) and u (global key slot indices of tile kt) are int32 arrays that
    broadcast to [bq, bk]: a column [bq, 1] and a row [1, bk] (the Triton kernels) or two full
    [bq, bk] iotas (the Mosaic ones); seg_q, seg_k likewise, or None. Integer division only by
    the power of two Pb (a shift), so the same code lowers where vector division does not."""
    shift = g.Pb.bit_length() - 1
    blk = jnp.right_shift(u, shift)
    t = jnp.bitwise_and(u, g.Pb - 1)
    pos = blk * g.S + t                             # position in the unpadded sequence
    key_ok = (t < g.S) & (pos < g.T)
    is_lm = t == g.S - 1
    vis = (pos <= rows) & key_ok & (rows < g.T)
    if seg_q is not None:
        vis = vis & (seg_q == seg_k)
    # Block blk is earlier than the row's block (i // S) iff it ends at or before the row; a
    # visible slot of a block that is not earlier is in the row's own block.
    earlier = (blk + 1) * g.S <= rows
    own = vis & ~earlier & ~is_lm
    past = vis & earlier & ~is_lm
    gate = vis & earlier & is_lm
    return own, past, gate, blk - kt * g.R


def _per_block(g: _Geometry, local, cols):
    """Per-(row, local block) values back on their slots: R columns [bq, 1] → [bq, bk] (the
    column itself when R = 1; it broadcasts)."""
    out = cols[0]
    for r in range(1, g.R):
        out = jnp.where(local == r, cols[r], out)
    return out


def _block_sum(g: _Geometry, local, x):
    """Per-row sums of x [bq, bk] inside each local landmark block → list of R columns [bq, 1]."""
    if g.R == 1:
        return [jnp.sum(x, axis=1, keepdims=True)]
    zero = jnp.zeros((), x.dtype)
    return [jnp.sum(jnp.where(local == r, x, zero), axis=1, keepdims=True) for r in range(g.R)]


def _block_max(g: _Geometry, s, past, local):
    """Per-slot maximum of the row's past scores in the slot's landmark block (0 where the block
    has none): the in-block softmax's stabiliser. Per block, not per row: an earlier block's
    weight is set by its gate, not by its scores, so a block far below the row's other scores
    must not underflow to nothing."""
    ninf = jnp.asarray(-jnp.inf, s.dtype)
    if g.R == 1:
        maxes = [jnp.max(jnp.where(past, s, ninf), axis=1, keepdims=True)]
    else:
        maxes = [jnp.max(jnp.where(past & (local == r), s, ninf), axis=1, keepdims=True)
                 for r in range(g.R)]
    return _per_block(g, local, [jnp.where(m > ninf, m, jnp.zeros((), s.dtype)) for m in maxes])


def _in_block_probs(g: _Geometry, e_past, local):
    """q_j [bq, bk]: key j's probability inside its earlier landmark block, from e_past =
    exp(s − block max) on past slots (0 elsewhere)."""
    d = [jnp.where(x > 0, x, jnp.ones((), x.dtype)) for x in _block_sum(g, local, e_past)]
    return e_past / _per_block(g, local, d)


def _tile_weights(g: _Geometry, s, own, past, gate, local, ref):
    """The grouped softmax of one tile against a row reference ref [bq, 1] (the running max in
    the forward pass, the row's log-sum-exp in the backward): p_top = exp(s − ref) on own keys
    and gates, q_j the in-block probabilities of past keys, p_gate their gate's p_top on each
    slot, and the value weights w = p_top on own keys + q_j · p_gate on past keys. One exp per
    score: past keys against their block's max, the rest against ref (ref = inf → all 0)."""
    zero = jnp.zeros((), s.dtype)
    e = jnp.exp(s - jnp.where(past, _block_max(g, s, past, local), ref))
    p_top = jnp.where(own | gate, e, zero)
    qj = _in_block_probs(g, jnp.where(past, e, zero), local)
    p_gate = _per_block(g, local, _block_sum(g, local, jnp.where(gate, e, zero)))
    w = jnp.where(own, e, zero) + qj * p_gate
    return w, p_top, qj, p_gate


def _fwd_kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, *, g: _Geometry,
                segments: bool):
    iq = pl.program_id(0)
    q = q_ref[...]                                               # [bq, Dp]
    acc_t = jnp.promote_types(jnp.float32, q.dtype)
    rows = (iq * g.bq + lax.iota(jnp.int32, g.bq))[:, None]
    seg_q = sq_ref[...][:, None] if segments else None
    ninf = jnp.asarray(-jnp.inf, acc_t)
    zero = jnp.zeros((), acc_t)

    def body(kt, carry):
        acc, m, l = carry
        kslice = pl.ds(kt * g.bk, g.bk)
        k = k_ref[kslice, :]
        v = v_ref[kslice, :]
        seg_k = sk_ref[kslice][None, :] if segments else None
        s = _dot(q, k, trans_b=True) * g.scale                    # [bq, bk]
        u = (kt * g.bk + lax.iota(jnp.int32, g.bk))[None, :]
        own, past, gate, local = _tile_masks(g, rows, u, seg_q, seg_k, kt)
        m_new = jnp.maximum(m, jnp.max(jnp.where(own | gate, s, ninf), axis=1))
        m_safe = jnp.where(m_new > ninf, m_new, zero)
        alpha = jnp.exp(m - m_safe)                              # 0 while m is -inf
        w, p_top, _, _ = _tile_weights(g, s, own, past, gate, local, m_safe[:, None])
        acc = alpha[:, None] * acc + _dot(w.astype(v.dtype), v)
        l = alpha * l + jnp.sum(p_top, axis=1)
        return acc, m_new, l

    init = (jnp.zeros((g.bq, g.Dp), acc_t), jnp.full((g.bq,), -jnp.inf, acc_t),
            jnp.zeros((g.bq,), acc_t))
    acc, m, l = lax.fori_loop(0, _num_key_tiles(g, iq), body, init)
    has = l > 0                                  # a row with nothing to attend to outputs 0
    o_ref[...] = (acc / jnp.where(has, l, 1)[:, None]).astype(o_ref.dtype)
    m_safe = jnp.where(m > ninf, m, zero)
    lse_ref[...] = jnp.where(has, m_safe + jnp.log(jnp.where(has, l, 1)), jnp.inf).astype(
        lse_ref.dtype)


def _num_key_tiles(g: _Geometry, iq):
    """Key tiles query tile iq sees (a scalar): up to the one holding the landmark block of the
    tile's last query; later tiles are causally masked."""
    last_block = lax.div(iq * g.bq + (g.bq - 1), g.S)
    return jnp.minimum(lax.div(last_block, g.R) + 1, g.NKT)


def _first_query_tile(g: _Geometry, kt):
    """The first query tile that sees key tile kt (a scalar; NQT or more when none does): the
    one holding the tile's first key position."""
    return lax.div(kt * (g.R * g.S), g.bq)


def _bwd_tile(g: _Geometry, q, k, v, do, lse, delta, rows, u, seg_q, seg_k, kt):
    """Recomputed weights w [bq, bk] and score gradients ds [bq, bk] (before the 1/sqrt(D));
    lse, delta [bq, 1]; rows, u, seg_q, seg_k as `_tile_masks` takes them."""
    s = _dot(q, k, trans_b=True) * g.scale
    own, past, gate, local = _tile_masks(g, rows, u, seg_q, seg_k, kt)
    w, p_top, qj, p_gate = _tile_weights(g, s, own, past, gate, local, lse)
    dp = _dot(do, v, trans_b=True)                                    # dy_i · v_j
    du = _per_block(g, local, _block_sum(g, local, qj * dp))          # dy_i · u_b
    ds_top = p_top * (jnp.where(gate, du, dp) - delta)
    ds = ds_top + p_gate * qj * (dp - du)
    return w, ds


def _dkdv_kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 *, g: _Geometry, segments: bool):
    kt = pl.program_id(0)
    k = k_ref[...]                                               # [bk, Dp]
    v = v_ref[...]
    seg_k = sk_ref[...][None, :] if segments else None
    u = (kt * g.bk + lax.iota(jnp.int32, g.bk))[None, :]
    acc_t = lse_ref.dtype

    def body(iq, carry):
        dk, dv = carry
        qslice = pl.ds(iq * g.bq, g.bq)
        q = q_ref[qslice, :]
        do = do_ref[qslice, :]
        rows = (iq * g.bq + lax.iota(jnp.int32, g.bq))[:, None]
        seg_q = sq_ref[qslice][:, None] if segments else None
        w, ds = _bwd_tile(g, q, k, v, do, lse_ref[qslice][:, None], delta_ref[qslice][:, None],
                          rows, u, seg_q, seg_k, kt)
        dv = dv + _dot(w.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    init = (jnp.zeros((g.bk, g.Dp), acc_t), jnp.zeros((g.bk, g.Dp), acc_t))
    dk, dv = lax.fori_loop(jnp.minimum(_first_query_tile(g, kt), g.NQT), g.NQT, body, init)
    dk_ref[...] = (dk * g.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               g: _Geometry, segments: bool):
    iq = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    rows = (iq * g.bq + lax.iota(jnp.int32, g.bq))[:, None]
    seg_q = sq_ref[...][:, None] if segments else None

    def body(kt, dq):
        kslice = pl.ds(kt * g.bk, g.bk)
        k = k_ref[kslice, :]
        seg_k = sk_ref[kslice][None, :] if segments else None
        u = (kt * g.bk + lax.iota(jnp.int32, g.bk))[None, :]
        _, ds = _bwd_tile(g, q, k, v_ref[kslice, :], do, lse, delta, rows, u, seg_q, seg_k, kt)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _num_key_tiles(g, iq), body, jnp.zeros((g.bq, g.Dp), lse.dtype))
    dq_ref[...] = (dq * g.scale).astype(dq_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """How the three kernels run (hashable: a custom_vjp static argument): in Pallas interpret
    mode, or compiled by Triton with `num_warps` warps per program and a `num_stages`-deep
    software pipeline."""
    interpret: bool
    num_warps: int
    num_stages: int


def _compiler_params(launch: _Launch):
    """Triton's parameters whenever the kernels are lowered for a GPU, also from a host without
    one (the tests' lowering checks, deviceless compilation: benchmarks/aot_compile.py), so those
    see the shared-memory use of the pipeline a GPU runs (Triton's default is 3 stages)."""
    if launch.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _specs(g: _Geometry):
    """BlockSpecs (grid index i, b, h) of: a query tile, all queries, a key tile, all keys, and
    the matching [B, T] segment-id slices and [B, H, T] row statistics."""
    q_tile = pl.BlockSpec((None, None, g.bq, g.Dp), lambda i, b, h: (b, h, i, 0))
    q_all = pl.BlockSpec((None, None, g.Tq, g.Dp), lambda i, b, h: (b, h, 0, 0))
    k_tile = pl.BlockSpec((None, None, g.bk, g.Dp), lambda i, b, h: (b, h, i, 0))
    k_all = pl.BlockSpec((None, None, g.Kp, g.Dp), lambda i, b, h: (b, h, 0, 0))
    sq_tile = pl.BlockSpec((None, g.bq), lambda i, b, h: (b, i))
    sq_all = pl.BlockSpec((None, g.Tq), lambda i, b, h: (b, 0))
    sk_tile = pl.BlockSpec((None, g.bk), lambda i, b, h: (b, i))
    sk_all = pl.BlockSpec((None, g.Kp), lambda i, b, h: (b, 0))
    row_tile = pl.BlockSpec((None, None, g.bq), lambda i, b, h: (b, h, i))
    row_all = pl.BlockSpec((None, None, g.Tq), lambda i, b, h: (b, h, 0))
    return q_tile, q_all, k_tile, k_all, sq_tile, sq_all, sk_tile, sk_all, row_tile, row_all


def _forward(g, segments, launch, qp, kp, vp, sq, sk):
    B, H = qp.shape[:2]
    q_tile, _, _, k_all, sq_tile, _, _, sk_all, row_tile, _ = _specs(g)
    acc_t = jnp.promote_types(jnp.float32, qp.dtype)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, segments=segments),
        grid=(g.NQT, B, H),
        in_specs=[q_tile, k_all, k_all, sq_tile, sk_all],
        out_specs=[q_tile, row_tile],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                   jax.ShapeDtypeStruct((B, H, g.Tq), acc_t)],
        compiler_params=_compiler_params(launch), interpret=launch.interpret,
        name="landmark_attention_fwd")(qp, kp, vp, sq, sk)


def _backward(g, segments, launch, qp, kp, vp, sq, sk, op, lse, dop):
    B, H = qp.shape[:2]
    q_tile, q_all, k_tile, k_all, sq_tile, sq_all, sk_tile, sk_all, row_tile, row_all = _specs(g)
    delta = jnp.sum(op.astype(lse.dtype) * dop.astype(lse.dtype), axis=-1)   # δ_i = dy_i · y_i
    cp = _compiler_params(launch)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, g=g, segments=segments),
        grid=(g.NKT, B, H),
        in_specs=[q_all, k_tile, k_tile, sq_all, sk_tile, q_all, row_all, row_all],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype),
                   jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=cp, interpret=launch.interpret,
        name="landmark_attention_dkdv")(qp, kp, vp, sq, sk, dop, lse, delta)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, g=g, segments=segments),
        grid=(g.NQT, B, H),
        in_specs=[q_tile, k_all, k_all, sq_tile, sk_all, q_tile, row_tile, row_tile],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        compiler_params=cp, interpret=launch.interpret,
        name="landmark_attention_dq")(qp, kp, vp, sq, sk, dop, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(g, segments, launch, qp, kp, vp, sq, sk):
    return _forward(g, segments, launch, qp, kp, vp, sq, sk)[0]


def _attention_fwd(g, segments, launch, qp, kp, vp, sq, sk):
    op, lse = _forward(g, segments, launch, qp, kp, vp, sq, sk)
    return op, (qp, kp, vp, sq, sk, op, lse)


def _attention_bwd(g, segments, launch, res, dop):
    qp, kp, vp, sq, sk, op, lse = res
    dq, dk, dv = _backward(g, segments, launch, qp, kp, vp, sq, sk, op, lse, dop)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _queries(g: _Geometry, x_BxTxHxD):
    """[B, T, H, D] → [B, H, Tq, Dp] (zero padded)."""
    x = jnp.swapaxes(x_BxTxHxD, 1, 2)
    D = x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, g.Tq - g.T), (0, g.Dp - D)))


def _keys(g: _Geometry, x_BxTxHxD):
    """[B, T, H, D] → block-aligned [B, H, Kp, Dp]: landmark block b's S keys at slots
    b·Pb .. b·Pb + S − 1, zeros elsewhere."""
    B, T, H, D = x_BxTxHxD.shape
    x = jnp.swapaxes(x_BxTxHxD, 1, 2)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, g.NB * g.S - T), (0, g.Dp - D)))
    x = x.reshape(B, H, g.NB, g.S, g.Dp)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, g.NBp - g.NB), (0, g.Pb - g.S), (0, 0)))
    return x.reshape(B, H, g.Kp, g.Dp)


def _segment_slots(g: _Geometry, seg_BxT):
    """segment ids [B, T] → (query side [B, Tq], key side [B, Kp]); padding is masked anyway."""
    B, T = seg_BxT.shape
    sq = jnp.pad(seg_BxT, ((0, 0), (0, g.Tq - T)))
    sk = jnp.pad(seg_BxT, ((0, 0), (0, g.NB * g.S - T))).reshape(B, g.NB, g.S)
    sk = jnp.pad(sk, ((0, 0), (0, g.NBp - g.NB), (0, g.Pb - g.S))).reshape(B, g.Kp)
    return sq, sk


def _check_args(q, k, v, mem_freq, segment_ids):
    """The kernels' shared argument checks (one [B, T, H, D] shape, a positive int mem_freq,
    segment ids [B, T] or None) → the segment ids as int32, or None."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v have shapes {q.shape}, {k.shape}, {v.shape}; they must be "
                         "one [B, T, H, D] shape")
    if (not isinstance(mem_freq, int) or isinstance(mem_freq, bool)) or mem_freq <= 0:
        raise ValueError(f"mem_freq={mem_freq!r} must be a positive integer")
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; it must be [B, T]="
                         f"{q.shape[:2]}")
    return segment_ids.astype(jnp.int32)


# Triton's pipeline depth when the caller names none: its own default of 3 overflows an A100's
# shared memory at D 128 in float32.
DEFAULT_NUM_STAGES = 2


def default_num_warps(head_dim: int) -> int:
    """Triton warps per program when the caller names none: 4 up to D 64, 8 above (the official
    kernel's rule). With 4, the dk/dv kernel spills at D 128 on an H100 (120-380 bytes at blocks
    of 64); with 8 none of the three does (results/benchmarks/aot_compile-h100-tiles.json)."""
    return 4 if head_dim <= 64 else 8


def landmark_attention_pallas(q, k, v, *, mem_freq: int, segment_ids=None, block_q: int = 64,
                              block_k: int = 64, num_warps: int | None = None,
                              num_stages: int = DEFAULT_NUM_STAGES, interpret: bool = False):
    """Landmark attention y [B, T, H, D] for the training layout (a landmark at every
    t % (mem_freq + 1) == mem_freq), by the Pallas kernels; differentiable in q, k, v.

    q, k, v [B, T, H, D] (already rotated; v's D equal to q's); segment_ids [B, T] int or None
    (attention only within equal ids). block_q, block_k: query and key tile sizes (powers of two
    ≥ 16; a key tile grows to hold at least one landmark block). num_warps (a power of two, 1 to
    16; None: 4 for D ≤ 64, else 8, the official kernel's rule) and num_stages (≥ 1): Triton's
    warps per program and pipeline depth, for all three kernels (unused in interpret mode).
    interpret: run the kernels in Pallas interpret mode (CPU). The landmark layout is assumed,
    not checked: use `models.landmark.landmark_attention(..., impl="pallas_gpu")` when it may
    differ.
    """
    segment_ids = _check_args(q, k, v, mem_freq, segment_ids)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    B, T, H, D = q.shape
    if num_warps is None:
        num_warps = default_num_warps(D)
    if (not isinstance(num_warps, int) or isinstance(num_warps, bool)
            or num_warps not in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps={num_warps!r} must be one of 1, 2, 4, 8, 16")
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be a positive integer")
    g = _Geometry.make(T, mem_freq, D, block_q, block_k)
    segments = segment_ids is not None
    if segments:
        sq, sk = _segment_slots(g, segment_ids)
    else:
        sq = jnp.zeros((B, g.Tq), jnp.int32)
        sk = jnp.zeros((B, g.Kp), jnp.int32)
    launch = _Launch(bool(interpret), num_warps, num_stages)
    y = _attention(g, segments, launch, _queries(g, q), _keys(g, k), _keys(g, v), sq, sk)
    return jnp.swapaxes(y[:, :, :T, :D], 1, 2)
