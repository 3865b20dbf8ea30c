"""Read a data set named ``KIND:PATH`` into the canonical tables of ``pagellm.data.schema``.

Why one module of small adapters: every source (Amazon 2014 and 2018 dumps, MovieLens, the user's
own CSV or Parquet files, synthetic data) only has to *parse* its format into raw
``user_id, item_id, rating, ts`` columns and an item list. Deciding which rows survive is left to
``clean_interactions`` and ``align_items``, so all sources drop rows for the same reasons and
report them the same way (``Ingested.dropped``) instead of each adapter inventing its own rules.

Input that cannot be used at all (a missing or empty file, a missing column) raises
``InputError`` naming the file and what is missing; damaged single lines are counted and skipped.
CSV files are parsed with pyarrow (vectorised, multithreaded); JSON-lines files line by line,
accepting Python-literal lines (the public 2014 Amazon meta dumps) via ``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pagellm.config import DataConfig
from pagellm.data.schema import (
    RAW_COLUMNS,
    Ingested,
    align_items,
    build_items,
    clean_interactions,
    parse_timestamps,
    require_columns,
)
from pagellm.errors import InputError

KINDS = ("amazon2014", "amazon2018", "movielens", "parquet", "csv", "synthetic")
META_DROP = "malformed_item_line"  # an adapter's count of unreadable lines of its items / meta file
JSON_SUFFIXES = (".json", ".json.gz")
AMAZON_FIELDS = {"user_id": "reviewerID", "item_id": "asin", "rating": "overall", "ts": "unixReviewTime"}
AMAZON_CSV_ORDER = ("asin", "reviewerID", "overall", "unixReviewTime")  # headerless ratings CSV
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
ML_NO_GENRES = "(no genres listed)"


# ---------------------------------------------------------------------------------- entry point
def load_dataset(spec: str, cfg: DataConfig) -> Ingested:
    """Load ``KIND:PATH`` (or ``synthetic[:N]``) into canonical interactions and items."""
    kind, _, arg = str(spec).partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in KINDS:
        raise InputError(f"data.dataset '{spec}': unknown kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    if kind == "synthetic":
        n = _parse_count(arg, spec)
        from pagellm.data.synthetic import generate_synthetic  # lazy: only this kind needs it

        return generate_synthetic(n, cfg.seed)
    if not arg:
        raise InputError(f"data.dataset '{spec}': missing PATH; write KIND:PATH with KIND one of {', '.join(KINDS)}")
    adapters = {
        "amazon2014": _amazon2014,
        "amazon2018": _amazon2018,
        "movielens": _movielens,
        "parquet": _parquet,
        "csv": _csv,
    }
    REPAIRED.clear()
    raw, items, parse_drops, files = adapters[kind](arg, cfg)
    meta_drops = parse_drops.pop(META_DROP, 0)  # item-file lines are not interaction rows: counted apart
    raw = _numbers_from_text(raw)
    ts, ts_format = parse_timestamps(raw["ts"], cfg.ts_format, str(files[0]))
    interactions, dropped, samples = clean_interactions(
        raw, source=str(files[0]), rating_min=cfg.rating_min, rating_max=cfg.rating_max, ts=ts
    )
    items, notes = align_items(interactions, items)
    notes = {"kind": kind, "files": [str(f) for f in files], "ts_format": ts_format, **notes}
    if meta_drops:
        notes["item_lines_dropped"] = {"malformed_line": meta_drops}
    if REPAIRED:
        notes["encoding_repaired_lines"] = dict(REPAIRED)  # data.encoding_errors=replace
    return Ingested(interactions, items, dropped=dropped + parse_drops, notes=notes, drop_samples=samples)


def _parse_count(arg: str, spec: str) -> Optional[int]:
    """``100000``, ``1_000_000`` or ``1e6`` -> int; empty -> None (the generator's default)."""
    if not arg:
        return None
    text = arg.replace("_", "")
    try:
        n = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        n = int(value) if value == value and value == int(value) else -1  # NaN/fraction -> invalid
    if n <= 0:
        raise InputError(f"data.dataset '{spec}': N must be a positive whole number, got '{arg}'")
    return n


def _numbers_from_text(raw: pd.DataFrame) -> pd.DataFrame:
    """Convert text rating/ts columns with Arrow when every value parses (several times faster
    than pandas' ``to_numeric`` on 10M rows); a column with any bad value stays text, so that
    ``clean_interactions`` counts the bad rows."""
    for col in ("rating", "ts"):
        try:
            arr = pa.array(raw[col], from_pandas=True)
            if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
                raw[col] = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            pass
    return raw


# ------------------------------------------------------------------------------- file reading
def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: file or directory does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty")
    return p


def _open_text(path: Path, encoding: str = "utf-8"):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, errors="replace")
    return open(path, encoding=encoding, errors="replace")


