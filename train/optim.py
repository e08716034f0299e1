"""The one optimizer factory and gradient norm every training in mnemax uses.

    tx, schedule = make_optimizer(o, num_steps)

`o` is an optimizer config (`train/configs/common.py: optim`, or any mapping with its fields):

    name           "adamw" (default) | "sgd" (plain SGD: no momentum, no weight decay)
    lr             peak learning rate (> 0)
    warmup_steps   linear warm-up from 0 (≥ 0)
    schedule       "cosine" (default): decay to lr · min_lr_ratio at num_steps;
                   "constant": lr after the warm-up
    min_lr_ratio   cosine only
    b1, b2, eps    AdamW's moments (defaults 0.9, 0.999, 1e-8 when absent)
    weight_decay   AdamW's decoupled weight decay (default 0)
    clip_norm      global-norm clipping first (None or 0: off)
    frozen         top-level parameter collections left unchanged (e.g. ("lm",): MAC's frozen
                   base LM): their updates are zero and they get no optimizer state; clipping
                   and the rest see only the others (default: none)
    no_decay       regular expressions searched in each parameter's path ("block_0/ln_1/scale");
                   a parameter any of them matches gets no weight decay (default: none, every
                   parameter decays). NO_DECAY: norms, biases, embeddings and the SSMs'
                   recurrence parameters (Griffin's and Birdie's practice)

Fields a config lacks take the defaults above, so the trainer's configs (which hold only the
AdamW-cosine fields) keep their meaning. Returns the optax transformation and the learning-rate
schedule (step → lr) for logging.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

NAMES = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# no_decay for the usual groups: norm scales, biases, embedding tables, and the recurrences' own
# parameters (models/ssm.py: the gated SSM's forget-gate bias b_f, Hawk's Λ `lam`).
NO_DECAY = (r"(^|/)(ln_\w*|norm\w*)/", r"(^|/)scale$", r"bias$", r"(^|/)b_\w+$",
            r"(^|/)conv_b$", r"(^|/)embed(ding)?(/|$)", r"(^|/)lam$")


def optim(name: str = "adamw", *, lr: float, warmup_steps: int = 0,
          schedule: str = "constant", clip_norm=None, **fields) -> dict:
    """A plain optimizer config (a dict) for training that is not driven by a ConfigDict."""
    return {"name": name, "lr": lr, "warmup_steps": warmup_steps, "schedule": schedule,
            "clip_norm": clip_norm, **fields}


def check_config(o: Any) -> None:
    """Raises a ValueError naming the field of optimizer config `o` (a dict or ConfigDict) that
    make_optimizer cannot build: name, schedule, lr, warmup_steps."""
    name, kind = o.get("name", "adamw"), o.get("schedule", "cosine")
    if name not in NAMES:
        raise ValueError(f"optim.name={name!r} is not allowed; use one of {NAMES}")
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r} is not allowed; use one of {SCHEDULES}")
    if not o["lr"] > 0:
        raise ValueError(f"optim.lr={o['lr']!r} must be positive")
    warmup = o["warmup_steps"]
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"optim.warmup_steps={warmup!r} must be an integer ≥ 0")
    frozen = o.get("frozen", ())
    if isinstance(frozen, str) or not all(isinstance(f, str) and f for f in frozen):
        raise ValueError(f"optim.frozen={frozen!r} must be a tuple of parameter collection names")
    no_decay = o.get("no_decay", ())
    if isinstance(no_decay, str) or not all(isinstance(p, str) and p for p in no_decay):
        raise ValueError(f"optim.no_decay={no_decay!r} must be a tuple of regular expressions")
    for pattern in no_decay:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optim.no_decay has {pattern!r}, not a regular expression: "
                             f"{e}") from None


def make_optimizer(o: Any, num_steps: int = 0) -> tuple[optax.GradientTransformation, Callable]:
    """(transformation, schedule) of optimizer config `o` for a run of `num_steps` steps."""
    check_config(o)
    name, kind = o.get("name", "adamw"), o.get("schedule", "cosine")
    lr, warmup = o["lr"], o["warmup_steps"]
    if kind == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=lr * o.get("min_lr_ratio", 0.1))
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    chain = []
    clip = o.get("clip_norm", None)
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    # A constant rate without warm-up is passed as a number (no schedule step counter).
    rate = lr if kind == "constant" and not warmup else schedule
    if name == "sgd":
        chain.append(optax.sgd(rate, momentum=None))
    else:
        no_decay = tuple(o.get("no_decay", ()))
        chain.append(optax.adamw(rate, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999),
                                 eps=o.get("eps", 1e-8), weight_decay=o.get("weight_decay", 0.0),
                                 mask=functools.partial(decay_mask, no_decay) if no_decay
                                 else None))
    tx = optax.chain(*chain)
    frozen = tuple(o.get("frozen", ()))
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   functools.partial(_frozen_labels, frozen))
    return tx, schedule


def _frozen_labels(frozen: tuple, params) -> dict:
    """"frozen" on every leaf under a top-level name in `frozen`, "train" elsewhere."""
    missing = sorted(set(frozen) - set(params))
    if missing:
        raise ValueError(f"optim.frozen names {missing}, which the parameters do not have; "
                         f"they have {sorted(params)}")
    return {k: jax.tree_util.tree_map(lambda _, t=("frozen" if k in frozen else "train"): t, v)
            for k, v in params.items()}


def param_path(path) -> str:
    """'block_0/ln_1/scale': a parameter's key path joined by '/'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def decay_mask(no_decay: tuple, params):
    """True where a parameter decays: its path matches none of the `no_decay` patterns."""
    patterns = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(param_path(path)) for p in patterns), params)


def global_norm(tree) -> jax.Array:
    """√(Σ x²) over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))
