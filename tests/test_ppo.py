"""PPO stage: role actors on a local Ray with DeepSpeed, sharded roles, logs, and resume after
the driver is killed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from pagellm.config import load_config
from pagellm.eval.evaluate import run_evaluate
from pagellm.eval.metrics import METRICS
from pagellm.outputs import read_jsonl
from pagellm.rl.ppo import run_ppo

PPO_QUICK = ["ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.eval_max_users=24", "ppo.lr=1e-4", "ppo.critic_lr=1e-4"]
IN_DRIVER = "ppo.roles_in_driver=true"  # every role in the test process, no actors (start-up: CI time)


def test_ppo_with_sharded_role_actors_validates_as_pagellm_evaluate(tiny_stages, tmp_path):
    """Two policy and two critic workers (dense reward placement, k3 KL) train and log every
    statistic; the logged validation metrics are `pagellm evaluate --split val` of the same
    weights: the SFT policy at iteration 0, the saved checkpoint at iteration 2 (one protocol, one
    code path, whichever replica wrote the pages)."""
    root = tiny_stages["root"]
    cfg = load_config(
        overrides=[
            *tiny_stages["overrides"],
            *PPO_QUICK,
            "ppo.eval_max_users=null",
            "eval.page_items=20",
            "ppo.max_iterations=2",
            "ppo.eval_every=2",
            "ppo.checkpoint_every=2",
            "ppo.policy.num_workers=2",
            "ppo.critic.num_workers=2",
            "ppo.policy.num_cpus=0.2",
            "ppo.critic.num_cpus=0.2",
            "ppo.reward_placement=dense",
            "ppo.kl_estimator=k3",
        ]
    )
    out = tmp_path / "ppo"
    last = run_ppo(cfg, root / "data", root / "sft", root / "reward", out)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for key in (
        "reward_coarse",
        "reward_fine",
        "reward_total",
        "kl",
        "clip_fraction",
        "entropy",
        "value_loss",
        "pages_per_s",
        "time_generate",
        "time_score",
        "time_train",
        "time_sync",
    ):
        assert all(key in r and r[key] == r[key] for r in records[1:]), key  # present and not NaN
    assert all(r["kl"] >= 0 for r in records[1:])  # k3 is never negative
    assert records[-1]["time_sync"] > 0  # two policy replicas were compared after each update
    assert "val_ndcg@100" in records[0] and "val_ndcg@100" in last and "holdout_reward_total" in last
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    sft = AutoModelForCausalLM.from_pretrained(root / "sft")
    moved = sum((a - b).abs().sum().item() for a, b in zip(policy.parameters(), sft.parameters()))
    assert moved > 0, "the policy was updated"
    assert (out / "policy" / "tokenizer.json").exists() and (out / "ppo_curves.png").stat().st_size > 0
    state = json.loads((out / "checkpoints" / "iter_000002" / "state.json").read_text())
    assert state["iteration"] == 2 and state["normalizer"]["count"] == 2 * 16

    logged = {r["iteration"]: r for r in records if "val_ndcg@100" in r}
    assert sorted(logged) == [0, 2]
    for iteration, model in ((0, root / "sft"), (2, out / "checkpoints" / "iter_000002" / "policy")):
        evaluated = run_evaluate(cfg, model, root / "data", "val", tmp_path / f"eval_{iteration}")
        assert logged[iteration]["val_users"] == evaluated["users"] > 100
        for key in METRICS:
            assert logged[iteration][f"val_{key}"] == evaluated[key], (iteration, key)
    assert logged[0]["val_ndcg@100"] != logged[2]["val_ndcg@100"]  # the update changed the pages


def _pagellm_ppo(tiny_stages, out, *overrides: str) -> tuple[list[str], dict]:
    """`pagellm ppo` on the tiny stages into ``out`` as a user runs it, and its environment: the
    session's Ray, joined as `ray job submit` joins one."""
    import ray

    root = tiny_stages["root"]
    dirs = ["--data", str(root / "data"), "--sft", str(root / "sft"), "--reward", str(root / "reward")]
    args = [sys.executable, "-m", "pagellm.cli", "ppo", *dirs, "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    return [*args, *tiny_stages["overrides"], *PPO_QUICK, *overrides], env


def test_driver_killed_mid_run_resumes_with_same_normaliser(tiny_stages, tmp_path):
    """`pagellm ppo` killed (SIGKILL, with everything it started) after its first checkpoint, then
    run again with --resume on the same cluster (the session's Ray, joined as `ray job submit`
    joins one: its actors die with the driver's job, the cluster stays)."""
    args, env = _pagellm_ppo(
        tiny_stages, tmp_path, "ppo.max_iterations=4", "ppo.checkpoint_every=2", "ppo.eval_every=100"
    )
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first_ckpt = tmp_path / "checkpoints" / "iter_000002" / "state.json"
    deadline = time.time() + 300
    while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), "no checkpoint before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    saved = sorted((tmp_path / "checkpoints").glob("iter_*"))[-1]
    saved_state = json.loads((saved / "state.json").read_text())
    assert saved_state["iteration"] < 4, "killed before the end"

    done = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["iteration"] == saved_state["iteration"]
    assert resumed[0]["normalizer"] == saved_state["normalizer"]
    assert events[-1] == {**events[-1], "event": "roles", "iteration": saved_state["iteration"]}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(0, 5)), "every iteration exactly once"
    final = json.loads((tmp_path / "checkpoints" / "iter_000004" / "state.json").read_text())
    assert final["normalizer"]["count"] == 4 * 16  # the normaliser carried on from the checkpoint
    assert "ppo: iteration 4" in done.stdout


