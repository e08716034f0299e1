"""models/landmark.py: parity with the official landmark-attention code (reference A, D, E, F),
blockwise == dense, the LM, the converter and memory inference.

Reference vectors and tolerances: tests/data/landmark/README.md. Official layouts are
(B, H, T, D); mnemax's are [B, T, H, D].
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memory import block_cache
from models import landmark as lmk
from models import landmark_convert as lmk_convert
from models import landmark_memory as lmk_memory
from models import layers, transformer

TR = lambda x: np.transpose(np.asarray(x), (0, 2, 1, 3))  # noqa: E731  (B,H,T,D) ↔ [B,T,H,D]


@pytest.fixture
def x64():
    """float64 for this test only (other test modules expect float32 defaults)."""
    with jax.enable_x64(True):
        yield


def _ref(reference_dir, name):
    return np.load(reference_dir / "landmark" / name)


def _jit_vjp(fn, q, k, v, ct):
    """(y, (dq, dk, dv)) of fn at q, k, v with cotangent ct, compiled as one function."""
    @jax.jit
    def run(q, k, v, ct):
        y, vjp = jax.vjp(fn, q, k, v)
        return y, vjp(ct)
    return run(q, k, v, ct)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# A: training attention (grouped softmax) — probs, y and the VJP
# ---------------------------------------------------------------------------------------------
def _check_A(ref, dtype, suffix, tol):
    q, k, v, ct = (jnp.asarray(TR(ref[n]).astype(dtype)) for n in ("q", "k", "v", "cotangent"))
    m = jnp.asarray(ref["is_mem"])
    p = jax.jit(lmk.landmark_attention_weights)(q, k, m)
    assert p.dtype == dtype
    assert _maxdiff(p, ref["probs_" + suffix]) <= tol
    versions = {"dense": lmk.landmark_attention_dense,
                # q_block 16 on T = 40: three tiles, the last one partial
                "blockwise": lambda q, k, v, m: lmk.landmark_attention(q, k, v, m, q_block=16)}
    for name, fn in versions.items():
        y, (dq, dk, dv) = _jit_vjp(lambda q, k, v, fn=fn: fn(q, k, v, m), q, k, v, ct)
        for got, key in ((y, "y"), (dq, "dq"), (dk, "dk"), (dv, "dv")):
            err = _maxdiff(TR(got), ref[f"{key}_{suffix}"])
            # README tolerance: float32 1e-5, float64 1e-12 (measured: 7e-7 and 2e-15)
            assert err <= tol, (name, key, err)


def test_A_parity_float32(reference_dir):
    _check_A(_ref(reference_dir, "A_lm_benchmark_grouped_softmax.npz"), np.float32, "f32", 1e-5)


def test_A_parity_float64(reference_dir, x64):
    _check_A(_ref(reference_dir, "A_lm_benchmark_grouped_softmax.npz"), np.float64, "f64", 1e-12)


# ---------------------------------------------------------------------------------------------
# Semantics beyond the vectors: blockwise == dense, edge cases
# ---------------------------------------------------------------------------------------------
def _irregular_inputs(dtype, T=37, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, T, 3, 8)).astype(dtype)) for _ in range(3))
    lm = np.zeros((2, T), bool)
    lm[0, [0, 5, 6, 13, 20, 29, 36]] = True      # starts with a landmark, two in a row, at the end
    lm[1, rng.random(T) < 0.2] = True
    return q, k, v, jnp.asarray(lm)


def _grads_close(fn_a, fn_b, q, k, v, tol):
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(q.dtype))
    outs = [_jit_vjp(fn, q, k, v, ct) for fn in (fn_a, fn_b)]
    for x, y in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        assert _maxdiff(x, y) <= tol


def test_blockwise_equals_dense_irregular_landmarks_and_segments(x64):
    # general path: landmarks anywhere (window starts with one, two in a row, one at the end),
    # packed segments, 5 query tiles with a partial last one; float64 so that "identical" is tight
    q, k, v, lm = _irregular_inputs(np.float64)
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 17], 2, axis=0))
    _grads_close(lambda q, k, v: lmk.landmark_attention_dense(q, k, v, lm, segment_ids=seg),
                 lambda q, k, v: lmk.landmark_attention(q, k, v, lm, segment_ids=seg, q_block=8),
                 q, k, v, 1e-13)


def test_blockwise_training_layout_fast_path_equals_dense(x64):
    # mem_freq given and is_landmark in the insert_landmarks layout: the reshape-based tiles run;
    # the reversed layout is not periodic from t = 0, so the same call falls back (lax.cond)
    q, k, v, _ = _irregular_inputs(np.float64)
    lm = jnp.asarray(np.broadcast_to(np.arange(37) % 5 == 4, (2, 37)))
    fast = jax.jit(lambda q, k, v, m: lmk.landmark_attention(q, k, v, m, q_block=20, mem_freq=4))
    _grads_close(lambda q, k, v: lmk.landmark_attention_dense(q, k, v, lm),
                 lambda q, k, v: fast(q, k, v, lm), q, k, v, 1e-13)
    flipped = lm[:, ::-1]
    assert _maxdiff(fast(q, k, v, flipped),
                    jax.jit(lmk.landmark_attention_dense)(q, k, v, flipped)) <= 1e-13


def test_fast_path_gradient_finite_when_a_gate_dominates_the_own_block():
    # A query whose own-block scores sit 60 below an earlier block's gate: the own block's sum of
    # exp is ~1e-26, its square underflows in float32. It must not reach a divisor, or the
    # discarded branch puts 0/0 into the gradient (a tiny training run hit exactly this NaN).
    T, S = 8, 4                                        # mem_freq 3: landmarks at 3 and 7
    lm = jnp.asarray(np.arange(T) % S == S - 1)[None]
    q = jnp.ones((1, T, 1, 1), jnp.float32)
    k = jnp.zeros((1, T, 1, 1), jnp.float32).at[0, 3, 0, 0].set(60.0)
    v = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, 1, 1)), jnp.float32)
    fast = lambda q, k, v: lmk.landmark_attention(q, k, v, lm, mem_freq=S - 1)  # noqa: E731
    y, grads = _jit_vjp(fast, q, k, v, jnp.ones_like(v))
    y_ref, grads_ref = _jit_vjp(lambda q, k, v: lmk.landmark_attention_dense(q, k, v, lm),
                                q, k, v, jnp.ones_like(v))
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert _maxdiff(y, y_ref) <= 1e-6
    for g, g_ref in zip(grads, grads_ref):
        assert _maxdiff(g, g_ref) <= 1e-5


def test_weights_semantics_edge_cases():
    q, k, v, lm = _irregular_inputs(np.float32)
    p = np.asarray(jax.jit(lmk.landmark_attention_weights)(q, k, lm))
    lm = np.asarray(lm)
    T = lm.shape[1]
    assert np.all(np.triu(p, 1) == 0)                                   # causal
    assert np.all(p[:, :, :, :][np.broadcast_to(lm[:, None, None, :], p.shape)] == 0)  # no lm value
    # row 0 of batch 0 is a landmark at the window start: nothing to attend → all zero
    assert np.all(p[0, :, 0] == 0)
    # batch 0 starts with a landmark (an empty block): later rows lose that gate's share
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.asarray(k)) / np.sqrt(8)
    i = 10                                       # block of rows 7..12; gates at 0, 5, 6
    ids = np.cumsum(lm[0]) - lm[0]
    own = [j for j in range(i + 1) if not lm[0, j] and ids[j] == ids[i]]
    gates = [j for j in range(i) if lm[0, j] and ids[j] < ids[i]]
    e = np.exp(s[0, :, i, own + gates] - s[0, :, i, own + gates].max(0))
    p_top = e / e.sum(0)
    lost = p_top[len(own)] + p_top[len(own) + 2]    # gates 0 and 6 close empty blocks
    np.testing.assert_allclose(p[0, :, i].sum(-1), 1 - lost, rtol=1e-5)
    # batch 1 never starts with a landmark... unless it does; rows whose blocks are all non-empty
    # sum to one
    ids1 = np.cumsum(lm[1]) - lm[1]
    for r in range(T):
        blocks = set(ids1[: r + 1][~lm[1, : r + 1]])
        if not lm[1, r] and blocks == set(range(ids1[r] + 1)):
            np.testing.assert_allclose(p[1, :, r].sum(-1), 1.0, rtol=1e-5)


def test_bad_attention_inputs_raise():
    q = jnp.zeros((1, 4, 2, 4))
    with pytest.raises(ValueError, match="is_landmark has shape"):
        lmk.landmark_attention(q, q, q, jnp.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="is_landmark has dtype"):
        lmk.landmark_attention(q, q, q, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="k has shape"):
        lmk.landmark_attention_weights(q, jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 4), bool))
    with pytest.raises(ValueError, match="q_block"):
        lmk.landmark_attention(q, q, q, jnp.zeros((1, 4), bool), q_block=0)
    with pytest.raises(ValueError, match="mem_freq"):
        lmk.insert_landmarks(jnp.zeros((1, 4), jnp.int32), 0, 3)


# ---------------------------------------------------------------------------------------------
# D: RoPE
# ---------------------------------------------------------------------------------------------
def test_D_rotary_parity(reference_dir, x64):
    ref = _ref(reference_dir, "D_rotary_lm_benchmark.npz")
    np.testing.assert_array_equal(np.asarray(layers.rope_frequencies(16), np.float64), ref["freqs"])
    y = layers.apply_rope(jnp.asarray(TR(ref["x"])), jnp.asarray(ref["indices"]))
    assert _maxdiff(TR(y), ref["y"]) <= 1e-12          # README tolerance (measured 0)


# ---------------------------------------------------------------------------------------------
# Landmark tokens, targets, positions
# ---------------------------------------------------------------------------------------------
def test_insert_landmarks_targets_positions():
    raw = jnp.arange(1, 12)[None]                      # 11 tokens, mem_freq 3
    aug = lmk.insert_landmarks(raw, 3, 99)
    assert aug.tolist() == [[1, 2, 3, 99, 4, 5, 6, 99, 7, 8, 9, 99, 10, 11]]
    batch = lmk.make_landmark_batch(jnp.arange(1, 13)[None], 3, 99)
    assert batch["inputs"].tolist() == aug.tolist()
    # token 3 (followed by a landmark) predicts 4; landmark targets are ignored
    assert batch["targets"].tolist() == [[2, 3, 4, -1, 5, 6, 7, -1, 8, 9, 10, -1, 11, 12]]
    assert batch["is_landmark"].tolist() == (aug == 99).tolist()
    assert batch["positions"].tolist() == [list(range(14))]
    lm = batch["is_landmark"]
    pos = lmk.landmark_positions(jnp.repeat(lm, 64, 0), key=jax.random.key(0), max_jump=5)
    step = np.diff(np.asarray(pos), axis=1)
    after_lm = np.asarray(lm[0, :-1])
    assert np.all(step[:, ~after_lm] == 1)             # jumps only right after a landmark
    assert np.all((step[:, after_lm] >= 1) & (step[:, after_lm] <= 5))
    assert len(np.unique(step[:, after_lm])) > 1
    with pytest.raises(ValueError, match="PRNG key"):
        lmk.landmark_positions(lm, max_jump=3)


# ---------------------------------------------------------------------------------------------
# E: the tiny official GPT, full forward and memory inference, through the converter
# ---------------------------------------------------------------------------------------------
def _E(reference_dir):
    path = reference_dir / "landmark" / "E_tiny_gpt_landmark.npz"
    cfg = lmk.official_gpt_config(vocab_size=64, n_embd=32, n_head=2, n_layer=2, mem_freq=7,
                                  landmark_id=63, dtype=jnp.float64)
    return np.load(path), cfg, lmk_convert.params_from_torch(path, cfg, prefix="param/")


def test_E_full_forward_parity(reference_dir, x64):
    ref, cfg, params = _E(reference_dir)
    aug = lmk.insert_landmarks(jnp.asarray(ref["raw_tokens"]), 7, 63)
    np.testing.assert_array_equal(np.asarray(aug), ref["aug_tokens"])
    logits = jax.jit(lmk.LandmarkLM(cfg).apply)({"params": params}, aug)
    assert logits.dtype == jnp.float64
    assert _maxdiff(logits, ref["logits_full_aug"]) <= 1e-9     # README tolerance (measured 3e-16)
    # the same params drive the baseline Transformer given landmark attention as its function
    logits_t = jax.jit(lambda p, t: transformer.Transformer(
        cfg.model, attention_fn=lmk.ATTENTION_FNS["landmark"]).apply(
        {"params": p}, t, attention_kwargs={"is_landmark": t == 63}))(params, aug)
    assert _maxdiff(logits_t, ref["logits_full_aug"]) <= 1e-9


@pytest.mark.parametrize("k,size,mid", [(2, 3, 20), (1, 2, 15), (3, 4, 25)])
def test_E_memory_inference_parity(reference_dir, x64, k, size, mid):
    ref, cfg, params = _E(reference_dir)
    logits = lmk_memory.memory_logits(params, cfg, ref["raw_tokens"], chunk_len=mid, top_k=k,
                                      cache_blocks=size)
    assert logits.shape == (2, 70, 64)
    err = _maxdiff(logits, ref[f"logits_memcache_k{k}_size{size}_mid{mid}"])
    assert err <= 1e-9                                          # README tolerance (measured 3e-16)


def test_memory_inference_batch_rows_are_independent(reference_dir, x64):
    ref, cfg, params = _E(reference_dir)
    both = lmk_memory.memory_logits(params, cfg, ref["raw_tokens"], chunk_len=20, top_k=2,
                                    cache_blocks=3, selection="max_over_tokens")
    one = lmk_memory.memory_logits(params, cfg, ref["raw_tokens"][1:], chunk_len=20, top_k=2,
                                   cache_blocks=3, selection="max_over_tokens")
    assert _maxdiff(both[1:], one) <= 1e-12
    # unbounded mode (cache_blocks=None) with top_k = every block: the first chunk's logits equal
    # the full forward (nothing to retrieve yet), and everything stays finite
    full, retrieved = lmk_memory.memory_logits(params, cfg, ref["raw_tokens"], chunk_len=30,
                                               top_k=2, cache_blocks=None, return_retrieved=True)
    assert np.all(np.isfinite(np.asarray(full)))
    aug_logits = np.asarray(ref["logits_full_aug"])
    raw_rows = [t for t in range(80) if t % 8 != 7][:30]
    assert _maxdiff(full[:, :30], aug_logits[:, raw_rows]) <= 1e-9
    r = np.asarray(retrieved[1][0])                             # chunk 1, layer 0: [B, H, T, k]
    assert r.min() >= 0 and r.max() < 30 // 7                   # blocks held after chunk 0


def test_bad_memory_arguments_raise(reference_dir, x64):
    ref, cfg, params = _E(reference_dir)
    raw = ref["raw_tokens"][:, :10]
    with pytest.raises(ValueError, match="selection"):
        lmk_memory.memory_logits(params, cfg, raw, chunk_len=5, top_k=1, cache_blocks=2,
                                 selection="max_over_everything")
    with pytest.raises(ValueError, match="top_k"):
        lmk_memory.memory_logits(params, cfg, raw, chunk_len=5, top_k=3, cache_blocks=2)
    with pytest.raises(ValueError, match="chunk_len"):
        lmk_memory.memory_logits(params, cfg, raw, chunk_len=0, top_k=1, cache_blocks=2)


def test_converter_names_missing_and_misshaped_entries(reference_dir, x64):
    ref, cfg, _ = _E(reference_dir)
    sd = {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}
    bad = dict(sd)
    del bad["transformer.h.1.ln_2.weight"]
    bad["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"][:64]
    with pytest.raises(ValueError) as e:
        lmk_convert.params_from_torch(bad, cfg)
    assert "transformer.h.1.ln_2.weight" in str(e.value)
    assert "transformer.h.0.attn.c_attn.weight" in str(e.value) and "(96, 32)" in str(e.value)
    wrong_rope = dict(sd, **{"transformer.wpe.freqs": sd["transformer.wpe.freqs"] * 2})
    with pytest.raises(ValueError, match="wpe.freqs"):
        lmk_convert.params_from_torch(wrong_rope, cfg)
    # a dict with torch.compile's prefix converts like the plain one
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}
    a, b = lmk_convert.params_from_torch(sd, cfg), lmk_convert.params_from_torch(compiled, cfg)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))
    with pytest.raises(ValueError, match="must be a LandmarkConfig"):
        lmk_convert.params_from_torch(sd, cfg.model)


def test_converter_reads_safetensors(reference_dir, tmp_path, x64):
    st = pytest.importorskip("safetensors.numpy")
    ref, cfg, params = _E(reference_dir)
    sd = {k[len("param/"):]: np.ascontiguousarray(ref[k]) for k in ref.files
          if k.startswith("param/")}
    path = tmp_path / "model.safetensors"
    st.save_file(sd, str(path))
    again = lmk_convert.params_from_torch(path, cfg)
    same = jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), params, again)
    assert all(jax.tree_util.tree_leaves(same))


# ---------------------------------------------------------------------------------------------
# F: one attention layer with memory (what memory_logits is built from)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", lmk_memory.SELECTIONS)
def test_F_memory_attention_layer_parity(reference_dir, x64, selection):
    ref = _ref(reference_dir, "F_memcache_attention_layer.npz")
    x, W, Wp = jnp.asarray(ref["x"]), ref["W_attn"], ref["W_proj"]
    is_mem = jnp.asarray(ref["is_mem"])
    B, C, H, Dh, F, K = 2, 32, 2, 16, int(ref["mem_freq"]), int(ref["topk"])
    cache = block_cache.init(batch=B, capacity=int(ref["mem_cache_size"]), mem_freq=F,
                             num_heads=H, head_dim=Dh, dtype=jnp.float64)
    step = jax.jit(lambda q, k, v, m, c: lmk_memory.memory_attention(q, k, v, m, c, top_k=K,
                                                                     selection=selection))
    L = off = 0
    ys, starts = [], []
    for M in ref["chunk_raw_lens"]:
        T = int(M + (L + M) // F)
        L = int((L + M) % F)
        qkv = x[:, off:off + T] @ W.T
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, H, Dh) for j in range(3))
        starts.append(int(lmk_memory.chunk_start(cache, K)))
        y, cache = step(q, k, v, is_mem[:, off:off + T], cache)
        ys.append(y.reshape(B, T, C) @ Wp.T)
        off += T
    assert off == x.shape[1]
    assert starts == ref["start_index"].tolist()
    err = _maxdiff(jnp.concatenate(ys, axis=1), ref[selection + "/y"])
    assert err <= 1e-9                                          # README tolerance (measured 3e-16)


# ---------------------------------------------------------------------------------------------
# The LM: param tree, registry, training gradient
# ---------------------------------------------------------------------------------------------
def test_landmark_lm_trains_with_the_baseline_param_tree():
    cfg = lmk.LandmarkConfig(
        model=transformer.TransformerConfig(vocab_size=40, width=16, num_layers=2, num_heads=2,
                                            attention="landmark", norm="layernorm"),
        mem_freq=4, landmark_id=39)
    batch = lmk.make_landmark_batch(jax.random.randint(jax.random.key(0), (2, 21), 0, 39), 4, 39)
    model = lmk.LandmarkLM(cfg)
    params = jax.jit(model.init)(jax.random.key(1), batch["inputs"])["params"]
    base = jax.jit(transformer.Transformer(cfg.model.replace(attention="dense")).init)(
        jax.random.key(1), batch["inputs"])["params"]
    assert (jax.tree_util.tree_structure(layers.unbox(params))
            == jax.tree_util.tree_structure(layers.unbox(base)))
    assert jax.tree_util.tree_map(jnp.shape, layers.unbox(params)) == jax.tree_util.tree_map(
        jnp.shape, layers.unbox(base))

    def loss(p):
        logits = model.apply({"params": p}, batch["inputs"], positions=batch["positions"],
                             is_landmark=batch["is_landmark"])
        t = batch["targets"]
        lp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(lp, jnp.maximum(t, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(t >= 0, nll, 0)) / jnp.sum(t >= 0)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


def test_landmark_lm_trains_with_remat():
    # model.remat (the paper configs') traces every block argument: mem_freq must stay static
    # (it is bound into the attention function), and the gradients are the un-remat ones.
    cfg = lmk.LandmarkConfig(
        model=transformer.TransformerConfig(vocab_size=40, width=16, num_layers=2, num_heads=2,
                                            attention="landmark"),
        mem_freq=4, landmark_id=39)
    batch = lmk.make_landmark_batch(jax.random.randint(jax.random.key(0), (2, 21), 0, 39), 4, 39)
    params = jax.jit(lmk.LandmarkLM(cfg).init)(jax.random.key(1), batch["inputs"])["params"]

    def grads(c):
        model = lmk.LandmarkLM(c)
        def f(p):
            return model.apply({"params": p}, batch["inputs"], positions=batch["positions"],
                               is_landmark=batch["is_landmark"]).sum()
        return jax.jit(jax.grad(f))(params)
    remat = grads(dataclasses.replace(cfg, model=cfg.model.replace(remat=True)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           layers.unbox(remat), layers.unbox(grads(cfg)))


def test_config_validation():
    m = transformer.TransformerConfig(vocab_size=10, width=8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="model.attention"):
        lmk.LandmarkConfig(model=m, mem_freq=3, landmark_id=9)
    with pytest.raises(ValueError, match="landmark_id"):
        lmk.LandmarkConfig(model=m.replace(attention="landmark"), mem_freq=3, landmark_id=10)
    cfg = lmk.official_gpt_config(vocab_size=10, n_embd=8, n_head=2, n_layer=1, mem_freq=3,
                                  landmark_id=9)
    assert cfg.model.norm == "layernorm" and cfg.model.mlp == "gelu"
    assert cfg.model.tie_embeddings and cfg.model.rope_interleaved