def _first_line(path: Path, encoding: str = "utf-8") -> Optional[str]:
    """The first non-blank line (BOM removed), or None for a file without any."""
    with _open_text(path, encoding) as fh:
        for line in fh:
            if line.strip():
                return line.lstrip("\ufeff").rstrip("\r\n")
    return None


def _read_csv(
    path: Path,
    *,
    names: Optional[Iterable[str]] = None,
    keep: Optional[Iterable[str]] = None,
    sep: str = ",",
    encoding: str = "utf-8",
    quoting: bool = True,
    errors: str = "strict",
) -> tuple[pd.DataFrame, int]:
    """Read a delimited file into string columns with surrounding spaces stripped.

    Without ``names`` the first line is the header (its names are stripped too). ``keep`` names
    the columns needed; missing ones raise ``InputError``. Rows with the wrong number of fields
    are skipped and counted (second return value). ``errors`` (``data.encoding_errors``): strict
    stops at the first line that is not valid ``encoding``, naming it; replace substitutes U+FFFD
    for the bad bytes and counts the repaired lines (``REPAIRED``)."""
    path = _existing(path)
    first = _first_line(path, encoding)
    if first is None:
        raise InputError(f"{path}: file is empty")
    header = names is None
    if header:
        names = [n.strip() for n in next(csv.reader([first], delimiter=sep))]
    names = list(names)
    keep = list(keep) if keep is not None else names
    require_columns(names, keep, str(path))
    bad: list[str] = []

    def skip(row) -> str:  # a row with the wrong number of fields
        bad.append(row.text)
        return "skip"

    def read(source):
        return pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=int(header), encoding=encoding.replace("-", "")
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=sep,
                quote_char='"' if quoting else False,
                invalid_row_handler=skip,
            ),  # fmt: skip
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in keep}, include_columns=keep),
        )

    try:
        try:
            table = read(path)
        except (pa.ArrowInvalid, UnicodeError) as exc:
            if "utf" not in str(exc).lower():
                raise
            bad.clear()
            table = read(_decoded(path, errors))  # names the bad line, or reads a repaired copy
    except (pa.ArrowInvalid, UnicodeError) as exc:
        raise InputError(f"{path}: cannot parse as delimited text: {exc}") from None
    if table.num_rows == 0 and bad:
        raise InputError(f"{path}: no row has the expected {len(names)} fields; first: {bad[0]!r}")
    if table.num_rows == 0:
        raise InputError(f"{path}: no data rows (header only)" if header else f"{path}: no data rows")
    columns = {n: pc.utf8_trim_whitespace(table.column(n)) for n in keep}
    return pa.table(columns).to_pandas(), len(bad)


# path -> lines repaired under data.encoding_errors=replace; load_dataset resets and reports it
REPAIRED: Counter = Counter()


def _decoded(path: Path, errors: str) -> io.BytesIO:
    """A file pyarrow found not to be UTF-8: an InputError naming its first bad line (strict),
    or an in-memory copy with the bad bytes replaced by U+FFFD (replace)."""
    bad_lines, repaired = 0, []
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
                if errors == "replace":
                    repaired.append(line)
            except UnicodeDecodeError as exc:
                if errors != "replace":
                    raise InputError(
                        f"{path}: line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start}: "
                        f"{line[max(0, exc.start - 20) : exc.start + 20]!r}); set data.encoding_errors=replace "
                        "to read it with the bad bytes replaced"
                    ) from None
                bad_lines += 1
                repaired.append(line.decode("utf-8", errors="replace").encode("utf-8"))
    REPAIRED[str(path)] += bad_lines
    return io.BytesIO(b"".join(repaired))


