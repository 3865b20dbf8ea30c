"""Ingestion adapters on the real data sets and on small files written per test (no mocks)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pagellm.config import DataConfig
from pagellm.data.ingest import KINDS, META_DROP, _parse_count, load_dataset
from pagellm.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, RAW_COLUMNS, UNKNOWN_CATEGORY
from pagellm.errors import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMAZON = DATA / "amazon2014-musical-instruments"
MOVIELENS = DATA / "movielens-latest-small"

META_JSON = [
    {"asin": "A1", "title": "Red Pick", "brand": "Fender",
     "categories": [["Musical Instruments", "Accessories", "Picks"], ["Gifts", "Picks"]]},
    {"asin": "B2", "title": 'Strap "Deluxe"', "categories": [["Musical Instruments", "Straps"]]},
    {"asin": "C3", "title": "Cable", "brand": "Monster", "categories": []},
]  # fmt: skip
RATINGS = "A1,u1,5.0,1000\nB2,u1,4.0,1001\nC3,u2,2.0,1002\nA1,u2,3.0,1003\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write(text)
    return path


def meta_lines(records, python_literal=False) -> str:
    return "".join((repr(r) if python_literal else json.dumps(r)) + "\n" for r in records)


def amazon_dir(root: Path, ratings: str = RATINGS, meta: str | None = None, name="r.csv") -> Path:
    root.mkdir(exist_ok=True)
    write(root / name, ratings)
    write(root / "x_meta.json", meta if meta is not None else meta_lines(META_JSON))
    return root


def frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas()


def items_by_id(ing) -> dict:
    return {r["item_id"]: r for r in ing.items.to_pylist()}


@pytest.fixture
def cfg() -> DataConfig:
    return DataConfig()


# ------------------------------------------------------------------------------ real data sets
@pytest.mark.skipif(not AMAZON.is_dir(), reason="shared Amazon data not present")
def test_real_amazon2014(cfg):
    ing = load_dataset(f"amazon2014:{AMAZON}", cfg)
    inter = frame(ing.interactions)
    assert ing.interactions.schema.equals(INTERACTIONS_SCHEMA, check_metadata=False)
    assert ing.items.schema.equals(ITEMS_SCHEMA, check_metadata=False)
    assert (len(inter), inter.user_id.nunique(), inter.item_id.nunique()) == (10_261, 1_429, 900)
    assert ing.items.num_rows == 900
    assert inter.rating.value_counts().to_dict() == {5.0: 6938, 4.0: 2084, 3.0: 772, 2.0: 250, 1.0: 217}
    items = items_by_id(ing)
    assert all(r["category"] != UNKNOWN_CATEGORY for r in items.values())
    assert items["1384719342"]["category"] == "Windsreens & Pop Filters"
    assert items["1384719342"]["brand"] == "niceEshop"
    # every item: the leaf of its first category path, read independently of the adapter
    with open(AMAZON / "Musical_Instruments_meta_5.json") as fh:
        leaves = {r["asin"]: r["categories"][0][-1] for r in map(json.loads, fh)}
    assert {k: r["category"] for k, r in items.items()} == leaves
    assert not ing.dropped
    names = [Path(f).name for f in ing.notes["files"]]
    assert names == ["Musical_Instruments_5.csv", "Musical_Instruments_meta_5.json"]


@pytest.mark.skipif(not MOVIELENS.is_dir(), reason="shared MovieLens data not present")
def test_real_movielens(cfg):
    ing = load_dataset(f"movielens:{MOVIELENS}", cfg)
    inter = frame(ing.interactions)
    assert (len(inter), inter.user_id.nunique(), inter.item_id.nunique()) == (100_836, 610, 9_724)
    assert inter.rating.min() == 0.5 and inter.rating.max() == 5.0
    movies = pd.read_csv(MOVIELENS / "movies.csv", dtype=str)
    genres = {g for gs in movies.genres for g in gs.split("|")} - {"(no genres listed)"}
    assert len(genres) == 19
    items = items_by_id(ing)
    for row in items.values():
        assert set(row["categories"]) <= genres
        assert row["category"] == (row["categories"][0] if row["categories"] else UNKNOWN_CATEGORY)
    assert items["1"]["categories"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert items["1"]["title"] == "Toy Story (1995)" and items["1"]["brand"] is None
    no_genre = set(movies.movieId[movies.genres == "(no genres listed)"]) & set(items)
    assert no_genre and all(items[m]["category"] == UNKNOWN_CATEGORY for m in no_genre)


# ---------------------------------------------------------------------------- amazon 2014 forms
def test_python_literal_and_json_meta_give_same_items(tmp_path, cfg):
    a = load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'a')}", cfg)
    b = load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'b', meta=meta_lines(META_JSON, True))}", cfg)
    assert "'asin': 'A1'" in (tmp_path / "b" / "x_meta.json").read_text()  # really Python literals
    assert a.items.equals(b.items)
    items = items_by_id(a)
    assert items["A1"]["category"] == "Picks"
    assert items["A1"]["categories"] == ["Picks", "Musical Instruments", "Accessories", "Gifts"]
    assert items["B2"]["title"] == 'Strap "Deluxe"' and items["B2"]["brand"] is None
    assert items["C3"]["category"] == UNKNOWN_CATEGORY and items["C3"]["categories"] == []


def test_ratings_csv_with_and_without_header(tmp_path, cfg):
    spaced = "asin, reviewerID, overall, unixReviewTime\n" + RATINGS.replace(",", ", ")
    with_header = load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'h', spaced)}", cfg)
    without = load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'n', RATINGS)}", cfg)
    assert with_header.interactions.equals(without.interactions)
    inter = frame(without.interactions)
    assert inter.to_dict("list") == {
        "user_id": ["u1", "u1", "u2", "u2"],
        "item_id": ["A1", "B2", "C3", "A1"],
        "rating": [5.0, 4.0, 2.0, 3.0],
        "ts": [1000, 1001, 1002, 1003],
    }


def test_headerless_user_first_dump_is_recognised(tmp_path, cfg):
    # McAuley's ratings-only dumps put the reviewer first; ASINs are always 10 characters
    ratings = write(tmp_path / "ratings.csv", "A2IBPI20UZIR0U,1384719342,5.0,1393545600\n")
    meta = write(tmp_path / "m.json", '{"asin": "1384719342", "categories": [["Music", "Picks"]]}\n')
    ing = load_dataset(f"amazon2014:{ratings},{meta}", cfg)
    assert ing.interactions.to_pylist() == [
        {"user_id": "A2IBPI20UZIR0U", "item_id": "1384719342", "rating": 5.0, "ts": 1393545600}
    ]


def test_explicit_ratings_meta_pair_and_header_order(tmp_path, cfg):
    # a header may order the columns differently; names, not positions, decide
    ratings = write(tmp_path / "ratings.csv", "reviewerID,unixReviewTime,asin,overall\nu1,5,A1,4\n")
    meta = write(tmp_path / "m.json", meta_lines(META_JSON))
    ing = load_dataset(f"amazon2014:{ratings},{meta}", cfg)
    assert ing.interactions.to_pylist() == [{"user_id": "u1", "item_id": "A1", "rating": 4.0, "ts": 5}]
    assert ing.items.column("item_id").to_pylist() == ["A1"]


def test_reviews_json_lines(tmp_path, cfg):
    reviews = [
        {"reviewerID": "u1", "asin": "A1", "overall": 5.0, "unixReviewTime": 1000, "reviewText": "ok"},
        {"reviewerID": "u2", "asin": "B2", "overall": 2.0, "unixReviewTime": 1001},
    ]
    root = amazon_dir(tmp_path / "d", meta_lines(reviews), name="Reviews_5.json")
    ing = load_dataset(f"amazon2014:{root}", cfg)
    assert frame(ing.interactions)[["user_id", "item_id", "rating"]].values.tolist() == [
        ["u1", "A1", 5.0],
        ["u2", "B2", 2.0],
    ]
    assert ing.notes["items_without_interactions"] == 1  # C3 has metadata but no rating


# ---------------------------------------------------------------------------------- amazon 2018
def test_amazon2018_gzip(tmp_path, cfg):
    reviews = [
        {"overall": 5.0, "verified": True, "reviewerID": "u1", "asin": "P1", "unixReviewTime": 1500000000},
        {"overall": 1.0, "reviewerID": "u2", "asin": "P2", "unixReviewTime": 1500000001},
        {"overall": 3.0, "reviewerID": "u2", "asin": "P3", "unixReviewTime": 1500000002},
    ]
    meta = [
        {"asin": "P1", "title": "Guitar", "brand": "Yamaha", "category": ["Instruments", "Guitars", ""]},
        {"asin": "P2", "title": '<span class="a">junk</span>', "brand": "", "category": ["Instruments"]},
        {"asin": "P1", "title": "duplicate line", "category": ["Other"]},
    ]
    gz(tmp_path / "Music.json.gz", meta_lines(reviews))
    gz(tmp_path / "meta_Music.json.gz", meta_lines(meta))
    ing = load_dataset(f"amazon2018:{tmp_path}", cfg)
    assert frame(ing.interactions).item_id.tolist() == ["P1", "P2", "P3"]
    items = items_by_id(ing)
    assert items["P1"]["category"] == "Guitars" and items["P1"]["title"] == "Guitar"
    assert items["P1"]["categories"] == ["Instruments", "Guitars"]
    assert items["P2"]["title"] == '<span class="a">junk</span>' and items["P2"]["brand"] is None  # blank means missing
    assert items["P3"]["category"] == UNKNOWN_CATEGORY
    assert ing.notes["item_metadata_duplicates"] == 1 and ing.notes["items_without_metadata"] == 1
    pair = load_dataset(f"amazon2018:{tmp_path / 'Music.json.gz'},{tmp_path / 'meta_Music.json.gz'}", cfg)
    assert pair.items.equals(ing.items) and pair.interactions.equals(ing.interactions)


# ------------------------------------------------------------------------------------ movielens
def test_movielens_100k(tmp_path, cfg):
    write(tmp_path / "u.data", "1\t10\t4\t881250949\n2\t20\t1\t891717742\n2\t30\t5\t878887116\n")
    flags = {10: [1] + [0] * 18, 20: [0, 1, 0, 0, 0, 1] + [0] * 13, 30: [0] * 19}
    flags[30][9] = flags[30][18] = 1  # Fantasy, Western
    lines = [
        f"{m}|{t}|01-Jan-1995||http://x?{m}|" + "|".join(map(str, flags[m]))
        for m, t in ((10, 'Café "Noir" (1995)'), (20, "Heat (1995)"), (30, "Tombstone (1993)"))
    ]
    (tmp_path / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    ing = load_dataset(f"movielens:{tmp_path}", cfg)
    assert frame(ing.interactions).values.tolist() == [
        ["1", "10", 4.0, 881250949],
        ["2", "20", 1.0, 891717742],
        ["2", "30", 5.0, 878887116],
    ]
    items = items_by_id(ing)
    assert items["10"]["title"] == 'Café "Noir" (1995)'
    assert items["10"]["category"] == UNKNOWN_CATEGORY and items["10"]["categories"] == []
    assert items["20"]["category"] == "Action" and items["20"]["categories"] == ["Action", "Comedy"]
    assert items["30"]["categories"] == ["Fantasy", "Western"]


def test_movielens_latest_crlf_and_no_genres(tmp_path, cfg):
    ratings = "userId,movieId,rating,timestamp\r\n1,1,4.5,964982703\r\n1,2,0.5,964981247\r\n"
    write(tmp_path / "ratings.csv", ratings)
    movies = 'movieId,title,genres\r\n1,"Toy, Story (1995)",Comedy|Drama\r\n2,X,(no genres listed)\r\n'
    write(tmp_path / "movies.csv", movies)
    ing = load_dataset(f"movielens:{tmp_path}", cfg)
    assert frame(ing.interactions).rating.tolist() == [4.5, 0.5]
    items = items_by_id(ing)
    assert items["1"]["title"] == "Toy, Story (1995)" and items["1"]["category"] == "Comedy"
    assert items["2"]["category"] == UNKNOWN_CATEGORY and items["2"]["categories"] == []


# -------------------------------------------------------------------------------- csv / parquet
def mapped_cfg(items_path=None, **item_columns) -> DataConfig:
    return DataConfig(
        columns={"user_id": "uid", "item_id": "iid", "rating": "stars", "ts": "when"},
        items_path=str(items_path) if items_path else None,
        item_columns={"item_id": "iid", **item_columns},
    )


def test_csv_with_mapping_and_items_file(tmp_path):
    data = write(tmp_path / "inter.csv", "when,uid,iid,stars,extra\n5,u1,007,4,x\n6,u2,8,2,y\n7,u2,9,5,z\n")
    items = write(tmp_path / "items.csv", "iid,genre,name\n007,Rock|Pop,Song A\n8,,Song B\n")
    ing = load_dataset(f"csv:{data}", mapped_cfg(items, category="genre", title="name"))
    expected = [["u1", "007", 4.0, 5], ["u2", "8", 2.0, 6], ["u2", "9", 5.0, 7]]
    assert frame(ing.interactions).values.tolist() == expected
    rows = items_by_id(ing)
    assert rows["007"] == {
        "item_id": "007",
        "category": "Rock",
        "categories": ["Rock", "Pop"],
        "title": "Song A",
        "brand": None,
    }
    assert rows["8"]["category"] == UNKNOWN_CATEGORY and rows["8"]["title"] == "Song B"
    assert rows["9"]["category"] == UNKNOWN_CATEGORY  # no metadata row
    assert [Path(f).name for f in ing.notes["files"]] == ["inter.csv", "items.csv"]
    plain = load_dataset(f"csv:{data}", mapped_cfg())  # no items file: everything unknown
    assert set(plain.items.column("category").to_pylist()) == {UNKNOWN_CATEGORY}
    assert plain.items.num_rows == 3


def test_parquet_with_mapping_and_items_file(tmp_path):
    data = tmp_path / "inter.parquet"
    big = 12345678901234567  # beyond float precision: must stay exact as text
    uid = pa.array([1, 2, None, big], pa.int64())
    inter = {"uid": uid, "iid": [10, 20, 10, 10], "stars": [4.0, 1.0, 3.0, 2.0], "when": [1, 2, 3, 4]}
    pq.write_table(pa.table(inter), data)
    items = tmp_path / "items.parquet"
    meta = {"iid": [10, 20, None], "cats": [["Jazz", "Bebop"], [], ["X"]], "maker": ["Blue Note", None, "Y"]}
    pq.write_table(pa.table(meta), items)
    ing = load_dataset(f"parquet:{data}", mapped_cfg(items, category="cats", brand="maker"))
    expected = [["1", "10", 4.0, 1], ["2", "20", 1.0, 2], [str(big), "10", 2.0, 4]]
    assert frame(ing.interactions).values.tolist() == expected
    assert ing.dropped == {"missing_user_id": 1}
    rows = items_by_id(ing)
    assert rows["10"]["category"] == "Jazz" and rows["10"]["categories"] == ["Jazz", "Bebop"]
    assert rows["10"]["brand"] == "Blue Note" and rows["10"]["title"] is None
    assert rows["20"]["category"] == UNKNOWN_CATEGORY and set(rows) == {"10", "20"}  # null id row ignored


# ------------------------------------------------------------------------------------ bad input
def test_missing_column_names_file_and_column(tmp_path):
    data = write(tmp_path / "inter.csv", "uid,iid,when\nu1,i1,5\n")
    with pytest.raises(InputError, match=r"inter\.csv.*'stars'"):
        load_dataset(f"csv:{data}", mapped_cfg())
    items = write(tmp_path / "items.csv", "id,genre\n1,Rock\n")
    good = write(tmp_path / "ok.csv", "uid,iid,stars,when\nu1,1,4,5\n")
    with pytest.raises(InputError, match=r"items\.csv.*'iid'"):
        load_dataset(f"csv:{good}", mapped_cfg(items))
    root = amazon_dir(tmp_path / "a", "asin, reviewerID, unixReviewTime\nA1,u1,5\n")
    with pytest.raises(InputError, match=r"r\.csv.*'overall'"):
        load_dataset(f"amazon2014:{root}", DataConfig())
    reviews = write(tmp_path / "rev.json", '{"reviewerID": "u1", "asin": "A1", "overall": 5}\n')
    with pytest.raises(InputError, match=r"rev\.json.*'unixReviewTime'"):
        load_dataset(f"amazon2018:{reviews},{tmp_path / 'a' / 'x_meta.json'}", DataConfig())


@pytest.mark.parametrize("content", ["", "uid,iid,stars,when\n", "uid,iid,stars,when\r\n\r\n"])
def test_empty_and_header_only_files(tmp_path, content):
    data = write(tmp_path / "inter.csv", content)
    with pytest.raises(InputError, match=r"inter\.csv"):
        load_dataset(f"csv:{data}", mapped_cfg())


def test_empty_amazon_files(tmp_path, cfg):
    with pytest.raises(InputError, match=r"r\.csv.*empty"):
        load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'a', '')}", cfg)
    header_only = amazon_dir(tmp_path / "b", "asin, reviewerID, overall, unixReviewTime\n")
    with pytest.raises(InputError, match=r"r\.csv.*header only"):
        load_dataset(f"amazon2014:{header_only}", cfg)
    with pytest.raises(InputError, match=r"x_meta\.json"):
        load_dataset(f"amazon2014:{amazon_dir(tmp_path / 'c', meta='')}", cfg)
    junk = amazon_dir(tmp_path / "d", meta="not json\n[1, 2]\n")
    with pytest.raises(InputError, match=r"x_meta\.json.*no usable JSON line"):
        load_dataset(f"amazon2014:{junk}", cfg)


def test_bad_rows_are_dropped_and_counted(tmp_path, cfg):
    rows = [
        "A1,u1,5.0,1000",  # kept
        "A1,u2,five,1000",  # bad_rating
        "A1,u3,9,1000",  # rating_out_of_range
        "A1,u4,4,yesterday",  # bad_timestamp
        "A1,u5,4,10.5",  # bad_timestamp (not an integer)
        "A1,,4,1000",  # missing_user_id
        " ,u6,4,1000",  # missing_item_id
        "B2,u7,2,2000",  # duplicate of the next row, which is later: dropped
        "B2,u7,4,3000",  # kept (latest rating of u7 for B2)
        "B2,u8,3",  # wrong number of fields: malformed_line
        "C3,u8,3,1000",  # kept
    ]
    root = amazon_dir(tmp_path / "a", "\n".join(rows) + "\n")
    ing = load_dataset(f"amazon2014:{root}", cfg)
    assert ing.dropped == {
        "bad_rating": 1,
        "rating_out_of_range": 1,
        "bad_timestamp": 2,
        "missing_user_id": 1,
        "missing_item_id": 1,
        "duplicate_user_item": 1,
        "malformed_line": 1,
    }
    assert frame(ing.interactions).values.tolist() == [
        ["u1", "A1", 5.0, 1000],
        ["u7", "B2", 4.0, 3000],
        ["u8", "C3", 3.0, 1000],
    ]


def test_file_without_any_well_formed_row(tmp_path, cfg):
    write(tmp_path / "u.data", "1\t10\t4\t881250949\n")
    write(tmp_path / "u.item", "10|Heat (1995)|01-Jan-1995\n")  # genre flags missing
    with pytest.raises(InputError, match=r"u\.item: no row has the expected 24 fields"):
        load_dataset(f"movielens:{tmp_path}", cfg)


def test_malformed_json_lines_are_counted(tmp_path, cfg):
    broken = "{'asin': 'B2', 'title': \n" + "\n" + "[1, 2]\n"
    meta = meta_lines(META_JSON[:1]) + broken + meta_lines(META_JSON[1:])
    reviews = '{"reviewerID": "u1", "asin": "A1", "overall": 5, "unixReviewTime": 1}\n{"reviewerID": \n'
    root = amazon_dir(tmp_path / "a", reviews, meta, name="reviews.json")
    ing = load_dataset(f"amazon2014:{root}", cfg)
    assert ing.dropped == {"malformed_line": 1}  # one review line; blank lines ignored
    assert ing.notes["item_lines_dropped"] == {"malformed_line": 2}  # two meta lines, counted apart
    assert ing.interactions.num_rows == 1 and items_by_id(ing)["A1"]["category"] == "Picks"


def test_dropped_lines_are_located(tmp_path):
    """Every reason keeps its first rows with file, line and raw text; a line counted as malformed
    and a blank line shift the later rows' lines; item-file drops are reported apart."""
    ratings = write(
        tmp_path / "r.csv",
        "user,item,stars,time\n"  # line 1
        "u1,i1,5,10\n"  # 2
        "\n"  # 3: blank, skipped
        "u1,i2,5\n"  # 4: two commas, malformed_line
        "u2,i1,lots,11\n"  # 5: bad_rating
        "u2,i2,4,12,extra\n"  # 6: malformed_line
        "u3,i1,4,yesterday\n",  # 7: bad_timestamp
    )
    items = write(tmp_path / "items.csv", "id,cat\ni1,A\n,B\ni2,C,D\ni3,E\n")  # line 3 no id, 4 malformed
    cfg = DataConfig(
        columns={"user_id": "user", "item_id": "item", "rating": "stars", "ts": "time"},
        items_path=str(items),
        item_columns={"item_id": "id", "category": "cat"},
    )
    ing = load_dataset(f"csv:{ratings}", cfg)
    samples = ing.drop_samples
    assert ing.dropped == {"malformed_line": 2, "bad_rating": 1, "bad_timestamp": 1}
    assert samples["malformed_line"] == [
        {"file": str(ratings), "line": 4, "raw": "u1,i2,5"},
        {"file": str(ratings), "line": 6, "raw": "u2,i2,4,12,extra"},
    ]
    assert (samples["bad_rating"][0]["line"], samples["bad_rating"][0]["row"]) == (5, 2)  # the second parsed row
    assert samples["bad_timestamp"][0]["line"] == 7
    assert ing.notes["item_lines_dropped"] == {"malformed_line": 2}
    assert [(s["line"], s["raw"]) for s in ing.notes["item_lines_dropped_samples"]] == [(4, "i2,C,D"), (3, ",B")]
    assert META_DROP not in samples and META_DROP not in ing.dropped


