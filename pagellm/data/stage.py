"""The data stage: canonical tables -> split -> s_i -> prompts, golden lists, pairs, eval targets.

Three engines run the same per-batch functions below (and the per-user rules of
``pagellm.data.rules``): ``ray`` (``pagellm.data.streaming``: reads, a hash shuffle by user,
the per-user steps and the writes all in Ray Data tasks), ``local`` (one process, the reference)
and ``gather`` (the tables on the driver, the per-user steps on Ray; the benchmark's earlier
engine). All write the layout of ``pagellm.data.layout.DataDir`` with the same rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pagellm.config import DataConfig, PageLLMConfig, write_config
from pagellm.data import rules
from pagellm.data.ingest import load_dataset
from pagellm.data.layout import EVAL_SPLITS, DataDir
from pagellm.data.schema import Ingested, ordered_drops
from pagellm.errors import InputError

log = logging.getLogger(__name__)

STR_LIST = pa.list_(pa.string())
USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("items", STR_LIST),
        ("ratings", pa.list_(pa.float64())),
        ("ts", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int8())),
        ("dropped", pa.string()),  # "" for a kept user, else why the user cannot be split
    ]
)
# One row per output record; `kind` says which file it goes to.
RECORDS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("kind", pa.string()),  # ft | pair | val | test | skip | capped
        ("family", pa.string()),  # pair family; the family a skip is about; ft window main|extra
        ("reason", pa.string()),  # why a record was skipped; "" otherwise
        ("prompt_items", STR_LIST),
        ("chosen", STR_LIST),  # golden list (ft, pair), target (val, test), capped items
        ("rejected", STR_LIST),
    ]
)
SPLIT_NAMES = {rules.TRAIN: "train", rules.VAL: "val", rules.TEST: "test", rules.WITHHELD: "withheld"}


# ---------------------------------------------------------------- per-batch functions (no Ray)


def sort_by_user(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Interactions sorted by user, time and item, and the row where each user starts."""
    table = table.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending")])
    users = table.column("user_id").combine_chunks()
    changed = pc.not_equal(users.slice(1), users.slice(0, len(users) - 1)).to_numpy(zero_copy_only=False)
    return table, np.r_[0, np.flatnonzero(changed) + 1].astype(np.int64)


def split_users(table: pa.Table, data_cfg: DataConfig) -> pa.Table:
    """Canonical interactions of whole users -> one row per user (USERS_SCHEMA), the user's
    interactions in chronological order with their split labels. Only ``rules.split_user``
    runs per user; the list columns are zero-copy views of the sorted table."""
    table, starts = sort_by_user(table)
    offsets = pa.array(np.r_[starts, table.num_rows].astype(np.int32))
    ratings = table.column("rating").to_numpy()
    labels = np.empty(table.num_rows, dtype=np.int8)
    dropped = []
    for lo, hi in zip(starts, np.r_[starts[1:], table.num_rows]):
        user_labels, reason = rules.split_user(ratings[lo:hi], data_cfg.split, data_cfg.positive_threshold)
        if user_labels is not None and data_cfg.train_keep < 1.0:
            user = table.column("user_id")[lo].as_py()
            user_labels = rules.withhold_training(
                user_labels, data_cfg.train_keep, rules.user_rng(data_cfg.seed, user, 1)
            )
        labels[lo:hi] = -1 if user_labels is None else user_labels
        dropped.append(reason)

    def nested(values) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, values)

    return pa.table(
        [
            pc.take(table.column("user_id"), pa.array(starts)),
            nested(table.column("item_id").combine_chunks()),
            nested(pa.array(ratings)),
            nested(table.column("ts").combine_chunks()),
            nested(pa.array(labels)),
            pa.array(dropped, pa.string()),
        ],
        schema=USERS_SCHEMA,
    )


def train_rating_sums(users: pa.Table) -> pa.Table:
    """Per item (sum, count) of training ratings in a batch of users; partial sums combine."""
    kept = users.filter(pc.equal(users.column("dropped"), ""))
    flat = pa.table(
        {
            "item_id": pc.list_flatten(kept.column("items")),
            "rating": pc.list_flatten(kept.column("ratings")),
            "label": pc.list_flatten(kept.column("labels")),
        }
    )
    train = flat.filter(pc.equal(flat.column("label"), rules.TRAIN))
    return train.group_by("item_id").aggregate([("rating", "sum"), ("rating", "count")])


