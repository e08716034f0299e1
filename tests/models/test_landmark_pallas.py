"""The Pallas landmark kernels against the blockwise XLA path of models/landmark.py — outputs
and gradients — in interpret mode on CPU: models/landmark_pallas.py (GPU, Triton style) and
models/landmark_pallas_tpu.py (TPU, Mosaic; TPU interpret mode); their lowering for a GPU / TPU
without a chip, and the impl switch on each backend.

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
from models import landmark_pallas as lmp
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


T = 72    # not a multiple of any tile below


def test_kernel_with_segments_matches_xla(xla_reference):
    """Landmark blocks of 8 (two per 16-slot key tile), query tiles of 16 spanning two blocks;
    packed segments: row 0 split mid-block, row 1 at a landmark (whose query then has nothing
    to attend to) and again mid-block."""
    F = 7
    q, k, v, ct = _inputs(T, 0)
    t = jnp.arange(T)
    seg = jnp.stack([(t >= 29), (t >= 15).astype(jnp.int32) + (t >= 50)]).astype(jnp.int32)
    pallas = _value_and_grads(lambda q, k, v, seg: lmp.landmark_attention_pallas(
        q, k, v, mem_freq=F, segment_ids=seg, block_q=16, block_k=16, interpret=True))
    _assert_close(pallas(q, k, v, ct, seg), xla_reference(q, k, v, ct, _periodic(T, F), seg))


def test_impl_pallas_matches_xla_on_both_layouts(xla_reference):
    """impl='pallas' through models.landmark on a 2 × 2 (batch × heads) mesh of fake devices
    (the kernel runs per shard, under shard_map): blocks of 21 (padded to 32 slots, one per key
    tile); one compiled function, run on the training layout (the kernels) and on a non-periodic
    layout with two adjacent landmarks (the general XLA path under the same lax.cond)."""
    F = 20
    q, k, v, ct = _inputs(T, 1)
    pallas = _value_and_grads(lambda q, k, v, is_lm: lmk.landmark_attention(
        q, k, v, is_lm, mem_freq=F, impl="pallas", interpret=True, pallas_blocks=(16, 16)))
    irregular = jnp.zeros((B, T), bool).at[:, jnp.array([5, 6, 30, 47])].set(True)
    one_segment = jnp.zeros((B, T), jnp.int32)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", ("data", "fsdp")),
                                                    ("heads", "model")]):
        assert "shard_map" in str(jax.make_jaxpr(pallas)(q, k, v, ct, irregular))
        got = [pallas(q, k, v, ct, is_lm) for is_lm in (_periodic(T, F), irregular)]
    for is_lm, g in zip((_periodic(T, F), irregular), got):
        _assert_close(g, xla_reference(q, k, v, ct, is_lm, one_segment))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_every_path_computes_the_official_triton_kernel(reference_dir, impl):
    """The official fused Triton kernel (epfml/landmark-attention's flash_landmark_attention.py,
    which benchmarks/landmark_attention.py times ours against on a GPU) run in Triton's CPU
    interpreter (tests/data/landmark/README.md, case G): the XLA path and both Pallas kernels at
    their default tiles give its outputs and q, k, v gradients, landmark rows included. Blocks of
    16 (T 64) and of 32 (T 96: not a multiple of the kernels' tiles); the Mosaic kernel, whose
    key tile of 128 holds either case whole, takes the second only (TPU interpret mode is slow)."""
    ref = np.load(reference_dir / "landmark" / "G_official_triton_kernel.npz")
    for case in ("b32",) if impl == "pallas_tpu" else ("b16", "b32"):
        q, k, v, ct, *want = (jnp.asarray(ref[f"{case}/{n}"]).transpose(0, 2, 1, 3)
                              for n in ("q", "k", "v", "cotangent", "y", "dq", "dk", "dv"))
        F = int(ref[f"{case}/mem_freq"])
        is_lm = jnp.broadcast_to(jnp.arange(q.shape[1]) % (F + 1) == F, q.shape[:2])
        run = _value_and_grads(lambda q, k, v: lmk.landmark_attention(
            q, k, v, is_lm, mem_freq=F, impl=impl, interpret=True))
        y, grads = run(q, k, v, ct)
        _assert_close((y, *grads), want)


def test_lowers_to_triton():
    """Forward and both backward kernels lower through Pallas' Triton lowering for a GPU
    (bfloat16, the benchmark's blocks of 64 with segments; an abstract H100, no GPU): every op
    of the kernels, and of the tile math they share with the Mosaic kernels, has a Triton
    lowering, and each call carries the pipeline a GPU run uses (by default 2 stages and 4 warps,
    8 above D 64: Triton's default 3 stages overflow an A100's shared memory at D 128 in
    float32, and with 4 warps dk/dv spills at D 128; the tile sweep's num_warps and num_stages
    reach all three). Triton's own compiler runs in benchmarks/aot_compile.py (the CUDA plugin,
    outside the test venv)."""
    T = 500
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                      platform="gpu")

    def lowered(seg=None, D=64, **launch):
        a = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)

        def fwd_bwd(q, k, v, *seg):
            y, vjp = jax.vjp(lambda q, k, v: lmp.landmark_attention_pallas(
                q, k, v, mem_freq=63, segment_ids=seg[0] if seg else None, **launch), q, k, v)
            return y, vjp(y)

        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                      abstract_device=gpu)):
            return jax.jit(fwd_bwd).trace(a, a, a, *[seg] * (seg is not None)).lower(
                lowering_platforms=("cuda",)).as_text()

    text = lowered(jax.ShapeDtypeStruct((B, T), jnp.int32))
    assert text.count("xla.gpu.triton") == 3
    assert text.count("num_stages = 2 : i32") == text.count("num_warps = 4 : i32") == 3
    text = lowered(num_warps=8, num_stages=3)
    assert text.count("num_stages = 3 : i32") == text.count("num_warps = 8 : i32") == 3
    text = lowered(D=128)
    assert text.count("num_stages = 2 : i32") == text.count("num_warps = 8 : i32") == 3


def _tiny_body():
    return {"vocab_size": 32, "width": 32, "num_layers": 1, "num_heads": H}


def _has_kernel(attention_impl, T=24, F=7, marker="pallas_call"):
    """Whether LandmarkLM with this attention_impl traces `marker` (a pallas_call, or the
    Mosaic forward kernel's name; tracing only)."""
    model = lmk.build_from_config({**_tiny_body(), "mem_freq": F, "landmark_id": 0,
                                   "attention_impl": attention_impl})
    tokens = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return marker in str(jax.make_jaxpr(lambda p: model.apply(p, tokens))(params))


def test_auto_is_xla_on_cpu_and_pallas_on_gpu(monkeypatch, h100_mesh):
    assert jax.default_backend() == "cpu"
    assert lmk.resolve_impl("auto", mem_freq=7) == "xla"
    assert lmk.resolve_impl("pallas", mem_freq=7) == "pallas_gpu"   # interpret mode only
    assert not _has_kernel("auto")
    with pytest.raises(ValueError, match=r"impl='pallas' is not allowed on the cpu backend"):
        _has_kernel("pallas")
    # Traced for a GPU mesh on this CPU host (a dry run's compile-only devices): the GPU kernels.
    with jax.sharding.use_abstract_mesh(h100_mesh):
        assert lmk.resolve_impl("auto", mem_freq=7) == "pallas_gpu"
    # On a GPU backend (traced, not compiled): 'auto' and the model config select the kernels.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert lmk.resolve_impl("auto", mem_freq=7) == "pallas_gpu"
    assert lmk.resolve_impl("pallas") == "pallas_gpu"
    assert lmk.resolve_impl("auto", mem_freq=None) == "xla"
    assert lmk.resolve_impl("auto", mem_freq=7, dropout=True) == "xla"
    assert _has_kernel("auto") and _has_kernel("pallas") and not _has_kernel("xla")
    # The TPU side: tests/models/test_landmark_pallas_tpu.py.


def test_errors():
    T = 24
    q, k, v, _ = _inputs(T, 3)
    is_lm = _periodic(T, 7)
    with pytest.raises(ValueError, match=r"impl='cuda' must be one of"):
        lmk.landmark_attention(q, k, v, is_lm, mem_freq=7, impl="cuda")
    with pytest.raises(ValueError, match=r"mem_freq=None is not allowed with impl='pallas'"):
        lmk.landmark_attention(q, k, v, is_lm, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match=r"group_dropout=0.1 is not allowed with impl='pallas'"):
        lmk.landmark_attention(q, k, v, is_lm, mem_freq=7, impl="pallas", interpret=True,
                               group_dropout=0.1, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"pallas_blocks=\(16, 24\) must be two powers of two"):
        lmk.landmark_attention(q, k, v, is_lm, mem_freq=7, impl="pallas", interpret=True,
                               pallas_blocks=(16, 24))
    with pytest.raises(ValueError, match=r"block_k=8 must be a power of two ≥ 16"):
        lmp.landmark_attention_pallas(q, k, v, mem_freq=7, block_k=8)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 23\)"):
        lmp.landmark_attention_pallas(q, k, v, mem_freq=7, segment_ids=jnp.zeros((1, 23)))
    with pytest.raises(ValueError, match=r"num_warps=3 must be one of 1, 2, 4, 8, 16"):
        lmp.landmark_attention_pallas(q, k, v, mem_freq=7, num_warps=3)
    with pytest.raises(ValueError, match=r"num_stages=0 must be a positive integer"):
        lmp.landmark_attention_pallas(q, k, v, mem_freq=7, num_stages=0)
    body = transformer.TransformerConfig(**_tiny_body(), attention="landmark")
    with pytest.raises(ValueError, match=r"attention_impl='cuda' must be one of"):
        lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="cuda")
    with pytest.raises(ValueError, match=r"attention_impl='pallas' is not allowed with "
                                         r"group_dropout=0.1"):
        lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="pallas", group_dropout=0.1)