def test_json_lines_drops_are_located(tmp_path, cfg):
    reviews = (
        '{"reviewerID": "u1", "asin": "A1", "overall": 5, "unixReviewTime": 1}\n'  # 1
        '{"reviewerID": \n'  # 2: malformed
        "\n"  # 3: blank
        '{"reviewerID": "u2", "asin": "A1", "overall": "x", "unixReviewTime": 2}\n'  # 4: bad_rating
    )
    meta = meta_lines(META_JSON[:1]) + '{"title": "no asin"}\n' + meta_lines(META_JSON[1:])
    root = amazon_dir(tmp_path / "a", reviews, meta, name="reviews.json")
    ing = load_dataset(f"amazon2014:{root}", cfg)
    assert ing.drop_samples["malformed_line"] == [
        {"file": str(root / "reviews.json"), "line": 2, "raw": '{"reviewerID": '}
    ]
    assert ing.drop_samples["bad_rating"][0]["line"] == 4
    assert ing.notes["item_lines_dropped_samples"] == [
        {"file": str(root / "x_meta.json"), "line": 2, "raw": '{"title": "no asin"}'}
    ]


def test_encoding_errors_strict_names_the_line_replace_counts_it(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"user_id,item_id,rating,ts\nu1,i1,5,10\nu\xe9,i2,5,11\nu3,i1,oops,12\n")
    with pytest.raises(InputError, match=r"r\.csv: line 3 is not valid UTF-8.*data\.encoding_errors=replace"):
        load_dataset(f"csv:{path}", DataConfig())
    for _ in range(2):  # a second load reports its own repairs, not the sum of both
        ing = load_dataset(f"csv:{path}", DataConfig(encoding_errors="replace"))
        assert ing.notes["encoding_repaired_lines"] == {str(path): 1}
        assert sorted(frame(ing.interactions).user_id) == ["u1", "u\ufffd"]
        assert ing.drop_samples["bad_rating"][0]["line"] == 4


