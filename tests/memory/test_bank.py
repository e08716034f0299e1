"""Tests for memory/bank.py: ring-buffer writes, top-k reads (sharded == unsharded), sharding."""
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memory import bank as mb

AUTO = jax.sharding.AxisType.Auto
topk_jit = jax.jit(mb.topk, static_argnames=("k", "mesh", "axis"))
write_jit = jax.jit(mb.write)


def _entries(seed, m, key_dim=4, value_shape=(3,)):
    kk, kv = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kk, (m, key_dim), jnp.float32),
            jax.random.normal(kv, (m, *value_shape), jnp.float32))


def _reference_topk(bank, queries, k):
    """numpy top-k: valid entries only, by (-score, index); the documented filler after them."""
    keys, valid = np.asarray(bank.keys, np.float64), np.asarray(bank.valid)
    values = np.asarray(bank.values)
    q = np.asarray(queries, np.float64)
    n_q = q.shape[0]
    scores = np.full((n_q, k), mb.EMPTY_SCORE, np.float64)
    indices = np.zeros((n_q, k), np.int32)
    ok = np.zeros((n_q, k), bool)
    out_values = np.zeros((n_q, k, *values.shape[1:]), values.dtype)
    slots = np.flatnonzero(valid)
    for i in range(n_q):
        s = keys[slots] @ q[i]
        order = np.lexsort((slots, -s))[:k]          # score descending, then lowest index
        n = len(order)
        scores[i, :n], indices[i, :n], ok[i, :n] = s[order], slots[order], True
        out_values[i, :n] = values[slots[order]]
    return scores, indices, out_values, ok


def _assert_topk_equal(got, want, *, atol=1e-5):
    scores, indices, values, valid = want
    np.testing.assert_array_equal(got.indices, indices)
    np.testing.assert_array_equal(got.valid, valid)
    np.testing.assert_array_equal(got.values, values)   # gathered, not computed: bitwise
    # Scores are float32 dot products of O(1) numbers over Dk<=8 terms; the reference is float64.
    np.testing.assert_allclose(got.scores, scores, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def mesh_1d():
    return jax.make_mesh((8,), ("data",), axis_types=(AUTO,))


@pytest.fixture(scope="module")
def mesh_2d():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))


# ---------------------------------------------------------------------------------------------
# init / validation
# ---------------------------------------------------------------------------------------------
def test_init_shapes_and_properties():
    bank = mb.init(6, 4, (2, 3), dtype=jnp.bfloat16)
    assert (bank.capacity, bank.key_dim, bank.value_shape) == (6, 4, (2, 3))
    chex.assert_shape(bank.keys, (6, 4))
    chex.assert_shape(bank.values, (6, 2, 3))
    assert bank.keys.dtype == bank.values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bank.valid, np.zeros(6, bool))
    np.testing.assert_array_equal(bank.step, -np.ones(6))
    assert int(bank.cursor) == int(bank.count) == int(mb.num_valid(bank)) == 0
    assert mb.init(2, 3, 5).value_shape == (5,)
    assert mb.init(2, 3, ()).values.shape == (2,)
    assert mb.init(2, 3, 1, value_dtype=jnp.int32).values.dtype == jnp.int32


@pytest.mark.parametrize("args, field", [
    ((0, 4, (3,)), "capacity"), ((-2, 4, (3,)), "capacity"), ((2.0, 4, (3,)), "capacity"),
    ((4, 0, (3,)), "key_dim"), ((4, 4, (3, 0)), "value_shape"), ((4, 4, "ab"), "value_shape"),
])
def test_init_rejects_bad_config(args, field):
    with pytest.raises(ValueError, match=field):
        mb.init(*args)


def test_write_rejects_bad_shapes():
    bank = mb.init(4, 4, (3,))
    keys, values = _entries(0, 2)
    with pytest.raises(ValueError, match=r"keys.shape=\(2, 5\).*key_dim=4"):
        mb.write(bank, jnp.zeros((2, 5)), values)
    with pytest.raises(ValueError, match="keys.shape"):
        mb.write(bank, jnp.zeros((4,)), values)
    with pytest.raises(ValueError, match=r"values.shape=\(2, 4\)"):
        mb.write(bank, keys, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask.shape"):
        mb.write(bank, keys, values, mask=jnp.ones((3,), bool))


def test_topk_rejects_bad_k_and_queries(mesh_1d):
    bank = mb.init(8, 4, (3,))
    q = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"k=9.*capacity=8"):
        mb.topk(bank, q, 9)
    with pytest.raises(ValueError, match=r"k=0"):
        mb.topk(bank, q, 0)
    with pytest.raises(ValueError, match=r"queries.shape=\(2, 5\).*key_dim=4"):
        mb.topk(bank, jnp.ones((2, 5)), 2)
    with pytest.raises(ValueError, match="axis"):
        mb.topk(bank, q, 2, mesh=mesh_1d)
    with pytest.raises(ValueError, match="'fsdp'"):
        mb.topk(bank, q, 2, mesh=mesh_1d, axis="fsdp")
    with pytest.raises(ValueError, match=r"capacity=12.*8"):
        mb.topk(mb.init(12, 4, (3,)), q, 2, mesh=mesh_1d, axis="data")
    with pytest.raises(ValueError, match="mesh=None"):
        mb.topk(bank, q, 2, axis="data")


