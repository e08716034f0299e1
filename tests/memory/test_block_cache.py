"""memory/block_cache.py: the ring of complete blocks + trailing block, against a list model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memory import block_cache

B, H, DH, F = 2, 2, 3, 3          # mem_freq 3 → blocks of S = 4 rows
S = F + 1


def _rows(rng, n):
    return jnp.asarray(rng.normal(size=(B, n, H, DH)).astype(np.float32))


class ListModel:
    """The official store_in_cache semantics with Python lists: all rows ever seen, cut into blocks."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.rows_k, self.rows_v = [], []

    def append(self, k, v, length):
        self.rows_k += [k[:, t] for t in range(length)]
        self.rows_v += [v[:, t] for t in range(length)]

    def blocks(self):
        n = len(self.rows_k) // S
        held = list(range(max(0, n - self.capacity), n))
        kb = [np.stack(self.rows_k[i * S:(i + 1) * S], 1) for i in held]
        vb = [np.stack(self.rows_v[i * S:(i + 1) * S], 1) for i in held]
        return held, kb, vb, n

    def tail(self):
        n = len(self.rows_k) // S
        return self.rows_k[n * S:], self.rows_v[n * S:]


@jax.jit
def _append(cache, k, v, length):
    return block_cache.append(cache, k, v, length)


@pytest.mark.parametrize("capacity", [2, 5])
def test_append_matches_list_model_through_wraps(capacity):
    rng = np.random.default_rng(capacity)
    cache = block_cache.init(batch=B, capacity=capacity, mem_freq=F, num_heads=H, head_dim=DH)
    model = ListModel(capacity)
    # chunk lengths (padded to 7 rows, `length` valid): partial blocks, several blocks at once,
    # more than `capacity` blocks at once, empty chunks
    for length in [2, 7, 1, 0, 5, 7, 7, 3, 6, 7]:
        k, v = _rows(rng, 7), _rows(rng, 7)
        cache = _append(cache, k, v, length)
        model.append(np.asarray(k), np.asarray(v), length)
        held, kb, vb, n = model.blocks()
        assert int(cache.num_blocks) == n
        c, valid = block_cache.chronological_index(cache)
        assert int(valid.sum()) == len(held)
        for rank, (kk, vv) in enumerate(zip(kb, vb)):
            slot = int(block_cache.slot_of_chronological(cache, jnp.asarray(rank)))
            assert int(c[slot]) == rank and bool(valid[slot])
            np.testing.assert_array_equal(np.asarray(cache.keys[:, slot]), kk)
            np.testing.assert_array_equal(np.asarray(cache.values[:, slot]), vv)
            assert slot == held[rank] % capacity          # block i lives in slot i mod N
        tk, tv = model.tail()
        assert int(cache.tail_len) == len(tk)
        for j in range(len(tk)):
            np.testing.assert_array_equal(np.asarray(cache.tail_keys[:, j]), tk[j])
            np.testing.assert_array_equal(np.asarray(cache.tail_values[:, j]), tv[j])


def test_gather_blocks_and_landmark_keys():
    rng = np.random.default_rng(0)
    cache = block_cache.init(batch=B, capacity=3, mem_freq=F, num_heads=H, head_dim=DH)
    cache = block_cache.append(cache, _rows(rng, 3 * S), _rows(rng, 3 * S))
    np.testing.assert_array_equal(np.asarray(block_cache.landmark_keys(cache)),
                                  np.asarray(cache.keys[:, :, -1]))
    slots = jnp.asarray(rng.integers(0, 3, size=(B, H, 4, 2)))
    kg, vg = block_cache.gather_blocks(cache, slots)
    assert kg.shape == (B, H, 4, 2, S, DH)
    for b in range(B):
        for h in range(H):
            for t in range(4):
                for j in range(2):
                    s = int(slots[b, h, t, j])
                    np.testing.assert_array_equal(np.asarray(kg[b, h, t, j]),
                                                  np.asarray(cache.keys[b, s, :, h]))
                    np.testing.assert_array_equal(np.asarray(vg[b, h, t, j]),
                                                  np.asarray(cache.values[b, s, :, h]))


def test_cache_is_a_pytree_through_jit():
    cache = block_cache.init(batch=1, capacity=2, mem_freq=F, num_heads=1, head_dim=2)
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 6
    out = jax.jit(lambda c: c)(cache)
    assert isinstance(out, block_cache.BlockCache) and out.capacity == 2 and out.mem_freq == F


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="capacity"):
        block_cache.init(batch=1, capacity=0, mem_freq=F, num_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="mem_freq"):
        block_cache.init(batch=1, capacity=2, mem_freq=-1, num_heads=1, head_dim=2)
    cache = block_cache.init(batch=1, capacity=2, mem_freq=F, num_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="do not fit"):
        block_cache.append(cache, jnp.zeros((1, 4, 2, 2)), jnp.zeros((1, 4, 2, 2)))
