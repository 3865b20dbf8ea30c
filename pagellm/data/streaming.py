"""The ``ray`` engine of the data stage: every step that touches interactions runs in Ray tasks.

    files --(a task per file: parse, validate, count drops)--> Ray Data blocks
          --(hash shuffle by user: ``repartition(keys=["user_id"])``)--> partitions of whole users
          --(a task per partition: duplicates, split)--> users (object store)
          --(partial sums per partition, ``groupby(item).sum``)--> s_i, popularity: the catalogue
          --(a task per partition: golden lists, pairs, eval rows; written as parquet parts)--> out

The driver holds the catalogue (items, their statistics), per-file logs and per-partition counts:
nothing that grows with the number of interactions. Why a hash repartition and a
``batch_size=None`` map, not ``groupby().map_groups()``: map_groups is exactly that shuffle
followed by one UDF call per user; a partition handed whole to the vectorised ``split_users``
avoids a Python call and an Arrow slice per user (Ray's own map_groups relies on the same
guarantee: after the keyed repartition a block holds every row of its keys).

Outputs are directories of parts (``split/train.parquet/part-<hash>.parquet``, ...) named by a
hash of the partition's users, so a retried task overwrites its own part. ``DataDir`` reads a
directory sorted by user, so the tables equal the local engine's (tested on the real data sets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pagellm.config import DataConfig, PageLLMConfig
from pagellm.data import stage
from pagellm.data.ingest import ReadLog, Source, finish, no_rows_left, open_source, read_interactions, split_spec
from pagellm.data.layout import DataDir
from pagellm.data.schema import (
    RAW_COLUMNS,
    ROW_COLUMNS,
    SAMPLES_PER_REASON,
    Ingested,
    duplicate_mask,
    duplicate_samples,
)
from pagellm.storage import is_uri, resolve

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_user_item"
SUMMARY_SCHEMA = pa.schema([("key", pa.string()), ("count", pa.int64()), ("sample", pa.string())])


# --------------------------------------------------------------------- tasks (plain functions)


def _read_file(source: Source, index: int, data_cfg: DataConfig):
    """Ray task: one interactions file -> (its valid rows, (its log, time format, rows))."""
    table, file_log, ts_format = read_interactions(source, index, data_cfg)
    return table, (file_log, ts_format, table.num_rows)


def _synthetic(n, seed: int):
    """Ray task: the synthetic data set, generated in a worker (not on the driver)."""
    from pagellm.data.synthetic import generate_synthetic

    ingested = generate_synthetic(n, seed)
    table = ingested.interactions
    table = table.append_column("_file", pa.array(np.zeros(table.num_rows, dtype=np.int32)))
    table = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return table, (ingested.items, ingested.notes, table.num_rows)


def split_partition(block: pa.Table, data_cfg: DataConfig) -> pa.Table:
    """A partition of whole users -> USERS_SCHEMA rows, duplicates dropped first (as the local
    engine drops them over the whole table), each user's dropped rows kept in ``duplicates``."""
    dup = duplicate_mask(block)
    users = stage.split_users(block.filter(pa.array(~dup)).drop_columns(list(ROW_COLUMNS)), data_cfg)
    dups = block.filter(pa.array(dup))
    where = pc.index_in(dups.column("user_id"), value_set=users.column("user_id")).to_numpy()
    order = np.argsort(where, kind="stable")
    offsets = np.r_[0, np.cumsum(np.bincount(where, minlength=users.num_rows))].astype(np.int32)
    fields = [dups.column(c).combine_chunks().take(pa.array(order)) for c in (*RAW_COLUMNS, *ROW_COLUMNS)]
    rows = pa.StructArray.from_arrays(fields, names=[*RAW_COLUMNS, *ROW_COLUMNS])
    return users.append_column("duplicates", pa.ListArray.from_arrays(pa.array(offsets), rows))


def item_partials(users: pa.Table) -> pa.Table:
    """Per item of a partition: interactions (any split, any user: what the items table keeps)
    and the sum and count of training ratings (s_i). Partial sums add up over partitions."""
    seen = pa.table({"item_id": pc.list_flatten(users.column("items"))})
    seen = seen.group_by("item_id").aggregate([("item_id", "count")]).rename_columns(["item_id", "n"])
    train = stage.train_rating_sums(users).rename_columns(["item_id", "rating_sum", "rating_count"])
    joined = seen.join(train, "item_id", join_type="left outer")
    return pa.table(
        {
            "item_id": joined.column("item_id"),
            "n": joined.column("n"),
            "rating_sum": pc.fill_null(joined.column("rating_sum"), 0.0),
            "rating_count": pc.fill_null(joined.column("rating_count"), 0),
        }
    )


