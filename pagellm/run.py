"""The whole chain (`pagellm run`, `ray_jobs/run.py`): data -> SFT -> reward heads -> PPO ->
test-split evaluation of the SFT (reference) and PPO policies -> a report.

The report (OUT/report.md + report.png) puts the two policies' metrics side by side, with the
data, reward and PPO summaries and each stage's wall time; OUT/run.json holds everything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pagellm.config import PageLLMConfig
from pagellm.eval.metrics import METRICS
from pagellm.outputs import StageTimer, bar_chart
from pagellm.storage import train_storage


def write_report(
    out: Path, stats: dict, reward: dict, ppo: dict, evals: dict[str, dict], seconds: dict[str, float], command: str
) -> Path:
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
        "test split: SFT (reference) vs PPO",
    )
    return path


def run_pipeline(cfg: PageLLMConfig, out_dir, command: str = "", storage: Optional[str] = None) -> dict:
    """``storage``: the run's URI when its outputs go to one (``pagellm.storage``): Ray Train's
    checkpoints are written under it directly."""
    from pagellm.data.stage import build_dataset
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.rl.ppo import run_ppo
    from pagellm.train.reward import run_reward
    from pagellm.train.sft import run_sft

    out = Path(out_dir)
    timer = StageTimer("pagellm run")
    stats = build_dataset(cfg, out / "data", engine="ray")
    timer.lap("data")
    sft = run_sft(cfg, out / "data", out / "sft", train_storage(storage, "sft") if storage else None)
    timer.lap("sft")
    reward = run_reward(
        cfg, out / "data", out / "sft", out / "reward", train_storage(storage, "reward") if storage else None
    )
    timer.lap("reward")
    ppo = run_ppo(cfg, out / "data", out / "sft", out / "reward", out / "ppo")
    timer.lap("ppo")
    evals = {
        "SFT (reference)": run_evaluate(cfg, out / "sft", out / "data", "test", out / "eval" / "sft"),
        "PPO (R_c + R_f)": run_evaluate(cfg, out / "ppo" / "policy", out / "data", "test", out / "eval" / "ppo"),
    }
    timer.lap("evaluate")
    seconds = {**timer.seconds, "total": sum(timer.seconds.values())}
    report = write_report(out, stats, reward, ppo, evals, seconds, command)
    summary = {
        "data": str(out / "data"),
        "sft": str(out / "sft"),
        "reward": str(out / "reward"),
        "ppo": str(out / "ppo"),
        "report": str(report),
        "seconds": seconds,
        "stats": stats,
        "sft_metrics": sft,
        "reward_metrics": reward,
        "ppo_metrics": ppo,
        "test_metrics": evals,
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