def item_context(items: pa.Table, sums: Iterable[pa.Table]) -> rules.ItemContext:
    """s_i (eq. 6) and per-category popularity from training ratings only."""
    total = pa.concat_tables(list(sums)).group_by("item_id").aggregate([("rating_sum", "sum"), ("rating_count", "sum")])
    ids = total.column("item_id").to_pylist()
    rating_sum = total.column("rating_sum_sum").to_numpy()
    count = total.column("rating_count_sum").to_numpy()
    category = dict(zip(items.column("item_id").to_pylist(), items.column("category").to_pylist()))
    by_count = [ids[j] for j in np.lexsort((np.array(ids, dtype=object), -count))]  # most rated first, then id
    by_category: dict[str, list[str]] = {}
    for item in by_count:
        by_category.setdefault(category[item], []).append(item)
    return rules.ItemContext(
        category=category,
        popularity_score=dict(zip(ids, (rating_sum / count).tolist())),
        mean_rating=float(rating_sum.sum() / max(count.sum(), 1)),
        by_category=by_category,
        by_count=by_count,
    )


def build_records(users: pa.Table, ctx: rules.ItemContext, data_cfg: DataConfig) -> pa.Table:
    """One batch of USERS_SCHEMA rows -> RECORDS_SCHEMA rows (see ``rules.build_user``)."""
    rows = {name: [] for name in RECORDS_SCHEMA.names}

    def add(user, kind, prompt, chosen, rejected=None, family="", reason=""):
        for name, value in zip(RECORDS_SCHEMA.names, (user, kind, family, reason, prompt, chosen, rejected)):
            rows[name].append(value)

    for user, items, ratings, labels, dropped in zip(
        users.column("user_id").to_pylist(),
        users.column("items").to_pylist(),
        users.column("ratings").to_pylist(),
        users.column("labels").to_pylist(),
        users.column("dropped").to_pylist(),
    ):
        if dropped:
            continue
        rec = rules.build_user(user, items, np.asarray(ratings), np.asarray(labels), ctx, data_cfg)
        if rec.golden:
            add(user, "ft", rec.prompt, rec.golden, family="main")
        for prompt, golden in rec.extra_ft:
            add(user, "ft", prompt, golden, family="extra")
        if rec.capped:
            add(user, "capped", rec.prompt, rec.capped)
        for family, rejected in rec.pairs.items():
            add(user, "pair", rec.prompt, rec.golden, rejected, family=family, reason="main")
        for prompt, golden, made in rec.extra_pairs:
            for family, rejected in made.items():
                add(user, "pair", prompt, golden, rejected, family=family, reason="extra")
        for family, reason in rec.skipped.items():
            add(user, "skip", [], [], family=family, reason=reason)
        add(user, "val", rec.val_prompt, rec.val_target)
        add(user, "test", rec.test_prompt, rec.test_target)
    return pa.table(rows, schema=RECORDS_SCHEMA)


# ---------------------------------------------------------------------------------- engines


def user_blocks(interactions: pa.Table, users_per_block: int) -> list[pa.Table]:
    """Interactions sorted by user and time, cut into zero-copy slices of whole users."""
    table, starts = sort_by_user(interactions)
    cuts = np.r_[starts[::users_per_block], table.num_rows]
    return [table.slice(lo, hi - lo) for lo, hi in zip(cuts[:-1], cuts[1:])]


