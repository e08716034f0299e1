"""models/ssm.py: scans, decoding, causality, the bidirectional prefix, packing isolation."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers, ssm

V = 320
T = 24
P = 9  # prefix length; position P holds the start-generating token


def _unbox(tree):
    return nn.meta.unbox(tree)


def _cfg(mixer, pattern="bc", **kw):
    return ssm.SSMConfig(vocab_size=V, width=16, state_width=16, num_layers=2, mixer=mixer,
                         layer_pattern=pattern, mlp_hidden=32, hawk_heads=2, **kw)


@pytest.fixture(scope="module", params=["gated", "hawk"])
def lm(request):
    cfg = _cfg(request.param)
    model = ssm.BiSSMLM(cfg)
    tokens = jnp.zeros((1, T), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    params = _unbox(boxed)
    apply = jax.jit(lambda p, t, s, pre: model.apply({"params": p}, t, segment_ids=s, prefix=pre))
    return model, params, boxed, apply


_generate = jax.jit(ssm.greedy_generate, static_argnums=(0, 4))


def _tokens(key, shape=(2, T)):
    return jax.random.randint(key, shape, 0, 256, dtype=jnp.int32)


def _prefix(B, length=T, p=P):
    return jnp.broadcast_to(jnp.arange(length)[None] < p, (B, length))


# ------------------------------------------------------------------------------------------
# The recurrence
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [0, 5])
def test_scan_equals_sequential_loop_with_gradients(reverse, chunk):
    ka, kb, kh, kw = jax.random.split(jax.random.key(1), 4)
    a = jax.random.uniform(ka, (2, 37, 6), minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, (2, 37, 6))
    h0 = jax.random.normal(kh, (2, 6))
    w = jax.random.normal(kw, (2, 37, 6))

    def loss(fn, a, b, h0):
        return jnp.sum(w * fn(a, b, h0))

    par = jax.jit(lambda a, b, h0: ssm.linear_recurrence(a, b, reverse=reverse,  # noqa: E731
                                                         chunk_size=chunk, h0_BxD=h0))
    seq = jax.jit(lambda a, b, h0: ssm.sequential_recurrence(a, b, reverse=reverse,  # noqa: E731
                                                             h0_BxD=h0))
    # 1e-5: float32 rounding of a 37-step product/sum reassociated by the scan tree.
    chex.assert_trees_all_close(par(a, b, h0), seq(a, b, h0), atol=1e-5, rtol=1e-5)
    g_par = jax.jit(jax.grad(lambda *x: loss(par, *x), argnums=(0, 1, 2)))(a, b, h0)
    g_seq = jax.jit(jax.grad(lambda *x: loss(seq, *x), argnums=(0, 1, 2)))(a, b, h0)
    chex.assert_trees_all_close(g_par, g_seq, atol=1e-5, rtol=1e-5)
    # The explicit loop, independent of lax.scan.
    h = np.asarray(h0)
    ref = np.zeros_like(np.asarray(b))
    order = range(36, -1, -1) if reverse else range(37)
    for t in order:
        h = np.asarray(a)[:, t] * h + np.asarray(b)[:, t]
        ref[:, t] = h
    np.testing.assert_allclose(par(a, b, h0), ref, atol=1e-5, rtol=1e-5)


def test_recurrence_runs_in_float32():
    a = jnp.full((1, 8, 4), 0.9, jnp.bfloat16)
    b = jnp.ones((1, 8, 4), jnp.bfloat16)
    assert ssm.linear_recurrence(a, b).dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
def test_every_parameter_is_logically_partitioned(lm):
    _, _, boxed, _ = lm
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert leaf.value.dtype == jnp.float32


@pytest.mark.parametrize("prompt_len", [0, P])
def test_recurrent_decode_equals_parallel(lm, prompt_len):
    model, params, _, apply = lm
    tokens = _tokens(jax.random.key(2))
    seg = jnp.ones_like(tokens)
    par = apply(params, tokens, seg, _prefix(2, p=prompt_len))
    dec = jax.jit(ssm.decode, static_argnums=(0, 3))(model, params, tokens, prompt_len)
    # 2e-5: float32 reassociation (scan tree vs one step at a time) through two layers.
    chex.assert_trees_all_close(dec, par, atol=2e-5, rtol=2e-5)


def test_greedy_generate_matches_teacher_forced_argmax(lm):
    """prefill + step from a left-padded prompt reproduces the teacher-forced argmax."""
    model, params, _, apply = lm
    pad = 3
    prompt = jnp.concatenate(
        [jnp.full((2, pad), 256, jnp.int32), _tokens(jax.random.key(3), (2, P))], axis=1)
    seg_prompt = (jnp.arange(pad + P) >= pad).astype(jnp.int32)[None].repeat(2, 0)
    sg = jnp.full((2,), 300, jnp.int32)
    n = T - pad - P
    gen = _generate(model, params, prompt, sg, n, segment_ids=seg_prompt)
    full = jnp.concatenate([prompt, sg[:, None], gen[:, :-1]], axis=1)
    pos = jnp.arange(T)[None].repeat(2, 0)
    seg, pre = (pos >= pad).astype(jnp.int32), (pos >= pad) & (pos < pad + P)
    logits = apply(params, full, seg, pre)
    np.testing.assert_array_equal(jnp.argmax(logits[:, pad + P:], -1), gen)
    # The padding segment changes nothing: the bare prompt generates the same tokens.
    np.testing.assert_array_equal(_generate(model, params, prompt[:, pad:], sg, n), gen)


def test_generated_positions_are_causal(lm):
    """Changing a token at p ≥ the start-generating position changes nothing before p."""
    _, params, _, apply = lm
    tokens = _tokens(jax.random.key(4))
    seg, pre = jnp.ones_like(tokens), _prefix(2)
    base = apply(params, tokens, seg, pre)
    for p in (P, P + 1, T - 1):
        changed = tokens.at[:, p].set((tokens[:, p] + 17) % 256)
        out = apply(params, changed, seg, pre)
        np.testing.assert_array_equal(out[:, :p], base[:, :p])
        assert float(jnp.abs(out[:, p:] - base[:, p:]).max()) > 0


def test_last_prefix_token_changes_position_zero(lm):
    model, params, _, apply = lm
    tokens = _tokens(jax.random.key(5))
    seg, pre = jnp.ones_like(tokens), _prefix(2)
    changed = tokens.at[:, P - 1].set((tokens[:, P - 1] + 17) % 256)
    diff = jnp.abs(apply(params, changed, seg, pre)[:, 0] - apply(params, tokens, seg, pre)[:, 0])
    assert bool((diff.max(axis=-1) > 1e-7).all()), diff.max(axis=-1)
    # Without a prefix the same model is causal: position 0 is untouched.
    no_pre = jnp.zeros_like(pre)
    np.testing.assert_array_equal(apply(params, changed, seg, no_pre)[:, 0],
                                  apply(params, tokens, seg, no_pre)[:, 0])


def test_causal_pattern_ignores_the_prefix(lm):
    model, params, _, _ = lm
    causal = ssm.BiSSMLM(model.cfg.replace(layer_pattern="c"))  # same parameters, all causal
    apply = jax.jit(causal.apply)
    tokens = _tokens(jax.random.key(6))
    a = apply({"params": params}, tokens, prefix=_prefix(2))
    b = apply({"params": params}, tokens, prefix=jnp.zeros((2, T), bool))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk", [None, "chunk_size", "block_chunk"])
def test_packed_samples_are_isolated_exactly(lm, chunk):
    """Two samples in one row: changing either leaves the other's logits bit-identical (also with
    chunked scans and with blocks run in chunks)."""
    model, params, _, apply = lm
    if chunk:
        m = ssm.BiSSMLM(model.cfg.replace(**{chunk: 4}))
        apply = jax.jit(lambda p, t, s, pre: m.apply({"params": p}, t, segment_ids=s, prefix=pre))
    split = 11
    pos = jnp.arange(T)
    seg = jnp.where(pos < split, 1, 2)[None].repeat(2, 0)
    # sample 1: prefix [0, 6), sample 2: prefix [11, 17)
    pre = ((pos < 6) | ((pos >= split) & (pos < split + 6)))[None].repeat(2, 0)
    tokens = _tokens(jax.random.key(7))
    base = apply(params, tokens, seg, pre)
    other = _tokens(jax.random.key(8))
    first_changed = tokens.at[:, :split].set(other[:, :split])
    second_changed = tokens.at[:, split:].set(other[:, split:])
    out1 = apply(params, first_changed, seg, pre)
    out2 = apply(params, second_changed, seg, pre)
    np.testing.assert_array_equal(out1[:, split:], base[:, split:])
    np.testing.assert_array_equal(out2[:, :split], base[:, :split])
    assert float(jnp.abs(out1[:, :split] - base[:, :split]).max()) > 0
    assert float(jnp.abs(out2[:, split:] - base[:, split:]).max()) > 0
    # Sample 2 after a padding segment gives the same logits as after sample 1.
    pad_seg = jnp.where(pos < split, 0, 2)[None].repeat(2, 0)
    padded = tokens.at[:, :split].set(256)
    pad_pre = pre & (pos >= split)[None]
    np.testing.assert_array_equal(apply(params, padded, pad_seg, pad_pre)[:, split:],
                                  base[:, split:])


def test_chunked_model_matches_full_scan(lm):
    model, params, _, apply = lm
    m = ssm.BiSSMLM(model.cfg.replace(chunk_size=5))
    tokens = _tokens(jax.random.key(9))
    seg, pre = jnp.ones_like(tokens), _prefix(2)
    chunked = jax.jit(m.apply)({"params": params}, tokens, segment_ids=seg, prefix=pre)
    chex.assert_trees_all_close(chunked,
                                apply(params, tokens, seg, pre), atol=2e-5, rtol=2e-5)


def test_chunked_prefill_state_and_gradients_match_one_pass(lm, chunk=7):
    """Blocks run in chunks (7 does not divide T: the row is left-padded; a chunk that divides T
    pads by zero, the same code): the prefill's logits
    and decode state (incl. Hawk's conv buffer, after a packed first sample) and the parameter
    gradients equal the one-pass model's."""
    model, params, _, _ = lm
    m = ssm.BiSSMLM(model.cfg.replace(block_chunk=chunk))
    prompt = _tokens(jax.random.key(12))
    seg = (jnp.arange(T) >= 5).astype(jnp.int32)[None].repeat(2, 0) + 1
    prefill = lambda mdl: jax.jit(lambda p: mdl.apply(  # noqa: E731
        {"params": p}, prompt, segment_ids=seg, method=ssm.BiSSMLM.prefill))(params)
    chex.assert_trees_all_close(prefill(m), prefill(model), atol=2e-5, rtol=2e-5)

    def loss(mdl, p):
        logits = mdl.apply({"params": p}, prompt, segment_ids=seg, prefix=_prefix(2))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])
    grads = [jax.jit(jax.grad(functools.partial(loss, mdl)))(params) for mdl in (m, model)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=2e-5, rtol=2e-4)


