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
# # Discrete key-value bottleneck, step by step (the 2D toy)
#
# Träuble et al. 2023, "Discrete Key-Value Bottleneck" (ICML), Fig. 2. Eight Gaussian classes on
# the unit square arrive as four tasks of two classes. A linear probe and an MLP trained on the
# stream forget the earlier tasks; DKVB keeps them, because each input only fetches — and so only
# trains — the values of its nearest keys, and the keys are frozen.
#
# Steps: 1) data, 2) keys by EMA k-means on *unlabelled uniform* points, 3) value training task by
# task with plain SGD, 4) decision regions after each task, next to the baselines.

# %%
import subprocess
import sys

if "google.colab" in sys.modules:  # install mnemax only when running in Colab
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/mnemax/mnemax"], check=True)

# %%
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
from models.kv_bottleneck import KVBottleneck  # noqa: E402
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
# one optimizer across tasks, no task ids. The same for the linear probe and the MLP (128 hidden).

# %%
model = KVBottleneck(num_classes=8)
learners = {
    "linear": obj.probe_learner(jax.random.PRNGKey(1), 2, 8, hidden=0),
    "mlp": obj.probe_learner(jax.random.PRNGKey(2), 2, 8, hidden=128),
    "dkvb": obj.dkvb_learner(model, books),
}
cfg = obj.ProtocolConfig(epochs_per_task=EPOCHS)
G = 60
g = (np.arange(G) + 0.5) / G
grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), jnp.float32)
acc, maps, final = {}, {}, {}
for name, (learner, state) in learners.items():
    acc[name], maps[name] = [], []

    def evaluate(s, learner=learner, name=name):
        maps[name].append(np.asarray(jnp.argmax(learner.predict(s, grid), -1)).reshape(G, G))
        return obj.accuracy(learner.predict(s, jnp.asarray(x_test)), y_test)

    final[name], acc[name] = obj.train_class_incremental(
        learner, state, ci.split_tasks(x_train, y_train, tasks), cfg, jax.random.PRNGKey(3),
        evaluate=evaluate)
    print(f"{name:7s} accuracy on all 8 classes after each task:",
          [round(a, 3) for a in acc[name]])

fig, axes = plt.subplots(3, 4, figsize=(12, 9))
for i, name in enumerate(("linear", "mlp", "dkvb")):
    for t in range(4):
        ax = axes[i, t]
        ax.imshow(maps[name][t], origin="lower", extent=(0, 1, 0, 1), cmap=cmap, vmin=-0.5,
                  vmax=7.5, alpha=0.45)
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
used = np.asarray(final["dkvb"].aux.usage_CxK > 0)
print(f"keys used per codebook: {used.sum(1).tolist()} of {K}")

# %% [markdown]
# ## Checks

# %%
assert acc["dkvb"][-1] >= 0.95, acc["dkvb"]  # DKVB remembers every task
assert acc["mlp"][-1] <= 0.5, acc["mlp"]  # the MLP forgets the first three
assert acc["linear"][-1] <= 0.5, acc["linear"]
np.testing.assert_array_equal(final["dkvb"].aux.keys_CxKxDk, books.keys_CxKxDk)  # keys frozen
print("all checks passed")
