"""Which tilt weight w = ppo.fine_weight / ppo.kl_beta should a closed-form R_f get? The SFT policy
tilted by a reward stage's collaborative R_f (``FineTilt``) at each w, scored by `pagellm evaluate`
on the validation split (the protocol PPO validation and the experiments use); w = 0 is the
policy as it is. Test is never read.

Exact commands behind docs/results/{movielens,amazon2014}/fine_weight_sweep_ens.{json,png}
(repository root, venv on; E as in those READMEs):

    python bench/fine_weight_sweep.py $E --data runs/ml/data50 --sft runs/ml/sft50 \\
        --reward runs/ml/reward50_ens --out docs/results/movielens/fine_weight_sweep_ens.json
    python bench/fine_weight_sweep.py $E --data runs/amz/data --sft runs/amz/sft_cooc \\
        --reward runs/amz/reward_ens --out docs/results/amazon2014/fine_weight_sweep_ens.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from pagellm.config import load_config
from pagellm.eval.evaluate import run_evaluate
from pagellm.model.artifact import TILT_DIR, FineTilt
from pagellm.outputs import figure

WEIGHTS = (0.0, 0.35, 0.7, 1.0, 1.5, 2.0, 3.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files, as the stages take them")
    p.add_argument("--data", required=True)
    p.add_argument("--sft", required=True, help="the SFT policy directory")
    p.add_argument("--reward", required=True, help="a reward stage's output; its fine/ is the R_f")
    p.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    p.add_argument("--out", required=True, help="JSON to write (and a PNG beside it)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as the stages take them")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    start, scores = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy"
        shutil.copytree(args.sft, policy, ignore=shutil.ignore_patterns(TILT_DIR))
        for w in args.weights:
            shutil.rmtree(policy / TILT_DIR, ignore_errors=True)
            if w:
                FineTilt.of_reward(Path(args.reward) / "fine", w).save(policy)
            scores[w] = run_evaluate(cfg, policy, args.data, "val", Path(tmp) / f"eval_{w}")["ndcg@100"]
            print(f"w = {w}: validation NDCG@100 {scores[w]:.4f}", flush=True)
    best = max(scores, key=scores.get)
    report = {
        "command": "python bench/fine_weight_sweep.py "
        + " ".join([*(f"--config {c}" for c in args.config), *args.overrides])
        + f" --data {args.data} --sft {args.sft} --reward {args.reward} --out {args.out}"
        + ("" if tuple(args.weights) == WEIGHTS else " --weights " + " ".join(f"{w:g}" for w in args.weights)),
        "reward_fine": json.loads((Path(args.reward) / "fine" / "reward_head.json").read_text()),
        "validation_ndcg@100": {str(w): s for w, s in scores.items()},
        "best_weight": best,
        "seconds": round(time.time() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    with figure(Path(args.out).with_suffix(".png"), 1, panel_size=(5.0, 3.4)) as (_, axes):
        axes[0].plot(list(scores), list(scores.values()), "o-")
        axes[0].set_xlabel("tilt weight w = fine_weight / kl_beta")
        axes[0].set_ylabel("validation NDCG@100")
        axes[0].set_title(f"SFT tilted by R_f (best w = {best})")
    print(f"best w = {best}: {scores[best]:.4f} (w = 0: {scores.get(0.0, float('nan')):.4f})")


if __name__ == "__main__":
    main()
