"""The recall and phone-book tasks of the Birdie figures as generators, and the trainer's
dataset "recall" of packed rows the figure's arms train on (eval/birdie_recall.py scores them).

The recall task is the phone book shrunk until it is learnable on 2 CPU cores: single-token
names (keys) and numbers (values), P key-value pairs, then the Q queried keys, then the answers:

    prompt  [PREFIX_LM] k_1 v_1 k_2 v_2 ... k_P v_P [SEP] q_1 ... q_Q          (the prefix)
    target  v(q_1) ... v(q_Q)                         (generated after [START_GENERATING])

(`queries_before=True` also states the queries before the pairs.) `RecallSource` is the
random-access source of dataset "recall": rows packed with recall examples (the pair count drawn
from a set) and, where its mixture weighs them, Birdie's objective configurations over the
key-value text (`kv_text`). Its actions, the controller's (train/objectives/birdie_controller.py),
are the K configurations then the task (index K). Everything draws from a numpy Generator, so a
seed fixes every example.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from train.data import birdie_data
from train.data import tokenizer as tok
from train.objectives import birdie


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Token layout of the recall task. Keys and values are byte ids, disjoint ranges."""
    num_queries: int = 1                 # Q: queried keys per example
    key_range: tuple = (0, 64)           # keys: ids in [lo, hi), distinct within an example
    value_range: tuple = (64, 80)        # values: ids in [lo, hi), drawn with replacement
    query_offset: int = 0                # >0: a queried key k is written k + offset (a distinct
                                         # "question form"; 0: the same id as in the pairs)
    queries_before: bool = False         # also state the queries before the pairs

    def __post_init__(self):
        klo, khi = self.key_range
        vlo, vhi = self.value_range
        qlo, qhi = klo + self.query_offset, khi + self.query_offset
        ranges = sorted([(klo, khi), (vlo, vhi)] + ([(qlo, qhi)] if self.query_offset else []))
        if not (0 <= ranges[0][0] and ranges[-1][1] <= 256
                and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))):
            raise ValueError(f"key_range={self.key_range}, value_range={self.value_range}, "
                             f"query_offset={self.query_offset}: keys, values and query forms "
                             "need disjoint byte ranges [lo, hi) inside 0..256")
        if self.num_queries < 1:
            raise ValueError(f"num_queries={self.num_queries} must be >= 1")

    def check_pairs(self, num_pairs: int) -> None:
        keys = self.key_range[1] - self.key_range[0]
        if not self.num_queries <= num_pairs <= keys:
            raise ValueError(f"num_pairs={num_pairs} is not allowed: need num_queries="
                             f"{self.num_queries} <= num_pairs <= {keys} (the key range)")

    def length(self, num_pairs: int) -> int:
        """Tokens of one laid-out example (prompt + [SG] + answers[:-1])."""
        q = self.num_queries
        return 1 + 2 * num_pairs + 1 + q + (q + 1 if self.queries_before else 0) + q


def recall_pairs(rng: np.random.Generator, task: RecallTask, num_pairs: int):
    """(keys [P], values [P], queried indices [Q]) of one example."""
    task.check_pairs(num_pairs)
    lo, hi = task.key_range
    keys = (rng.choice(hi - lo, num_pairs, replace=False) + lo).astype(np.int32)
    values = rng.integers(*task.value_range, size=num_pairs).astype(np.int32)
    asked = rng.choice(num_pairs, task.num_queries, replace=False)
    return keys, values, asked


def recall_example(rng: np.random.Generator, task: RecallTask, num_pairs: int) -> birdie.Example:
    """One recall example laid out as Birdie's prefix-LM (see the module docstring)."""
    keys, values, asked = recall_pairs(rng, task, num_pairs)
    queries = keys[asked] + task.query_offset
    q, h = task.num_queries, 1 + (task.num_queries + 1 if task.queries_before else 0)
    prompt = np.empty(h + 2 * num_pairs + 1 + q, np.int32)   # filled in place: this runs per
    prompt[0] = birdie.BIRDIE_TOKENS["PREFIX_LM"]              # example of every training batch
    if task.queries_before:
        prompt[1:1 + q], prompt[h - 1] = queries, tok.SEP
    prompt[h:h + 2 * num_pairs:2], prompt[h + 1:h + 2 * num_pairs:2] = keys, values
    prompt[-q - 1], prompt[-q:] = tok.SEP, queries
    return birdie.make_example(prompt, values[asked])


