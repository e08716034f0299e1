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
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/dkvb.ipynb

# %% [markdown]
# # Discrete key-value bottleneck, step by step (the 2D toy)
#
# Träuble et al. 2023, "Discrete Key-Value Bottleneck" (ICML), Fig. 2. Eight Gaussian classes on
# the unit square arrive as four tasks of two classes. A linear probe and an MLP trained on the
# stream forget the earlier tasks; DKVB keeps them, because each input only fetches — and so only
# trains — the values of its nearest keys, and the keys are frozen.
#
# Steps: 1) data, 2) keys by EMA k-means on *unlabelled uniform* points, 3) value training task by
# task with plain SGD, 4) decision regions after each task, next to the baselines.

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

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

if "google.colab" not in sys.modules and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # running as a script
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from eval import class_incremental as ci  # noqa: E402
from memory import codebook as cb  # noqa: E402
from train.objectives import dkvb as obj  # noqa: E402

SEED = 0
C, K, DK = 8, 64, 2  # codebooks, keys per codebook, key dim (tiny: runs in seconds on CPU)
EPOCHS = 40  # per task

# %% [markdown]
# ## 1. Data: 8 classes, 4 tasks of 2, std 0.035, 100 samples per task

# %%
x_train, y_train = ci.toy_data(SEED, 50)
x_test, y_test = ci.toy_data(SEED + 1, 100)
tasks = ci.task_classes(list(range(8)), 2)
print("tasks:", tasks, "| means:", ci.TOY_MEANS.tolist())
cmap = ListedColormap(plt.get_cmap("tab10").colors[:8])
plt.figure(figsize=(4, 4))
plt.scatter(x_train[:, 0], x_train[:, 1], c=y_train, cmap=cmap, vmin=-0.5, vmax=7.5, s=8)
plt.xlim(0, 1)
plt.ylim(0, 1)
plt.title("training data (colour = class)")
plt.show()

# %% [markdown]
# ## 2. Codebooks: fixed random projections, keys from EMA k-means on other data
#
# Each codebook projects the input with its own fixed Gaussian matrix (unit-norm columns), then
# learns K keys by EMA vector quantisation (decay 0.95) on points uniform in the unit square —
# unlabelled data from another distribution. Keys are frozen from here on; values start at zero.

# %%
rng = jax.random.PRNGKey(SEED)
r_books, r_keys = jax.random.split(rng)
books = cb.init_codebooks(r_books, embed_dim=2, num_codebooks=C, num_keys=K, key_dim=DK,
                          value_dim=8)
x_keys = np.random.default_rng(SEED + 2).uniform(size=(2000, 2)).astype(np.float32)
ema = cb.init_keys_ema(r_keys, cb.project(jnp.asarray(x_keys), books.projection_CxDxDk),
                       num_keys=K, epochs=10)
books = books.replace(keys_CxKxDk=ema.keys_CxKxDk)
print("dead keys replaced during init:", int(ema.num_replaced))

# Keys of codebook 0 mapped back to the input plane (the 2x2 projection is invertible).
P0 = np.asarray(books.projection_CxDxDk[0])
keys0 = np.asarray(books.keys_CxKxDk[0]) @ np.linalg.inv(P0)
plt.figure(figsize=(4, 4))
plt.scatter(keys0[:, 0], keys0[:, 1], marker="x", c="k", s=15)
plt.xlim(0, 1)
plt.ylim(0, 1)
plt.title("codebook 0: its keys in the input plane")
plt.show()

# %% [markdown]
# ## 3. Train values class-incrementally; 4. decision regions after each task
#
# The protocol: SGD without momentum, lr 0.3, batch 256, gradient clip 1.0, label smoothing 0.1,
# one optimizer across tasks, no task ids. The same for the linear probe and the MLP (128 hidden),
# here at lr 0.3 too (`probe_lr`; the paper's CIFAR probes train at 1e-3 over 2000 epochs a task).
# Each learner is a run of the shared trainer (`train/configs/dkvb.py`), one phase per task in
# one workdir; DKVB's codebooks (projection, keys learnt as above on the uniform points, usage
# counts) are the run's memory.

# %%
G = 60
g = (np.arange(G) + 0.5) / G
grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32)
keys_after = []


def after_task(name, model, params, memory):
    if name == "dkvb":
        keys_after.append(np.asarray(memory["dkvb_codebooks"]["keys"]))
        used = np.asarray(memory["dkvb_codebooks"]["usage"] > 0)
    else:
        used = None
    return obj.predict(model, params, memory, grid).reshape(G, G), used


r = ci.run_protocol(out=tempfile.mkdtemp(), tag="colab", seed=SEED, z_train=x_train,
                    y_train=y_train, z_test=x_test, y_test=y_test, z_keys=x_keys,
                    num_classes=8, class_order=list(range(8)), classes_per_task=2,
                    epochs=EPOCHS, dcfg=ci.DKVBConfig(num_codebooks=C, num_keys=K, key_dim=DK,
                                                       probe_lr=0.3),
                    eval_on="all", iid=False, extra_eval=after_task)
acc = r["ci"]
for name in ("linear", "mlp", "dkvb"):
    print(f"{name:7s} accuracy on all 8 classes after each task:",
          [round(a, 3) for a in acc[name]])

fig, axes = plt.subplots(3, 4, figsize=(12, 9))
for i, name in enumerate(("linear", "mlp", "dkvb")):
    for t in range(4):
        ax = axes[i, t]
        ax.imshow(r["extra"][name][t][0], origin="lower", extent=(0, 1, 0, 1), cmap=cmap,
                  vmin=-0.5, vmax=7.5, alpha=0.45)
        seen = np.isin(y_train, sum(tasks[: t + 1], []))
        ax.scatter(x_train[seen, 0], x_train[seen, 1], c=y_train[seen], cmap=cmap, vmin=-0.5,
                   vmax=7.5, s=5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}, after task {t + 1}: {acc[name][t]:.2f}", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# Only keys that were fetched in training have non-zero values. At test time an input snaps to
# its nearest *used* key, so the whole plane is covered by the values learnt so far.

# %%
used = r["extra"]["dkvb"][-1][1]
print(f"keys used per codebook: {used.sum(1).tolist()} of {K}")

# %% [markdown]
# ## Checks

# %%
assert acc["dkvb"][-1] >= 0.95, acc["dkvb"]  # DKVB remembers every task
assert acc["mlp"][-1] <= 0.5, acc["mlp"]  # the MLP forgets the first three
assert acc["linear"][-1] <= 0.5, acc["linear"]
for k in keys_after[1:]:                      # keys frozen while the values learn
    np.testing.assert_array_equal(k, keys_after[0])
print("all checks passed")