def test_bad_specs(tmp_path, cfg):
    kinds = "amazon2014, amazon2018, movielens, parquet, csv, synthetic"
    with pytest.raises(InputError, match=f"nosuch:x.*{kinds}"):
        load_dataset("nosuch:x", cfg)
    with pytest.raises(InputError, match="'movielens'.*missing PATH.*synthetic"):
        load_dataset("movielens", cfg)
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(f"movielens:{tmp_path / 'nope'}", cfg)
    with pytest.raises(InputError, match=r"need ratings\.csv \+ movies\.csv or u\.data \+ u\.item"):
        load_dataset(f"movielens:{tmp_path}", cfg)
    root = amazon_dir(tmp_path / "a")
    write(root / "more_reviews.json", "{}\n")
    with pytest.raises(InputError, match=r"found ratings \['more_reviews\.json', 'r\.csv'\]"):
        load_dataset(f"amazon2014:{root}", cfg)
    with pytest.raises(InputError, match="positive whole number"):
        load_dataset("synthetic:1.5", cfg)
    assert set(KINDS) == {"amazon2014", "amazon2018", "movielens", "parquet", "csv", "synthetic"}


@pytest.mark.parametrize("text,n", [("", None), ("100000", 100_000), ("1_000_000", 1_000_000), ("1e6", 1_000_000)])
def test_synthetic_count(text, n):
    assert _parse_count(text, f"synthetic:{text}") == n


