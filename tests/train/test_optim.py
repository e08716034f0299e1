"""train/optim.py: the one optimizer factory (the trainer, MAC, DKVB and the encoders use it)."""
import jax
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


def test_no_decay_groups_keep_norms_biases_embeddings_and_recurrences():
    # AdamW with zero gradients moves a parameter only by its decay, -lr·wd·p
    p = {"embed": {"embedding": jnp.ones(2)}, "block_0": {
        "ln_1": {"scale": jnp.ones(2)}, "attn": {"query": jnp.ones(2)},
        "mixer": {"b_f": jnp.ones(2), "lam": jnp.ones(2), "w_in": {"kernel": jnp.ones(2)}},
        "mlp": {"fc_in": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}}}
    o = optim.optim(lr=0.1, weight_decay=0.5, no_decay=optim.NO_DECAY)
    tx, _ = optim.make_optimizer(o)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    u, _ = tx.update(zeros, tx.init(p), p)
    moved = {optim.param_path(k): float(v[0]) for k, v in jax.tree_util.tree_leaves_with_path(u)}
    decayed = {"block_0/attn/query", "block_0/mixer/w_in/kernel", "block_0/mlp/fc_in/kernel"}
    for path, step in moved.items():
        assert step == pytest.approx(-0.05 if path in decayed else 0.0), path
    every, _ = optim.make_optimizer(optim.optim(lr=0.1, weight_decay=0.5))   # the default
    u, _ = every.update(zeros, every.init(p), p)
    assert all(float(v[0]) == pytest.approx(-0.05) for v in jax.tree_util.tree_leaves(u))


def test_no_decay_of_the_models_and_the_trainer(tmp_path):
    from train import trainer
    from train.configs import birdie
    from models import layers
    c = birdie.get_config("tiny:hawk_birdie")
    params = layers.unbox(trainer.build_model(c.model).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    kept = {optim.param_path(k).split("/", 1)[-1] for k, v in
            jax.tree_util.tree_leaves_with_path(optim.decay_mask(optim.NO_DECAY, params))
            if not v}
    assert kept == {"embedding", "scale", "norm/scale", "mlp_norm/scale", "mixer/b_gates",
                    "mixer/conv_b", "mixer/lam"}
    c.num_steps, c.batch_size, c.checkpoint_every, c.eval_every = 2, 2, 0, 0
    del c.hooks
    c.progress = False
    c.optim.no_decay = optim.NO_DECAY
    out = trainer.train(c, tmp_path, devices=jax.devices()[:1])   # boxed parameters too
    assert out["step"] == 2 and np.isfinite(out["final_loss"])
    with pytest.raises(ValueError, match=r"optim.no_decay has '\(', not a regular expression"):
        optim.make_optimizer(optim.optim(lr=0.1, no_decay=("(",)))
