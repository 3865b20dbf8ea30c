"""Why does a policy lose more from validation to test than EASE does? Each policy (and EASE,
its L2 chosen on validation as the baseline does) scored on both splits, per user, with the
evaluation protocol (``Policy.write_pages``, ``score_pages``), then broken down by what could
make test differ from validation:

- prompt staleness: test with the prompt cut back to the training positives (the validation
  items dropped) and validation with the last ninth of training dropped; a model that cannot
  use the newest items loses nothing there;
- history length (quartiles of the users' training positives);
- whether the split's cut falls inside a block of ratings with the same timestamp (ties are
  ordered by item id, so a model could learn that order);
- how popular the targets are: popularity's own pages on both splits, and each model's
  Recall@100 by the tercile of its targets' training-positive counts (tercile edges from the
  validation and test targets together), since a model that knows popular items better than
  rare ones loses more where the targets are rarer.

Exact command behind docs/results/movielens/val_test_shift.{json,md,png} (E as in that README):

    python bench/val_test_shift.py $E --data runs/ml/data50 --policy 'PageLLM SFT=runs/ml/sft50' \\
        --policy 'PageLLM PPO R_c + R_f=runs/ml/ablation50_whole/runs/coarse+fine/seed_0/policy' \\
        --out docs/results/movielens/val_test_shift.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import load_config
from pagellm.data.layout import DataDir
from pagellm.eval.baselines import _item_item_scores, baseline_pages, best_ease, load_protocol, pages_from_scores
from pagellm.eval.evaluate import eval_users, score_pages
from pagellm.model.artifact import load_policy
from pagellm.outputs import figure

SPLITS = ("val", "test")


def ndcg(pages, users: pd.DataFrame, categories) -> np.ndarray:
    rows, _ = score_pages(pages, users.target, categories)
    return np.array([r["ndcg@100"] for r in rows])


def recall_by_tercile(pages, targets, tercile: dict) -> dict:
    """Recall@100 over the targets of each popularity tercile (all users' targets pooled)."""
    hits, counts = {}, {}
    for page, target in zip(pages, targets):
        shown = set(page)
        for item in target:
            t = tercile[item]
            counts[t] = counts.get(t, 0) + 1
            hits[t] = hits.get(t, 0) + (item in shown)
    return {t: hits[t] / counts[t] for t in sorted(counts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files, as the stages take them")
    p.add_argument("--data", required=True)
    p.add_argument("--policy", action="append", required=True, help="NAME=DIR, repeatable")
    p.add_argument("--out", required=True, help="JSON to write (and .md, .png beside it)")
    args = p.parse_args()
    cfg, start = load_config(args.config), time.time()
    data, categories = Path(args.data), DataDir(args.data).categories()
    users = {s: eval_users(data, s, cfg) for s in SPLITS}
    n_train = dict(zip(users["val"].user_id, map(len, users["val"].history)))
    k = max(map(len, users["test"].prompt_items))  # the data stage's prompt length (the last k positives)
    histories = {  # (split, variant) -> each user's positives before the split, as the variant cuts them
        ("val", "as evaluated"): list(users["val"].history),
        ("test", "as evaluated"): list(users["test"].history),
        ("val", "last ninth of training dropped"): [h[: len(h) * 8 // 9] for h in users["val"].history],
        ("test", "validation items dropped"): [
            h[: n_train[u]] for u, h in zip(users["test"].user_id, users["test"].history)
        ],
    }
    per_user, scores, pages_of = {}, {}, {}  # pages_of: (model, split) -> the pages as evaluated
    for name, directory in (a.split("=", 1) for a in args.policy):
        policy = load_policy(directory)
        for (split, variant), history in histories.items():
            u = users[split]
            prompt = [h[-k:] for h in history]
            pages = policy.write_pages(list(u.user_id), prompt, list(u.seen_items), cfg.eval, tilt_histories=history)
            per_user[(name, split, variant)] = ndcg(pages, u, categories)
            if variant == "as evaluated":
                pages_of[(name, split)] = pages
            print(
                f"{name}, {split}, prompt {variant}: NDCG@100 {per_user[(name, split, variant)].mean():.4f}", flush=True
            )
    protocols = {s: load_protocol(data, s, cfg.data.positive_threshold) for s in SPLITS}
    l2, weights = best_ease(protocols["val"], protocols["val"])
    index = {item: j for j, item in enumerate(protocols["val"].items)}
    for (split, variant), history in histories.items():
        q = protocols[split]  # EASE reads the whole history, cut as the variant cuts it
        q = replace(q, users=q.users.assign(history=[[index[i] for i in h] for h in history]))
        pages, _ = pages_from_scores(q, list(q.users.user_id), q.items, _item_item_scores(weights, q))
        per_user[(f"EASE (L2 {l2:g})", split, variant)] = ndcg(pages, users[split], categories)
        if variant == "as evaluated":
            pages_of[(f"EASE (L2 {l2:g})", split)] = pages
    for split in SPLITS:  # popularity reads no history: the same page under every cut
        pages = baseline_pages("popularity", protocols[split], 100)
        for variant in (
            "as evaluated",
            "last ninth of training dropped" if split == "val" else "validation items dropped",
        ):
            per_user[("popularity", split, variant)] = ndcg(pages, users[split], categories)
        pages_of[("popularity", split)] = pages
    models = list(dict.fromkeys(m for m, _, _ in per_user))
    for m in models:
        val, test = per_user[(m, "val", "as evaluated")], per_user[(m, "test", "as evaluated")]
        scores[m] = {
            "val": val.mean(),
            "test": test.mean(),
            "test / val": test.mean() / val.mean(),
            "val, last ninth of training dropped / val": per_user[(m, "val", "last ninth of training dropped")].mean()
            / val.mean(),
            "test, validation items dropped / test": per_user[(m, "test", "validation items dropped")].mean()
            / test.mean(),
        }
    # breakdowns: history-length quartile, and whether the cut before the split sits in a same-second block
    inter = pd.concat([DataDir(data).read_split(s).to_pandas().assign(split=s) for s in ("train", *SPLITS)])
    span = inter.groupby(["user_id", "split"]).ts.agg(["min", "max"]).unstack()
    tie = {
        "val": span[("max", "train")] == span[("min", "val")],
        "test": span[("max", "val")] == span[("min", "test")],
    }
    quartile = pd.qcut(pd.Series(n_train), 4, labels=["q1 (shortest)", "q2", "q3", "q4 (longest)"])
    groups = {}
    for m in models:
        for split in SPLITS:
            u = users[split].user_id
            frame = pd.DataFrame(
                {"ndcg": per_user[(m, split, "as evaluated")], "q": u.map(quartile), "tie": u.map(tie[split])}
            )
            for key, col in (("history quartile", "q"), ("cut inside a same-second block", "tie")):
                for level, value in frame.groupby(col, observed=True).ndcg.mean().items():
                    groups.setdefault(m, {}).setdefault(key, {}).setdefault(str(level), {})[split] = value
    # target popularity: training-positive counts of every item, terciles of the targets' counts
    train_pos = inter[(inter.split == "train") & (inter.rating > cfg.data.positive_threshold)]
    count = train_pos.item_id.value_counts()
    pooled = pd.Series([count.get(i, 0) for split in SPLITS for t in users[split].target for i in t])
    edges = pooled.quantile([1 / 3, 2 / 3]).tolist()
    names = [f"rare (<= {edges[0]:g})", f"middle (<= {edges[1]:g})", f"popular (> {edges[1]:g})"]
    tercile = {i: names[int(np.searchsorted(edges, count.get(i, 0), side="left"))] for i in set(inter.item_id)}
    popularity = {
        split: {
            "median training count of a target": float(
                np.median([count.get(i, 0) for t in users[split].target for i in t])
            ),
            "targets per tercile": pd.Series([tercile[i] for t in users[split].target for i in t])
            .value_counts()
            .reindex(names)
            .tolist(),
        }
        for split in SPLITS
    }
    for m in models:
        for split in SPLITS:
            for level, value in recall_by_tercile(pages_of[(m, split)], users[split].target, tercile).items():
                groups[m].setdefault("target popularity (Recall@100)", {}).setdefault(level, {})[split] = value
    report = {
        "command": "python bench/val_test_shift.py "
        + " ".join(f"--config {c}" for c in args.config)
        + f" --data {args.data} "
        + " ".join(f"--policy '{a}'" for a in args.policy)
        + f" --out {args.out}",
        "users": {s: len(users[s]) for s in SPLITS},
        "ndcg@100": scores,
        "breakdowns": groups,
        "target popularity": {"terciles": names, **popularity},
        "seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    lines = [
        f"Command: `{report['command']}`",
        "",
        "| model | " + " | ".join(scores[models[0]]) + " |",
        "|---" * 6 + "|",
    ]
    lines += [f"| {m} | " + " | ".join(f"{v:.4f}" for v in scores[m].values()) + " |" for m in models]
    for key in ("history quartile", "cut inside a same-second block", "target popularity (Recall@100)"):
        levels = (
            [lv for lv in names if lv in groups[models[0]][key]] if "Recall" in key else list(groups[models[0]][key])
        )
        lines += [
            "",
            f"By {key} (val / test{'' if 'Recall' in key else ' NDCG@100'}):",
            "",
            "| model | " + " | ".join(levels) + " |",
            "|---" * (1 + len(levels)) + "|",
        ]
        lines += [
            f"| {m} | "
            + " | ".join(f"{groups[m][key][lv]['val']:.4f} / {groups[m][key][lv]['test']:.4f}" for lv in levels)
            + " |"
            for m in models
        ]
    lines += [
        "",
        "Targets' training-positive counts: "
        + "; ".join(
            f"{split} median {popularity[split]['median training count of a target']:g}, per tercile "
            + " / ".join(map(str, popularity[split]["targets per tercile"]))
            for split in SPLITS
        )
        + ".",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with figure(out.with_suffix(".png"), 2, panel_size=(5.0, 3.6)) as (_, axes):
        x = np.arange(len(models))
        for j, split in enumerate(SPLITS):
            axes[0].bar(x + (j - 0.5) * 0.4, [scores[m][split] for m in models], 0.4, label=split)
        axes[0].set_xticks(x, models, fontsize=7)
        axes[0].set_ylabel("NDCG@100")
        axes[0].legend()
        axes[0].set_title("validation vs test")
        levels = list(groups[models[0]]["history quartile"])
        for m in models:
            ratio = [
                groups[m]["history quartile"][lv]["test"] / groups[m]["history quartile"][lv]["val"] for lv in levels
            ]
            axes[1].plot(levels, ratio, "o-", label=m)
        axes[1].set_ylabel("test / validation NDCG@100")
        axes[1].set_title("by history length")
        axes[1].legend(fontsize=7)
    print(f"wrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
