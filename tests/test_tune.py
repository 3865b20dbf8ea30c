"""Ray Tune over beta and lambda: upstream stages once per lambda, interrupt and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, TINY_STAGES
from transformers import AutoTokenizer

from pagellm.config import PPO_ROLES, load_config
from pagellm.errors import ConfigError
from pagellm.rl.groups import role_bundles
from pagellm.tune import pretraining_key, trial_resources, upstream_events, upstream_key

SWEEP = [
    *TINY_STAGES,
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.max_iterations=4",
    "ppo.eval_every=2",
    "ppo.checkpoint_every=2",
    "ppo.eval_max_users=24",
    "eval.page_items=20",
    "ppo.holdout_fraction=0.2",
    "tune.betas=[0.05,0.2]",
    "tune.lambdas=[0.3,0.4]",
    "tune.scheduler=fifo",
    "tune.max_concurrent_trials=1",
]


def test_upstream_key_follows_lambda_not_beta():
    base = load_config(overrides=TINY_STAGES)
    assert upstream_key(base) == upstream_key(
        load_config(overrides=[*TINY_STAGES, "ppo.kl_beta=0.3", "tune.betas=[1.0]"])
    )
    assert upstream_key(base) != upstream_key(load_config(overrides=[*TINY_STAGES, "data.category_cap=0.3"]))
    assert upstream_key(base) != upstream_key(load_config(overrides=[*TINY_STAGES, "sft.ft_epochs=7"]))
    # pre-training is shared across lambda, not across anything else the upstream stages read
    assert pretraining_key(base) == pretraining_key(load_config(overrides=[*TINY_STAGES, "data.category_cap=0.3"]))
    assert pretraining_key(base) != pretraining_key(load_config(overrides=[*TINY_STAGES, "sft.next_item_epochs=3"]))


def test_trial_bundles_follow_role_resources():
    overrides = [
        "ppo.policy.num_workers=2",
        "ppo.critic.num_workers=2",
        "ppo.policy.num_gpus=0.5",
        "ppo.fine.num_cpus=0.5",
    ]
    cfg = load_config(overrides=overrides)
    bundles, where = role_bundles(cfg.ppo, PPO_ROLES)
    assert bundles == [{"CPU": 0.25 * 4 + 0.5, "GPU": 0.5}, {"CPU": 0.5, "GPU": 0.5}]
    assert where[("policy", 1)] == 1 and where[("fine", 0)] == 0
    apart, where = role_bundles(load_config(overrides=["ppo.colocate=false"]).ppo, PPO_ROLES)
    assert len(apart) == 5 and sorted(where.values()) == list(range(5))
    # a trial: its driver's bundle first, then the roles'; the roles in its process: their
    # resources in its one bundle (Tune packs as many trials either way)
    assert trial_resources(cfg).bundles == [{"CPU": cfg.tune.driver_cpus}, *bundles]
    in_driver = load_config(overrides=[*overrides, "ppo.roles_in_driver=true"])
    assert trial_resources(in_driver).bundles == [{"CPU": cfg.tune.driver_cpus + 0.25 * 4 + 0.5 * 2, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="tune.search"):
        load_config(overrides=["tune.search=bayes"])
    with pytest.raises(ConfigError, match="log-uniformly"):
        load_config(overrides=["tune.search=optuna", "tune.betas=[0.0,0.1]"])


def _trial_events(sweep: Path) -> dict[str, list[dict]]:
    return {
        p.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for p in sweep.glob("*/trial_events.jsonl")
    }


def _start(out: Path, address: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    log = open(out.parent / f"tune_{len(list(out.parent.glob('tune_*.log')))}.log", "w")
    return subprocess.Popen(
        # two PPO iterations per trial (one evaluation after updates): CI time; the four of
        # SWEEP, with ASHA's rung at two, are test_optuna_searcher_with_asha's, and so are the
        # roles as actors in the trial's placement group (here they run in the trial's process)
        [sys.executable, "-m", "pagellm.cli", "tune", "--out", str(out), *extra, *SWEEP, "tune.betas=[0.05]"]
        + ["ppo.max_iterations=2", "ppo.roles_in_driver=true"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_sweep_interrupted_then_resumed(tiny_stages, tmp_path):
    """Ctrl-C after the first trial finished, then --resume: the upstream stages were built once
    per lambda, no finished trial ran again, and every trial of the 1 x 2 grid finished (one beta:
    CI time; beta's search space is test_optuna_searcher_with_asha's).
    lambda = 0.4 (the default) is the session's tiny stages, put in the cache beforehand: the
    sweep must find it by its configuration hash and build only lambda = 0.3, whose meta and
    next-item pre-training it copies from lambda = 0.4's (only golden-list fine-tuning trains)."""
    out = tmp_path / "sweep"
    _seed_cache(out, tiny_stages)
    import ray

    address = ray.get_runtime_context().gcs_address  # the session's Ray (tiny_stages started it)
    first = _start(out, address)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        # one trial finished and Tune has started the next (one at a time). Tune's own lines, not
        # the trials' event files: a trial writes into Ray's staging directory (its working
        # directory), which Tune copies into --out when the trial ends; two trials of ~4 s each
        # both ended before the second one's events reached --out
        log0 = (tmp_path / "tune_0.log").read_text()
        if log0.count(" completed after ") == 1 and log0.count(" started with configuration") == 2:
            break
        time.sleep(0.2)
    log0 = (tmp_path / "tune_0.log").read_text()
    assert first.poll() is None, f"the sweep ended before it was interrupted:\n{log0[-3000:]}"
    os.killpg(first.pid, signal.SIGINT)
    first.wait(timeout=300)
    finished_before = {t for t, e in _trial_events(out / "sweep").items() if e[-1]["event"] == "finished"}
    assert len(finished_before) == 1

    second = _start(out, address, "--resume")
    assert second.wait(timeout=1200) == 0, (tmp_path / "tune_1.log").read_text()[-3000:]
    log1 = (tmp_path / "tune_1.log").read_text()
    assert "restoring the sweep" in log1

    events = upstream_events(out / "upstream")
    built = [e for e in events if e["event"] == "built"]
    assert [e["category_cap"] for e in built] == [0.3], events
    assert built[0]["pretraining_from"] == f"lambda_0.4_{upstream_key(tiny_stages['cfg'])}", built
    sft_dir = out / "upstream" / f"lambda_0.3_{built[0]['key']}" / "sft"
    sft, tiny_sft = (json.loads((d / "metrics.json").read_text()) for d in (sft_dir, tiny_stages["root"] / "sft"))
    assert [sft[k] for k in ("meta", "next_item", "vocab")] == [tiny_sft[k] for k in ("meta", "next_item", "vocab")]
    assert {p.name for p in (sft_dir / "logs" / "ray_train").iterdir()} == {"golden_ft"}  # the one fit it ran
    assert sorted(e["category_cap"] for e in events if e["event"] == "reused") == [0.3, 0.4, 0.4], events

    trials = _trial_events(out / "sweep")
    assert len(trials) == 2
    for name, history in trials.items():
        assert history[-1]["event"] == "finished", (name, history)
        starts = [e for e in history if e["event"] == "start"]
        if name in finished_before:
            assert len(starts) == 1, (name, history)  # not run again after the restore
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2 and set(zip(table["beta"], table["lambda"])) == {(0.05, 0.3), (0.05, 0.4)}
    assert table["ndcg@100_last"].between(0, 1).all() and (table["iterations"] >= 2).all()
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["ndcg@100_best"] == table["ndcg@100_best"].max()
    _assert_best_checkpoints(table)
    assert (out / "heatmap.png").stat().st_size > 0 and "| trial | beta | lambda |" in (out / "trials.md").read_text()