@pytest.mark.parametrize("text", ["0", "-5", "abc", "2.5", "nan"])
def test_synthetic_count_rejects(text):
    with pytest.raises(InputError, match=f"synthetic:{text}"):
        _parse_count(text, f"synthetic:{text}")


def _times(tmp_path, name: str, times: list[str], **cfg) -> tuple:
    """A CSV of one user's interactions at ``times`` (item i at times[i]), loaded."""
    rows = "".join(f"u1,i{k},5,{t}\n" for k, t in enumerate(times))
    data = write(tmp_path / name, "user_id,item_id,rating,ts\n" + rows)
    return load_dataset(f"csv:{data}", DataConfig(**cfg))


def _by_time(ingested) -> list[str]:
    return frame(ingested.interactions).sort_values("ts", kind="stable").item_id.tolist()


def test_timestamps_as_users_have_them(tmp_path):
    """ISO dates, zoned datetimes, unix seconds and milliseconds are read and ordered; the stats
    say which format was read; a column mixing formats is an error naming a row of each."""
    iso = _times(tmp_path, "dates.csv", ["2000-07-12", "1999-01-31", "2000-07-11"])
    assert iso.notes["ts_format"] == "iso" and not iso.dropped
    assert _by_time(iso) == ["i1", "i2", "i0"]  # time order
    assert frame(iso.interactions).ts.min() == 917740800  # 1999-01-31T00:00Z in unix seconds
    zoned = _times(tmp_path, "zoned.csv", ["2021-03-01T10:00:00+02:00", "2021-03-01T09:30:00Z", "2021-03-01 07:00"])
    assert zoned.notes["ts_format"] == "iso"
    assert _by_time(zoned) == ["i2", "i0", "i1"]  # 07:00Z, 08:00Z, 09:30Z
    ms = _times(tmp_path, "ms.csv", ["1614592800000", "1614592799000"])
    assert ms.notes["ts_format"] == "unix_ms" and _by_time(ms) == ["i1", "i0"]
    assert _times(tmp_path, "s.csv", ["964982703", "964982224"]).notes["ts_format"] == "unix_s"
    # one unreadable value is a counted drop, not a rejected file
    one_bad = _times(tmp_path, "bad.csv", ["2000-07-12", "yesterday", "2000-07-14"])
    assert one_bad.dropped == {"bad_timestamp": 1} and one_bad.interactions.num_rows == 2
    with pytest.raises(InputError, match=r"mixes formats: row 1 is a number .*row 2 an ISO date"):
        _times(tmp_path, "mixed.csv", ["964982703", "2000-07-12"])
    # overridden: dates read as unix seconds are all bad
    with pytest.raises(InputError, match="bad_timestamp"):
        _times(tmp_path, "forced.csv", ["2000-07-12", "2000-07-13"], ts_format="unix_s")


