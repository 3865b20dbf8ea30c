"""RecBole on PageLLM's split: the export round-trips through RecBole's own loader, and RecBole
models run through the bridge are masked and scored by the project's code (RecBole's own
environment, built by `pagellm setup recbole` as .ci/run does)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pagellm.config import load_config
from pagellm.data.layout import DataDir
from pagellm.data.stage import build_dataset
from pagellm.eval.baselines import baseline_pages, load_protocol, pages_from_scores
from pagellm.eval.metrics import mean_metrics, page_metrics
from pagellm.eval.recbole_bridge import export_recbole, require_env
from pagellm.experiments import run_compare

CFG = load_config(overrides=["data.dataset=synthetic:4000", "eval.recbole_epochs=2"])

# Loads an export with RecBole's own dataset code and prints every split's interactions per user.
LOAD = """
import json, sys
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
config = Config(model=sys.argv[2], config_file_list=[sys.argv[1]], config_dict={"show_progress": False})
dataset = create_dataset(config)
out = {}
for name, part in zip(("train", "val", "test"), dataset.build()):
    users = dataset.id2token(dataset.uid_field, part.inter_feat[dataset.uid_field].numpy())
    items = dataset.id2token(dataset.iid_field, part.inter_feat[dataset.iid_field].numpy())
    hist = {}
    if dataset.iid_field + config["LIST_SUFFIX"] in part.inter_feat:
        lists = part.inter_feat[dataset.iid_field + config["LIST_SUFFIX"]].numpy()
        lengths = part.inter_feat[config["ITEM_LIST_LENGTH_FIELD"]].numpy()
        hist = [list(dataset.id2token(dataset.iid_field, row[:n])) for row, n in zip(lists, lengths)]
    out[name] = {"users": list(users), "items": list(items), "history": hist}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    require_env(CFG.eval.recbole_python)
    root = tmp_path_factory.mktemp("recbole") / "data"
    build_dataset(CFG, root, engine="local")
    return root


def _positives(data: Path, split: str) -> dict[str, list[str]]:
    frame = DataDir(data).read_split(split).to_pandas()
    frame = frame[frame.rating > CFG.data.positive_threshold].sort_values(["user_id", "ts"], kind="stable")
    return frame.groupby("user_id").item_id.agg(list).to_dict()


def _load(export: Path, yaml_name: str, model: str) -> dict:
    done = subprocess.run(
        [str(Path(CFG.eval.recbole_python).absolute()), "-c", LOAD, str(export / yaml_name), model],
        capture_output=True,
        text=True,
        check=True,
        cwd=export,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_round_trips_through_recboles_loader(data, tmp_path):
    export = tmp_path / "export"
    report = export_recbole(data, export, CFG.data.positive_threshold, max_history=5)
    loaded = _load(export, "recbole.yaml", "BPR")
    for split in ("train", "val", "test"):
        got: dict[str, list[str]] = {}
        for user, item in zip(loaded[split]["users"], loaded[split]["items"]):
            got.setdefault(user, []).append(item)
        assert got == _positives(data, split), split
    assert report["rows"]["pagellm.train.inter"] == sum(len(v) for v in _positives(data, "train").values())

    seq = _load(export, "recbole-seq.yaml", "SASRec")
    train, val = _positives(data, "train"), _positives(data, "val")
    expected = [(u, s[max(0, t - 5) : t], s[t]) for u, s in train.items() for t in range(1, len(s))]
    assert sorted(zip(seq["train"]["users"], seq["train"]["history"], seq["train"]["items"])) == sorted(expected)
    for split, before in (("val", lambda u: train.get(u, [])), ("test", lambda u: train.get(u, []) + val.get(u, []))):
        rows = list(zip(seq[split]["users"], seq[split]["history"], seq[split]["items"]))
        expected = [(u, before(u)[-5:], i) for u, items in _positives(data, split).items() for i in items if before(u)]
        assert sorted(rows) == sorted(expected), split
        assert report["sequential_rows_without_history"][split] == sum(
            len(items) for u, items in _positives(data, split).items() if not before(u)
        )


def test_recbole_models_through_compare_are_masked_and_scored_by_our_code(data, tmp_path, monkeypatch):
    python = str(Path(CFG.eval.recbole_python).absolute())
    cfg = load_config(
        overrides=["data.dataset=synthetic:4000", "eval.recbole_epochs=2", f"eval.recbole_python={python}"]
    )
    monkeypatch.chdir(tmp_path)  # a relative report directory, as users give it
    report = run_compare(cfg, data, {}, ["popularity", "recbole:Pop", "recbole:SASRec"], "compare", "test", seeds=(0,))
    out = tmp_path / "compare"
    protocol = load_protocol(data, "test", CFG.data.positive_threshold)
    category = DataDir(data).categories()

    def bridge_pages(model: str) -> list[list[str]]:
        run = out / "recbole" / model / "seed_0"
        result = json.loads((run / "result.json").read_text())
        scores = np.load(run / "scores.npz")["scores"]
        pages, missing = pages_from_scores(protocol, result["users"], result["items"], scores, CFG.eval.page_items)
        assert missing == 0
        return pages

    # RecBole's Pop (batch 1, no negatives) ranks exactly as the in-house popularity, ties included
    pop = bridge_pages("Pop")
    assert pop == baseline_pages("popularity", protocol, CFG.eval.page_items)
    assert report["runs"]["recbole:Pop"][0]["ndcg@100"] == report["runs"]["popularity"][0]["ndcg@100"]

    # SASRec's pages: every seen item masked, full length, and the report's numbers are our metric code's
    sasrec = bridge_pages("SASRec")
    for page, seen in zip(sasrec, protocol.users.seen):
        assert len(page) == CFG.eval.page_items and not set(page) & set(seen)
    ours = mean_metrics([page_metrics(p, t, category) for p, t in zip(sasrec, protocol.users.target)])
    run = report["runs"]["recbole:SASRec"][0]
    assert run["ndcg@100"] == pytest.approx(ours["ndcg@100"], abs=1e-12)
    assert run["recall@20"] == pytest.approx(ours["recall@20"], abs=1e-12)
    assert run["recbole"]["epochs_run"] == 2 and 0 < run["recbole"]["recbole_test"]["ndcg@100"] <= 1
    assert "recbole:SASRec" in report["paired_vs_best_baseline"] or report["best_baseline"] == "recbole:SASRec"
    assert "RecBole's own numbers" in (out / "compare.md").read_text()
