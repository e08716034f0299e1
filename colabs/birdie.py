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
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/birdie.ipynb

# %% [markdown]
# # Birdie: bidirectional SSMs and reward-driven objective mixtures
#
# Blouir et al. 2024, "Birdie: Advancing State Space Models with Reward-Driven Objectives and
# Curricula". This notebook shows, at toy size (under a minute on 2 CPU cores):
#
# 1. Birdie's objectives applied to a sample text (`train/objectives/birdie.py`);
# 2. the reward-driven controller choosing the objective mixture during a short training run
#    (`train/objectives/birdie_controller.py`, a hook of the shared trainer `train/trainer.py`);
# 3. a recall query answered by a causal and by a bidirectional gated SSM (`models/ssm.py`), and
#    the bidirectional model's recurrent decoding matching its parallel pass.
#
# The full experiment is a figure: `python -m eval.figures --only birdie_recall --size cpu`.

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
# ## 1. The objectives on a sample text
#
# Every objective maps (tokens, key) to an example laid out as
# `prompt ++ [START_GENERATING] ++ target[:-1]`, the prompt being the bidirectional prefix and
# the labels the target. Special tokens are rendered as `<NAME>`.

# %%
import jax
import jax.numpy as jnp
import numpy as np

from train.data import tokenizer as tok
from train.objectives import birdie

text = tok.encode("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.")
examples = {}
for name, fn in birdie.OBJECTIVE_FNS.items():
    ex = fn(text, jax.random.key(3))
    examples[name] = ex
    prompt, target = birdie.split_example(ex)
    print(f"--- {name}")
    print("  prompt:", tok.decode(prompt, specials="render"))
    print("  target:", tok.decode(target, specials="render"))

# %% [markdown]
# ## 2. The controller's mixture during training
#
# A bidirectional gated SSM (width 32) trains through the shared trainer on Birdie's 18 objective
# configurations over key-value text plus the recall task itself (the last action). Every 8 steps
# the controller hook reads each action's validation loss, turns the change into rewards, refits
# its reward model and picks the next mixture (uniform per class until it has two rewards); the
# run's workdir keeps its checkpoints and `metrics.jsonl`, where each update is a row.

# %%
import tempfile

import matplotlib.pyplot as plt

from eval import birdie_recall as br
from train.configs import birdie as birdie_config

SIZE = dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72)), pairs=(2, 4),
            width=32, state_width=32, num_layers=2, num_heads=2, ssm_layers=3,
            bidir_pattern="cbc", ssm_mlp=64, steps=40, rows=8, row_length=64, lr=3e-3,
            controller_every=8, pretrain_frac=1.0)
task = br.RecallTask(**SIZE["task"])
runs = pathlib.Path(tempfile.mkdtemp(prefix="birdie_colab_"))
config = birdie_config.recall_config(SIZE, "gated_birdie", seed=0)
config.progress = False
run = br.train_run(config, runs / "gated_birdie")
steps_m = [s for s, _ in run.mixtures]
weights = np.array([m for _, m in run.mixtures])
groups = {}
for j, a in enumerate(run.action_names):
    g = a.split("_r")[0] if a.startswith(("infilling", "autoencoding")) else a
    groups[g] = groups.get(g, 0) + weights[:, j]
fig, ax = plt.subplots(figsize=(6, 3))
ax.stackplot(steps_m, *groups.values(), labels=list(groups))
ax.set(xlabel="step", ylabel="mixture weight", ylim=(0, 1))
ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
fig.tight_layout()
plt.show()
for g, w in groups.items():
    print(f"{g:26s} {w[0]:.3f} → {w[-1]:.3f}")

# %% [markdown]
# ## 3. A recall query: causal vs bidirectional
#
# The prompt lists key-value pairs, then the queried key (in its question form); the answer is
# generated after `[START_GENERATING]`. The causal model reads the pairs before it knows the
# question; the bidirectional one reads the prompt both ways. Two tiny models, trained for a few
# seconds each on 2–4 pairs, then asked one query; the bidirectional model decodes with its
# recurrent state (`prefill` + `step`), which must equal its parallel pass.

# %%
from models import ssm

RECALL = dict(SIZE, steps=100)
models = {}
for name in ("gated_ntp", "gated_bidir"):
    config = birdie_config.recall_config(RECALL, name, seed=0)
    config.progress = False
    models[name] = br.train_run(config, runs / name)
rng = np.random.default_rng(7)
ex = br.recall_example(rng, task, 4)
prompt, answer = birdie.split_example(ex)
print("prompt:", prompt.tolist(), " answer:", answer.tolist())
for name, tr in models.items():
    acc = br.recall_accuracy(tr, task, 4, examples=64, rows=8, row_length=64, seed=1)
    gen = ssm.greedy_generate(tr.model, tr.params, jnp.asarray(prompt)[None],
                              jnp.asarray([birdie.START_GENERATING]), 1)
    print(f"{name:12s} answers {int(gen[0, 0])} (held-out accuracy at 4 pairs: {acc:.2f})")

bidir = models["gated_bidir"]
full = jnp.asarray(ex.inputs)[None]
parallel = bidir.model.apply({"params": bidir.params}, full,
                             prefix=jnp.asarray(ex.prefix)[None])
recurrent = ssm.decode(bidir.model, bidir.params, full, prompt_len=int(ex.prefix.sum()))
print("max |recurrent − parallel| logits:", float(jnp.abs(recurrent - parallel).max()))

# %% [markdown]
# ## Checks

# %%
# Objectives: infilling splices back; autoencoding and deshuffling reproduce the text.
p, t = birdie.split_example(examples["autoencoding"])
assert np.isin(t, text).all() and t.size <= text.size
p, t = birdie.split_example(examples["deshuffling"])
assert sorted(p[1:].tolist()) == sorted(t.tolist())
for ex_ in examples.values():
    lab = ex_.labels != birdie.IGNORE
    assert not (ex_.prefix & lab).any()
# The controller ran and its mixtures are distributions over the 19 actions.
assert len(run.mixtures) == SIZE["steps"] // SIZE["controller_every"] + 1
assert np.allclose(weights.sum(1), 1.0, atol=1e-5) and weights.shape[1] == 19
# Recurrent decoding equals the teacher-forced parallel pass (float32 reassociation: 1e-4).
assert float(jnp.abs(recurrent - parallel).max()) < 1e-4
assert all(np.isfinite(l) for tr in models.values() for _, l in tr.losses)
print("all checks passed")
