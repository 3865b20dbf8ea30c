"""Checks every invariant of the data stage on the files it wrote, row by row."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from pagellm.config import DataConfig
from pagellm.data.rules import category_entropy


def _kendall(a, b) -> int:
    pos = {item: k for k, item in enumerate(b)}
    seq = [pos[i] for i in a]
    return sum(1 for i in range(len(seq)) for j in range(i + 1, len(seq)) if seq[i] > seq[j])


def _clustered(items, category) -> bool:
    seen, last = set(), None
    for item in items:
        c = category[item]
        if c != last and c in seen:
            return False
        seen.add(c)
        last = c
    return True


def check_outputs(out: Path, cfg: DataConfig) -> dict:
    """Assert every invariant on every row of ``out``; returns a few counts."""
    split = {s: pd.read_parquet(out / "split" / f"{s}.parquet") for s in ("train", "val", "test")}
    items = pd.read_parquet(out / "items.parquet")
    category = dict(zip(items.item_id, items.category))
    ft = pd.read_parquet(out / "ft")
    pairs = pd.read_parquet(out / "pairs")
    evals = {s: pd.read_parquet(out / "eval" / f"{s}.parquet") for s in ("val", "test")}

    pos = {s: df[df.rating > cfg.positive_threshold].groupby("user_id").item_id.agg(set) for s, df in split.items()}
    every = {s: df.groupby("user_id").item_id.agg(set) for s, df in split.items()}
    rating = {(u, i): r for u, i, r in split["train"][["user_id", "item_id", "rating"]].itertuples(index=False)}
    users = set(every["train"].index)
    assert users == set(pos["val"].index) == set(pos["test"].index), "every kept user has train, val and test positives"

    # chronology: no training interaction is newer than the user's first held-out one
    last_train = split["train"].groupby("user_id").ts.max()
    first_val = split["val"].groupby("user_id").ts.min()
    last_val = split["val"].groupby("user_id").ts.max()
    first_test = split["test"].groupby("user_id").ts.min()
    assert (last_train <= first_val.reindex(last_train.index)).all()
    assert (last_val <= first_test.reindex(last_val.index)).all()

    held_out = {u: every["val"].get(u, set()) | every["test"].get(u, set()) for u in users}
    train_pos = split["train"][split["train"].rating > cfg.positive_threshold].sort_values(["user_id", "ts", "item_id"])
    when = {(u, i): k for k, (u, i) in enumerate(train_pos[["user_id", "item_id"]].itertuples(index=False))}
    count = split["train"].item_id.value_counts()
    by_count = sorted(count.index, key=lambda i: (-count[i], i))  # training popularity rank
    rank = {i: r for r, i in enumerate(by_count)}
    golden_of, windows_of = {}, {}
    for u, prompt, golden, window in ft[["user_id", "prompt_items", "golden", "window"]].itertuples(index=False):
        prompt, golden = list(prompt), list(golden)
        assert len(golden) == len(set(golden)) > 0
        assert set(prompt) <= pos["train"][u] and set(golden) <= pos["train"][u] - set(prompt)
        assert len(prompt) <= cfg.prompt_max_items and len(golden) <= cfg.golden_max_items
        assert prompt or cfg.empty_history_windows, f"a window of {u} with an empty history"
        if cfg.golden_candidates == "future" and prompt:
            assert min(when[(u, i)] for i in golden) > max(when[(u, i)] for i in prompt), (
                f"golden item older than the prompt of {u}"
            )
        limit = max(1, math.ceil(cfg.category_cap * len(golden) - 1e-9))
        assert max(Counter(category[i] for i in golden).values()) <= limit, (u, golden)
        ratings = [rating[(u, i)] for i in golden]
        assert ratings == sorted(ratings, reverse=True), "golden list sorted by rating"
        if window == "main":
            golden_of[u] = (prompt, golden)
        windows_of.setdefault(u, []).append((prompt, golden))
    main = ft[ft.window == "main"]
    assert main.user_id.is_unique and set(ft.user_id) == set(main.user_id)
    assert not ft.assign(p=ft.prompt_items.map(tuple), g=ft.golden.map(tuple)).duplicated(["user_id", "p", "g"]).any()

    for u, family, prompt, chosen, rejected, window in pairs[
        ["user_id", "family", "prompt_items", "chosen", "rejected", "window"]
    ].itertuples(index=False):
        prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
        if window == "main":
            assert (prompt, chosen) == golden_of[u]
        else:
            assert (
                cfg.pairs_from_extra_windows and (prompt, chosen) in windows_of[u] and (prompt, chosen) != golden_of[u]
            )
        assert not set(chosen + rejected + prompt) & held_out[u], f"held-out item leaked into a {family} pair of {u}"
        assert len(rejected) == len(set(rejected)) > 0
        if family == "np":
            assert all(rating[(u, i)] < cfg.negative_threshold for i in rejected) and len(rejected) <= len(chosen)
        elif family == "rk":
            assert sorted(rejected) == sorted(chosen) and rejected != chosen
            assert _kendall(rejected, chosen) == min(cfg.rk_swaps, len(chosen) - 1)
        elif family == "d":
            assert len(rejected) == len(chosen)
            assert category_entropy(rejected, category) < category_entropy(chosen, category)
            assert not set(rejected) - set(chosen) & every["train"][u]
        elif family == "rd":
            assert sorted(rejected) == sorted(chosen) and rejected != chosen and _clustered(rejected, category)
        elif family == "pm":  # same length, never interacted with, nearly the same popularity rank
            assert len(rejected) == len(chosen) and not set(rejected) & (every["train"][u] | held_out[u])
            taken = set(chosen) | every["train"][u] | held_out[u]
            for g, r in zip(chosen, rejected):
                gap = abs(rank[r] - rank[g])
                assert sum(abs(rank[i] - rank[g]) < gap for i in by_count if i not in taken) < 3, (u, g, r)
                taken.add(r)
        else:
            raise AssertionError(f"unknown family {family}")
        assert family in cfg.pair_families
    assert not pairs[pairs.window == "main"].duplicated(["user_id", "family"]).any()
    assert not pairs.assign(p=pairs.prompt_items.map(tuple)).duplicated(["user_id", "family", "p"]).any()

    for s, df in evals.items():
        assert set(df.user_id) == users and df.user_id.is_unique
        for u, prompt, target in df[["user_id", "prompt_items", "target"]].itertuples(index=False):
            assert set(target) == pos[s][u] and len(target) == len(set(target))
            seen = pos["train"].get(u, set()) | (pos["val"].get(u, set()) if s == "test" else set())
            assert set(prompt) <= seen and not set(prompt) & set(target)
    return {"users": len(users), "ft": len(ft), "ft_users": len(main), "pairs": Counter(pairs.family)}
