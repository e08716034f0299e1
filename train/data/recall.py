"""The recall and phone-book tasks of the Birdie figures as generators, and the objective mixtures
their arms pre-train on (eval/birdie_recall.py trains and scores them).

The recall task is the phone book shrunk until it is learnable on 2 CPU cores: single-token
names (keys) and numbers (values), P key-value pairs, then the Q queried keys, then the answers:

    prompt  [PREFIX_LM] k_1 v_1 k_2 v_2 ... k_P v_P [SEP] q_1 ... q_Q          (the prefix)
    target  v(q_1) ... v(q_Q)                         (generated after [START_GENERATING])

(`queries_before=True` also states the queries before the pairs.) `recall_batch` packs examples
with a pair count drawn from a set into fixed rows; `ObjectiveMixture` is an arm's action space:
Birdie's objective configurations over a text source (`kv_text`) plus the
task itself as the last action; `recall_mixture` builds it. Everything
draws from a numpy Generator passed in, so a seed fixes every example.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

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


def fill_rows(draw, rows: int, row_length: int) -> tuple[list, list]:
    """Draws (example, objective id) pairs with `draw()` and packs them next-fit until `rows`
    rows of `row_length` are full; returns the examples and ids that fit (for `birdie.pack`)."""
    exs, ids = [], []
    row, used = 0, 0
    while True:
        ex, oid = draw()
        L = ex.inputs.size
        if L > row_length:
            raise ValueError(f"an example of length {L} does not fit row_length={row_length}")
        if used + L > row_length:
            row, used = row + 1, 0
            if row == rows:
                return exs, ids
        exs.append(ex)
        ids.append(oid)
        used += L


def recall_batch(rng: np.random.Generator, task: RecallTask, pairs: Sequence[int], rows: int,
                 row_length: int) -> dict:
    """Packed recall examples [rows, row_length], the pair count uniform over `pairs`."""
    def draw():
        return recall_example(rng, task, pick(rng, pairs)), 0
    exs, ids = fill_rows(draw, rows, row_length)
    return birdie.pack(exs, row_length, objective_ids=ids, num_rows=rows)


class ObjectiveMixture:
    """An arm's action space: objective configurations over a text source, plus the task itself
    as the last action. `text_fn(rng)` draws a text [L] and `task_fn(rng)` a task example."""

    def __init__(self, objectives, text_fn, task_fn, row_length: int):
        self.objectives = tuple(objectives)
        self.text_fn, self.task_fn, self.row_length = text_fn, task_fn, row_length
        self.names = [o.name for o in self.objectives] + ["task"]
        self.group_sizes = tuple(birdie.group_sizes(self.objectives)) + (1,)

    @property
    def num_actions(self) -> int:
        return len(self.names)

    def example(self, rng: np.random.Generator, action: int) -> birdie.Example:
        if action == len(self.objectives):
            return self.task_fn(rng)
        key = int(rng.integers(0, 2**31 - 1))
        return self.objectives[action](self.text_fn(rng), key, max_length=self.row_length)

    def batch(self, rng: np.random.Generator, mixture, rows: int) -> dict:
        p = np.asarray(mixture, np.float64)
        cdf = weights_cdf(p / p.sum())

        def draw():
            a = pick_weighted(rng, cdf)
            return self.example(rng, a), a
        exs, ids = fill_rows(draw, rows, self.row_length)
        return birdie.pack(exs, self.row_length, objective_ids=ids, num_rows=rows)

    def task_batch(self, rng: np.random.Generator, rows: int) -> dict:
        return self.batch(rng, np.eye(self.num_actions)[-1], rows)

    def validation(self, rng: np.random.Generator, per_action: int, rows: int) -> list[dict]:
        """Fixed validation batches holding `per_action` examples of every action."""
        exs, ids = [], []
        for a in range(self.num_actions):
            for _ in range(per_action):
                exs.append(self.example(rng, a))
                ids.append(a)
        packed = birdie.pack(exs, self.row_length, objective_ids=ids)
        n = packed["inputs"].shape[0]
        return [pad_rows({k: v[s: s + rows] for k, v in packed.items()}, rows)
                for s in range(0, n, rows)]


def objective_set(kind: str, length_bins: Sequence[int], row_length: int):
    """The pre-training objectives of an arm: Birdie's 18 configurations or plain NTP. Rows
    shorter than 256 tokens get a shorter selective-copying query (≤2 spans of ≤4 tokens with
    1–2-token delimiters) so that one example fits a row."""
    if kind != "birdie":
        return birdie.ntp_objectives()
    objs = birdie.birdie_objectives(length_bins=length_bins)
    if row_length < 256:
        short = (("max_spans", 2), ("delimiter_length", (1, 2)), ("span_length", (1, 4)))
        objs = tuple(dataclasses.replace(o, kwargs=short) if o.fn == "selective_copying" else o
                     for o in objs)
    return objs


def recall_mixture(task: RecallTask, pairs: Sequence[int], row_length: int,
                   kind: str = "birdie") -> ObjectiveMixture:
    """Objectives over the key-value text (`kv_text`) plus the recall task."""
    bins = tuple(b for b in (16, 32, 64, 128) if b <= 2 * max(pairs)) or (2 * max(pairs),)
    return ObjectiveMixture(
        objective_set(kind, bins, row_length),
        # the objectives read at least 8 pairs (prefix-LM needs ≥4 tokens each side)
        lambda rng: kv_text(rng, task, min(max(pick(rng, pairs), 8),
                                           task.key_range[1] - task.key_range[0])),
        lambda rng: recall_example(rng, task, pick(rng, pairs)), row_length)


def pad_rows(batch: dict, rows: int) -> dict:
    n = batch["inputs"].shape[0]
    if n == rows:
        return batch
    fill = {"inputs": tok.PAD, "targets": tok.PAD, "weights": 0, "prefix": False,
            "segment_ids": 0, "objective_ids": -1}
    return {k: np.concatenate([v, np.full((rows - n,) + v.shape[1:], fill[k], v.dtype)])
            for k, v in batch.items()}