def _parse_record(line: str):
    """One JSON-lines record: JSON first, then a Python literal (never ``eval``)."""
    try:
        return json.loads(line)
    except ValueError:
        pass
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _read_json_lines(path: Path, fields: Iterable[str]) -> tuple[list[dict], int]:
    """Records (only ``fields`` kept) and the number of lines that are not an object."""
    path = _existing(path)
    fields = list(fields)
    records, malformed = [], 0
    with _open_text(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = _parse_record(line)
            if isinstance(rec, dict):
                records.append({f: rec.get(f) for f in fields})
            else:
                malformed += 1
    if not records:
        raise InputError(f"{path}: no usable JSON line" + (f" ({malformed} malformed)" if malformed else " (empty)"))
    return records, malformed


def _reviews_json(path: Path) -> tuple[pd.DataFrame, int]:
    """Amazon review JSON lines -> raw interaction columns."""
    records, malformed = _read_json_lines(path, AMAZON_FIELDS.values())
    present = {f for r in records for f, v in r.items() if v is not None}
    require_columns(present, AMAZON_FIELDS.values(), str(path))
    raw = pd.DataFrame({c: [r[f] for r in records] for c, f in AMAZON_FIELDS.items()})
    return raw, malformed


def _is_number(text: str) -> bool:
    try:
        float(text.strip())
    except ValueError:
        return False
    return True


def _text(value) -> Optional[str]:
    """A title or brand as given; missing (None, NaN, NA) -> None."""
    missing = value is None or value is pd.NA or (isinstance(value, float) and value != value)
    return None if missing else str(value)


def _meta_items(path: Path, row: Callable[[dict], tuple]) -> tuple[pa.Table, int]:
    """Amazon meta JSON lines -> items; ``row`` maps a record to (category, categories)."""
    records, malformed = _read_json_lines(path, ("asin", "title", "brand", "categories", "category"))
    usable = [r for r in records if r["asin"] is not None and str(r["asin"]).strip()]
    if not usable:
        raise InputError(f"{path}: no meta line has the required field 'asin'")
    cats = [row(r) for r in usable]
    items = build_items(
        [str(r["asin"]).strip() for r in usable],
        [c for c, _ in cats],
        [cs for _, cs in cats],
        [_text(r["title"]) for r in usable],
        [_text(r["brand"]) for r in usable],
    )
    return items, malformed + len(records) - len(usable)


def _categories2014(rec: dict) -> tuple[Optional[str], list]:
    """``categories`` is a list of paths (general -> specific); the leaf of the first path is the
    category, followed by every other distinct entry in order."""
    paths = rec.get("categories") or []
    if paths and all(isinstance(p, str) for p in paths):  # a single flat path
        paths = [paths]
    paths = [[str(c).strip() for c in p if c is not None and str(c).strip()] for p in paths if p]
    first = paths[0] if paths else []
    category = first[-1] if first else None
    ordered = ([category] if category else []) + [c for p in paths for c in p]
    return category, list(dict.fromkeys(ordered))


def _categories2018(rec: dict) -> tuple[Optional[str], list]:
    """``category`` is one flat list from general to specific; the last non-empty entry wins."""
    cats = rec.get("category") or []
    if isinstance(cats, str):
        cats = [cats]
    cats = [str(c) for c in cats if c is not None]
    filled = [c for c in cats if c.strip()]
    return (filled[-1] if filled else None), cats


# ------------------------------------------------------------------------------------ amazon
def _amazon_files(arg: str, rating_suffixes: tuple[str, ...]) -> tuple[Path, Path]:
    """A directory holding one ratings/reviews file and one ``*meta*`` JSON file, or the
    explicit ``RATINGS,META`` pair."""
    if "," in arg:
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) != 2 or not all(parts):
            raise InputError(f"'{arg}': expected RATINGS_FILE,META_FILE")
        return _existing(parts[0]), _existing(parts[1])
    root = _existing(arg)
    if not root.is_dir():
        raise InputError(f"{root}: expected a directory or RATINGS_FILE,META_FILE")
    files = sorted(p for p in root.iterdir() if p.is_file())
    low = {p: p.name.lower() for p in files}
    ratings = [p for p in files if "meta" not in low[p] and low[p].endswith(rating_suffixes)]
    meta = [p for p in files if "meta" in low[p] and low[p].endswith(JSON_SUFFIXES)]
    if len(ratings) != 1 or len(meta) != 1:
        raise InputError(
            f"{root}: need exactly one ratings/reviews file ({', '.join(rating_suffixes)}, name "
            f"without 'meta') and one meta file (*meta*.json[.gz]); found ratings "
            f"{[p.name for p in ratings]}, meta {[p.name for p in meta]}; "
            f"all files {[p.name for p in files]}"
        )
    return ratings[0], meta[0]


