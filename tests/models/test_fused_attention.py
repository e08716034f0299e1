"""The dense LM's fused attention (TransformerConfig.attention_impl, layers.fused_attention):
which calls reach cuDNN's kernel (GPUs) or the splash kernel (TPUs), with what arguments, their
numbers against the XLA path, and the one-line refusals. Neither kernel runs on this CPU host:
cuDNN's call is checked through jax's unfused reference of the same call, the splash kernel in
Pallas interpret mode (both `interpret=True`), and the selection by tracing under a GPU's or a
TPU's abstract mesh (what a dry run for that chip traces under)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from models import layers
from models.transformer import KVCache, Transformer, TransformerConfig, init_cache


def _qkv(T, dtype=jnp.float32, B=2, H=4, Dh=16):
    ks = jax.random.split(jax.random.key(T), 3)
    return tuple(jax.random.normal(k, (B, T, H, Dh), jnp.float32).astype(dtype) for k in ks)


def _value_and_grads(fn, q, k, v, **kw):
    """fn's output and its q, k, v gradients of a non-linear readout."""
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kw)))   # noqa: E731
    return (fn(q, k, v, **kw),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("T,window", [(33, 0), (33, 5)])
def test_the_cudnn_call_is_dense_causal_attention(T, window):
    # The arguments fused_attention gives cuDNN's kernel (is_causal, the window as its
    # local_window_size), run by jax's unfused reference: the XLA path's numbers.
    q, k, v = _qkv(T)
    want = layers.dot_product_attention(q, k, v, window=window)
    got = layers.fused_attention(q, k, v, impl="cudnn", interpret=True, window=window)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if window:   # the window is honoured, not dropped
        full = layers.dot_product_attention(q, k, v)
        assert float(jnp.max(jnp.abs(full - got))) > 1e-3


def _packed(T):
    """Two rows of three packed samples each, at different cuts."""
    pos = jnp.arange(T)[None]
    return ((pos >= jnp.array([[90], [40]])).astype(jnp.int32)
            + (pos >= jnp.array([[200], [300]])).astype(jnp.int32))


@pytest.mark.parametrize("T,window,packed", [(384, 0, False), (256, 37, False), (256, 0, True)])
def test_splash_matches_the_xla_path(T, window, packed):
    # The splash kernel in interpret mode (tiles of 128 at T 384, of 256 at T 256): outputs and
    # gradients of the XLA path to 1e-5 in float32, causal, with a window and with packed rows.
    q, k, v = _qkv(T, H=2, Dh=64)
    kw = dict(window=window, segment_ids=_packed(T) if packed else None)
    want = _value_and_grads(layers.dot_product_attention, q, k, v, **kw)
    got = _value_and_grads(layers.fused_attention, q, k, v, impl="splash", interpret=True, **kw)
    _assert_close(got, want)


def test_splash_runs_per_shard_under_a_mesh():
    # Under a 2 × 2 (batch × heads) mesh of fake devices the kernel runs under shard_map on each
    # device's rows and heads: the same numbers.
    q, k, v = _qkv(256, B=4, H=4, Dh=64)
    seg = jnp.concatenate([_packed(256), _packed(256)])
    want = _value_and_grads(layers.dot_product_attention, q, k, v, segment_ids=seg)
    fn = jax.jit(lambda q, k, v: _value_and_grads(layers.fused_attention, q, k, v, impl="splash",
                                                  interpret=True, segment_ids=seg))
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", ("data", "fsdp")),
                                                    ("heads", "model")]):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        got = fn(q, k, v)
    _assert_close(got, want)


def test_splash_lowers_to_mosaic(v5e_mesh):
    # Forward and backward (one fused dq/dk/dv kernel) lower through Pallas' Mosaic lowering for
    # a TPU, bfloat16; Mosaic's compiler itself runs in a dry run with libtpu (README).
    a = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)

    def fwd_bwd(q, k, v):
        y, vjp = jax.vjp(lambda q, k, v: layers.fused_attention(q, k, v, impl="splash"), q, k, v)
        return y, vjp(y)

    with jax.sharding.use_abstract_mesh(v5e_mesh):
        text = jax.jit(fwd_bwd).trace(a, a, a).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2