# ---------------------------------------------------------------------------------------------
# writes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_write_ring_order_and_eviction(jit):
    write = write_jit if jit else mb.write
    bank = mb.init(4, 2, (1,))
    ids = jnp.arange(7, dtype=jnp.float32)
    keys = jnp.stack([ids, -ids], axis=1)      # entry i has key (i, -i) and value i
    values = ids[:, None]

    bank = write(bank, keys[:3], values[:3])
    np.testing.assert_array_equal(bank.values[:, 0], [0, 1, 2, 0])
    np.testing.assert_array_equal(bank.valid, [True, True, True, False])
    np.testing.assert_array_equal(bank.step, [0, 1, 2, -1])
    assert (int(bank.cursor), int(bank.count)) == (3, 3)

    # Wraps: entries 3, 4, 5 go to slots 3, 0, 1; entries 0 and 1 (the oldest) are evicted.
    bank = write(bank, keys[3:6], values[3:6])
    np.testing.assert_array_equal(bank.values[:, 0], [4, 5, 2, 3])
    np.testing.assert_array_equal(bank.keys, keys[jnp.array([4, 5, 2, 3])])
    np.testing.assert_array_equal(bank.step, [4, 5, 2, 3])
    np.testing.assert_array_equal(bank.valid, [True] * 4)
    assert (int(bank.cursor), int(bank.count)) == (2, 6)

    bank = write(bank, keys[6:], values[6:])
    np.testing.assert_array_equal(bank.values[:, 0], [4, 5, 6, 3])
    np.testing.assert_array_equal(bank.step, [4, 5, 6, 3])
    assert (int(bank.cursor), int(bank.count)) == (3, 7)
    np.testing.assert_array_equal(mb.read_all(bank).values[:, 0], [3, 4, 5, 6])  # oldest first


def test_write_more_than_capacity_keeps_the_last_entries():
    keys, values = _entries(1, 11)
    at_once = mb.write(mb.write(mb.init(4, 4, (3,)), keys[:1], values[:1]), keys[1:], values[1:])
    one_by_one = mb.init(4, 4, (3,))
    for i in range(11):
        one_by_one = mb.write(one_by_one, keys[i:i + 1], values[i:i + 1])
    chex.assert_trees_all_equal(at_once, one_by_one)
    np.testing.assert_array_equal(at_once.step, [8, 9, 10, 7])


def test_write_mask_skips_entries_and_packs_the_rest():
    keys, values = _entries(2, 5)
    mask = jnp.array([True, False, True, False, True])
    bank = write_jit(mb.init(4, 4, (3,)), keys, values, mask=mask)
    np.testing.assert_array_equal(bank.valid, [True, True, True, False])
    np.testing.assert_array_equal(bank.keys[:3], keys[jnp.array([0, 2, 4])])
    np.testing.assert_array_equal(bank.values[:3], values[jnp.array([0, 2, 4])])
    np.testing.assert_array_equal(bank.step, [0, 1, 2, -1])
    assert (int(bank.cursor), int(bank.count)) == (3, 3)
    unchanged = write_jit(bank, keys, values, mask=jnp.zeros(5, bool))
    chex.assert_trees_all_equal(unchanged, bank)


def test_append_one_at_a_time_keeps_earlier_entries_bitwise():
    """MAC's use: one write per document; nothing already written may change, not even a bit."""
    n, value_shape = 6, (2, 3)
    keys, values = _entries(3, n, value_shape=value_shape)
    bank = mb.init(n, 4, value_shape)
    for i in range(n):
        before = jax.device_get(bank)
        bank = write_jit(bank, keys[i:i + 1], values[i:i + 1])
        assert before.keys[:i].tobytes() == np.asarray(bank.keys[:i]).tobytes()
        assert before.values[:i].tobytes() == np.asarray(bank.values[:i]).tobytes()
        assert np.asarray(bank.values[i]).tobytes() == np.asarray(values[i]).tobytes()
        np.testing.assert_array_equal(bank.step[:i + 1], np.arange(i + 1))
        assert int(mb.num_valid(bank)) == i + 1