def _headerless_order(fields: list[str]) -> tuple[str, ...]:
    """Column order of a headerless ratings CSV. The 5-core CSVs put the item first; McAuley's
    ratings-only dumps put the user first. ASINs are always 10 characters and reviewer ids
    longer, so the first line tells which."""
    first, second = fields[0].strip(), fields[1].strip()
    if len(first) > 10 and len(second) == 10:
        return ("reviewerID", "asin", "overall", "unixReviewTime")
    return AMAZON_CSV_ORDER


def _amazon_ratings(path: Path, errors: str) -> tuple[pd.DataFrame, Counter]:
    """Ratings CSV (``asin, reviewerID, overall, unixReviewTime``, header optional) or review
    JSON lines, by file name."""
    if path.name.lower().endswith(JSON_SUFFIXES):
        raw, malformed = _reviews_json(path)
    else:
        first = _first_line(_existing(path))
        if first is None:
            raise InputError(f"{path}: file is empty")
        fields = next(csv.reader([first]))
        has_header = len(fields) < 3 or not _is_number(fields[2])
        raw, malformed = _read_csv(
            path, names=None if has_header else _headerless_order(fields), keep=AMAZON_FIELDS.values(), errors=errors
        )
        raw = raw.rename(columns={f: c for c, f in AMAZON_FIELDS.items()})
    return raw[list(RAW_COLUMNS)], Counter({"malformed_line": malformed} if malformed else {})


def _amazon(arg: str, rating_suffixes, categories, errors: str) -> tuple:
    ratings_path, meta_path = _amazon_files(arg, rating_suffixes)
    raw, drops = _amazon_ratings(ratings_path, errors)
    items, malformed = _meta_items(meta_path, categories)
    if malformed:
        drops[META_DROP] += malformed
    return raw, items, drops, [ratings_path, meta_path]


def _amazon2014(arg: str, cfg: DataConfig) -> tuple:
    return _amazon(arg, (".csv", ".csv.gz") + JSON_SUFFIXES, _categories2014, cfg.encoding_errors)


def _amazon2018(arg: str, cfg: DataConfig) -> tuple:
    return _amazon(arg, JSON_SUFFIXES, _categories2018, cfg.encoding_errors)


# --------------------------------------------------------------------------------- movielens
def _movielens(arg: str, cfg: DataConfig) -> tuple:
    """ml-latest(-small) ``ratings.csv`` + ``movies.csv``, or ml-100k ``u.data`` + ``u.item``."""
    root = _existing(arg)
    if not root.is_dir():
        raise InputError(f"{root}: expected a MovieLens directory")
    if (root / "ratings.csv").is_file() and (root / "movies.csv").is_file():
        return _movielens_latest(root, cfg.encoding_errors)
    if (root / "u.data").is_file() and (root / "u.item").is_file():
        return _movielens_100k(root, cfg.encoding_errors)
    found = sorted(p.name for p in root.iterdir())
    raise InputError(f"{root}: need ratings.csv + movies.csv or u.data + u.item; found {found}")


def _movielens_latest(root: Path, errors: str) -> tuple:
    ratings_path, movies_path = root / "ratings.csv", root / "movies.csv"
    raw, bad = _read_csv(ratings_path, keep=("userId", "movieId", "rating", "timestamp"), errors=errors)
    raw.columns = list(RAW_COLUMNS)
    movies, bad_movies = _read_csv(movies_path, keep=("movieId", "title", "genres"), errors=errors)
    genres = [[] if g == ML_NO_GENRES else [x for x in g.split("|") if x] for g in movies["genres"]]
    items = _genre_items(movies["movieId"], genres, movies["title"])
    drops = Counter({k: n for k, n in (("malformed_line", bad), (META_DROP, bad_movies)) if n})
    return raw, items, drops, [ratings_path, movies_path]


