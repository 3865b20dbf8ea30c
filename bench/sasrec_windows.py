"""The in-house SASRec's training epoch two ways, side by side in one process: one Transformer
pass per prefix sample (RecBole's augmentation as written, the simple version) against one
causal pass per window of a user's sequence (``train_sasrec``, ``sasrec_windows``).

Both train the same next-item targets per epoch (every training positive after a user's first,
with the items before it) in about as many optimiser steps; the windowed pass reads all of a
sequence's targets off one pass, where a prefix pass pads every prefix to 50 positions and keeps
one. Timed: the training epochs only (no validation scoring), torch on every core, as the report
stage trains them.

Exact command (repository root, venv active; data directories of `pagellm data`):

    OMP_NUM_THREADS=1 python bench/sasrec_windows.py --data runs/amz/data runs/ml/data \\
        --out bench/results/sasrec_windows.json

Options: ``--epochs N`` (default 2) per variant and data set, alternating. Writes the JSON and
prints one line per data set.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pagellm.config import RayConfig
from pagellm.eval.baselines import (
    BestEpoch,
    load_protocol,
    sasrec_windows,
    torch_threads,
    train_sequences,
    windows_per_batch,
)
from pagellm.model.sasrec import SASRec, right_pad

MAX_LEN, BATCH = 50, 2048


def prefix_samples(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prefix (its last MAX_LEN items) a sample, the next item its label."""
    prefixes, labels = [], []
    for seq in seqs:
        for t in range(1, len(seq)):
            prefixes.append([i + 1 for i in seq[max(0, t - MAX_LEN) : t]])
            labels.append(seq[t])
    inputs, lengths = right_pad(prefixes, MAX_LEN)
    return inputs, lengths, torch.as_tensor(labels)


def epoch_seconds(model: SASRec, rows: int, batch: int, loss_of) -> float:
    """One training epoch as ``train_sasrec`` runs it (``BestEpoch.fit``), without validation."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    BestEpoch([model], None, None, progress=False).fit(opt, loss_of, rows, batch, 1, np.random.default_rng(0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sasrec_windows.json"))
    args = parser.parse_args()

    results = {}
    for data in args.data:
        p = load_protocol(data, "test")
        seqs = train_sequences(p)
        inputs, lengths, labels = prefix_samples(seqs)
        windows, window_labels = sasrec_windows(seqs, MAX_LEN)
        targets = int((window_labels >= 0).sum())
        window_batch = windows_per_batch(window_labels, BATCH)
        assert targets == len(labels)  # the same targets either way
        torch.manual_seed(0)
        model = SASRec(len(p.items), max_len=MAX_LEN)

        def prefix_loss(b):
            return nn.functional.cross_entropy(model(inputs[b], lengths[b]), labels[b])

        timed = {"prefix": [], "window": []}
        with torch_threads(RayConfig().cores()):
            for _ in range(args.epochs):
                timed["prefix"].append(epoch_seconds(model, len(labels), BATCH, prefix_loss))
                timed["window"].append(
                    epoch_seconds(
                        model, len(windows), window_batch, lambda b: model.window_loss(windows[b], window_labels[b])
                    )
                )
        prefix, window = statistics.median(timed["prefix"]), statistics.median(timed["window"])
        results[str(data)] = {
            "users": len(seqs),
            "items": len(p.items),
            "targets": targets,
            "passes": {"prefix": len(labels), "window": len(windows)},
            "steps_per_epoch": {
                "prefix": math.ceil(len(labels) / BATCH),
                "window": math.ceil(len(windows) / window_batch),
            },
            "epoch_seconds": timed,
            "speedup": prefix / window,
        }
        print(
            f"{data}: {targets} targets; prefix passes {len(labels)}: {prefix:.2f} s per epoch; "
            f"windows {len(windows)}: {window:.2f} s per epoch; {prefix / window:.1f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": shlex.join(["python", *sys.argv]),
                "torch": torch.__version__,
                "cores": RayConfig().cores(),
                "data": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
