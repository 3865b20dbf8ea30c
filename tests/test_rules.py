"""Unit and property tests of the per-user data rules (no Ray)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.config import DataConfig
from pagellm.data import rules
from pagellm.data.rules import TEST, TRAIN, VAL
from tests.output_checks import _clustered as is_clustered
from tests.output_checks import _kendall as kendall_distance

RATINGS = st.lists(st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]), min_size=0, max_size=60)


# ------------------------------------------------------------------------------------ split


@given(RATINGS)
@settings(max_examples=400, deadline=None)
def test_split_invariants(ratings):
    labels, reason = rules.split_user(np.array(ratings), [0.8, 0.1, 0.1], 3.0)
    positive = np.array(ratings) > 3
    splittable = len(ratings) >= 3 and (np.flatnonzero(positive) >= 1).sum() >= 2
    assert (labels is not None) == splittable, reason
    if labels is None:
        assert reason
        return
    assert len(labels) == len(ratings)
    assert np.all(np.diff(labels) >= 0), "train, then validation, then test"
    assert (labels == TRAIN).any()
    assert positive[labels == VAL].any() and positive[labels == TEST].any()


def test_split_nominal_sizes():
    labels, _ = rules.split_user(np.full(20, 5.0), [0.8, 0.1, 0.1], 3.0)
    assert Counter(labels.tolist()) == {TRAIN: 16, VAL: 2, TEST: 2}


def test_split_moves_back_to_latest_positive():
    # newest two interactions are negative: test starts at the latest positive (index 7)
    ratings = np.array([5, 5, 5, 5, 5, 4, 5, 4, 2, 1], dtype=float)
    labels, _ = rules.split_user(ratings, [0.8, 0.1, 0.1], 3.0)
    assert labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 2, 2]


def test_split_tightest_fallback_and_drop_reasons():
    labels, _ = rules.split_user(np.array([5, 1, 1, 1, 1, 1, 1, 1, 5, 5], float), [0.8, 0.1, 0.1], 3.0)
    assert labels.tolist() == [0] * 8 + [1, 2]
    assert rules.split_user(np.array([5, 5], float), [0.8, 0.1, 0.1], 3.0) == (None, "fewer_than_3_interactions")
    labels, reason = rules.split_user(np.array([5, 5, 2, 1], float), [0.8, 0.1, 0.1], 3.0)
    assert labels is None and reason == "fewer_than_2_positives_to_hold_out"


# ------------------------------------------------------------------------------ golden list

CATS = st.sampled_from(list("ABCDE"))


@st.composite
def ranked_candidates(draw):
    n = draw(st.integers(0, 40))
    category = {f"i{k}": draw(CATS) for k in range(n)}
    return list(category), category


@given(ranked_candidates(), st.sampled_from([0.2, 0.25, 0.4, 0.5, 1.0]), st.integers(1, 25))
@settings(max_examples=300, deadline=None)
def test_golden_list_invariants(cands, cap, max_items):
    ranked, category = cands
    golden, capped = rules.golden_list(ranked, category, cap, max_items)
    assert bool(golden) == bool(ranked)
    assert len(golden) <= max_items and len(set(golden)) == len(golden)
    # a subsequence of the golden-rule order
    positions = [ranked.index(i) for i in golden]
    assert positions == sorted(positions)
    limit = math.ceil(cap * len(golden) - 1e-9) if golden else 0
    assert all(c <= limit for c in Counter(category[i] for i in golden).values())
    # capped = what the cap removed from the uncapped list (the first max_items candidates)
    top = ranked[: min(max_items, len(ranked))]
    assert capped == [i for i in top if i not in set(golden)]
    # K is the longest feasible length
    counts = Counter(category[i] for i in ranked)
    for k in range(len(golden) + 1, min(max_items, len(ranked)) + 1):
        assert sum(min(c, rules.category_cap(cap, k)) for c in counts.values()) < k


def test_golden_list_worked_example():
    ranked = ["a1", "a2", "a3", "b1", "a4", "c1", "b2"]
    category = {i: i[0] for i in ranked}
    golden, capped = rules.golden_list(ranked, category, 0.4, 5)
    # K=5 -> cap ceil(2.0)=2 per category: a1 a2 (a3 capped) b1 (a4 capped) c1 b2
    assert golden == ["a1", "a2", "b1", "c1", "b2"]
    assert capped == ["a3", "a4"]


def test_golden_order_breaks_rating_ties_by_item_mean():
    ctx = rules.ItemContext(category={}, popularity_score={"x": 4.1, "y": 4.8, "z": 3.0}, mean_rating=4.0)
    order = rules.golden_order(["x", "y", "z", "w"], [5.0, 5.0, 5.0, 4.0], ctx)
    assert [["x", "y", "z", "w"][k] for k in order] == ["y", "x", "z", "w"]


# --------------------------------------------------------------------------------- families


@st.composite
def golden_and_catalogue(draw):
    k = draw(st.integers(1, 15))
    golden = [f"g{j}" for j in range(k)]
    category = {g: draw(CATS) for g in golden}
    pool = {c: [f"p{c}{j}" for j in range(draw(st.integers(0, 8)))] for c in "ABCDE"}
    for c, members in pool.items():
        category.update({m: c for m in members})
    return golden, category, pool


@given(golden_and_catalogue(), st.integers(1, 5), st.integers(0, 2**16))
@settings(max_examples=300, deadline=None)
def test_ranking_negative(data, swaps, seed):
    golden, category, _ = data
    key = {g: (5.0, float(j % 3)) for j, g in enumerate(golden)}
    rk = rules.ranking_negative(golden, key, swaps, np.random.default_rng(seed))
    if len(golden) < 2:
        assert rk is None
        return
    assert sorted(rk) == sorted(golden) and rk != golden
    assert kendall_distance(rk, golden) == min(swaps, len(golden) - 1)


@given(golden_and_catalogue(), st.integers(0, 2**16))
@settings(max_examples=300, deadline=None)
def test_diversity_negative(data, seed):
    golden, category, pool = data
    ctx = rules.ItemContext(category=category, popularity_score={}, mean_rating=4.0, by_category=pool)
    exclude = {m for members in pool.values() for m in members[:1]}  # items the user has seen
    d, reason = rules.diversity_negative(golden, ctx, exclude, np.random.default_rng(seed))
    if len({category[g] for g in golden}) < 2:
        assert d is None and reason == "single_category_golden"
        return
    if d is None:
        assert reason == "no_unused_items_in_category"
        return
    assert len(d) == len(golden) and len(set(d)) == len(d)
    new = [i for i in d if i not in golden]
    assert new and not set(new) & exclude
    assert len({category[i] for i in new}) == 1
    assert rules.category_entropy(d, category) < rules.category_entropy(golden, category)


@given(st.integers(1, 12), st.integers(0, 40), st.integers(0, 2**16))
@settings(max_examples=300, deadline=None)
def test_popularity_matched_negative(k, n_other, seed):
    rng = np.random.default_rng(seed)
    by_count = [f"i{j}" for j in rng.permutation(k + n_other)]  # the catalogue, most rated first
    golden = list(rng.choice(by_count, size=k, replace=False))
    exclude = set(rng.choice(by_count, size=n_other // 3, replace=False)) - set(golden)
    ctx = rules.ItemContext(category={}, popularity_score={}, mean_rating=4.0, by_count=by_count)
    pm, reason = rules.popularity_matched_negative(golden, ctx, exclude, np.random.default_rng(seed))
    unused = [i for i in by_count if i not in set(golden) | exclude]
    if len(unused) < k:
        assert pm is None and reason == "no_unused_items"
        return
    assert len(pm) == k and len(set(pm)) == k and not set(pm) & (set(golden) | exclude)
    rank, taken = ctx.count_rank, set(golden) | exclude
    for g, r in zip(golden, pm):  # fewer than 3 unused items strictly closer in popularity
        assert sum(abs(rank[i] - rank[g]) < abs(rank[r] - rank[g]) for i in by_count if i not in taken) < 3
        taken.add(r)


@given(golden_and_catalogue())
@settings(max_examples=300, deadline=None)
def test_redundancy_negative(data):
    golden, category, _ = data
    rd = rules.redundancy_negative(golden, category)
    if is_clustered(golden, category):
        assert rd is None
        return
    assert sorted(rd) == sorted(golden) and rd != golden
    assert is_clustered(rd, category)


def test_non_preferred_list():
    assert rules.non_preferred_list([], 3) is None
    assert rules.non_preferred_list(["a", "b", "c", "d"], 2) == ["a", "b"]


# ------------------------------------------------------------------------------ one user


@st.composite
def user_history(draw):
    n = draw(st.integers(3, 50))
    items = [f"i{k}" for k in draw(st.permutations(range(60)))[:n]]
    ratings = np.array(draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]), min_size=n, max_size=n)))
    return items, ratings


@given(
    user_history(), st.integers(1, 8), st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from(["future", "outside_prompt"])
)
@settings(max_examples=200, deadline=None)
def test_build_user_reads_training_only(history, prompt_max, golden_fraction, candidates):
    items, ratings = history
    labels, _ = rules.split_user(ratings, [0.8, 0.1, 0.1], 3.0)
    if labels is None:
        return
    catalogue = [f"i{k}" for k in range(60)]
    category = {i: "ABC"[int(i[1:]) % 3] for i in catalogue}
    ctx = rules.ItemContext(
        category=category,
        popularity_score={i: 3.0 + (int(i[1:]) % 7) / 3 for i in catalogue},
        mean_rating=4.0,
        by_category={c: [i for i in catalogue if category[i] == c] for c in "ABC"},
        by_count=catalogue,
    )
    cfg = DataConfig(
        prompt_max_items=prompt_max,
        golden_fraction=golden_fraction,
        extra_ft_fractions=[0.2, 0.9],
        golden_candidates=candidates,
    )
    rec = rules.build_user("u1", items, ratings, labels, ctx, cfg)
    ordered = [i for i, r, lab in zip(items, ratings, labels) if lab == TRAIN and r > 3]  # time order
    train_pos, when = set(ordered), {i: k for k, i in enumerate(ordered)}
    held_out = {i for i, lab in zip(items, labels) if lab != TRAIN}
    assert set(rec.prompt) <= train_pos and len(rec.prompt) <= prompt_max
    assert set(rec.golden) <= train_pos - set(rec.prompt)
    # the main window: the newest golden_fraction of P held back; kept only with a history
    cut = len(ordered) - min(cfg.golden_max_items, max(1, math.ceil(golden_fraction * len(ordered))))
    assert bool(rec.golden) == (cut >= 1) and (rec.skipped.get("ft") == "empty_history") == (
        0 < len(ordered) and cut < 1
    )
    windows = [(rec.prompt, rec.golden), *rec.extra_ft]
    assert len({(tuple(p), tuple(g)) for p, g in windows}) == len(windows)
    for prompt, golden in [w for w in windows if w[1]]:
        assert prompt and set(prompt) <= train_pos and set(golden) <= train_pos - set(prompt)
        if candidates == "future":  # never an item older than the prompt's newest
            assert min(when[i] for i in golden) > max(when[i] for i in prompt)
    for prompt, golden in rec.extra_ft:
        assert golden
    for family, rejected in rec.pairs.items():
        assert not set(rejected) & held_out, family
    assert set(rec.pairs) | {f for f in rec.skipped if f != "ft"} == set(cfg.pair_families) == set(rules.FAMILIES)
    disliked = {i for i, r, lab in zip(items, ratings, labels) if lab == TRAIN and r < 3}
    if "np" in rec.pairs:
        assert set(rec.pairs["np"]) <= disliked
    else:
        assert not disliked or not rec.golden
    # evaluation targets: held-out positives; prompts never contain the target
    val_pos = {i for i, r, lab in zip(items, ratings, labels) if lab == VAL and r > 3}
    test_pos = {i for i, r, lab in zip(items, ratings, labels) if lab == TEST and r > 3}
    assert set(rec.val_target) == val_pos and set(rec.test_target) == test_pos
    assert not set(rec.val_prompt) & (val_pos | test_pos)
    assert not set(rec.test_prompt) & test_pos
    assert set(rec.val_prompt) <= train_pos


def test_outside_prompt_candidates_reach_back_and_empty_histories_are_opt_in():
    """The paper's rule (outside_prompt) takes positives older than a short prompt window into
    the golden list; the future rule never does; empty-history windows only when asked."""
    items = [f"i{k}" for k in range(10)]
    ratings = np.array([5.0] * 10)
    labels = np.array([TRAIN] * 8 + [VAL, TEST])
    ctx = rules.ItemContext(category={i: "A" for i in items}, popularity_score={}, mean_rating=4.0)
    make = lambda **kw: DataConfig(prompt_max_items=2, category_cap=1.0, **kw)  # noqa: E731
    future = rules.build_user("u", items, ratings, labels, ctx, make())
    paper = rules.build_user("u", items, ratings, labels, ctx, make(golden_candidates="outside_prompt"))
    assert future.prompt == paper.prompt == ["i2", "i3"]
    assert set(future.golden) == {"i4", "i5", "i6", "i7"}
    assert set(paper.golden) == {"i0", "i1", "i4", "i5", "i6", "i7"}
    one = np.array([TRAIN, VAL, TEST])
    assert rules.build_user("u", items[:3], ratings[:3], one, ctx, make()).skipped["ft"] == "empty_history"
    kept = rules.build_user("u", items[:3], ratings[:3], one, ctx, make(empty_history_windows=True))
    assert kept.prompt == [] and kept.golden == ["i0"]


def test_user_rng_is_per_user_and_seeded():
    a = rules.user_rng(0, "u1").random(3)
    assert np.array_equal(a, rules.user_rng(0, "u1").random(3))
    assert not np.array_equal(a, rules.user_rng(0, "u2").random(3))
    assert not np.array_equal(a, rules.user_rng(1, "u1").random(3))


@pytest.mark.parametrize("items,expected", [([], 0.0), (["a"], 0.0), (["a", "b"], math.log(2))])
def test_category_entropy(items, expected):
    assert rules.category_entropy(items, {"a": "A", "b": "B"}) == pytest.approx(expected)