# ---------------------------------------------------------------------------------------------
# reads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_topk_empty_bank_is_defined_and_nan_free(jit):
    bank = mb.init(8, 4, (2, 3))
    topk = topk_jit if jit else mb.topk
    out = topk(bank, jnp.full((3, 4), 2.0), k=5)
    chex.assert_tree_all_finite(out.scores)
    chex.assert_tree_all_finite(out.values)
    assert not np.any(out.valid)
    np.testing.assert_array_equal(out.scores, np.full((3, 5), mb.EMPTY_SCORE, np.float32))
    np.testing.assert_array_equal(out.indices, np.zeros((3, 5)))
    np.testing.assert_array_equal(out.values, np.zeros((3, 5, 2, 3)))


@pytest.mark.parametrize("jit", [False, True])
def test_topk_partial_bank_never_ranks_empty_slots_first(jit):
    topk = topk_jit if jit else mb.topk
    keys, values = _entries(4, 3)
    bank = mb.write(mb.init(8, 4, (3,)), jnp.abs(keys) + 0.1, values)
    # Every valid entry scores below 0 (positive keys, negative queries) while the empty slots'
    # zero keys would score exactly 0.
    queries = -jnp.abs(jax.random.normal(jax.random.key(14), (3, 4))) - 0.1
    out = topk(bank, queries, k=5)
    np.testing.assert_array_equal(out.valid, [[True] * 3 + [False] * 2] * 3)
    assert np.all(np.asarray(out.scores)[:, :3] < 0)
    _assert_topk_equal(out, _reference_topk(bank, queries, 5))
    chex.assert_tree_all_finite(out)


def test_topk_matches_reference_on_a_wrapped_bank_with_multidim_values():
    value_shape = (2, 3)        # e.g. per-document modulations [T, D]
    keys, values = _entries(5, 21, value_shape=value_shape)
    bank = mb.write(mb.init(16, 4, value_shape), keys, values)
    queries = jax.random.normal(jax.random.key(6), (4, 4))
    out = topk_jit(bank, queries, k=7)
    chex.assert_shape(out.values, (4, 7, *value_shape))
    _assert_topk_equal(out, _reference_topk(bank, queries, 7))
    assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 0)
    np.testing.assert_array_equal(out.values, mb.gather(bank, out.indices))


