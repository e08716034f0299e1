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
# [colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/pretrained.ipynb

# %% [markdown]
# # Pretrained models: load a Hugging Face checkpoint, generate, fine-tune
#
# `models.pretrained.from_hf(path)` reads a GPT-2, LLaMA-family or T5 checkpoint (a directory
# written by transformers' `save_pretrained`, or a hub id when online) into a Flax model and its
# parameters, without torch. This notebook loads one, generates text with the KV cache, and
# fine-tunes it a few steps with the shared trainer (`train/configs/lm.py:hf=CHECKPOINT`).
#
# Offline (the tests, a checkout without internet) it uses the tiny random GPT-2 and BPE
# tokenizer committed as test fixtures (`tests/data/hf/`), so its text is gibberish; in Colab
# set `CHECKPOINT = "openai-community/gpt2"` (or any GPT-2 / LLaMA hub id, e.g.
# `"meta-llama/Llama-3.2-1B"` after accepting its licence) and the same cells run the real model.
# The same fine-tune from a shell:
#
#     python -m train.main --config train/configs/lm.py:hf=openai-community/gpt2 --workdir runs/gpt2

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
# ## Choose the checkpoint

# %%
import models

FIXTURES = pathlib.Path(models.__file__).resolve().parents[1] / "tests" / "data" / "hf"
OFFLINE = FIXTURES.is_dir() and "google.colab" not in sys.modules
# A hub id (needs huggingface_hub and the internet) or a save_pretrained directory.
CHECKPOINT = os.environ.get("MNEMAX_CHECKPOINT") or (
    str(FIXTURES / "gpt2") if OFFLINE else "openai-community/gpt2")
# The checkpoint's own tokenizer; the fixture model has none beside it, so the fixture BPE.
TOKENIZER = str(FIXTURES / "tok_bpe") if CHECKPOINT == str(FIXTURES / "gpt2") else CHECKPOINT
print("checkpoint:", CHECKPOINT)
print("tokenizer: ", TOKENIZER)

# %% [markdown]
# ## Load it
#
# The checkpoint's `config.json` picks the module: GPT-2 and LLaMA are configurations of mnemax's
# own `Transformer` (`models/transformer.py`), T5 is `models/t5.py`. Tensors are read one at a
# time into their shardings (pass `mesh=` to shard over devices). The tokenizer comes from
# `train/data/tokenizer.py`; where it has more ids than the model's embedding, the embedding
# grows, each new row the mean of the old ones (`pretrained.resize_params_vocab`).

# %%
import jax
import numpy as np

from models import pretrained
from models.transformer import greedy_generate
from train.data import tokenizer as tokenizers

model, params = pretrained.from_hf(CHECKPOINT)
tok = tokenizers.load_tokenizer(TOKENIZER)
print(model.cfg)
print(f"{sum(x.size for x in jax.tree_util.tree_leaves(params)):,} parameters; "
      f"tokenizer {type(tok).__name__} with {tok.vocab_size:,} ids")
if tok.vocab_size > model.cfg.vocab_size:
    params = pretrained.resize_params_vocab(params, tok.vocab_size)
    model = type(model)(model.cfg.replace(vocab_size=tok.vocab_size))

# %% [markdown]
# ## Generate
#
# Greedy decoding with the KV cache: the prompt is read in one pass, then one token per step.

# %%
generate = jax.jit(greedy_generate, static_argnums=(0, 3))
PROMPT = "The garbage collector"


def continue_text(params, prompt=PROMPT, num_tokens=24):
    ids = tok.encode(prompt, add_bos=tok.default_add_bos)[None, :]
    new = np.asarray(generate(model, params, ids, num_tokens))[0]
    return prompt + tok.decode(new, skip_special=False)   # specials written out


before = continue_text(params)
print(before)

# %% [markdown]
# ## Fine-tune with the trainer
#
# `lm.py:hf=CHECKPOINT,tokenizer=TOKENIZER` takes the model section from the checkpoint, starts
# from its weights (`init_from_hf`) and trains on the local prose corpus (Python's own
# documentation) tokenized by `TOKENIZER`. A few steps here; more on an accelerator.

# %%
import json
import tempfile

from train import trainer
from train.configs import lm

config = lm.get_config(f"hf={CHECKPOINT},tokenizer={TOKENIZER}")
config.num_steps = 30
config.batch_size = 8
config.seq_len = 64
config.log_every = 5
config.eval_every = 30
config.checkpoint_every = 30
config.progress = False
config.optim.warmup_steps = 5
config.optim.lr = 1e-3 if OFFLINE else 5e-5   # a random tiny model moves faster
WORKDIR = pathlib.Path(os.environ.get("MNEMAX_WORKDIR") or tempfile.mkdtemp(prefix="pretrained_"))
summary = trainer.train(config, WORKDIR)
rows = [json.loads(line) for line in (WORKDIR / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in rows if "loss" in r]
print("train loss every 5 steps:", " ".join(f"{x:.2f}" for x in losses))

tuned = jax.device_get(summary["state"].params)
after = continue_text(tuned)
print(after)

# %% [markdown]
# ## Checks

# %%
start = [r for r in rows if r.get("event") == "start"][0]
assert start["init_from_hf"] == CHECKPOINT
assert summary["step"] == config.num_steps and np.isfinite(summary["final_loss"])
assert np.mean(losses[-2:]) < losses[0], losses     # the fine-tune learned
# It started from the checkpoint: the loaded model's embedding rows are the tuned run's start.
assert tuned["embed"]["embedding"].shape == params["embed"]["embedding"].shape
assert before.startswith(PROMPT) and after.startswith(PROMPT)
print("all checks passed")
