"""The committed runs under results/checkpoints/ that `make demo` evaluates instead of training:
each must still match the recipe that names it, build the current model and restore."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
import pytest

from eval import passkey
from train.configs import landmark as landmark_configs

SHIPPED_SIZES = [size for size, s in landmark_configs.PASSKEY_SIZES.items() if "shipped" in s]


def test_the_demo_ships_at_most_the_landmark_run():
    assert SHIPPED_SIZES == ["quick"]
    shipped = sorted(p.name for p in passkey.SHIPPED_DIR.iterdir() if p.is_dir())
    assert shipped == [passkey.shipped_dir(size).name for size in SHIPPED_SIZES]


@pytest.mark.parametrize("size", SHIPPED_SIZES)
def test_shipped_run_matches_its_recipe_and_restores(size):
    config, params, model, workdir = passkey.load_shipped(size)
    assert workdir == passkey.shipped_dir(size)
    src_size, src_seed = landmark_configs.PASSKEY_SIZES[size]["shipped"]
    # The config that names the folder is the one the stored run was trained with.
    assert passkey.run_dir(src_size, src_seed, workdir.parent.parent).name == workdir.name
    # Every parameter has the shape the current model initialises.
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    init = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens,
                                   is_landmark=jnp.zeros((1, config.seq_len), bool))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)):
        assert a.shape == b.shape and np.isfinite(np.asarray(b)).all()
    # Memory inference runs on the restored weights over a prompt longer than the window.
    trials = passkey.make_trials(2 * config.seq_len, 1, seed=0)
    logits = passkey.memory_inference_logits(model, params, trials, chunk_len=config.seq_len // 2)
    assert logits.shape[:2] == trials.shape and np.isfinite(logits).all()


def test_a_shipped_run_of_another_recipe_is_refused(monkeypatch):
    # The same committed folder named by a recipe with other blocks must not be reused.
    sizes = {k: dict(v) for k, v in landmark_configs.PASSKEY_SIZES.items()}
    monkeypatch.setattr(landmark_configs, "PASSKEY_SIZES", sizes)
    monkeypatch.setattr(passkey, "shipped_dir", lambda size: passkey.SHIPPED_DIR / sorted(
        p.name for p in passkey.SHIPPED_DIR.iterdir() if p.is_dir())[0])
    sizes["cpu"]["width"] = 32
    with pytest.raises(ValueError, match="model.width: 64 -> 32"):
        passkey.check_shipped("quick")