def _assert_best_checkpoints(table: pd.DataFrame) -> None:
    """Every evaluation after an update falls on a checkpoint here (eval_every == checkpoint_every),
    so a trial whose best came after PPO updates points at that iteration's saved policy; a
    trial whose best is iteration 0 (the SFT policy) points at none."""
    assert (table["ndcg@100_best"] >= table[["ndcg@100_sft", "ndcg@100_last"]].max(axis=1)).all()
    for row in table.itertuples():
        if row.best_iteration > 0:
            assert Path(row.best_checkpoint).name == f"iter_{row.best_iteration:06d}", row
            assert (Path(row.best_checkpoint) / "state.json").exists(), row
            AutoTokenizer.from_pretrained(Path(row.best_checkpoint) / "policy")  # a loadable policy directory
        else:
            assert pd.isna(row.best_checkpoint), row


def _seed_cache(out: Path, tiny_stages) -> None:
    """The session's tiny stages as the finished upstream build of lambda = 0.4 (the default)."""
    cfg = tiny_stages["cfg"]
    where = out / "upstream" / f"lambda_0.4_{upstream_key(cfg)}"
    where.mkdir(parents=True)
    for name in ("data", "sft", "reward"):
        (where / name).symlink_to(tiny_stages["root"] / name)
    (where / "done.json").write_text(json.dumps({"key": upstream_key(cfg), "pretraining_key": pretraining_key(cfg)}))


def test_optuna_searcher_with_asha(tiny_stages, tmp_path):
    """Optuna proposes beta in [0.02, 0.5] (log-uniform); ASHA may stop a trial at its first
    rung (iteration 2 of 4); the upstream stages come from the cache."""
    from pagellm.tune import run_tune

    _seed_cache(tmp_path, tiny_stages)
    overrides = [
        *SWEEP,
        "tune.search=optuna",
        "tune.betas=[0.02,0.5]",
        "tune.lambdas=[0.4]",
        "tune.num_samples=2",  # two trials: one proposal each, ASHA between them (CI time)
        "tune.scheduler=asha",
        "tune.grace_period=2",
        "tune.reduction_factor=2",
    ]
    summary = run_tune(None, overrides, tmp_path, command="test")
    table = pd.read_csv(tmp_path / "trials.csv")
    assert len(table) == 2 and summary["trials"] == 2
    assert table["beta"].between(0.02, 0.5).all() and table["beta"].nunique() == 2
    assert set(table["status"]) <= {"done", "stopped"} and set(table["iterations"]) <= {2, 4}
    assert summary["best"]["ndcg@100_best"] == table["ndcg@100_best"].max()
    _assert_best_checkpoints(table)
    # ASHA ends a trial at its report of max_t too: a trial that ran every iteration still wrote
    # its final policy, curves and `finished` event first; one stopped at the rung did not finish
    events = _trial_events(tmp_path / "sweep")
    for row in table.itertuples():
        trial_dir = Path(row.path)
        finished = events[trial_dir.name][-1]["event"] == "finished"
        assert finished == (row.iterations == 4), (row, events[trial_dir.name])
        if finished:
            assert (trial_dir / "ppo" / "policy" / "tokenizer.json").exists() and (
                trial_dir / "ppo" / "ppo_curves.png"
            ).exists()
    assert [e["event"] for e in upstream_events(tmp_path / "upstream")] == ["reused"]