# ---------------------------------------------------------------------------------------------
# The Mosaic (TPU) kernels, in TPU interpret mode
# ---------------------------------------------------------------------------------------------
def _packed(T):
    """Segment ids [B, T]: row 0 split mid-block; row 1 split at a landmark (whose query then
    has nothing to attend to) and again mid-block."""
    t = jnp.arange(T)
    return jnp.stack([(t >= 29), (t >= 41).astype(jnp.int32) + (t >= 150)]).astype(jnp.int32)


def test_tpu_kernel_matches_xla(xla_reference):
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


def _has_tpu(attention_impl):
    return _has_kernel(attention_impl, marker="landmark_attention_tpu_fwd")


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
    assert _has_tpu("auto") and _has_tpu("pallas")
    assert not _has_tpu("xla")
    with pytest.raises(ValueError, match=r"impl='pallas_gpu' is not allowed on the tpu backend"):
        _has_tpu("pallas_gpu")


def test_tpu_errors():
    T = 24
    q, k, v, _ = _inputs(T, 3)
    is_lm = _periodic(T, 7)
    with pytest.raises(ValueError, match=r"pallas_blocks=\(16, 64\) must be two powers of two "
                                         r"\(query tile ≥ 16, key tile ≥ 128\)"):
        lmk.landmark_attention(q, k, v, is_lm, mem_freq=7, impl="pallas_tpu", interpret=True,
                               pallas_blocks=(16, 64))
    with pytest.raises(ValueError, match=r"block_k=64 must be a power of two ≥ 128 on TPUs"):
        lpt.landmark_attention_pallas_tpu(q, k, v, mem_freq=7, block_k=64)
    body = transformer.TransformerConfig(**_tiny_body(), attention="landmark")
    assert lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="pallas_tpu")
    with pytest.raises(ValueError, match=r"attention_impl='pallas_tpu' is not allowed with "
                                         r"group_dropout=0.1"):
        lmk.LandmarkConfig(model=body, mem_freq=7, attention_impl="pallas_tpu",
                           group_dropout=0.1)
