"""Baselines see exactly the protocol's data and are scored with the same metric code."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pagellm.config import load_config
from pagellm.errors import ConfigError
from pagellm.eval.baselines import (
    EASE_L2,
    Protocol,
    baseline_pages,
    best_ease,
    ease_weights,
    itemknn_similarity,
    load_protocol,
    pages_from_scores,
    popularity_scores,
    userknn_scores,
)
from pagellm.experiments import run_compare, run_merge


def toy() -> Protocol:
    items = ["a", "b", "c", "d"]
    train = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"], "item": [0, 1, 0, 2, 0], "ts": [1, 2, 1, 2, 1]})
    users = pd.DataFrame(
        {"user_id": ["u1", "u3"], "history": [[0, 1], [0]], "seen": [[0, 1], [0, 3]], "target": [["c"], ["b"]]}
    )
    return Protocol(items, train, users)


def test_popularity_counts_training_positives_and_masks_seen():
    p = toy()
    assert popularity_scores(p).tolist() == [3, 1, 1, 0]
    pages = baseline_pages("popularity", p, k=3)
    assert pages[0] == ["c", "d"]  # a, b seen; only two items left
    assert pages[1] == ["b", "c"]  # a and d seen; b and c tie at 1, ties by item index


def test_itemknn_cosine_by_hand():
    p = toy()
    sim = itemknn_similarity(p, neighbours=10)
    # item columns: a = {u1, u2, u3}, b = {u1}, c = {u2}: cos(a, b) = 1 / sqrt(3)
    assert sim[0, 1] == pytest.approx(1 / np.sqrt(3)) and sim[1, 2] == 0.0 and sim[0, 0] == 0.0
    assert baseline_pages("itemknn", p, k=1)[1] in (["b"], ["c"])


def test_userknn_scores_by_hand_and_leaves_the_user_out():
    """u3's history {a} against the training users: u1 = {a, b} and u2 = {a, c} at cosine
    1 / sqrt(2) each, u3's own row (the same {a}) left out. u1's history {a, b}: u2 at 1 / 2, u3 at
    1 / sqrt(2), u1 itself left out; with one neighbour only u3 counts."""
    p = toy()
    scores = userknn_scores(p, neighbours=10)
    half = 1 / np.sqrt(2)
    assert scores[1] == pytest.approx([2 * half, half, half, 0.0])
    assert scores[0] == pytest.approx([0.5 + half, 0.0, 0.5, 0.0])
    assert baseline_pages("userknn", p, k=1)[0] == ["c"]  # a and b seen; c from u2
    assert userknn_scores(p, neighbours=1)[0] == pytest.approx([half, 0.0, 0.0, 0.0])


def test_ease_weights_solve_the_constrained_ridge_regression(tiny_stages):
    """EASE's B minimises ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0: its stationarity condition
    (G + l2 I) B = G - diag(mu) holds off the diagonal (G = X'X), for any mu; best_ease keeps the
    penalty whose pages score best on validation."""
    p = load_protocol(tiny_stages["root"] / "data", "val")
    weights = ease_weights(p, 10.0).astype(np.float64)
    x = np.zeros((p.train_pos.user_id.nunique(), len(p.items)))
    x[p.train_pos.user_id.astype("category").cat.codes, p.train_pos.item] = 1.0
    gram = x.T @ x
    residual = (gram + 10.0 * np.eye(len(gram))) @ weights - gram
    off_diagonal = residual[~np.eye(len(gram), dtype=bool)]
    assert np.abs(np.diag(weights)).max() == 0 and np.abs(off_diagonal).max() < 1e-3 * np.abs(gram).max()
    assert np.abs(weights).max() > 0  # not the trivial solution

    from pagellm.eval.baselines import _item_item_scores, validation_ndcg

    l2, chosen = best_ease(p, p)
    scores = {penalty: validation_ndcg(_item_item_scores(ease_weights(p, penalty), p), p) for penalty in EASE_L2}
    assert scores[l2] == max(scores.values()) and np.array_equal(chosen, ease_weights(p, l2))
    pages = baseline_pages("ease", p, k=20, val=p)
    assert all(
        len(page) == 20 and not set(page) & {p.items[j] for j in seen} for page, seen in zip(pages, p.users.seen)
    )


def test_compare_report_names_the_gap_to_the_best_baseline(tiny_stages, tmp_path):
    root = tiny_stages["root"]
    cfg = load_config(overrides=[*tiny_stages["overrides"], "eval.page_items=20"])
    seeds = f"{root / 'sft'},{root / 'sft'}"  # NAME=DIR1,DIR2: one policy per seed (here twice the same)
    report = run_compare(
        cfg,
        root / "data",
        {"sft": str(root / "sft"), "sft x2": seeds},
        ["popularity", "itemknn"],
        tmp_path,
        "test",
        (0,),
    )
    assert set(report["mean_sd"]) == {"popularity", "itemknn", "sft", "sft x2"}
    assert len(report["runs"]["sft x2"]) == 2
    assert list(report["mean_sd"]["sft x2"]["ndcg@100"]) == pytest.approx(
        [report["mean_sd"]["sft"]["ndcg@100"][0], 0.0]
    )
    text = (tmp_path / "compare.md").read_text()
    assert "sft NDCG@100 vs the best baseline" in text and "| popularity |" in text
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["split"] == "test"
    # every other model against the best baseline, user by user, with a paired interval
    best = saved["best_baseline"]
    assert best in ("popularity", "itemknn") and set(saved["paired_vs_best_baseline"]) == {
        "popularity",
        "itemknn",
        "sft",
        "sft x2",
    } - {best}
    sft = saved["paired_vs_best_baseline"]["sft"]
    assert sft["users"] == report["runs"]["sft"][0]["users"]
    for key in ("ndcg@100", "recall@20"):
        low, high = sft[key]["ci95"]
        gap = report["mean_sd"]["sft"][key][0] - report["mean_sd"][best][key][0]
        assert low <= sft[key]["mean"] <= high and abs(sft[key]["mean"] - gap) < 1e-9
    assert "paired bootstrap 95% intervals" in text
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_compare_reuses_finished_baseline_runs_only_under_the_same_settings(tiny_stages, tmp_path, capsys):
    """Several compares into one directory make one report (a long RecBole run and the in-house
    rows can run side by side); a changed setting or rebuilt data trains again."""
    root = tiny_stages["root"]
    cfg = load_config(overrides=[*tiny_stages["overrides"], "eval.page_items=20"])
    first = run_compare(cfg, root / "data", {}, ["itemknn"], tmp_path, "test", (0,))
    capsys.readouterr()
    both = run_compare(cfg, root / "data", {}, ["itemknn", "popularity"], tmp_path, "test", (0,))
    printed = capsys.readouterr().out
    assert "itemknn seed 0 reused" in printed and "popularity seed 0 reused" not in printed
    assert both["runs"]["itemknn"] == first["runs"]["itemknn"]  # seconds included: not trained again
    assert set(both["mean_sd"]) == {"itemknn", "popularity"} and both["reused"] == ["itemknn seed 0"]
    assert (
        "Reused from earlier compares into this directory (their own s/run below): itemknn seed 0"
        in (tmp_path / "compare.md").read_text()
    )
    other = load_config(overrides=[*tiny_stages["overrides"], "eval.page_items=10"])
    run_compare(other, root / "data", {}, ["itemknn"], tmp_path, "test", (0,))
    assert "reused" not in capsys.readouterr().out


def test_merge_makes_one_report_of_compares_on_the_same_split(tiny_stages, tmp_path):
    """A slow baseline's report and a later PageLLM report become one table; the split is
    checked user by user (popularity's values), a same-named row with other values is kept
    apart, and a report on another split is refused."""
    from pagellm.data.stage import build_dataset

    root = tiny_stages["root"]
    cfg = load_config(overrides=[*tiny_stages["overrides"], "eval.page_items=20"])
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    first = run_compare(cfg, root / "data", {"sft": str(root / "sft")}, ["popularity", "bprmf"], a, "test", (1,))
    second = run_compare(cfg, root / "data", {}, ["popularity", "itemknn", "bprmf"], b, "test", (0,))
    merged = run_merge([a, b], tmp_path / "merged", "pagellm experiment merge ...")

    assert list(merged["mean_sd"]) == ["popularity", "bprmf", "itemknn", "bprmf [b]", "sft"]  # PageLLM last
    assert merged["policies"] == ["sft"] and merged["sources"][1]["identical"] == ["popularity"]
    assert merged["mean_sd"]["bprmf [b]"]["ndcg@100"][0] == pytest.approx(second["mean_sd"]["bprmf"]["ndcg@100"][0])
    best = max(["popularity", "bprmf", "itemknn", "bprmf [b]"], key=lambda n: merged["mean_sd"][n]["ndcg@100"][0])
    assert merged["best_baseline"] == best and best not in merged["paired_vs_best_baseline"]
    if best in first["mean_sd"]:  # the same pairing the first report made, to the digit
        again, then = (
            merged["paired_vs_best_baseline"]["sft"]["ndcg@100"],
            first["paired_vs_best_baseline"]["sft"]["ndcg@100"],
        )
        assert [again["mean"], *again["ci95"]] == pytest.approx([then["mean"], *then["ci95"]])
    text = (tmp_path / "merged" / "compare.md").read_text()
    assert f"`{a}`" in text and f"`{b}`" in text and "| bprmf [b] |" in text and "paired bootstrap" in text
    assert (tmp_path / "merged" / "compare.png").stat().st_size > 0

    build_dataset(
        load_config(overrides=[*tiny_stages["overrides"], "data.seed=1", "data.dataset=synthetic:3000"]),
        tmp_path / "data_other",
        engine="local",
    )
    run_compare(cfg, tmp_path / "data_other", {}, ["popularity"], other, "test", (0,))
    with pytest.raises(ConfigError, match="not the same split|cannot be shown"):
        run_merge([a, other], tmp_path / "refused")


def test_multivae_learns_co_occurrence():
    """Two tastes (items 0-4 or 5-9, each user holding 4 of 5): a user with 0, 1, 2 gets 3 and 4."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(200):
        block = rng.integers(2) * 5
        for i in rng.choice(5, 4, replace=False):
            rows.append((f"u{u}", int(block + i), 0))
    train = pd.DataFrame(rows, columns=["user_id", "item", "ts"])
    users = pd.DataFrame(
        {"user_id": ["x", "y"], "history": [[0, 1, 2], [7, 8]], "seen": [[0, 1, 2], [7, 8]], "target": [["d"], ["f"]]}
    )
    p = Protocol([str(i) for i in range(10)], train, users)
    pages = baseline_pages("multivae", p, k=3)
    assert set(pages[0][:2]) == {"3", "4"} and set(pages[1][:3]) == {"5", "6", "9"}


def test_trained_baselines_keep_their_best_validation_epoch(tmp_path):
    from pagellm.data.stage import build_dataset
    from pagellm.eval.baselines import (
        multivae_scores,
        sasrec_scores,
        train_bprmf,
        train_multivae,
        train_sasrec,
        validation_ndcg,
    )

    build_dataset(load_config(overrides=["data.dataset=synthetic:4000"]), tmp_path / "data", engine="local")
    p, val = load_protocol(tmp_path / "data", "test"), load_protocol(tmp_path / "data", "val")
    trained = {
        "bprmf": (train_bprmf(p, epochs=8, val=val, patience=3), None),
        "sasrec": (train_sasrec(p, epochs=8, val=val, patience=3), sasrec_scores),
        "multivae": (train_multivae(p, epochs=8, val=val, patience=3), multivae_scores),
    }
    for name, (model, scores) in trained.items():
        sel = model.selection
        history = sel.history
        assert 1 <= len(history) <= 8 and sel.best_epoch == int(np.argmax(history)) + 1, name
        assert len(history) == 8 or len(history) == sel.best_epoch + 3, name  # stopped by patience
        on_val = model(val) if scores is None else scores(model, val)
        assert validation_ndcg(on_val, val) == pytest.approx(max(history), abs=1e-12), name  # best restored
        # test pages: k distinct items, none seen before the split
        on_test = model(p) if scores is None else scores(model, p)
        pages, missing = pages_from_scores(p, list(p.users.user_id), p.items, on_test, 15)
        assert missing == 0 and len(pages) == len(p.users), name
        for page, seen in zip(pages, p.users.seen):
            assert len(page) == len(set(page)) == min(15, len(p.items) - len(set(seen))), name
            assert not {p.items[i] for i in seen} & set(page), name


def test_sasrec_windows_train_every_prefix_once_with_its_own_history():
    """RecBole's augmentation (every prefix a sample) read off one causal pass per window: each
    target comes once, with the items just before it (at most max_len, at least max_len // 2 + 1
    where it has that many), and the window's state at its position is the prefix's own state."""
    import torch

    from pagellm.eval.baselines import sasrec_windows
    from pagellm.model.sasrec import SASRec

    for max_len in (1, 4, 7):
        for n in range(0, 30):
            inputs, labels = sasrec_windows([list(range(100, 100 + n))], max_len)
            trained = {}
            for x, y in zip(inputs.tolist(), labels.tolist()):
                for k, label in enumerate(y):
                    if label >= 0:
                        assert label not in trained
                        trained[label] = [i - 1 for i in x[: k + 1]]
            assert sorted(trained) == list(range(101, 100 + n)), (max_len, n)
            for label, history in trained.items():
                assert history == list(range(label - len(history), label)), (max_len, n, label)
                assert min(label - 100, max_len // 2 + 1) <= len(history) <= max_len, (max_len, n, label)
    model = SASRec(20, max_len=7).eval()
    (window,), _ = sasrec_windows([[3, 1, 4, 1, 5, 9, 2, 6]], 7)
    with torch.no_grad():
        states = model.states(window[None])[0] @ model.item.weight[1:].T
        for k in range(7):
            prefix = torch.zeros(1, 7, dtype=torch.long)
            prefix[0, : k + 1] = window[: k + 1]
            assert torch.allclose(states[k], model(prefix, torch.tensor([k + 1]))[0], atol=1e-5), k


def test_baselines_train_on_the_cores_they_are_given_and_give_the_threads_back():
    """`pagellm run` and `compare` train the baselines in the driver with every core
    (``RayConfig.cores``): the pages are those of one thread, and the driver's thread count is
    restored afterwards, also when the baseline fails."""
    import torch

    from pagellm.config import RayConfig

    assert RayConfig(num_cpus=3).cores() == 3 and RayConfig().cores() >= 1
    p, before = toy(), torch.get_num_threads()
    one = baseline_pages("sasrec", p, k=2, epochs=2, threads=1)
    assert torch.get_num_threads() == before
    assert baseline_pages("sasrec", p, k=2, epochs=2, threads=2) == one
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_pages("nope", p, threads=before + 1)
    assert torch.get_num_threads() == before
