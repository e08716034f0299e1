"""Okapi BM25 (eval/bm25.py) against the formula computed by hand, and the retrieval prompts of
the baseline beside MAC (eval/qa_baselines.py)."""
import math

import numpy as np
import pytest

from eval import qa_baselines
from eval.bm25 import BM25, words

DOCS = ["Gogepe lives in Minsk. Gogepe works as a dentist.",
        "Sujedo lives in Jena, and Sujedo collects maps and maps.",
        "The weather in Jena is mild."]


def test_scores_match_the_formula_by_hand():
    k1, b = 1.5, 0.75
    index = BM25(DOCS, k1=k1, b=b)
    toks = [words(d) for d in DOCS]
    avgdl = sum(map(len, toks)) / 3
    query = "Where are the maps of Jena? maps"
    want = np.zeros(3)
    for t in words(query):                        # a repeated query term counts twice
        n = sum(t in d for d in toks)
        idf = math.log(1 + (3 - n + 0.5) / (n + 0.5))
        for i, d in enumerate(toks):
            tf = d.count(t)
            want[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
    np.testing.assert_allclose(index.scores(query), want, rtol=1e-12)
    assert want[1] > want[2] > 0 and want[0] == 0
    assert words("Minsk, MINSK's 2020!") == ["minsk", "minsk", "s", "2020"]
    # Lucene's idf stays positive for a term in every document ("in"); the classic one would not
    assert index.scores("in")[0] > 0


def test_top1_is_the_only_document_holding_the_question_words():
    # each question's content words occur in its own document only; the function words
    # ("what", "does", "in") are spread over the others, and one question matches nothing
    docs = ["Bovedo lives in Nice and collects bells.",
            "Kalumo works as a pilot in Oslo; what does Kalumo do in winter?",
            "Ripeta collects stamps in Lima. Ripeta does what Ripeta likes."]
    qs = ["What does Bovedo collect?", "Where does Kalumo work?", "Who likes stamps?",
          "Zzyzx qwerty?"]
    assert BM25(docs).top1(qs).tolist() == [0, 1, 2, -1]
    # ties go to the earliest document
    assert BM25(["a b", "a b"]).top1(["a"]).tolist() == [0]


def test_refusals():
    with pytest.raises(ValueError, match="documents=\\[\\]"):
        BM25([])
    with pytest.raises(ValueError, match="b=2"):
        BM25(["x"], b=2)
    with pytest.raises(ValueError, match="baselines.ft_lrs"):
        qa_baselines.Baselines(ft_lrs=(1e-4, -1.0))
    with pytest.raises(ValueError, match="retrieval_doc_length=100 is not allowed"):
        qa_baselines.Baselines(retrieval=True, retrieval_doc_length=100).check_fits(64, 2, 32)


class _Words:
    """A word-level stand-in tokenizer (ids = word positions in a growing table)."""
    def __init__(self):
        self.table = {}
        self.eos_id, self.pad_id = 0, None

    def encode(self, s):
        return [self.table.setdefault(w, len(self.table) + 1) for w in s.split(" ")]


def test_retrieval_prompts_document_then_question_and_the_room():
    t = _Words()
    docs = ["a b c d e f", "g h"]
    p = qa_baselines.retrieval_prompts(t, docs, np.array([0, 1, -1]), ["q r", "q", "s"],
                                       doc_length=4)
    sep, a, q, r, s = (t.table[w] for w in ("\n", "a", "q", "r", "s"))
    assert p[0].tolist() == t.encode("a b c d") + [sep, q, r]
    assert p[1].tolist() == t.encode("g h") + [sep, q]
    assert p[2].tolist() == [s]                      # nothing retrieved: the question alone
    p = qa_baselines.retrieval_prompts(t, docs, np.array([0]), ["q r"], doc_length=4, room=5)
    assert p[0].tolist() == t.encode("a b") + [sep, q, r]   # the document yields, not the question
    assert a == p[0][0]
    recs = [{"document": d} for d in ("x", "y", "x")]
    assert qa_baselines.ft_documents(recs, dedupe=False) == ["x", "y", "x"]
    assert qa_baselines.ft_documents(recs, dedupe=True) == ["x", "y"]
    assert qa_baselines.dedupes("streamingqa") is False and qa_baselines.dedupes("squad")
