"""Read a data set named ``KIND:PATH`` into the canonical tables of ``pagellm.data.schema``.

Why one module of small adapters: every source (Amazon 2014 and 2018 dumps, MovieLens, the user's
own CSV or Parquet files, synthetic data) only has to *parse* its format into raw
``user_id, item_id, rating, ts`` columns and an item list. Deciding which rows survive is left to
``validate_interactions``, ``duplicate_mask`` and ``align_items``, so all sources drop rows for
the same reasons and report them the same way (``Ingested.dropped``) instead of each adapter
inventing its own rules. An adapter returns a ``Source``: its interaction files and how to parse
one, so that the local engine reads them in one process (``load_dataset``) and the streaming
engine one file per Ray task (``read_interactions``), with the same code.

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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pagellm.config import DataConfig
from pagellm.data.schema import (
    RAW_COLUMNS,
    ROW_COLUMNS,
    SAMPLES_PER_REASON,
    Ingested,
    align_items,
    build_items,
    duplicate_mask,
    duplicate_samples,
    parse_timestamps,
    require_columns,
    validate_interactions,
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
SAMPLE_CHARS = 200  # a located line's raw text is cut to this many characters in stats.json


@dataclass
class ReadLog:
    """What one ``load_dataset`` call could not read, kept per call rather than in module state:
    lines dropped per reason with the first few located (file, 1-based line, raw text), lines
    repaired under ``data.encoding_errors=replace`` per file, and per text file how to find the
    file line of a parsed data row (so that rows dropped later by ``clean_interactions`` are
    located by line too)."""

    dropped: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)
    repaired: Counter = field(default_factory=Counter)
    lines: dict = field(default_factory=dict)  # file -> f(0-based data rows) -> {row: file line}

    def drop(self, reason: str, path, text: str, line: Optional[int] = None, row: Optional[int] = None) -> None:
        """Count one dropped line (or data row, 1-based) and keep it if it is among the first few."""
        self.dropped[reason] += 1
        found = self.samples.setdefault(reason, [])
        if len(found) < SAMPLES_PER_REASON:
            where = {k: v for k, v in (("line", line), ("row", row)) if v is not None}
            found.append({"file": str(path), **where, "raw": text.rstrip("\r\n")[:SAMPLE_CHARS]})

    def pop(self, reason: str) -> tuple[int, list]:
        return self.dropped.pop(reason, 0), self.samples.pop(reason, [])

    def merge(self, other: "ReadLog") -> None:
        """Add the log of another file (read in file order): counts add, samples fill up."""
        self.dropped.update(other.dropped)
        for reason, found in other.samples.items():
            mine = self.samples.setdefault(reason, [])
            mine.extend(found[: SAMPLES_PER_REASON - len(mine)])
        self.repaired.update(other.repaired)
        self.lines.update(other.lines)

    def add_samples(self, reason: str, found: list[dict]) -> None:
        """Samples of rows dropped after parsing (``row``: 1-based data row), located by line."""
        self.locate({reason: found})
        self.merge(ReadLog(samples={reason: found}))

    def locate(self, samples: dict) -> None:
        """Add the file line to each sample of a parsed data row (``row``: 1-based data row)."""
        for path, line_of in self.lines.items():
            mine = [s for rows in samples.values() for s in rows if s["file"] == path and "row" in s]
            if mine:
                lines = line_of([s["row"] - 1 for s in mine])
                for s in mine:
                    s["line"] = lines.get(s["row"] - 1)


# ---------------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class Source:
    """A file-based data set: its interaction files in order, how to parse one of them into raw
    ``RAW_COLUMNS`` (``parse(path, log)``), and how to read its items (``read_items(log)``).
    The callables are module-level functions bound with ``partial``, so they travel to Ray tasks."""

    kind: str
    ratings: tuple[Path, ...]
    parse: Callable[[Path, ReadLog], pd.DataFrame]
    read_items: Callable[[ReadLog], pa.Table]
    item_files: tuple[Path, ...] = ()


def split_spec(spec: str) -> tuple[str, str]:
    """``KIND:PATH`` -> (kind, PATH), the kind checked."""
    kind, _, arg = str(spec).partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in KINDS:
        raise InputError(f"data.dataset '{spec}': unknown kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    if kind != "synthetic" and not arg:
        raise InputError(f"data.dataset '{spec}': missing PATH; write KIND:PATH with KIND one of {', '.join(KINDS)}")
    return kind, arg


def synthetic_count(spec: str) -> Optional[int]:
    """The N of ``synthetic[:N]`` (None: the generator's default)."""
    return _parse_count(split_spec(spec)[1], spec)


def open_source(spec: str, cfg: DataConfig) -> Source:
    """The ``Source`` of a file-based ``KIND:PATH`` (every kind but synthetic)."""
    kind, arg = split_spec(spec)
    adapters = {
        "amazon2014": _amazon2014,
        "amazon2018": _amazon2018,
        "movielens": _movielens,
        "parquet": _parquet,
        "csv": _csv,
    }
    return adapters[kind](arg, cfg)


def read_interactions(source: Source, index: int, cfg: DataConfig) -> tuple[pa.Table, ReadLog, str]:
    """Parse and validate interactions file ``index`` of ``source``: the valid rows with their
    ``ROW_COLUMNS``, the file's log (drops counted and located) and its time format. Duplicates
    are left to ``duplicate_mask``, which needs every row of a user."""
    path, log = source.ratings[index], ReadLog()
    raw = _numbers_from_text(source.parse(path, log))
    ts, ts_format = parse_timestamps(raw["ts"], cfg.ts_format, str(path))
    table, dropped, samples = validate_interactions(
        raw, source=str(path), rating_min=cfg.rating_min, rating_max=cfg.rating_max, ts=ts, file_index=index
    )
    log.locate(samples)
    log.merge(ReadLog(dropped=dropped, samples=samples))
    return table, log, ts_format


def finish(source: Source, log: ReadLog, formats: list[str], seen_items: pa.Array, items: pa.Table) -> Ingested:
    """Items aligned to the kept interactions and the notes of a load; shared by both engines.
    Returns an ``Ingested`` without interactions (the caller holds them, or never gathers them)."""
    meta_drops, meta_samples = log.pop(META_DROP)  # item-file lines are not interaction rows: counted apart
    items, notes = align_items(seen_items, items)
    files = [*source.ratings, *source.item_files]
    ts_format = formats[0] if len(set(formats)) == 1 else ",".join(formats)
    notes = {"kind": source.kind, "files": [str(f) for f in files], "ts_format": ts_format, **notes}
    if meta_drops:
        notes["item_lines_dropped"] = {"malformed_line": meta_drops}
        notes["item_lines_dropped_samples"] = meta_samples
    if log.repaired:
        notes["encoding_repaired_lines"] = dict(log.repaired)  # data.encoding_errors=replace
    return Ingested(None, items, dropped=+log.dropped, notes=notes, drop_samples=log.samples)  # + drops zeros


def no_rows_left(source: Source, log: ReadLog) -> InputError:
    return InputError(f"{source.ratings[0]}: no valid interaction rows left; dropped {dict(log.dropped)}")


def load_dataset(spec: str, cfg: DataConfig) -> Ingested:
    """Load ``KIND:PATH`` (or ``synthetic[:N]``) into canonical interactions and items, in one
    process: every interactions file in order, then duplicates dropped over all of them."""
    kind, _ = split_spec(spec)
    if kind == "synthetic":
        from pagellm.data.synthetic import generate_synthetic  # lazy: only this kind needs it

        return generate_synthetic(synthetic_count(spec), cfg.seed)
    source = open_source(spec, cfg)
    log = ReadLog()
    items = source.read_items(log)
    tables, formats = [], []
    for index in range(len(source.ratings)):
        table, file_log, ts_format = read_interactions(source, index, cfg)
        log.merge(file_log)
        tables.append(table)
        formats.append(ts_format)
    interactions = pa.concat_tables(tables)
    if interactions.num_rows == 0:
        raise no_rows_left(source, log)
    dup = duplicate_mask(interactions)
    if dup.any():
        log.dropped["duplicate_user_item"] += int(dup.sum())
        log.add_samples("duplicate_user_item", duplicate_samples(interactions, dup, [str(p) for p in source.ratings]))
        interactions = interactions.filter(pa.array(~dup))
    interactions = interactions.drop_columns(list(ROW_COLUMNS))  # file order kept
    ingested = finish(source, log, formats, interactions.column("item_id"), items)
    ingested.interactions = interactions
    return ingested


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


def _open_text(path: Path, encoding: str = "utf-8", newline: Optional[str] = None):
    """A text file, gzipped or not. ``newline=None``: any of \\n, \\r\\n, \\r ends a line (as
    pyarrow's CSV reader counts them); JSON lines pass ``"\\n"``, where a raw \\r is whitespace
    inside a record."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, errors="replace", newline=newline)
    return open(path, encoding=encoding, errors="replace", newline=newline)


def _first_line(path: Path, encoding: str = "utf-8") -> Optional[str]:
    """The first non-blank line (BOM removed), or None for a file without any."""
    with _open_text(path, encoding) as fh:
        for line in fh:
            if line.strip():
                return line.lstrip("\ufeff").rstrip("\r\n")
    return None


def _read_csv(
    path: Path,
    log: ReadLog,
    *,
    reason: str = "malformed_line",
    names: Optional[Iterable[str]] = None,
    keep: Optional[Iterable[str]] = None,
    sep: str = ",",
    encoding: str = "utf-8",
    quoting: bool = True,
    errors: str = "strict",
) -> pd.DataFrame:
    """Read a delimited file into string columns with surrounding spaces stripped.

    Without ``names`` the first line is the header (its names are stripped too). ``keep`` names
    the columns needed; missing ones raise ``InputError``. Rows with the wrong number of fields
    are skipped and logged under ``reason`` with their lines. ``errors`` (``data.encoding_errors``):
    strict stops at the first line that is not valid ``encoding``, naming it; replace substitutes
    U+FFFD for the bad bytes and logs the repaired lines."""
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
    bad: list[str] = []  # the first few rows with the wrong number of fields; `skipped` counts all
    skipped = 0

    def skip(row) -> str:
        nonlocal skipped
        skipped += 1
        if len(bad) < SAMPLES_PER_REASON:
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
            skipped = 0
            table = read(_decoded(path, errors, log))  # names the bad line, or reads a repaired copy
    except (pa.ArrowInvalid, UnicodeError) as exc:
        raise InputError(f"{path}: cannot parse as delimited text: {exc}") from None
    if table.num_rows == 0 and bad:
        raise InputError(f"{path}: no row has the expected {len(names)} fields; first: {bad[0]!r}")
    if table.num_rows == 0:
        raise InputError(f"{path}: no data rows (header only)" if header else f"{path}: no data rows")
    lines = dict(encoding=encoding, sep=sep, quoting=quoting, fields=len(names), header=header)
    bad_lines = _csv_lines(path, [], len(bad), **lines)[1] if bad else []
    for n, text in enumerate(bad):
        log.drop(reason, path, text, line=bad_lines[n] if n < len(bad_lines) else None)
    log.dropped[reason] += skipped - len(bad)
    log.lines[str(path)] = lambda rows: _csv_lines(path, rows, 0, **lines)[0]
    columns = {n: pc.utf8_trim_whitespace(table.column(n)) for n in keep}
    return pa.table(columns).to_pandas()


def _csv_lines(
    path: Path, rows: list[int], n_bad: int, *, encoding: str, sep: str, quoting: bool, fields: int, header: bool
) -> tuple[dict[int, int], list[int]]:
    """File lines (1-based) of the 0-based data rows ``rows`` and of the first ``n_bad`` rows
    with the wrong number of fields, by pyarrow's rules (one record per line, blank lines and the
    header line skipped). A second pass in Python, run only when rows were dropped and stopped as
    soon as every wanted line is found, so that clean files never pay for it."""
    want, found, bad = set(rows), {}, []
    data_row, skip_header = 0, header
    with _open_text(path, encoding) as fh:
        for number, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if not text:
                continue
            if skip_header:
                skip_header = False
                continue
            if quoting and '"' in text:
                n_fields = len(next(csv.reader([text], delimiter=sep, quoting=csv.QUOTE_MINIMAL), []))
            else:  # no quotes: every separator splits (4x faster than the csv module)
                n_fields = text.count(sep) + 1
            if n_fields != fields:
                if len(bad) < n_bad:
                    bad.append(number)
            else:
                if data_row in want:
                    found[data_row] = number
                data_row += 1
            if len(found) == len(want) and len(bad) == n_bad:
                break
    return found, bad


def _decoded(path: Path, errors: str, log: ReadLog) -> io.BytesIO:
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
    log.repaired[str(path)] += bad_lines
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


def _read_json_lines(
    path: Path, fields: Iterable[str], log: ReadLog, reason: str, required: Optional[str] = None
) -> list[dict]:
    """Records (only ``fields`` kept). A line that is not an object, or whose ``required`` field
    is missing or blank, is logged under ``reason`` with its line; the file lines of the records
    are logged for ``ReadLog.locate``."""
    path = _existing(path)
    fields = list(fields)
    records, lines, malformed, objects = [], [], 0, 0
    with _open_text(path, newline="\n") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            rec = _parse_record(line)
            objects += isinstance(rec, dict)
            if isinstance(rec, dict) and (required is None or str(rec.get(required) or "").strip()):
                records.append({f: rec.get(f) for f in fields})
                lines.append(number)
            else:
                malformed += 1
                log.drop(reason, path, line, line=number)
    if not records:
        what = f"no line has the required field '{required}'" if objects else "no usable JSON line"
        raise InputError(f"{path}: {what}" + (f" ({malformed} malformed)" if malformed else " (empty)"))
    log.lines[str(path)] = lambda rows: {r: lines[r] for r in rows}
    return records


def _reviews_json(path: Path, log: ReadLog) -> pd.DataFrame:
    """Amazon review JSON lines -> raw interaction columns."""
    records = _read_json_lines(path, AMAZON_FIELDS.values(), log, "malformed_line")
    present = {f for r in records for f, v in r.items() if v is not None}
    require_columns(present, AMAZON_FIELDS.values(), str(path))
    return pd.DataFrame({c: [r[f] for r in records] for c, f in AMAZON_FIELDS.items()})


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


def _meta_items(path: Path, row: Callable[[dict], tuple], log: ReadLog) -> pa.Table:
    """Amazon meta JSON lines -> items; ``row`` maps a record to (category, categories)."""
    fields = ("asin", "title", "brand", "categories", "category")
    records = _read_json_lines(path, fields, log, META_DROP, required="asin")
    cats = [row(r) for r in records]
    return build_items(
        [str(r["asin"]).strip() for r in records],
        [c for c, _ in cats],
        [cs for _, cs in cats],
        [_text(r["title"]) for r in records],
        [_text(r["brand"]) for r in records],
    )


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


def _amazon_ratings(path: Path, log: ReadLog, errors: str) -> pd.DataFrame:
    """Ratings CSV (``asin, reviewerID, overall, unixReviewTime``, header optional) or review
    JSON lines, by file name."""
    if path.name.lower().endswith(JSON_SUFFIXES):
        raw = _reviews_json(path, log)
    else:
        first = _first_line(_existing(path))
        if first is None:
            raise InputError(f"{path}: file is empty")
        fields = next(csv.reader([first]))
        has_header = len(fields) < 3 or not _is_number(fields[2])
        names = None if has_header else _headerless_order(fields)
        raw = _read_csv(path, log, names=names, keep=AMAZON_FIELDS.values(), errors=errors)
        raw = raw.rename(columns={f: c for c, f in AMAZON_FIELDS.items()})
    return raw[list(RAW_COLUMNS)]


def _amazon(kind: str, arg: str, rating_suffixes, categories, errors: str) -> Source:
    ratings_path, meta_path = _amazon_files(arg, rating_suffixes)
    return Source(
        kind,
        (ratings_path,),
        partial(_amazon_ratings, errors=errors),
        partial(_meta_items, meta_path, categories),
        (meta_path,),
    )


def _amazon2014(arg: str, cfg: DataConfig) -> Source:
    suffixes = (".csv", ".csv.gz") + JSON_SUFFIXES
    return _amazon("amazon2014", arg, suffixes, _categories2014, cfg.encoding_errors)


def _amazon2018(arg: str, cfg: DataConfig) -> Source:
    return _amazon("amazon2018", arg, JSON_SUFFIXES, _categories2018, cfg.encoding_errors)


# --------------------------------------------------------------------------------- movielens
def _movielens(arg: str, cfg: DataConfig) -> Source:
    """ml-latest(-small) ``ratings.csv`` + ``movies.csv``, or ml-100k ``u.data`` + ``u.item``."""
    root = _existing(arg)
    if not root.is_dir():
        raise InputError(f"{root}: expected a MovieLens directory")
    errors = cfg.encoding_errors
    if (root / "ratings.csv").is_file() and (root / "movies.csv").is_file():
        ratings, movies = root / "ratings.csv", root / "movies.csv"
        parse, items = partial(_ml_latest_ratings, errors=errors), partial(_ml_latest_items, movies, errors)
    elif (root / "u.data").is_file() and (root / "u.item").is_file():
        ratings, movies = root / "u.data", root / "u.item"
        parse, items = partial(_ml_100k_ratings, errors=errors), partial(_ml_100k_items, movies)
    else:
        found = sorted(p.name for p in root.iterdir())
        raise InputError(f"{root}: need ratings.csv + movies.csv or u.data + u.item; found {found}")
    return Source("movielens", (ratings,), parse, items, (movies,))


def _ml_latest_ratings(path: Path, log: ReadLog, errors: str) -> pd.DataFrame:
    raw = _read_csv(path, log, keep=("userId", "movieId", "rating", "timestamp"), errors=errors)
    raw.columns = list(RAW_COLUMNS)
    return raw


def _ml_latest_items(path: Path, errors: str, log: ReadLog) -> pa.Table:
    movies = _read_csv(path, log, reason=META_DROP, keep=("movieId", "title", "genres"), errors=errors)
    genres = [[] if g == ML_NO_GENRES else [x for x in g.split("|") if x] for g in movies["genres"]]
    return _genre_items(movies["movieId"], genres, movies["title"])


def _ml_100k_ratings(path: Path, log: ReadLog, errors: str) -> pd.DataFrame:
    return _read_csv(path, log, names=RAW_COLUMNS, sep="\t", quoting=False, errors=errors)


def _ml_100k_items(path: Path, log: ReadLog) -> pa.Table:
    names = ["movie_id", "title", "release", "video_release", "url", *ML100K_GENRES]
    movies = _read_csv(path, log, reason=META_DROP, names=names, sep="|", encoding="latin-1", quoting=False)
    flags = movies[list(ML100K_GENRES[1:])].to_numpy() == "1"  # "unknown" is not a genre
    genres = [[g for g, on in zip(ML100K_GENRES[1:], row) if on] for row in flags]
    return _genre_items(movies["movie_id"], genres, movies["title"])


def _genre_items(ids, genres: list[list[str]], titles) -> pa.Table:
    """Movies: the first genre is the category, all genres are the categories, no brand."""
    return build_items(ids, [g[0] if g else None for g in genres], genres, titles)


# ------------------------------------------------------------------------------ csv / parquet
def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _read_mapped(
    path: Path, log: ReadLog, as_parquet: bool, mapping: dict, required: Iterable[str], errors: str, reason: str
) -> pd.DataFrame:
    """Read the mapped columns of a CSV/Parquet file, renamed to canonical names. Columns in
    ``required`` must exist; other mapped columns are read when present. Ids are read as text
    (so 7 stays "7", not "7.0" after a null). Malformed CSV rows are logged under ``reason``."""
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
        frame = pa.table(as_text).to_pandas()
    else:
        frame = _read_csv(path, log, reason=reason, keep=cols, errors=errors)
    return pd.DataFrame({c: frame[col] for c, col in present.items()})


def _csv(arg: str, cfg: DataConfig) -> Source:
    return _tabular("csv", arg, cfg, as_parquet=False)


def _parquet(arg: str, cfg: DataConfig) -> Source:
    return _tabular("parquet", arg, cfg, as_parquet=True)


TABULAR_SUFFIXES = {True: (".parquet", ".pq"), False: (".csv", ".csv.gz")}


def _tabular_files(arg: str, as_parquet: bool) -> tuple[Path, ...]:
    """One file, or every file of a directory with the format's suffix, in name order (the
    shards of a large log: the streaming engine reads them in parallel)."""
    path = _existing(arg)
    if path.is_file():
        return (path,)
    suffixes = TABULAR_SUFFIXES[as_parquet]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise InputError(f"{path}: no {'/'.join(suffixes)} file in the directory; found {found}")
    return tuple(files)


def _tabular(kind: str, arg: str, cfg: DataConfig, as_parquet: bool) -> Source:
    """The user's interactions file or directory of files (columns mapped by ``cfg.columns``)
    and optional items file (``cfg.items_path``, mapped by ``cfg.item_columns``; without it every
    category is unknown)."""
    parse = partial(
        _read_mapped,
        as_parquet=as_parquet,
        mapping=cfg.columns,
        required=RAW_COLUMNS,
        errors=cfg.encoding_errors,
        reason="malformed_line",
    )
    item_files = (Path(cfg.items_path).expanduser(),) if cfg.items_path else ()
    return Source(kind, _tabular_files(arg, as_parquet), parse, partial(_tabular_items, cfg), item_files)


def _tabular_items(cfg: DataConfig, log: ReadLog) -> pa.Table:
    if not cfg.items_path:
        return build_items([], [], [])
    items_path = Path(cfg.items_path).expanduser()
    meta = _read_mapped(
        items_path, log, _is_parquet(items_path), cfg.item_columns, ("item_id",), cfg.encoding_errors, META_DROP
    )
    meta["item_id"] = meta["item_id"].str.strip()
    has_id = (meta["item_id"].notna() & (meta["item_id"] != "")).to_numpy()
    no_id = np.flatnonzero(~has_id)
    lines = log.lines.get(str(items_path), lambda rows: {})(list(no_id[:SAMPLES_PER_REASON]))
    for n, row in enumerate(no_id):  # an item row without an id names no item: a counted drop
        text = ",".join(str(v) for v in meta.iloc[row]) if n < SAMPLES_PER_REASON else ""
        log.drop(META_DROP, items_path, text, line=lines.get(row), row=int(row) + 1)
    meta = meta[has_id]
    cats = [_split_categories(v) for v in meta.get("category", [None] * len(meta))]
    return build_items(
        meta["item_id"],
        [c[0] if c else None for c in cats],
        cats,
        [_text(v) for v in meta["title"]] if "title" in meta else None,
        [_text(v) for v in meta["brand"]] if "brand" in meta else None,
    )


def _split_categories(value) -> list[str]:
    """A list (Parquet list column) or a ``|``-separated string -> list of labels."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split("|") if c.strip()]
    return [str(c).strip() for c in value if c is not None and str(c).strip()]
