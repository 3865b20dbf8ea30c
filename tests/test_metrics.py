"""Metrics against hand-computed values, including the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagellm.eval.metrics import dpa, ild, mean_metrics, ndcg_at_k, page_metrics, pwkt, recall_at_k, was, wmrd

L2 = math.log2


def d(k):
    return 1 / L2(k + 1)


def test_recall_and_ndcg_by_hand():
    page, target = ["a", "x", "b", "y"], ["a", "b", "c"]
    assert recall_at_k(page, target, 2) == pytest.approx(1 / 3)
    assert recall_at_k(page, target, 20) == pytest.approx(2 / 3)  # page shorter than K
    assert ndcg_at_k(page, target, 100) == pytest.approx((d(1) + d(3)) / (d(1) + d(2) + d(3)))
    assert ndcg_at_k(page, target, 1) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], ["a"], 100) == pytest.approx(d(2) / d(1))  # target of one item
    assert recall_at_k([], target, 20) == 0 and ndcg_at_k([], target, 100) == 0  # empty page
    assert recall_at_k(page, [], 20) == 0 and ndcg_at_k(page, [], 100) == 0


def test_was_by_hand():
    assert was(["a", "b", "c"], ["a", "c", "b"]) == pytest.approx(d(1) / (d(1) + d(2) + d(3)))
    assert was(["a", "b"], ["a", "b", "c", "e"]) == pytest.approx(1.0)  # page shorter: its positions only
    assert was(["x", "a"], ["a"]) == 0.0  # target of one item, not at position 1
    assert was([], ["a"]) == 0.0


def test_pwkt_by_hand():
    assert pwkt(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert pwkt(["c", "b", "a"], ["a", "b", "c"]) == pytest.approx(-1.0)
    # page a c b (ranks 1 2 3): (a,c) +, (a,b) +, (c,b) -; weights 1+1/2, 1+1/3, 1/2+1/3
    w_ac, w_ab, w_cb = 1.5, 4 / 3, 5 / 6
    assert pwkt(["a", "c", "b"], ["a", "b", "c"]) == pytest.approx((w_ac + w_ab - w_cb) / (w_ac + w_ab + w_cb))
    # non-target items on the page keep their page ranks: x at rank 1 shifts the weights
    assert pwkt(["x", "b", "a"], ["a", "b"]) == pytest.approx(-1.0)
    assert pwkt(["a"], ["a"]) is None and pwkt([], ["a", "b"]) is None and pwkt(["a", "x"], ["a", "b"]) is None


def test_wmrd_by_hand():
    assert wmrd(["a", "b"], ["a", "b"]) == 0.0
    # page b x a; target a b: a page 3 vs 1 (w d1), b page 1 vs 2 (w d2)
    assert wmrd(["b", "x", "a"], ["a", "b"]) == pytest.approx((d(1) * 2 + d(2) * 1) / (d(1) + d(2)))
    assert wmrd(["x"], ["a"]) is None and wmrd([], ["a"]) is None


def test_dpa_by_hand():
    assert dpa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    # page b a; target a b c: a at 2 (k=1) -> 1/2, b at 1 (k=2) -> 1/2, c missing
    assert dpa(["b", "a"], ["a", "b", "c"]) == pytest.approx((d(1) / 2 + d(2) / 2) / (d(1) + d(2) + d(3)))
    assert dpa(["x", "y", "a"], ["a"]) == pytest.approx(1 / 3)  # target of one item at page rank 3
    assert dpa([], ["a"]) == 0.0 and dpa(["a"], []) == 0.0


def test_ild_and_entropy_by_hand():
    category = {"a": "g", "b": "g", "c": "k", "e": "m"}
    assert ild(["a", "b", "c"], category) == pytest.approx(2 / 3)  # ab same, ac, bc differ
    assert ild(["a", "c", "e"], category) == 1.0 and ild(["a", "b"], category) == 0.0
    assert ild(["a"], category) is None and ild([], category) is None
    m = page_metrics(["a", "b", "c"], ["c"], category)
    assert m["category_entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert page_metrics([], ["c"], category)["category_entropy"] == 0.0


def test_mean_skips_undefined_and_counts():
    category = {"a": "g", "b": "k", "c": "k"}
    rows = [page_metrics(["a", "b"], ["a", "b"], category), page_metrics(["c"], ["a"], category)]
    mean = mean_metrics(rows)
    assert mean["users"] == 2 and mean["defined"]["pwkt"] == 1 and mean["pwkt"] == pytest.approx(1.0)
    assert mean["ndcg@100"] == pytest.approx(0.5) and mean["defined"]["ndcg@100"] == 2
    assert mean["wmrd"] == 0.0 and mean["defined"]["wmrd"] == 1


def test_paired_bootstrap_interval_cancels_the_spread_users_share():
    from pagellm.eval.metrics import paired_bootstrap

    assert paired_bootstrap([0.25] * 50) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(1)
    user = rng.uniform(0, 1, 1000)  # how easy each user is: shared by both models
    a, b = user + 0.02 + rng.normal(0, 0.01, 1000), user + rng.normal(0, 0.01, 1000)
    mean, low, high = paired_bootstrap(a - b)
    assert low < 0.02 < high and low < mean < high and high - low < 0.003
    # an unpaired comparison of the same models cannot separate them: the user spread dominates
    unpaired_sd = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert 4 * 1.96 * unpaired_sd > 0.02 > high - low
    assert paired_bootstrap(a - b, seed=3) != paired_bootstrap(a - b, seed=4)
