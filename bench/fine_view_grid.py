"""Is R_f's view-weight grid wide enough? The reward stage picks the weights of ItemKNN, EASE and
the SASRec seeds against the Multi-VAEs (weight 1) from ``pagellm.train.reward``'s grids; where
its choice sits at a grid's edge, a wider grid, with the Multi-VAEs' weight free too, might score
higher. This re-scores a saved collaborative R_f's views on the validation split over a wider
grid (each view's log-scores from one pass; R_f is linear in them). Test is never read.

Exact command behind docs/results/movielens/sequential_view/fine_view_grid.json (E as in that
README):

    python bench/fine_view_grid.py $E --data runs/ml/data50 --sft runs/ml/sftm2 \\
        --reward runs/ml/reward_seq --out docs/results/movielens/sequential_view/fine_view_grid.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from pagellm.config import load_config
from pagellm.eval.baselines import load_protocol, reindexed, torch_threads, validation_ndcg
from pagellm.model.artifact import load_codec
from pagellm.model.modeling import CollaborativeReward

# wider than pagellm.train.reward's grids at the top, with the Multi-VAEs' weight free
GRID = {
    "vae": (0.0, 0.25, 0.5, 1.0),
    "knn": (0.0, 0.5, 1.0, 2.0, 3.0),
    "ease": (0.0, 2.0, 5.0, 8.0, 12.0),
    "sasrec": (0.0, 1.0, 2.0, 3.0, 5.0, 8.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files, as the stages take them")
    p.add_argument("--data", required=True)
    p.add_argument("--sft", required=True, help="the SFT policy the reward stage read (its item block)")
    p.add_argument("--reward", required=True, help="a reward stage's output; its fine/ is the R_f")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as the stages take them")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    start = time.time()
    vocab = load_codec(args.sft).vocab
    val = reindexed(load_protocol(Path(args.data), "val", cfg.data.positive_threshold), vocab.item_block)
    saved = CollaborativeReward.from_pretrained(Path(args.reward) / "fine")
    lo, vaes = saved.item_lo, list(saved.vaes)
    prompts = [[lo + j for j in history] for history in val.users.history]

    def scores(views: dict, sasrec_weight: float = 0.0) -> torch.Tensor:
        head = CollaborativeReward(vaes, lo, saved.pooling, views, list(saved.sasrecs), sasrec_weight)
        with torch.no_grad():
            return head.prompt_scores(prompts, vocab.pad_id)

    with torch_threads(cfg.ray.cores()):
        base = scores({})
        unit = {n: (getattr(saved, f"{n}_index"), getattr(saved, f"{n}_value"), 1.0) for n in saved.view_weights}
        views = {n: scores({n: unit[n]}) - base for n in unit}
        if saved.sasrec_weight:
            views["sasrec"] = scores({}, 1.0) - base
    views["vae"] = base
    grid = {n: w for n, w in GRID.items() if n in views}
    saved_weights = {"vae": 1.0, **saved.view_weights, "sasrec": saved.sasrec_weight}
    saved_key = " ".join(f"{n}={saved_weights.get(n, 0.0):g}" for n in grid)
    scored = {}
    for weights in itertools.product(*grid.values()):
        if any(weights):
            total = sum(w * views[n] for n, w in zip(grid, weights))
            scored[" ".join(f"{n}={w:g}" for n, w in zip(grid, weights))] = validation_ndcg(total.numpy(), val)
    scored.setdefault(saved_key, validation_ndcg(sum(saved_weights[n] * views[n] for n in grid).numpy(), val))
    best = max(scored, key=scored.get)
    report = {
        "command": "python bench/fine_view_grid.py "
        + " ".join([*(f"--config {c}" for c in args.config), *args.overrides])
        + f" --data {args.data} --sft {args.sft} --reward {args.reward} --out {args.out}",
        "grid": grid,
        "saved": {"weights": saved_key, "validation_ndcg@100": scored[saved_key]},
        "best": {"weights": best, "validation_ndcg@100": scored[best]},
        "alone": {n: validation_ndcg(views[n].numpy(), val) for n in grid},
        "validation_ndcg@100": dict(sorted(scored.items(), key=lambda kv: -kv[1])),
        "seconds": round(time.time() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved weights {saved_key}: validation NDCG@100 {scored[saved_key]:.4f}")
    print(f"best of the wider grid {best}: {scored[best]:.4f}")


if __name__ == "__main__":
    main()
