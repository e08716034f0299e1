# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab][badge]][colab]
#
# [badge]: https://colab.research.google.com/assets/colab-badge.svg
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/quickstart.ipynb

# %% [markdown]
# # mnemax quickstart: train, plot, checkpoint, restore
#
# This notebook trains the baseline decoder-only LM (`train/configs/lm.py:tiny`, shrunk further so
# it runs in well under a minute on 2 CPU cores) on multi-query associative recall (MQAR), plots
# its loss from `metrics.jsonl`, and restores the final Orbax checkpoint with
# `train.trainer.restore_for_eval`, checking that the restored parameters are the trained ones.
# Nothing is downloaded: MQAR examples are generated in memory.
#
# The same run from a shell:
#
#     python -m train.main --config train/configs/lm.py:tiny --workdir runs/lm_tiny

# %% [markdown]
# ## Install (Colab only)
#
# In Colab this installs mnemax: from the checkout if the notebook runs inside one, else from
# `MNEMAX_SOURCE` (an environment variable: a GitHub URL, a local path or wheel, or a PyPI name),
# by default the tag `MNEMAX_RELEASE` of https://github.com/mnemax/mnemax, the release this
# notebook was written for. Anywhere else it does nothing: from the repository, install the
# tested versions with `pip install -c constraints.txt -e '.[test]'` (or `make venv`).

# %%
import os
import pathlib
import subprocess
import sys

# The release this notebook was written for: "v" + pyproject.toml's version. Every notebook has
# this same cell; tests/colabs/test_notebooks.py checks that, and the tag.
MNEMAX_RELEASE = "v0.1.0"
MNEMAX_SOURCE = os.environ.get("MNEMAX_SOURCE",
                               f"https://github.com/mnemax/mnemax@{MNEMAX_RELEASE}")


def find_checkout(start: pathlib.Path):
    """The mnemax checkout holding `start` (a folder whose pyproject.toml names it), or None."""
    for folder in (start, *start.parents):
        project = folder / "pyproject.toml"
        if project.is_file() and 'name = "mnemax"' in project.read_text():
            return folder
    return None


def pip_target(source: str) -> list:
    """pip arguments for `source`: a repository URL (@TAG: a release) goes through git, the rest
    is given as is."""
    if source.startswith(("https://github.com/", "https://gitlab.com/")):
        return [f"git+{source}"]
    return [source]


if "google.colab" in sys.modules:
    checkout = find_checkout(pathlib.Path.cwd())
    target = ["-e", str(checkout)] if checkout else pip_target(MNEMAX_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *target], check=True)

# %% [markdown]
# ## Configure and train
#
# `get_config("tiny")` is the CLI's `tiny` variant; every field is commented in
# `train/configs/lm.py`. We shrink it (width 32, 16-token sequences of 4 key-value pairs and
# 4 queries) and read the data from memory instead of a TFDS build.

# %%
import json
import tempfile

import jax
import numpy as np

from train import trainer
from train.trainer import restore_for_eval
from train.configs import lm

config = lm.get_config("tiny")
config.model.width = 32          # D
config.model.num_heads = 4       # H
config.seq_len = 16              # T: 4 pairs (8 tokens) + 4 queries (8 tokens)
config.batch_size = 16           # B
config.num_steps = 80
config.log_every = 5             # a metrics.jsonl row every 5 steps
config.eval_every = 80           # one evaluation, at the end
config.checkpoint_every = 40     # checkpoints at steps 40 and 80
config.optim.warmup_steps = 10
config.data.source = "memory"    # generate MQAR examples on the fly; nothing written or fetched
config.data.num_pairs = 4
config.data.num_queries = 4

WORKDIR = pathlib.Path(os.environ.get("MNEMAX_WORKDIR") or tempfile.mkdtemp(prefix="quickstart_"))
print("devices:", jax.devices())
print("workdir:", WORKDIR)

summary = trainer.train(config, WORKDIR)
print({k: v for k, v in summary.items() if isinstance(v, (int, float))})

# %% [markdown]
# ## Plot the loss
#
# The trainer writes one JSON object per line to `WORKDIR/metrics.jsonl`: training rows (loss,
# accuracy, grad norm, learning rate, tokens/s), evaluation rows (`eval_loss`, ...) and events.

# %%
import matplotlib.pyplot as plt

rows = [json.loads(line) for line in (WORKDIR / "metrics.jsonl").read_text().splitlines()]
train_rows = [r for r in rows if "loss" in r]
steps = [r["step"] for r in train_rows]
losses = [r["loss"] for r in train_rows]

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(steps, losses, marker="o", label="train loss")
ax.axhline(np.log(config.model.vocab_size), color="gray", ls="--", label="uniform guess")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats)")
ax.legend()
fig.tight_layout()
fig.savefig(WORKDIR / "loss.png", dpi=100)
plt.show()
print(f"loss: {losses[0]:.3f} at step {steps[0]} → {losses[-1]:.3f} at step {steps[-1]}")

# %% [markdown]
# ## Restore the checkpoint
#
# `restore_for_eval(workdir)` reads the run's config and its newest checkpoint onto one device and
# returns `(config, params, model)`; `model.apply({"params": params}, tokens_BxT)` gives logits.

# %%
from train.checkpoint import Checkpointer

ckpt = Checkpointer(WORKDIR, async_save=False)
saved_steps = ckpt.all_steps()
ckpt.close()
print("checkpoints on disk:", saved_steps)

restored_config, restored_params, model = restore_for_eval(WORKDIR)
trained_params = jax.device_get(summary["state"].params)
restored_params = jax.device_get(restored_params)

same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                              trained_params, restored_params)
print("every restored leaf equals the trained one:", all(jax.tree_util.tree_leaves(same)))

# %% [markdown]
# Use the restored model: predict the answers of a few test-split MQAR queries.

# %%
test_batch = next(iter(trainer.make_data(restored_config, "test")))
logits_BxTxV = model.apply({"params": restored_params}, test_batch["inputs"])
predicted_BxT = np.asarray(logits_BxTxV.argmax(-1))
query = test_batch["weights"] > 0
print("query targets:   ", test_batch["targets"][0][query[0]])
print("model's answers: ", predicted_BxT[0][query[0]])
print(f"accuracy on this batch: {(predicted_BxT == test_batch['targets'])[query].mean():.3f}")

# %% [markdown]
# ## Checks

# %%
assert summary["step"] == config.num_steps, summary["step"]
assert np.isfinite(summary["final_loss"])
# Learning happened: the loss fell well below where it started (about ln V at init).
assert np.mean(losses[-3:]) < losses[0] - 0.3, (losses[0], losses[-3:])
assert (WORKDIR / "loss.png").stat().st_size > 0
assert saved_steps[-1] == config.num_steps, saved_steps
assert restored_config.model.width == config.model.width
# Restoring is exact: every parameter is bit-for-bit the trained one.
assert jax.tree_util.tree_structure(trained_params) == jax.tree_util.tree_structure(restored_params)
assert all(jax.tree_util.tree_leaves(same))
assert logits_BxTxV.shape == (*test_batch["inputs"].shape, config.model.vocab_size)
print("all checks passed")
