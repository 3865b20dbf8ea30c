"""The data rules of PageLLM, one user at a time (paper sections 4.2.2-4.2.4 and 5.1.1).

Pure Python/numpy with no Ray: the Ray Data pipeline and the single-process reference both
call these functions, so the two are the same computation by construction. Every function
states the invariant it guarantees; ``tests/test_rules.py`` checks each one.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Optional, Sequence

import numpy as np

from pagellm.config import PAIR_FAMILIES as FAMILIES

TRAIN, VAL, TEST = 0, 1, 2
WITHHELD = 3  # a training interaction left out by the cold-start simulation (data.train_keep)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def chronological_order(items: Sequence[str], ts: Sequence[int]) -> np.ndarray:
    """Indices sorting one user's interactions by time; equal times fall back to item id so
    that the order (and hence the split) never depends on file order."""
    return np.array(sorted(range(len(items)), key=lambda k: (ts[k], items[k])), dtype=np.int64)


def split_user(
    ratings: np.ndarray, fractions: Sequence[float], positive_threshold: float
) -> tuple[Optional[np.ndarray], str]:
    """Per-user chronological train/validation/test split (section 5.1.1).

    ``ratings`` are in chronological order. Returns ``(labels, "")`` with labels TRAIN, VAL,
    TEST, or ``(None, reason)`` if the user cannot be split.

    Nominal sizes are round(n * fraction), at least 1, for validation and test. When the
    newest interactions of a part hold no positive, the part starts earlier, at the latest
    positive; if that leaves no training interaction, the tightest split is used: test from
    the last positive, validation from the one before. Invariants: labels are non-decreasing
    in time (train, validation, test, each contiguous); train is non-empty; validation and
    test each hold at least one positive (r > positive_threshold). A user is kept exactly when
    such a split exists: >= 3 interactions and >= 2 positives after the first interaction.
    """
    n = len(ratings)
    if n < 3:
        return None, "fewer_than_3_interactions"
    positive = np.asarray(ratings) > positive_threshold
    pos = np.flatnonzero(positive)
    if (pos >= 1).sum() < 2:
        return None, "fewer_than_2_positives_to_hold_out"
    test_start = n - max(1, round_half_up(n * fractions[2]))
    if not positive[test_start:].any():
        test_start = int(pos[-1])
    val_start = test_start - max(1, round_half_up(n * fractions[1]))
    if val_start < 0 or not positive[val_start:test_start].any():
        before = pos[pos < max(val_start, 0)]
        val_start = int(before[-1]) if len(before) else -1
    if val_start < 1:  # no room for training: fall back to the tightest valid split
        test_start, val_start = int(pos[-1]), int(pos[-2])
    labels = np.full(n, TRAIN, dtype=np.int8)
    labels[val_start:test_start] = VAL
    labels[test_start:] = TEST
    return labels, ""


@dataclass
class ItemContext:
    """Catalogue facts shared by all users, computed from training interactions only."""

    category: Mapping[str, str]
    popularity_score: Mapping[str, float]  # s_i, eq. 6: mean training rating of item i
    mean_rating: float  # s_i for items with no training rating (held-out-only items)
    # items of each category, most rated in training first (the d family draws from these)
    by_category: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # every item with a training rating, most rated first, then by id (the pm family matches in it)
    by_count: Sequence[str] = ()

    def s(self, item: str) -> float:
        return self.popularity_score.get(item, self.mean_rating)

    @cached_property
    def count_rank(self) -> dict[str, int]:
        return {item: r for r, item in enumerate(self.by_count)}


def golden_order(items: Sequence[str], ratings: Sequence[float], ctx: ItemContext) -> list[int]:
    """Indices in golden-rule order (section 4.2.3): rating descending, ties by s_i descending,
    then by item id so the order is total."""
    return sorted(range(len(items)), key=lambda k: (-ratings[k], -ctx.s(items[k]), items[k]))


def category_cap(cap: float, k: int) -> int:
    """Most items any one category may hold in a list of k items: ceil(lambda * k)."""
    return max(1, math.ceil(cap * k - 1e-9))


def golden_list(
    ranked: Sequence[str], category: Mapping[str, str], cap: float, max_items: int
) -> tuple[list[str], list[str]]:
    """Golden list of section 4.2.3 from candidates already in golden-rule order.

    Picks the longest K <= max_items for which the candidates, taken in order and skipping an
    item whose category already holds ceil(cap * K) items, fill K slots. Returns
    ``(golden, capped)`` where ``capped`` are the items of the uncapped list (the first
    max_items candidates) that the cap removed, by skipping them or by shortening the list.

    Invariants: golden is a subsequence of ``ranked`` (so it keeps the golden-rule order and
    has no repeats); no category holds more than ceil(cap * len(golden)) items; it is
    non-empty whenever ``ranked`` is. What happens to capped items: they are left out of the
    golden list and out of every pair (the paper filters "redundant items from over-represented
    categories"); they stay in the user's training interactions, so meta pre-training still
    sees them, and their number is reported in stats.json (``golden_items_capped``).
    """
    counts = Counter(category[i] for i in ranked)
    for k in range(min(max_items, len(ranked)), 0, -1):
        limit = category_cap(cap, k)
        if sum(min(c, limit) for c in counts.values()) < k:
            continue
        golden, held = [], Counter()
        for item in ranked:
            if len(golden) == k:
                break
            if held[category[item]] < limit:
                held[category[item]] += 1
                golden.append(item)
        chosen = set(golden)
        return golden, [i for i in ranked[: min(max_items, len(ranked))] if i not in chosen]
    return [], []


def category_entropy(items: Sequence[str], category: Mapping[str, str]) -> float:
    """Shannon entropy (nats) of the category distribution of a list; 0 for an empty list."""
    if not items:
        return 0.0
    p = np.array(list(Counter(category[i] for i in items).values()), dtype=float) / len(items)
    return float(-(p * np.log(p)).sum())


def non_preferred_list(disliked_ranked: Sequence[str], length: int) -> Optional[list[str]]:
    """``np`` family: items this user rated below the negative threshold in training.

    Takes up to ``length`` (the golden list's length) of them, in golden-rule order.
    Invariants: non-empty; every item was rated < 3 (negative_threshold) by this user in
    training; no repeats; no item of the golden list. Returns None for a user with no such
    rating: that user gets no np pair (counted as ``np: no_disliked_items`` in stats.json).
    """
    if not disliked_ranked:
        return None
    return list(disliked_ranked[:length])


def ranking_negative(
    golden: Sequence[str], key: Mapping[str, tuple], swaps: int, rng: np.random.Generator
) -> Optional[list[str]]:
    """``rk`` family: the golden list after ``min(swaps, K-1)`` adjacent swaps at distinct
    positions, preferring positions whose two items differ in golden-rule key (rating, s_i),
    so the swap really breaks the order.

    Invariants: same items, different order; the Kendall-tau distance to the golden list is
    exactly the number of swaps (distinct adjacent transpositions never cancel). None if K < 2.
    """
    k = len(golden)
    if k < 2:
        return None
    n_swaps = min(swaps, k - 1)
    informative = [p for p in range(k - 1) if key[golden[p]] != key[golden[p + 1]]]
    rest = [p for p in range(k - 1) if p not in set(informative)]
    picks = list(rng.permutation(informative))[:n_swaps]
    picks += list(rng.permutation(rest))[: n_swaps - len(picks)]
    out = list(golden)
    for p in picks:
        out[p], out[p + 1] = out[p + 1], out[p]
    return out


def diversity_negative(
    golden: Sequence[str], ctx: ItemContext, exclude: set, rng: np.random.Generator
) -> tuple[Optional[list[str]], str]:
    """``d`` family: the items outside the golden list's dominant category are replaced, in
    place, by other items of that category (the page becomes homogeneous).

    The dominant category is the golden list's most frequent one (ties: the best-ranked).
    Replacements are drawn, without repeats, from that category's most-rated training items,
    never from ``exclude`` (every item this user interacted with in any split, so no held-out
    item leaks into training data). Invariants: same length; each replaced position now holds
    an item of the dominant category that the user never interacted with; category entropy is
    strictly lower than the golden list's. Returns ``(None, reason)`` when the golden list has a
    single category or the category has no unused item.
    """
    cats = [ctx.category[i] for i in golden]
    counts = Counter(cats)
    if len(counts) < 2:
        return None, "single_category_golden"
    top = max(counts.values())
    dominant = next(c for c in cats if counts[c] == top)
    slots = [p for p, c in enumerate(cats) if c != dominant]
    taken = set(golden) | exclude
    pool = []
    for item in ctx.by_category.get(dominant, ()):  # most-rated first; stop once choice is ample
        if item not in taken:
            pool.append(item)
            if len(pool) >= 3 * len(slots) + 10:
                break
    if not pool:
        return None, "no_unused_items_in_category"
    chosen = rng.choice(len(pool), size=min(len(slots), len(pool)), replace=False)
    out = list(golden)
    for p, j in zip(slots, chosen):
        out[p] = pool[j]
    return out, ""


def redundancy_negative(golden: Sequence[str], category: Mapping[str, str]) -> Optional[list[str]]:
    """``rd`` family: the golden items regrouped so that same-category items are contiguous
    (categories in order of first appearance, items in golden order within a category).

    Invariants: same items, different order; every category occupies one contiguous run.
    None when the golden list is already clustered that way (nothing to corrupt).
    """
    groups: dict[str, list[str]] = {}
    for item in golden:
        groups.setdefault(category[item], []).append(item)
    out = [item for members in groups.values() for item in members]
    return None if out == list(golden) else out


def popularity_matched_negative(
    golden: Sequence[str], ctx: ItemContext, exclude: set, rng: np.random.Generator, nearest: int = 3
) -> tuple[Optional[list[str]], str]:
    """``pm`` family (ours, not the paper's): each golden item replaced, in place, by one of the
    ``nearest`` unused items closest to it in training popularity rank (``ctx.by_count``).

    The rejected page is as popular as the golden one and keeps its length, so only the user's
    history can tell them apart: the contrast a reward needs to prefer relevant pages to popular
    ones (np/rk/d/rd never ask it). Unused: not in the golden list, not in ``exclude`` (every
    item the user interacted with, in any split) and not picked before. Invariants: same length,
    no repeats, no item of the golden list or of ``exclude``; at each position fewer than
    ``nearest`` unused items are strictly closer in rank than the one chosen. ``(None, reason)``
    when the catalogue has no unused item left.
    """
    order, rank = ctx.by_count, ctx.count_rank
    taken = set(golden) | set(exclude)
    out = []
    for item in golden:
        r = rank.get(item, len(order))
        near: list[str] = []
        for d in range(len(order) + 1):
            if len(near) >= nearest or (r - d < 0 and r + d >= len(order)):
                break
            near += [order[j] for j in sorted({r - d, r + d}) if 0 <= j < len(order) and order[j] not in taken]
        if not near:
            return None, "no_unused_items"
        pick = near[int(rng.integers(len(near)))]
        taken.add(pick)
        out.append(pick)
    return out, ""


def user_rng(seed: int, user_id: str, *stream: int) -> np.random.Generator:
    """A generator that depends only on the seed and the user (and ``stream``, for a draw that
    must not shift the others), so outputs do not depend on how users are partitioned."""
    return np.random.default_rng([seed, zlib.crc32(user_id.encode()), *stream])


def withhold_training(labels: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """Cold start (section 5.6): relabel all but a random ``round(keep * n)`` (at least one) of
    the user's ``n`` training interactions WITHHELD; validation and test labels are untouched."""
    labels = np.array(labels, copy=True)
    train = np.flatnonzero(labels == TRAIN)
    n_keep = max(1, round_half_up(keep * len(train)))
    if n_keep < len(train):
        labels[np.sort(rng.choice(train, size=len(train) - n_keep, replace=False))] = WITHHELD
    return labels


@dataclass
class UserRecords:
    """Everything the pipeline writes for one user."""

    prompt: list[str] = field(default_factory=list)
    golden: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    extra_ft: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (prompt, golden)
    pairs: dict[str, list[str]] = field(default_factory=dict)  # family -> rejected list
    # (prompt, golden, {family: rejected}) of the extra windows (pairs_from_extra_windows)
    extra_pairs: list[tuple[list[str], list[str], dict[str, list[str]]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # family (or "ft") -> reason
    val_prompt: list[str] = field(default_factory=list)
    val_target: list[str] = field(default_factory=list)
    test_prompt: list[str] = field(default_factory=list)
    test_target: list[str] = field(default_factory=list)


def build_user(
    user_id: str,
    items: Sequence[str],
    ratings: np.ndarray,
    labels: np.ndarray,
    ctx: ItemContext,
    cfg,
) -> UserRecords:
    """Prompt, golden list, the four negatives and the evaluation targets of one user.

    ``items``/``ratings``/``labels`` are the user's interactions in chronological order with
    their split labels; ``cfg`` is a DataConfig. Training data (prompt, golden list, pairs)
    reads TRAIN interactions only. The prompt is the newest training positives before the
    newest ``golden_fraction`` of them (at most prompt_max_items); the golden candidates are
    the held-back positives after the prompt (``golden_candidates: future``) or all training
    positives not in the prompt (``outside_prompt``, section 4.2.3 step 1). A window with an
    empty prompt is kept only with ``empty_history_windows``. ``extra_ft_fractions`` add more
    (prompt, golden list) windows of the same user for fine-tuning only.
    """
    ratings = np.asarray(ratings, dtype=float)
    labels = np.asarray(labels)
    positive = ratings > cfg.positive_threshold
    train_pos = [items[k] for k in np.flatnonzero((labels == TRAIN) & positive)]
    out = UserRecords()

    def window(fraction: float) -> tuple[list[str], list[str], list[str]]:
        """(prompt, golden, capped) when the newest ``fraction`` of P is held back."""
        n_target = min(cfg.golden_max_items, max(1, math.ceil(fraction * len(train_pos))))
        cut = len(train_pos) - n_target
        prompt = train_pos[max(0, cut - cfg.prompt_max_items) : cut]
        in_prompt = set(prompt)
        if cfg.golden_candidates == "future":
            cand = list(pos_idx[cut:])
        else:
            cand = [k for k in pos_idx if items[k] not in in_prompt]
        order = golden_order([items[k] for k in cand], [ratings[k] for k in cand], ctx)
        golden, capped = golden_list(
            [items[cand[j]] for j in order], ctx.category, cfg.category_cap, cfg.golden_max_items
        )
        return prompt, golden, capped

    pos_idx = np.flatnonzero((labels == TRAIN) & positive)
    if train_pos:
        prompt, golden, capped = window(cfg.golden_fraction)
        if prompt or cfg.empty_history_windows:
            out.prompt, out.golden, out.capped = prompt, golden, capped
        else:
            out.skipped["ft"] = "empty_history"
        seen = {(tuple(out.prompt), tuple(out.golden))}
        for fraction in cfg.extra_ft_fractions:
            prompt, golden, _ = window(fraction)
            if (prompt or cfg.empty_history_windows) and (tuple(prompt), tuple(golden)) not in seen:
                seen.add((tuple(prompt), tuple(golden)))
                out.extra_ft.append((prompt, golden))
    else:
        out.skipped["ft"] = "no_training_positives"

    if out.golden:
        rng, pm_rng = user_rng(cfg.seed, user_id), user_rng(cfg.seed, user_id, 2)
        rating_of = {items[k]: ratings[k] for k in np.flatnonzero(labels == TRAIN)}
        interacted = {items[k] for k in np.flatnonzero(labels != WITHHELD)}
        disliked = [items[k] for k in np.flatnonzero((labels == TRAIN) & (ratings < cfg.negative_threshold))]
        disliked = [disliked[j] for j in golden_order(disliked, [rating_of[i] for i in disliked], ctx)]

        def negatives(golden: list[str]) -> dict[str, tuple[Optional[list[str]], str]]:
            key = {i: (rating_of[i], ctx.s(i)) for i in golden}
            made = {
                "np": lambda: (non_preferred_list(disliked, len(golden)), "no_disliked_items"),
                "rk": lambda: (ranking_negative(golden, key, cfg.rk_swaps, rng), "golden_shorter_than_2"),
                "d": lambda: diversity_negative(golden, ctx, interacted, rng),
                "rd": lambda: (redundancy_negative(golden, ctx.category), "golden_already_clustered"),
                # its own stream: adding the family leaves the other families' draws unchanged
                "pm": lambda: popularity_matched_negative(golden, ctx, interacted, pm_rng),
            }
            return {family: made[family]() for family in FAMILIES if family in cfg.pair_families}

        for family, (rejected, reason) in negatives(out.golden).items():
            if rejected is None:
                out.skipped[family] = reason
            else:
                out.pairs[family] = rejected
        if getattr(cfg, "pairs_from_extra_windows", False):
            for prompt, golden in out.extra_ft:
                made = {f: rejected for f, (rejected, _) in negatives(golden).items() if rejected is not None}
                if made:
                    out.extra_pairs.append((prompt, golden, made))
    else:
        for family in cfg.pair_families:
            out.skipped[family] = "no_golden_list"

    # evaluation: held-out positives in golden-rule order (no cap), with the prompt the model
    # would see at that time (validation: training history; test: training + validation)
    for split, prompt_attr, target_attr in ((VAL, "val_prompt", "val_target"), (TEST, "test_prompt", "test_target")):
        seen = np.flatnonzero((labels < split) & positive)
        setattr(out, prompt_attr, [items[k] for k in seen[-cfg.prompt_max_items :]])
        held = np.flatnonzero((labels == split) & positive)
        order = golden_order([items[k] for k in held], [ratings[k] for k in held], ctx)
        setattr(out, target_attr, [items[held[j]] for j in order])
    return out
