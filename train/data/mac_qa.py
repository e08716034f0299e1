"""MAC's real QA streams (StreamingQA, ArchivalQA, SQuAD in their official formats,
train/data/facts.py) as "mac_qa" records for the trainer's pipeline (train/data/pipeline.py).

Two tokenizers, as the official code (jihoontack/MAC, common/dataset.py): the amortization
tokenizer (T5's) for what g and h read, the base LM's own for what the frozen LM reads. One
record per QA row (a document may appear in several rows, as officially), in the layout of
"mac_meta" (train/data/mac_data.py) with R = 1 question per record:

    docs        [S]     int32   the document, amortization tokens + EOS, cut at S, pad-filled
    questions   [1, Q]  int32   the question, amortization tokens + EOS (h's input)
    qa          [1, L]  int32   LM tokens of `question` then of `" " + answer` then the LM's EOS
                                (a question too long loses tokens at its start, officially)
    qa_weights  [1, L]  float32 1 on the answer tokens and the EOS
    doc_answers [1]     int32   the answer's first LM token

Splits: "train", "validation", "test" are the official train / val / test (files
DATA_DIR/{train,val,test}.csv; SQuAD: the TFDS slices in facts.SQUAD_SPLITS), each in the
official order (`facts.official_order`, seeded).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from train.data import facts, mac_data
from train.data import tokenizer as tok_lib

SPLITS = ("train", "validation", "test")
OFFICIAL_SPLIT = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass(frozen=True)
class QASpec:
    """What a "mac_qa" source holds (the data config's fields, pipeline.default_data_config)."""
    format: str               # "streamingqa" | "archivalqa" | "squad"
    data_dir: str             # the official files' folder (SQuAD: the TFDS data_dir, "" default)
    lm_tokenizer: str         # the base LM's tokenizer spec (train/data/tokenizer.load_tokenizer)
    amort_tokenizer: str      # g's and h's tokenizer spec (T5's)
    doc_length: int           # S
    question_length: int      # Q
    qa_length: int            # L
    seed: int = 0             # the official order's shuffle
    full_passage: bool = False  # ArchivalQA: documents are whole articles (ans_text)
    limit: int = 0            # rows read per split (0: all)

    def __post_init__(self):
        if self.format not in facts.QA_FORMATS:
            raise ValueError(f"data_config.format={self.format!r} is not allowed; use one of "
                             f"{facts.QA_FORMATS}")
        if self.format != "squad" and not self.data_dir:
            raise ValueError(f"data_config.data_dir={self.data_dir!r} is not allowed for "
                             f"format={self.format!r}: give the folder of train.csv, val.csv, "
                             "test.csv")
        for name in ("doc_length", "question_length", "qa_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"data_config.{name}={v!r} is not allowed; use an integer >= 2")
        for name in ("lm_tokenizer", "amort_tokenizer"):
            if not getattr(self, name):
                raise ValueError(f"data_config.{name}={getattr(self, name)!r} is not allowed; "
                                 "give a tokenizer spec (a folder, tokenizer.json or .model)")


@functools.lru_cache(maxsize=8)
def tokenizer(spec: str) -> tok_lib.Tokenizer:
    """A loaded tokenizer (cached) with an EOS and a pad id (pad = EOS where it has none, as the
    official code sets GPT-2's `pad_token = eos_token`)."""
    t = tok_lib.load_tokenizer(spec)
    if t.eos_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token; MAC's rows end with one")
    return t


def pad_id(t: tok_lib.Tokenizer) -> int:
    """The tokenizer's padding id, its EOS where it has no pad (GPT-2)."""
    return t.pad_id if t.pad_id is not None else t.eos_id


def encode_texts(t: tok_lib.Tokenizer, texts: Sequence[str], length: int) -> np.ndarray:
    """int32 [N, length]: each text's tokens + EOS, cut at `length` (EOS kept last, as a
    truncating T5 tokenizer), pad-filled."""
    out = np.full((len(texts), length), pad_id(t), np.int32)
    for i, s in enumerate(texts):
        ids = np.asarray(t.encode(s, add_eos=True), np.int32)
        if len(ids) > length:
            ids = np.concatenate([ids[:length - 1], ids[-1:]])
        out[i, :len(ids)] = ids
    return out


def encode_prompt(t: tok_lib.Tokenizer, question: str) -> np.ndarray:
    """The LM tokens of a question, the prompt the answer is decoded after."""
    return np.asarray(t.encode(question), np.int32)


def encode_qa_rows(t: tok_lib.Tokenizer, questions: Sequence[str], answers: Sequence[str],
                   length: int) -> tuple[np.ndarray, np.ndarray]:
    """LM rows `question` + `" " + answer` + EOS: tokens [N, L] and weights [N, L] (1 on the
    answer tokens and the EOS). A row too long loses question tokens from its start."""
    tokens = np.full((len(questions), length), pad_id(t), np.int32)
    weights = np.zeros((len(questions), length), np.float32)
    for i, (q, a) in enumerate(zip(questions, answers)):
        qi = encode_prompt(t, q)
        ai = np.concatenate([np.asarray(t.encode(" " + a), np.int32), [t.eos_id]])
        if len(ai) >= length:
            raise ValueError(f"data_config.qa_length={length} is not allowed: answer {a!r} "
                             f"needs {len(ai)} tokens and its question at least one more")
        qi = qi[max(0, len(qi) + len(ai) - length):]
        row = np.concatenate([qi, ai])
        tokens[i, :len(row)] = row
        weights[i, len(qi):len(row)] = 1.0
    return tokens, weights


def encode_records(spec: QASpec, records: Sequence[dict]) -> dict:
    """The "mac_qa" arrays (module docstring) of `records` (facts.load_qa_split's)."""
    lm, amort = tokenizer(spec.lm_tokenizer), tokenizer(spec.amort_tokenizer)
    qs = [r["question"] for r in records]
    qa, w = encode_qa_rows(lm, qs, [r["answer"] for r in records], spec.qa_length)
    first = np.argmax(w > 0, axis=-1)
    return {"docs": encode_texts(amort, [r["document"] for r in records], spec.doc_length),
            "questions": encode_texts(amort, qs, spec.question_length)[:, None],
            "qa": qa[:, None], "qa_weights": w[:, None],
            "doc_answers": np.take_along_axis(qa, first[:, None], 1).astype(np.int32)}


def records(spec: QASpec, split: str) -> list[dict]:
    """The records of pipeline split `split` ("train" | "validation" | "test")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
    return facts.load_qa_split(spec.format, spec.data_dir, OFFICIAL_SPLIT[split],
                               seed=spec.seed, full_passage=spec.full_passage,
                               limit=spec.limit or None)


@functools.lru_cache(maxsize=8)
def _encoded(spec: QASpec, split: str) -> dict:
    return encode_records(spec, records(spec, split))


def source(spec: QASpec, split: str) -> mac_data.ArraySource:
    """"mac_qa": one record per QA row of `split` (module docstring)."""
    return mac_data.ArraySource(_encoded(spec, split))


def spec_from_config(data_config) -> QASpec:
    """The QASpec of a "mac_qa" data config."""
    return QASpec(format=data_config.format, data_dir=str(data_config.data_dir),
                  lm_tokenizer=data_config.lm_tokenizer,
                  amort_tokenizer=data_config.amort_tokenizer,
                  doc_length=data_config.doc_length, question_length=data_config.question_length,
                  qa_length=data_config.qa_length, seed=data_config.data_seed,
                  full_passage=bool(data_config.full_passage), limit=data_config.limit)
