"""Okapi BM25 over a fixed set of documents, in numpy: the retrieval baseline beside MAC on the
real QA streams (`eval/qa_baselines.py`; Tack et al. 2024 combine MAC with BM25 retrieval).

    index = BM25(documents)                 # k1 = 1.5, b = 0.75
    index.scores(query) -> float64 [N]      # one score per document
    index.top1(queries) -> int [B]          # best document per query, -1 where nothing matches

Scoring (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond"),
for a query q of terms t (a term asked twice counts twice) and a document d of length |d|:

    score(q, d) = Σ_t idf(t) · tf(t, d) · (k1 + 1) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl))
    idf(t)      = ln(1 + (N − n(t) + 0.5) / (n(t) + 0.5))

with n(t) the documents holding t. This idf is Lucene's (`BM25Similarity`): always positive. The
classic ln((N − n + 0.5) / (n + 0.5)) turns negative for a term in more than half the documents,
so on a stream of a few documents (the tests' four) a shared word would push its documents down.

Terms are lower-cased word characters (`\\w+`), no stemming and no stop words: the lexical
matching BM25 is defined on. The LM's BPE tokenizer is not used, because its pieces depend on the
position of a word (GPT-2 encodes "Minsk" at a sentence start and " Minsk" after a space as
different ids) and it splits rare names into pieces shared with unrelated words.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The BM25 terms of `text`: its lower-cased runs of word characters."""
    return _WORD.findall(text.lower())


class BM25:
    """An Okapi BM25 index of `documents` (strings); immutable once built.

    Postings are kept per term (CSR: `_start[t]:_start[t+1]` into `_doc` and `_weight`), each
    weight the term's whole contribution idf · tf · (k1 + 1) / (tf + k1 · norm(d)), so a query's
    scores are one bincount over its terms' postings.
    """

    def __init__(self, documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75):
        if not documents:
            raise ValueError("documents=[] is not allowed: BM25 needs at least one document")
        if not k1 >= 0.0:
            raise ValueError(f"k1={k1} is not allowed; use k1 >= 0")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"b={b} is not allowed; use 0 <= b <= 1")
        self.k1, self.b, self.num_docs = float(k1), float(b), len(documents)
        self.vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        lengths = np.zeros(len(documents), np.float64)
        for d, text in enumerate(documents):
            ws = words(text)
            lengths[d] = len(ws)
            ids = np.array([self.vocab.setdefault(w, len(self.vocab)) for w in ws], np.int64)
            terms, counts = np.unique(ids, return_counts=True)
            rows.append(np.full(len(terms), d, np.int64))
            cols.append(terms)
            tfs.append(counts.astype(np.float64))
        doc, term, tf = np.concatenate(rows), np.concatenate(cols), np.concatenate(tfs)
        n_t = np.bincount(term, minlength=len(self.vocab)).astype(np.float64)
        self.idf = np.log1p((self.num_docs - n_t + 0.5) / (n_t + 0.5))    # [V]
        avgdl = max(lengths.mean(), 1e-12)                                # empty texts: all 0
        norm = 1.0 - self.b + self.b * lengths[doc] / avgdl
        weight = self.idf[term] * tf * (self.k1 + 1.0) / (tf + self.k1 * norm)
        order = np.argsort(term, kind="stable")
        self._doc, self._weight = doc[order], weight[order]
        self._start = np.concatenate([[0], np.cumsum(n_t.astype(np.int64))])

    def scores(self, query: str) -> np.ndarray:
        """float64 [N]: the BM25 score of every document for `query` (0 where no term matches)."""
        ids = [self.vocab[w] for w in words(query) if w in self.vocab]
        if not ids:
            return np.zeros(self.num_docs)
        idx = np.concatenate([np.arange(self._start[t], self._start[t + 1]) for t in ids])
        return np.bincount(self._doc[idx], weights=self._weight[idx], minlength=self.num_docs)

    def top1(self, queries: Sequence[str]) -> np.ndarray:
        """int64 [B]: each query's highest-scoring document (ties: the earliest), -1 for a query
        none of whose terms is in any document."""
        out = np.full(len(queries), -1, np.int64)
        for i, q in enumerate(queries):
            s = self.scores(q)
            if s.max() > 0.0:
                out[i] = int(np.argmax(s))
        return out
