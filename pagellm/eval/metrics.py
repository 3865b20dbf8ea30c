"""Ranking metrics of a page against a user's target items (binary relevance, per user).

Averaging over users is the caller's job; every function takes one page and one target.
"""

from __future__ import annotations

import math
from typing import Sequence


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
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(page[:k]) if item in target_set)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(target_set), k)))
    return dcg / ideal