class _Recorder:
    """Stands in for jax.nn.dot_product_attention on a CPU host: records each call's
    implementation and runs jax's reference ("xla") with the same arguments."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, *args, implementation=None, **kwargs):
        self.calls.append(dict(implementation=implementation, **kwargs))
        return self.original(*args, implementation="xla", **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder(jax.nn.dot_product_attention)
    monkeypatch.setattr(jax.nn, "dot_product_attention", rec)
    return rec


def _model(**kw):
    cfg = dict(vocab_size=64, width=32, num_layers=2, num_heads=2, dtype="bfloat16")
    return Transformer(TransformerConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def params():
    tokens = jnp.zeros((2, 16), jnp.int32)
    return _model().init(jax.random.key(0), tokens)


def test_auto_runs_cudnn_for_a_gpu_mesh_and_xla_elsewhere(recorder, params, h100_mesh):
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    want = _model().apply(params, tokens)
    # On the CPU host's own backend: the XLA path, no kernel call.
    _model(attention_impl="auto").apply(params, tokens)
    assert recorder.calls == []
    # Traced for a GPU (a dry run's mesh, or a GPU host): every layer calls cuDNN, causally.
    with jax.sharding.use_abstract_mesh(h100_mesh):
        assert layers.target_backend() == "gpu"
        got = _model(attention_impl="auto").apply(params, tokens)
        assert [c["implementation"] for c in recorder.calls] == ["cudnn", "cudnn"]
        assert all(c["is_causal"] and c["local_window_size"] is None for c in recorder.calls)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=2e-2)
        # A sliding window reaches the kernel as its left window.
        recorder.calls.clear()
        _model(attention_impl="cudnn", window=4).apply(params, tokens)
        assert [c["local_window_size"] for c in recorder.calls] == [(3, 0), (3, 0)]


def test_auto_falls_back_where_cudnn_does_not_serve(recorder, params, h100_mesh):
    tokens = jnp.zeros((2, 16), jnp.int32)
    with jax.sharding.use_abstract_mesh(h100_mesh):
        # float32 activations, packed rows, KV-cache decoding: the XLA path.
        _model(attention_impl="auto", dtype="float32").apply(params, tokens)
        _model(attention_impl="auto").apply(params, tokens,
                                            segment_ids=jnp.ones((2, 16), jnp.int32))
        cache = init_cache(_model().cfg, 2, 20)
        _, cache = _model(attention_impl="cudnn").apply(params, tokens[:, :4], kv_cache=cache)
        assert isinstance(cache, KVCache) and int(cache.length) == 4
        assert recorder.calls == []
        # 'cudnn' refuses packed rows instead of running them unfused.
        with pytest.raises(ValueError, match=r"attention_impl='cudnn' is not allowed with "
                                             r"segment_ids"):
            _model(attention_impl="cudnn").apply(params, tokens,
                                                 segment_ids=jnp.ones((2, 16), jnp.int32))


def _traces_splash(model, params, tokens, **kw):
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, tokens, **kw))(params)
    return "pallas_call" in str(jaxpr)


def test_auto_runs_splash_for_a_tpu_mesh(params, v5e_mesh):
    tokens = jnp.zeros((2, 256), jnp.int32)
    assert not _traces_splash(_model(attention_impl="auto"), params, tokens)
    with jax.sharding.use_abstract_mesh(v5e_mesh):
        assert _traces_splash(_model(attention_impl="auto"), params, tokens)
        assert _traces_splash(_model(attention_impl="auto"), params, tokens,
                              segment_ids=jnp.ones((2, 256), jnp.int32))   # packed rows too
        # a row the kernel does not tile: XLA under 'auto', refused under 'splash'
        assert not _traces_splash(_model(attention_impl="auto"), params, tokens[:, :200])
        with pytest.raises(ValueError, match=r"attention_impl='splash' is not allowed with "
                                             r"seq_len=200 \(the splash kernel takes multiples "
                                             r"of 128\)"):
            _model(attention_impl="splash").apply(params, tokens[:, :200])


@pytest.mark.parametrize("impl,backend", [("cudnn", "gpu"), ("splash", "tpu")])
def test_a_kernel_needs_its_backend(params, impl, backend):
    tokens = jnp.zeros((2, 128), jnp.int32)
    with pytest.raises(ValueError, match=rf"attention_impl='{impl}' needs the {backend} "
                                         r"backend, not cpu; use 'auto'"):
        _model(attention_impl=impl).apply(params, tokens)


@pytest.mark.parametrize("kw,match", [
    (dict(attention_impl="flash"), r"attention_impl='flash' is not allowed; use one of"),
    (dict(attention_impl="cudnn", dtype="float32"),
     r"attention_impl='cudnn' is not allowed with dtype=float32 \(cuDNN takes bfloat16 or "
     r"float16\)"),
    (dict(attention_impl="cudnn", head_dim=12),
     r"attention_impl='cudnn' is not allowed with head_dim=12"),
    (dict(attention_impl="cudnn", prefix_lm=True),
     r"attention_impl='cudnn' is not allowed with prefix_lm=True"),
    (dict(attention_impl="splash", prefix_lm=True),
     r"attention_impl='splash' is not allowed with prefix_lm=True"),
    (dict(attention_impl="auto", attention="landmark"),
     r"attention_impl='auto' is for dense attention; attention='landmark' takes"),
])
def test_config_refuses_in_one_line(kw, match):
    base = dict(vocab_size=64, width=32, num_layers=2, num_heads=2, dtype="bfloat16")
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**base, **kw})