# ------------------------------------------------------------------------------- fuzzing
_field = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "9" * 30, "5", "4.5", "0", "-3"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["2000-07-12", "2100-01-01T00:00:00Z", "99999-01-01", "1e12", "x" * 2000, '"', ",", ";"]),
)
_ids = st.sampled_from(["u1", "u2", "7", " i9 ", "007"])
_row = st.one_of(
    # a row of four fields, each either plausible or junk: most rows reach the row checks
    st.tuples(
        st.one_of(_ids, _field),
        st.one_of(_ids, _field),
        st.one_of(st.sampled_from(["1", "3.5", "5"]), _field),
        st.one_of(st.integers(0, 2**40).map(str), _field),
    ).map(list),
    st.lists(_field, min_size=3, max_size=5),  # 3 or 5 fields: a malformed line
)
GOOD_ROW = ["anchor-user", "anchor-item", "5", "1"]  # keeps one valid row in every file


FUZZ_LAYOUTS = {
    # kind: (ratings file name, its header, extra files)
    "csv": ("fuzz.csv", ["user_id", "item_id", "rating", "ts"], {}),
    "movielens": (
        "ratings.csv",
        ["userId", "movieId", "rating", "timestamp"],
        {"movies.csv": "movieId,title,genres\n1,A,Drama\n"},
    ),
    "amazon2014": (
        "ratings.csv",
        ["asin", "reviewerID", "overall", "unixReviewTime"],
        {"x_meta.json": meta_lines(META_JSON)},
    ),
}