def run_gather(ingested: Ingested, data_cfg: DataConfig, timings: dict) -> tuple[pa.Table, pa.Table]:
    """The gather engine (the Ray engine before the streaming one). Returns (users, records) as
    Arrow tables in user order.

    Grouping by user is an Arrow sort on the driver cut into blocks of whole users. Measured
    on 2 CPUs at 1M interactions, Ray Data's group-by shuffle with ``map_groups`` took 42 s for
    the split step against ~1 s for the sort; a sort of 10M rows takes seconds and ~1 GiB.
    The per-user work, which dominates, runs as Ray Data tasks and an actor pool.
    """
    import ray

    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True
    # Each step here is a single map; reserving budget per operator (for multi-operator
    # pipelines) left one of two CPUs idle on a 2-core machine.
    data_ctx.op_resource_reservation_enabled = False
    t = time.perf_counter()
    blocks = ray.data.from_arrow(user_blocks(ingested.interactions, data_cfg.users_per_block))
    users_ds = blocks.map_batches(
        split_users, fn_args=(data_cfg,), batch_size=None, batch_format="pyarrow"
    ).materialize()
    timings["split"] = time.perf_counter() - t

    # the users come to the driver anyway (split files); s_i is a vectorised reduction there
    t = time.perf_counter()
    users = pa.concat_tables(ray.get(users_ds.to_arrow_refs()))
    ctx = item_context(ingested.items, [train_rating_sums(users)])
    timings["item_stats"] = time.perf_counter() - t

    t = time.perf_counter()
    # tasks, not actors: they reuse the warm workers of the split step; ctx is put once
    records_ds = users_ds.map_batches(build_records, fn_args=(ctx, data_cfg), batch_size=None, batch_format="pyarrow")
    records = pa.concat_tables(ray.get(records_ds.to_arrow_refs()))
    timings["build"] = time.perf_counter() - t
    return users, records


