"""SFT with ``sft.members=2``: the members side by side against one after the other, in one Ray
session, and whether both give the same weights.

``train.side_by_side`` (default on) lets ``pagellm sft`` train as many members at once as the
cluster's free CPUs hold worker groups for (``fits_at_once``); each member's fits (meta, next-item,
golden-list) are its own Ray Train fits, so side by side their start-up, shut-down and driver
work (tokenising, greedy validation pages) overlap the other member's.

Exact command (repository root, venv active):

    OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled WANDB_MODE=offline python bench/sft_members_side_by_side.py \\
        --results bench/results/sft_members_side_by_side.json

Method: a local 2-CPU Ray without a dashboard (as a local ``pagellm`` stage starts it); the tiny
model of tests/conftest.py on ``synthetic:1500`` with one Ray Train worker per fit, one epoch of
each SFT phase and co-occurrence item init; three ``run_sft`` runs alternating side by side,
one after the other, side by side (the first one also pays the session's cold start), in
``--work`` (default bench/out/sft_members_side_by_side). Writes the seconds of each run and
whether each member's weights are identical across the runs to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/out/sft_members_side_by_side"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/sft_members_side_by_side.json"))
    args = parser.parse_args()

    import ray
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY

    from pagellm.config import load_config
    from pagellm.data.stage import build_dataset
    from pagellm.train.sft import run_sft

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = [
        "data.dataset=synthetic:1500",
        "train.num_workers=1",
        *TINY,
        "sft.meta_epochs=1",
        "sft.next_item_epochs=1",
        "sft.ft_epochs=1",
        "sft.members=2",
        "model.item_init=cooccurrence",
    ]
    out = args.work
    out.mkdir(parents=True, exist_ok=True)
    build_dataset(load_config(overrides=base), out / "data", engine="local")
    runs = []
    for k, side_by_side in enumerate((True, False, True)):
        cfg = load_config(overrides=[*base, f"train.side_by_side={str(side_by_side).lower()}"])
        start = time.perf_counter()
        run_sft(cfg, out / "data", out / f"sft_{k}")
        runs.append({"side_by_side": side_by_side, "seconds": round(time.perf_counter() - start, 1)})
        print(f"run {k}: side_by_side={side_by_side} {runs[-1]['seconds']} s", flush=True)
    identical = {}
    for member in (0, 1):
        weights = [load_file(out / f"sft_{k}" / "members" / str(member) / "model.safetensors") for k in range(3)]
        identical[member] = all(torch.equal(weights[0][n], w[n]) for w in weights[1:] for n in weights[0])
    results = {
        "command": "OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled WANDB_MODE=offline python bench/sft_members_side_by_side.py",
        "overrides": base,
        "runs": runs,
        "members_identical_across_runs": identical,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"runs": runs, "identical": identical}))


if __name__ == "__main__":
    main()
