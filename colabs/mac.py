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
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/mac.ipynb

# %% [markdown]
# # Memory of Amortized Contexts (MAC), step by step
#
# Tack et al. 2024, "Online Adaptation of Language Models with a Memory of Amortized Contexts".
# A frozen LM answers questions about documents it has never been trained on. Each streamed
# document costs one forward pass of the *amortization network* g, whose output φ (T×D) is
# appended to a *modulation bank*. A question is answered by the *aggregation network* h, which
# attends from the question's code over the whole bank, and the result becomes per-layer prefix
# keys/values of the frozen LM (P-tuning v2).
#
# This notebook runs in about a minute on a CPU: it trains a tiny LM and MAC for a few steps
# only, with the same trainer and config as the figures, so the answers are *not* good here — it
# shows the mechanics (streaming, the bank, answering with/without memory, order invariance).
# The quality numbers come from
# `python -m eval.figures --only mac_online_adaptation,mac_retention --size cpu`.

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
import json
import tempfile

import jax.numpy as jnp
import numpy as np

from eval import streaming_qa as sqa
from memory import bank as bank_lib
from models.mac import MAC, modulated_logits
from train import trainer
from train.configs import mac as mac_config
from train.data import facts

SEED = 0

# %% [markdown]
# ## 1. The fact stream
#
# Each document states three facts about an invented entity; each question's answer appears
# only in its document. Train, validation and test entities are disjoint.

# %%
train_docs = facts.fact_stream("train", 512, SEED)
test_docs = facts.fact_stream("test", 4, SEED + 1)
for d in test_docs[:2]:
    print(d["document"])
    print("   ", d["qas"][0]["question"], "→", d["qas"][0]["answer"])

# %% [markdown]
# ## 2. Stage 1 (base LM) and stage 2 (meta-training g, h and the prefix FFN), a few steps each
#
# Both stages are runs of the shared trainer (`train/trainer.py`) under one config
# (`train/configs/mac.py`): stage 1 trains the base LM into `WORKDIR/base_lm`, stage 2 starts
# from it with the LM frozen by the optimizer. Its loss is the answer tokens' cross-entropy, the
# other documents of the batch act as the bank, and backpropagation dropout (ρ = 0.5) sends
# gradients through only the first half of the batch's documents. The same run from a shell:
# `mnemax-train --config mac:tiny --workdir WORKDIR`.

# %%
config = mac_config.get_config("tiny")    # the cpu figures' recipe, made small below
config.seed = SEED                        # both stages, and the fact stream's content
config.num_steps, config.batch_size, config.log_every = 20, 8, 5
config.data.documents = 512
config.model.lm.update(width=32, num_layers=2, num_heads=4)
config.model.update(num_tokens=4, prefix_len=2, enc_width=32, enc_layers=1, agg_blocks=2,
                    mlp_ratio=2, prefix_hidden=32)
config.optim.warmup_steps = 5
config.objective_config.hierarchical_windows = (2, 4)   # chunks smaller than the batch
config.base_lm.update(num_steps=20, batch_size=8, log_every=5)
config.base_lm.model.update(width=32, num_layers=2, num_heads=4)
config.base_lm.optim.warmup_steps = 5
workdir = tempfile.mkdtemp() + "/mac"
trainer.train(config, workdir)            # stage 1 into workdir/base_lm, then stage 2
CFG, mac_params, lm_params = sqa.load_run(workdir)


def losses(path):
    rows = [json.loads(line) for line in open(path)]
    return [r["loss"] for r in rows if "loss" in r]


l1, l2 = losses(f"{workdir}/base_lm/metrics.jsonl"), losses(f"{workdir}/metrics.jsonl")
print(f"stage 1 loss {l1[0]:.2f} → {l1[-1]:.2f};  stage 2 loss {l2[0]:.2f} → {l2[-1]:.2f}")

# %% [markdown]
# ## 3. Stream documents into the bank: one amortization forward each, no gradients

# %%
dtok = facts.encode_documents([d["document"] for d in test_docs], config.data.doc_length)
bank = sqa.init_bank(CFG, capacity=8)
snapshots = []
for i in range(len(test_docs)):
    bank = sqa.stream_documents(CFG, mac_params, dtok[i:i + 1], bank)
    snapshots.append(np.asarray(bank.values))
print("bank values", bank.values.shape, "(capacity, T, D); valid", np.asarray(bank.valid))
print("entries written:", int(bank_lib.num_valid(bank)))

# %% [markdown]
# ## 4. Ask questions with and without memory, and with the answer's document removed

# %%
recs = facts.qa_records(test_docs, questions_per_doc=None)
qs = [r["question"] for r in recs]
gold = np.array([r["doc_id"] for r in recs])
mem, valid = bank.values, np.asarray(bank.valid)
with_mem = sqa.answer(CFG, mac_params, lm_params, qs, memory=mem, valid=valid)
no_mem = sqa.answer(CFG, mac_params, lm_params, qs)
no_gold = valid[None] & (np.arange(mem.shape[0])[None] != gold[:, None])
removed = sqa.answer(CFG, mac_params, lm_params, qs, memory=mem, valid=no_gold)
for r, a, b, c in list(zip(recs, with_mem, no_mem, removed))[:6]:
    print(f"{r['question']:<32} gold {r['answer']!r:<12} memory {a!r:<12} none {b!r:<12} "
          f"gold removed {c!r}")
print("EM with memory", sqa.score(with_mem, [r["answer"] for r in recs])["em"],
      "(a few training steps only: see the figures for trained numbers)")

# %% [markdown]
# ## 5. Inspect the bank: aggregation ignores the order of documents; earlier entries stay put

# %%
mac = MAC(CFG)
qtok = facts.encode_questions(qs[:3], config.data.question_length)
agg = lambda m, v: mac.apply({"params": mac_params}, qtok, m, v, method=MAC.aggregate)  # noqa
perm = np.array([2, 0, 3, 1, 4, 5, 6, 7])
z = agg(mem, valid)
z_perm = agg(mem[perm], valid[perm])
print("max |h(bank) - h(permuted bank)|:", float(jnp.max(jnp.abs(z - z_perm))))
kv = mac.apply({"params": mac_params}, z, method=MAC.prefix)
print("prefix keys/values", kv.shape, "= [L, 2, B, P, H, Dh]")

# %%
qa, _ = facts.encode_qa(qs[:3], [r["answer"] for r in recs[:3]], config.data.qa_length)
off = modulated_logits(CFG, lm_params, jnp.asarray(qa), kv, jnp.zeros((3, CFG.prefix_len), bool))
plain = modulated_logits(CFG, lm_params, jnp.asarray(qa))
assert float(jnp.max(jnp.abs(off - plain))) < 1e-5          # all-zero prefix mask = no prefix
assert float(jnp.max(jnp.abs(z - z_perm))) < 1e-4            # order invariance
for i in range(1, len(snapshots)):                           # append-only bank
    np.testing.assert_array_equal(snapshots[i][:i], snapshots[i - 1][:i])
assert int(bank_lib.num_valid(bank)) == len(test_docs)
assert len(with_mem) == len(no_mem) == len(qs) and all(isinstance(a, str) for a in with_mem)
print("all checks passed")
