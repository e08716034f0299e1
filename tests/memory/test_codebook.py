"""DKVB codebooks: projection, EMA key init, dead-key replacement, chunked and restricted lookup."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memory import codebook as cb

MEANS = np.array([(3.0, 3.0), (4.0, 3.0), (3.0, 4.0), (4.0, 4.0)], np.float32)


def four_gaussians(seed, n_per=200, C=2, std=0.03):
    """[4 * n_per, C, 2]: every codebook sees the same 4 well-separated Gaussians. The means sit
    far from the origin so keys shrunk towards 0 (the size/sum mismatch bug) would be caught."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n_per)
    z = MEANS[y][:, None, :] + std * rng.standard_normal((len(y), C, 2))
    return jnp.asarray(z, jnp.float32)


def dist_to_nearest_mean(keys_CxKx2):
    d = np.linalg.norm(np.asarray(keys_CxKx2)[:, :, None, :] - MEANS[None, None], axis=-1)
    return d.min(-1), d.min(1)  # per key [C, K]; per mean [C, 4]


def test_projection_columns_unit_norm():
    w = cb.random_projection(jax.random.PRNGKey(0), 37, 5, 14)
    assert w.shape == (5, 37, 14)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=1), 1.0, rtol=1e-6)
    # Codebooks get different projections.
    assert not np.allclose(w[0], w[1])


@pytest.mark.parametrize("kmeans_iters,K", [(0, 4), (0, 8), (5, 4)])
def test_ema_init_keys_land_on_means(kmeans_iters, K):
    z = four_gaussians(0)
    state = cb.init_keys_ema(jax.random.PRNGKey(1), z, num_keys=K, decay=0.95, epochs=10,
                             batch_size=64, kmeans_iters=kmeans_iters)
    per_key, per_mean = dist_to_nearest_mean(state.keys_CxKxDk)
    assert per_key.max() < 0.05, per_key  # every key within 0.05 of a mean
    assert per_mean.max() < 0.05, per_mean  # and every mean has a key
    # The EMA statistics stay consistent: keys == sums / sizes.
    np.testing.assert_allclose(
        state.embed_sum_CxKxDk / state.cluster_size_CxK[..., None], state.keys_CxKxDk, rtol=1e-5)


def test_kmeans_start_then_ema_does_not_shrink_keys():
    """A k-means start followed by EMA steps on the same data leaves keys at the means (the
    official code / vector-quantize-pytorch shrink them by copying keys into the sums)."""
    z = four_gaussians(1, C=1)
    keys0 = jnp.asarray(MEANS[None] + 0.01, jnp.float32)
    keys_km, counts = cb.kmeans_step(keys0, z)
    state = cb.ema_state_from_keys(keys_km, counts * 64 / z.shape[0])
    step = jax.jit(functools.partial(cb.ema_step, decay=0.95))
    for i in range(20):
        ix = jax.random.choice(jax.random.PRNGKey(i), z.shape[0], (64,), replace=False)
        state = step(state, z[ix], jax.random.PRNGKey(100 + i))
    np.testing.assert_allclose(np.asarray(state.keys_CxKxDk[0]), MEANS, atol=0.02)


def test_dead_key_replacement_fires():
    z = four_gaussians(2, n_per=16, C=1)
    keys = jnp.asarray(np.concatenate([MEANS, [[-50.0, -50.0]]])[None], jnp.float32)  # key 4 dead
    state = cb.ema_state_from_keys(keys, jnp.full((1, 5), 0.5))
    # Sizes 0.5 -> 0.475 after one decay: the unassigned key falls below 0.48, the others rise.
    new = cb.ema_step(state, z, jax.random.PRNGKey(0), decay=0.95, dead_threshold=0.48)
    assert int(new.num_replaced) == 1
    moved = np.asarray(new.keys_CxKxDk[0, 4])
    # The dead key moved onto a batch item, with consistent statistics.
    assert np.min(np.linalg.norm(np.asarray(z[:, 0]) - moved, axis=-1)) < 1e-6
    np.testing.assert_allclose(new.embed_sum_CxKxDk[0, 4] / new.cluster_size_CxK[0, 4], moved)
    # Without a threshold nothing is replaced and the unassigned key stays put.
    kept = cb.ema_step(state, z, jax.random.PRNGKey(0), decay=0.95, dead_threshold=0.0)
    assert int(kept.num_replaced) == 0
    np.testing.assert_allclose(kept.keys_CxKxDk[0, 4], [-50.0, -50.0], rtol=1e-6)


