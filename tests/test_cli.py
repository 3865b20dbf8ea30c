"""The command line and the Ray job entrypoint, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pagellm.config import load_config
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
ENV.pop("RAY_ADDRESS", None)
RAY_TEMP = Path(tempfile.gettempdir()) / "ray"  # Ray's default temp dir: one session_* per start


def run(*args, cwd=REPO):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def pagellm(command: str, *args):
    """``pagellm COMMAND ARGS`` as a user runs it; the data stage on its local engine (no Ray)."""
    local = ("--engine", "local") if command == "data" else ()
    return run(sys.executable, "-m", "pagellm.cli", command, *args, *local)


def test_ray_job_entrypoint_runs_data_stage(tmp_path):
    proc = run(
        sys.executable, "ray_jobs/data.py", "--dataset", "synthetic:3000", "--out", str(tmp_path), "--engine", "local"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "stats.json").read_text())["ft_rows"] > 0
    # the resolved configuration is written beside the outputs and loads back as it ran
    written = load_config(tmp_path / "config.yaml")
    assert written == load_config(overrides=["data.dataset=synthetic:3000"])
    # the data stage trains nothing: no learning-rate warning (the training stages': test_config.py)
    assert "--profile" not in proc.stderr


def test_bad_input_exits_2_naming_file_and_column(tmp_path):
    bad = tmp_path / "logs #2 = 2026" / "ratings.csv"  # ' #' and '=' stay part of the path
    bad.parent.mkdir()
    bad.write_text("user,item_id,rating,ts\nu1,i1,5,1\n")
    proc = pagellm(
        "data",
        "--dataset",
        f"csv:{bad}",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "user" in proc.stderr


def test_data_console_says_where_dropped_rows_are(tmp_path):
    ratings = tmp_path / "ratings.csv"
    rows = [f"u{u},i{i},{4 + i % 2},{100 * u + i}" for u in range(20) for i in range(10)]
    ratings.write_text(
        "user_id,item_id,rating,ts\n" + "\n".join(rows[:7] + ["u1,i1,five,3", "u2,i2"] + rows[7:]) + "\n"
    )
    proc = pagellm("data", "--dataset", f"csv:{ratings}", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 input rows dropped" in proc.stdout
    assert "dropped rows: bad_rating 1 (first: ratings.csv line 9), malformed_line 1 (first: ratings.csv line 10)" in (
        proc.stdout
    )


def test_model_import_of_a_missing_or_non_gguf_file_exits_2(tmp_path):
    proc = pagellm("model", "import", "--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and f"{tmp_path / 'none.gguf'}: GGUF file does not exist" in proc.stderr
    (tmp_path / "text.gguf").write_text("not a model")
    proc = pagellm("model", "import", "--gguf", str(tmp_path / "text.gguf"), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "cannot load as a GGUF causal LM" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_override_exits_2_naming_key(tmp_path):
    proc = pagellm(
        "data",
        "--dataset",
        "synthetic:1000",
        "--out",
        str(tmp_path),
        "data.categry_cap=0.2",
    )
    assert proc.returncode == 2 and "data.categry_cap" in proc.stderr


def test_merge_with_a_stray_word_exits_2_naming_it(tmp_path):
    """A report directory typed after --out is not a report to merge: exit 2 naming it, no report."""
    stray = str(tmp_path / "report_b")
    proc = pagellm("experiment", "merge", "--reports", str(tmp_path / "a"), "--out", str(tmp_path / "m"), stray)
    assert proc.returncode == 2 and stray in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_sft_on_a_directory_that_is_not_data_output_exits_2(tmp_path):
    proc = pagellm("sft", "--data", str(tmp_path), "--out", str(tmp_path / "sft"))
    assert proc.returncode == 2 and "not a data-stage output" in proc.stderr
    assert str(tmp_path) in proc.stderr and "items.parquet" in proc.stderr and "Traceback" not in proc.stderr


def test_a_log_without_positives_stops_the_data_stage_and_sft(tmp_path):
    """All ratings <= 3: the data stage exits 2 saying why (its stats are still written), and
    SFT on that output exits 2 naming the empty table before starting Ray."""
    ratings = tmp_path / "ratings.csv"
    rows = [f"u{u},i{i},{1 + (u + i) % 3},{100 * u + i}" for u in range(30) for i in range(8)]
    ratings.write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\n")
    out = tmp_path / "data"
    proc = pagellm(
        "data",
        "--dataset",
        f"csv:{ratings}",
        "--out",
        str(out),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "kept 0 users" in proc.stderr and "no positives" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((out / "stats.json").read_text())["users_kept"] == 0
    sessions = set(RAY_TEMP.glob("session_2*"))  # a Ray start makes a new session directory
    proc = pagellm("sft", "--profile", "embedded", "--data", str(out), "--out", str(tmp_path / "sft"))
    assert proc.returncode == 2 and "has no rows" in proc.stderr and "Traceback" not in proc.stderr
    assert set(RAY_TEMP.glob("session_2*")) == sessions, "Ray was started"


def test_paths_of_the_wrong_kind_are_one_line_errors(tmp_path):
    """--out naming a file and csv: naming a directory: exit 2, the path named, no traceback
    (one with -v)."""
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    data = ("--dataset", "synthetic:500")
    proc = pagellm("data", *data, "--out", str(a_file))
    assert proc.returncode == 2 and str(a_file) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = pagellm("data", "--dataset", f"csv:{tmp_path}", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = pagellm("data", *data, "--out", str(a_file), "-v")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
