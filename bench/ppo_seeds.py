"""PPO over several seeds against the reference (SFT) policy: validation NDCG@100 and reward.

    OMP_NUM_THREADS=1 python bench/ppo_seeds.py --data DATA --sft SFT --reward REWARD \
        --out docs/results/amazon2014/ppo --runs runs/amz/ppo_seeds --seeds 0 1 2 [--config FILE ...] [key=value ...]

Each seed is one `run_ppo` into RUNS/seed_<s> (checkpoints stay there; OUT gets a copy of each
seed's metrics.jsonl); iteration 0 of its metrics.jsonl is the reference
policy (greedy pages are deterministic, so it is the same for every seed). Writes OUT/summary.json,
OUT/summary.md and OUT/ppo_seeds.png (validation NDCG@100 and held-out reward per iteration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagellm.config import load_config  # noqa: E402
from pagellm.experiments import mean_sd  # noqa: E402
from pagellm.rl.ppo import run_ppo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--data", "--sft", "--reward", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--runs", help="where the PPO runs go (default OUT/runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", action="append")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    runs_dir = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"ppo.seed={seed}"])
        started = time.perf_counter()
        run_ppo(cfg, args.data, args.sft, args.reward, runs_dir / f"seed_{seed}")
        text = (runs_dir / f"seed_{seed}" / "metrics.jsonl").read_text()
        (out / f"metrics_seed_{seed}.jsonl").write_text(text)
        records = [json.loads(line) for line in text.splitlines()]
        runs[seed] = {"records": records, "seconds": time.perf_counter() - started}

    evals = {s: [r for r in run["records"] if "val_ndcg@100" in r] for s, run in runs.items()}
    reference = {s: e[0] for s, e in evals.items()}
    final = {s: e[-1] for s, e in evals.items()}
    summary = {"command": " ".join(sys.argv), "seeds": args.seeds, "per_seed": {}}
    for s in args.seeds:
        summary["per_seed"][s] = {
            "reference": {
                k: reference[s][k]
                for k in ("val_ndcg@100", "val_recall@20", "holdout_reward_total")
                if k in reference[s]
            },
            "ppo": {
                k: final[s][k]
                for k in ("iteration", "val_ndcg@100", "val_recall@20", "holdout_reward_total", "kl")
                if k in final[s]
            },
            "seconds": runs[s]["seconds"],
        }
    for key in ("val_ndcg@100", "val_recall@20", "holdout_reward_total"):
        ref = [reference[s][key] for s in args.seeds if key in reference[s]]
        ppo = [final[s][key] for s in args.seeds if key in final[s]]
        if ref and ppo:
            summary[key] = {
                "reference": mean_sd(ref),
                "ppo": mean_sd(ppo),
                "delta": mean_sd([p - r for p, r in zip(ppo, ref)]),
            }
    last_kl = [r["kl"] for s in args.seeds for r in runs[s]["records"][-5:] if "kl" in r]
    summary["kl_last_iterations"] = mean_sd(last_kl) if last_kl else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [
        f"Command: `{summary['command']}`",
        "",
        "| metric | reference (SFT) | PPO | PPO - reference |",
        "|---|---|---|---|",
    ]
    for key in ("val_ndcg@100", "val_recall@20", "holdout_reward_total"):
        if key in summary:
            (rm, rs), (pm, ps), (dm, ds) = summary[key]["reference"], summary[key]["ppo"], summary[key]["delta"]
            lines.append(f"| {key} | {rm:.4f} ± {rs:.4f} | {pm:.4f} ± {ps:.4f} | {dm:+.4f} ± {ds:.4f} |")
    lines += [
        "",
        f"mean ± standard deviation over seeds {args.seeds}; wall time per seed: "
        + ", ".join(f"{runs[s]['seconds']:.0f} s" for s in args.seeds),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for s in args.seeds:
        recs = runs[s]["records"]
        axes[0].plot(
            [r["iteration"] for r in recs if "reward_total" in r],
            [r["reward_total"] for r in recs if "reward_total" in r],
            lw=1,
            label=f"seed {s}",
        )
        axes[1].plot(
            [r["iteration"] for r in evals[s]],
            [r.get("holdout_reward_total") for r in evals[s]],
            "o-",
            label=f"seed {s}",
        )
        axes[2].plot([r["iteration"] for r in evals[s]], [r["val_ndcg@100"] for r in evals[s]], "o-", label=f"seed {s}")
    for ax, title in zip(
        axes, ("rollout reward R_c + R_f", "held-out prompts: reward", "validation NDCG@100 (iteration 0 = SFT)")
    ):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppo_seeds.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
