"""DKVB value training keeps every value outside the fetched set fixed, whatever the optimizer;
the unsupervised encoder is fitted without labels."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memory import codebook as cb
from models import encoders
from models.kv_bottleneck import KVBottleneck
from train import trainer
from train.configs import dkvb_encoder
from train.objectives import dkvb as obj
from train.objectives import encoders as enc_obj

D, C, K, DK, V, N = 6, 3, 32, 2, 4, 16


@pytest.fixture(scope="module")
def two_tasks():
    """Codebooks with non-zero values and two tasks whose items fetch different keys."""
    r = jax.random.split(jax.random.PRNGKey(0), 4)
    books = cb.init_codebooks(r[0], embed_dim=D, num_codebooks=C, num_keys=K, key_dim=DK,
                              value_dim=V)
    keys = jnp.swapaxes(cb.project(jax.random.normal(r[1], (K, D)), books.projection_CxDxDk), 0, 1)
    # Non-zero values: weight decay moves every non-zero value it is allowed to touch.
    books = books.replace(keys_CxKxDk=keys, values_CxKxDv=jax.random.normal(r[2], (C, K, V)))
    # Task 1 around one point, task 2 around another: they fetch mostly different keys.
    z1 = 0.3 * jax.random.normal(r[3], (N, D)) + 2.0
    z2 = 0.3 * jax.random.normal(jax.random.PRNGKey(9), (N, D)) - 2.0
    y1 = jnp.arange(N) % 2
    y2 = 2 + jnp.arange(N) % 2
    learner, state = obj.dkvb_learner(KVBottleneck(num_classes=V), books)
    return learner, state, (z1, y1), (z2, y2)


def _fetched(learner, state, z):
    idx = np.asarray(learner.features(state, z))
    mask = np.zeros((C, K), bool)
    mask[np.arange(C)[None], idx] = True
    return mask


# Momentum carries task 1's gradients into task 2; weight decay pulls every value to zero. Either
# moves values the batch did not fetch unless the step masks the update.
LEAKY_OPTIMIZERS = {
    "momentum": optax.sgd(0.3, momentum=0.9),
    "weight_decay": optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.3)),
}


@pytest.mark.parametrize("name", sorted(LEAKY_OPTIMIZERS))
def test_unfetched_values_never_move_across_tasks(two_tasks, name):
    learner, state, (z1, y1), (z2, y2) = two_tasks
    cfg = obj.ProtocolConfig(batch_size=8, epochs_per_task=3)
    train = obj.make_train_task(learner, cfg, tx=LEAKY_OPTIMIZERS[name])
    f1, f2 = _fetched(learner, state, z1), _fetched(learner, state, z2)
    only_task1 = f1 & ~f2
    assert only_task1.any() and (~(f1 | f2)).any()  # the fixture exercises both cases
    v0 = np.asarray(state.trainable["values"])
    s1, _ = train(state, learner.features(state, z1), y1, jnp.ones(N), jax.random.PRNGKey(1))
    v1 = np.asarray(s1.trainable["values"])
    s2, _ = train(s1, learner.features(s1, z2), y2, jnp.ones(N), jax.random.PRNGKey(2))
    v2 = np.asarray(s2.trainable["values"])
    # Task 1 moved its values; values no task fetched never moved; during task 2, the values only
    # task 1 fetched stayed bitwise where task 1 left them.
    assert np.all(np.any(v1[f1] != v0[f1], -1))
    np.testing.assert_array_equal(v2[~(f1 | f2)], v0[~(f1 | f2)])
    np.testing.assert_array_equal(v2[only_task1], v1[only_task1])
    assert np.all(np.any(v2[f2] != v1[f2], -1))


def test_padding_items_fetch_nothing(two_tasks):
    """Items with weight 0 (padding) neither count as fetched nor move their values."""
    learner, state, (z1, y1), (z2, _) = two_tasks
    z = jnp.concatenate([z1, z2])
    y = jnp.concatenate([y1, y1])
    w = jnp.concatenate([jnp.ones(N), jnp.zeros(N)])
    cfg = obj.ProtocolConfig(batch_size=2 * N, epochs_per_task=2)
    train = obj.make_train_task(learner, cfg, tx=LEAKY_OPTIMIZERS["weight_decay"])
    new, _ = train(state, learner.features(state, z), y, w, jax.random.PRNGKey(3))
    untouched = ~_fetched(learner, state, z1)
    np.testing.assert_array_equal(np.asarray(new.trainable["values"])[untouched],
                                  np.asarray(state.trainable["values"])[untouched])


def test_probe_learners_are_not_masked():
    """The probes are global learners: under weight decay every weight moves."""
    learner, state = obj.probe_learner(jax.random.PRNGKey(0), D, V)
    assert learner.local_update is None
    z = jax.random.normal(jax.random.PRNGKey(1), (N, D))
    cfg = obj.ProtocolConfig(batch_size=N, epochs_per_task=1)
    train = obj.make_train_task(learner, cfg, tx=LEAKY_OPTIMIZERS["weight_decay"])
    new, _ = train(state, z, jnp.arange(N) % 2, jnp.ones(N), jax.random.PRNGKey(2))
    assert np.all(np.asarray(new.trainable["out"]["kernel"])
                  != np.asarray(state.trainable["out"]["kernel"]))


# --------------------------------------------------------------------------- encoders


def test_autoencoder_config_takes_no_labels():
    c = dkvb_encoder.get_config("ae")
    assert c.data.with_labels is False and c.objective == "reconstruct"
    assert dkvb_encoder.get_config("cnn").data.with_labels is True
    assert encoders.SUPERVISION["ae"] == "none" and encoders.SUPERVISION["cnn"] == "labels"
    # reconstruct_loss reads the images only: a batch without labels is all it needs
    model = encoders.build_autoencoder(dict(c.model))
    x = np.random.default_rng(0).uniform(size=(4, 8, 8)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    loss, aux = enc_obj.reconstruct_loss(model.apply, params, {"images": x}, None)
    assert aux["weight"] == 4 * 64 and np.isfinite(float(loss))


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory):
    """A 3-step autoencoder run of the trainer on every 50th MNIST-8x8 image."""
    c = dkvb_encoder.get_config("ae")
    c.num_steps, c.batch_size, c.progress = 3, 16, False
    c.model.embed_dim = 16
    c.data.subsample = 50
    summary = trainer.train(c, tmp_path_factory.mktemp("ae"), devices=jax.devices()[:1])
    return summary["run"].model, {"params": summary["state"].params}


def test_autoencoder_fit_embeds(tiny_autoencoder):
    model, variables = tiny_autoencoder
    x = np.random.default_rng(0).uniform(size=(5, 8, 8)).astype(np.float32)
    z = np.asarray(encoders.ae_embed(model, variables, jnp.asarray(x)))
    assert z.shape == (5, 16) and np.all(z >= 0)  # ReLU bottleneck
    assert model.apply(variables, jnp.asarray(x)).shape == (5, 8, 8, 1)


def test_encoder_configs_reject_bad_input():
    with pytest.raises(ValueError, match="epochs"):
        dkvb_encoder.epochs_to_steps(0, "mnist_8x8", 128)
    with pytest.raises(ValueError, match="image_hw"):
        model = encoders.build_autoencoder({"embed_dim": 4, "image_hw": (7, 8)})
        model.init(jax.random.PRNGKey(0), np.zeros((1, 7, 8), np.float32))
    with pytest.raises(ValueError, match="the kind must be one of"):
        dkvb_encoder.get_config("vit")
    with pytest.raises(ValueError, match="the dataset must be one of"):
        dkvb_encoder.get_config("ae:svhn")