def _movielens_100k(root: Path, errors: str) -> tuple:
    data_path, item_path = root / "u.data", root / "u.item"
    raw, bad = _read_csv(data_path, names=RAW_COLUMNS, sep="\t", quoting=False, errors=errors)
    names = ["movie_id", "title", "release", "video_release", "url", *ML100K_GENRES]
    movies, bad_movies = _read_csv(item_path, names=names, sep="|", encoding="latin-1", quoting=False)
    flags = movies[list(ML100K_GENRES[1:])].to_numpy() == "1"  # "unknown" is not a genre
    genres = [[g for g, on in zip(ML100K_GENRES[1:], row) if on] for row in flags]
    items = _genre_items(movies["movie_id"], genres, movies["title"])
    drops = Counter({k: n for k, n in (("malformed_line", bad), (META_DROP, bad_movies)) if n})
    return raw, items, drops, [data_path, item_path]


def _genre_items(ids, genres: list[list[str]], titles) -> pa.Table:
    """Movies: the first genre is the category, all genres are the categories, no brand."""
    return build_items(ids, [g[0] if g else None for g in genres], genres, titles)


# ------------------------------------------------------------------------------ csv / parquet
def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _read_mapped(path: Path, as_parquet: bool, mapping: dict, required: Iterable[str], errors: str) -> tuple:
    """Read the mapped columns of a CSV/Parquet file, renamed to canonical names. Columns in
    ``required`` must exist; other mapped columns are read when present. Ids are read as text
    (so 7 stays "7", not "7.0" after a null). Returns the frame and the malformed-row count."""
    path = _existing(path)
    mapping = {**{c: c for c in required}, **mapping}  # a required name left unmapped keeps its name
    if as_parquet:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read as Parquet: {exc}") from None
    else:
        first = _first_line(path)
        if first is None:
            raise InputError(f"{path}: file is empty")
        names = [n.strip() for n in next(csv.reader([first]))]
    require_columns(names, [mapping[c] for c in required], str(path))
    present = {c: col for c, col in mapping.items() if col in names}
    cols = list(dict.fromkeys(present.values()))
    if as_parquet:
        table = pq.read_table(path, columns=cols)
        if table.num_rows == 0:
            raise InputError(f"{path}: no data rows")
        ids = {present[c] for c in ("user_id", "item_id") if c in present}
        as_text = {n: table.column(n).cast(pa.string()) if n in ids else table.column(n) for n in cols}
        frame, bad = pa.table(as_text).to_pandas(), 0
    else:
        frame, bad = _read_csv(path, keep=cols, errors=errors)
    return pd.DataFrame({c: frame[col] for c, col in present.items()}), bad


def _csv(arg: str, cfg: DataConfig) -> tuple:
    return _tabular(arg, cfg, as_parquet=False)


def _parquet(arg: str, cfg: DataConfig) -> tuple:
    return _tabular(arg, cfg, as_parquet=True)


def _tabular(arg: str, cfg: DataConfig, as_parquet: bool) -> tuple:
    """The user's interactions file (columns mapped by ``cfg.columns``) and optional items file
    (``cfg.items_path``, mapped by ``cfg.item_columns``; without it every category is unknown)."""
    path = Path(arg).expanduser()
    raw, bad = _read_mapped(path, as_parquet, cfg.columns, RAW_COLUMNS, cfg.encoding_errors)
    bad_items = 0
    files = [path]
    if cfg.items_path:
        items_path = Path(cfg.items_path).expanduser()
        meta, bad_items = _read_mapped(
            items_path, _is_parquet(items_path), cfg.item_columns, ("item_id",), cfg.encoding_errors
        )
        meta["item_id"] = meta["item_id"].str.strip()
        meta = meta[meta["item_id"].notna() & (meta["item_id"] != "")]
        files.append(items_path)
        cats = [_split_categories(v) for v in meta.get("category", [None] * len(meta))]
        items = build_items(
            meta["item_id"],
            [c[0] if c else None for c in cats],
            cats,
            [_text(v) for v in meta["title"]] if "title" in meta else None,
            [_text(v) for v in meta["brand"]] if "brand" in meta else None,
        )
    else:
        items = build_items([], [], [])
    drops = Counter({k: n for k, n in (("malformed_line", bad), (META_DROP, bad_items)) if n})
    return raw[list(RAW_COLUMNS)], items, drops, files


def _split_categories(value) -> list[str]:
    """A list (Parquet list column) or a ``|``-separated string -> list of labels."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split("|") if c.strip()]
    return [str(c).strip() for c in value if c is not None and str(c).strip()]