def test_remat_keeps_parameters_logits_prefill_and_gradients(lm):
    """remat (recompute each block in the backward pass): the same parameter tree, logits,
    prefill state and gradients; the backward pass holds fewer saved residuals."""
    model, params, _, apply = lm
    m = ssm.BiSSMLM(model.cfg.replace(remat=True))
    tokens = _tokens(jax.random.key(13))
    seg, pre = jnp.ones_like(tokens), _prefix(2)
    shapes = jax.eval_shape(m.init, jax.random.key(0), tokens)["params"]
    chex.assert_trees_all_equal_shapes(_unbox(shapes), params)
    chex.assert_trees_all_close(jax.jit(m.apply)({"params": params}, tokens, segment_ids=seg,
                                                 prefix=pre), apply(params, tokens, seg, pre))
    prefill = lambda mdl: jax.jit(lambda p: mdl.apply(  # noqa: E731
        {"params": p}, tokens, segment_ids=seg, method=ssm.BiSSMLM.prefill))(params)
    chex.assert_trees_all_close(prefill(m), prefill(model))

    def loss(mdl, p):
        logits = mdl.apply({"params": p}, tokens, segment_ids=seg, prefix=pre)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])
    grads = [jax.jit(jax.grad(functools.partial(loss, mdl)))(params) for mdl in (m, model)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    # What the backward pass keeps from the forward one: less under remat.
    saved = [sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda p: jax.vjp(functools.partial(loss, mdl), p)[1], params)))
        for mdl in (m, model)]
    assert saved[0] < saved[1], saved


