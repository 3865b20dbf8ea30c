"""Experiments (paper 5.2 and 5.4): the ablation over reward heads and the comparison with
baselines, each one command writing Markdown, JSON and a PNG with the command that made it.

ablation  SFT only (the reference policy), PPO with R_c only, R_f only and R_c + R_f, over
          several seeds, each policy evaluated on the test split (Figure 5 style bar chart)
compare   baselines (docs/baselines.md) and given PageLLM policies evaluated on the same split
          with the same metric code (Table 2 style)
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from pagellm.config import PageLLMConfig, load_config
from pagellm.data.layout import DataDir
from pagellm.eval.metrics import METRICS, paired_bootstrap
from pagellm.outputs import figure

VARIANTS = {"sft": None, "coarse": "coarse", "fine": "fine", "coarse+fine": "both"}


PAIRED = ("ndcg@100", "recall@20")  # metrics compared user by user, with intervals


def per_user(run_dir: Path) -> pd.DataFrame:
    """The per-user metrics ``pagellm evaluate`` wrote, indexed by user."""
    return pd.read_parquet(Path(run_dir) / "users.parquet", columns=["user_id", *PAIRED]).set_index("user_id")


def paired_against(users: dict[str, list[pd.DataFrame]], reference: str) -> dict:
    """Every model against ``reference`` on the same users: the mean per-user difference of each
    ``PAIRED`` metric (per user, the mean over a model's seeds) and its paired bootstrap 95%
    interval."""
    means = {name: pd.concat(runs).groupby(level=0)[list(PAIRED)].mean() for name, runs in users.items()}
    out = {}
    for name, frame in means.items():
        if name == reference:
            continue
        joined = frame.join(means[reference], rsuffix="_ref", how="inner")
        out[name] = {"users": len(joined)}
        for key in PAIRED:
            mean, low, high = paired_bootstrap((joined[key] - joined[f"{key}_ref"]).to_numpy())
            out[name][key] = {"mean": mean, "ci95": [low, high]}
    return out


def _paired_table(paired: dict, reference: str) -> str:
    if not paired:
        return ""
    users = max(p["users"] for p in paired.values())
    lines = [
        "",
        f"Against {reference}, user by user ({users} users; paired bootstrap 95% intervals, 2,000 resamples):",
        "",
        "| model | " + " | ".join(f"Δ {k} [95% interval]" for k in PAIRED) + " |",
        "|---|" + "---|" * len(PAIRED),
    ]
    for name, p in paired.items():
        cells = [f"{p[k]['mean']:+.4f} [{p[k]['ci95'][0]:+.4f}, {p[k]['ci95'][1]:+.4f}]" for k in PAIRED]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(rows: dict[str, dict[str, tuple[float, float]]], note: str, results: dict[str, list[dict]]) -> str:
    lines = [note, "", "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, stats in rows.items():
        cells = [f"{m:.4f} ± {s:.4f}" if s == s and s > 0 else f"{m:.4f}" for m, s in (stats[k] for k in METRICS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # metrics undefined for some users (docs/metrics.md) average over fewer users: say how many
    partial = []
    for name, runs in results.items():
        for key in METRICS:
            counts = [r["defined"][key] for r in runs if "defined" in r]
            users = [r["users"] for r in runs if "users" in r]
            if counts and users and min(counts) < max(users):
                partial.append(f"{name} {key}: {min(counts)}-{max(counts)} of {max(users)} users")
    if partial:
        lines += ["", "Means over the users where a metric is defined: " + "; ".join(partial) + "."]
    return "\n".join(lines) + "\n"


def _bar_chart(rows: dict[str, dict[str, tuple[float, float]]], keys: tuple[str, ...], path: Path, title: str) -> None:
    with figure(path, len(keys), panel_size=(4.0, 3.4)) as (fig, axes):
        for ax, key in zip(axes, keys):
            names = list(rows)
            ax.bar(
                names,
                [rows[n][key][0] for n in names],
                yerr=[rows[n][key][1] for n in names],
                capsize=4,
                color="#4c72b0",
            )
            ax.set_title(key)
            ax.tick_params(axis="x", rotation=30)
        fig.suptitle(title)


def run_ablation(
    cfg: PageLLMConfig, config_paths, overrides, data_dir, sft_dir, reward_dir, out_dir, seeds, split="test"
) -> dict:
    """Train and evaluate each variant over ``seeds``; SFT only is evaluated once (greedy
    decoding of one model is deterministic, so its spread is 0)."""
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.rl.ppo import run_ppo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    sft_eval = out / "runs" / "sft" / f"eval_{split}"
    results["sft"] = [run_evaluate(cfg, sft_dir, data_dir, split, sft_eval)]
    users = {"sft": [per_user(sft_eval)]}
    for name, rewards in VARIANTS.items():
        if rewards is None:
            continue
        results[name], users[name] = [], []
        for seed in seeds:
            run_cfg = load_config(config_paths, [*overrides, f"ppo.rewards={rewards}", f"ppo.seed={seed}"])
            run_dir = out / "runs" / name / f"seed_{seed}"
            run_ppo(run_cfg, data_dir, sft_dir, reward_dir, run_dir)
            results[name].append(run_evaluate(run_cfg, run_dir / "policy", data_dir, split, run_dir / f"eval_{split}"))
            users[name].append(per_user(run_dir / f"eval_{split}"))
    rows = {name: {k: mean_sd([r[k] for r in runs]) for k in METRICS} for name, runs in results.items()}
    paired = paired_against(users, "sft")
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "split": split,
        "seeds": list(seeds),
        "wall_seconds": time.perf_counter() - started,
        "mean_sd": rows,
        "paired_vs_sft": paired,
        "runs": results,
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    note = (
        f"Command: `{report['command']}`  \nSplit: {split}; PPO variants: mean ± sd over seeds {list(seeds)}; "
        f"wall time {report['wall_seconds'] / 60:.1f} min."
    )
    (out / "ablation.md").write_text(_table(rows, note, results) + _paired_table(paired, "sft"))
    _bar_chart(rows, ("ndcg@100", "recall@20", "ild", "category_entropy"), out / "ablation.png", "reward-head ablation")
    return report


def run_compare(
    cfg: PageLLMConfig, data_dir, policies: dict[str, str], baselines, out_dir, split="test", seeds=(0,)
) -> dict:
    """Baselines (over ``seeds`` where they train) and PageLLM policies on one split."""
    from pagellm.eval.baselines import baseline_pages, load_protocol
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.eval.metrics import mean_metrics, page_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    category = DataDir(data_dir).categories()
    protocol = load_protocol(Path(data_dir), split, cfg.data.positive_threshold)
    results: dict[str, list[dict]] = {}
    users: dict[str, list[pd.DataFrame]] = {}
    for name in baselines:
        deterministic = name in ("popularity", "itemknn")
        results[name], users[name] = [], []
        for seed in seeds[:1] if deterministic else seeds:
            pages = baseline_pages(name, protocol, cfg.eval.page_items, seed)
            scored = [page_metrics(p, t, category) for p, t in zip(pages, protocol.users.target)]
            results[name].append(mean_metrics(scored))
            users[name].append(pd.DataFrame(scored, index=protocol.users.user_id)[list(PAIRED)])
    for name, policy in policies.items():
        results[name] = [run_evaluate(cfg, policy, data_dir, split, out / "runs" / name)]
        users[name] = [per_user(out / "runs" / name)]
    rows = {name: {k: mean_sd([r[k] for r in runs]) for k in METRICS} for name, runs in results.items()}
    best = max((n for n in baselines), key=lambda n: rows[n]["ndcg@100"][0], default=None)
    paired = paired_against(users, best) if best is not None else {}
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "split": split,
        "wall_seconds": time.perf_counter() - started,
        "mean_sd": rows,
        "best_baseline": best,
        "paired_vs_best_baseline": paired,
        "runs": results,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    note = f"Command: `{report['command']}`  \nSplit: {split}; wall time {report['wall_seconds'] / 60:.1f} min."
    if best is not None:
        for name in policies:
            gap = rows[name]["ndcg@100"][0] - rows[best]["ndcg@100"][0]
            note += f"  \n{name} NDCG@100 vs the best baseline ({best}): {gap:+.4f} ({100 * gap / rows[best]['ndcg@100'][0]:+.1f}%)."
    (out / "compare.md").write_text(_table(rows, note, results) + _paired_table(paired, f"the best baseline ({best})"))
    _bar_chart(rows, ("ndcg@100", "recall@20"), out / "compare.png", "PageLLM and baselines")
    return report
