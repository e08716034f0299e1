"""Class-incremental DKVB protocol: data, task splits, a tiny toy run, the TFDS CIFAR path, the
split-digits figure's unsupervised encoder, pretrained backbones on CIFAR, the paper's sizes."""
import json

import jax
import numpy as np
import pytest

from eval import class_incremental as ci
from train.data import images


def test_toy_data_and_tasks():
    x, y = ci.toy_data(0, 50)
    assert x.shape == (400, 2) and np.bincount(y).tolist() == [50] * 8
    for c in range(8):
        np.testing.assert_allclose(x[y == c].mean(0), ci.TOY_MEANS[c], atol=0.015)
    tasks = ci.task_classes(ci.check_class_order([5, 2, 7, 0, 3, 6, 1, 4], 8), 2)
    assert tasks == [[5, 2], [7, 0], [3, 6], [1, 4]]
    split = ci.split_tasks(x, y, tasks)
    assert [sorted(set(t[1].tolist())) for t in split] == [[2, 5], [0, 7], [3, 6], [1, 4]]
    with pytest.raises(ValueError, match="class_order"):
        ci.check_class_order([0, 1, 2, 2, 4, 5, 6, 7], 8)
    with pytest.raises(ValueError, match="classes_per_task"):
        ci.task_classes(list(range(8)), 3)


def test_toy_protocol_dkvb_remembers_mlp_forgets(tmp_path):
    """Tiny toy run (permuted class order) through the trainer: DKVB keeps all classes, the MLP
    only the last task."""
    x_tr, y_tr = ci.toy_data(1, 50)
    x_te, y_te = ci.toy_data(2, 50)
    x_keys = np.random.default_rng(3).uniform(size=(1000, 2)).astype(np.float32)
    out = ci.run_protocol(
        out=tmp_path, tag="toy-test", seed=0, z_train=x_tr, y_train=y_tr, z_test=x_te,
        y_test=y_te, z_keys=x_keys, num_classes=8, class_order=[3, 6, 1, 4, 7, 0, 5, 2],
        classes_per_task=2, epochs=30,
        dcfg=ci.DKVBConfig(num_codebooks=4, num_keys=48, key_dim=2, key_init_epochs=5),
        eval_on="all", iid=False, methods=("dkvb", "mlp"))
    dkvb, mlp = out["ci"]["dkvb"], out["ci"]["mlp"]
    assert len(dkvb) == 4
    # After task t at most t/4 of all classes can be right; DKVB gets (nearly) all of them.
    for t, a in enumerate(dkvb):
        assert a <= (t + 1) / 4 + 1e-9
    assert dkvb[-1] >= 0.95, dkvb
    assert mlp[-1] <= 0.5, mlp


def test_digits_formats():
    x_tr, y_tr, x_te, y_te = ci.load_split_digits(0)
    assert x_tr.shape[1:] == (8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.min() >= 0 and x_tr.max() <= 1
    assert set(np.unique(y_te)) == set(range(10))
    # The MNIST -> optdigits reduction: a filled 10x5 block is scaled to 32x16 px, centred, so
    # four full 8-pixel-high columns of 4x4 blocks.
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 5:15, 10:15] = 255
    small = images._to_digits_format(img, 0.0)[0]
    assert small.shape == (8, 8)
    assert np.all(small[:, 2:6] == 1.0) and small.sum() == 32.0


def test_mnist_sample_ships_offline():
    x, y = ci.load_mnist_8x8()
    assert x.shape == (5000, 8, 8) and np.bincount(y).tolist() == [500] * 10
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_figures_registered():
    from eval import figures
    reg = figures.load_all()
    assert "dkvb_toy" in reg and "dkvb_split_digits" in reg


