"""Re-measure the reward stage's ``agreement`` (docs/training.md) for reward heads already
trained, without training them again: for heads trained before the ``sft_policy`` reference row
existed. Same seeded users and pages as the stage (``reward.*`` and ``ppo.*`` from the heads'
own config.yaml), so the heads' figures reproduce the stage's ``metrics.json``.

Exact command behind docs/results/movielens/ablation50/reward/agreement_with_sft_policy.json (12 s):

    python bench/reward_agreement.py --data runs/ml/data50 --sft runs/ml/sft50 --reward runs/ml/reward50 \\
        --out docs/results/movielens/ablation50/reward/agreement_with_sft_policy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagellm.config import load_config
from pagellm.data.layout import DataDir
from pagellm.model.artifact import load_policy
from pagellm.model.modeling import load_reward_head
from pagellm.train.reward import KINDS, measure_agreement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="output directory of `pagellm data`")
    p.add_argument("--sft", required=True, help="SFT_DIR the heads were trained from")
    p.add_argument("--reward", required=True, help="REWARD_DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_config(str(Path(args.reward) / "config.yaml"))
    heads = {kind: load_reward_head(Path(args.reward) / kind) for kind in KINDS}
    agreement = measure_agreement(cfg, DataDir(args.data), load_policy(args.sft), heads)
    command = (
        f"python bench/reward_agreement.py --data {args.data} --sft {args.sft} --reward {args.reward} --out {args.out}"
    )
    Path(args.out).write_text(json.dumps({"command": command, "agreement": agreement}, indent=2) + "\n")
    print(json.dumps(agreement, indent=2))


if __name__ == "__main__":
    main()
