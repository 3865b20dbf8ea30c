"""The whole chain (`pagellm run`, `ray_jobs/run.py`): data -> SFT -> reward heads -> PPO ->
test-split evaluation of the SFT (reference) and PPO policies -> a report.

The report (OUT/report.md + report.png) puts the two policies' metrics side by side, with the
data, reward and PPO summaries and each stage's wall time; OUT/run.json holds everything.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pandas as pd

from pagellm.config import PageLLMConfig, write_config
from pagellm.eval.metrics import METRICS
from pagellm.eval.paired import PAIRED, paired_difference, paired_table, per_user
from pagellm.outputs import StageTimer, bar_chart
from pagellm.ray_utils import copy_ray_logs
from pagellm.storage import join, train_storage, upload


def write_report(
    out: Path,
    stats: dict,
    reward: dict,
    ppo: dict,
    evals: dict[str, dict],
    seconds: dict[str, float],
    command: str,
    best: Optional[str] = None,
    paired: Optional[dict] = None,
) -> Path:
    """report.md and report.png; ``best`` is the best baseline and ``paired`` each policy's
    per-user difference to it (``against_best_baseline``)."""
    lines = [
        "# PageLLM run",
        "",
        f"Command: `{command}`  ",
        f"Data: `{stats['dataset']}`: {stats['users_kept']} users, {stats['items']} items, {stats['interactions']} interactions, "
        f"{stats['ft_rows']} fine-tuning rows, {stats['pairs_total']} preference pairs.  ",
        "Reward heads, held-out pairwise accuracy: "
        + ", ".join(f"{k} {v['all']:.3f}" for k, v in reward["accuracy"].items())
        + ".  ",
        f"PPO: {ppo.get('iteration')} iterations; last rollout reward {ppo.get('reward_total', float('nan')):.3f}, "
        f"KL per page {ppo.get('kl', float('nan')):.3f}, validation NDCG@100 {ppo.get('val_ndcg@100', float('nan')):.4f}.",
        "",
        f"## Test split ({next(iter(evals.values()))['users']} users, pages of {next(iter(evals.values()))['page_items']} items, seen items masked)",
        "",
        "| policy | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, m in evals.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if m.get(k) is None else f"{m[k]:.4f}" for k in METRICS) + " |")
    if best is not None:
        gap = {p: evals[p]["ndcg@100"] / evals[best]["ndcg@100"] for p in POLICIES if p in evals}
        lines += [
            "",
            f"Best baseline: {best} (NDCG@100 {evals[best]['ndcg@100']:.4f}); "
            + ", ".join(f"{p} at {r:.2f}x it" for p, r in gap.items())
            + ". Baselines are in-house (docs/baselines.md), epoch or neighbourhood chosen on validation;"
            " `pagellm experiment compare` adds RecBole's models and several seeds. An interval that holds 0"
            " is no evidence of a difference.",
            paired_table(paired or {}, f"the best baseline ({best})").rstrip(),
        ]
    lines += [
        "",
        "Metric definitions: docs/metrics.md. Plots: `report.png` (the two policies), `ppo/ppo_curves.png`",
        "(PPO rewards, KL, validation NDCG@100), `sft/loss_curves.png`, `reward/reward_curves.png`.",
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {s:.0f} |" for stage, s in seconds.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    rows = {name: {k: (m.get(k) or 0.0, 0.0) for k in METRICS} for name, m in evals.items()}
    bar_chart(
        rows,
        ("ndcg@100", "recall@20", "ild", "category_entropy"),
        out / "report.png",
        "test split: SFT (reference), PPO and baselines",
        pagellm=set(POLICIES),
    )
    return path


POLICIES = ("SFT (reference)", "PPO (R_c + R_f)")  # the report's rows that are PageLLM's
STAGES = {
    "data": "data stage (Ray Data)",
    "sft": "SFT (the reference policy)",
    "reward": "reward heads (coarse and fine)",
    "ppo": "PPO",
    "evaluate": "test-split evaluation of the SFT and PPO policies",
    "baselines": "baselines on the test split",
}


def baseline_metrics(cfg: PageLLMConfig, data_dir: Path) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """Test-split metrics of ``eval.report_baselines`` (selected on validation), for the report:
    their means, and each baseline's per-user ``PAIRED`` metrics."""
    from pagellm.data.layout import DataDir
    from pagellm.eval.baselines import baseline_pages, load_protocol
    from pagellm.eval.metrics import mean_metrics, page_metrics

    threshold, category = cfg.data.positive_threshold, DataDir(data_dir).categories()
    test, val = load_protocol(data_dir, "test", threshold), load_protocol(data_dir, "val", threshold)
    means, users = {}, {}
    for name in cfg.eval.report_baselines:
        pages = baseline_pages(
            name,
            test,
            cfg.eval.page_items,
            0,
            val,
            cfg.eval.baseline_epochs,
            cfg.eval.baseline_patience,
            cfg.ray.cores(),
        )
        rows = [page_metrics(p, t, category) for p, t in zip(pages, test.users.target)]
        means[name] = {**mean_metrics(rows), "users": len(pages), "page_items": cfg.eval.page_items}
        users[name] = pd.DataFrame(rows, index=pd.Index(test.users.user_id, name="user_id"))[list(PAIRED)]
    return means, users


