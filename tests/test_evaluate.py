"""`pagellm evaluate`: Ray Data actor pool, constrained pages, seen items masked, metrics."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq

from pagellm.config import load_config
from pagellm.eval.evaluate import run_evaluate

KEYS = {"recall@20", "recall@40", "ndcg@100", "was", "pwkt", "wmrd", "dpa", "ild", "category_entropy", "users"}


def test_evaluate_writes_metrics_and_masks_seen_items(tiny_stages, tmp_path):
    root = tiny_stages["root"]
    cfg = load_config(
        overrides=[
            *tiny_stages["overrides"],
            "eval.page_items=12",
            "eval.num_actors=2",
            "eval.num_cpus=0.5",
            "eval.batch_size=16",
        ]
    )
    metrics = run_evaluate(cfg, root / "sft", root / "data", "test", tmp_path)
    assert KEYS <= set(metrics) and json.loads((tmp_path / "metrics.json").read_text())["users"] == metrics["users"]
    users = pq.read_table(tmp_path / "users.parquet").to_pandas()
    test = pq.read_table(root / "data" / "eval" / "test.parquet").to_pandas()
    assert metrics["users"] == len(users) == len(test) and set(users.user_id) == set(test.user_id)
    seen = pd.concat([pq.read_table(root / "data" / "split" / f"{s}.parquet").to_pandas() for s in ("train", "val")])
    seen_by_user = seen.groupby("user_id").item_id.agg(set)
    n_items = pq.read_table(root / "data" / "items.parquet").num_rows
    for user, page in zip(users.user_id, users.page):
        page = list(page)
        assert len(page) == len(set(page)), "no repeats"
        assert not set(page) & seen_by_user[user], "seen items are masked"
        assert len(page) == min(12, n_items - len(seen_by_user[user]))
    assert 0.0 <= metrics["ndcg@100"] <= 1.0 and metrics["defined"]["ndcg@100"] == len(users)
    # the per-user rows average to the reported means
    assert abs(users["ndcg@100"].mean() - metrics["ndcg@100"]) < 1e-9