def test_cifar_tfds_path_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        x, y = ci.load_cifar("cifar100", "train")
        assert x.shape == (24, 32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
        assert y.dtype == np.int32 and y.max() < 100
        x10, y10 = ci.load_cifar("cifar10", "test", max_examples=10)
        assert x10.shape == (10, 32, 32, 3) and y10.max() < 10
    with pytest.raises(ValueError, match="name"):
        ci.load_cifar("mnist", "train")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_split_digits(tmp_path_factory):
    """The split-digits figure at a tiny size on a tenth of the MNIST sample (the encoder's run
    reads the whole sample), recording what fit_encoder got; the labelled CNN ablation is
    stopped right after fit_encoder is called."""
    tiny = (ci.DKVBConfig(num_codebooks=4, num_keys=16, key_dim=4, key_init_epochs=1), 1, 1)
    x, y = ci.load_mnist_8x8()
    seen = {}
    fit_encoder = ci.fit_encoder

    def spy(kind, seed, x_other, **kw):
        seen[kind] = kw
        if kind == "cnn":
            raise _Stop
        return fit_encoder(kind, seed, x_other, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ci.DIGITS_SIZES, "tiny", tiny)
        # A figure may check every table of its module for the size (validate_size).
        mp.setitem(ci.TOY_SIZES, "tiny", (tiny[0], 1, 1, 1))
        mp.setattr(ci, "fit_encoder", spy)
        mp.setattr(ci, "load_mnist_8x8", lambda: (x[::10], y[::10]))
        out = tmp_path_factory.mktemp("ae")
        numbers = ci.dkvb_split_digits(size="tiny", seed=0, out=out)  # the default encoder
        with pytest.raises(_Stop):
            ci.dkvb_split_digits(size="tiny", seed=0, out=out, encoder="cnn")
    return seen, numbers, out


def test_split_digits_default_encoder_never_sees_labels(tiny_split_digits):
    seen, r, out = tiny_split_digits
    # The default encoder is a trainer run on MNIST images whose records carry no labels.
    (run,) = (out / "runs").glob("dkvb_encoder-ae-mnist_8x8-seed1-*")
    assert seen["ae"]["workdir"] == run and seen["ae"]["dataset"] == "mnist_8x8"
    stored = json.loads((run / "config.json").read_text())
    assert stored["data"]["with_labels"] is False and stored["objective"] == "reconstruct"
    source = images.ImageSource("mnist_8x8", "train", with_labels=False)
    assert set(source[0]) == {"images"}
    # The labelled ablation's run would read them.
    assert seen["cnn"]["workdir"].name.startswith("dkvb_encoder-cnn-mnist_8x8-seed1-")
    assert ci.encoder_config("cnn", dataset="mnist_8x8", seed=1, fit_epochs=1).data.with_labels
    assert r["encoder"] == {"kind": "ae", "supervision": "none"}
    assert ci.encoders.SUPERVISION["cnn"] == "labels"  # what the ablation's JSON records
    assert set(r["accuracy_after_task"]) == {"dkvb", "linear_ci", "mlp_ci"}
    assert all(len(a) == 5 for a in r["accuracy_after_task"].values())
    assert (out / "dkvb_split_digits.png").exists() and (out / "dkvb_split_digits.csv").exists()


def test_split_digits_title_names_the_supervision():
    assert "without labels" in ci.digits_title(encoder="ae", size="cpu", seed=0)
    assert "WITH the digit labels" in ci.digits_title(encoder="cnn", size="cpu", seed=0)


def test_encoder_fitting_refuses_what_it_cannot_fit():
    x = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="encoder='vit'"):
        ci.fit_encoder("vit", 0, x)
    with pytest.raises(ValueError, match="encoder='ae' is fitted by the trainer"):
        ci.fit_encoder("ae", 0, x)
    with pytest.raises(ValueError, match="epochs=0"):
        ci.encoder_config("ae", dataset="mnist_8x8", seed=0, fit_epochs=0)

# --------------------------------------------------------------------------- pretrained backbones


