"""MQAR accuracy of a trained LM, and the `lm_mqar` figure.

    python -m eval.lm_mqar --workdir RUN [--seed S] [--examples N]

prints one JSON line {"accuracy": ..., "no_binding": ..., "examples": N}: the fraction of queried
keys whose value the model predicts (argmax at the answer positions) on MQAR's held-out "test"
split, and `mqar_no_binding` on the same examples.

The figure (`python -m eval.figures --only lm_mqar`) trains the baseline LM on MQAR with the
shared trainer (sizes and its trainer config in train/configs/lm.py: MQAR_SIZES, mqar_config),
then draws its loss curve and reports the test accuracy against `no_binding`, the accuracy of
answering each query with a value drawn uniformly from the example's own pairs (what a model that
copies values but has not bound them to keys gets; about 1/P):
JSON {"accuracy": acc, "no_binding": b, "final_loss": v}.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval import cli, figures
from train import config_identity
from train import metrics as metrics_lib
from train import trainer
from train.configs import lm
from train.data import pipeline


def _test_batches(data_config, *, seq_len: int, num_examples: int, batch_size: int, seed: int):
    """The MQAR "test" batches an evaluation reads: whole batches until >= num_examples rows."""
    it = pipeline.make_dataset(data_config, split="test", seed=seed, global_batch_size=batch_size,
                               seq_len=seq_len, process_index=0, process_count=1, num_epochs=1)
    seen = 0
    for batch in it:
        yield batch
        seen += len(batch["weights"])
        if seen >= num_examples:
            break


def mqar_accuracy(model, params, data_config, *, seq_len: int, num_examples: int = 256,
                  batch_size: int = 32, seed: int = 0) -> float:
    """Answer-position accuracy on the MQAR 'test' split (weights mark the answers)."""
    apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
    correct = total = 0.0
    for batch in _test_batches(data_config, seq_len=seq_len, num_examples=num_examples,
                               batch_size=batch_size, seed=seed):
        pred = np.asarray(apply(params, batch["inputs"]))
        w = batch["weights"]
        correct += float(((pred == batch["targets"]) * w).sum())
        total += float(w.sum())
    if total == 0:
        raise ValueError("the MQAR test split produced no answer positions")
    return correct / total


def validate_size(size: str) -> None:
    """Checks the lm_mqar figure at `size` before any training: the trainer config (steps, batch,
    model) and the MQAR layout (pairs within the key and value ranges, pairs and queries within
    seq_len). Raises a ValueError naming the field, its value and what is allowed."""
    if size not in lm.MQAR_SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(lm.MQAR_SIZES)}")
    c = lm.mqar_config(size, 0)
    if c.num_steps < 1:
        raise ValueError(f"MQAR_SIZES[{size!r}].num_steps={c.num_steps} is not allowed; use >= 1")
    trainer.validate_config(c)
    trainer.build_model(c.model)
    pipeline.mqar_spec(c.data, c.seq_len)


def mqar_no_binding(data_config, *, seq_len: int, num_examples: int = 256, batch_size: int = 32,
                    seed: int = 0) -> float:
    """Exact expected accuracy of answering every query with a value drawn uniformly from its own
    example's P pairs, on the examples `mqar_accuracy` reads with the same arguments.

    Per query: (pairs whose value equals the answer) / P, averaged over the queries. This is the
    plateau of a model that has learned to copy a value of the context but not which key it
    belongs to, so accuracy above it needs key-value binding; 1 / |value_range| (a model that
    ignores the context) is far lower and says nothing about binding."""
    P = int(data_config.num_pairs)
    hits = total = 0.0
    for batch in _test_batches(data_config, seq_len=seq_len, num_examples=num_examples,
                               batch_size=batch_size, seed=seed):
        values_BxP = np.asarray(batch["inputs"])[:, 1:2 * P:2]
        targets_BxT, w_BxT = np.asarray(batch["targets"]), np.asarray(batch["weights"])
        share_BxT = (values_BxP[:, None, :] == targets_BxT[:, :, None]).mean(-1)
        hits += float((share_BxT * w_BxT).sum())
        total += float(w_BxT.sum())
    if total == 0:
        raise ValueError("the MQAR test split produced no answer positions")
    return hits / total


def run_dir(size: str, seed: int, out: pathlib.Path) -> pathlib.Path:
    """OUT/runs/lm_mqar-SIZE-seedSEED-HASH: HASH (train/config_identity.py: recipe_hash) names
    the figure's config, so a changed recipe trains into a new folder instead of resuming."""
    h = config_identity.recipe_hash([lm.mqar_config(size, seed)])
    return pathlib.Path(out) / "runs" / f"lm_mqar-{size}-seed{seed}-{h}"


def figure_settings(size: str) -> dict:
    """The figure's recipe at `size` (its trainer config at seed 0), hashed into provenance."""
    return lm.mqar_config(size, seed=0).to_dict()


@figures.register("lm_mqar", settings=figure_settings)
def lm_mqar_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    c = lm.mqar_config(size, seed)
    workdir = run_dir(size, seed, out)
    summary = trainer.train(c, workdir)
    params = summary["state"].params
    acc = mqar_accuracy(summary["run"].model, jax.device_get(params), c.data, seq_len=c.seq_len,
                        num_examples=512, seed=seed)
    no_binding = mqar_no_binding(c.data, seq_len=c.seq_len, num_examples=512, seed=seed)
    curve = [(r["step"], r["loss"], r["accuracy"])
             for r in metrics_lib.read_metrics(workdir) if "loss" in r]
    figures.write_csv(out / "lm_mqar.csv", ["step", "train_loss", "train_answer_accuracy"], curve)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps, losses, accs = zip(*curve)
    ax[0].plot(steps, losses)
    ax[0].set(xlabel="step", ylabel="train loss (answer tokens)", title="tiny LM on MQAR")
    ax[1].plot(steps, accs, label="train batch")
    ax[1].axhline(acc, color="k", ls="--", label=f"test: {acc:.3f}")
    ax[1].axhline(no_binding, color="r", ls=":",
                  label=f"a value of the example's own pairs: {no_binding:.3f}")
    ax[1].set(xlabel="step", ylabel="answer accuracy", ylim=(0, 1.02))
    ax[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm_mqar.png", dpi=120)
    plt.close(fig)
    return {"accuracy": acc, "no_binding": no_binding, "final_loss": float(summary["final_loss"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="MQAR accuracy of a trained run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=512)
    a = p.parse_args(argv)
    config, params, model = trainer.restore_for_eval(a.workdir)
    if config.data.name != "mqar":
        raise ValueError(f"run {a.workdir} trained on data.name={config.data.name!r}, not 'mqar'")
    acc = mqar_accuracy(model, params, config.data, seq_len=config.seq_len,
                        num_examples=a.examples, seed=a.seed)
    no_binding = mqar_no_binding(config.data, seq_len=config.seq_len, num_examples=a.examples,
                                 seed=a.seed)
    print(json.dumps({"accuracy": acc, "no_binding": no_binding, "examples": a.examples,
                      "workdir": a.workdir}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
