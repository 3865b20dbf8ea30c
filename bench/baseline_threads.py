"""The in-house SASRec baseline on one thread and on every core, side by side in one process:
seconds per epoch and whether the validation scores agree.

`pagellm run` and `pagellm experiment compare` train their in-house baselines in the driver
while no Ray work runs, with torch's threads at ``RayConfig.cores()`` (``baseline_pages``'s
``threads``). SASRec is the baseline that costs: about 60 epochs on Amazon, most of the report
stage of `pagellm run` (~8 s each when it ran a pass per prefix, ~2 s per window since
2026-12-07: bench/sasrec_windows.py).

Exact command (repository root, venv active; a data directory of `pagellm data`):

    OMP_NUM_THREADS=1 python bench/baseline_threads.py --data runs/amz/run_whole/data \\
        --out bench/results/baseline_threads.json

Options: ``--epochs N`` (default 3) per run, ``--threads A B`` (default 1 and every core),
``--repeats R`` (default 2, alternating). Writes the JSON and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from pagellm.config import RayConfig
from pagellm.eval.baselines import load_protocol, torch_threads, train_sasrec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, RayConfig().cores()])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/baseline_threads.json"))
    args = parser.parse_args()

    test, val = load_protocol(args.data, "test"), load_protocol(args.data, "val")
    runs = {n: [] for n in args.threads}
    histories = {}
    for _ in range(args.repeats):
        for n in args.threads:
            started = time.perf_counter()
            with torch_threads(n):
                model = train_sasrec(test, epochs=args.epochs, val=val, patience=args.epochs)
            runs[n].append((time.perf_counter() - started) / args.epochs)
            histories[n] = model.selection.history
            print(f"SASRec on {n} thread(s): {runs[n][-1]:.2f} s per epoch, validation {histories[n]}")
    base = statistics.median(runs[args.threads[0]])
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "users": len(test.users),
        "items": len(test.items),
        "seconds_per_epoch": {str(n): statistics.median(v) for n, v in runs.items()},
        "speedup_vs_first": {str(n): base / statistics.median(v) for n, v in runs.items()},
        "same_validation_scores": all(h == histories[args.threads[0]] for h in histories.values()),
        "validation_ndcg_by_epoch": {str(n): h for n, h in histories.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_epoch", "speedup_vs_first", "same_validation_scores")}))


if __name__ == "__main__":
    main()
