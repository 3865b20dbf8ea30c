"""RecBole's models as baselines on exactly PageLLM's split, masking and metric code.

RecBole 1.2.1 pins packages this project cannot share (ray <= 2.6.3, numpy < 2), so it lives in
its own virtual environment (``pagellm setup recbole``, ``eval.recbole_python``) and runs as a
subprocess (``recbole_runner.py``): it trains with RecBole's own trainer and early stopping on
our validation split, then hands back every evaluation user's full-sort scores. Masking (every
item seen before the split, at any rating) and the top-``k`` page are ours
(``baselines.pages_from_scores``), so a RecBole row is scored by the same code as every other.

Export layout (``pagellm export recbole``), RecBole atomic files with typed headers:

    NAME/NAME.{train,valid,test}.inter   user_id, item_id, rating, timestamp: the positives of each split
    NAME/NAME.item                       item_id, category
    NAME-seq/NAME-seq.{train,valid,test}.inter
                                         user_id, item_id_list, item_id, timestamp: every prefix of a
                                         user's training positives -> next positive; validation and
                                         test positives with the history they would see (train;
                                         train + validation), the last ``max_history`` items
    NAME-seq/NAME-seq.item
    recbole.yaml, recbole-seq.yaml       RecBole configs that load them (general / sequential models)
    export.json                          counts per file
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pagellm.data.layout import DataDir
from pagellm.errors import ConfigError, InputError

RUNNER = Path(__file__).with_name("recbole_runner.py")
REQUIREMENTS = Path(__file__).with_name("recbole-requirements.txt")
RECBOLE_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # our split -> RecBole file suffix
_WHITESPACE = re.compile(r"\s")


def _tsv(frame: pd.DataFrame, header: list[str], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = frame.copy()
    out.columns = header
    out.to_csv(path, sep="\t", index=False)
    return len(out)


def _check_tokens(values, what: str, data_dir: Path) -> None:
    bad = [v for v in values if _WHITESPACE.search(str(v))]
    if bad:
        raise InputError(
            f"{data_dir}: {len(bad)} {what} contain whitespace, which RecBole's token fields cannot hold, e.g. {bad[0]!r}"
        )


def export_recbole(data_dir, out_dir, positive_threshold: float = 3.0, max_history: int = 50) -> dict:
    """Write the data stage's split as RecBole benchmark files (layout in the module docstring)."""
    data, out = DataDir(data_dir), Path(out_dir)
    name = "pagellm"
    items = data.read_items(["item_id", "category"]).to_pandas()
    parts = {}
    for split in RECBOLE_SPLITS:
        frame = data.read_split(split, ["user_id", "item_id", "rating", "ts"]).to_pandas()
        frame = frame[frame.rating > positive_threshold]
        parts[split] = frame.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    _check_tokens(items.item_id, "item ids", data.root)
    _check_tokens(pd.concat([p.user_id for p in parts.values()]).unique(), "user ids", data.root)
    counts: dict[str, int] = {}
    header = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    for split, suffix in RECBOLE_SPLITS.items():
        counts[f"{name}.{suffix}.inter"] = _tsv(parts[split], header, out / name / f"{name}.{suffix}.inter")
    for folder in (name, f"{name}-seq"):
        counts[f"{folder}.item"] = _tsv(items, ["item_id:token", "category:token"], out / folder / f"{folder}.item")

    seq_header = ["user_id:token", "item_id_list:token_seq", "item_id:token", "timestamp:float"]
    train_hist = parts["train"].groupby("user_id").item_id.agg(list)
    val_hist = parts["val"].groupby("user_id").item_id.agg(list)
    rows = []  # training: every prefix of the training positives (history of >= 1 item) -> the next one
    for user, seq in parts["train"].groupby("user_id", sort=False):
        items_, ts = seq.item_id.tolist(), seq.ts.tolist()
        rows += [(user, " ".join(items_[max(0, t - max_history) : t]), items_[t], ts[t]) for t in range(1, len(items_))]
    seq_parts = {"train": pd.DataFrame(rows, columns=["u", "h", "i", "t"])}
    skipped = {}
    for split in ("val", "test"):
        frame = parts[split]
        history = {
            u: (train_hist.get(u, []) + (val_hist.get(u, []) if split == "test" else []))[-max_history:]
            for u in frame.user_id.unique()
        }
        keep = frame.user_id.map(lambda u: bool(history[u]))
        skipped[split] = int((~keep).sum())  # RecBole's sequence models need a non-empty history
        frame = frame[keep]
        seq_parts[split] = pd.DataFrame(
            {"u": frame.user_id, "h": [" ".join(history[u]) for u in frame.user_id], "i": frame.item_id, "t": frame.ts}
        )
    for split, suffix in RECBOLE_SPLITS.items():
        counts[f"{name}-seq.{suffix}.inter"] = _tsv(
            seq_parts[split], seq_header, out / f"{name}-seq" / f"{name}-seq.{suffix}.inter"
        )

    common = {
        "data_path": str(out.resolve()),
        "benchmark_filename": ["train", "valid", "test"],
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "field_separator": "\t",
        "seq_separator": " ",
        "eval_args": {"group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["Recall", "NDCG"],
        "topk": [20, 100],
        "valid_metric": "NDCG@100",
    }
    general = {
        **common,
        "dataset": name,
        "RATING_FIELD": "rating",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "category"]},
    }
    sequential = {
        **common,
        "dataset": f"{name}-seq",
        "load_col": {"inter": ["user_id", "item_id_list", "item_id", "timestamp"], "item": ["item_id", "category"]},
        "alias_of_item_id": ["item_id_list"],  # one token space for histories and targets
        "MAX_ITEM_LIST_LENGTH": max_history,
        "repeatable": True,
        "train_neg_sample_args": None,  # RecBole's default loss for sequence models is full-softmax CE
    }
    (out / "recbole.yaml").write_text(yaml.safe_dump(general, sort_keys=False))
    (out / "recbole-seq.yaml").write_text(yaml.safe_dump(sequential, sort_keys=False))
    report = {
        "data": str(data_dir),
        "positive_threshold": positive_threshold,
        "max_history": max_history,
        "rows": counts,
        "sequential_rows_without_history": skipped,
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def setup_env(venv: Path) -> Path:
    """Build RecBole's own virtual environment; returns its python (``eval.recbole_python``).
    RecBole is installed without its dependencies so that ray (needed only by its
    hyper-parameter tuning, which the bridge never imports) is left out."""
    venv = Path(venv)
    python = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "-r", str(REQUIREMENTS)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "recbole==1.2.1"],
    ]
    for step in steps:
        subprocess.run(step, check=True)
    return python