def run_local(ingested: Ingested, data_cfg: DataConfig, timings: dict) -> tuple[pa.Table, pa.Table]:
    """Single-process engine: the same functions in a loop, with a tqdm bar."""
    t = time.perf_counter()
    users = split_users(ingested.interactions, data_cfg)
    timings["split"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx = item_context(ingested.items, [train_rating_sums(users)])
    timings["item_stats"] = time.perf_counter() - t
    t = time.perf_counter()
    step = data_cfg.users_per_block
    parts = [
        build_records(users.slice(lo, step), ctx, data_cfg)
        for lo in tqdm(range(0, users.num_rows, step), desc="build users", unit="block")
    ]
    records = pa.concat_tables(parts) if parts else RECORDS_SCHEMA.empty_table()
    timings["build"] = time.perf_counter() - t
    return users, records


# ---------------------------------------------------------------------------------- outputs

# every per-user output of the data directory, by name; written from any batch of whole users
OUTPUTS = ("split/train", "split/val", "split/test", "split/withheld", "ft", "pairs", "eval/val", "eval/test")


def output_path(out: DataDir, name: str) -> Path:
    """The ``DataDir`` path of an output of ``OUTPUTS``."""
    group, _, part = name.partition("/")
    if group == "split":
        return out.split_path(part)
    if group == "eval":
        return out.eval_path(part)
    return {"ft": out.ft_path, "pairs": out.pairs_path}[group]


def _of_kind(records: pa.Table, kind: str) -> pa.Table:
    return records.filter(pc.equal(records.column("kind"), kind))


def flatten_users(users: pa.Table) -> pa.Table:
    """USERS_SCHEMA rows -> one row per interaction (``user_id, item_id, rating, ts, label``)."""
    items = users.column("items")
    return pa.table(
        {
            "user_id": pc.take(users.column("user_id"), pc.list_parent_indices(items)),
            "item_id": pc.list_flatten(items),
            "rating": pc.list_flatten(users.column("ratings")),
            "ts": pc.list_flatten(users.column("ts")),
            "label": pc.list_flatten(users.column("labels")),
        }
    )


def output_tables(users: pa.Table, records: pa.Table) -> dict[str, pa.Table]:
    """The tables of ``OUTPUTS`` for a batch of whole users (USERS_SCHEMA) and their records."""
    flat = flatten_users(users.filter(pc.equal(users.column("dropped"), "")))
    tables = {
        f"split/{name}": flat.filter(pc.equal(flat.column("label"), label)).drop_columns(["label"])
        for label, name in SPLIT_NAMES.items()
    }
    # window: "main" (golden_fraction; the pairs use it) or "extra" (extra_ft_fractions)
    tables["ft"] = (
        _of_kind(records, "ft")
        .select(["user_id", "prompt_items", "chosen", "family"])
        .rename_columns(["user_id", "prompt_items", "golden", "window"])
    )
    pairs = _of_kind(records, "pair").select(["user_id", "family", "prompt_items", "chosen", "rejected", "reason"])
    tables["pairs"] = pairs.rename_columns(["user_id", "family", "prompt_items", "chosen", "rejected", "window"])
    for split in EVAL_SPLITS:
        ev = _of_kind(records, split).select(["user_id", "prompt_items", "chosen"])
        tables[f"eval/{split}"] = ev.rename_columns(["user_id", "prompt_items", "target"])
    return tables


def output_counts(users: pa.Table, records: pa.Table, tables: dict[str, pa.Table]) -> Counter:
    """What a batch of users contributes to stats.json, as flat keys that add up over batches
    (``GROUP/KEY`` for the nested counts; ``counts_to_stats`` nests them)."""
    counts: Counter = Counter()
    for name in SPLIT_NAMES.values():
        counts[f"split_rows/{name}"] += tables[f"split/{name}"].num_rows
    counts["ft_rows"] += tables["ft"].num_rows
    counts["ft_users"] += pc.count_distinct(tables["ft"].column("user_id")).as_py()  # a user is in one batch
    counts.update(f"pairs_by_family/{f}" for f in tables["pairs"].column("family").to_pylist())
    skips = _of_kind(records, "skip")
    counts.update(
        f"pairs_skipped/{f}: {r}"
        for f, r in zip(skips.column("family").to_pylist(), skips.column("reason").to_pylist())
    )
    capped = _of_kind(records, "capped").column("chosen")
    counts["golden_items_capped"] += int(pc.sum(pc.list_value_length(capped)).as_py() or 0)
    counts["users_with_capped_items"] += len(capped)
    counts["users"] += users.num_rows
    dropped = users.column("dropped").to_pylist()
    counts["users_kept"] += sum(1 for r in dropped if not r)
    counts.update(f"users_dropped/{r}" for r in dropped if r)
    return counts


def counts_to_stats(counts: Counter) -> dict:
    """``output_counts`` summed over batches -> the counts of stats.json."""
    nested = {"split_rows": {name: 0 for name in SPLIT_NAMES.values()}}
    flat = {}
    for key in sorted(counts):
        group, _, name = key.partition("/")
        if name:
            nested.setdefault(group, {})[name] = counts[key]
        else:
            flat[key] = counts[key]
    return {
        "split_rows": nested["split_rows"],
        "ft_rows": flat.get("ft_rows", 0),
        "ft_users": flat.get("ft_users", 0),
        "pairs_by_family": nested.get("pairs_by_family", {}),
        "pairs_skipped": nested.get("pairs_skipped", {}),
        "golden_items_capped": flat.get("golden_items_capped", 0),
        "users_with_capped_items": flat.get("users_with_capped_items", 0),
        "users": flat.get("users", 0),
        "users_kept": flat.get("users_kept", 0),
        "users_dropped": nested.get("users_dropped", {}),
    }


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def clear_outputs(out: DataDir) -> None:
    """Remove the outputs of an earlier run (a file or a directory of parts), so that parts of
    two runs never mix and either engine may follow the other."""
    for path in [out.interactions_path, *(output_path(out, name) for name in OUTPUTS)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_outputs(out: DataDir, ingested: Ingested, users: pa.Table, records: pa.Table, shard_rows: int) -> dict:
    """Every file of the data directory (``DataDir``) but stats.json, from tables held in
    memory (the local and gather engines); returns its counts."""
    clear_outputs(out)
    _write(ingested.interactions, out.interactions_path)
    _write(ingested.items, out.items_path)
    tables = output_tables(users, records)
    for name, table in tables.items():
        path = output_path(out, name)
        if name in ("ft", "pairs"):
            for i, lo in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
                _write(table.slice(lo, shard_rows), path / f"part-{i:05d}.parquet")
        else:
            _write(table, path)
    return counts_to_stats(output_counts(users, records, tables))


def difference(a: DataDir, b: DataDir) -> Optional[str]:
    """The first difference between two data directories, or None: every table read as the
    stages read it (``DataDir``: parts sorted by user), interactions sorted by user, time and
    item (their file order is the engine's), and stats.json without engine and seconds. How
    the engines are held to the same output (tests, bench/data_pipeline.py)."""
    for name in OUTPUTS:
        ta, tb = (d._read(output_path(d, name)) for d in (a, b))
        if not ta.equals(tb):
            return f"{name} differs ({ta.num_rows} vs {tb.num_rows} rows)"
    if not a.read_items().equals(b.read_items()):
        return "items differ"
    order = [(c, "ascending") for c in ("user_id", "ts", "item_id")]
    ia, ib = (d.read_interactions().sort_by(order) for d in (a, b))
    if not ia.equals(ib):
        return f"interactions differ ({ia.num_rows} vs {ib.num_rows} rows)"
    sa, sb = (json.loads(d.stats_path.read_text()) for d in (a, b))
    for st in (sa, sb):
        st.pop("engine"), st.pop("seconds")
    if sa != sb:
        diff = {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}
        return f"stats.json differs: {str(diff)[:2000]}"
    return None


ENGINES = ("ray", "local", "gather")


def build_dataset(
    cfg: PageLLMConfig,
    out_dir: str | Path,
    engine: str = "ray",
    ingested: Optional[Ingested] = None,
    parts_uri: Optional[str] = None,
) -> dict:
    """Run the whole data stage and write ``out_dir``; returns the stats also written to
    ``out_dir/stats.json``. Engines: ``ray`` streams on Ray Data (``pagellm.data.streaming``:
    nothing of the data set's size on the driver); ``local`` is one process, the reference;
    ``gather`` is the earlier Ray engine (the tables on the driver, the per-user steps on Ray),
    kept for the benchmark's comparison. ``ingested``: tables already in memory (local, gather).
    ``parts_uri``: where the ray engine's tasks write the tables when ``out_dir`` is the
    driver's staging directory of a storage URI (``pagellm data --out URI``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    data_cfg = cfg.data
    out = DataDir(out_dir)
    write_config(cfg, out.root)
    timings: dict[str, float] = {}
    if engine == "ray":
        if ingested is not None:
            raise ValueError("the ray engine reads data.dataset in its tasks; ingested= is for local and gather")
        from pagellm.data.streaming import run_stream
        from pagellm.ray_utils import init_ray

        init_ray(cfg.ray)
        ingested, counts, totals = run_stream(cfg, out, timings, parts_uri)
    else:
        t = time.perf_counter()
        if ingested is None:
            ingested = load_dataset(data_cfg.dataset, data_cfg)
        timings["ingest"] = time.perf_counter() - t
        log.info("ingested %d interactions, %d items", ingested.interactions.num_rows, ingested.items.num_rows)
        if engine == "gather":
            from pagellm.ray_utils import init_ray

            init_ray(cfg.ray)
        users, records = (run_gather if engine == "gather" else run_local)(ingested, data_cfg, timings)
        t = time.perf_counter()
        counts = write_outputs(out, ingested, users, records, shard_rows=max(1000, 20 * data_cfg.users_per_block))
        timings["write"] = time.perf_counter() - t
        inter = ingested.interactions
        totals = {
            "interactions": inter.num_rows,
            "positives": int(pc.sum(pc.greater(inter.column("rating"), data_cfg.positive_threshold)).as_py()),
        }

    stats = {
        "dataset": data_cfg.dataset,
        "engine": engine,
        "users": counts.pop("users"),
        "items": ingested.items.num_rows,
        **totals,
        "rows_dropped": ordered_drops(ingested.dropped),
        "rows_dropped_total": int(sum(ingested.dropped.values())),
        "rows_dropped_samples": ingested.drop_samples,
        **counts,
        "pairs_total": int(sum(counts["pairs_by_family"].values())),
        "ingest_notes": ingested.notes,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    out.stats_path.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    if stats["users_kept"] < data_cfg.min_users:
        why = (
            f"no positives: no rating is above data.positive_threshold ({data_cfg.positive_threshold:g})"
            if stats["positives"] == 0
            else f"users dropped by reason: {stats['users_dropped']}"
        )
        raise InputError(
            f"{data_cfg.dataset}: the data stage kept {stats['users_kept']} users, fewer than data.min_users "
            f"({data_cfg.min_users}); {why} (stats: {out.stats_path})"
        )
    return stats