def against_best_baseline(evals: dict[str, dict], users: dict[str, pd.DataFrame]) -> tuple[Optional[str], dict]:
    """The baseline with the best test NDCG@100, and each PageLLM policy's paired difference to it."""
    baselines = [n for n in evals if n not in POLICIES]
    if not baselines:
        return None, {}
    best = max(baselines, key=lambda n: evals[n]["ndcg@100"])
    return best, {p: paired_difference(users[p], users[best]) for p in POLICIES if p in users}


def run_pipeline(cfg: PageLLMConfig, out_dir, command: str = "", storage: Optional[str] = None) -> dict:
    """``storage``: the run's URI when its outputs go to one (``pagellm.storage``): Ray Train's
    checkpoints are written under it directly."""
    from pagellm.data.stage import build_dataset
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.rl.ppo import run_ppo
    from pagellm.train.reward import run_reward
    from pagellm.train.sft import run_sft

    out = Path(out_dir)
    write_config(cfg, out)
    timer = StageTimer(STAGES)
    with timer.stage("data"):
        stats = build_dataset(cfg, out / "data", engine="ray")
    with timer.stage("sft"):
        sft = run_sft(cfg, out / "data", out / "sft", train_storage(storage, "sft") if storage else None)
    with timer.stage("reward"):
        reward = run_reward(
            cfg, out / "data", out / "sft", out / "reward", train_storage(storage, "reward") if storage else None
        )
    with timer.stage("ppo"):
        # with a URI, the role actors (on any node) read SFT and reward from it and checkpoint to it
        inputs = {name: out / name if storage is None else join(storage, name) for name in ("sft", "reward")}
        if storage is not None:
            for name, location in inputs.items():
                upload(out / name, location)
        ppo_storage = join(storage, "ppo") if storage is not None else None
        ppo = run_ppo(cfg, out / "data", inputs["sft"], inputs["reward"], out / "ppo", storage=ppo_storage)
    with timer.stage("evaluate"):
        evals = {
            POLICIES[0]: run_evaluate(cfg, out / "sft", out / "data", "test", out / "eval" / "sft"),
            POLICIES[1]: run_evaluate(cfg, out / "ppo" / "policy", out / "data", "test", out / "eval" / "ppo"),
        }
    with timer.stage("baselines"):
        means, users = baseline_metrics(cfg, out / "data")
        evals.update(means)
    users.update({POLICIES[0]: per_user(out / "eval" / "sft"), POLICIES[1]: per_user(out / "eval" / "ppo")})
    best, paired = against_best_baseline(evals, users)
    seconds = {**timer.seconds, "total": sum(timer.seconds.values())}
    report = write_report(out, stats, reward, ppo, evals, seconds, command, best, paired)
    summary = {
        "data": str(out / "data"),
        "sft": str(out / "sft"),
        "reward": str(out / "reward"),
        "ppo": str(out / "ppo"),
        "report": str(report),
        "seconds": seconds,
        "config": asdict(cfg),
        "stats": stats,
        "sft_metrics": sft,
        "reward_metrics": reward,
        "ppo_metrics": ppo,
        "test_metrics": evals,
        "best_baseline": best,
        "paired_vs_best_baseline": paired,
    }
    logs = copy_ray_logs(out / "logs" / "ray")
    summary["ray_logs"] = str(logs) if logs else None
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
