"""train/objectives/lm.py: the chunked cross-entropy equals the plain one, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models.transformer import Transformer, TransformerConfig
from train.objectives import lm


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_cross_entropy_equals_the_plain_loss(tie):
    cfg = TransformerConfig(vocab_size=97, width=32, num_layers=1, num_heads=4,
                            tie_embeddings=tie, init_std=0.2)
    model = Transformer(cfg)
    k = jax.random.split(jax.random.key(0), 3)
    inputs = jax.random.randint(k[0], (2, 12), 0, 97)
    batch = {"inputs": inputs, "targets": jax.random.randint(k[1], (2, 12), 0, 97),
             "weights": (jax.random.uniform(k[2], (2, 12)) > 0.3).astype(jnp.float32)}
    params = layers.unbox(model.init(jax.random.key(1), inputs)["params"])

    def value_and_grad(chunk):
        f = lambda p: lm.loss(model.apply, p, batch, None, ce_chunk=chunk)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (plain, plain_aux), plain_grads = value_and_grad(0)
    for chunk in (4, 12):
        (value, aux), grads = value_and_grad(chunk)
        np.testing.assert_allclose(value, plain, rtol=1e-6)
        np.testing.assert_array_equal(aux["correct"], plain_aux["correct"])
        # float32 sums in another order: each gradient equal to 1e-6 of its own scale
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain_grads)):
            assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), np.abs(a - b).max()
    with pytest.raises(ValueError, match=r"ce_chunk=5 must be a positive divisor of the "
                                         r"sequence length 12"):
        lm.loss(model.apply, params, batch, None, ce_chunk=5)
