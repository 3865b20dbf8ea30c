"""Ray Tune over beta (ppo.kl_beta) and lambda (data.category_cap), the `tune` section.

lambda shapes the golden lists, so each distinct lambda needs its own data, SFT and reward
stages; beta only changes PPO. The sweep therefore runs in two steps:
  1. upstream  for each lambda of ``tune.lambdas``, the data -> SFT -> reward chain, cached
               under OUT/upstream/<hash of the configuration that produces it>: a later sweep
               (or a resumed one) with the same configuration reuses it; events.jsonl there
               records every build and every reuse. lambda shapes only the golden lists, so
               a lambda's build takes meta and next-item pre-training from another lambda's
               finished build and trains golden-list fine-tuning and the reward heads alone
  2. trials    one PPO run per (beta, lambda) in a Tune trial whose placement group holds the
               trial's driver (bundle 0) and the PPO roles (``ppo.<role>`` resources); the trial
               reports validation NDCG@100 at every PPO evaluation, so ASHA stops weak trials
Interrupted sweeps continue with ``--resume`` (``Tuner.restore``): finished trials keep their
results, and unfinished trials resume PPO from their own latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pandas as pd

from pagellm.config import PPO_ROLES, PageLLMConfig, load_config, sections_key, write_config
from pagellm.outputs import append_jsonl, figure, read_jsonl

log = logging.getLogger(__name__)
METRIC, MODE = "val_ndcg@100", "max"
EXPERIMENT = "sweep"
UPSTREAM_SECTIONS = ("data", "model", "train", "sft", "reward")
REPORT_KEYS = ("iteration", "val_ndcg@100", "val_recall@20", "holdout_reward_total", "kl", "reward_total")


# ---------------------------------------------------------------------------- upstream


def upstream_key(cfg: PageLLMConfig) -> str:
    """Hash of every configuration section the data, SFT and reward stages read."""
    return sections_key(cfg, UPSTREAM_SECTIONS)


def pretraining_key(cfg: PageLLMConfig) -> str:
    """``upstream_key`` less lambda: meta and next-item pre-training read the items, the
    training split and the validation users, which lambda does not change (it caps categories
    in the golden lists only), so builds that differ in lambda alone share their pre-training."""
    return upstream_key(replace(cfg, data=replace(cfg.data, category_cap=1.0)))


def _pretrained_sft(root: Path, key: str) -> Optional[Path]:
    """The SFT directory of a finished build with the same ``pretraining_key``, if any."""
    for done in sorted(root.glob("*/done.json")):
        if json.loads(done.read_text()).get("pretraining_key") == key:
            return done.parent / "sft"
    return None


def _event(root: Path, **record) -> None:
    append_jsonl(root / "events.jsonl", {"time": time.time(), **record})


def prepare_upstream(cfg: PageLLMConfig, root: Path) -> dict[str, str]:
    """The data, SFT and reward directories for ``cfg``, built unless a complete build with the
    same ``upstream_key`` exists (``done.json`` is written last)."""
    from pagellm.data.stage import build_dataset
    from pagellm.train.reward import run_reward
    from pagellm.train.sft import run_sft

    root.mkdir(parents=True, exist_ok=True)
    key = upstream_key(cfg)
    where = root / f"lambda_{cfg.data.category_cap:g}_{key}"
    dirs = {name: str((where / name).resolve()) for name in ("data", "sft", "reward")}
    if (where / "done.json").exists():
        log.info("upstream stages for lambda=%g: reusing %s", cfg.data.category_cap, where)
        _event(root, event="reused", key=key, category_cap=cfg.data.category_cap)
        return dirs
    shared = pretraining_key(cfg)
    pretrained = _pretrained_sft(root, shared)
    log.info(
        "upstream stages for lambda=%g: building %s (data, SFT, reward%s)",
        cfg.data.category_cap,
        where,
        f"; pre-training from {pretrained.parent.name}" if pretrained else "",
    )
    started = time.perf_counter()
    where.mkdir(parents=True, exist_ok=True)
    write_config(cfg, where)
    build_dataset(cfg, dirs["data"], engine="ray")
    sft = run_sft(cfg, dirs["data"], dirs["sft"], pretrained=pretrained)
    reward = run_reward(cfg, dirs["data"], dirs["sft"], dirs["reward"])
    seconds = time.perf_counter() - started
    summary = {
        "key": key,
        "pretraining_key": shared,
        "pretraining_from": pretrained.parent.name if pretrained else None,
        "category_cap": cfg.data.category_cap,
        "seconds": seconds,
        "valid_page_rate": sft["valid_page_rate"],
        "reward_accuracy": {k: v["all"] for k, v in reward["accuracy"].items()},
    }
    (where / "done.json").write_text(json.dumps(summary, indent=2) + "\n")
    _event(root, event="built", **summary)
    return dirs


def upstream_events(root: Path) -> list[dict]:
    return read_jsonl(Path(root) / "events.jsonl")


# ------------------------------------------------------------------------------ trials


def trial_resources(cfg: PageLLMConfig):
    """The trial's placement group: its driver, then the PPO roles' bundles. With
    ``ppo.roles_in_driver`` the roles' resources join the driver's bundle: where the roles run
    changes, not what the trial holds (a quarter-CPU trial doing all five roles' work would let
    Tune pack eight onto two CPUs)."""
    from ray import tune

    from pagellm.rl.groups import role_bundles

    driver, bundles = {"CPU": cfg.tune.driver_cpus}, role_bundles(cfg.ppo, PPO_ROLES)[0]
    if cfg.ppo.roles_in_driver:
        for bundle in bundles:
            for name, amount in bundle.items():
                driver[name] = driver.get(name, 0.0) + amount
        bundles = []
    return tune.PlacementGroupFactory([driver, *bundles], strategy="PACK")


def ppo_trial(params: dict, config_paths: list, overrides: list, upstream: dict) -> None:
    """One Tune trial: PPO with this (beta, lambda), from that lambda's SFT and reward models.
    Its PPO directory is inside the trial directory, so a restored trial resumes from its own
    latest PPO checkpoint instead of starting again."""
    import ray
    from ray import tune

    from pagellm.rl.ppo import latest_checkpoint, planned_iterations, run_ppo

    cfg = load_config(
        config_paths, [*overrides, f"ppo.kl_beta={params['beta']}", f"data.category_cap={params['lambda']}"]
    )
    dirs = upstream[str(float(params["lambda"]))]
    out = Path(tune.get_context().get_trial_dir()) / "ppo"
    total = planned_iterations(cfg, dirs["data"])
    resume = out.exists() and latest_checkpoint(out) is not None
    append_jsonl(out.parent / "trial_events.jsonl", {"event": "start", "resume": resume, "time": time.time(), **params})

    def report(record: dict) -> None:
        if record["iteration"] >= total:  # written first: the scheduler may end the trial at this report
            append_jsonl(out.parent / "trial_events.jsonl", {"event": "finished", "time": time.time()})
        tune.report({k: record[k] for k in REPORT_KEYS if k in record})

    run_ppo(
        cfg,
        dirs["data"],
        dirs["sft"],
        dirs["reward"],
        out,
        resume=resume,
        on_evaluation=report,
        placement_group=ray.util.get_current_placement_group(),
        first_bundle=1,
    )


def search_space(cfg: PageLLMConfig) -> tuple[dict, object]:
    """Tune's param space and search algorithm for ``tune.search``."""
    from ray import tune

    t = cfg.tune
    if t.search == "grid":
        return {"beta": tune.grid_search(list(t.betas)), "lambda": tune.grid_search(list(t.lambdas))}, None
    space = {"beta": tune.loguniform(min(t.betas), max(t.betas)), "lambda": tune.choice(list(t.lambdas))}
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        algo = OptunaSearch(metric=METRIC, mode=MODE, seed=t.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        algo = HyperOptSearch(metric=METRIC, mode=MODE, random_state_seed=t.seed)
    if t.max_concurrent_trials:
        from ray.tune.search import ConcurrencyLimiter

        algo = ConcurrencyLimiter(algo, max_concurrent=t.max_concurrent_trials)
    return space, algo


def scheduler(cfg: PageLLMConfig, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="iteration",
        max_t=max(max_t, cfg.tune.grace_period),
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


# ----------------------------------------------------------------------------- results


def trial_table(results, max_t: int) -> pd.DataFrame:
    """One row per trial: its (beta, lambda), status (done, stopped by ASHA, error), the
    iterations it ran, its validation NDCG@100 before PPO (the SFT policy), at the last and at
    the best evaluation, the iteration of the best and the PPO checkpoint saved there ("" when
    that evaluation fell between checkpoints)."""
    from pagellm.rl.ppo import checkpoint_dir

    rows = []
    for result in results:
        history = result.metrics_dataframe
        has = history is not None and METRIC in history
        iterations = int(history["iteration"].max()) if has else 0
        top = history.loc[history[METRIC].idxmax()] if has else None
        best_iteration = int(top["iteration"]) if has else 0
        checkpoint = checkpoint_dir(Path(result.path) / "ppo", best_iteration)
        before = history.loc[history["iteration"] == 0, METRIC] if has else pd.Series(dtype=float)
        rows.append(
            {
                "trial": (result.metrics or {}).get("trial_id", ""),
                "beta": result.config["beta"],
                "lambda": result.config["lambda"],
                "status": "error" if result.error else "done" if iterations >= max_t else "stopped",
                "iterations": iterations,
                # iteration 0 is the evaluation before any PPO update: the SFT (reference) policy
                "ndcg@100_sft": float(before.iloc[0]) if len(before) else float("nan"),
                "ndcg@100_last": float(history[METRIC].iloc[-1]) if has else float("nan"),
                "ndcg@100_best": float(top[METRIC]) if has else float("nan"),
                "best_iteration": best_iteration,
                "recall@20_best": float(top["val_recall@20"]) if has and "val_recall@20" in history else float("nan"),
                "path": result.path,
                "best_checkpoint": checkpoint if Path(checkpoint).is_dir() else "",
            }
        )
    return pd.DataFrame(rows).sort_values(["lambda", "beta"]).reset_index(drop=True)


def plot_heatmap(table: pd.DataFrame, path: Path) -> None:
    """Best validation NDCG@100 of each trial (mean over repeats) over (beta, lambda); a scatter
    when a searcher spread beta over many values."""
    import numpy as np

    with figure(path, figsize=(5.2, 4)) as (fig, (ax,)):
        if table["beta"].nunique() <= 8:
            grid = table.pivot_table(index="lambda", columns="beta", values="ndcg@100_best", aggfunc="mean")
            im = ax.imshow(grid.values, cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(grid.shape[1]), [f"{b:g}" for b in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [f"{x:g}" for x in grid.index])
            for (i, j), v in np.ndenumerate(grid.values):
                if v == v:
                    ax.text(
                        j,
                        i,
                        f"{v:.4f}",
                        ha="center",
                        va="center",
                        color="white" if v < np.nanmean(grid.values) else "black",
                        fontsize=9,
                    )
        else:
            im = ax.scatter(table["beta"], table["lambda"], c=table["ndcg@100_best"], cmap="viridis", s=60)
            ax.set_xscale("log")
        fig.colorbar(im, ax=ax, label="best validation NDCG@100")
        ax.set_xlabel("beta (ppo.kl_beta)")
        ax.set_ylabel("lambda (data.category_cap)")
        ax.set_title("PPO sweep")


def write_results(results, out: Path, wall_seconds: float, command: str, max_t: int) -> dict:
    """trials.csv/.md, best.json and heatmap.png. Trials are ranked by their best evaluation,
    not their last: ASHA stops trials at different iterations, so last values compare a trial
    stopped at the first rung with others after more (possibly over-optimised) iterations; the
    best evaluation is the one ASHA ranked at each rung, and its checkpoint is kept."""
    table = trial_table(results, max_t)
    table.to_csv(out / "trials.csv", index=False)
    done = table[table["status"] != "error"].dropna(subset=["ndcg@100_best"])
    best = done.loc[done["ndcg@100_best"].idxmax()].to_dict() if len(done) else {}
    summary = {"command": command, "wall_seconds": wall_seconds, "metric": METRIC, "best": best, "trials": len(table)}
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    shown = table.drop(columns=["path", "best_checkpoint"])
    lines = [
        f"Command: `{command}`  ",
        f"Wall time {wall_seconds / 60:.1f} min; {len(table)} trials; metric: validation NDCG@100 "
        "at every PPO evaluation; trials ranked by their best evaluation (ASHA stops weak trials early: see `iterations`).",
        "",
    ]
    lines += ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    if best:
        lines += [
            "",
            f"Best: beta {best['beta']:g}, lambda {best['lambda']:g}: NDCG@100 {best['ndcg@100_best']:.4f} at iteration "
            f"{best['best_iteration']} (checkpoint: {best['best_checkpoint'] or 'none saved at that iteration'}).",
        ]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    plot_heatmap(table, out / "heatmap.png")
    return summary


# -------------------------------------------------------------------------------- sweep


def run_tune(config_paths: list, overrides: list, out_dir, resume: bool = False, command: str = "") -> dict:
    """Build the upstream stages once per lambda, then run (or restore) the sweep."""
    from ray import tune

    from pagellm.ray_utils import init_ray
    from pagellm.rl.ppo import planned_iterations

    cfg = load_config(config_paths, overrides)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    started = time.perf_counter()
    upstream = {}
    for cap in dict.fromkeys(float(x) for x in cfg.tune.lambdas):
        upstream[str(cap)] = prepare_upstream(
            load_config(config_paths, [*overrides, f"data.category_cap={cap}"]), out / "upstream"
        )
    max_t = max(planned_iterations(cfg, dirs["data"]) for dirs in upstream.values())
    trainable = tune.with_resources(
        tune.with_parameters(
            ppo_trial,
            config_paths=[str(Path(p).resolve()) for p in config_paths or []],
            overrides=list(overrides),
            upstream=upstream,
        ),
        trial_resources(cfg),
    )
    experiment = out / EXPERIMENT
    if resume and tune.Tuner.can_restore(str(experiment)):
        log.info("restoring the sweep in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            log.warning("--resume: no sweep to restore in %s, starting one", experiment)
        space, algo = search_space(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=algo,
                scheduler=scheduler(cfg, max_t),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=1),
        )
    results = tuner.fit()
    return write_results(results, out, time.perf_counter() - started, command, max_t)