def add_partials(*partials: pa.Table) -> pa.Table:
    """``item_partials`` of several partitions -> one table of the same columns."""
    total = (
        pa.concat_tables(partials)
        .group_by("item_id")
        .aggregate([("n", "sum"), ("rating_sum", "sum"), ("rating_count", "sum")])
    )
    return total.rename_columns(["item_id", "n", "rating_sum", "rating_count"])


def part_name(users: pa.Table) -> str:
    """A name fixed by the partition's users: a retried task overwrites its own parts."""
    ids = users.column("user_id")
    key = f"{ids[0].as_py()}\x00{ids[-1].as_py()}\x00{len(ids)}" if len(ids) else "empty"
    return f"part-{hashlib.sha1(key.encode()).hexdigest()[:20]}.parquet"


def build_partition(users: pa.Table, ctx, data_cfg: DataConfig, root: str) -> pa.Table:
    """A partition's users -> every output's part written to ``root``; returns SUMMARY_SCHEMA
    rows: the partition's counts (``stage.output_counts`` keys and totals) and, per dropped
    duplicate among the first few of the partition, a JSON sample."""
    records = stage.build_records(users.drop_columns(["duplicates"]), ctx, data_cfg)
    tables = stage.output_tables(users, records)
    name = part_name(users)
    interactions = stage.flatten_users(users).drop_columns(["label"])  # every user, kept or not
    fs, base = _filesystem(root)
    for rel, table in [*((_rel(output), t) for output, t in tables.items()), (_rel(None), interactions)]:
        path = f"{base}/{rel}/{name}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)

    counts = stage.output_counts(users, records, tables)
    counts["interactions"] += interactions.num_rows
    positive = pc.greater(interactions.column("rating"), data_cfg.positive_threshold)
    counts["positives"] += int(pc.sum(positive).as_py() or 0)
    dups = pa.Table.from_struct_array(pc.list_flatten(users.column("duplicates")))
    counts[f"rows_dropped/{DUPLICATE}"] += dups.num_rows
    first = dups.take(pc.sort_indices(dups, sort_keys=[(c, "ascending") for c in ROW_COLUMNS])[:SAMPLES_PER_REASON])
    keys = [*counts, *([f"sample/{DUPLICATE}"] * first.num_rows)]
    samples = [""] * len(counts) + [json.dumps(row) for row in first.to_pylist()]
    return pa.table(
        {"key": keys, "count": [counts[k] for k in counts] + [0] * first.num_rows, "sample": samples},
        schema=SUMMARY_SCHEMA,
    )