def test_bfloat16_compute_keeps_float32_logits(lm):
    model, params, _, _ = lm
    if model.cfg.mixer != "hawk":
        pytest.skip("one mixer is enough for the dtype check")
    model = ssm.BiSSMLM(model.cfg.replace(dtype="bfloat16"))
    tokens = _tokens(jax.random.key(11))
    out = jax.jit(model.apply)({"params": params}, tokens, prefix=_prefix(2))
    assert out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("kw, field", [
    (dict(mixer="mamba"), "mixer"),
    (dict(layer_pattern="bx"), "layer_pattern"),
    (dict(layer_pattern=""), "layer_pattern"),
    (dict(state_width=15, layer_pattern="b"), "state_width"),
    (dict(width=0), "width"),
    (dict(mixer="hawk", state_width=16, hawk_heads=3), "state_width"),
    (dict(a_min=0.99, a_max=0.9), "a_min"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(block_chunk=-1), "block_chunk"),
    (dict(dtype="int8"), "dtype"),
    (dict(init_std=0.0), "init_std"),
    (dict(mlp="relu"), "mlp"),
])
def test_config_validation(kw, field):
    base = dict(vocab_size=V, width=16, num_layers=2)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        ssm.SSMConfig(**base)


@pytest.mark.parametrize("std", [0.02, 0.125])
def test_init_std_sets_embedding_mlp_and_head(std):
    cfg = ssm.SSMConfig(vocab_size=V, width=64, num_layers=2, mlp_hidden=128,
                        tie_embeddings=False, init_std=std)
    params = _unbox(jax.jit(ssm.BiSSMLM(cfg).init)(jax.random.key(0),
                                                   jnp.zeros((1, 8), jnp.int32))["params"])
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    scaled = {k: w for k, w in flat.items()
              if w.ndim == 2 and ("embed" in k or "lm_head" in k or "['mlp']" in k)}
    assert len(scaled) == 2 + 2 * 2, sorted(flat)  # embedding, head, MLP in/out per block
    for name, w in scaled.items():
        assert abs(w.std() / std - 1) < 0.1, (name, w.std())
    # the mixer projections keep their fan-in (LeCun normal) init whatever init_std is
    w_out = flat["['blocks_0']['mixer']['w_out']['kernel']"]
    assert abs(w_out.std() * np.sqrt(w_out.shape[0]) - 1) < 0.15


