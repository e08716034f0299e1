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
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/landmark.ipynb

# %% [markdown]
# # Landmark attention: train, ask for a pass key, see which blocks each head retrieves
#
# Landmark attention (Mohtashami & Jaggi 2023) cuts the input into blocks, ends each block with a
# *landmark* token, and trains attention so that a query reaches a past block only through that
# block's landmark. At inference the blocks go into a cache, and each token and head retrieves the
# k blocks whose landmarks it scores highest: the context can be far longer than the training one.
#
# This notebook trains a small landmark LM (`train/configs/landmark.py:tiny`, shrunk to run in
# well under a minute on 2 CPU cores) on the local prose corpus mixed with the paper's passkey
# prompts, asks it for a pass key hidden in a prompt longer than its training context with the
# block memory (`models.landmark_memory.memory_logits`), and plots which blocks every head
# retrieves. Nothing is downloaded.
#
# A minute of training is not enough to learn the task: the retrieval maps below are those of an
# early model. The figure `python -m eval.figures --only landmark_passkey --size cpu` trains the
# full `tiny` run (a few minutes) and measures the accuracy up to 8× the training context.

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
# ## Train
#
# The `tiny` config, shrunk: width 32, 128-byte windows, blocks of 15 bytes + 1 landmark. The
# objective `landmark` inserts the landmarks into each batch inside the jitted step.

# %%
import json
import tempfile

import jax
import numpy as np

from train import trainer
from train.configs import landmark as landmark_config

config = landmark_config.get_config("tiny")
config.model.width = 32          # D
config.model.num_heads = 4       # H (head dim 8)
config.model.mem_freq = 15       # blocks of 15 bytes + 1 landmark
config.seq_len = 128             # raw tokens per row (T); 8 landmarks are added on top
config.batch_size = 8
config.num_steps = 60
config.log_every = 5
config.eval_every = 0
config.checkpoint_every = 0      # one checkpoint, at the end
config.progress = False
config.optim.warmup_steps = 10

WORKDIR = pathlib.Path(os.environ.get("MNEMAX_WORKDIR") or tempfile.mkdtemp(prefix="landmark_"))
summary = trainer.train(config, WORKDIR, devices=jax.devices()[:1])
model = summary["run"].model                     # a models.landmark.LandmarkLM
params = jax.device_get(summary["state"].params)
rows = [json.loads(line) for line in (WORKDIR / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in rows if "loss" in r]
print(f"loss {losses[0]:.3f} → {losses[-1]:.3f} after {summary['step']} steps")

# %% [markdown]
# ## A passkey prompt, 4× the training context
#
# The paper's prompt: filler sentences, the key line at a random depth, the question. The model
# reads it through the block memory in chunks of 64 bytes, retrieving k = 2 blocks per token and
# head from an unbounded cache; `return_retrieved=True` also returns, per chunk and layer, the
# chronological ids of the blocks each token and head retrieved.

# %%
from eval import passkey
from models import landmark_memory
from train.data import passkey_data
from train.data import tokenizer as tok

LENGTH, CHUNK, TOP_K = 4 * config.seq_len, 64, 2
tokens = passkey.make_trials(LENGTH, 1, seed=0)           # [1, LENGTH + 6]: prompt + " KKKKK"
text = tok.decode(tokens[0])
key = text[LENGTH + 1:]
print(text[:LENGTH][:200], "...", text[LENGTH - 60:LENGTH])
print("pass key:", key)

logits, retrieved = landmark_memory.memory_logits(params, model.config, tokens, chunk_len=CHUNK,
                                           top_k=TOP_K, cache_blocks=None, return_retrieved=True)
pred = np.asarray(logits[0, LENGTH - 1:-1]).argmax(-1)
print("model's answer (teacher-forced greedy):", repr(tok.decode(pred)),
      "| correct:", bool(passkey.answer_correct(logits, tokens, LENGTH)[0]))

# %% [markdown]
# ## Which blocks does each head retrieve?
#
# For the answer positions (the question's last token and the key digits), count how often each
# head of each layer retrieves each block. Block b holds raw bytes [15·b, 15·b + 15); the blocks
# holding the key line are marked. A trained model's answer heads concentrate on them.

# %%
import matplotlib.pyplot as plt

F = model.config.mem_freq
H, L = config.model.num_heads, config.model.num_layers
n_blocks = tokens.shape[1] // F
answer_rows = range(LENGTH - 1, tokens.shape[1] - 1)      # raw positions that predict " KKKKK"
counts = np.zeros((L, H, n_blocks), int)
for raw in answer_rows:
    chunk, i = divmod(raw, CHUNK)
    tail = (chunk * CHUNK) % F                                # raw tokens since the last landmark
    row = i + (tail + i) // F                                 # the raw token's row in its chunk
    for layer in range(L):
        ids = np.asarray(retrieved[chunk][layer])[0, :, row]  # [H, k] block ids, -1: none
        for h in range(H):
            for b in ids[h][ids[h] >= 0]:
                counts[layer, h, b] += 1
start = text.index("The pass key is")
key_blocks = sorted({p // F for p in range(start, start + len(passkey_data.key_line(key)))})

fig, axes = plt.subplots(L, 1, figsize=(9, 1.2 + 1.1 * L), squeeze=False)
for layer in range(L):
    ax = axes[layer, 0]
    ax.imshow(counts[layer], aspect="auto", cmap="Blues", interpolation="nearest")
    for b in key_blocks:
        ax.axvline(b, color="red", alpha=0.4, lw=3)
    ax.set(ylabel=f"layer {layer}\nhead", yticks=range(H))
axes[-1, 0].set_xlabel(f"block (red: the key line; {n_blocks} blocks of {F} bytes)")
fig.suptitle(f"blocks retrieved (k={TOP_K}) while answering, prompt of {LENGTH} bytes")
fig.tight_layout()
fig.savefig(WORKDIR / "retrieved_blocks.png", dpi=100)
plt.show()
hits = counts[:, :, key_blocks].sum(-1) / counts.sum(-1)
print("share of retrievals that hit a key block, per layer × head:\n", np.round(hits, 2))

# %% [markdown]
# ## Checks

# %%
assert summary["step"] == config.num_steps
assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 1.0, losses
assert logits.shape == (1, tokens.shape[1], config.model.vocab_size)
assert key.isdigit() and len(key) == 5 and f"The pass key is {key}." in text
assert len(retrieved) == -(-tokens.shape[1] // CHUNK) and len(retrieved[0]) == L
# Each answer row retrieves exactly k distinct, already complete blocks per head and layer.
assert (counts.sum(-1) == TOP_K * len(answer_rows)).all()
assert counts.max() <= len(answer_rows) and 0 < len(key_blocks) <= 5
assert (WORKDIR / "retrieved_blocks.png").stat().st_size > 0
print("all checks passed")
