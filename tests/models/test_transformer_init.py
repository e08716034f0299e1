"""models/transformer.py: the init scale (`init_std`) of every weight matrix and the embedding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Transformer, TransformerConfig


@pytest.mark.parametrize("std", [0.02, 0.125])
def test_init_std_sets_every_matrix(std):
    cfg = TransformerConfig(vocab_size=320, width=64, num_layers=2, num_heads=4,
                            tie_embeddings=False, init_std=std)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves = jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(
        lambda x: getattr(x, "value", x), params["params"],
        is_leaf=lambda x: hasattr(x, "value")))
    mats = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves if np.ndim(v) >= 2}
    # embedding, lm head, q/k/v/out of each layer, MLP in/out of each layer
    assert len(mats) == 2 + 2 * (4 + 2), sorted(mats)
    for name, w in mats.items():
        assert abs(w.std() / std - 1) < 0.1, (name, w.std())


@pytest.mark.parametrize("bad", [0.0, -0.02, True, "0.02"])
def test_init_std_must_be_positive(bad):
    with pytest.raises(ValueError, match="init_std"):
        TransformerConfig(vocab_size=320, width=64, init_std=bad)