def require_env(python) -> None:
    if not Path(python).exists():
        raise ConfigError(
            f"eval.recbole_python: {python} does not exist; build RecBole's environment with "
            "`pagellm setup recbole --venv .venv-recbole`"
        )


def run_recbole(
    model: str,
    export_dir,
    split: str,
    out_dir,
    python,
    seed: int = 0,
    epochs: int = 100,
    patience: int = 10,
    settings: dict | None = None,
) -> dict:
    """Train ``model`` in RecBole's environment and return its result: the scores of every
    evaluation user of ``split`` (``users`` x ``items``, RecBole's tokens) and RecBole's own
    validation and test metrics."""
    require_env(python)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [
        str(python),
        "-P",  # never the runner's own folder on sys.path (it would shadow nothing now, but stays safe)
        str(RUNNER),
        "--export",
        str(export_dir),
        "--model",
        model,
        "--split",
        RECBOLE_SPLITS[split],
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--patience",
        str(patience),
        "--settings",
        json.dumps(settings or {}),
    ]
    started = time.perf_counter()
    with (out / "recbole.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (out / "recbole.log").read_text().strip().splitlines()[-1:]
        raise InputError(f"RecBole {model} failed (exit {done.returncode}; log {out / 'recbole.log'}): {tail}")
    result = json.loads((out / "result.json").read_text())
    result["wall_seconds"] = time.perf_counter() - started
    with np.load(out / "scores.npz") as arrays:
        result["scores"] = arrays["scores"]
    return result