def kv_text(rng: np.random.Generator, task: RecallTask, num_pairs: int) -> np.ndarray:
    """The synthetic retrieval text Birdie's objectives pre-train on: k_1 v_1 ... k_P v_P."""
    keys, values, _ = recall_pairs(rng, task, num_pairs)
    return np.stack([keys, values], 1).reshape(-1)


# Batches are packed in Python every training step, so the two draws below skip the argument
# checks of `rng.choice` (tens of µs a call, more than the rest of an example). They consume the
# generator exactly as `rng.choice` does: tests/eval/test_birdie_recall.py compares both.
def pick(rng: np.random.Generator, options: Sequence[int]) -> int:
    """`int(rng.choice(options))`: a uniform element."""
    return int(options[int(rng.integers(0, len(options)))])


def weights_cdf(p) -> np.ndarray:
    """The cdf `rng.choice(len(p), p=p)` searches, for `pick_weighted`."""
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def pick_weighted(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """`int(rng.choice(len(p), p=p))` given cdf = weights_cdf(p): one uniform, searched."""
    return int(cdf.searchsorted(rng.random(), side="right"))


def objective_set(kind: str, length_bins: Sequence[int], row_length: int,
                  settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS):
    """The pre-training objectives of an arm: Birdie's configurations built with `settings`, or
    plain NTP. Rows shorter than 256 tokens get a shorter selective-copying query (≤2 spans of
    ≤4 tokens with 1–2-token delimiters, the query where `settings` puts it) so that one example
    fits a row."""
    if kind != "birdie":
        return birdie.ntp_objectives()
    if row_length < 256:   # the short query's spans are fixed, so not the controller's to choose
        settings = dataclasses.replace(settings, controlled=tuple(
            c for c in settings.controlled if c != "selective_copying_spans"))
    objs = birdie.birdie_objectives(length_bins=length_bins, settings=settings)
    if row_length < 256:
        short = {"max_spans": 2, "delimiter_length": (1, 2), "span_length": (1, 4)}
        objs = tuple(dataclasses.replace(o, kwargs=tuple({**dict(o.kwargs), **short}.items()))
                     if o.fn == "selective_copying" else o for o in objs)
    return objs


def recall_objectives(kind: str, pairs: Sequence[int], row_length: int,
                      settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS):
    """The objective set over the key-value text of tasks with `pairs` pair counts: infilling's
    length bins stop at the longest text."""
    bins = tuple(b for b in (16, 32, 64, 128) if b <= 2 * max(pairs)) or (2 * max(pairs),)
    return objective_set(kind, bins, row_length, settings)


# ---------------------------------------------------------------------------------------------
# The trainer's dataset "recall" (train/data/pipeline.py)
# ---------------------------------------------------------------------------------------------
SPLITS = birdie_data.SPLITS
OBJECTIVE_SETS = ("birdie", "ntp")


@dataclasses.dataclass(frozen=True)
class RecallDataSpec:
    """Packed rows of recall examples and, where `mixture` weighs them, of the objective set
    over the key-value text: the actions are the K configurations then the task (index K)."""
    task: RecallTask
    pairs: tuple                       # pair counts, drawn uniformly per example
    seq_len: int = 64                  # T: tokens per row
    objectives: str = "birdie"         # the pre-training set, see OBJECTIVE_SETS
    mixture: tuple = ()                # [K + 1] weights over the actions; (): the task alone
    with_prefix: bool = True           # emit the prefix field (False: models without one)
    num_train: int = 1_000_000         # rows in "train" (generated on read: size is free)
    num_validation: int = 256          # rows in "validation"
    seed: int = 0                      # content seed
    objective_per_row: bool = False    # row i: action i % (K + 1) only (controller validation)
    # how the objective set is built (a mapping or ConfigDict of its fields is converted)
    objective_settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS

    def __post_init__(self):
        object.__setattr__(self, "objective_settings",
                           birdie.ObjectiveSettings.from_mapping(self.objective_settings))
        object.__setattr__(self, "pairs", tuple(int(p) for p in self.pairs))
        object.__setattr__(self, "mixture", tuple(float(w) for w in self.mixture))
        if self.objectives not in OBJECTIVE_SETS:
            raise ValueError(f"objectives={self.objectives!r} is not allowed; use one of "
                             f"{OBJECTIVE_SETS}")
        if not self.pairs:
            raise ValueError("pairs=() is not allowed; give at least one pair count")
        for P in self.pairs:
            self.task.check_pairs(P)
            if self.task.length(P) > self.seq_len:
                raise ValueError(f"pairs={self.pairs} is not allowed: {P} pairs make examples "
                                 f"of {self.task.length(P)} tokens > seq_len={self.seq_len}")
        for name in ("num_train", "num_validation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed; use >= 1")
        if self.mixture:
            n = len(self.action_names())
            w = np.asarray(self.mixture)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"mixture={self.mixture} is not allowed: objectives="
                                 f"{self.objectives!r} needs {n} non-negative weights (the "
                                 "configurations, then the task) with a positive sum, or () "
                                 "for the task alone")

    def objective_set(self):
        return recall_objectives(self.objectives, self.pairs, self.seq_len,
                                 self.objective_settings)

    def action_names(self) -> tuple:
        return tuple(o.name for o in self.objective_set()) + ("task",)

    def group_sizes(self) -> tuple:
        """Configurations per class, the task a class of its own (the controller's groups)."""
        return tuple(int(g) for g in birdie.group_sizes(self.objective_set())) + (1,)

    def num_examples(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
        return self.num_train if split == "train" else self.num_validation


class RecallSource:
    """Random-access source of packed rows: record i of a split is one row of T tokens filled
    next-fit from the generator seeded by (seed, split, i), so any row can be regenerated alone

        {"inputs", "targets": int32 [T], "weights": float32 [T], "segment_ids",
         "objective_ids": int32 [T] (the action; -1 on padding), "prefix": bool [T]}

    (`prefix` only with_prefix). Each draw picks an action from the mixture (the task alone
    without one) and lays out its example; the first draw that does not fit ends the row
    (`birdie.pack_row`)."""

    def __init__(self, spec: RecallDataSpec, split: str):
        self._spec, self._split = spec, split
        self._len = spec.num_examples(split)
        self._objectives = spec.objective_set()
        K = len(self._objectives)
        w = np.asarray(spec.mixture or [0.0] * K + [1.0], np.float64)
        self._task_only = bool(w[:K].sum() == 0)
        self._cdf = weights_cdf(w)

    def __len__(self) -> int:
        return self._len

    def _example(self, rng: np.random.Generator, action: int) -> birdie.Example:
        s = self._spec
        if action == len(self._objectives):
            return recall_example(rng, s.task, pick(rng, s.pairs))
        # the objectives read at least 8 pairs (prefix-LM needs ≥4 tokens each side)
        keys = s.task.key_range[1] - s.task.key_range[0]
        text = kv_text(rng, s.task, min(max(pick(rng, s.pairs), 8), keys))
        key = int(rng.integers(0, 2**31 - 1))
        return self._objectives[action](text, key, max_length=s.seq_len)

    def _action(self, rng: np.random.Generator, index: int) -> int:
        if self._spec.objective_per_row:
            return index % (len(self._objectives) + 1)
        if self._task_only:
            return len(self._objectives)
        return pick_weighted(rng, self._cdf)

    def __getitem__(self, index: int) -> dict:
        s = self._spec
        index = int(index)
        rng = birdie_data.row_generator(s.seed, self._split, index, self._len)

        def draw():
            a = self._action(rng, index)
            return self._example(rng, a), a
        return birdie.pack_row(draw, s.seq_len, with_prefix=s.with_prefix)

    def __repr__(self) -> str:
        return f"RecallSource({self._spec}, split={self._split!r})"


def spec_from_config(data_config, seq_len: int) -> RecallDataSpec:
    """The RecallDataSpec of a resolved "recall" data config (pipeline.default_data_config)."""
    c = data_config
    task = RecallTask(num_queries=c.num_queries, key_range=tuple(c.key_range),
                      value_range=tuple(c.value_range), query_offset=c.query_offset,
                      queries_before=c.queries_before)
    return RecallDataSpec(task=task, pairs=tuple(c.pairs), seq_len=seq_len,
                          objectives=c.objectives, mixture=tuple(c.mixture),
                          with_prefix=c.with_prefix, num_train=c.num_train,
                          num_validation=c.num_validation, seed=c.data_seed,
                          objective_per_row=c.objective_per_row,
                          objective_settings=c.objective_settings)


def pad_rows(batch: dict, rows: int) -> dict:
    n = batch["inputs"].shape[0]
    if n == rows:
        return batch
    fill = {"inputs": tok.PAD, "targets": tok.PAD, "weights": 0, "prefix": False,
            "segment_ids": 0, "objective_ids": -1}
    return {k: np.concatenate([v, np.full((rows - n,) + v.shape[1:], fill[k], v.dtype)])
            for k, v in batch.items()}
