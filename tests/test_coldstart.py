"""`pagellm experiment coldstart` on full and halved training data (baselines only: a chain per
share costs minutes even at test size; the chain itself is covered by test_e2e_job.py and the
committed docs/results/*/coldstart runs)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pagellm.data.layout import DataDir
from pagellm.experiments import USERS_FILE, run_coldstart

MODELS = {"popularity", "itemknn"}


def test_coldstart_reports_each_models_paired_drop(ray_session, tmp_path):
    overrides = ["data.dataset=synthetic:6000", "eval.page_items=50"]
    report = run_coldstart(
        None, overrides, [0.5], sorted(MODELS), tmp_path, "test", (0,), command="coldstart", pagellm=False
    )
    full, cold = DataDir(tmp_path / "keep_1" / "chain" / "data"), DataDir(tmp_path / "keep_0.5" / "chain" / "data")
    n_full, n_cold = full.read_split("train").num_rows, cold.read_split("train").num_rows
    assert report["withheld"] == {"1": 0, "0.5": n_full - n_cold} and 0.4 < n_cold / n_full < 0.6
    assert cold.read_split("test").equals(full.read_split("test"))
    assert set(report["change_vs_full"]["0.5"]) == MODELS
    for name, change in report["change_vs_full"]["0.5"].items():
        for key in ("ndcg@100", "recall@20"):
            # the same test users in both runs: the mean per-user change is the change of the means
            diff = report["mean_sd"]["0.5"][name][key][0] - report["mean_sd"]["1"][name][key][0]
            assert change[key]["mean"] == pytest.approx(diff, abs=1e-9)
            assert change[key]["ci95"][0] <= change[key]["mean"] <= change[key]["ci95"][1]
            assert change[key]["relative"] == pytest.approx(diff / change[key]["full"])
    users = pd.read_parquet(tmp_path / "keep_0.5" / "compare" / USERS_FILE)
    assert set(users.model) == MODELS
    assert json.loads((tmp_path / "coldstart.json").read_text())["train_keep"] == [1.0, 0.5]
    text = (tmp_path / "coldstart.md").read_text()
    assert "| popularity | 1 |" in text and "| | 0.5 |" in text
    assert (tmp_path / "coldstart.png").stat().st_size > 10_000
