"""models/transformer.py: the init scale (`init_std`) of every weight matrix and the embedding;
the blocks as one scan."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer
from models.transformer import Transformer, TransformerConfig
from train import trainer
from train.configs import lm


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


def test_scan_layers_is_the_layer_loop():
    """One nn.scan over stacked blocks (remat with a policy) computes the per-layer model's
    logits and gradients; a config builds it, its stacked axis named "layers"."""
    c = transformer.TransformerConfig(vocab_size=64, width=32, num_layers=3, num_heads=4)
    loop = transformer.Transformer(c)
    scan = transformer.Transformer(c.replace(scan_layers=True, remat=True, remat_policy="dots"))
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    p = nn.unbox(loop.init(jax.random.key(0), x)["params"])
    ps = transformer.stack_layers(p, 3)
    assert ps["blocks"]["block"]["attn"]["query"].shape == (3, 32, 4, 8)
    np.testing.assert_allclose(scan.apply({"params": ps}, x), loop.apply({"params": p}, x),
                               atol=1e-6)
    loss = lambda m: lambda q: m.apply({"params": q}, x).mean()  # noqa: E731
    g_scan = transformer.unstack_layers(jax.grad(loss(scan))(ps), 3)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                           g_scan, jax.grad(loss(loop))(p))
    with pytest.raises(ValueError, match="remat_policy='some'"):
        c.replace(remat_policy="some")
    cfg = lm.get_config("tiny")
    cfg.model.scan_layers = True                  # what --config.model.scan_layers=True builds
    shapes = jax.eval_shape(trainer.build_model(cfg.model).init, jax.random.key(0), x)
    assert set(shapes["params"]) == {"embed", "blocks", "ln_f"}
    assert shapes["params"]["blocks"]["block"]["ln_1"]["scale"].names == ("layers", "embed")
