"""The command line and the Ray job entrypoint, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pagellm.config import load_config
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
ENV.pop("RAY_ADDRESS", None)


def run(*args, cwd=REPO):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


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
    proc = run(
        sys.executable,
        "-m",
        "pagellm.cli",
        "data",
        "--dataset",
        f"csv:{bad}",
        "--out",
        str(tmp_path / "o"),
        "--engine",
        "local",
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "user" in proc.stderr


def test_bad_override_exits_2_naming_key(tmp_path):
    proc = run(
        sys.executable,
        "-m",
        "pagellm.cli",
        "data",
        "--dataset",
        "synthetic:1000",
        "--out",
        str(tmp_path),
        "data.categry_cap=0.2",
    )
    assert proc.returncode == 2 and "data.categry_cap" in proc.stderr


def test_sft_on_a_directory_that_is_not_data_output_exits_2(tmp_path):
    proc = run(sys.executable, "-m", "pagellm.cli", "sft", "--data", str(tmp_path), "--out", str(tmp_path / "sft"))
    assert proc.returncode == 2 and "not a data-stage output" in proc.stderr
    assert str(tmp_path) in proc.stderr and "items.parquet" in proc.stderr and "Traceback" not in proc.stderr
