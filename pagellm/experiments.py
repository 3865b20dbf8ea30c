"""Experiments (paper 5.2, 5.4, 5.6): the ablation over reward heads, the comparison with
baselines and the cold-start simulation, each one command writing Markdown, JSON and a PNG with
the command that made it.

ablation   SFT only (the reference policy), PPO with R_c only, R_f only and R_c + R_f, over
           several seeds, each policy evaluated on the test split (Figure 5 style bar chart)
compare    baselines (docs/baselines.md) and given PageLLM policies evaluated on the same split
           with the same metric code (Table 2 style)
coldstart  the whole chain and the baselines again on a seeded share of each user's training
           interactions (``data.train_keep``), each model's drop against the full data (Figure 7)
merge      several compare reports on the same split as one report (a slow baseline runs once,
           in its own report, and stands beside every later PageLLM row)
backbone   the same data and recipe on several backbones (the embedded GPT-2, a pretrained LM with
           LoRA), each policy beside the baselines, with its size and training time (RQ6)
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from pagellm.config import PageLLMConfig, load_config, sections_key
from pagellm.data.layout import DataDir
from pagellm.errors import ConfigError
from pagellm.eval.metrics import METRICS
from pagellm.eval.paired import PAIRED, identical, paired_difference, paired_table, per_user
from pagellm.outputs import bar_chart, figure

VARIANTS = {"sft": None, "coarse": "coarse", "fine": "fine", "coarse+fine": "both"}


DETERMINISTIC = {
    "popularity",
    "itemknn",
    "userknn",
    "ease",
    "recbole:Pop",
    "recbole:ItemKNN",
    "recbole:EASE",
}  # trained once, not per seed
USERS_FILE = "users.parquet"  # compare: model, user_id and each PAIRED metric (mean over seeds)
RECBOLE_KEYS = ("epochs_run", "best_epoch", "train_seconds", "recbole_valid", "recbole_test", "settings")


def user_means(users: dict[str, list[pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """Per model, each user's ``PAIRED`` metrics averaged over the model's seeds."""
    return {name: pd.concat(runs).groupby(level=0)[list(PAIRED)].mean() for name, runs in users.items()}


def paired_against(users: dict[str, list[pd.DataFrame]], reference: str) -> dict:
    """Every model against ``reference`` on the same users (``paired_difference``)."""
    means = user_means(users)
    return {name: paired_difference(frame, means[reference]) for name, frame in means.items() if name != reference}


def _recbole_table(results: dict[str, list[dict]]) -> str:
    """RecBole's own figures for its rows, beside ours: epochs, and its own validation/test
    metrics (its masking: training positives only; a sequence model scores each held-out
    positive as its own row)."""
    rows = {name: runs for name, runs in results.items() if runs and "recbole" in runs[0]}
    if not rows:
        return ""
    lines = [
        "",
        "RecBole's own numbers for its rows (its evaluator, not ours: masks training positives only, and a "
        "sequence model scores each held-out positive as a separate row), mean over runs:",
        "",
        "| model | epochs run (best) | RecBole val NDCG@100 | RecBole test NDCG@100 | RecBole test Recall@20 | users without scores |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        rb = [r["recbole"] for r in runs]
        epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in rb)
        mean = lambda part, key: statistics.mean(r[part][key] for r in rb)  # noqa: E731
        lines.append(
            f"| {name} | {epochs} | {mean('recbole_valid', 'ndcg@100'):.4f} | {mean('recbole_test', 'ndcg@100'):.4f} "
            f"| {mean('recbole_test', 'recall@20'):.4f} | {max(r['users_without_scores'] for r in runs)} |"
        )
    return "\n".join(lines) + "\n"


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(rows: dict[str, dict[str, tuple[float, float]]], note: str, results: dict[str, list[dict]]) -> str:
    timed = any("seconds" in r for runs in results.values() for r in runs)
    head = [*METRICS, "runs", "s/run"] if timed else [*METRICS, "runs"]
    lines = [note, "", "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, stats in rows.items():
        cells = [f"{m:.4f} ± {s:.4f}" if s == s and s > 0 else f"{m:.4f}" for m, s in (stats[k] for k in METRICS)]
        cells.append(str(len(results[name])))
        if timed:
            seconds = [r["seconds"] for r in results[name] if "seconds" in r]
            cells.append(f"{statistics.mean(seconds):.0f}" if seconds else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # metrics undefined for some users (docs/metrics.md) average over fewer users: say how many
    partial = []
    for name, runs in results.items():
        for key in METRICS:
            counts = [r["defined"][key] for r in runs if "defined" in r]
            users = [r["users"] for r in runs if "users" in r]
            if counts and users and min(counts) < max(users):
                partial.append(f"{name} {key}: {min(counts)}-{max(counts)} of {max(users)} users")
    if partial:
        lines += ["", "Means over the users where a metric is defined: " + "; ".join(partial) + "."]
    return "\n".join(lines) + "\n"


def _evaluated(eval_dir: Path) -> dict:
    """A finished evaluation's metrics (``--report-only``), or one ConfigError naming it."""
    try:
        return json.loads((eval_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"ablation --report-only: {eval_dir} holds no evaluation (metrics.json): run it first")


def run_ablation(
    cfg: PageLLMConfig,
    config_paths,
    overrides,
    data_dir,
    sft_dir,
    reward_dir,
    out_dir,
    seeds,
    split="test",
    report_only: bool = False,
) -> dict:
    """Train and evaluate each variant over ``seeds``; SFT only is evaluated once (greedy
    decoding of one model is deterministic, so its spread is 0). Every variant is paired with
    SFT and with R_c + R_f (paper Figure 5: both heads above either alone). ``report_only``
    rebuilds the report from the evaluations already in ``out_dir``, training nothing."""
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.rl.ppo import run_ppo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    sft_eval = out / "runs" / "sft" / f"eval_{split}"
    results["sft"] = [_evaluated(sft_eval) if report_only else run_evaluate(cfg, sft_dir, data_dir, split, sft_eval)]
    users = {"sft": [per_user(sft_eval)]}
    for name, rewards in VARIANTS.items():
        if rewards is None:
            continue
        results[name], users[name] = [], []
        for seed in seeds:
            run_cfg = load_config(config_paths, [*overrides, f"ppo.rewards={rewards}", f"ppo.seed={seed}"])
            run_dir = out / "runs" / name / f"seed_{seed}"
            if report_only:
                results[name].append(_evaluated(run_dir / f"eval_{split}"))
            else:
                run_ppo(run_cfg, data_dir, sft_dir, reward_dir, run_dir)
                results[name].append(
                    run_evaluate(run_cfg, run_dir / "policy", data_dir, split, run_dir / f"eval_{split}")
                )
            users[name].append(per_user(run_dir / f"eval_{split}"))
    rows = {name: {k: mean_sd([r[k] for r in runs]) for k in METRICS} for name, runs in results.items()}
    paired, against_both = paired_against(users, "sft"), paired_against(users, "coarse+fine")
    wall = time.perf_counter() - started
    if report_only and (out / "ablation.json").exists():  # the runs' time, not the rebuild's
        wall = json.loads((out / "ablation.json").read_text())["wall_seconds"]
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "split": split,
        "seeds": list(seeds),
        "wall_seconds": wall,
        "mean_sd": rows,
        "paired_vs_sft": paired,
        "paired_vs_coarse+fine": against_both,
        "runs": results,
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    rebuilt = "; rebuilt from the runs' evaluations (--report-only), nothing trained" if report_only else ""
    note = (
        f"Command: `{report['command']}`  \nSplit: {split}; PPO variants: mean ± sd over seeds {list(seeds)}; "
        f"wall time {report['wall_seconds'] / 60:.1f} min{rebuilt}."
    )
    tables = paired_table(paired, "sft") + paired_table(against_both, "coarse+fine")
    (out / "ablation.md").write_text(_table(rows, note, results) + tables)
    bar_chart(
        rows,
        ("ndcg@100", "recall@20", "ild", "category_entropy"),
        out / "ablation.png",
        "reward-head ablation",
        pagellm=set(rows),
        paired=paired,
        reference="sft",
    )
    return report


def _data_files(data_dir) -> list[tuple[str, int, int]]:
    """The data stage's files (name, size, modification time): a rebuilt data directory is new data."""
    return sorted(
        (str(f.relative_to(data_dir)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in Path(data_dir).rglob("*")
        if f.is_file()
    )


def _finished(done: Path, key: str) -> bool:
    try:
        return json.loads((done / "run.json").read_text())["key"] == key and (done / USERS_FILE).exists()
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def run_compare(
    cfg: PageLLMConfig, data_dir, policies: dict[str, str], baselines, out_dir, split="test", seeds=(0,)
) -> dict:
    """Baselines (over ``seeds`` where they train) and PageLLM policies on one split."""
    from pagellm.eval.baselines import BASELINES, baseline_pages, load_protocol, pages_from_scores
    from pagellm.eval.evaluate import run_evaluate
    from pagellm.eval.metrics import mean_metrics, page_metrics
    from pagellm.eval.recbole_bridge import export_recbole, require_env, run_recbole

    unknown = [n for n in baselines if n not in BASELINES and not n.startswith("recbole:")]
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; choose from {list(BASELINES)} or recbole:MODEL")
    recbole = [n for n in baselines if n.startswith("recbole:")]
    if recbole:
        require_env(cfg.eval.recbole_python)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    category = DataDir(data_dir).categories()
    protocol = load_protocol(Path(data_dir), split, cfg.data.positive_threshold)
    val = load_protocol(Path(data_dir), "val", cfg.data.positive_threshold)  # epoch / neighbourhood selection
    if recbole:
        export_recbole(data_dir, out / "recbole" / "export", cfg.data.positive_threshold)
    results: dict[str, list[dict]] = {}
    users: dict[str, list[pd.DataFrame]] = {}
    reused, files = [], _data_files(data_dir)  # listed once: every run's cache key holds it
    for name in baselines:
        results[name], users[name] = [], []
        for seed in seeds[:1] if name in DETERMINISTIC else seeds:
            began, extra = time.perf_counter(), {}
            done = out / "baselines" / name.replace(":", "_") / f"seed_{seed}"
            # what the run's result depends on: model, seed, split, data files, data and eval settings
            key = sections_key(cfg, ("data", "eval"), name, seed, split, files)
            if _finished(done, key):  # a rerun, or several compares into one report: never train twice
                results[name].append(json.loads((done / "run.json").read_text())["result"])
                users[name].append(pd.read_parquet(done / USERS_FILE))
                print(f"compare: {name} seed {seed} reused from {done}")
                reused.append(f"{name} seed {seed}")
                continue
            if name in recbole:
                model = name.split(":", 1)[1]
                run = run_recbole(
                    model,
                    out / "recbole" / "export",
                    split,
                    out / "recbole" / model / f"seed_{seed}",
                    cfg.eval.recbole_python,
                    seed,
                    cfg.eval.recbole_epochs,
                    cfg.eval.recbole_patience,
                    cfg.eval.recbole_settings.get(model),
                )
                pages, missing = pages_from_scores(
                    protocol, run["users"], run["items"], run["scores"], cfg.eval.page_items
                )
                extra = {"users_without_scores": missing, "recbole": {k: run[k] for k in RECBOLE_KEYS}}
            else:
                pages = baseline_pages(
                    name,
                    protocol,
                    cfg.eval.page_items,
                    seed,
                    val,
                    cfg.eval.baseline_epochs,
                    cfg.eval.baseline_patience,
                    cfg.ray.cores(),
                )
            scored = [page_metrics(p, t, category) for p, t in zip(pages, protocol.users.target)]
            results[name].append({**mean_metrics(scored), "seconds": time.perf_counter() - began, **extra})
            users[name].append(pd.DataFrame(scored, index=protocol.users.user_id)[list(PAIRED)])
            done.mkdir(parents=True, exist_ok=True)
            users[name][-1].to_parquet(done / USERS_FILE)
            (done / "run.json").write_text(json.dumps({"key": key, "result": results[name][-1]}, default=str) + "\n")
    for name, policy in policies.items():  # "DIR" or "DIR1,DIR2,..": one policy per seed
        results[name], users[name] = [], []
        for k, directory in enumerate(policy.split(",")):
            began, where = time.perf_counter(), out / "runs" / (name if "," not in policy else f"{name}/seed_{k}")
            results[name].append(run_evaluate(cfg, directory, data_dir, split, where))
            results[name][-1]["seconds"] = time.perf_counter() - began
            users[name].append(per_user(where))
    rows = {name: {k: mean_sd([r[k] for r in runs]) for k in METRICS} for name, runs in results.items()}
    best = max((n for n in baselines), key=lambda n: rows[n]["ndcg@100"][0], default=None)
    paired = paired_against(users, best) if best is not None else {}
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "split": split,
        "wall_seconds": time.perf_counter() - started,
        "mean_sd": rows,
        "best_baseline": best,
        "policies": list(policies),
        "paired_vs_best_baseline": paired,
        "reused": reused,
        "runs": results,
    }
    note = f"Command: `{report['command']}`  \nSplit: {split}; wall time {report['wall_seconds'] / 60:.1f} min."
    if reused:
        note += (
            f" Reused from earlier compares into this directory (their own s/run below): {', '.join(reused)}; "
            f"all runs together {sum(r.get('seconds', 0) for runs in results.values() for r in runs) / 60:.1f} min."
        )
    write_compare(out, report, results, users, note, policies)
    return report


def write_compare(out: Path, report: dict, results, users, note: str, policies) -> None:
    """compare.json, compare.md (rows, intervals against the best baseline, RecBole's own
    figures), users.parquet and compare.png of a report whose ``mean_sd`` and pairing are made."""
    rows, best, paired = report["mean_sd"], report["best_baseline"], report["paired_vs_best_baseline"]
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    pd.concat(user_means(users), names=["model", "user_id"]).reset_index().to_parquet(out / USERS_FILE)
    if best is not None:
        for name in policies:
            gap = rows[name]["ndcg@100"][0] - rows[best]["ndcg@100"][0]
            note += f"  \n{name} NDCG@100 vs the best baseline ({best}): {gap:+.4f} ({100 * gap / rows[best]['ndcg@100'][0]:+.1f}%)."
    (out / "compare.md").write_text(
        _table(rows, note, results) + paired_table(paired, f"the best baseline ({best})") + _recbole_table(results)
    )
    bar_chart(
        rows,
        ("ndcg@100", "recall@20"),
        out / "compare.png",
        "PageLLM and baselines",
        pagellm=set(policies),
        paired=paired,
        reference=best,
    )


def _policies_of(report: dict) -> list[str]:
    """The PageLLM rows of a compare report (reports before the ``policies`` key: the rows that
    ``pagellm evaluate`` produced, which name their model directory)."""
    if "policies" in report:
        return report["policies"]
    return [name for name, runs in report["runs"].items() if runs and "model" in runs[0]]


def run_merge(reports: list, out_dir, command: str = "") -> dict:
    """Several compare reports made on the same split (their ``users.parquet`` per-user
    metrics) as one report, with every row paired against the best baseline of all of them.

    The split is checked, not assumed: every report must hold the same users, and each report
    after the first must share a model whose per-user values equal the merged rows' exactly
    (popularity in practice: deterministic, so equal values mean the same split, masking and
    metric code). A model in several reports with the same values is one row; with other
    values (another budget, another policy directory) it is kept apart as ``NAME [REPORT]``.
    Means, spreads and s/run are those of the source reports; nothing is trained again."""
    out = Path(out_dir)
    results: dict[str, list[dict]] = {}
    users: dict[str, list[pd.DataFrame]] = {}
    rows: dict[str, dict] = {}
    policies: list[str] = []
    sources, split, user_index, walls = [], None, None, 0.0
    for directory in map(Path, reports):
        try:
            report = json.loads((directory / "compare.json").read_text())
            frame = pd.read_parquet(directory / USERS_FILE)
        except FileNotFoundError as e:
            raise ConfigError(f"merge: {directory} is not a compare report with per-user values ({e.filename})")
        if split is not None and report["split"] != split:
            raise ConfigError(f"merge: {directory} is on split {report['split']!r}, the first report on {split!r}")
        split = report["split"]
        per_model = {
            name: part.set_index("user_id")[list(PAIRED)].sort_index()
            for name, part in frame.groupby("model", sort=False)
        }
        here = next(iter(per_model.values())).index
        if user_index is not None and not here.equals(user_index):
            raise ConfigError(f"merge: {directory} has other users than {sources[0]['report']}: not the same split")
        user_index = here
        same = [n for n, f in per_model.items() if n in users and identical(f, users[n][0])]
        if sources and not same:
            raise ConfigError(
                f"merge: {directory} shares no model with identical per-user values with the reports before it, "
                "so it cannot be shown to be on the same split (run popularity in every report)"
            )
        own = _policies_of(report)
        for name, f in per_model.items():
            if name in same:
                continue
            row = name if name not in users else f"{name} [{directory.name}]"
            users[row] = [f]
            results[row] = report["runs"][name]
            rows[row] = report["mean_sd"][name]
            if name in own:
                policies.append(row)
        walls += report["wall_seconds"]
        sources.append({"report": str(directory), "command": report["command"], "identical": same})
    baselines = [n for n in rows if n not in policies]
    rows = {n: rows[n] for n in [*baselines, *policies]}  # PageLLM's rows last, as compare lists them
    best = max(baselines, key=lambda n: rows[n]["ndcg@100"][0], default=None)
    paired = paired_against({n: users[n] for n in rows}, best) if best else {}
    report = {
        "command": command,
        "split": split,
        "wall_seconds": walls,
        "mean_sd": rows,
        "best_baseline": best,
        "policies": policies,
        "paired_vs_best_baseline": paired,
        "sources": sources,
        "runs": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    note = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Split: {split}; {len(sources)} compare reports on the same split merged (nothing trained again; "
            f"their wall times add to {walls / 60:.1f} min, each row's s/run is its own):",
            "",
            *(
                f"- `{s['report']}`: `{s['command']}`"
                + (f" (identical per-user values: {', '.join(s['identical'])})" if s["identical"] else "")
                for s in sources
            ),
        ]
    )
    write_compare(out, report, results, users, note, policies)
    return report


def run_coldstart(
    config_paths,
    overrides,
    fractions,
    baselines,
    out_dir,
    split="test",
    seeds=(0,),
    command: str = "",
    pagellm: bool = True,
) -> dict:
    """The chain (``pagellm run``) and ``run_compare`` on the full data and on each share in
    ``fractions`` of every user's training interactions (``data.train_keep``; validation and
    test untouched, so the users and targets are the same), then each model's change against
    its full-data run, user by user with paired intervals. ``pagellm=False``: the data stage and
    the baselines only (minutes, not a chain per share)."""
    from pagellm.data.stage import build_dataset
    from pagellm.run import run_pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keeps = [1.0, *sorted({float(f) for f in fractions if f < 1.0}, reverse=True)]
    runs: dict[float, dict] = {}
    users: dict[float, dict[str, pd.DataFrame]] = {}
    for keep in keeps:
        # the chain's own report skips baselines: compare scores them below, once
        cfg = load_config(config_paths, [*overrides, f"data.train_keep={keep}", "eval.report_baselines=[]"])
        run_dir = out / f"keep_{keep:g}"
        if pagellm:
            chain = run_pipeline(cfg, run_dir / "chain", command)
            stats, policies = (
                chain["stats"],
                {"PageLLM SFT": chain["sft"], "PageLLM PPO": str(Path(chain["ppo"]) / "policy")},
            )
        else:
            stats, policies = build_dataset(cfg, run_dir / "chain" / "data"), {}
        data = run_dir / "chain" / "data"
        runs[keep] = run_compare(cfg, data, policies, baselines, run_dir / "compare", split, seeds)
        runs[keep]["withheld"] = stats["split_rows"]["withheld"]
        frame = pd.read_parquet(run_dir / "compare" / USERS_FILE)
        users[keep] = {name: part.set_index("user_id")[list(PAIRED)] for name, part in frame.groupby("model")}
    models = list(runs[1.0]["mean_sd"])
    drops: dict[str, dict] = {}
    for keep in keeps[1:]:
        for name in models:
            change = paired_difference(users[keep][name], users[1.0][name])
            for key in PAIRED:
                full = runs[1.0]["mean_sd"][name][key][0]
                change[key]["full"] = full
                change[key]["relative"] = change[key]["mean"] / full if full else float("nan")
            drops.setdefault(f"{keep:g}", {})[name] = change
    report = {
        "command": command,
        "split": split,
        "seeds": list(seeds),
        "train_keep": keeps,
        "wall_seconds": time.perf_counter() - started,
        "withheld": {f"{k:g}": runs[k]["withheld"] for k in keeps},
        "mean_sd": {f"{k:g}": runs[k]["mean_sd"] for k in keeps},
        "change_vs_full": drops,
    }
    (out / "coldstart.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"Command: `{command}`  ",
        f"Split: {split}; baselines over seeds {list(seeds)}; wall time {report['wall_seconds'] / 60:.1f} min; "
        "training interactions withheld: " + ", ".join(f"keep {k} -> {n}" for k, n in report["withheld"].items()) + ".",
        "",
        "Each model trained on the full data and on the kept share of every user's training interactions (validation "
        "and test untouched); the change is user by user against the same model's full-data run (paired bootstrap "
        "95% interval), relative to its full-data mean.",
        "",
        "| model | keep | " + " | ".join(f"{k} | Δ {k} [95% interval] | relative" for k in PAIRED) + " |",
        "|---|---|" + "---|---|---|" * len(PAIRED),
    ]
    for name in models:
        lines.append(
            f"| {name} | 1 | " + " | ".join(f"{runs[1.0]['mean_sd'][name][k][0]:.4f} | | " for k in PAIRED) + " |"
        )
        for keep in keeps[1:]:
            d = drops[f"{keep:g}"][name]
            cells = [
                f"{runs[keep]['mean_sd'][name][k][0]:.4f} | {d[k]['mean']:+.4f} [{d[k]['ci95'][0]:+.4f}, "
                f"{d[k]['ci95'][1]:+.4f}] | {100 * d[k]['relative']:+.1f}%"
                for k in PAIRED
            ]
            lines.append(f"| | {keep:g} | " + " | ".join(cells) + " |")
    (out / "coldstart.md").write_text("\n".join(lines) + "\n")
    _drop_chart(drops, out / "coldstart.png", pagellm={n for n in models if n.startswith("PageLLM")})
    return report


def _drop_chart(drops: dict[str, dict], path: Path, pagellm: set[str]) -> None:
    """Relative change (%) of each model per kept share, whiskers the paired 95% interval."""
    colour = {True: "#c44e52", False: "#8c8c8c"}
    panels = [(keep, key) for keep in drops for key in PAIRED]
    names = list(next(iter(drops.values())))
    with figure(path, len(panels), panel_size=(max(4.0, 0.45 * len(names) + 1.5), 3.8)) as (fig, axes):
        for ax, (keep, key) in zip(axes, panels):
            cells = [drops[keep][n][key] for n in names]
            rel = [100 * c["relative"] for c in cells]
            low = [r - 100 * c["ci95"][0] / c["full"] if c["full"] else 0.0 for c, r in zip(cells, rel)]
            high = [100 * c["ci95"][1] / c["full"] - r if c["full"] else 0.0 for c, r in zip(cells, rel)]
            ax.bar(names, rel, yerr=[low, high], capsize=3, color=[colour[n in pagellm] for n in names])
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{key}: change at keep {keep} (%)")
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        fig.suptitle("cold start: each model against its full-data run")


def saved_parameters(model_dir) -> int:
    """Parameters of a saved policy (every member of an ensemble), read from its safetensors
    headers (no load)."""
    from safetensors import safe_open

    from pagellm.model.ensemble import lm_dirs

    total = 0
    for path in (p for d in lm_dirs(model_dir) for p in d.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def run_backbone(
    config_paths,
    overrides,
    backbones: dict[str, list[str]],
    baselines,
    out_dir,
    split: str = "test",
    command: str = "",
    chain: bool = False,
) -> dict:
    """The paper's backbone study (RQ6): one data directory, one recipe, several backbones.

    ``backbones`` maps a name to the overrides that make it (``model.name_or_path=DIR
    model.lora_rank=8``; ``[]`` is the configuration as given). Each backbone trains SFT (with
    ``chain``: the whole chain, reward heads and PPO too, ``pagellm run``) and its policies are
    compared with ``baselines`` by ``run_compare`` on the same split; backbone.md adds each one's
    size, LoRA rank, training time and its paired difference to the first backbone. A backbone's
    overrides may not touch ``data`` or ``eval``: every policy is scored on the same protocol."""
    from pagellm.data.stage import build_dataset
    from pagellm.run import run_pipeline
    from pagellm.train.sft import run_sft

    for name, extra in backbones.items():
        shared = [o for o in extra if o.split("=", 1)[0].split(".")[0] in ("data", "eval")]
        if shared:
            raise ConfigError(f"backbone {name}: {shared} would change the data or the evaluation; set them for all")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = load_config(config_paths, [*overrides, "eval.report_baselines=[]"])
    data = out / "data"
    build_dataset(base, data)
    policies: dict[str, str] = {}
    trained: dict[str, dict] = {}
    for name, extra in backbones.items():
        cfg = load_config(config_paths, [*overrides, *extra, "eval.report_baselines=[]"])
        began = time.perf_counter()
        if chain:
            summary = run_pipeline(cfg, out / name / "chain", command)
            policies[f"PageLLM SFT ({name})"] = summary["sft"]
            policies[f"PageLLM PPO ({name})"] = str(Path(summary["ppo"]) / "policy")
            sft_dir = summary["sft"]
        else:
            run_sft(cfg, data, out / name / "sft")
            sft_dir = policies[f"PageLLM SFT ({name})"] = str(out / name / "sft")
        trained[name] = {
            "overrides": extra,
            "name_or_path": cfg.model.name_or_path or "embedded GPT-2 (from scratch)",
            "lora_rank": cfg.model.lora_rank,
            "parameters": saved_parameters(sft_dir),
            "train_seconds": time.perf_counter() - began,
        }
    compare = run_compare(base, data, policies, baselines, out / "compare", split, (0,))
    frames = {
        n: f.set_index("user_id")[list(PAIRED)]
        for n, f in pd.read_parquet(out / "compare" / USERS_FILE).groupby("model")
    }
    first = next(iter(policies))
    versus_first = {n: paired_difference(frames[n], frames[first]) for n in policies if n != first}
    report = {
        "command": command,
        "split": split,
        "wall_seconds": time.perf_counter() - started,
        "backbones": trained,
        "chain": chain,
        "compare": str(out / "compare"),
        "mean_sd": {n: compare["mean_sd"][n] for n in policies},
        "best_baseline": compare["best_baseline"],
        "paired_vs_best_baseline": {n: compare["paired_vs_best_baseline"][n] for n in policies},
        "paired_vs_first": versus_first,
    }
    (out / "backbone.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    best = compare["best_baseline"]
    lines = [
        f"Command: `{command}`  ",
        f"Split: {split}; {'the whole chain' if chain else 'SFT'} per backbone on one data directory; wall time "
        f"{report['wall_seconds'] / 60:.1f} min. Every row with the baselines: [compare/compare.md](compare/compare.md).",
        "",
        "| backbone | model | LoRA rank | parameters | training min | policy | ndcg@100 | recall@20 | "
        f"Δ ndcg@100 vs {best} [95%] | Δ ndcg@100 vs {first} [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in trained.items():
        for policy in (p for p in policies if p.endswith(f"({name})")):
            vb = report["paired_vs_best_baseline"].get(policy, {}).get("ndcg@100")
            vf = versus_first.get(policy, {}).get("ndcg@100")
            cell = lambda d: f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else ""  # noqa: E731
            lines.append(
                f"| {name} | {t['name_or_path']} | {t['lora_rank'] or 'full'} | {t['parameters'] / 1e6:.2f}M | "
                f"{t['train_seconds'] / 60:.1f} | {policy} | {report['mean_sd'][policy]['ndcg@100'][0]:.4f} | "
                f"{report['mean_sd'][policy]['recall@20'][0]:.4f} | {cell(vb)} | {cell(vf)} |"
            )
    lines += [
        "",
        "Overrides per backbone: "
        + "; ".join(f"{n}: `{' '.join(t['overrides']) or '(none)'}`" for n, t in trained.items()),
    ]
    (out / "backbone.md").write_text("\n".join(lines) + "\n")
    return report
