"""Would a sequential view in R_f lift the tilted policy? R_f's views (Multi-VAEs, ItemKNN, EASE)
read the user's history as a set; the LM reads it in order, and SASRec, the best sequential
baseline, is the bar on Amazon. This probe ranks a policy's first slot as evaluation does
(``eval.page_mode=score``: the LM's log-probabilities plus the policy's closed-form tilt, which
reads each user's whole history) and adds w x the mean log-softmax of in-house SASRec seeds:

- ``policy``: the page as `pagellm evaluate` writes it (the tilt of the policy directory);
- ``policy + w sasrec``: one SASRec (seed 0);
- ``policy + w sasrec x3``: the mean log-probability of three SASRec seeds (0, 1, 2).

w is chosen on validation (the grid below); test pairs each row with ``policy`` and, with
``--compare``, the report's ``--bar`` model. SASRec is trained as the compare report trains it
(``train_sasrec``: best epoch on validation NDCG@100); every seen item is masked.

Exact commands behind docs/results/amazon2014/sequential_view/probe.{json,png} (repository root, venv on):

    OMP_NUM_THREADS=1 python bench/sequential_view_probe.py --data runs/amz/run_m3/data \\
        --policy runs/amz/run_m3/ppo/policy --compare docs/results/amazon2014/compare/users.parquet \\
        --bar 'recbole:SASRec [compare_seq_seeds]' --out docs/results/amazon2014/sequential_view/probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from collaborative_tilt_probe import block_scores, report_per_user
from reward_tilt_probe import per_user_ndcg, policy_logprobs, write_report

from pagellm.data.layout import DataDir
from pagellm.eval.baselines import load_protocol, sasrec_scores, train_sasrec
from pagellm.eval.metrics import paired_bootstrap
from pagellm.model.artifact import load_policy
from pagellm.outputs import figure
from pagellm.train.sft import ranking_rows

WEIGHTS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0)
ROWS = ("policy + w sasrec", "policy + w sasrec x3")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--policy", required=True, help="a policy directory (SFT or PPO's policy, its tilt included)")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--positive-threshold", type=float, default=3.0)
    p.add_argument("--seeds", type=int, default=3, help="SASRec seeds of the x3 row")
    p.add_argument("--compare", help="users.parquet of a compare report on the same split")
    p.add_argument("--bar", default="recbole:SASRec [compare_seq_seeds]", help="the model of --compare to pair with")
    return p.parse_args()


@torch.no_grad()
def policy_scores(policy, users, rows) -> torch.Tensor:
    """[users, item block] first-slot scores as evaluation ranks them: log pi + the tilt on whole histories."""
    logp = policy_logprobs(policy, rows)
    if policy.tilt is None:
        return logp
    whole = [policy.codec.prompt(u, list(h)) for u, h in zip(users.user_id, users.history)]
    bias = torch.cat(
        [policy.tilt.item_bias(whole[lo : lo + 256], policy.vocab.pad_id) for lo in range(0, len(whole), 256)]
    )
    return logp + bias


def plot(report: dict, path: Path) -> None:
    val = report["validation_ndcg@100"]
    with figure(path, panel_size=(6.0, 3.6)) as (_, (ax,)):
        for row in ROWS:
            ax.plot(WEIGHTS, [val[row][str(w)] for w in WEIGHTS], marker="o", label=row)
        ax.set_xlabel("w (SASRec's weight in the tilt)")
        ax.set_ylabel("validation NDCG@100")
        ax.set_title("A sequential view added to the policy's tilt")
        ax.legend(fontsize=8)


def main() -> None:
    args = arguments()
    start = time.time()
    policy, data = load_policy(args.policy), DataDir(args.data)
    val, test = (load_protocol(Path(args.data), s, args.positive_threshold) for s in ("val", "test"))
    models = [train_sasrec(test, seed=s, val=val) for s in range(args.seeds)]
    views = {}
    for name, protocol in (("val", val), ("test", test)):
        users = data.eval_users(name, args.positive_threshold)
        if list(users.user_id) != list(protocol.users.user_id):
            raise SystemExit(f"{args.data}: the {name} users of the protocol and of the eval file differ in order")
        rows = ranking_rows(policy.codec, users)
        sasrec = [block_scores(policy, protocol.items, sasrec_scores(m, protocol)).clamp(min=-50) for m in models]
        views[name] = {
            "users": users.user_id.tolist(),
            "rows": rows,
            "policy": policy_scores(policy, users, rows),
            "policy + w sasrec": sasrec[0],
            "policy + w sasrec x3": torch.stack(sasrec).mean(0),
        }

    def ndcg(split: str, row: str, w: float) -> np.ndarray:
        v = views[split]
        return per_user_ndcg(v["policy"] + w * v[row], v["rows"])

    validation = {row: {str(w): float(ndcg("val", row, w).mean()) for w in WEIGHTS} for row in ROWS}
    chosen = {row: max(WEIGHTS, key=lambda w: validation[row][str(w)]) for row in ROWS}
    base = ndcg("test", ROWS[0], 0.0)
    per_user = {"policy": base, **{row: ndcg("test", row, chosen[row]) for row in ROWS}}
    sasrec_alone = per_user_ndcg(views["test"][ROWS[1]], views["test"]["rows"])
    report = {
        "command": "OMP_NUM_THREADS=1 python bench/sequential_view_probe.py "
        + " ".join(f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if v is not None),
        "sasrec_best_epochs": [m.selection.best_epoch for m in models],
        "validation_ndcg@100": validation,
        "chosen_w": chosen,
        "test": {
            "users": len(base),
            f"sasrec x{args.seeds} alone": float(sasrec_alone.mean()),
            **{row: float(v.mean()) for row, v in per_user.items()},
            **{f"{row} - policy": paired_bootstrap(per_user[row] - base) for row in ROWS},
        },
    }
    if args.compare:
        bar = report_per_user(args.compare, args.bar, views["test"]["users"])
        report["test"][args.bar] = float(bar.mean())
        report["test"].update({f"{row} - bar": paired_bootstrap(v - bar) for row, v in per_user.items()})
    report["seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
