"""Would a UserKNN view lift R_f? R_f's geometric mixture as ``fit_collaborative_fine`` builds it
(the mean log-softmax of Multi-VAE seeds, plus weights x the log of ItemKNN's scores normalised to
sum 1, x EASE's with --ease, x the SASRec seeds' mean log-softmax), with and without UserKNN's
log-normalised scores as one more view, every weight combination scored by validation NDCG@100
(the grids of ``pagellm.train.reward``; UserKNN's below). Baselines as the compare report fits
them, columns in catalogue order; test is never read.

Exact command behind docs/results/amazon2014/userknn_fine_probe.{json,png} (5.4 min on 2 CPUs):

    OMP_NUM_THREADS=2 python bench/userknn_fine_probe.py --data runs/amz/data \\
        --out docs/results/amazon2014/userknn_fine_probe.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pagellm.eval.baselines import (
    _item_item_scores,
    best_ease,
    best_itemknn_neighbours,
    best_userknn_neighbours,
    itemknn_similarity,
    load_protocol,
    multivae_scores,
    sasrec_scores,
    train_multivae,
    train_sasrec,
    userknn_scores,
    validation_ndcg,
)
from pagellm.outputs import figure
from pagellm.train.reward import EASE_WEIGHTS, KNN_WEIGHTS, SASREC_WEIGHTS

USER_WEIGHTS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    return torch.as_tensor(scores).float().log_softmax(1).numpy()


def log_normalised(scores: np.ndarray) -> np.ndarray:
    """An item-item or user-user view as R_f reads it: log of scores normalised to sum 1, floor 1e-12."""
    s = np.clip(scores, 1e-12, None)
    return np.log(s / s.sum(1, keepdims=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=3, help="Multi-VAE and SASRec seeds (reward.fine_vaes, fine_sasrecs)")
    p.add_argument("--sasrec-batch", type=int, default=512, help="reward.fine_sasrec_batch_size")
    p.add_argument("--ease", action="store_true", help="EASE as a view too (reward.fine_ease)")
    p.add_argument("--out", required=True, help="JSON; the PNG beside it")
    args = p.parse_args()
    start, val = time.time(), load_protocol(Path(args.data), "val")
    base = np.mean(
        [
            log_softmax(multivae_scores(train_multivae(val, seed=k, val=val, progress=False), val))
            for k in range(args.seeds)
        ],
        0,
    )
    views = {
        "itemknn": log_normalised(_item_item_scores(itemknn_similarity(val, best_itemknn_neighbours(val, val)), val))
    }
    grids = {"itemknn": KNN_WEIGHTS}
    if args.ease:
        views["ease"], grids["ease"] = log_normalised(_item_item_scores(best_ease(val, val)[1], val)), EASE_WEIGHTS
    sasrecs = [
        train_sasrec(val, seed=k, val=val, batch_size=args.sasrec_batch, progress=False) for k in range(args.seeds)
    ]
    views["sasrec"], grids["sasrec"] = np.mean([log_softmax(sasrec_scores(m, val)) for m in sasrecs], 0), SASREC_WEIGHTS
    neighbours = best_userknn_neighbours(val)
    views["userknn"], grids["userknn"] = log_normalised(userknn_scores(val, neighbours)), USER_WEIGHTS
    names = list(grids)
    scored = {
        w: validation_ndcg(base + sum(wi * views[n] for n, wi in zip(names, w)), val)
        for w in itertools.product(*grids.values())
    }

    def best(user_weight: float | None = None) -> dict:
        keys = [w for w in scored if user_weight is None or w[-1] == user_weight]
        w = max(keys, key=scored.get)
        return {"weights": dict(zip(names, w)), "ndcg@100": round(scored[w], 4)}

    by_weight = {w: best(w) for w in USER_WEIGHTS}
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "userknn_neighbours": neighbours,
        "without_userknn": by_weight[0.0],
        "with_userknn": best(),
        "best_by_userknn_weight": {str(w): b for w, b in by_weight.items()},
        "seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    with figure(out.with_suffix(".png")) as (fig, (ax,)):
        ax.plot(USER_WEIGHTS, [b["ndcg@100"] for b in by_weight.values()], marker="o")
        ax.set(xlabel="UserKNN weight in R_f (other weights re-chosen)", ylabel="validation NDCG@100")
        ax.set_title(f"R_f with a UserKNN view: {args.data}")
    print(
        f"R_f validation NDCG@100 {report['without_userknn']['ndcg@100']:.4f} without UserKNN, "
        f"{report['with_userknn']['ndcg@100']:.4f} with ({time.time() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