@pytest.fixture(scope="module")
def cifar_backbone_run(tmp_path_factory, reference_dir):
    """The CLI on mocked CIFAR-10 (keys from mocked CIFAR-100) with the tiny CLIP fixture as
    backbone, at the tiny sizes given as flags; then the embeddings asked for again (a later run
    finds them cached). Returns (metrics, workdir, backbone folder, mocked data, embed calls)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from train.data import backbones
    folder = reference_dir / "hf" / "clip_vision"
    work = tmp_path_factory.mktemp("cifar_clip")
    calls = []
    embed = backbones.embed_images

    def spy(bb, x, **kw):
        calls.append(len(x))
        return embed(bb, x, **kw)

    argv = ["--dataset", "cifar10", "--backbone", str(folder), "--workdir", str(work),
            "--num_codebooks", "4", "--num_keys", "16", "--key_dim", "4", "--key_init_epochs",
            "1", "--key_init_batch", "32", "--epochs_per_task", "2", "--size", "tiny"]
    with tfds.testing.mock_data(num_examples=100, policy=tfds.testing.MockPolicy.USE_CODE), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "embed_images", spy)
        # two learners, no i.i.d. runs: the CLI's path, at a test's cost
        mp.setattr(ci, "METHODS", ("dkvb", "linear"))
        numbers = ci.cifar_numbers
        mp.setattr(ci, "cifar_numbers", lambda *a, **kw: numbers(*a, **kw, iid=False,
                                                                 methods=("dkvb", "linear")))
        assert ci.main(argv) == 0
        first = len(calls)
        again = ci.backbone_embeddings("cifar10", str(folder), out=work)   # a later run's
        assert again["train"][0].shape == (100, 24)
        data = {k: ci.load_cifar(*k) for k in (("cifar10", "train"), ("cifar10", "test"),
                                                ("cifar100", "train"))}
    metrics = json.loads((work / "metrics.json").read_text())
    return metrics, work, folder, data, (first, len(calls))


def test_cifar_backbone_protocol_end_to_end(cifar_backbone_run):
    metrics, work, folder, data, (first, total) = cifar_backbone_run
    all_, seen = (metrics["accuracy_all_classes_after_task"],
                  metrics["accuracy_seen_classes_after_task"])
    assert metrics["accuracy_after_task"] == all_          # the paper reports all classes
    _, y_test = data[("cifar10", "test")]
    for name in ("dkvb", "linear"):
        assert len(all_[name]) == len(seen[name]) == 5
        for t, (a, s) in enumerate(zip(all_[name], seen[name])):
            # right answers on all test items >= right answers on the seen classes' items
            n_seen = np.isin(y_test, sorted(set(range(2 * t + 2)))).sum()
            assert a * len(y_test) >= s * n_seen - 1e-6 and 0 <= a <= 1 and 0 <= s <= 1
    # tfds' mock data gives train and test the same 100 random images: DKVB keeps the values
    # it wrote for earlier tasks, the probe (lr 1e-3, 2 epochs a task) barely moves
    assert all_["dkvb"][-1] > all_["linear"][-1] + 0.2, all_
    assert metrics["dkvb"]["num_keys"] == 16 and metrics["epochs_per_task"] == 2
    # embedded once: train, test and the keys' data (the other CIFAR), none on the rerun
    assert first == 3 and total == 3
    (cache,) = (work / "runs" / "dkvb_embeddings").glob("backbone-*")
    files = sorted(p.name.rsplit("-", 1)[0] for p in cache.glob("*.npz"))
    assert files == ["cifar10-test", "cifar10-train", "cifar100-train"]
    # the keys were initialised on CIFAR-100's embeddings; probes at 1e-3, DKVB at 0.3
    (keys_file,) = (work / "runs").glob("dkvb_data-cifar10-*/keys.npz")
    (cached_keys,) = cache.glob("cifar100-train-*.npz")
    np.testing.assert_array_equal(np.load(keys_file)["z"], np.load(cached_keys)["z"])
    lrs = {}
    for run in (work / "runs").glob("dkvb-cifar10-*"):
        cfg = json.loads((run / "config.json").read_text())
        lrs[cfg["model"]["family"]] = cfg["optim"]["lr"]
    assert lrs == {"dkvb": 0.3, "probe": 1e-3}


def test_cached_embeddings_are_the_backbone_on_preprocessed_images(cifar_backbone_run):
    from models import pretrained
    from train.data import backbones
    _, work, folder, data, _ = cifar_backbone_run
    x, _ = data[("cifar10", "test")]
    model, params = pretrained.from_hf(str(folder))
    bb = backbones.load_backbone(str(folder))
    assert bb.image_size == 32 and bb.mean[0] == pytest.approx(0.48145466)
    direct = jax.jit(model.apply)({"params": params}, backbones.preprocess(bb, x[:8]))
    (cached,) = (work / "runs" / "dkvb_embeddings").glob("backbone-*/cifar10-test-*.npz")
    # sharded over 8 devices in batches vs one call: the same numbers up to float32 noise
    np.testing.assert_allclose(np.load(cached)["z"][:8], np.asarray(direct), atol=1e-5)


def _plan(argv, capsys):
    assert ci.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("backbone", ["clip_vision", "resnet"])
def test_paper_sizes_validate_without_running(reference_dir, capsys, backbone):
    """The paper's command line, and --size paper, give the paper's sizes and check every
    learner's first-phase config, the CIFAR data spec and the backbone's width without
    embedding or training (the tiny fixtures stand in for ViT-B/32 and ResNet-50)."""
    folder = str(reference_dir / "hf" / backbone)
    flags = ["--num_codebooks", "256", "--num_keys", "4096", "--key_dim", "14",
             "--epochs_per_task", "2000", "--probe_lr", "1e-3"]
    by_flags = _plan(["--dataset", "cifar10", "--size", "tiny", "--backbone", folder,
                      "--validate_only", *flags], capsys)
    paper = _plan(["--dataset", "cifar10", "--size", "paper", "--backbone", folder,
                   "--validate_only"], capsys)
    for plan in (by_flags, paper):
        d = plan["dkvb"]
        assert (d["num_codebooks"], d["num_keys"], d["key_dim"], d["probe_lr"]) == (
            256, 4096, 14, 1e-3)
        assert plan["epochs_per_task"] == 2000 and plan["tasks"] == 5
        assert plan["keys_from"] == "cifar100"
        assert plan["data"]["cifar10"]["classes"] == 10
        assert plan["data"]["cifar100"]["classes"] == 100
        # 5,000 images per class x 2 classes x 2000 epochs / batches of 256
        assert plan["learners"]["dkvb"] == {"lr": 0.3, "optimizer": "sgd", "batch_size": 256,
                                            "steps_per_task": 78125}
        assert plan["learners"]["linear"]["lr"] == plan["learners"]["mlp"]["lr"] == 1e-3
    assert paper["embed_dim"] == (24 if backbone == "clip_vision" else 32)
    c100 = _plan(["--dataset", "cifar100", "--size", "paper", "--backbone", folder,
                  "--validate_only"], capsys)
    assert c100["tasks"] == 50 and c100["epochs_per_task"] == 500
    assert c100["keys_from"] == "cifar10"


@pytest.mark.parametrize("argv,match", [
    (["--dataset", "cifar10", "--num_keys", "0", "--validate_only"], "num_keys=0"),
    (["--dataset", "cifar10", "--probe_lr", "-1", "--validate_only"], "probe_lr=-1.0"),
    (["--dataset", "toy", "--num_keys", "64"], "--num_keys is for --dataset cifar10"),
    (["--dataset", "digits", "--backbone", "x"], "--backbone is for --dataset cifar10"),
    (["--dataset", "cifar10", "--backbone", "/nonexistent/dir", "--validate_only"],
     "not a local directory"),
])
def test_cifar_flags_refuse_bad_input(argv, match):
    with pytest.raises(ValueError, match=match):
        ci.main(argv)