def test_final_policy_best_val_keeps_the_best_evaluated_checkpoint(tiny_stages, tmp_path):
    """final_policy=best_val: PPO_DIR/policy is the checkpoint whose validation NDCG@100 was the
    best among the saved ones, the SFT policy saved at iteration 0 included, and events.jsonl
    says which; a config that would leave evaluated policies unsaved is refused."""
    import pytest
    from safetensors.torch import load_file

    from pagellm.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config(overrides=["ppo.final_policy=best_val", "ppo.eval_every=2", "ppo.checkpoint_every=4"])
    root = tiny_stages["root"]
    cfg = load_config(
        overrides=[
            *tiny_stages["overrides"],
            *PPO_QUICK,
            "ppo.max_iterations=6",
            "ppo.eval_every=2",
            "ppo.checkpoint_every=2",
            "ppo.final_policy=best_val",
            IN_DRIVER,
        ]
    )
    run_ppo(cfg, root / "data", root / "sft", root / "reward", tmp_path)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "val_ndcg@100" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 4, 6]
    best = max(evals, key=lambda r: r["val_ndcg@100"])  # iteration 0, the SFT policy, is a candidate
    chosen = [
        json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines() if '"final_policy"' in line
    ]
    assert chosen == [
        {
            "event": "final_policy",
            "rule": "best_val",
            "iteration": best["iteration"],
            "val_ndcg@100": best["val_ndcg@100"],
        }
    ]
    policy = load_file(tmp_path / "policy" / "model.safetensors")
    sft = load_file(tiny_stages["root"] / "sft" / "model.safetensors")
    for it in (0, 2, 4, 6):
        saved = load_file(tmp_path / "checkpoints" / f"iter_{it:06d}" / "policy" / "model.safetensors")
        same = all((policy[k] == saved[k]).all() for k in policy)
        assert same == (it == best["iteration"]), it  # the policies differ after every update
        assert all((sft[k] == saved[k]).all() for k in saved if k in sft) == (it == 0), it


