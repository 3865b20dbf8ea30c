"""Two models on the same users: per-user differences of the headline metrics and their paired
bootstrap intervals, as the comparison reports and ``pagellm run``'s report give them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.eval.metrics import paired_bootstrap

PAIRED = ("ndcg@100", "recall@20")  # metrics compared user by user, with intervals


def per_user(run_dir: str | Path) -> pd.DataFrame:
    """The per-user ``PAIRED`` metrics ``pagellm evaluate`` wrote (its users.parquet), by user."""
    return pd.read_parquet(Path(run_dir) / "users.parquet", columns=["user_id", *PAIRED]).set_index("user_id")


def identical(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-9) -> bool:
    """The same users with the same per-user values: two runs of a deterministic model agree
    this way only when they were scored on the same split, masking and metric code."""
    a, b = a.sort_index(), b.sort_index()
    return bool(a.index.equals(b.index) and np.allclose(a.to_numpy(), b.to_numpy(), atol=atol, equal_nan=True))


def paired_difference(frame: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """``frame`` minus ``reference`` on their common users: per ``PAIRED`` metric the mean
    per-user difference and its paired bootstrap 95% interval."""
    joined = frame.join(reference.add_suffix("_ref"), how="inner")
    out: dict = {"users": len(joined)}
    for key in PAIRED:
        mean, low, high = paired_bootstrap((joined[key] - joined[f"{key}_ref"]).to_numpy())
        out[key] = {"mean": mean, "ci95": [low, high]}
    return out


def _signed(value: float) -> str:
    """+0.1234; identical pages averaged over seeds differ by rounding (-3e-19): +0.0000, not -0.0000."""
    return f"{round(value, 12) + 0.0:+.4f}"


def paired_table(paired: dict, reference: str) -> str:
    """Markdown: each model's per-user difference to ``reference`` with its 95% interval."""
    if not paired:
        return ""
    users = max(p["users"] for p in paired.values())
    lines = [
        "",
        f"Against {reference}, user by user ({users} users; paired bootstrap 95% intervals, 2,000 resamples):",
        "",
        "| model | " + " | ".join(f"Δ {k} [95% interval]" for k in PAIRED) + " |",
        "|---|" + "---|" * len(PAIRED),
    ]
    for name, p in paired.items():
        cells = [f"{_signed(p[k]['mean'])} [{_signed(p[k]['ci95'][0])}, {_signed(p[k]['ci95'][1])}]" for k in PAIRED]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
