"""The canonical tables every adapter produces, and the row-level cleaning they share.

Adapters only parse their format into raw columns; ``validate_interactions`` and
``duplicate_mask`` decide which rows survive, so that every source drops rows for the same reasons and counts them the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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

RAW_COLUMNS = ("user_id", "item_id", "rating", "ts")  # what every adapter hands to validate_interactions

# Reasons a row is dropped, in the order they are checked; a row counts under its first reason.
DROP_REASONS = (
    "missing_user_id",
    "missing_item_id",
    "bad_rating",
    "rating_out_of_range",
    "bad_timestamp",
    "duplicate_user_item",
)


def ordered_drops(dropped) -> dict:
    """Drop counts in ``DROP_REASONS`` order, then any other reason by name (how they print)."""
    rank = {reason: i for i, reason in enumerate(DROP_REASONS)}
    return {k: dropped[k] for k in sorted(dropped, key=lambda k: (rank.get(k, len(rank)), k)) if dropped[k]}


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
    """A raw time column as numbers ``validate_interactions`` can check, and the format read:
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


ROW_COLUMNS = ("_file", "_row")  # where a validated row came from: file index, 0-based data row


def validate_interactions(
    raw: pd.DataFrame,
    source: str,
    rating_min: float,
    rating_max: float,
    ts: Optional[pd.Series] = None,
    file_index: int = 0,
) -> tuple[pa.Table, Counter, dict]:
    """Validate the raw ``user_id, item_id, rating, ts`` columns (any dtype) of one file.

    Drops, counting each under the first reason that applies (``DROP_REASONS``): missing ids,
    a rating that is not a number or lies outside ``[rating_min, rating_max]``, a timestamp that
    is not an integer. Repeated (user, item) pairs are left to ``duplicate_mask``, which needs
    every row of a user (a whole file here, a user's shuffle partition in the streaming engine).
    Returns the canonical columns plus ``ROW_COLUMNS`` (``file_index`` and the row), the counts,
    and per reason the first few dropped rows (``Ingested.drop_samples``) so that a user can
    find them. ``ts``: the time column as numbers (``parse_timestamps``) when ``raw`` holds it as
    the file's text.
    """
    require_columns(raw.columns, RAW_COLUMNS, source)
    if len(raw) == 0:
        raise InputError(f"{source}: no interaction rows")
    dropped: Counter = Counter()
    samples: dict[str, list[dict]] = {}
    keep = np.ones(len(raw), dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        nonlocal keep
        newly = mask & keep
        if newly.any():
            dropped[reason] += int(newly.sum())
            samples[reason] = [
                {"file": source, "row": int(r) + 1, "raw": {c: str(raw[c].iloc[r]) for c in RAW_COLUMNS}}
                for r in np.flatnonzero(newly)[:SAMPLES_PER_REASON]
            ]
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
    rows = np.flatnonzero(keep)
    table = pa.table(
        {
            "user_id": pa.array(ids["user_id"].to_numpy()[keep], pa.string()),
            "item_id": pa.array(ids["item_id"].to_numpy()[keep], pa.string()),
            "rating": pa.array(rating[keep], pa.float64()),
            "ts": pa.array(ts[keep].astype(np.int64), pa.int64()),
            "_file": pa.array(np.full(len(rows), file_index, dtype=np.int32)),
            "_row": pa.array(rows.astype(np.int64)),
        }
    )
    return table, dropped, samples


def duplicate_mask(table: pa.Table) -> np.ndarray:
    """Rows that repeat a (user, item) pair of a later row: the latest rating is kept (the user's
    current opinion), and on equal times the later row in file order (``ROW_COLUMNS``). Depends
    only on the rows of each user, so a per-user shuffle partition gives the same answer as the
    whole table."""
    order = pc.sort_indices(
        table, sort_keys=[(c, "ascending") for c in ("user_id", "item_id", "ts", *ROW_COLUMNS)]
    ).to_numpy()
    if len(order) < 2:
        return np.zeros(len(order), dtype=bool)
    pair = [table.column(c).take(order).combine_chunks() for c in ("user_id", "item_id")]
    same = [pc.equal(col.slice(0, len(col) - 1), col.slice(1)).to_numpy(zero_copy_only=False) for col in pair]
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:-1][same[0] & same[1]]] = True  # a row followed by the same pair is superseded
    return mask


def duplicate_samples(table: pa.Table, mask: np.ndarray, sources: list[str]) -> list[dict]:
    """The first few duplicates in file order, located like ``validate_interactions``' samples."""
    dups = table.filter(pa.array(mask))
    first = dups.take(pc.sort_indices(dups, sort_keys=[(c, "ascending") for c in ROW_COLUMNS])[:SAMPLES_PER_REASON])
    return [
        {
            "file": sources[row["_file"]],
            "row": row["_row"] + 1,
            "raw": {c: str(row[c]) for c in RAW_COLUMNS},
        }
        for row in first.to_pylist()
    ]


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


def align_items(seen_items: pa.Array, items: pa.Table) -> tuple[pa.Table, dict]:
    """Keep one row per item that occurs in the interactions (``seen_items``, the ids of the
    kept interactions, repeats allowed); items with no metadata get category ``unknown``.
    Returns the items and counts of what changed."""
    seen = pc.unique(seen_items).to_pylist()
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
