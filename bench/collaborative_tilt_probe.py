"""Would a collaborative item-level reward give PPO something the SFT policy does not know? The
reward-tilt probe (bench/reward_tilt_probe.py) with R(item) = log p(item | user) of an in-house
Multi-VAE (a set model of the user's whole history, the MovieLens bar's family) in place of the
reward heads.

PPO's single-step optimum under R - beta * KL is pi* ∝ pi_ref exp(R / beta), so ranking the item
block at the page's first slot by log pi_ref + w * R (w = 1 / beta) is the best page PPO with
such a reward can reach. w is chosen on validation only (the grid below); test reports the chosen
w against the SFT policy (w = 0) and against Multi-VAE alone, with paired bootstrap intervals.
Multi-VAE is trained as the compare report trains it (``baseline_scores``: training positives,
best epoch on validation NDCG@100), and every seen item is masked.

With ``--compare`` (a compare report's users.parquet on the same split) the tilted ranking is
also paired, user by user, with that report's ``--bar`` model, and this Multi-VAE's per-user
values are compared with the report's ``multivae`` row (the same training; ties may order
differently here, where the item block is ranked in the policy's order).

Exact commands behind docs/results/{movielens,amazon2014}/collaborative_tilt.{json,png} (38 s, 7 s;
repository root, venv on):

    OMP_NUM_THREADS=2 python bench/collaborative_tilt_probe.py --data runs/ml/data50 --sft runs/ml/sft50 \\
        --compare docs/results/movielens/compare/users.parquet --bar recbole:MultiVAE \\
        --out docs/results/movielens/collaborative_tilt.json
    OMP_NUM_THREADS=2 python bench/collaborative_tilt_probe.py --data runs/amz/data --sft runs/amz/sft_cooc \\
        --compare docs/results/amazon2014/compare/users.parquet --bar recbole:SASRec \\
        --out docs/results/amazon2014/collaborative_tilt.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from reward_tilt_probe import per_user_ndcg, policy_logprobs, write_report

from pagellm.data.layout import DataDir
from pagellm.eval.baselines import load_protocol, multivae_scores, train_multivae
from pagellm.eval.metrics import paired_bootstrap
from pagellm.model.artifact import load_policy
from pagellm.outputs import figure
from pagellm.train.sft import ranking_rows

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)


def block_scores(policy, protocol_items: list[str], scores: np.ndarray) -> torch.Tensor:
    """Multi-VAE's log-probabilities [users, items] moved from the catalogue's order into the
    policy's item block order."""
    lo = policy.vocab.item_id_range[0]
    column = [policy.vocab.item_token[i] - lo for i in protocol_items]
    logp = torch.as_tensor(scores, dtype=torch.float32).log_softmax(-1)
    # an item outside the catalogue ranks last; finite, so that w = 0 leaves the policy alone
    out = torch.full((len(scores), len(policy.vocab.item_token)), -1e9)
    out[:, column] = logp
    return out


def probe_arguments(description: str) -> argparse.Namespace:
    """The command line of the collaborative probes: data, SFT policy, output, and optionally a
    compare report whose ``--bar`` model the test rows are paired with."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True)
    p.add_argument("--sft", required=True, help="the SFT policy directory (pi_ref)")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--positive-threshold", type=float, default=3.0)
    p.add_argument("--compare", help="users.parquet of a compare report on the same split")
    p.add_argument("--bar", default="recbole:MultiVAE", help="the model of --compare to pair with")
    return p.parse_args()


def report_per_user(compare: str, model: str, test_users: list) -> np.ndarray:
    """``model``'s per-user NDCG@100 in a compare report, in ``test_users``' order; the report
    must hold exactly these users (the same split)."""
    frame = pd.read_parquet(compare)
    values = frame[frame.model == model].set_index("user_id")["ndcg@100"]
    if sorted(values.index) != sorted(test_users):
        raise SystemExit(f"{compare}: its test users differ from --data's")
    return values.loc[test_users].to_numpy()


def plot(report: dict, path: Path) -> None:
    """Validation NDCG@100 of log pi_ref + w * log p_VAE against w; SFT and Multi-VAE alone dashed."""
    val = report["validation_ndcg@100"]
    with figure(path, panel_size=(6.0, 3.6)) as (_, (ax,)):
        ax.plot(WEIGHTS, [val[str(w)] for w in WEIGHTS], marker="o", label="SFT + w * Multi-VAE")
        ax.axhline(val["0.0"], color="black", linestyle="--", label="SFT policy (w = 0)")
        ax.axhline(val["multivae alone"], color="grey", linestyle=":", label="Multi-VAE alone")
        ax.axvline(report["chosen_w"], color="tab:red", alpha=0.4, label=f"chosen w = {report['chosen_w']}")
        ax.set_xlabel("w = 1 / beta")
        ax.set_ylabel("validation NDCG@100")
        ax.set_title("Collaborative reward tilt of the SFT policy's first slot")
        ax.legend(fontsize=8)


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0])
    torch.manual_seed(0)
    start = time.time()
    policy, data = load_policy(args.sft), DataDir(args.data)
    val, test = (load_protocol(Path(args.data), s, args.positive_threshold) for s in ("val", "test"))
    vae = train_multivae(test, seed=0, val=val)
    split = {}
    for name, protocol in (("val", val), ("test", test)):
        users = data.eval_users(name, args.positive_threshold)
        rows = ranking_rows(policy.codec, users)
        split[name] = (
            users.user_id.tolist(),
            rows,
            policy_logprobs(policy, rows),
            block_scores(policy, protocol.items, multivae_scores(vae, protocol)),
        )

    _, rows, logp, r = split["val"]
    validation = {str(w): float(per_user_ndcg(logp + w * r, rows).mean()) for w in WEIGHTS}
    validation["multivae alone"] = float(per_user_ndcg(r, rows).mean())
    chosen = max(WEIGHTS, key=lambda w: validation[str(w)])

    test_users, rows, logp, r = split["test"]
    sft, vae_alone = per_user_ndcg(logp, rows), per_user_ndcg(r, rows)
    tilted = per_user_ndcg(logp + chosen * r, rows)
    report = {
        "command": "OMP_NUM_THREADS=2 python bench/collaborative_tilt_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "validation_ndcg@100": validation,
        "chosen_w": chosen,
        "test": {
            "users": len(sft),
            "sft": float(sft.mean()),
            "multivae alone": float(vae_alone.mean()),
            "sft + w * multivae": float(tilted.mean()),
            "tilted - sft": paired_bootstrap(tilted - sft),
            "tilted - multivae": paired_bootstrap(tilted - vae_alone),
        },
    }
    if args.compare:
        bar = report_per_user(args.compare, args.bar, test_users)
        report["test"][args.bar] = float(bar.mean())
        report["test"][f"tilted - {args.bar}"] = paired_bootstrap(tilted - bar)
        gap = np.abs(report_per_user(args.compare, "multivae", test_users) - vae_alone)
        report["test"]["multivae vs the report's multivae"] = {
            "users differing": int((gap > 1e-9).sum()),
            "largest difference": float(gap.max()),
        }
    report["seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
