"""The command line and the Ray job entrypoint, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
ENV.pop("RAY_ADDRESS", None)


def run(*args, cwd=REPO):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_pagellm_run_on_embedded_default(tmp_path):
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.bpe_vocab_size=300",
            "sft.meta_epochs=1", "sft.ft_epochs=1", "reward.epochs=1", "ppo.max_iterations=2", "ppo.batch_size=16",
            "ppo.eval_max_users=16"]
    proc = run(sys.executable, "-m", "pagellm.cli", "run", "--out", str(tmp_path), "data.dataset=synthetic:3000", "ray.num_cpus=2", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data stage:" in proc.stdout and "sft: valid_page_rate" in proc.stdout and "reward accuracy" in proc.stdout
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["dataset"] == "synthetic:3000" and stats["engine"] == "ray" and stats["pairs_total"] > 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["data"] == str(tmp_path / "data") and summary["sft"] == str(tmp_path / "sft")
    # the packaged embedded profile was applied: its extra fine-tuning windows are in ft/
    assert stats["ft_rows"] > stats["ft_users"]
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert set(summary["reward_metrics"]["accuracy"]) == {"coarse", "fine", "combined"}
    assert "ppo: iteration 2" in proc.stdout and summary["ppo"] == str(tmp_path / "ppo")
    assert (tmp_path / "ppo" / "policy" / "model.safetensors").exists()
    lines = (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]


def test_ray_job_entrypoint_runs_data_stage(tmp_path):
    proc = run(sys.executable, "ray_jobs/build_pairs.py", "--dataset", "synthetic:3000", "--out", str(tmp_path), "--engine", "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "stats.json").read_text())["ft_rows"] > 0


def test_bad_input_exits_2_naming_file_and_column(tmp_path):
    bad = tmp_path / "ratings.csv"
    bad.write_text("user,item_id,rating,ts\nu1,i1,5,1\n")
    proc = run(sys.executable, "-m", "pagellm.cli", "data", "--dataset", f"csv:{bad}", "--out", str(tmp_path / "o"), "--engine", "local")
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "user" in proc.stderr


def test_bad_override_exits_2_naming_key(tmp_path):
    proc = run(sys.executable, "-m", "pagellm.cli", "data", "--dataset", "synthetic:1000", "--out", str(tmp_path), "data.categry_cap=0.2")
    assert proc.returncode == 2 and "data.categry_cap" in proc.stderr


def test_sft_on_a_directory_that_is_not_data_output_exits_2(tmp_path):
    proc = run(sys.executable, "-m", "pagellm.cli", "sft", "--data", str(tmp_path), "--out", str(tmp_path / "sft"))
    assert proc.returncode == 2 and "not a data-stage output" in proc.stderr
