"""Packed Birdie rows for the shared trainer: objectives over a corpus, as a random-access source.

Record i of a split is one row of T tokens (T = seq_len), generated when read from the generator
seeded by (data_seed, split, i), so any record can be regenerated alone:

    {"inputs": int32 [T], "targets": int32 [T], "weights": float32 [T],
     "segment_ids": int32 [T], "objective_ids": int32 [T],
     "prefix": bool [T]}                                 (prefix only when with_prefix)

Each row is filled next-fit (`train.objectives.birdie.pack`) with examples: with probability
`task_weight` the task itself, else one of the objective set's K configurations drawn from
`mixture` ([K] weights; empty: Birdie's uniform mixture over classes); a text is drawn from the
corpus and the objective lays it out (prompt ++ [SG] ++ target). `objective_ids` holds each
token's configuration index (K for the task, -1 on padding). The mixture is part of the record's
definition: record i under another mixture is another row, so a run whose mixture changes (the
Birdie controller, a trainer hook) rebuilds its iterator at the same position with the new one.
With `objective_per_row`, row i holds examples of configuration i % K only (no task): the
balanced rows the controller measures each objective's validation loss on.

- objectives: "birdie" (Birdie's 7 classes: 19 configurations under the paper's settings, 18
  under the compact ones), "ul2" (UL2's 7 denoisers), "ntp" (plain next-token prediction, no
  prompt: what a Transformer-NTP baseline trains on), built with `objective_settings`
  (`birdie.ObjectiveSettings`: the paper's by default; the controller builds its actions from
  the same settings, so both agree on K);
- corpus: "text" (the local Python-docs prose, train/data/text_corpus.py), "phonebook" (phone-book
  text, eval/phonebook.py's format, the synthetic retrieval text) or "mix" (both, half each);
- task: the phone-book lookup prompt → "numbers" + EOS, the fine-tuning/evaluation task.

The Transformer has no prefix: configs for it set with_prefix=False so batches carry no
`prefix` field (train/objectives/birdie.py:trainer_loss passes only the fields a batch has).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from train.data import phonebook, text_corpus
from train.data import tokenizer as tok
from train.objectives import birdie

SPLITS = ("train", "validation")
_SPLIT_CODE = {"train": 0, "validation": 1}
OBJECTIVE_SETS = ("birdie", "ul2", "ntp")
CORPORA = ("text", "phonebook", "mix")


@dataclasses.dataclass(frozen=True)
class BirdieDataSpec:
    seq_len: int = 256                 # T: tokens per row
    objectives: str = "birdie"         # objective set, see OBJECTIVE_SETS
    corpus: str = "mix"                # text the objectives read, see CORPORA
    task_weight: float = 0.0           # probability of a phone-book task example per draw
    with_prefix: bool = True           # emit the prefix field (False for the Transformer)
    phonebook_entries: tuple = (4, 8)  # entries of the task's / corpus's books (inclusive range)
    phonebook_queries: tuple = (1, 2)  # queried names of the task (inclusive range)
    validation_percent: int = 10       # text corpus: documents held out for "validation"
    num_train: int = 1_000_000         # rows in "train" (generated on read: size is free)
    num_validation: int = 256          # rows in "validation"
    seed: int = 0                      # content seed
    mixture: tuple = ()                # [K] weights over the configurations; () = uniform
    objective_per_row: bool = False    # row i: configuration i % K only (controller validation)
    # how the objective set is built (a mapping or ConfigDict of its fields is converted)
    objective_settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS

    def __post_init__(self):
        object.__setattr__(self, "objective_settings",
                           birdie.ObjectiveSettings.from_mapping(self.objective_settings))
        for name in ("phonebook_entries", "phonebook_queries"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "mixture", tuple(float(v) for v in self.mixture))
        if self.objectives not in OBJECTIVE_SETS:
            raise ValueError(f"objectives={self.objectives!r} is not allowed; use one of "
                             f"{OBJECTIVE_SETS}")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus={self.corpus!r} is not allowed; use one of {CORPORA}")
        if not 0.0 <= self.task_weight <= 1.0:
            raise ValueError(f"task_weight={self.task_weight} must be in [0, 1]")
        if self.seq_len < 32:
            raise ValueError(f"seq_len={self.seq_len} must be >= 32 (one example per row)")
        lo, hi = self.phonebook_entries
        qlo, qhi = self.phonebook_queries
        if not (1 <= lo <= hi and 1 <= qlo <= qhi <= lo):
            raise ValueError(f"phonebook_entries={self.phonebook_entries}, phonebook_queries="
                             f"{self.phonebook_queries}: need 1 <= lo <= hi, and queries within "
                             "1..min entries")
        for name in ("num_train", "num_validation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.mixture:
            K = len(objective_set(self.objectives, self.objective_settings))
            w = np.asarray(self.mixture)
            if w.shape != (K,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"mixture={self.mixture} is not allowed: objectives="
                                 f"{self.objectives!r} needs {K} non-negative weights with a "
                                 "positive sum (or () for the uniform mixture)")

    def num_examples(self, split: str) -> int:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
        return self.num_train if split == "train" else self.num_validation


def objective_set(name: str, settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS):
    """The configurations of objective set `name` (OBJECTIVE_SETS) built with `settings`."""
    if name == "birdie":
        return birdie.birdie_objectives(length_bins=(64, 128, 256, 512), settings=settings)
    if name == "ul2":
        return birdie.ul2_objectives(settings=settings)
    return birdie.ntp_objectives()


@functools.lru_cache(maxsize=4)
def _corpus_tokens(split: str, validation_percent: int) -> tuple[np.ndarray, ...]:
    return tuple(tok.encode(d["text"]) for d in text_corpus.documents(split, validation_percent))


def row_generator(seed: int, split: str, index: int, length: int) -> np.random.Generator:
    """The generator of record `index` of `split` (of `length` records): seeded by (seed, split,
    index) alone, so any record can be regenerated on its own."""
    if not 0 <= index < length:
        raise IndexError(f"index={index} out of range for split {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


class BirdieSource:
    """Random-access source of packed rows (picklable; the corpus is loaded on first read)."""

    def __init__(self, spec: BirdieDataSpec, split: str):
        self._spec = spec
        self._split = split
        self._len = spec.num_examples(split)
        self._objectives = objective_set(spec.objectives, spec.objective_settings)
        if spec.mixture:
            w = np.asarray(spec.mixture, np.float64)
            self._mixture = w / w.sum()
        else:
            self._mixture = birdie.uniform_mixture(self._objectives)

    def __len__(self) -> int:
        return self._len

    def _text(self, rng: np.random.Generator) -> np.ndarray:
        s = self._spec
        use_book = s.corpus == "phonebook" or (s.corpus == "mix" and rng.random() < 0.5)
        if use_book:
            entries = int(rng.integers(s.phonebook_entries[0], s.phonebook_entries[1] + 1))
            ex = phonebook.make_example(int(rng.integers(2**31)), entries, 1)
            return tok.encode(ex.prompt + ex.target)
        docs = _corpus_tokens(self._split, s.validation_percent)
        doc = docs[int(rng.integers(len(docs)))]
        n = min(doc.size, s.seq_len)
        start = int(rng.integers(0, doc.size - n + 1))
        return doc[start: start + n]

    def _task(self, rng: np.random.Generator):
        s = self._spec
        entries = int(rng.integers(s.phonebook_entries[0], s.phonebook_entries[1] + 1))
        queries = int(rng.integers(s.phonebook_queries[0],
                                   min(s.phonebook_queries[1], entries) + 1))
        ex = phonebook.make_example(int(rng.integers(2**31)), entries, queries)
        prompt, target = tok.encode(ex.prompt), tok.encode(ex.target, add_eos=True)
        if prompt.size + target.size > s.seq_len:
            raise ValueError(f"a phone book of {entries} entries needs "
                             f"{prompt.size + target.size} tokens > seq_len={s.seq_len}")
        return birdie.make_example(prompt, target)

    def _example(self, rng: np.random.Generator, index: int):
        """(example, configuration index; K for the task) of the next draw for row `index`."""
        s = self._spec
        K = len(self._objectives)
        if s.objective_per_row:
            i = index % K
        elif s.task_weight and rng.random() < s.task_weight:
            return self._task(rng), K
        else:
            i = int(rng.choice(K, p=self._mixture))
        return self._objectives[i](self._text(rng), int(rng.integers(2**31)),
                                   max_length=s.seq_len), i

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self._spec
        index = int(index)
        rng = row_generator(s.seed, self._split, index, self._len)
        return birdie.pack_row(lambda: self._example(rng, index), s.seq_len,
                               with_prefix=s.with_prefix)

    def __repr__(self) -> str:
        return f"BirdieSource({self._spec}, split={self._split!r})"
