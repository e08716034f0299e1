"""MAC networks: shapes, prefix layout, order invariance, hierarchical/top-k aggregation."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mac as mac_lib
from models.mac import MAC, MACConfig
from models.transformer import Transformer, TransformerConfig

LM = TransformerConfig(vocab_size=320, width=32, num_layers=2, num_heads=4)
CFG = MACConfig(lm=LM, num_tokens=3, prefix_len=2, enc_width=16, enc_layers=1, dec_layers=1,
                enc_heads=2, agg_heads=4, mlp_ratio=2, prefix_hidden=16)
N, S, Q, B = 6, 12, 8, 2


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 4)
    docs = jax.random.randint(k[0], (N, S), 0, 256)
    docs = docs.at[:, 9:].set(CFG.pad_id)       # padded tails
    qs = jax.random.randint(k[1], (B, Q), 0, 256)
    boxed = jax.jit(MAC(CFG).init)(k[2], docs, qs)["params"]
    params = nn.unbox(boxed)
    lm_params = nn.unbox(jax.jit(Transformer(LM).init)(k[3], qs)["params"])
    apply = lambda *a, method, **kw: MAC(CFG).apply({"params": params}, *a, method=method, **kw)
    amortize = jax.jit(lambda d: apply(d, method=MAC.amortize))
    phi = amortize(docs)
    z0 = jax.jit(lambda q: apply(q, method=MAC.encode_question))(qs)
    agg = jax.jit(lambda z, m, v=None, window=0, topk=0: apply(
        z, m, v, window=window, topk=topk, method=MAC.aggregate_z0),
        static_argnames=("window", "topk"))
    return dict(docs=docs, qs=qs, boxed=boxed, params=params, lm_params=lm_params, apply=apply,
                amortize=amortize, phi=phi, z0=z0, agg=agg)


def test_shapes(setup):
    s = setup
    chex.assert_shape(s["phi"], (N, CFG.num_tokens, LM.width))
    chex.assert_shape(s["z0"], (B, CFG.num_tokens, LM.width))
    z = s["agg"](s["z0"], s["phi"])
    chex.assert_shape(z, (B, CFG.num_tokens, LM.width))
    kv = s["apply"](z, method=MAC.prefix)
    chex.assert_shape(kv, (LM.num_layers, 2, B, CFG.prefix_len, LM.num_heads, LM.hd))
    chex.assert_tree_all_finite((s["phi"], z, kv))


def test_params_carry_logical_axes(setup):
    boxed = jax.tree_util.tree_leaves(setup["boxed"],
                                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    names = {n for x in boxed for n in x.names if n}
    assert {"embed", "heads", "kv", "mlp", "vocab"} <= names


def test_expand_slots_layout():
    T, rows = 3, 8            # 8 = 2·3 + 2: slots 0 and 1 get 3 rows, slot 2 gets 2
    phi = jnp.arange(T, dtype=jnp.float32)[None, :, None] * jnp.ones((1, T, 5))
    out = mac_lib.expand_slots(phi, rows)
    np.testing.assert_array_equal(np.asarray(out[0, :, 0]), [0, 0, 0, 1, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="rows"):
        mac_lib.expand_slots(phi, 2)


def test_prefix_row_to_layer_layout(setup):
    """Row r of the per-row FFN output lands at (layer, key|value, p) = unravel(r, (L, 2, P))."""
    s = setup
    z = s["agg"](s["z0"], s["phi"])
    kv = s["apply"](z, method=MAC.prefix)
    rows = mac_lib.PerRowFFN(CFG.prefix_hidden, gain_init=CFG.prefix_gain_init).apply(
        {"params": s["params"]["prefix_ffn"]}, mac_lib.expand_slots(z, CFG.prefix_rows))
    L, P = LM.num_layers, CFG.prefix_len
    for r in range(CFG.prefix_rows):
        layer, which, p = np.unravel_index(r, (L, 2, P))
        np.testing.assert_array_equal(np.asarray(kv[layer, which, :, p].reshape(B, -1)),
                                      np.asarray(rows[:, r]))


def test_flat_aggregation_is_order_invariant(setup):
    s = setup
    z = s["agg"](s["z0"], s["phi"])
    perm_docs = np.array([3, 0, 5, 1, 4, 2])
    perm_slots = np.array([2, 0, 1])
    z_docs = s["agg"](s["z0"], s["phi"][perm_docs])
    z_both = s["agg"](s["z0"], s["phi"][perm_docs][:, perm_slots])
    # float32 sums in another order: 1e-5 is far below the outputs' O(1) scale.
    chex.assert_trees_all_close(z_docs, z, atol=1e-5)
    chex.assert_trees_all_close(z_both, z, atol=1e-5)


def test_invalid_entries_are_ignored(setup):
    s = setup
    z = s["agg"](s["z0"], s["phi"][:4])
    junk = jnp.concatenate([s["phi"][:4], 100.0 + s["phi"][4:]], 0)
    valid = jnp.array([True] * 4 + [False] * 2)
    chex.assert_trees_all_close(s["agg"](s["z0"], junk, valid), z, atol=1e-5)


def test_hierarchical_with_large_window_equals_flat(setup):
    s = setup
    flat = s["agg"](s["z0"], s["phi"])
    chex.assert_trees_all_equal(s["agg"](s["z0"], s["phi"], window=N), flat)
    chex.assert_trees_all_equal(s["agg"](s["z0"], s["phi"], window=4 * N), flat)


def test_hierarchical_chunks_over_entries(setup):
    """W=3 over 6 documents: two chunks of three, then a flat pass over the two results."""
    s = setup
    hier = s["agg"](s["z0"], s["phi"], window=3)
    chunks = [s["agg"](s["z0"], s["phi"][3 * i:3 * i + 3]) for i in range(2)]
    manual = s["agg"](s["z0"], jnp.stack(chunks, 1))
    chex.assert_trees_all_close(hier, manual, atol=1e-5)  # f32 roundoff, O(1) values
    # Invariant to the order within a chunk and to the order of the chunks.
    perm = np.array([5, 3, 4, 2, 0, 1])
    chex.assert_trees_all_close(s["agg"](s["z0"], s["phi"][perm], window=3), hier, atol=1e-5)
    assert float(jnp.max(jnp.abs(hier - s["agg"](s["z0"], s["phi"])))) > 1e-4


def test_hierarchical_repeats_until_window(setup):
    """W=2 over 6 documents: 6 → 3 chunk results → 2 → flat pass (padding chunks are empty)."""
    s = setup
    hier = s["agg"](s["z0"], s["phi"], window=2)
    level1 = jnp.stack([s["agg"](s["z0"], s["phi"][2 * i:2 * i + 2]) for i in range(3)], 1)
    level2 = jnp.stack([s["agg"](s["z0"], level1[:, :2]), s["agg"](s["z0"], level1[:, 2:])], 1)
    chex.assert_trees_all_close(hier, s["agg"](s["z0"], level2), atol=1e-5)


def test_topk_selects_most_similar(setup):
    s = setup
    flat = s["agg"](s["z0"], s["phi"])
    chex.assert_trees_all_equal(s["agg"](s["z0"], s["phi"], topk=N), flat)
    k = 2
    got = s["agg"](s["z0"], s["phi"], topk=k)
    q = mac_lib.slot_keys(s["z0"])
    m = mac_lib.slot_keys(s["phi"])
    for b in range(B):
        best = np.argsort(-np.asarray(m @ q[b]))[:k]
        want = s["agg"](s["z0"][b:b + 1], s["phi"][best])
        chex.assert_trees_all_close(got[b:b + 1], want, atol=1e-5)


def test_padding_is_masked_in_amortization(setup):
    s = setup
    # Changing what sits under the padding changes nothing (the tails are PAD from index 9).
    other = s["docs"].at[:, 9:].set(CFG.pad_id + 1)
    other = jnp.where(s["docs"] == CFG.pad_id, CFG.pad_id, other)
    chex.assert_trees_all_equal(s["amortize"](other), s["phi"])
    # Extra padding columns change nothing beyond float summation order.
    longer = jnp.concatenate([s["docs"], jnp.full((N, 5), CFG.pad_id)], 1)
    chex.assert_trees_all_close(s["amortize"](longer), s["phi"], atol=1e-5)
    # A real token in place of padding does change the modulation.
    assert float(jnp.max(jnp.abs(s["amortize"](s["docs"].at[:, 10].set(65)) - s["phi"]))) > 1e-5


def test_zero_prefix_mask_equals_no_prefix(setup):
    s = setup
    tokens = s["qs"]
    kv = s["apply"](s["agg"](s["z0"], s["phi"]), method=MAC.prefix)
    plain = mac_lib.modulated_logits(CFG, s["lm_params"], tokens)
    masked = mac_lib.modulated_logits(CFG, s["lm_params"], tokens, kv,
                                      jnp.zeros((B, CFG.prefix_len), bool))
    # Identical math except for the masked prefix columns (exact zeros after the softmax).
    chex.assert_trees_all_close(masked, plain, atol=1e-6)
    on = mac_lib.modulated_logits(CFG, s["lm_params"], tokens, kv)
    assert float(jnp.max(jnp.abs(on - plain))) > 1e-4
    # The unmodulated path sits at positions P.. (RoPE is relative, so equal to positions 0..).
    base = Transformer(LM).apply({"params": s["lm_params"]}, tokens)
    chex.assert_trees_all_close(plain, base, atol=1e-5)


def test_deterministic_init_and_apply():
    docs = jnp.ones((2, 6), jnp.int32)
    qs = jnp.ones((2, 4), jnp.int32)
    init = jax.jit(MAC(CFG).init)
    a = init(jax.random.key(7), docs, qs)
    b = init(jax.random.key(7), docs, qs)
    chex.assert_trees_all_equal(a, b)
    c = init(jax.random.key(8), docs, qs)
    assert not np.array_equal(np.asarray(nn.unbox(a)["params"]["prefix_ffn"]["w1"]),
                              np.asarray(nn.unbox(c)["params"]["prefix_ffn"]["w1"]))


@pytest.mark.parametrize("field,value,match", [
    ("num_tokens", 0, "num_tokens"),
    ("window", 1, "window"),
    ("topk", -1, "topk"),
    ("enc_width", 15, "enc_width"),
    ("agg_heads", 5, "agg_heads"),
    ("num_tokens", 9, "2·L·P"),
    ("prefix_gain_init", -0.5, "prefix_gain_init"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**{field: value})


def test_aggregate_rejects_bad_shapes(setup):
    s = setup
    with pytest.raises(ValueError, match="valid.shape"):
        s["apply"](s["z0"], s["phi"], jnp.ones((3, N), bool), method=MAC.aggregate_z0)


def test_hierarchical_with_per_question_mask(setup):
    """A per-question validity mask [B, N] (e.g. gold removed) works with chunking too."""
    s = setup
    all_valid = jnp.ones((B, N), bool)
    # An all-True [B, N] mask and no mask are two XLA programs (the mask broadcasts differently)
    # that may sum in another order: equal to float32 rounding through 4 blocks (values up to ~5;
    # a cold-cache run differed by 1.4e-6 = 7e-6 relative), hence rtol 1e-5 rather than atol 1e-6.
    chex.assert_trees_all_close(s["agg"](s["z0"], s["phi"], all_valid, window=3),
                                s["agg"](s["z0"], s["phi"], window=3), atol=1e-6, rtol=1e-5)
    drop = all_valid.at[0, 1].set(False)
    got = s["agg"](s["z0"], s["phi"], drop, window=3)
    keep = np.array([0, 2, 3, 4, 5])
    # Question 0 without document 1: its chunk holds two documents, the other three.
    want0 = s["agg"](s["z0"][:1], jnp.stack([s["agg"](s["z0"][:1], s["phi"][keep[:2]]),
                                             s["agg"](s["z0"][:1], s["phi"][keep[2:]])], 1))
    chex.assert_trees_all_close(got[:1], want0, atol=1e-5)


def test_zero_prefix_gain_starts_from_the_unmodulated_lm(setup):
    """prefix_gain_init=0: every prefix key/value is exactly zero at init (so the modulated LM
    starts at the no-memory LM up to the softmax share of P zero-score keys), while gradients
    still reach the gain; with the default gain 1 the rows are the residual FFN's output."""
    s = setup
    cfg0 = CFG.replace(prefix_gain_init=0.0)
    p0 = nn.unbox(jax.jit(MAC(cfg0).init)(jax.random.key(0), s["docs"], s["qs"])["params"])
    z = s["agg"](s["z0"], s["phi"])
    kv0 = MAC(cfg0).apply({"params": p0}, z, method=MAC.prefix)
    np.testing.assert_array_equal(np.asarray(kv0), 0.0)
    assert float(jnp.max(jnp.abs(s["apply"](z, method=MAC.prefix)))) > 0.1
    np.testing.assert_array_equal(np.asarray(s["params"]["prefix_ffn"]["gain"]), 1.0)

    def loss(p):
        kv = MAC(cfg0).apply({"params": p}, z, method=MAC.prefix)
        return jnp.sum(mac_lib.modulated_logits(cfg0, s["lm_params"], s["qs"], kv)[..., 65])

    g = jax.jit(jax.grad(loss))(p0)    # jitted: one compilation, not an op-by-op backward
    assert float(jnp.max(jnp.abs(g["prefix_ffn"]["gain"]))) > 0.0
