"""The dense LM's fused attention (TransformerConfig.attention_impl, layers.fused_attention):
which calls reach cuDNN's kernel, with what arguments, and the one-line refusals. cuDNN itself
needs a GPU: on CPU the kernel's call is checked through jax's unfused reference of the same
call (kernel="xla"), and the selection by recording the call a GPU trace would make."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models.transformer import KVCache, Transformer, TransformerConfig, init_cache

def _qkv(T, dtype=jnp.float32, B=2, H=4, Dh=16):
    ks = jax.random.split(jax.random.key(T), 3)
    return tuple(jax.random.normal(k, (B, T, H, Dh), jnp.float32).astype(dtype) for k in ks)


@pytest.mark.parametrize("T,window", [(16, 0), (33, 0), (33, 5), (24, 1)])
def test_the_kernels_call_is_dense_causal_attention(T, window):
    # The arguments fused_attention gives jax's kernel (is_causal, the window as
    # local_window_size), run by jax's unfused reference: the XLA path's numbers.
    q, k, v = _qkv(T)
    want = layers.dot_product_attention(q, k, v, window=window)
    got = layers.fused_attention(q, k, v, impl="cudnn", kernel="xla", window=window)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if window:   # the window is honoured, not dropped
        full = layers.dot_product_attention(q, k, v)
        assert float(jnp.max(jnp.abs(full - got))) > 1e-3


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


def test_cudnn_needs_a_gpu(params):
    tokens = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs the gpu backend, not "
                                         r"cpu; use 'auto'"):
        _model(attention_impl="cudnn").apply(params, tokens)


@pytest.mark.parametrize("kw,match", [
    (dict(attention_impl="flash"), r"attention_impl='flash' is not allowed; use one of"),
    (dict(attention_impl="cudnn", dtype="float32"),
     r"attention_impl='cudnn' is not allowed with dtype=float32 \(cuDNN takes bfloat16 or "
     r"float16\)"),
    (dict(attention_impl="cudnn", head_dim=12),
     r"attention_impl='cudnn' is not allowed with head_dim=12"),
    (dict(attention_impl="cudnn", prefix_lm=True),
     r"attention_impl='cudnn' is not allowed with prefix_lm=True"),
    (dict(attention_impl="auto", attention="landmark"),
     r"attention_impl='auto' is for dense attention; attention='landmark' takes"),
])
def test_config_refuses_in_one_line(kw, match):
    base = dict(vocab_size=64, width=32, num_layers=2, num_heads=2, dtype="bfloat16")
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**base, **kw})
