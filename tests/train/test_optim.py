"""train/optim.py: the one optimizer factory (the trainer, MAC, DKVB and the encoders use it)."""
import jax.numpy as jnp
import numpy as np
import pytest

from train import optim
from train.configs import common


def test_cosine_schedule_of_the_trainer_configs():
    o = common.optim(lr=1.0, warmup_steps=4, weight_decay=0.0, min_lr_ratio=0.1)
    _, schedule = optim.make_optimizer(o, num_steps=20)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 20)], [0, 0.5, 1, 0.1],
                               atol=1e-6)


def test_sgd_clips_then_steps():
    tx, _ = optim.make_optimizer(optim.optim("sgd", lr=0.5, clip_norm=1.0))
    p = {"w": jnp.zeros(2)}
    u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(p), p)   # norm 5 → clipped to 1
    np.testing.assert_allclose(u["w"], [-0.3, -0.4], rtol=1e-6)


@pytest.mark.parametrize("field, value, match", [
    ("name", "lion", r"optim.name='lion' is not allowed"),
    ("schedule", "linear", r"optim.schedule='linear' is not allowed"),
    ("lr", 0.0, r"optim.lr=0.0 must be positive"),
    ("warmup_steps", -1, r"optim.warmup_steps=-1 must be an integer"),
])
def test_bad_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer({**optim.optim(lr=1.0), field: value})
