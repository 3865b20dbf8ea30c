"""The data stage end to end on a local Ray: real data sets, synthetic data, both engines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pagellm.cli import main
from pagellm.config import load_config
from pagellm.data.ingest import load_dataset
from pagellm.data.layout import DataDir
from pagellm.data.stage import build_dataset, difference
from pagellm.errors import InputError
from tests.conftest import AMAZON, MOVIELENS
from tests.output_checks import check_outputs

FILES = [
    "interactions.parquet",
    "items.parquet",
    "split/train.parquet",
    "split/val.parquet",
    "split/test.parquet",
    "eval/val.parquet",
    "eval/test.parquet",
    "stats.json",
]


@pytest.mark.parametrize(
    "spec,min_users,extra_pairs",
    [(f"amazon2014:{AMAZON}", 1000, True), (f"movielens:{MOVIELENS}", 500, False), ("synthetic:20000", 500, True)],
    ids=["amazon2014", "movielens", "synthetic"],
)
def test_pipeline_writes_valid_outputs(ray_session, tmp_path, spec, min_users, extra_pairs):
    cfg = load_config(
        overrides=[
            f"data.dataset={spec}",
            "data.extra_ft_fractions=[0.25,0.75]",
            f"data.pairs_from_extra_windows={extra_pairs}",
        ]
    )
    stats = build_dataset(cfg, tmp_path, engine="ray")
    for name in FILES:
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "ft").glob("*.parquet")) and list((tmp_path / "pairs").glob("*.parquet"))
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats, default=str))
    assert stats["users_kept"] > min_users
    assert set(stats["pairs_by_family"]) == set(cfg.data.pair_families) == {"np", "rk", "d", "rd", "pm"}
    assert all(n > 0 for n in stats["pairs_by_family"].values())
    assert stats["users_kept"] + sum(stats["users_dropped"].values()) == stats["users"]
    checked = check_outputs(tmp_path, cfg.data)
    assert checked["users"] == stats["users_kept"]
    assert checked["ft"] == stats["ft_rows"] > checked["ft_users"] == stats["ft_users"]
    assert dict(checked["pairs"]) == stats["pairs_by_family"]
    assert set(stats["seconds"]) == {"ingest", "split", "item_stats", "build", "write"}
    windows = set(pq.read_table(tmp_path / "pairs", columns=["window"]).column("window").to_pylist())
    assert windows == ({"main", "extra"} if extra_pairs else {"main"})
    # the streaming engine's parts (several partitions) read as the single-process engine's tables
    assert len(list((tmp_path / "split" / "train.parquet").glob("part-*.parquet"))) > 1
    build_dataset(cfg, tmp_path / "local", engine="local")
    assert difference(DataDir(tmp_path), DataDir(tmp_path / "local")) is None


def test_engines_agree_and_are_deterministic(ray_session, tmp_path):
    cfg = load_config(
        overrides=["data.dataset=synthetic:8000", "data.users_per_block=50", "data.rows_per_partition=1000"]
    )
    ingested = load_dataset(cfg.data.dataset, cfg.data)
    build_dataset(cfg, tmp_path / "ray", engine="ray")
    build_dataset(cfg, tmp_path / "ray2", engine="ray")
    build_dataset(cfg, tmp_path / "gather", engine="gather", ingested=ingested)
    build_dataset(cfg, tmp_path / "local", engine="local", ingested=ingested)
    ray_dir = DataDir(tmp_path / "ray")
    assert ray_dir.read_ft().num_rows > 0
    for other in ("ray2", "gather", "local"):
        assert difference(ray_dir, DataDir(tmp_path / other)) is None, other
    for name in ["split/train.parquet", "eval/val.parquet", "ft", "pairs"]:  # the parts, file by file
        assert sorted(p.name for p in (tmp_path / "ray" / name).iterdir()) == sorted(
            p.name for p in (tmp_path / "ray2" / name).iterdir()
        )
    other = load_config(overrides=["data.dataset=synthetic:8000", "data.seed=1"])
    build_dataset(other, tmp_path / "seed1", engine="local")
    assert not DataDir(tmp_path / "seed1").read_pairs().equals(DataDir(tmp_path / "local").read_pairs())
    with pytest.raises(ValueError, match="ingested= is for local and gather"):
        build_dataset(cfg, tmp_path / "no", engine="ray", ingested=ingested)
    # to a storage URI: the tasks write their parts there, the driver only items, config and stats
    uri = f"file://{tmp_path / 'uri'}"
    overrides = ["data.users_per_block=50", "data.rows_per_partition=1000"]
    assert main(["data", "--dataset", "synthetic:8000", "--out", uri, *overrides]) == 0
    assert difference(DataDir(tmp_path / "uri"), ray_dir) is None


def test_sharded_input_read_in_tasks_counts_and_locates_drops_like_one_process(ray_session, tmp_path):
    """A directory of CSV shards (one gzipped) read one file per task: rows dropped inside the
    tasks (bad values) and after the shuffle (a (user, item) repeated across shards, the later
    shard's row kept on equal times) are counted and located by file and line exactly as the
    local engine does, and every table is the same."""
    shards = tmp_path / "in"
    shards.mkdir()
    head = "user_id,item_id,rating,ts"
    good = [f"u{u},i{(u * 7 + k) % 40},{4 + (k % 2)},{1000 * k + u}" for u in range(60) for k in range(12)]
    user, item, _, ts = good[3].split(",")
    parts = [good[:240], good[240:480], good[480:]]
    parts[0] = parts[0] + ["u1,i0,abc,5"]  # bad_rating
    parts[1] = [",i4,5,8"] + parts[1]  # missing_user_id, line 2 of the gzipped shard
    parts[2] = parts[2] + [f"{user},{item},2,{ts}", "u5,i2,9,9"]  # a repeat of a.csv line 5; out of range
    (shards / "a.csv").write_text("\n".join([head, *parts[0]]) + "\n")
    with gzip.open(shards / "b.csv.gz", "wt") as fh:
        fh.write("\n".join([head, *parts[1]]) + "\n")
    (shards / "c.csv").write_text("\n".join([head, *parts[2]]) + "\n")
    cfg = load_config(overrides=[f"data.dataset=csv:{shards}", "data.rows_per_partition=100", "data.min_users=1"])
    stats = build_dataset(cfg, tmp_path / "ray", engine="ray")
    local = build_dataset(cfg, tmp_path / "local", engine="local")
    assert stats["rows_dropped"] == {
        "bad_rating": 1,
        "missing_user_id": 1,
        "duplicate_user_item": 1,
        "rating_out_of_range": 1,
    }
    dup = stats["rows_dropped_samples"]["duplicate_user_item"]
    assert [(Path(s["file"]).name, s["line"]) for s in dup] == [("a.csv", 5)]  # the later shard's row is kept
    assert stats["rows_dropped_samples"]["missing_user_id"][0]["line"] == 2
    assert stats["ingest_notes"]["files"] == [str(shards / n) for n in ("a.csv", "b.csv.gz", "c.csv")]
    assert stats["rows_dropped_samples"] == local["rows_dropped_samples"]
    assert difference(DataDir(tmp_path / "ray"), DataDir(tmp_path / "local")) is None
    kept = DataDir(tmp_path / "ray").read_interactions().to_pandas()
    assert kept[(kept.user_id == user) & (kept.item_id == item)].rating.tolist() == [2.0]


def test_category_cap_changes_golden_lists(tmp_path):
    loose = load_config(overrides=["data.dataset=synthetic:8000", "data.category_cap=1.0"])
    tight = load_config(overrides=["data.dataset=synthetic:8000", "data.category_cap=0.2"])
    s_loose = build_dataset(loose, tmp_path / "loose", engine="local")
    s_tight = build_dataset(tight, tmp_path / "tight", engine="local")
    assert s_loose["golden_items_capped"] == 0 < s_tight["golden_items_capped"]
    check_outputs(tmp_path / "tight", tight.data)


def test_dropped_rows_are_counted_in_stats(tmp_path):
    src = tmp_path / "in.csv"
    rows = ["user_id,item_id,rating,ts"]
    rows += [f"u{u},i{i},{4 + (i % 2)},{100 * i}" for u in range(6) for i in range(12)]
    rows += ["u0,i0,5,5000", "u1,i3,abc,7", ",i4,5,8", "u2,i5,9,9", "u3,i6,4,notatime"]
    src.write_text("\n".join(rows) + "\n")
    cfg = load_config(overrides=[f"data.dataset=csv:{src}"])
    stats = build_dataset(cfg, tmp_path / "out", engine="local")
    assert stats["rows_dropped"] == {
        "duplicate_user_item": 1,
        "bad_rating": 1,
        "missing_user_id": 1,
        "rating_out_of_range": 1,
        "bad_timestamp": 1,
    }
    assert stats["interactions"] == 72
    # each reason locates its rows: the file, the data row (1-based, header not counted), its line, the raw values
    samples = stats["rows_dropped_samples"]
    assert samples["bad_timestamp"] == [
        {
            "file": str(src),
            "row": 77,
            "line": 78,  # the header is line 1
            "raw": {"user_id": "u3", "item_id": "i6", "rating": "4", "ts": "notatime"},
        }
    ]
    assert [s["row"] for s in samples["duplicate_user_item"]] == [1]  # u0,i0 at ts 0: the later row (73) is kept
    assert samples["missing_user_id"][0]["row"] == 75 and samples["bad_rating"][0]["raw"]["rating"] == "abc"


def test_data_dir_views_match_the_split_files(tmp_path):
    """DataDir: one error naming the missing file; the evaluation view's history and seen items
    are exactly the user's interactions in the earlier splits, in time order."""
    with pytest.raises(InputError, match=r"missing eval/val.parquet"):
        DataDir(tmp_path).read_eval("val")
    cfg = load_config(overrides=["data.dataset=synthetic:3000"])
    build_dataset(cfg, tmp_path, engine="local")
    data = DataDir(tmp_path)
    split = {s: pq.read_table(data.split_path(s)).to_pandas() for s in ("train", "val", "test")}
    for name, earlier in (("val", ["train"]), ("test", ["train", "val"])):
        users = data.eval_users(name, cfg.data.positive_threshold)
        assert list(users.user_id) == pq.read_table(data.eval_path(name)).column("user_id").to_pylist()
        before = pd.concat([split[s] for s in earlier]).sort_values(["user_id", "ts"], kind="stable")
        for row in users.sample(20, random_state=0).itertuples():
            mine = before[before.user_id == row.user_id]
            assert row.seen == list(mine.item_id)
            assert row.history == list(mine[mine.rating > cfg.data.positive_threshold].item_id)
            assert set(row.prompt_items) <= set(row.history) and not set(row.target) & set(row.seen)


def test_cold_start_keeps_a_seeded_share_of_training_only(ray_session, tmp_path):
    """data.train_keep (paper 5.6): validation and test are the full run's; every user keeps
    round(keep * n) of their n training interactions (at least one); the rest are written to
    split/withheld.parquet and appear in no prompt, golden list, pair or evaluation mask."""
    full_cfg = load_config(overrides=["data.dataset=synthetic:8000", "data.users_per_block=50"])
    cold_cfg = load_config(overrides=["data.dataset=synthetic:8000", "data.users_per_block=50", "data.train_keep=0.5"])
    build_dataset(full_cfg, tmp_path / "full", engine="local")
    stats = build_dataset(cold_cfg, tmp_path / "cold", engine="ray")
    build_dataset(cold_cfg, tmp_path / "local", engine="local")
    full, cold = DataDir(tmp_path / "full"), DataDir(tmp_path / "cold")
    for split in ("val", "test"):
        assert cold.read_split(split).equals(full.read_split(split))
    assert cold.read_split("train").equals(DataDir(tmp_path / "local").read_split("train"))
    train, withheld = cold.read_split("train").to_pandas(), cold.read_split("withheld").to_pandas()
    assert stats["split_rows"]["withheld"] == len(withheld) > 0
    whole = pd.concat([train, withheld]).sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True)
    expected = full.read_split("train").to_pandas().sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(whole, expected)
    n_full, n_kept = expected.groupby("user_id").size(), train.groupby("user_id").size()
    assert (n_kept == (0.5 * n_full + 0.5).astype(int).clip(lower=1)).all()
    gone = set(zip(withheld.user_id, withheld.item_id))
    for table in (cold.read_ft().to_pandas(), cold.read_pairs().to_pandas()):
        for row in table.itertuples():
            lists = [row.prompt_items, *(getattr(row, c) for c in ("golden", "chosen") if hasattr(row, c))]
            assert not any((row.user_id, i) in gone for items in lists for i in items)
    users = cold.eval_users("test", cold_cfg.data.positive_threshold)
    assert not any((u, i) in gone for u, seen in zip(users.user_id, users.seen) for i in seen)
    check_outputs(tmp_path / "cold", cold_cfg.data)
