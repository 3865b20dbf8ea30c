"""The data directory that ``pagellm data`` writes, as one object.

Every later stage (SFT, reward heads, PPO, evaluation, baselines, serving) reads the data stage
only through ``DataDir``: the file layout is written here once, a missing file is one
``InputError`` naming the directory and the file, and the views several stages derive (what a
user saw before a split, the evaluation users with their targets and histories) are built
here once.

    interactions.parquet, items.parquet   canonical tables after cleaning
    split/{train,val,test}.parquet         canonical interactions of kept users, per split
    split/withheld.parquet                 training interactions left out by data.train_keep (cold start)
    ft/part-*.parquet                      user_id, prompt_items, golden, window
    pairs/part-*.parquet                   user_id, family, prompt_items, chosen, rejected, window
    eval/{val,test}.parquet                user_id, prompt_items, target
    stats.json                             counts, drops and timings

Every table but items.parquet is a file (the local engine; ft/ and pairs/ sharded) or a
directory of that name holding parquet parts (the streaming ``ray`` engine); ``DataDir`` reads
the same rows either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pagellm.errors import InputError

SPLITS = ("train", "val", "test")
WITHHELD = "withheld"  # not a split: what data.train_keep left out of train, kept to be locatable
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class DataDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------------- paths

    @property
    def interactions_path(self) -> Path:
        return self.root / "interactions.parquet"

    @property
    def items_path(self) -> Path:
        return self.root / "items.parquet"

    def split_path(self, split: str) -> Path:
        return self.root / "split" / f"{_check(split, (*SPLITS, WITHHELD))}.parquet"

    @property
    def ft_path(self) -> Path:
        return self.root / "ft"

    @property
    def pairs_path(self) -> Path:
        return self.root / "pairs"

    def eval_path(self, split: str) -> Path:
        return self.root / "eval" / f"{_check(split, EVAL_SPLITS)}.parquet"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"

    def require(self, *paths: Path) -> "DataDir":
        """Fail before any work when a file a stage needs is missing."""
        missing = [str(p.relative_to(self.root)) for p in paths if not p.exists()]
        if missing:
            raise InputError(
                f"{self.root} is not a data-stage output (missing {', '.join(missing)}); run `pagellm data` first"
            )
        return self

    def require_rows(self, *paths: Path) -> "DataDir":
        """``require``, and each table (a file or a directory of parts) holds at least one row:
        a stage stops before starting Ray instead of training on nothing."""
        import pyarrow.dataset as ds

        self.require(*paths)
        for path in paths:
            if ds.dataset(path, format="parquet").count_rows() == 0:
                raise InputError(
                    f"{path} has no rows: the data stage kept nothing for it (see {self.stats_path}); "
                    "check data.positive_threshold and the input's ratings"
                )
        return self

    # ------------------------------------------------------------------------ tables

    def _read(self, path: Path, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """A table, from its file or its directory of parts. Parts come in no set order (the
        streaming engine names them by a hash): a directory's rows are sorted by user, stably,
        so every engine's output reads as the same table (each user's rows are in one part)."""
        self.require(path)
        columns = list(columns) if columns else None
        if not path.is_dir():
            return pq.read_table(path, columns=columns)
        table = pq.read_table(path, columns=None if columns is None else list(dict.fromkeys(["user_id", *columns])))
        table = table.sort_by("user_id") if "user_id" in table.column_names else table
        return table.select(columns) if columns else table

    def read_interactions(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        return self._read(self.interactions_path, columns)

    def read_items(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        return self._read(self.items_path, columns)

    def read_split(self, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        return self._read(self.split_path(split), columns)

    def read_ft(self) -> pa.Table:
        return self._read(self.ft_path)

    def read_pairs(self) -> pa.Table:
        return self._read(self.pairs_path)

    def read_eval(self, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        return self._read(self.eval_path(split), columns)

    def categories(self) -> dict[str, str]:
        items = self.read_items(["item_id", "category"])
        return dict(zip(items.column("item_id").to_pylist(), items.column("category").to_pylist()))

    # ------------------------------------------------------------------------- views

    def interactions_before(self, split: Optional[str]) -> pd.DataFrame:
        """Interactions (any rating) of kept users before ``split``: train for val, train + val
        for test, every split for None (all a deployed model may know). Sorted by user and time
        (stable: file order breaks ties), with the split each came from in ``part``."""
        parts = SPLITS if split is None else SPLITS[: SPLITS.index(_check(split, EVAL_SPLITS))]
        frames = [self.read_split(p).to_pandas().assign(part=p) for p in parts]
        return pd.concat(frames, ignore_index=True).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)

    def eval_users(self, split: str, positive_threshold: float) -> pd.DataFrame:
        """One row per evaluation user of ``split`` (eval file order): ``prompt_items`` (the
        prompt the data stage wrote), ``target`` (held-out positives, golden order), ``history``
        (positives before the split, time order) and ``seen`` (every item before the split at
        any rating: what a full-ranking evaluation masks)."""
        users = self.read_eval(split).to_pandas()
        before = self.interactions_before(split)
        history = before[before.rating > positive_threshold].groupby("user_id").item_id.agg(list)
        seen = before.groupby("user_id").item_id.agg(list)
        users["prompt_items"] = [list(p) for p in users.prompt_items]
        users["target"] = [list(t) for t in users.target]
        users["history"] = [history.get(u, []) for u in users.user_id]
        users["seen"] = [seen.get(u, []) for u in users.user_id]
        return users


def _check(split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise InputError(f"split must be one of {allowed}, got {split!r}")
    return split
