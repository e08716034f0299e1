"""Metrics shared by the evaluators: accuracy, digit accuracy, SQuAD EM/F1, perplexity.

Text metrics follow the official SQuAD v1.1 evaluation script: answers are normalised (lower case,
punctuation and the articles a/an/the removed, whitespace collapsed) before exact match and the
token-level F1; with several gold answers the best one counts.

Two other exact matches, for MAC's streaming QA:
- `official_scores` is what the official MAC evaluation computes (jihoontack/MAC, utils.py:
  `exact_match(prediction, ground_truth, match_length=False)` and `f1_score`, called by
  `evals/qa_utils.py: qa_eval` and `AmortEncDecAggregateWrapper.compute_qa_metrics`): one gold
  answer (the shortest, see train/data/facts.py), EM = the normalised prediction *cut to the
  normalised gold's length in characters* equals the normalised gold (so a prediction that
  starts with the answer and keeps generating counts, and so does "Osloville" for "Oslo"); F1 =
  SQuAD token F1 against that one gold, 0 when either side normalises to nothing.
- `lenient=True` (of `exact_match` / `squad_scores`) is looser than the official EM in one way
  and stricter in none: it also counts a prediction that *contains* a gold answer anywhere or is
  contained in one ("in Oslo" for "Oslo", "Os" for "Oslo"), both non-empty, and takes the best of
  several golds; every official match is a lenient match except when the gold normalises to ""
  (official: always a match; lenient: only an empty prediction matches).
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Optional, Sequence, Union

import numpy as np

Answers = Union[str, Sequence[str]]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_list(answers: Answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("answers=[] is not allowed: give at least one gold answer")
    return answers


def exact_match(prediction: str, answers: Answers, *, lenient: bool = False) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (lenient: contains/is
    contained in one, both non-empty), else 0.0."""
    p = normalize_answer(prediction)
    for a in _as_list(answers):
        g = normalize_answer(a)
        if p == g:
            return 1.0
        if lenient and p and g and (g in p or p in g):
            return 1.0
    return 0.0


def f1_score(prediction: str, answers: Answers) -> float:
    """SQuAD token F1 between the normalised prediction and the best normalised gold answer."""
    best = 0.0
    p_tokens = normalize_answer(prediction).split()
    for a in _as_list(answers):
        g_tokens = normalize_answer(a).split()
        if not p_tokens or not g_tokens:
            # Both empty counts as a match (the official script's behaviour for v2 no-answers).
            best = max(best, float(p_tokens == g_tokens))
            continue
        common = collections.Counter(p_tokens) & collections.Counter(g_tokens)
        same = sum(common.values())
        if same == 0:
            continue
        precision = same / len(p_tokens)
        recall = same / len(g_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_scores(predictions: Sequence[str], answers: Sequence[Answers], *,
                 lenient: bool = False) -> dict:
    """Mean EM and F1 (in [0, 1]) over paired predictions and gold answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"len(predictions)={len(predictions)} must equal "
                         f"len(answers)={len(answers)}")
    if not predictions:
        raise ValueError("predictions=[] is not allowed: nothing to score")
    em = [exact_match(p, a, lenient=lenient) for p, a in zip(predictions, answers)]
    f1 = [f1_score(p, a) for p, a in zip(predictions, answers)]
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1)), "count": len(predictions)}


def official_exact_match(prediction: str, gold: str) -> float:
    """MAC's official EM (module docstring): 1.0 if the normalised prediction, cut to the
    normalised gold's length in characters, equals the normalised gold."""
    g = normalize_answer(gold)
    return float(normalize_answer(prediction)[:len(g)] == g)


def official_f1(prediction: str, gold: str) -> float:
    """MAC's official F1: SQuAD token F1 against one gold, 0.0 without a common token (also when
    both sides are empty, unlike `f1_score`)."""
    p_tokens, g_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(p_tokens) & collections.Counter(g_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tokens), same / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def official_scores(predictions: Sequence[str], golds: Sequence[str]) -> dict:
    """Mean official EM and F1 (in [0, 1]) over paired predictions and single gold targets."""
    if len(predictions) != len(golds):
        raise ValueError(f"len(predictions)={len(predictions)} must equal len(golds)={len(golds)}")
    if not predictions:
        raise ValueError("predictions=[] is not allowed: nothing to score")
    for g in golds:
        if not isinstance(g, str):
            raise ValueError(f"gold={g!r} is not allowed; the official scores take one gold "
                             "string per question (the target answer)")
    em = [official_exact_match(p, g) for p, g in zip(predictions, golds)]
    f1 = [official_f1(p, g) for p, g in zip(predictions, golds)]
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1)), "count": len(predictions)}


def accuracy(predictions, targets, mask: Optional[np.ndarray] = None) -> float:
    """Fraction of positions where predictions == targets (over `mask`, if given)."""
    p, t = np.asarray(predictions), np.asarray(targets)
    if p.shape != t.shape:
        raise ValueError(f"predictions.shape={p.shape} must equal targets.shape={t.shape}")
    hit = (p == t).astype(np.float64)
    if mask is None:
        return float(hit.mean())
    m = np.broadcast_to(np.asarray(mask, bool), hit.shape)
    if not m.any():
        raise ValueError("mask selects no position")
    return float(hit[m].mean())


def digit_accuracy(predictions: Iterable[str], targets: Iterable[str]) -> float:
    """Fraction of target digits reproduced at the same position (passkey-style retrieval).

    A prediction shorter than its target counts the missing digits as wrong.
    """
    hit = total = 0
    for p, t in zip(predictions, targets):
        for i, ch in enumerate(t):
            total += 1
            hit += int(i < len(p) and p[i] == ch)
    if total == 0:
        raise ValueError("targets have no digits")
    return hit / total


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood) from a summed NLL (nats) and its token count."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens} must be positive")
    return float(math.exp(nll_sum / num_tokens))


def token_nll(logits, targets, mask=None) -> tuple[float, int]:
    """Summed NLL (nats) and count of logits [..., V] at integer targets [...] (over mask)."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets)
    m = logits.max(-1, keepdims=True)
    logz = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
    ll = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
    if mask is None:
        mask = np.ones(targets.shape, bool)
    mask = np.asarray(mask, bool)
    return float(-(ll * mask).sum()), int(mask.sum())
