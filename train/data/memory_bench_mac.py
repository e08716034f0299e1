"""The memory benchmark's probes posed to MAC (Tack et al. 2024): the prompt's facts become the
documents of a bank, the question goes to the frozen LM.

A probe example (train/data/memory_bench.py) is split into documents and questions:

- mqar: each key-value pair [k, v] is a document (2 tokens); each query key k is a question,
  the LM reads [k, v] and is scored on v (every query of the example is asked against its bank);
- phonebook, streamqa: each line of the prompt ("Name Surname : XXX-XXX-XXXX", "Bodaku lives in
  Lisbon.") is a document; the prompt's last line is the question, the LM reads it and the
  answer, scored where the probe scores it;
- passkey: the prompt before its question line is cut into chunks of S bytes, each a document
  (the key sits in one or two of them); the question line "What is the pass key? The pass key
  is" goes to the LM, scored on the key's digits.

A question row is {"question" [n] int32 (h's input), "qa" [n + a] int32 (the LM's input:
question then answer, as the dense LM read the end of its prompts), "weights" [n + a] float32 (1
at the answer tokens the probe scores)}. `mac_parts(probe, example, doc_length)` gives
(documents [N, S] int32 PAD-padded, question rows); `MacSource` is the trainer's rows
(dataset "memory_bench" with data.mac_doc_length > 0, kind "fields"): row i is the mixture's
example i (the same probe, difficulty and content as MixtureSource's row i) with one of its
questions drawn, as fixed-shape arrays

    {"docs" [N, S] int32, "questions" [Q] int32, "qa" [L] int32, "qa_weights" [L] float32}

(N = max_documents, empty documents all PAD; questions PAD-padded; qa 0-padded, weight 0).
"""
from __future__ import annotations

import numpy as np

from train.data import memory_bench as mb
from train.data import passkey_data
from train.data import tokenizer as tok


def _check(field, value, allowed, ok):
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {allowed}")


def _encode_docs(docs: list[np.ndarray], doc_length: int) -> np.ndarray:
    out = np.full((len(docs), doc_length), tok.PAD, np.int32)
    for i, d in enumerate(docs):
        _check("doc_length", doc_length, f">= {d.size} (a document's tokens)", d.size <= doc_length)
        out[i, :d.size] = d
    return out


def mac_parts(probe: str, ex: dict, doc_length: int) -> tuple[np.ndarray, list[dict]]:
    """(documents [N, S = doc_length] int32, question rows) of probe example `ex` (see the
    module docstring). Every scored answer token of `ex` is scored in exactly one row."""
    _check("probe", probe, str(mb.PROBES), probe in mb.PROBES)
    t, m, n = ex["tokens"], ex["answer"], ex["prefix_len"]
    if probe == "mqar":
        P = n // 2
        docs = [t[2 * i:2 * i + 2] for i in range(P)]
        rows = []
        for j in np.nonzero(m)[0]:          # t[j] answers the query t[j - 1]
            qa = t[j - 1:j + 1].astype(np.int32)
            rows.append({"question": qa[:1], "qa": qa, "weights": np.array([0.0, 1.0],
                                                                            np.float32)})
        return _encode_docs(docs, doc_length), rows
    text = bytes(t[:n].astype(np.uint8)).decode()
    context, _, question = text.rpartition("\n")
    if probe == "passkey":
        docs = [tok.encode(context[i:i + doc_length])
                for i in range(0, len(context), doc_length)]
        _check("question", question, repr(passkey_data.QUESTION), question == passkey_data.QUESTION)
    else:
        docs = [tok.encode(line) for line in context.split("\n")]
    q = tok.encode(question).astype(np.int32)
    qa = np.concatenate([q, t[n:]]).astype(np.int32)
    weights = np.concatenate([np.zeros(q.size), m[n:]]).astype(np.float32)
    return _encode_docs(docs, doc_length), [{"question": q, "qa": qa, "weights": weights}]


def max_documents(probe: str, difficulty: int, doc_length: int) -> int:
    """The most documents an example of (probe, difficulty) has."""
    if probe == "passkey":      # the prompt before its question line, in chunks
        return -(-(difficulty - len(passkey_data.QUESTION) - 1) // doc_length)
    return int(difficulty)


def question_lengths(probe: str, difficulty: int) -> tuple[int, int]:
    """(the longest question, the longest qa row) of (probe, difficulty)."""
    if probe == "mqar":
        return 1, 2
    if probe == "passkey":
        q = len(passkey_data.QUESTION)
        return q, q + 1 + mb.PASSKEY_DIGITS
    # The prompt's last line and the answer: bounded by one example's length less its documents.
    total = mb.probe_length(probe, 1)
    return total, total


class MacSource:
    """Random-access MAC rows of the probe mixture (module docstring; picklable)."""

    def __init__(self, spec: mb.MixtureSpec, split: str, doc_length: int):
        _check("split", split, str(mb.SPLITS), split in mb.SPLITS)
        _check("birdie_fraction", spec.birdie_fraction, "0 with mac_doc_length > 0",
               spec.birdie_fraction == 0)
        self._spec, self._split, self._S = spec, split, int(doc_length)
        self._mixture = mb.MixtureSource(spec, split)
        self.N = max(max_documents(p, spec.train_range(p)[1], self._S) for p in mb.PROBES)
        self.Q = max(question_lengths(p, spec.train_range(p)[1])[0] for p in mb.PROBES)
        self.L = max(question_lengths(p, spec.train_range(p)[1])[1] for p in mb.PROBES)

    def __len__(self) -> int:
        return len(self._mixture)

    def __getitem__(self, index: int) -> dict:
        probe, ex = self._mixture.example(index)
        docs, rows = mac_parts(probe, ex, self._S)
        rng = np.random.default_rng([self._spec.seed, 99, int(index)])
        r = rows[int(rng.integers(len(rows)))]
        out = {"docs": np.full((self.N, self._S), tok.PAD, np.int32),
               "questions": np.full(self.Q, tok.PAD, np.int32),
               "qa": np.zeros(self.L, np.int32), "qa_weights": np.zeros(self.L, np.float32)}
        out["docs"][:docs.shape[0]] = docs
        out["questions"][:r["question"].size] = r["question"]
        out["qa"][:r["qa"].size] = r["qa"]
        out["qa_weights"][:r["qa"].size] = r["weights"]
        return out