@pytest.fixture(scope="module")
def lookup_case():
    r = jax.random.split(jax.random.PRNGKey(0), 3)
    B, C, K, Dk = 33, 11, 50, 6
    q = jax.random.normal(r[0], (B, C, Dk))
    keys = jax.random.normal(r[1], (C, K, Dk))
    mask = jax.random.bernoulli(r[2], 0.3, (C, K))
    return q, keys, mask


def brute_force(q, keys, mask=None):
    d = ((np.asarray(q, np.float64)[:, :, None] - np.asarray(keys, np.float64)[None]) ** 2).sum(-1)
    if mask is not None:
        d = np.where(np.asarray(mask)[None], d, np.inf)
    return d


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_lookup_matches_dense(lookup_case, chunk):
    q, keys, _ = lookup_case
    idx = cb.nearest_keys(q, keys, chunk=chunk)
    assert idx.shape == (33, 11) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, brute_force(q, keys).argmin(-1))
    np.testing.assert_array_equal(idx, cb.naive_nearest_keys(q, keys))
    top = cb.nearest_keys(q, keys, top_k=3, chunk=chunk)
    np.testing.assert_array_equal(top, np.argsort(brute_force(q, keys), -1)[..., :3])


def test_usage_restricted_lookup(lookup_case):
    q, keys, mask = lookup_case
    usage = jnp.where(mask, 3, 0).astype(jnp.int32)
    idx = cb.nearest_keys(q, keys, cb.used_mask(usage), chunk=4)
    np.testing.assert_array_equal(idx, brute_force(q, keys, mask).argmin(-1))
    assert bool(jnp.all(mask[jnp.arange(11)[None], idx]))  # only used keys are returned
    # An input sitting exactly on an unused key snaps to the nearest *used* key instead.
    k_unused = int(np.flatnonzero(~np.asarray(mask[0]))[0])
    q0 = jnp.broadcast_to(keys[:, k_unused], (1, 11, 6))
    assert int(cb.nearest_keys(q0, keys)[0, 0]) == k_unused
    assert int(cb.nearest_keys(q0, keys, cb.used_mask(usage))[0, 0]) != k_unused


def test_count_usage_and_fetch():
    idx = jnp.array([[0, 2], [0, 1], [3, 1]], jnp.int32)  # B=3, C=2
    u = cb.count_usage(jnp.zeros((2, 4), jnp.int32), idx)
    np.testing.assert_array_equal(u, [[2, 0, 0, 1], [0, 2, 1, 0]])
    u = cb.count_usage(u, idx, weight_B=jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(u, [[3, 0, 0, 1], [0, 2, 2, 0]])
    values = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    v = cb.fetch(values, idx)
    assert v.shape == (3, 2, 3)
    np.testing.assert_array_equal(v[2, 0], values[0, 3])
    np.testing.assert_array_equal(v[0, 1], values[1, 2])
    # A codebook nobody used keeps all keys allowed.
    np.testing.assert_array_equal(cb.used_mask(jnp.array([[0, 2], [0, 0]])),
                                  [[False, True], [True, True]])


def test_determinism():
    z = four_gaussians(4)
    a = cb.init_keys_ema(jax.random.PRNGKey(7), z, num_keys=8, epochs=3, batch_size=64)
    b = cb.init_keys_ema(jax.random.PRNGKey(7), z, num_keys=8, epochs=3, batch_size=64)
    np.testing.assert_array_equal(a.keys_CxKxDk, b.keys_CxKxDk)
    c1 = cb.init_codebooks(jax.random.PRNGKey(1), embed_dim=5, num_codebooks=3, num_keys=4,
                           key_dim=2, value_dim=6)
    c2 = cb.init_codebooks(jax.random.PRNGKey(1), embed_dim=5, num_codebooks=3, num_keys=4,
                           key_dim=2, value_dim=6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, c1, c2)
    assert not np.any(c1.values_CxKxDv) and not np.any(c1.usage_CxK)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="key_dim"):
        cb.random_projection(jax.random.PRNGKey(0), 4, 2, 0)
    with pytest.raises(ValueError, match="top_k"):
        cb.nearest_keys(jnp.zeros((2, 1, 3)), jnp.zeros((1, 4, 3)), top_k=5)
    with pytest.raises(ValueError, match="d_k"):
        cb.nearest_keys(jnp.zeros((2, 1, 2)), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="decay"):
        cb.init_keys_ema(jax.random.PRNGKey(0), jnp.zeros((8, 1, 2)), num_keys=2, decay=1.0)
    with pytest.raises(ValueError, match="embedding dim"):
        cb.project(jnp.zeros((2, 5)), jnp.zeros((1, 4, 3)))
