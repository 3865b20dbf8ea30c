"""Would a stronger collaborative R_f lift the closed-form tilt further? The tilt of
bench/collaborative_tilt_probe.py (the SFT policy's first slot ranked by log pi_ref + w R) with
R from richer collaborative views, every choice on validation:

- ``vae``: one in-house Multi-VAE (seed 0), R = log p(item | user): today's R_f;
- ``vae x3``: the mean of three Multi-VAEs' log-probabilities (seeds 0, 1, 2);
- ``vae x3 + knn``: that plus w_k x log of ItemKNN's normalised scores (neighbourhood chosen on
  validation, as the compare report chooses it).

Each row's weights are the best of its grid on validation; test reports each chosen row against
the SFT policy and against today's R_f (``vae``), with paired bootstrap intervals. Multi-VAEs and
ItemKNN are fitted as the compare report fits them; every seen item is masked.

Exact commands behind docs/results/{movielens,amazon2014}/collaborative_ensemble.{json,png}
(repository root, venv on):

    OMP_NUM_THREADS=2 python bench/collaborative_ensemble_probe.py --data runs/ml/data50 --sft runs/ml/sft50 \\
        --compare docs/results/movielens/compare/users.parquet --bar recbole:MultiVAE \\
        --out docs/results/movielens/collaborative_ensemble.json
    OMP_NUM_THREADS=2 python bench/collaborative_ensemble_probe.py --data runs/amz/data --sft runs/amz/sft_cooc \\
        --compare docs/results/amazon2014/compare/users.parquet --bar recbole:SASRec \\
        --out docs/results/amazon2014/collaborative_ensemble.json
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from collaborative_tilt_probe import block_scores, probe_arguments, report_per_user
from reward_tilt_probe import per_user_ndcg, policy_logprobs, write_report

from pagellm.data.layout import DataDir
from pagellm.eval.baselines import (
    _item_item_scores,
    itemknn_similarity,
    load_protocol,
    multivae_scores,
    train_multivae,
    validation_ndcg,
)
from pagellm.eval.metrics import paired_bootstrap
from pagellm.model.artifact import load_policy
from pagellm.outputs import figure
from pagellm.train.sft import ranking_rows

VAE_WEIGHTS = (0.35, 0.7, 1.0, 1.5)
KNN_WEIGHTS = (0.1, 0.2, 0.35, 0.7)
NEIGHBOURS = (50, 100, 200, 400)


def knn_log_scores(sim: np.ndarray, q) -> np.ndarray:
    """log of each user's ItemKNN scores normalised to sum 1 (a probability, as the VAE's)."""
    s = np.clip(_item_item_scores(sim, q), 1e-12, None)
    return np.log(s / s.sum(1, keepdims=True))


def paired_with_bar(compare: str, bar: str, test_users: list, per_user: dict) -> dict:
    """Each row against ``bar`` of a compare report on the same split, user by user."""
    ref = report_per_user(compare, bar, test_users)
    return {
        "bar": {"model": bar, "ndcg@100": float(ref.mean())},
        "minus bar": {r: paired_bootstrap(v - ref) for r, v in per_user.items()},
    }


def plot(report: dict, path: Path) -> None:
    val, test = report["validation"], report["test"]
    rows = list(val)
    with figure(path, 2, panel_size=(5.0, 3.4)) as (_, axes):
        for ax, (title, values) in zip(axes, (("validation", val), ("test", test))):
            ax.bar(rows, [values[r]["ndcg@100"] for r in rows], color=["grey", "tab:blue", "tab:green", "tab:red"])
            ax.set_ylim(min(values[r]["ndcg@100"] for r in rows) * 0.95, None)
            ax.set_title(f"{title} NDCG@100 (weights chosen on validation)")
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0])
    torch.manual_seed(0)
    start = time.time()
    policy, data = load_policy(args.sft), DataDir(args.data)
    val, test = (load_protocol(Path(args.data), s, args.positive_threshold) for s in ("val", "test"))
    vaes = [train_multivae(test, seed=seed, val=val) for seed in range(3)]
    neighbours = max(NEIGHBOURS, key=lambda k: validation_ndcg(_item_item_scores(itemknn_similarity(val, k), val), val))
    views = {}
    for name, protocol in (("val", val), ("test", test)):
        users = data.eval_users(name, args.positive_threshold)
        rows = ranking_rows(policy.codec, users)
        vae = [block_scores(policy, protocol.items, multivae_scores(v, protocol)).clamp(min=-50) for v in vaes]
        knn = knn_log_scores(itemknn_similarity(protocol, neighbours), protocol)
        views[name] = {
            "rows": rows,
            "logp": policy_logprobs(policy, rows),
            "vae": vae[0],
            "vae x3": torch.stack(vae).mean(0),
            "knn": block_scores(policy, protocol.items, knn).clamp(min=-50),
        }

    def ranking(split: str, row: str, w: float, wk: float) -> torch.Tensor:
        v = views[split]
        if row == "sft":
            return v["logp"]
        return v["logp"] + w * v["vae" if row == "vae" else "vae x3"] + (wk * v["knn"] if row == "vae x3 + knn" else 0)

    grids = {
        "sft": [(0.0, 0.0)],
        "vae": [(w, 0.0) for w in VAE_WEIGHTS],
        "vae x3": [(w, 0.0) for w in VAE_WEIGHTS],
        "vae x3 + knn": list(itertools.product(VAE_WEIGHTS, KNN_WEIGHTS)),
    }
    validation, chosen, per_user = {}, {}, {}
    for row, grid in grids.items():
        scored = {wts: per_user_ndcg(ranking("val", row, *wts), views["val"]["rows"]).mean() for wts in grid}
        chosen[row] = max(scored, key=scored.get)
        validation[row] = {"ndcg@100": float(scored[chosen[row]]), "w_vae": chosen[row][0], "w_knn": chosen[row][1]}
        per_user[row] = per_user_ndcg(ranking("test", row, *chosen[row]), views["test"]["rows"])
    report = {
        "command": "OMP_NUM_THREADS=2 python bench/collaborative_ensemble_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "itemknn_neighbours": neighbours,
        "validation": validation,
        "test": {
            row: {
                "ndcg@100": float(per_user[row].mean()),
                "minus sft": paired_bootstrap(per_user[row] - per_user["sft"]),
                "minus vae": paired_bootstrap(per_user[row] - per_user["vae"]),
            }
            for row in grids
        },
        "test_users": len(per_user["sft"]),
        **(paired_with_bar(args.compare, args.bar, users.user_id.tolist(), per_user) if args.compare else {}),
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(report, indent=1))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
