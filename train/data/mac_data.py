"""MAC's data (Tack et al. 2024) from the synthetic fact stream (train/data/facts.py), as
random-access sources for the trainer's pipeline (train/data/pipeline.py).

Two datasets, one per training stage:

- "mac_lm" (stage 1, the base LM): rows `document EOS question SEP answer EOS` of every question
  of every document (`lm_rows`), and, a fraction `qa_only_fraction` of the rows, packed
  `question SEP answer EOS` sequences without the document (`qa_only_rows`); records are
  {inputs, targets, weights} [T] with the loss on every real token.
- "mac_meta" (stage 2, meta-training): one record per document,

      docs        [S]     int32   document bytes, PAD-padded
      questions   [R, Q]  int32   each relation's question bytes (h's input), PAD-padded
      qa          [R, L]  int32   each relation's `question SEP answer EOS`, PAD-padded
      qa_weights  [R, L]  float32 1 on the answer bytes and EOS
      doc_answers [R]     int32   each answer's first byte (the readouts' targets)

  A batch of K records is K distinct documents of one shuffled epoch (the bank); the objective
  (train/objectives/mac.py) draws which of the R questions each document is asked.

A split's documents are `facts.fact_stream(split, n, data_seed)`: n = `documents` for "train",
min(`documents`, `eval_documents`) for "validation" and "test" (distinct entities per split).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from train.data import facts
from train.data import tokenizer as tok

SPLITS = facts.SPLITS


@dataclasses.dataclass(frozen=True)
class Lengths:
    doc: int = 112        # S: document bytes
    question: int = 32    # Q: question bytes (h's input)
    qa: int = 40          # L: `question SEP answer EOS`
    lm: int = 160         # stage-1 row length

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"lengths.{f.name}={v!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class MacDataSpec:
    """What a MAC source holds (a data config's fields, see pipeline.default_data_config)."""
    documents: int            # train documents (distinct entities)
    eval_documents: int       # at most this many in "validation" and "test"
    seed: int                 # content seed of the fact stream
    lengths: Lengths
    qa_only_fraction: float = 0.0   # "mac_lm" only

    def __post_init__(self):
        for name in ("documents", "eval_documents"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"data_config.{name}={v!r} must be a positive integer")
        have = len(facts.entity_names("train"))
        if self.documents > have:
            raise ValueError(f"data_config.documents={self.documents} is not allowed: the train "
                             f"split has {have} entities (one per document)")
        if not 0.0 <= self.qa_only_fraction < 1.0:
            raise ValueError(f"data_config.qa_only_fraction={self.qa_only_fraction} is not "
                             "allowed; use 0 <= f < 1")

    def num_documents(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
        if split == "train":
            return self.documents
        return min(self.eval_documents, len(facts.entity_names(split)))


# ---------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------
def first_answer_tokens(qa_BxL: np.ndarray, weights_BxL: np.ndarray) -> np.ndarray:
    """[B] (any leading axes) the first weighted token of each QA row: the answer's first byte."""
    first = np.argmax(np.asarray(weights_BxL) > 0, axis=-1)
    return np.take_along_axis(np.asarray(qa_BxL), first[..., None], axis=-1)[..., 0]


def encode_docs(docs: Sequence[dict], lengths: Lengths) -> dict:
    """Pre-encoded fact-stream documents: docs [N, S], and per relation r questions [N, R, Q],
    qa [N, R, L], qa_weights [N, R, L], doc_answers [N, R] (each answer's first token)."""
    n_rel = len(docs[0]["qas"])
    doc_tok = facts.encode_documents([d["document"] for d in docs], lengths.doc)
    qs = [qa["question"] for d in docs for qa in d["qas"]]
    ans = [qa["answer"] for d in docs for qa in d["qas"]]
    q_tok = facts.encode_questions(qs, lengths.question).reshape(len(docs), n_rel, -1)
    qa_tok, qa_w = facts.encode_qa(qs, ans, lengths.qa)
    answers = first_answer_tokens(qa_tok, qa_w).astype(np.int32)
    return {"docs": doc_tok, "questions": q_tok,
            "qa": qa_tok.reshape(len(docs), n_rel, -1),
            "qa_weights": qa_w.reshape(len(docs), n_rel, -1),
            "doc_answers": answers.reshape(len(docs), n_rel)}


def _qa_ids(record: dict) -> np.ndarray:
    """`question SEP answer EOS` token ids of a record (its first answer)."""
    ans = record["answer"] if isinstance(record["answer"], str) else record["answer"][0]
    return np.concatenate([tok.encode(record["question"]), [tok.SEP], tok.encode(ans),
                           [tok.EOS]])


def _lm_rows(rows: Sequence[np.ndarray], length: int) -> dict:
    """Token rows (each ≤ length + 1) → PAD-filled next-token rows, loss on every real token."""
    arr = np.full((len(rows), length + 1), tok.PAD, np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    inputs, targets = arr[:, :-1], arr[:, 1:]
    return {"inputs": inputs, "targets": targets,
            "weights": (targets != tok.PAD).astype(np.float32)}


def lm_rows(records: Sequence[dict], length: int) -> dict:
    """Stage-1 rows `document EOS question SEP answer EOS` (loss on every real token).

    Teaches the base LM the QA format and how to read an answer from context in front of it,
    which is what the prefix later supplies.
    """
    rows = [np.concatenate([tok.encode(r["document"]), [tok.EOS], _qa_ids(r)])[: length + 1]
            for r in records]
    return _lm_rows(rows, length)


def qa_only_rows(records: Sequence[dict], length: int) -> dict:
    """Stage-1 rows of `question SEP answer EOS` sequences with no document, packed greedily
    (loss on every real token); the first sequence of every row starts at position 0.

    Without them the base LM only ever saw a question after its document, so at MAC's layout
    (the question right after the prefix, no document) the frozen LM did not even produce the
    answer format: its no-memory answer loss was 3.05 nats/token instead of the answer prior
    (0.46), and stage 2 spent itself restoring the format. With them, the no-memory LM answers
    with the prior and the prefix only has to supply the document's facts.
    """
    rows, cur = [], []
    for s_ in (_qa_ids(r) for r in records):
        if cur and sum(map(len, cur)) + len(s_) > length + 1:
            rows.append(np.concatenate(cur))
            cur = []
        cur.append(s_[: length + 1])
    if cur:
        rows.append(np.concatenate(cur))
    return _lm_rows(rows, length)


def mixed_lm_rows(docs: Sequence[dict], length: int, qa_only_fraction: float) -> dict:
    """Stage-1 rows of `docs`: `lm_rows` of every question, then `qa_only_rows` repeated so that
    they are `qa_only_fraction` of all rows."""
    if not 0.0 <= qa_only_fraction < 1.0:
        raise ValueError(f"qa_only_fraction={qa_only_fraction} is not allowed; use 0 <= f < 1")
    recs = facts.qa_records(docs, questions_per_doc=None)
    rows = lm_rows(recs, length)
    if qa_only_fraction > 0:
        qrows = qa_only_rows(recs, length)
        n_doc, n_q = rows["inputs"].shape[0], qrows["inputs"].shape[0]
        want = int(round(n_doc * qa_only_fraction / (1.0 - qa_only_fraction)))
        reps = np.arange(max(want, 1)) % n_q
        rows = {k: np.concatenate([rows[k], qrows[k][reps]]) for k in rows}
    return rows


# ---------------------------------------------------------------------------------------------
# Sources (cached: the trainer makes a fresh evaluation iterator at every evaluation)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _encoded(spec: MacDataSpec, split: str) -> dict:
    docs = facts.fact_stream(split, spec.num_documents(split), spec.seed)
    return encode_docs(docs, spec.lengths)


@functools.lru_cache(maxsize=8)
def _rows(spec: MacDataSpec, split: str, seq_len: int) -> dict:
    docs = facts.fact_stream(split, spec.num_documents(split), spec.seed)
    return mixed_lm_rows(docs, seq_len, spec.qa_only_fraction)


class ArraySource:
    """Random access to record i of a dict of arrays with a common first axis."""

    def __init__(self, arrays: dict):
        self._arrays = arrays
        self._n = next(iter(arrays.values())).shape[0]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i) -> dict:
        return {k: v[i] for k, v in self._arrays.items()}


def meta_source(spec: MacDataSpec, split: str) -> ArraySource:
    """"mac_meta": one record per document of `split` (module docstring)."""
    return ArraySource(_encoded(spec, split))


def lm_source(spec: MacDataSpec, split: str, seq_len: int) -> ArraySource:
    """"mac_lm": stage-1 rows {inputs, targets, weights} [seq_len] of `split`'s documents."""
    return ArraySource(_rows(spec, split, seq_len))
