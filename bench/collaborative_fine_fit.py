"""R_f's collaborative fit alone: what `pagellm reward` does for ``reward.fine_model=multivae``
(``fit_collaborative_fine``), without the LM coarse head, to measure a fine-fit option (R_f's own
validation NDCG@100, the chosen view weights, the time) on a data set where the coarse head
takes the better part of an hour on 2 CPUs. Test is never read.

Exact command behind docs/results/movielens/sequential_view/fine_fit_batch512.json (its
fit.json, copied; E as in docs/results/movielens/README.md):

    python bench/collaborative_fine_fit.py $E --data runs/ml/data50 --sft runs/ml/sftm2 \\
        --out runs/ml/fine_b512
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from pagellm.config import load_config
from pagellm.eval.baselines import torch_threads
from pagellm.model.artifact import load_codec
from pagellm.train.reward import fit_collaborative_fine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files, as the stages take them")
    p.add_argument("--data", required=True)
    p.add_argument("--sft", required=True, help="the SFT policy (its item block orders R_f's columns)")
    p.add_argument("--out", required=True, help="R_f's directory; fit.json beside its files")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as the stages take them")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    start = time.time()
    with torch_threads(cfg.ray.cores()):
        fit = fit_collaborative_fine(cfg, Path(args.data), load_codec(args.sft).vocab, Path(args.out))
    fit.pop("view_weights_ndcg", None)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "fit": fit,
        "seconds": round(time.time() - start, 1),
    }
    (Path(args.out) / "fit.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"R_f validation NDCG@100 {fit['valid_ndcg@100']:.4f} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
