"""Metrics on hand-checked cases (SQuAD v1.1 normalisation, EM, F1, lenient EM, perplexity)."""
import math

import numpy as np
import pytest

from eval import metrics


def test_normalize_answer():
    assert metrics.normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert metrics.normalize_answer("An apple, a pear") == "apple pear"
    assert metrics.normalize_answer("THEATRE") == "theatre"   # articles only as whole words


def test_exact_match():
    assert metrics.exact_match("the Beatles", "Beatles") == 1.0
    assert metrics.exact_match("Beatles.", ["Rolling Stones", "beatles"]) == 1.0
    assert metrics.exact_match("The Beatles band", "Beatles") == 0.0
    # Lenient (MAC's official code): containment either way, never the empty string.
    assert metrics.exact_match("The Beatles band", "Beatles", lenient=True) == 1.0
    assert metrics.exact_match("Beat", "Beatles", lenient=True) == 1.0
    assert metrics.exact_match("", "Beatles", lenient=True) == 0.0


def test_f1_hand_checked():
    # pred tokens {new, york, city}, gold {new, york}: P = 2/3, R = 1, F1 = 0.8.
    assert metrics.f1_score("New York City", "new york") == pytest.approx(0.8)
    # pred {paris}, gold {paris, france}: P = 1, R = 1/2, F1 = 2/3; best of several golds.
    assert metrics.f1_score("Paris", ["Paris France", "Lyon"]) == pytest.approx(2 / 3)
    assert metrics.f1_score("Paris", ["Paris France", "paris"]) == 1.0
    assert metrics.f1_score("Oslo", "Lima") == 0.0
    # repeated tokens count with multiplicity: pred {a1 a1 b}, gold {a1 b b}: common 2.
    assert metrics.f1_score("x x y", "x y y") == pytest.approx(2 / 3)


def test_squad_scores_means():
    s = metrics.squad_scores(["Oslo", "New York City", "no"], ["Oslo", "New York", "yes"])
    assert s["em"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert s["count"] == 3
    with pytest.raises(ValueError, match="len"):
        metrics.squad_scores(["a"], ["a", "b"])


def test_accuracy_digit_accuracy_perplexity():
    assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert metrics.accuracy([[1, 2], [3, 4]], [[1, 0], [0, 4]], mask=[[1, 1], [0, 1]]) == \
        pytest.approx(2 / 3)
    assert metrics.digit_accuracy(["1234", "98"], ["1244", "987"]) == pytest.approx(5 / 7)
    assert metrics.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    nll, n = metrics.token_nll(logits, np.array([0, 2]))
    assert n == 2 and nll == pytest.approx(-math.log(0.5) - math.log(0.8))
    with pytest.raises(ValueError, match="num_tokens"):
        metrics.perplexity(1.0, 0)