def test_group_relative_advantages_train_without_the_critic(tiny_stages, tmp_path):
    """`pagellm ppo ppo.advantage=group`, with the roles in the driver as a user on a laptop runs
    it: each iteration samples group_size pages for batch_size / group_size prompts, trains the
    policy only (no critic statistics), and the policy moves. The console holds our few lines:
    none of DeepSpeed's (its CPU fallback warning, its shared-memory op's build line)."""
    from safetensors.torch import load_file

    root = tiny_stages["root"]
    group = ["ppo.max_iterations=2", "ppo.advantage=group", "ppo.group_size=4", IN_DRIVER]
    args, env = _pagellm_ppo(tiny_stages, tmp_path, *group)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "DeepSpeed" not in console and "WARNING" not in console, console
    assert "ppo: iteration 2" in done.stdout and "policy in " in done.stdout, console
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["iteration"] > 0]
    assert len(trained) == 2 and all("policy_loss" in r and "value_loss" not in r for r in trained), trained[0]
    before = load_file(root / "sft" / "model.safetensors")
    after = load_file(tmp_path / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_rollout_prompts_from_training_windows(tiny_stages):
    """ppo.rollout_prompts=training_windows rolls out every fine-tuning window's prompt of the
    users not held out (never a validation prompt unless a window happens to equal it); the
    held-out users' validation prompts still monitor the reward; epochs count those prompts."""
    import pandas as pd

    from pagellm.model.artifact import load_codec
    from pagellm.rl.ppo import held_out, load_prompts, planned_iterations

    root = tiny_stages["root"]
    codec = load_codec(root / "sft")
    base = [*tiny_stages["overrides"], "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.epochs=2"]
    by_val = load_config(overrides=base)
    by_ft = load_config(overrides=[*base, "ppo.rollout_prompts=training_windows"])
    val = pd.read_parquet(root / "data" / "eval" / "val.parquet")
    ft = pd.read_parquet(root / "data" / "ft")
    val_kept, ft_kept = ~held_out(val.user_id, 0.1), ~held_out(ft.user_id, 0.1)
    a, b = load_prompts(by_val, root / "data", codec), load_prompts(by_ft, root / "data", codec)
    assert a.train == [codec.prompt(u, list(p)) for u, p in zip(val.user_id[val_kept], val.prompt_items[val_kept])]
    assert b.train == [codec.prompt(u, list(p)) for u, p in zip(ft.user_id[ft_kept], ft.prompt_items[ft_kept])]
    assert len(b.train) > len(a.train) and a.holdout == b.holdout
    assert planned_iterations(by_ft, root / "data") == 2 * -(-int(ft_kept.sum()) // 16)


def test_ppo_with_a_collaborative_fine_reward(tiny_stages, tmp_path):
    """reward.fine_model=multivae: the reward stage's R_f is a Multi-VAE fitted on the training
    positives (best epoch on validation NDCG@100); PPO's fine role loads it beside the LM coarse
    head and its page rewards are log-lifts over a uniform guess, not the LM head's."""
    import shutil

    from safetensors.torch import load_file

    from pagellm.errors import InputError
    from pagellm.eval.baselines import load_protocol, multivae_scores, reindexed, validation_ndcg
    from pagellm.model.artifact import load_codec
    from pagellm.model.modeling import CollaborativeReward, load_reward_head
    from pagellm.train.reward import fit_collaborative_fine

    root = tiny_stages["root"]
    overrides = [*tiny_stages["overrides"], *PPO_QUICK, IN_DRIVER, "ppo.max_iterations=1", "reward.fine_model=multivae"]
    cfg = load_config(overrides=overrides)
    shutil.copytree(root / "reward" / "coarse", tmp_path / "reward" / "coarse")
    vocab = load_codec(root / "sft").vocab
    fit = fit_collaborative_fine(cfg, root / "data", vocab, tmp_path / "reward" / "fine")
    head = load_reward_head(tmp_path / "reward" / "fine")
    assert isinstance(head, CollaborativeReward) and head.pooling == cfg.reward.fine_pooling
    # the exported Multi-VAE is the best epoch: its validation NDCG@100 is the one reported
    val = reindexed(load_protocol(root / "data", "val", cfg.data.positive_threshold), vocab.item_block)
    assert validation_ndcg(multivae_scores(head.vaes[0], val), val) == pytest.approx(fit["valid_ndcg@100"])
    assert fit["valid_ndcg@100"] > 0 and len(head.vaes) == 1 and not head.view_weights and fit["vae_epochs"][0] >= 1

    # reward.fine_vaes=2, fine_itemknn=true, fine_ease=true, fine_sasrecs=1: two seeds, ItemKNN,
    # EASE and a SASRec, whose weights are the best combination of R_f's own validation NDCG@100,
    # and the saved ensemble scores what the fit reported
    views = ["reward.fine_vaes=2", "reward.fine_itemknn=true", "reward.fine_ease=true", "reward.fine_sasrecs=1"]
    ens_cfg = load_config(overrides=[*overrides, *views])
    ens = fit_collaborative_fine(ens_cfg, root / "data", vocab, tmp_path / "ensemble")
    ensemble = load_reward_head(tmp_path / "ensemble")
    chosen = {"knn": ens["knn_weight"], "ease": ens["ease_weight"]}
    assert len(ensemble.vaes) == 2 and ensemble.view_weights == {k: w for k, w in chosen.items() if w}
    assert ensemble.sasrec_weight == ens["sasrec_weight"] and len(ensemble.sasrecs) == (ens["sasrec_weight"] > 0)
    grid = ens["view_weights_ndcg"]  # 0 leaves a view out: the grid holds the VAEs alone too
    best = f"knn={ens['knn_weight']} ease={ens['ease_weight']} sasrec={ens['sasrec_weight']}"
    assert len(grid) == 7 * 8 * 7 and grid["knn=0.0 ease=0.0 sasrec=0.0"] == pytest.approx(ens["vaes_ndcg@100"])
    assert grid[best] == max(grid.values()) and len(ens["sasrec_epochs"]) == 1
    assert ens["valid_ndcg@100"] == pytest.approx(max(grid.values()), abs=1e-4)
    with torch.no_grad():
        lo = vocab.item_id_range[0]
        saved = ensemble.prompt_scores([[lo + j for j in h] for h in val.users.history], vocab.pad_id).numpy()
    assert validation_ndcg(saved, val) == pytest.approx(ens["valid_ndcg@100"])
    assert not torch.equal(ensemble.vaes[0].decoder[-1].weight, ensemble.vaes[1].decoder[-1].weight)

    run_ppo(cfg, root / "data", root / "sft", tmp_path / "reward", tmp_path / "ppo")
    records = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    trained = [r for r in records if r["iteration"] > 0]
    assert len(trained) == 1 and "value_loss" in trained[0] and "expected_loss" not in trained[0]
    assert all(math.isfinite(r["reward_fine"]) and r["reward_fine"] != 0 for r in trained)

    # ppo.fine_objective=expected: R_f trains the policy through every action's score
    exact = load_config(overrides=[*overrides, "ppo.fine_objective=expected"])
    run_ppo(exact, root / "data", root / "sft", tmp_path / "reward", tmp_path / "exact")
    trained = [r for r in read_jsonl(tmp_path / "exact" / "metrics.jsonl") if r["iteration"] > 0]
    assert len(trained) == 1 and math.isfinite(trained[0]["expected_loss"]) and trained[0]["expected_reward_fine"] != 0
    before = load_file(root / "sft" / "model.safetensors")
    after = load_file(tmp_path / "exact" / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    # an LM fine head cannot score every item at once: a clear error naming the head's file
    with pytest.raises(InputError, match=r"fine/reward_head.json: ppo.fine_objective=expected"):
        run_ppo(exact, root / "data", root / "sft", root / "reward", tmp_path / "lm")

    # ppo.fine_objective=closed_form: R_f leaves training and tilts the pages the policy writes by
    # fine_weight / kl_beta; the exported policy carries the tilt, and what PPO validated is what
    # `pagellm evaluate` reads from it
    from pagellm.errors import ConfigError
    from pagellm.model.artifact import TILT_DIR, FineTilt

    with pytest.raises(ConfigError, match="closed_form"):
        load_config(overrides=["ppo.fine_objective=closed_form", "ppo.kl_adaptive=true"])
    closed_overrides = ["ppo.fine_objective=closed_form", "ppo.eval_every=1", "ppo.final_policy=last"]
    closed = load_config(overrides=[*overrides, *closed_overrides, "ppo.eval_max_users=null", "eval.page_items=20"])
    run_ppo(closed, root / "data", root / "sft", tmp_path / "reward", tmp_path / "closed")
    records = read_jsonl(tmp_path / "closed" / "metrics.jsonl")
    assert "expected_loss" not in records[-1] and records[-1]["reward_fine"] != 0  # logged, not trained on
    policy = tmp_path / "closed" / "policy"
    tilt = FineTilt.load(policy)
    assert tilt.weight == pytest.approx(closed.ppo.fine_weight / closed.ppo.kl_beta)
    assert torch.equal(tilt.reward.vaes[0].decoder[-1].weight, head.vaes[0].decoder[-1].weight)
    evaluated = run_evaluate(closed, policy, root / "data", "val", tmp_path / "eval_tilted")
    assert records[-1]["val_ndcg@100"] == evaluated["ndcg@100"]
    shutil.rmtree(policy / TILT_DIR)
    plain = run_evaluate(closed, policy, root / "data", "val", tmp_path / "eval_plain")
    assert plain["ndcg@100"] != evaluated["ndcg@100"]  # the same weights write other pages untilted


def test_ablation_pairs_each_variant_with_sft_and_both_heads_and_rebuilds_its_report(tiny_stages, tmp_path):
    """`pagellm experiment ablation`: SFT and the three reward variants on the test split, each
    paired with SFT and with R_c + R_f (Figure 5's question) user by user; --report-only
    rebuilds the same report from the runs' evaluations without training, and says so; a
    missing evaluation is one ConfigError naming it."""
    from pagellm.errors import ConfigError
    from pagellm.eval.paired import per_user
    from pagellm.experiments import VARIANTS, run_ablation

    root = tiny_stages["root"]
    overrides = [*tiny_stages["overrides"], *PPO_QUICK, IN_DRIVER, "ppo.max_iterations=1", "eval.page_items=20"]
    args = (load_config(overrides=overrides), None, overrides, root / "data", root / "sft", root / "reward")
    report = run_ablation(*args, tmp_path, [0])
    assert list(report["mean_sd"]) == list(VARIANTS)
    both = per_user(tmp_path / "runs" / "coarse+fine" / "seed_0" / "eval_test")
    for name in ("sft", "coarse", "fine"):
        own = per_user(tmp_path / "runs" / name / ("eval_test" if name == "sft" else "seed_0/eval_test"))
        pair = report["paired_vs_coarse+fine"][name]
        assert pair["users"] == len(own) > 100
        assert pair["ndcg@100"]["mean"] == pytest.approx((own["ndcg@100"] - both["ndcg@100"]).mean())
    text = (tmp_path / "ablation.md").read_text()
    assert "Against sft, user by user" in text and "Against coarse+fine, user by user" in text

    rebuilt = run_ablation(*args, tmp_path, [0], report_only=True)
    for key in ("mean_sd", "paired_vs_sft", "paired_vs_coarse+fine"):
        assert json.dumps(rebuilt[key], sort_keys=True) == json.dumps(report[key], sort_keys=True), key
    assert "nothing trained" in (tmp_path / "ablation.md").read_text()
    with pytest.raises(ConfigError, match=r"seed_1/eval_test holds no evaluation"):
        run_ablation(*args, tmp_path, [0, 1], report_only=True)


def test_sft_members_make_one_ensemble_policy_that_evaluation_and_ppo_read(tiny_stages, tmp_path, caplog):
    """sft.members=2: SFT trains two LMs (seeds train.seed and train.seed + 1) into
    SFT_DIR/members/k, side by side on a Ray with the CPUs for both; SFT_DIR ranks with their mean
    log-softmax, and the validation NDCG@100 that metrics.json gives it is `pagellm evaluate`'s.
    PPO trains the ensemble as one policy: both members move, and PPO_DIR/policy is an ensemble
    again."""
    import logging

    from safetensors.torch import load_file

    from pagellm.model.ensemble import lm_dirs
    from pagellm.train.sft import run_sft

    root = tiny_stages["root"]
    overrides = [
        *tiny_stages["overrides"],
        *PPO_QUICK,
        "sft.members=2",
        "sft.meta_epochs=0",  # one fit per member: CI time
        "sft.next_item_epochs=0",
        "sft.ft_epochs=1",
        "eval.page_mode=score",
        "ppo.max_iterations=2",
        IN_DRIVER,
    ]
    cfg = load_config(overrides=overrides)
    sft_dir = tmp_path / "sft"
    with caplog.at_level(logging.INFO, logger="pagellm.train.sft"):
        metrics = run_sft(cfg, root / "data", sft_dir)
    assert "SFT: 2 members, 2 side by side" in caplog.messages  # two 1-worker fits on the session's 2 CPUs
    members = lm_dirs(sft_dir)
    assert members == [sft_dir / "members" / "0", sft_dir / "members" / "1"]
    assert [m["golden_ft"]["epoch"] for m in metrics["members"]] == [1, 1]
    weights = [load_file(m / "model.safetensors") for m in members]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # two seeds
    evaluated = run_evaluate(cfg, sft_dir, root / "data", "val", tmp_path / "eval")
    assert metrics["ensemble_valid_ndcg@100"] == pytest.approx(evaluated["ndcg@100"], abs=1e-6)
    assert metrics["ensemble_valid_ndcg@100"] != pytest.approx(metrics["member_valid_ndcg@100"][0], abs=1e-6)
    assert 0.0 <= metrics["valid_page_rate"] <= 1.0  # what `pagellm sft` and Tune report

    run_ppo(cfg, root / "data", sft_dir, root / "reward", tmp_path / "ppo")
    policy = lm_dirs(tmp_path / "ppo" / "policy")
    assert len(policy) == 2
    for before, saved in zip(weights, policy):
        after = load_file(saved / "model.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