@pytest.mark.parametrize("kind", sorted(FUZZ_LAYOUTS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=25))
def test_fuzzed_rows_are_kept_or_counted(tmp_path, kind, rows):
    """Random text fields, separators, quotes, huge values, NaN/inf, far-future times: each
    adapter either refuses the file with an InputError or accounts for every row (kept +
    dropped, per reason), never a traceback."""
    import csv
    import io

    name, header, extra = FUZZ_LAYOUTS[kind]
    rows = [[f.replace("\n", " ").replace("\r", " ") for f in r] for r in rows]  # one record per line
    rows = [r for r in rows if any(f.strip() for f in r)] + [GOOD_ROW]  # the reader skips blank lines
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    (tmp_path / name).write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
    for extra_name, text in extra.items():
        (tmp_path / extra_name).write_text(text)
    _assert_every_row_accounted(f"{kind}:{tmp_path / name if kind == 'csv' else tmp_path}", len(rows))


def _assert_every_row_accounted(spec: str, rows: int) -> None:
    try:
        ing = load_dataset(spec, DataConfig(rating_min=0.0))
    except InputError as exc:  # refused whole only when not UTF-8 or when numbers and dates mix
        assert "not valid UTF-8" in str(exc) or "mixes formats" in str(exc), exc
        return
    assert ing.interactions.num_rows + sum(ing.dropped.values()) == rows
    text_file = not spec.endswith(".parquet")
    for reason, samples in ing.drop_samples.items():
        assert 0 < len(samples) <= ing.dropped[reason]
        for sample in samples:  # a dropped line of a text file is located (the header is line 1)
            assert not text_file or (isinstance(sample["line"], int) and 1 <= sample["line"] <= rows + 1), sample


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=25))
def test_fuzzed_parquet_rows_are_kept_or_counted(tmp_path, rows):
    """The parquet adapter on string columns of the same fuzzed fields (a row is cut or padded to four)."""
    rows = [(r + [""] * 4)[:4] for r in rows] + [GOOD_ROW]
    table = pa.table({c: [r[i].encode("utf-8", "replace").decode() for r in rows] for i, c in enumerate(RAW_COLUMNS)})
    pq.write_table(table, tmp_path / "fuzz.parquet")
    _assert_every_row_accounted(f"parquet:{tmp_path / 'fuzz.parquet'}", len(rows))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(_row, _field), min_size=1, max_size=25))
@example(rows=[["u1", "u1", "1", "0"], "0\r0"])  # a raw \r is inside a line, not a line end
def test_fuzzed_amazon2018_lines_are_kept_or_counted(tmp_path, rows):
    """amazon2018 review JSON lines (gzip): a fuzzed row becomes a review object, a bare field a
    line that is not one (malformed_line)."""
    keys = ("reviewerID", "asin", "overall", "unixReviewTime")
    lines = [json.dumps(dict(zip(keys, r))) if isinstance(r, list) else r.replace("\n", " ") for r in rows]
    lines = [line for line in lines if line.strip()] + [json.dumps(dict(zip(keys, GOOD_ROW)))]
    gz(tmp_path / "Music.json.gz", "\n".join(line.encode("utf-8", "replace").decode() for line in lines) + "\n")
    gz(tmp_path / "meta_Music.json.gz", meta_lines([{"asin": "anchor-item", "category": ["X"]}]))
    _assert_every_row_accounted(f"amazon2018:{tmp_path}", len(lines))
