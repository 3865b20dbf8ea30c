"""Does averaging SFT policies trained with different seeds rank better than one of them? The
first slot's item distribution of K SFT policies (the same data directory and configuration,
``train.seed`` 0..K-1), combined per user and ranked over the item block with every seen item
masked (``eval.page_mode=score``, the protocol of `pagellm evaluate`).

Two combinations: the geometric mean (mean of log-probabilities) and the arithmetic mean of
probabilities; the one kept is chosen on validation. Test reports it against each single seed,
against the seeds' per-user mean (what "SFT over 3 seeds" reports) and, with ``--compare``, against
that report's ``--bar`` model, with paired bootstrap intervals.

With ``--tilt`` (a PPO policy directory of ``ppo.fine_objective=closed_form``) the same is done
with that policy's R_f tilt added to every ranking (its weight x R_f of each user's whole history,
as `pagellm evaluate` applies it with ``eval.tilt_history=all``): the ensemble as the reference of
the tilted policy, against the first seed's (the PPO policy's own reference, less its PPO steps).

Exact command behind docs/results/amazon2014/sft_seed_ensemble.{json,png} (12 s; repository
root, venv on). Seed 0 is `pagellm run`'s chain (runs/amz/run_whole, docs/results/amazon2014/run);
seeds 1 and 2 were trained on its data directory with `pagellm sft --config
runs/amz/run_whole/config.yaml train.seed=S --data runs/amz/run_whole/data --out runs/amz/sft_seedS`:

    OMP_NUM_THREADS=2 python bench/sft_seed_ensemble.py --data runs/amz/run_whole/data \\
        --sft runs/amz/run_whole/sft runs/amz/sft_seed1 runs/amz/sft_seed2 \\
        --compare docs/results/amazon2014/compare_seq_seeds/users.parquet --bar recbole:SASRec \\
        --tilt runs/amz/run_whole/ppo/policy --out docs/results/amazon2014/sft_seed_ensemble.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from collaborative_tilt_probe import report_per_user
from reward_tilt_probe import per_user_ndcg, policy_logprobs, write_report

from pagellm.data.layout import DataDir
from pagellm.eval.metrics import paired_bootstrap
from pagellm.model.artifact import FineTilt, load_policy
from pagellm.outputs import figure
from pagellm.train.sft import ranking_rows

COMBINE = {
    "geometric": lambda logps: logps.mean(0),
    "arithmetic": lambda logps: logps.logsumexp(0) - math.log(len(logps)),
}


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sft", nargs="+", required=True, help="SFT policy directories (one per seed)")
    p.add_argument("--out", required=True, help="JSON to write (and a PNG beside it)")
    p.add_argument("--positive-threshold", type=float, default=3.0)
    p.add_argument("--compare", help="users.parquet of a compare report on the same split")
    p.add_argument("--bar", default="recbole:SASRec", help="the model of --compare to pair with")
    p.add_argument("--tilt", help="a closed-form PPO policy directory whose R_f tilt is added (fine_tilt/)")
    return p.parse_args()


@torch.no_grad()
def split_logprobs(policies, data: DataDir, split: str, threshold: float):
    """Users, ranking rows and [seeds, users, items] first-slot log-probabilities. Every policy
    must encode the prompts alike (same vocabulary and item block), or averaging is meaningless."""
    users = data.eval_users(split, threshold)
    rows = ranking_rows(policies[0].codec, users)
    for other in policies[1:]:
        again = ranking_rows(other.codec, users)
        if other.vocab.item_id_range != policies[0].vocab.item_id_range or any(
            not np.array_equal(a, b) for a, b in zip(rows.input_ids, again.input_ids)
        ):
            raise SystemExit(f"{split}: the SFT policies encode the prompts differently; they cannot be averaged")
    return users, rows, torch.stack([policy_logprobs(p, rows) for p in policies])


@torch.no_grad()
def tilt_bias(tilt: FineTilt, policy, users) -> torch.Tensor:
    """[users, items] the tilt's item bias, R_f reading each user's whole history."""
    prompts = [policy.codec.prompt(u, list(h)) for u, h in zip(users.user_id, users.history)]
    return torch.cat(
        [tilt.item_bias(prompts[lo : lo + 256], policy.vocab.pad_id) for lo in range(0, len(prompts), 256)]
    )


def compare_ensemble(logps, rows, chosen: str, names: list[str], bar=None, bar_name: str = "") -> dict:
    """Test: each seed, their per-user mean, the ensemble, and the paired differences."""
    singles = np.stack([per_user_ndcg(lp, rows) for lp in logps])
    ensemble = per_user_ndcg(COMBINE[chosen](logps), rows)
    out = {
        "users": len(ensemble),
        "seeds": {d: float(s.mean()) for d, s in zip(names, singles)},
        "seed mean +- sd": [float(singles.mean(1).mean()), float(singles.mean(1).std(ddof=1))],
        "ensemble": float(ensemble.mean()),
        "ensemble - seed mean (per user)": paired_bootstrap(ensemble - singles.mean(0)),
        "ensemble - each seed": {d: paired_bootstrap(ensemble - s) for d, s in zip(names, singles)},
    }
    if bar is not None:
        out["bar"] = {"model": bar_name, "ndcg@100": float(bar.mean())}
        out[f"ensemble - {bar_name}"] = paired_bootstrap(ensemble - bar)
        out[f"seed mean - {bar_name}"] = paired_bootstrap(singles.mean(0) - bar)
    return out


def plot(report: dict, path: Path) -> None:
    """Validation and test NDCG@100 of each seed and of the ensemble, one panel per view (the SFT
    policies; with --tilt, the tilted ones); the test bar dashed."""
    views = [v for v in ("sft", "tilted") if v in report]
    labels = ["/".join(Path(n).parts[-2:]) for n in report["seeds"]]
    with figure(path, ncols=len(views), panel_size=(5.0, 3.4)) as (_, axes):
        for ax, view in zip(axes, views):
            x = np.arange(len(labels) + 1)
            for offset, split in ((-0.2, "validation"), (0.2, "test")):
                ensemble = report[view][split]["ensemble" if split == "test" else report[view]["combination"]]
                values = [report[view][split]["seeds"][n] for n in report["seeds"]] + [ensemble]
                ax.bar(x + offset, values, width=0.4, label=split)
            bar = report[view]["test"].get("bar")
            if bar:
                ax.axhline(bar["ndcg@100"], ls="--", c="k", lw=1, label=f"test {bar['model']}")
            ax.set_xticks(x, [*labels, f"ensemble ({report[view]['combination']})"], fontsize=7)
            ax.set_ylabel("NDCG@100")
            ax.set_ylim(bottom=min(report[view]["test"]["seeds"].values()) * 0.9)
            ax.legend(fontsize=7)
            ax.set_title(f"{view}: seeds and their ensemble", fontsize=9)


def main() -> None:
    args = arguments()
    start = time.time()
    policies, data = [load_policy(d) for d in args.sft], DataDir(args.data)
    tilt = FineTilt.load(args.tilt) if args.tilt else None
    if args.tilt and tilt is None:
        raise SystemExit(f"{args.tilt}: no fine_tilt/ (not a closed-form PPO policy)")
    val_users, val_rows, val_logps = split_logprobs(policies, data, "val", args.positive_threshold)
    test_users, rows, logps = split_logprobs(policies, data, "test", args.positive_threshold)
    bar = report_per_user(args.compare, args.bar, test_users.user_id.tolist()) if args.compare else None
    report = {
        "command": "OMP_NUM_THREADS=2 python bench/sft_seed_ensemble.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else shlex.quote(str(v))}"
            for k, v in vars(args).items()
            if v is not None
        ),
        "seeds": args.sft,
    }
    views = {"sft": (val_logps, logps)}
    if tilt:
        views["tilted"] = (
            val_logps + tilt_bias(tilt, policies[0], val_users),
            logps + tilt_bias(tilt, policies[0], test_users),
        )
        report["tilt_weight"] = tilt.weight
    for view, (val_view, test_view) in views.items():
        validation = {
            "seeds": {d: float(per_user_ndcg(lp, val_rows).mean()) for d, lp in zip(args.sft, val_view)},
            **{name: float(per_user_ndcg(f(val_view), val_rows).mean()) for name, f in COMBINE.items()},
        }
        chosen = max(COMBINE, key=lambda name: validation[name])
        report[view] = {
            "combination": chosen,
            "validation": validation,
            "test": compare_ensemble(test_view, rows, chosen, args.sft, bar, args.bar),
        }
    report["seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
