"""The canonical tables every adapter produces, and the row-level cleaning they share.

Adapters only parse their format into raw columns; ``clean_interactions`` decides which rows
survive, so that every source drops rows for the same reasons and counts them the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from pagellm.errors import InputError

INTERACTIONS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.float64()), ("ts", pa.int64())]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("title", pa.string()),
        ("brand", pa.string()),
    ]
)
UNKNOWN_CATEGORY = "unknown"

RAW_COLUMNS = ("user_id", "item_id", "rating", "ts")  # what every adapter hands to clean_interactions

# Reasons a row is dropped, in the order they are checked; a row counts under its first reason.
DROP_REASONS = (
    "missing_user_id",
    "missing_item_id",
    "bad_rating",
    "rating_out_of_range",
    "bad_timestamp",
    "duplicate_user_item",
)


@dataclass
class Ingested:
    """What an adapter hands to the pipeline: canonical tables plus what was dropped and why."""

    interactions: pa.Table
    items: pa.Table
    dropped: Counter = field(default_factory=Counter)
    notes: dict = field(default_factory=dict)
    # reason -> the first SAMPLES_PER_REASON dropped rows: {"file", "row" (1-based data row), "raw"}
    drop_samples: dict = field(default_factory=dict)


SAMPLES_PER_REASON = 3


def require_columns(columns, needed, source: str) -> None:
    """Fail with the file name and the missing column names."""
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise InputError(f"{source}: missing required column(s) {missing}; found {list(columns)}")


ISO_8601 = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?"
MS_FROM = 1e11  # a unix time this large in seconds is the year 5138: the column holds milliseconds


def parse_timestamps(values: pd.Series, fmt: str, source: str) -> tuple[pd.Series, str]:
    """A raw time column as numbers ``clean_interactions`` can check, and the format read:
    unix seconds or milliseconds (kept in their unit: the data stage only orders by time) or
    ISO-8601 dates / datetimes (with or without a zone; naive ones read as UTC) as unix seconds.
    ``auto`` detects the format of the column; a column mixing numbers and ISO dates is an error
    naming a row of each. Values in no format stay NaN and count as bad_timestamp."""
    numeric = pd.to_numeric(values, errors="coerce")
    text = values[numeric.isna() & values.notna()]
    iso = pd.Series(np.nan, index=values.index)
    if len(text) and fmt in ("auto", "iso"):
        text = text.astype(str).str.strip()
        text = text[text.str.fullmatch(ISO_8601)]  # pandas alone also takes "2000/1"
        stamps = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
        parsed = stamps.notna()
        epoch = pd.Timestamp(0, tz="UTC")
        iso[text.index[parsed]] = (stamps[parsed] - epoch) // pd.Timedelta(seconds=1)  # any datetime unit
    has_numbers, has_iso = bool(numeric.notna().any()), bool(iso.notna().any())
    if fmt == "auto" and has_numbers and has_iso:
        first = lambda mask: int(np.flatnonzero(mask.to_numpy())[0])  # noqa: E731
        n, d = first(numeric.notna()), first(iso.notna())
        raise InputError(
            f"{source}: the time column mixes formats: row {n + 1} is a number ({values.iloc[n]!r}), "
            f"row {d + 1} an ISO date ({values.iloc[d]!r}); make it one format or set data.ts_format"
        )
    if fmt == "iso" or (fmt == "auto" and has_iso):
        return iso, "iso"
    if fmt == "auto":
        fmt = "unix_ms" if has_numbers and numeric.abs().median() >= MS_FROM else "unix_s"
    return numeric, fmt


def clean_interactions(
    raw: pd.DataFrame, source: str, rating_min: float, rating_max: float, ts: Optional[pd.Series] = None
) -> tuple[pa.Table, Counter, dict]:
    """Validate raw ``user_id, item_id, rating, ts`` columns (any dtype) into the canonical table.

    Drops, counting each under the first reason that applies (``DROP_REASONS``): missing ids,
    a rating that is not a number or lies outside ``[rating_min, rating_max]``, a timestamp that
    is not an integer, and repeated (user, item) pairs, of which the latest rating is kept (the
    user's current opinion; ties keep the later row of the file). Also returns, per reason, the
    first few dropped rows (``Ingested.drop_samples``) so that a user can find them. ``ts``: the
    time column as numbers (``parse_timestamps``) when ``raw`` holds it as the file's text.
    """
    require_columns(raw.columns, RAW_COLUMNS, source)
    if len(raw) == 0:
        raise InputError(f"{source}: no interaction rows")
    dropped: Counter = Counter()
    samples: dict[str, list[dict]] = {}
    keep = np.ones(len(raw), dtype=bool)

    def sample(reason: str, rows: np.ndarray) -> None:
        samples[reason] = [
            {"file": source, "row": int(r) + 1, "raw": {c: str(raw[c].iloc[r]) for c in RAW_COLUMNS}}
            for r in rows[:SAMPLES_PER_REASON]
        ]

    def drop(mask: np.ndarray, reason: str) -> None:
        nonlocal keep
        newly = mask & keep
        if newly.any():
            dropped[reason] += int(newly.sum())
            sample(reason, np.flatnonzero(newly))
        keep &= ~mask

    # ids as stripped text, converted once; null or blank is a missing id
    ids = {col: raw[col].astype("string").str.strip() for col in ("user_id", "item_id")}
    for col in ("user_id", "item_id"):
        drop((ids[col].isna() | (ids[col] == "")).to_numpy(dtype=bool, na_value=True), f"missing_{col}")
    rating = pd.to_numeric(raw["rating"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    drop(~np.isfinite(rating), "bad_rating")
    with np.errstate(invalid="ignore"):
        drop((rating < rating_min) | (rating > rating_max), "rating_out_of_range")
    ts = pd.to_numeric(raw["ts"] if ts is None else ts, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        drop(~np.isfinite(ts) | (ts != np.floor(ts)) | (ts < 0) | (ts > 2**62), "bad_timestamp")

    df = pd.DataFrame(
        {
            "user_id": ids["user_id"].to_numpy()[keep],
            "item_id": ids["item_id"].to_numpy()[keep],
            "rating": rating[keep],
            "ts": ts[keep].astype(np.int64),
        }
    )
    # stable sort by time, so that keep="last" keeps the latest rating (later file row on ties)
    df = df.sort_values("ts", kind="stable")
    dup = df.duplicated(subset=["user_id", "item_id"], keep="last").to_numpy()
    if dup.any():
        dropped["duplicate_user_item"] += int(dup.sum())
        sample("duplicate_user_item", np.sort(df.index.to_numpy()[dup]))
        df = df[~dup]
    if len(df) == 0:
        raise InputError(f"{source}: no valid interaction rows left; dropped {dict(dropped)}")
    df = df.sort_index(kind="stable")  # back to file order
    table = pa.Table.from_pandas(df, schema=INTERACTIONS_SCHEMA, preserve_index=False)
    return table, dropped, samples


def _text(value) -> str | None:
    """A stripped string, or None for None, NaN and blanks."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def build_items(item_ids, category, categories, titles=None, brands=None) -> pa.Table:
    """Canonical items table. ``category`` is the one category the data rules use (missing
    becomes ``unknown``); ``categories`` keeps every label the source gives."""
    n = len(item_ids)
    labels = [[t for t in map(_text, cs if cs is not None else []) if t] for cs in categories]
    return pa.table(
        {
            "item_id": pa.array([str(i) for i in item_ids], pa.string()),
            "category": pa.array([_text(c) or UNKNOWN_CATEGORY for c in category], pa.string()),
            "categories": pa.array(labels, pa.list_(pa.string())),
            "title": pa.array([_text(t) for t in titles] if titles is not None else [None] * n, pa.string()),
            "brand": pa.array([_text(b) for b in brands] if brands is not None else [None] * n, pa.string()),
        },
        schema=ITEMS_SCHEMA,
    )


def align_items(interactions: pa.Table, items: pa.Table) -> tuple[pa.Table, dict]:
    """Keep one row per item that occurs in the interactions; items with no metadata get
    category ``unknown``. Returns the items and counts of what changed."""
    seen = pd.unique(interactions.column("item_id").to_numpy(zero_copy_only=False))
    df = items.to_pandas()
    before = len(df)
    df = df.drop_duplicates("item_id", keep="first")
    notes = {"item_metadata_duplicates": before - len(df)}
    present = df["item_id"].isin(set(seen))
    notes["items_without_interactions"] = int((~present).sum())
    df = df[present]
    lacking = sorted(set(seen) - set(df["item_id"]))
    notes["items_without_metadata"] = len(lacking)
    if lacking:
        extra = build_items(lacking, [None] * len(lacking), [[] for _ in lacking]).to_pandas()
        df = pd.concat([df, extra], ignore_index=True)
    df = df.sort_values("item_id", kind="stable")
    return pa.Table.from_pandas(df, schema=ITEMS_SCHEMA, preserve_index=False), notes