def test_geglu_mlp_is_griffins_gated_mlp():
    # Hawk's `paper` MLP: W_out (gelu(W_gate x) ⊙ W_in x), exact GELU
    mlp = layers.MLP(8, "geglu")
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    p = nn.unbox(mlp.init(jax.random.key(0), x)["params"])
    k = lambda name: p[name]["kernel"]  # noqa: E731
    want = (jax.nn.gelu(x @ k("fc_gate"), approximate=False) * (x @ k("fc_in"))) @ k("fc_out")
    np.testing.assert_allclose(mlp.apply({"params": p}, x), want, rtol=1e-5, atol=1e-6)


def test_layer_pattern_cycles():
    cfg = ssm.SSMConfig(vocab_size=V, width=8, num_layers=5, layer_pattern="bcc")
    assert cfg.bidirectional == (True, False, False, True, False)
    with pytest.raises(ValueError, match="unknown fields"):
        ssm.SSMConfig.from_dict({"vocab_size": V, "depth": 3})


def test_hawk_sqrt_has_griffins_bounded_derivative():
    x = jnp.array([0.25, 1e-4, 1e-9, 0.0], jnp.float32)
    np.testing.assert_array_equal(ssm.sqrt_bounded_grad(x, 1000.0), jnp.sqrt(x))   # the value
    g = jax.grad(lambda v: ssm.sqrt_bounded_grad(v, 1000.0).sum())(x)
    # 1/(2√x) = 1, 50 where 4x ≥ 1e-6; 1000 where the true one is larger (or infinite)
    np.testing.assert_allclose(g, [1.0, 50.0, 1000.0, 1000.0], rtol=1e-5)
    with pytest.raises(ValueError, match="hawk_sqrt_max_grad=0.0 is not allowed"):
        ssm.SSMConfig(vocab_size=320, mixer="hawk", hawk_sqrt_max_grad=0.0)
