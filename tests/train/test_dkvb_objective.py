"""DKVB value training through the shared trainer, one phase per task: every value outside the
fetched set stays fixed, keys stay frozen, usage is counted; only plain SGD is allowed; the
probes train; the unsupervised encoder is fitted without labels."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import encoders
from train import trainer
from train.configs import dkvb as dkvb_configs
from train.configs import dkvb_encoder
from train.data import embeddings
from train.objectives import dkvb as obj
from train.objectives import encoders as enc_obj

D, C, K, DK, V, N = 6, 3, 32, 2, 4, 16


def _config(method, data_dir, **model):
    c = dkvb_configs.get_config(method)
    c.batch_size, c.input_shape, c.progress = 8, (D,), False
    c.data.data_dir = str(data_dir)
    c.model.num_classes = V
    c.model.update(model)
    if method == "dkvb":
        c.memory.dkvb_codebooks.update(key_dim=DK, key_init_epochs=2, key_init_batch=64)
    return c


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """Two tasks whose items sit around two distant points (they fetch mostly different keys),
    trained as two phases of one DKVB run; (memory, values) after each phase."""
    d = tmp_path_factory.mktemp("emb")
    r = np.random.default_rng(0)
    z = np.concatenate([0.3 * r.standard_normal((N, D)) + 2.0,
                        0.3 * r.standard_normal((N, D)) - 2.0]).astype(np.float32)
    y = np.concatenate([np.arange(N) % 2, 2 + np.arange(N) % 2])
    embeddings.save(d, "train", z, y)
    embeddings.save(d, "test", z, y)
    embeddings.save(d, "keys", r.standard_normal((256, D)) * 2.0)
    base = _config("dkvb", d, num_codebooks=C, num_keys=K)
    phases = dkvb_configs.task_phases(base, [[0, 1], [2, 3]], [N, N], epochs=3, eval_on="seen")
    workdir = tmp_path_factory.mktemp("run")
    out = []
    for c in phases:
        s = trainer.train(c, workdir, allow_changes=dkvb_configs.PHASE_CHANGES)
        out.append((jax.device_get(s["state"].memory["dkvb_codebooks"]),
                    np.asarray(s["state"].params["values"])))
    return out, workdir, phases


def test_unfetched_values_never_move_across_tasks(two_tasks):
    (m1, v1), (m2, v2), = two_tasks[0]
    f1 = m1["usage"] > 0
    f2 = (m2["usage"] - m1["usage"]) > 0               # fetched during task 2
    only_task1, never = f1 & ~f2, ~(f1 | f2)
    assert only_task1.any() and never.any()           # the fixture exercises both cases
    # Values start at zero: task 1 moved what it fetched, nothing else; during task 2 the values
    # only task 1 fetched stayed bitwise where task 1 left them.
    assert np.all(np.any(v1[f1] != 0, -1)) and not np.any(v1[~f1])
    np.testing.assert_array_equal(v2[never], 0.0)
    np.testing.assert_array_equal(v2[only_task1], v1[only_task1])
    assert np.all(np.any(v2[f2] != v1[f2], -1))
    # Keys and projection are frozen; usage counts every fetch (3 epochs of 16 items, batch 8).
    np.testing.assert_array_equal(m1["keys"], m2["keys"])
    np.testing.assert_array_equal(m1["projection"], m2["projection"])
    assert int(m1["usage"].sum()) == 3 * 2 * 8 * C and int(m2["usage"].sum()) == 2 * 3 * 2 * 8 * C


def test_each_task_ends_with_a_checkpoint_and_an_evaluation(two_tasks):
    _, workdir, phases = two_tasks
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [c.num_steps for c in phases] == [6, 12]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 12]


def test_dkvb_allows_plain_sgd_only(tmp_path):
    c = _config("dkvb", tmp_path, num_codebooks=C, num_keys=K)
    c.optim.name = "adamw"
    with pytest.raises(ValueError, match="optim.name='adamw' is not allowed for objective 'dkvb'"):
        trainer.validate_config(c)
    c = _config("dkvb", tmp_path, num_codebooks=C, num_keys=K)
    del c.memory["dkvb_codebooks"]
    with pytest.raises(ValueError, match="needs config.memory.dkvb_codebooks"):
        trainer.validate_config(c)


def test_probes_train_on_the_same_embeddings(two_tasks, tmp_path):
    _, _, phases = two_tasks
    c = _config("mlp", phases[0].data.data_dir)
    c.num_steps = 4
    s = trainer.train(c, tmp_path / "mlp")
    model, params = s["run"].model, jax.device_get(s["state"].params)
    init = jax.device_get(trainer.init_state(s["run"]).params)      # the run's own start
    assert params["hidden"]["kernel"].shape == (D, 128)
    assert np.all(np.asarray(params["out"]["kernel"]) != np.asarray(init["out"]["kernel"]))
    z, y = embeddings.load(str(phases[0].data.data_dir), "test")
    assert obj.predict(model, params, {}, z).shape == y.shape


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
