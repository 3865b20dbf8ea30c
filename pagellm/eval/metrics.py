"""Metrics of one generated page against one user's target list (docs/metrics.md).

The target is the user's held-out positives in golden-rule order (rating, then s_i), so it is a
ranked list. Relevance is binary (an item is relevant when it is in the target). Every function
scores one page; ``page_metrics`` gathers them and the caller averages over users. Metrics that
are undefined for a page (fewer than two common items for PWKT, none for WMRD, fewer than two
items for ILD) return None and are averaged over the users where they are defined.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Optional, Sequence

import numpy as np

from pagellm.data.rules import category_entropy

# what reports show, in this order (``page_metrics`` computes each for one page)
METRICS = ("recall@20", "recall@40", "ndcg@100", "was", "pwkt", "wmrd", "dpa", "ild", "category_entropy")


def _discount(rank: int) -> float:
    """1 / log2(rank + 1) for a 1-based rank (the DCG discount)."""
    return 1.0 / math.log2(rank + 1)


def recall_at_k(page: Sequence, target: Sequence, k: int) -> float:
    """|top-k of page in target| / |target|; 0 for an empty target."""
    target_set = set(target)
    if not target_set:
        return 0.0
    return len(set(page[:k]) & target_set) / len(target_set)


def ndcg_at_k(page: Sequence, target: Sequence, k: int) -> float:
    """DCG of the top-k (gain 1 / log2(rank + 1) for each target item) over the ideal DCG
    (all min(|target|, k) target items first); 0 for an empty target."""
    target_set = set(target)
    if not target_set:
        return 0.0
    dcg = sum(_discount(rank) for rank, item in enumerate(page[:k], start=1) if item in target_set)
    ideal = sum(_discount(rank) for rank in range(1, min(len(target_set), k) + 1))
    return dcg / ideal


def was(page: Sequence, target: Sequence) -> float:
    """Weighted Alignment Score: the DCG-discounted share of positions where the page holds
    exactly the target's item, sum_k d_k [p_k = t_k] / sum_{k <= min(|P|, |T|)} d_k, d_k = 1/log2(k+1).
    0 for an empty page or target."""
    n = min(len(page), len(target))
    if n == 0:
        return 0.0
    hits = sum(_discount(k) for k in range(1, n + 1) if page[k - 1] == target[k - 1])
    return hits / sum(_discount(k) for k in range(1, n + 1))


def pwkt(page: Sequence, target: Sequence) -> Optional[float]:
    """Position-Weighted Kendall Tau over the items common to page and target: each pair is +1
    when page and target order it alike, -1 otherwise, weighted by 1/r_i + 1/r_j with r the page
    ranks (the additive hyperbolic weight of Vigna, 2015), so disagreements near the top weigh
    more. In [-1, 1]; None with fewer than two common items."""
    target_rank = {item: r for r, item in enumerate(target, start=1)}
    common = [(r, target_rank[item]) for r, item in enumerate(page, start=1) if item in target_rank]
    if len(common) < 2:
        return None
    num = den = 0.0
    for (pi, ti), (pj, tj) in combinations(common, 2):
        weight = 1.0 / pi + 1.0 / pj
        num += weight * (1.0 if (pi - pj) * (ti - tj) > 0 else -1.0)
        den += weight
    return num / den


def wmrd(page: Sequence, target: Sequence) -> Optional[float]:
    """Weighted Mean Rank Difference: over common items, |page rank - target rank| averaged with
    weights 1/log2(target rank + 1) (misplacing a top target item costs more). 0 is perfect;
    None when no target item is on the page."""
    page_rank = {item: r for r, item in enumerate(page, start=1)}
    pairs = [(page_rank[item], r) for r, item in enumerate(target, start=1) if item in page_rank]
    if not pairs:
        return None
    weights = [_discount(t) for _, t in pairs]
    return sum(w * abs(p - t) for w, (p, t) in zip(weights, pairs)) / sum(weights)


def dpa(page: Sequence, target: Sequence) -> float:
    """Discounted Positional Accuracy: each target item t_k earns 1 / (1 + |page rank - k|) when
    it is on the page (1 at its exact position), discounted by 1/log2(k + 1) and normalised by
    the sum of those discounts. In [0, 1]; 0 for an empty page or target."""
    if not target:
        return 0.0
    page_rank = {item: r for r, item in enumerate(page, start=1)}
    credit = sum(
        _discount(k) / (1 + abs(page_rank[item] - k)) for k, item in enumerate(target, start=1) if item in page_rank
    )
    return credit / sum(_discount(k) for k in range(1, len(target) + 1))


def ild(page: Sequence, category: Mapping[str, str]) -> Optional[float]:
    """Intra-List Diversity (Ziegler et al., 2005): mean pairwise dissimilarity of the page's
    items, with dissimilarity 1 when two items' categories differ and 0 when they match (the
    item representation is the category; MovieLens: the first genre). None below two items."""
    if len(page) < 2:
        return None
    pairs = list(combinations(page, 2))
    return sum(category[a] != category[b] for a, b in pairs) / len(pairs)


def page_metrics(page: Sequence, target: Sequence, category: Mapping[str, str]) -> dict:
    """Every metric of one page (keys as in ``pagellm evaluate``'s metrics.json)."""
    return {
        "recall@20": recall_at_k(page, target, 20),
        "recall@40": recall_at_k(page, target, 40),
        "ndcg@100": ndcg_at_k(page, target, 100),
        "was": was(page, target),
        "pwkt": pwkt(page, target),
        "wmrd": wmrd(page, target),
        "dpa": dpa(page, target),
        "ild": ild(page, category),
        "category_entropy": category_entropy(list(page), category),  # nats; 0 for an empty page
    }


def mean_metrics(rows: list[dict]) -> dict:
    """Average over users; a metric undefined for a user (None) is left out of its mean, and
    ``defined`` counts the users behind each mean."""
    keys = rows[0].keys() if rows else []
    out, defined = {}, {}
    for key in keys:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
        defined[key] = len(values)
    out["users"] = len(rows)
    out["defined"] = defined
    return out


def paired_bootstrap(
    differences: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of per-user differences between two models on the same users, and its percentile
    bootstrap interval at ``level``: users are resampled with replacement, both models together,
    so the spread that users share cancels (Efron & Tibshirani 1993, paired design)."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(low), float(high)
