"""Does weighting a user's history by recency lift EASE on our split? A sequential model (the
LM, SASRec) reads order; EASE (the best baseline on both data sets) reads the history as a set.
Here each history item's row of EASE's weights counts 0.5 ** (age / half_life), age the number
of positives after it (0 for the newest; an item seen twice keeps its newest age), for every
L2 penalty of the baseline's grid and half-lives of 80 down to 5 items (none: plain EASE). The
pair with the best validation NDCG@100 is scored on test, paired user by user against plain
EASE at its own validation-chosen L2 (the compare report's EASE).

If recency lifted EASE on test, the closed-form tilt's EASE view (``reward.fine_ease``) would
gain by reading it too. Exact command behind docs/results/{amazon2014,movielens}/recency_ease.*:

    python bench/recency_ease_probe.py --data runs/amz/data --out docs/results/amazon2014/recency_ease.json
    python bench/recency_ease_probe.py --data runs/ml/data50 --out docs/results/movielens/recency_ease.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pagellm.eval.baselines import EASE_L2, Protocol, _ease_from_gram, _item_gram, load_protocol, pages_from_scores
from pagellm.eval.metrics import ndcg_at_k, paired_bootstrap
from pagellm.outputs import figure

HALF_LIVES = (None, 80, 40, 20, 10, 5)  # items; None: every history item weighs 1 (plain EASE)


def recency_scores(weights: np.ndarray, q: Protocol, half_life) -> np.ndarray:
    """Each user's sum of EASE rows over their history, row j weighted 0.5 ** (age_j / half_life)."""
    out = np.zeros((len(q.users), weights.shape[1]), dtype=np.float32)
    for row, history in enumerate(q.users.history):
        n = len(history)
        if not n:
            continue
        age = {item: n - 1 - k for k, item in enumerate(history)}  # the newest occurrence wins
        items = np.fromiter(age, dtype=np.int64)
        w = np.ones(len(items)) if half_life is None else 0.5 ** (np.fromiter(age.values(), float) / half_life)
        out[row] = (weights[items] * w[:, None].astype(np.float32)).sum(0)
    return out


def per_user_ndcg(scores: np.ndarray, q: Protocol) -> np.ndarray:
    pages, _ = pages_from_scores(q, list(q.users.user_id), q.items, scores, 100)
    return np.array([ndcg_at_k(page, target, 100) for page, target in zip(pages, q.users.target)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="output directory of `pagellm data`")
    ap.add_argument("--out", required=True, type=Path, help="JSON report; .md and .png beside it")
    args = ap.parse_args()
    started = time.perf_counter()
    val, test = load_protocol(args.data, "val"), load_protocol(args.data, "test")
    grid, by_l2 = {}, {}
    gram = _item_gram(val)  # of the training positives (both protocols share them), once for every L2 as best_ease
    for l2 in EASE_L2:
        by_l2[l2] = _ease_from_gram(gram, l2)
        for h in HALF_LIVES:
            grid[(l2, h)] = float(per_user_ndcg(recency_scores(by_l2[l2], val, h), val).mean())
            print(f"L2 {l2:g}, half-life {h}: validation NDCG@100 {grid[(l2, h)]:.4f}", flush=True)
    plain_l2 = max(EASE_L2, key=lambda l2: grid[(l2, None)])
    chosen = max(grid, key=grid.get)
    plain = per_user_ndcg(recency_scores(by_l2[plain_l2], test, None), test)
    recent = per_user_ndcg(recency_scores(by_l2[chosen[0]], test, chosen[1]), test)
    mean, low, high = paired_bootstrap(recent - plain)
    report = {
        "command": f"python bench/recency_ease_probe.py --data {args.data} --out {args.out}",
        "users": {"val": len(val.users), "test": len(test.users)},
        "median_history": {"val": float(np.median([len(h) for h in val.users.history]))},
        "validation_ndcg": [{"l2": l2, "half_life": h, "ndcg@100": v} for (l2, h), v in grid.items()],
        "plain": {"l2": plain_l2, "val": grid[(plain_l2, None)], "test": float(plain.mean())},
        "recency": {"l2": chosen[0], "half_life": chosen[1], "val": grid[chosen], "test": float(recent.mean())},
        "test_difference": {"mean": mean, "low": low, "high": high},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    label = lambda h: "none" if h is None else f"{h}"  # noqa: E731
    lines = [
        f"Command: `{report['command']}`",
        "",
        "| EASE | L2 | half-life (items) | validation NDCG@100 | test NDCG@100 |",
        "|---|---|---|---|---|",
        f"| plain (the baseline) | {plain_l2:g} | none | {report['plain']['val']:.4f} | {report['plain']['test']:.4f} |",
        f"| recency-weighted | {chosen[0]:g} | {label(chosen[1])} | {grid[chosen]:.4f} | {report['recency']['test']:.4f} |",
        "",
        f"Test, recency-weighted minus plain, paired over {len(test.users)} users: {mean:+.4f} [{low:+.4f}, {high:+.4f}].",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    with figure(args.out.with_suffix(".png"), panel_size=(6.0, 3.5)) as (_, (ax,)):
        for l2 in EASE_L2:
            ax.plot([label(h) for h in HALF_LIVES], [grid[(l2, h)] for h in HALF_LIVES], marker="o", label=f"L2 {l2:g}")
        ax.set(xlabel="recency half-life (items; none = plain EASE)", ylabel="validation NDCG@100")
        ax.set_title(f"recency-weighted EASE on test: {mean:+.4f} [{low:+.4f}, {high:+.4f}] vs plain", fontsize=9)
        ax.legend(fontsize=7)
    print(f"wrote {args.out} (+ .md, .png) in {report['seconds']} s")


if __name__ == "__main__":
    main()