def _rel(output) -> str:
    """An output's path inside the data directory (``None``: interactions.parquet)."""
    here = DataDir(Path("."))
    return (here.interactions_path if output is None else stage.output_path(here, output)).as_posix()


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A local directory or a storage URI (every node of a cluster writes its parts there)."""
    if is_uri(root):
        return resolve(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def clear_parts(root: str) -> None:
    """Remove the outputs of an earlier run under ``root`` (files or directories of parts)."""
    fs, base = _filesystem(root)
    for rel in [_rel(None), *(_rel(o) for o in stage.OUTPUTS)]:
        info = fs.get_file_info(f"{base}/{rel}")
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)


# --------------------------------------------------------------------------------- the driver


def wait_for_free_cpu(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until the cluster's resource view shows a free CPU. Called
    before each dataset runs: the tasks that just finished (the reads, the previous dataset's map
    tasks) leave the view a moment after ``ray.get`` returns, and a dataset started in that window
    makes Ray Data warn that it "will hang unless more CPUs are freed up" (seen in a job's log on a
    2-CPU cluster), which here it would not."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)


def run_stream(
    cfg: PageLLMConfig, out: DataDir, timings: dict, parts_root: Optional[str] = None
) -> tuple[Ingested, dict, dict]:
    """Run the engine; the driver writes items.parquet to ``out``, the tasks every other table
    to ``parts_root`` (default ``out``; a storage URI when ``out`` is the driver's staging
    directory of a multi-node run). Returns (items, drops and notes as an ``Ingested`` without
    interactions, the counts of ``stage.counts_to_stats``, the interaction totals)."""
    import ray

    parts_root = parts_root or str(out.root)
    if not is_uri(parts_root) and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log.warning(
            "the ray engine's tasks write the tables on their own nodes: %s must be a directory every node "
            "mounts (else give --out a storage URI)",
            parts_root,
        )

    data_cfg = cfg.data
    _add_partials = ray.remote(add_partials)
    t = time.perf_counter()
    blocks, rows, ingest_log, finish_items = _ingest(data_cfg)
    timings["ingest"] = time.perf_counter() - t
    log.info("read %d valid interaction rows", rows)

    t = time.perf_counter()
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    partitions = max(2 * cpus, math.ceil(rows / data_cfg.rows_per_partition))
    wait_for_free_cpu()
    users_ds = (
        blocks.repartition(partitions, keys=["user_id"])
        .map_batches(split_partition, fn_args=(data_cfg,), batch_size=None, batch_format="pyarrow")
        .materialize()
    )
    timings["split"] = time.perf_counter() - t

    t = time.perf_counter()
    wait_for_free_cpu()
    # a tree of small tasks: each partial is catalogue-sized; the driver gets one table
    sums = users_ds.map_batches(item_partials, batch_size=None, batch_format="pyarrow").to_arrow_refs()
    while len(sums) > 1:
        sums = [_add_partials.remote(*sums[i : i + 8]) for i in range(0, len(sums), 8)]
    sums = ray.get(sums[0])
    ingested = finish_items(sums.column("item_id"))
    trained = sums.filter(pc.greater(sums.column("rating_count"), 0)).select(["item_id", "rating_sum", "rating_count"])
    ctx = stage.item_context(ingested.items, [trained])
    timings["item_stats"] = time.perf_counter() - t

    t = time.perf_counter()
    stage.clear_outputs(out)
    clear_parts(parts_root)
    stage._write(ingested.items, out.items_path)
    wait_for_free_cpu()
    summary = users_ds.map_batches(
        build_partition,
        fn_args=(ctx, data_cfg, parts_root),
        batch_size=None,
        batch_format="pyarrow",
    )
    summary = pa.concat_tables(ray.get(summary.to_arrow_refs()))
    timings["build"] = time.perf_counter() - t

    t = time.perf_counter()
    counts, samples = Counter(), []
    for key, count, sample in zip(*(summary.column(c).to_pylist() for c in SUMMARY_SCHEMA.names)):
        if sample:
            samples.append(json.loads(sample))
        else:
            counts[key] += count
    duplicates = counts.pop(f"rows_dropped/{DUPLICATE}", 0)
    if duplicates:
        ingested.dropped[DUPLICATE] += duplicates
        first = pa.Table.from_pylist(samples)  # each partition's first few: the first few overall
        every = np.ones(first.num_rows, dtype=bool)
        ingest_log["log"].add_samples(DUPLICATE, duplicate_samples(first, every, ingest_log["files"]))
        ingested.drop_samples = ingest_log["log"].samples
    totals = {"interactions": counts.pop("interactions"), "positives": counts.pop("positives")}
    timings["write"] = time.perf_counter() - t
    return ingested, stage.counts_to_stats(counts), totals


def _ingest(data_cfg: DataConfig):
    """Start the reads: (a Dataset of validated rows with ``ROW_COLUMNS``, their count, the
    read log, a function of the seen item ids -> ``Ingested`` without interactions). Only the
    items file is read on the driver (the catalogue); interactions stay in the object store."""
    import ray

    kind, _ = split_spec(data_cfg.dataset)
    if kind == "synthetic":
        from pagellm.data.ingest import synthetic_count

        ref, info = ray.remote(num_returns=2)(_synthetic).remote(synthetic_count(data_cfg.dataset), data_cfg.seed)
        items, notes, rows = ray.get(info)

        def finish_synthetic(seen):
            return Ingested(None, items, notes=notes)

        return ray.data.from_arrow_refs([ref]), rows, {"log": ReadLog(), "files": []}, finish_synthetic

    source = open_source(data_cfg.dataset, data_cfg)
    read_log = ReadLog()
    items = source.read_items(read_log)
    read = ray.remote(num_returns=2)(_read_file)
    refs = [read.remote(source, i, data_cfg) for i in range(len(source.ratings))]
    formats, rows = [], 0
    for file_log, ts_format, n in ray.get([info for _, info in refs]):  # small: counts and a few samples
        read_log.merge(file_log)
        formats.append(ts_format)
        rows += n
    if rows == 0:
        raise no_rows_left(source, read_log)
    files = [str(p) for p in source.ratings]
    return (
        ray.data.from_arrow_refs([table for table, _ in refs]),
        rows,
        {"log": read_log, "files": files},
        lambda seen: finish(source, read_log, formats, seen, items),
    )