def test_topk_ties_go_to_the_lowest_index():
    keys = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    bank = mb.write(mb.init(8, 2, ()), keys, jnp.arange(5.0))
    out = mb.topk(bank, jnp.array([[1.0, 0.0], [0.0, 1.0]]), k=4)
    np.testing.assert_array_equal(out.indices, [[1, 3, 4, 0], [0, 2, 1, 3]])
    assert np.all(out.valid)
    np.testing.assert_array_equal(out.scores, [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_gather_and_read_all():
    keys, values = _entries(7, 6, value_shape=(2,))
    bank = mb.write(mb.init(4, 4, (2,)), keys, values)     # slots hold entries 4, 5, 2, 3
    idx = jnp.array([[0, 3], [2, 2]])
    np.testing.assert_array_equal(mb.gather(bank, idx), np.asarray(bank.values)[np.asarray(idx)])
    chex.assert_shape(mb.gather(bank, idx), (2, 2, 2))
    with pytest.raises(ValueError, match="indices.dtype"):
        mb.gather(bank, jnp.array([0.0]))
    entries = mb.read_all(bank)
    np.testing.assert_array_equal(entries.slots, [2, 3, 0, 1])
    np.testing.assert_array_equal(entries.step, [2, 3, 4, 5])
    np.testing.assert_array_equal(entries.values, values[2:])
    partial = mb.read_all(mb.write(mb.init(4, 4, (2,)), keys[:2], values[:2]))
    np.testing.assert_array_equal(partial.valid, [True, True, False, False])
    np.testing.assert_array_equal(partial.slots, [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------
def _banks():
    """Banks of capacity 64 (8 per shard): partly filled, wrapped, scattered valid, with ties."""
    value_shape = (2, 3)
    keys, values = _entries(8, 77, value_shape=value_shape)
    empty = mb.init(64, 4, value_shape)
    partial = mb.write(empty, keys[:13], values[:13])      # only shards 0 and 1 hold entries
    wrapped = mb.write(empty, keys, values)
    scattered = wrapped.replace(valid=jax.random.bernoulli(jax.random.key(9), 0.3, (64,)))
    # Integer keys in {-1, 0, 1}: exact dot products, so many exact ties across shards.
    int_keys = jax.random.randint(jax.random.key(10), (64, 4), -1, 2).astype(jnp.float32)
    ties = mb.write(empty, int_keys, values[:64])
    return {"empty": empty, "partial": partial, "wrapped": wrapped, "scattered": scattered,
            "ties": ties}


BANKS = _banks()


@pytest.mark.parametrize("name", sorted(BANKS))
@pytest.mark.parametrize("k", [3, 11])     # 11 > 8 entries per shard: every shard sends all
def test_sharded_topk_equals_unsharded_1d(mesh_1d, name, k):
    bank = BANKS[name]
    if name == "ties":
        queries = jax.random.randint(jax.random.key(11), (5, 4), -2, 3).astype(jnp.float32)
    else:
        queries = jax.random.normal(jax.random.key(11), (5, 4))
    bank_sharded = jax.device_put(bank, jax.tree.map(
        lambda s: NamedSharding(mesh_1d, s), mb.mesh_axes(bank, "data")))
    want = _reference_topk(bank, queries, k)
    unsharded = topk_jit(bank, queries, k=k)
    sharded = topk_jit(bank_sharded, queries, k=k, mesh=mesh_1d, axis="data")
    _assert_topk_equal(unsharded, want)
    _assert_topk_equal(sharded, want)
    np.testing.assert_allclose(sharded.scores, unsharded.scores, rtol=1e-6)


@pytest.mark.parametrize("name", ["partial", "scattered", "ties"])
def test_sharded_topk_equals_unsharded_2d_mesh_over_both_axes(mesh_2d, name):
    bank = BANKS[name]
    queries = jax.random.randint(jax.random.key(12), (3, 4), -2, 3).astype(jnp.float32)
    axis = ("data", "model")
    bank_sharded = jax.device_put(bank, jax.tree.map(
        lambda s: NamedSharding(mesh_2d, s), mb.mesh_axes(bank, axis)))
    assert bank_sharded.keys.addressable_shards[0].data.shape == (8, 4)
    want = _reference_topk(bank, queries, 5)
    _assert_topk_equal(topk_jit(bank_sharded, queries, k=5, mesh=mesh_2d, axis=axis), want)
    # Sharded over one axis of the 2-D mesh (replicated over the other) gives the same result.
    _assert_topk_equal(topk_jit(bank, queries, k=5, mesh=mesh_2d, axis="model"), want)
    with jax.set_mesh(mesh_2d):                     # mesh from the context
        _assert_topk_equal(mb.topk(bank, queries, 5, axis=axis), want)


def test_sharded_topk_moves_only_candidates(mesh_1d):
    """The only collectives are all-gathers of the Q x (shards * k) candidates, never the bank."""
    bank = BANKS["wrapped"]
    queries = jnp.ones((5, 4))
    hlo = topk_jit.lower(bank, queries, k=3, mesh=mesh_1d, axis="data").compile().as_text()
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert len(gathers) == 4, gathers                 # scores, indices, values, valid
    for line in gathers:
        shape = [int(d) for d in re.search(r"= \w+\[([\d,]+)\]", line).group(1).split(",")]
        assert shape[:2] == [5, 8 * 3], line          # [Q, shards * k, ...] with 24 < N = 64
    assert not re.search(r"all-to-all|collective-permute|all-reduce", hlo)


def test_sharded_write_stays_sharded_and_matches(mesh_1d):
    bank = BANKS["partial"]
    shardings = jax.tree.map(lambda s: NamedSharding(mesh_1d, s), mb.mesh_axes(bank, "data"))
    keys, values = _entries(13, 9, value_shape=(2, 3))
    write = jax.jit(mb.write, out_shardings=shardings)
    got = write(jax.device_put(bank, shardings), keys, values)
    chex.assert_trees_all_equal(got, mb.write(bank, keys, values))
    assert got.values.sharding.spec == P("data", None, None)
    hlo = write.lower(jax.device_put(bank, shardings), keys, values).compile().as_text()
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo)


def test_logical_axes_map_onto_the_mesh_with_rules(mesh_2d):
    abstract = jax.eval_shape(lambda: mb.init(16, 4, (2, 3)))
    axes = mb.logical_axes(abstract)
    assert tuple(axes.keys) == ("memory", None)
    assert tuple(axes.values) == ("memory", None, None)
    assert tuple(axes.valid) == tuple(axes.step) == ("memory",)
    assert tuple(axes.cursor) == tuple(axes.count) == ()
    rules = (("memory", ("data", "model")), ("embed", None))
    shardings = nn.logical_to_mesh_sharding(axes, mesh_2d, rules)
    bank = jax.jit(lambda: mb.init(16, 4, (2, 3)), out_shardings=shardings)()
    assert bank.keys.sharding.spec == P(("data", "model"), None)
    assert bank.keys.addressable_shards[0].data.shape == (2, 4)
    assert bank.count.sharding.is_fully_replicated
