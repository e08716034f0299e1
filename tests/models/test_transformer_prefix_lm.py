"""models/transformer.py with prefix_lm: Birdie's prefix-LM attention (the prompt read
bidirectionally, causal after it, packed samples isolated)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=320, width=32, num_layers=2, num_heads=2, prefix_lm=True,
                        init_std=0.125)
T = 12


@pytest.fixture(scope="module")
def model():
    m = Transformer(CFG)
    params = m.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    return jax.jit(lambda p, x, seg, pre: m.apply({"params": p}, x, segment_ids=seg,
                                                  prefix=pre)), params


def _logits(model, tokens, segments, prefix):
    f, params = model
    return np.asarray(f(params, jnp.asarray(tokens)[None], jnp.asarray(segments)[None],
                        jnp.asarray(prefix)[None]))[0]


def test_the_prompt_reads_ahead_and_the_rest_is_causal(model):
    x = np.arange(1, T + 1, dtype=np.int32)
    seg = np.ones(T, np.int32)
    pre = np.arange(T) < 6                                  # prompt: positions 0..5
    base = _logits(model, x, seg, pre)
    later_prompt = x.copy()
    later_prompt[4] = 200
    changed = _logits(model, later_prompt, seg, pre)
    assert not np.allclose(changed[0], base[0])             # position 0 sees prompt position 4
    later_answer = x.copy()
    later_answer[9] = 200
    changed = _logits(model, later_answer, seg, pre)
    np.testing.assert_array_equal(changed[:9], base[:9])    # nothing before 9 sees position 9
    assert not np.allclose(changed[9], base[9])


def test_packed_samples_stay_isolated(model):
    x = np.arange(1, T + 1, dtype=np.int32)
    seg = np.array([1] * 6 + [2] * 6, np.int32)
    pre = np.array([True] * 4 + [False] * 2 + [True] * 4 + [False] * 2)
    base = _logits(model, x, seg, pre)
    y = x.copy()
    y[8] = 200                                              # the second sample's prompt
    changed = _logits(model, y, seg, pre)
    np.testing.assert_array_equal(changed[:6], base[:6])    # the first sample never sees it
    assert not np.allclose(changed[6], base[6])             # the second's prompt start does


def test_without_a_prompt_it_is_the_causal_transformer(model):
    f, params = model
    x = jnp.arange(1, T + 1, dtype=jnp.int32)[None]
    seg = jnp.ones((1, T), jnp.int32)
    causal = jax.jit(lambda p: Transformer(CFG.replace(prefix_lm=False)).apply(
        {"params": p}, x, segment_ids=seg))(params)
    np.testing.assert_array_equal(np.asarray(f(params, x, seg, jnp.zeros((1, T), bool))),
                                  np.asarray(causal))


def test_a_causal_transformer_refuses_a_prefix():
    m = Transformer(CFG.replace(prefix_lm=False))
    params = m.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    with pytest.raises(ValueError, match="prefix is given but prefix_lm=False"):
        m.apply({"params": params}, jnp.zeros((1, T), jnp.int32), prefix=jnp.ones((1, T), bool))
