"""models/landmark_pallas_tpu.py: the Mosaic (TPU) landmark kernels, run in TPU interpret mode on
CPU, against the blockwise XLA path of models/landmark.py — outputs and gradients — their
lowering to Mosaic for real TPUs, and the impl switch's TPU side.

Tolerance 1e-5 (float32): both compute the same grouped softmax with float32 accumulation; they
differ only in summation order (online softmax over key tiles vs one softmax per query tile).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from models import landmark as lmk
from models import landmark_pallas_tpu as lpt
from models import transformer

B, H, D = 2, 2, 16
TOL = 1e-5


def _inputs(T, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in keys)


def _value_and_grads(attn):
    """jit of (q, k, v, ct, *rest) → (y, (dq, dk, dv)) for y = attn(q, k, v, *rest)."""
    @jax.jit
    def run(q, k, v, ct, *rest):
        y, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, *rest), q, k, v)
        return y, vjp(ct)
    return run


def _periodic(T, mem_freq):
    return jnp.broadcast_to(jnp.arange(T) % (mem_freq + 1) == mem_freq, (B, T))


def _assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=TOL, rtol=TOL)


@pytest.fixture(scope="module")
def xla_reference():
    """The XLA path (impl='xla'; without mem_freq, its general segment-reduction path, which
    tests/models/test_landmark.py checks against the periodic one and the dense reference)."""
    return _value_and_grads(lambda q, k, v, is_lm, seg: lmk.landmark_attention(
        q, k, v, is_lm, segment_ids=seg))


def _packed(T):
    """Segment ids [B, T]: row 0 split mid-block; row 1 split at a landmark (whose query then
    has nothing to attend to) and again mid-block."""
    t = jnp.arange(T)
    return jnp.stack([(t >= 29), (t >= 41).astype(jnp.int32) + (t >= 150)]).astype(jnp.int32)


def test_kernel_matches_xla(xla_reference):
    """T a multiple of every tile: blocks of 64 (two per 128-slot key tile), 2 key tiles, 2
    query tiles of 128 (the first sees one key tile; the second key tile is seen only by the
    second query tile); packed segments."""
    T, F = 256, 63
    q, k, v, ct = _inputs(T, 0)
    pallas = _value_and_grads(lambda q, k, v, seg: lpt.landmark_attention_pallas_tpu(
        q, k, v, mem_freq=F, segment_ids=seg, block_q=128, block_k=128, interpret=True))
    seg = _packed(T)
    _assert_close(pallas(q, k, v, ct, seg), xla_reference(q, k, v, ct, _periodic(T, F), seg))


def test_impl_pallas_tpu_sharded_matches_xla(xla_reference):
    """impl='pallas_tpu' through models.landmark on a 2 × 2 (batch × heads) mesh of fake devices
    (the kernel runs per shard, under shard_map, segment ids split by batch), default tiles
    (128, 128), T not a multiple of any tile: blocks of 41 padded to 64 slots, 3 key tiles (the
    last all padding), 2 query tiles (the first skips the third key tile); packed segments."""
    T, F = 200, 40
    q, k, v, ct = _inputs(T, 1)
    pallas = _value_and_grads(lambda q, k, v, is_lm, seg: lmk.landmark_attention(
        q, k, v, is_lm, segment_ids=seg, mem_freq=F, impl="pallas_tpu", interpret=True))
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    args = (q, k, v, ct, _periodic(T, F), _packed(T))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", ("data", "fsdp")),
                                                    ("heads", "model")]):
        traced = pallas.trace(*args)
        assert "shard_map" in str(traced.jaxpr)
        assert "landmark_attention_tpu_dkdv" in str(traced.jaxpr)
        got = traced.lower().compile()(*args)
    _assert_close(got, xla_reference(*args))


@pytest.mark.parametrize("device_kind", ["TPU v4", "TPU v5 lite"])
def test_lowers_to_mosaic(device_kind):
    """Forward and both backward kernels lower through Pallas' Mosaic lowering for a TPU
    (bfloat16, the benchmark's blocks of 64 with segments; an abstract TPU device, no chip):
    the block shapes pass its (8, 128) tiling rules and every op in the kernels has a Mosaic
    lowering. Mosaic's own compiler passes run only on a TPU."""
    T, F = 500, 63
    a = jax.ShapeDtypeStruct((B, T, H, 64), jnp.bfloat16)

    def fwd_bwd(q, k, v, seg):
        y, vjp = jax.vjp(lambda q, k, v: lpt.landmark_attention_pallas_tpu(
            q, k, v, mem_freq=F, segment_ids=seg), q, k, v)
        return y, vjp(y)

    tpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=tpu)):
        text = jax.jit(fwd_bwd).trace(a, a, a, jax.ShapeDtypeStruct((B, T), jnp.int32)).lower(
            lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


def _has_tpu_kernel(attention_impl, T=24, F=7):
    """Whether LandmarkLM with this attention_impl traces the Mosaic kernels (tracing only)."""
    model = lmk.build_from_config({"vocab_size": 32, "width": 32, "num_layers": 1,
                                   "num_heads": H, "mem_freq": F, "landmark_id": 0,
                                   "attention_impl": attention_impl})
    tokens = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, tokens))(params))
    return "landmark_attention_tpu_fwd" in jaxpr


def test_impl_selection_on_tpu(monkeypatch):
    assert lmk.resolve_impl("pallas_tpu") == "pallas_tpu"
    q, k, v, _ = _inputs(24, 3)
    with pytest.raises(ValueError, match=r"impl='pallas_tpu' is not allowed on the cpu backend"):
        lmk.landmark_attention(q, k, v, _periodic(24, 7), mem_freq=7, impl="pallas_tpu")
    # On a TPU backend (traced, not compiled): 'pallas', 'auto' and the model config select
    # the Mosaic kernels; 'pallas_gpu' is refused there.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert lmk.resolve_impl("auto", mem_freq=7) == "pallas_tpu"
    assert lmk.resolve_impl("pallas") == "pallas_tpu"
    assert lmk.resolve_impl("auto", mem_freq=7, dropout=True) == "xla"
    assert _has_tpu_kernel("auto") and _has_tpu_kernel("pallas")
    assert not _has_tpu_kernel("xla")
    with pytest.raises(ValueError, match=r"impl='pallas_gpu' is not allowed on the tpu backend"):
        _has_tpu_kernel("pallas_gpu")


def test_errors():
    T = 24
    q, k, v, _ = _inputs(T, 3)
    is_lm = _periodic(T, 7)
    with pytest.raises(ValueError, match=r"pallas_blocks=\(16, 64\) must be two powers of two "
                                         r"\(query tile ≥ 16, key tile ≥ 128\)"):
        lmk.landmark_attention(q, k, v, is_lm, mem_freq=7, impl="pallas_tpu", interpret=True,
                               pallas_blocks=(16, 64))
    with pytest.raises(ValueError, match=r"block_k=64 must be a power of two ≥ 128 on TPUs"):
        lpt.landmark_attention_pallas_tpu(q, k, v, mem_freq=7, block_k=64)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 23\)"):
        lpt.landmark_attention_pallas_tpu(q, k, v, mem_freq=7, segment_ids=jnp.zeros((1, 23)))
    body = transformer.TransformerConfig(vocab_size=32, width=32, num_layers=1, num_heads=H,
                                         attention="landmark")
    assert lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="pallas_tpu")
    with pytest.raises(ValueError, match=r"attention_impl='pallas_tpu' is not allowed with "
                                         r"group_dropout=0.1"):
        lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="pallas_tpu",
                           group_dropout=0.1)
