"""SFT training-throughput benchmark: golden-list fine-tuning of the embedded small GPT-2.

Exact command (repository root, venv active):

    OMP_NUM_THREADS=1 WANDB_MODE=offline RAY_AUTH_MODE=disabled python bench/train_throughput.py
    OMP_NUM_THREADS=1 WANDB_MODE=offline RAY_AUTH_MODE=disabled python bench/train_throughput.py --quick

Options: ``--data DIR`` (a ``pagellm data`` output; default: bench/out/train_throughput/data,
built with ``pagellm data --dataset synthetic:60000 --engine local`` when absent), ``--epochs``
(default 2), ``--rows N`` (use the first N fine-tuning rows; default all), ``--configs``
(e.g. ``1:deepspeed 2:ddp``), ``--out DIR`` (default bench/out/train_throughput). Writes
OUT/results.json and OUT/results.md and prints the table. ``--quick``: 1 epoch on 800 rows,
a smoke check only (with one epoch there is no steady-state epoch).

Method
------
* Rows: the data stage's golden-list fine-tuning table (``ft/``) turned into (prompt || page)
  rows by ``pagellm.train.sft.page_rows`` with a fresh tokenizer
  (``pagellm.model.vocab.build_tokenizer(None, items, users, model.bpe_vocab_size)``, users =
  training and validation users as in ``run_sft``); batches by ``pagellm.train.sft.collate_lm``.
  Validation (run by the loop after every epoch, and inside ``epoch_seconds``) uses only the
  first 64 validation-user rows, so it is a small, constant share of each epoch.
* Model: ``PolicyLM(build_lm(ModelConfig(), tokenizer, base_size))``: the ModelConfig defaults
  (4 layers, 4 heads, 128 dim), trained from scratch, full fine-tuning (no LoRA), fp32 on CPU.
  Learning rate: ``sft.ft_lr`` of the embedded profile (pagellm/configs/embedded.yaml).
* Four configurations, all through ``pagellm.train.loop.fit`` (Ray Train TorchTrainer, gloo):
  {1, 2} workers x {DeepSpeed ZeRO-1, plain DDP (``train.deepspeed=false``)}; 1 CPU per worker;
  the same rows, global batch 32 (micro-batch 32 / workers), the same seed.
* Ray is started once, before any timing: ``ray.init(num_cpus=2)`` (no dashboard). Then one
  untimed warm-up ``fit`` (1 worker, DDP, 64 rows, 1 epoch): Ray Data / Ray Train keep singleton
  actors for the session, and the last run's controller, split coordinators and dataset manager
  until the next ``fit`` replaces them, so after the warm-up every measured configuration starts
  from the same state (``--no-warmup`` skips it).
* Throughput: tokens/s = non-pad input tokens of the training rows (sum of the rows' lengths;
  every row is processed once per epoch) / the epoch's ``epoch_seconds`` from the loop's JSONL
  log (training + the small validation pass; the per-epoch checkpoint is outside it). The
  steady value is the mean over epochs 2..N (with 2 epochs: the second epoch), so worker
  start-up, the first batches and lazy initialisation are excluded; the first epoch is reported
  as well. samples/s likewise from the row count.
* Memory: a thread samples every 0.2 s the sum of PSS (``psutil`` ``memory_full_info().pss``)
  over the driver and all its descendants (Ray's GCS, raylet, idle and training workers);
  reported: peak during ``fit`` minus the baseline sampled right before it (taken once the
  tree has kept the same processes for 3 s). The baseline holds the previous run's leftover
  actors, which the new run replaces, so the increment is what the machine sees, not the
  run's whole footprint; the highest summed PSS of the Ray Train worker processes alone
  (``train_workers_peak_pss_mib``) and the absolute peak are reported as well. Reading PSS
  walks page tables (~0.2 cores at 0.2 s), so the sampler thread runs at nice 19 and yields
  to training when both cores are busy; its CPU time (``sampler_cpu_s``) and its achieved
  mean interval (``pss_mean_interval_s``) are reported, and
  ``--pss-interval 0`` replaces PSS by RSS (cheap) to gauge what the sampler costs.
* CPU: CPU seconds of the same process tree during ``fit`` and of the whole machine, so CPU
  used by other processes during the measurement is recorded (``foreign_cpu_s``).
* Loss: the final epoch's mean training loss (and validation loss) from the log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "out" / "train_throughput"
DATASET = "synthetic:60000"
GLOBAL_BATCH = 32
VALID_ROWS = 64
QUICK_ROWS = 800
STAGE = "golden_ft"
ALL_CONFIGS = ["1:deepspeed", "1:ddp", "2:deepspeed", "2:ddp"]
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ sampling


class TreeSampler:
    """Every ``interval`` s: PSS sum and CPU times of this process and all its descendants."""

    def __init__(self, interval: float = 0.2, pss: bool = True):
        import psutil

        self.psutil, self.interval, self.root, self.pss = psutil, interval, psutil.Process(), pss
        self.peak = 0
        self.peak_workers = 0  # highest sum of the Ray Train workers' PSS in one sample
        self.peak_procs: list[tuple[str, float]] = []  # (process name, PSS MiB) of the peak sample
        self.last_procs: list[tuple[str, float]] = []
        self.baseline_procs: list[tuple[str, float]] = []
        self.samples = 0
        self.pss_fallbacks = 0
        self.thread_cpu_s = 0.0
        self.niced = False
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._cpu_start: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            procs = [self.root]
        total, workers, breakdown = 0, 0, []
        for p in procs:
            try:
                if not self.pss:  # CPU times only; RSS is nearly free to read
                    mem = p.memory_info().rss
                else:
                    try:
                        mem = p.memory_full_info().pss
                    except (self.psutil.AccessDenied, AttributeError):
                        mem = p.memory_info().rss
                        self.pss_fallbacks += 1
                cpu = p.cpu_times()
                ident = (p.pid, p.create_time())
                name = p.name()
            except self.psutil.Error:  # exited between listing and reading
                continue
            total += mem
            if name.startswith("ray::RayTrainWorker"):
                workers += mem
            breakdown.append((name, round(mem / MiB, 1)))
            with self._lock:
                self._cpu_last[ident] = cpu.user + cpu.system
        with self._lock:
            self.samples += 1
            self.peak_workers = max(self.peak_workers, workers)
            if total > self.peak:
                self.peak, self.peak_procs = total, sorted(breakdown, key=lambda x: -x[1])
            self.last_procs = breakdown
        return total

    def baseline(self) -> int:
        import gc

        gc.collect()
        base = self.sample()
        with self._lock:
            self._cpu_start = dict(self._cpu_last)
            self.peak, self.peak_procs, self.peak_workers = base, [], 0
            self.baseline_procs = sorted(self.last_procs, key=lambda x: -x[1])
        return base

    def _loop(self) -> None:
        # Reading PSS walks every process's page tables (~0.2 cores at 0.2 s here); at nice 19
        # (Linux: per thread) the sampler yields to the training processes on a busy machine
        # instead of slowing them, at the price of late samples (``pss_samples`` records how many).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            self.niced = True
        except (AttributeError, OSError):
            self.niced = False
        t0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self.sample()
        self.thread_cpu_s = time.thread_time() - t0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def cpu_seconds(self) -> float:
        with self._lock:
            return sum(v - self._cpu_start.get(k, 0.0) for k, v in self._cpu_last.items())


def settle(max_wait: float = 30.0, quiet_for: float = 3.0) -> int:
    """Wait (untimed) until the driver's process tree has kept the same processes for
    ``quiet_for`` s (Ray retires the previous run's actors and idle workers), at most
    ``max_wait`` s; returns the number of processes."""
    import psutil

    root = psutil.Process()
    deadline, last, since = time.time() + max_wait, None, time.time()
    while time.time() < deadline:
        pids = frozenset(p.pid for p in root.children(recursive=True))
        if pids != last:
            last, since = pids, time.time()
        elif time.time() - since >= quiet_for:
            break
        time.sleep(0.5)
    return len(last or ()) + 1


def system_busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


# ------------------------------------------------------------------------------ data


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "stats.json").exists():
        return
    log(f"{data_dir} absent: pagellm data --dataset {DATASET} --engine local (not timed)")
    cmd = [
        sys.executable,
        "-m",
        "pagellm.cli",
        "data",
        "--dataset",
        DATASET,
        "--engine",
        "local",
        "--out",
        str(data_dir),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)


def build_rows(data_dir: Path, model_cfg, n_rows: int | None):
    """Tokenizer, fine-tuning rows and a small validation set, all from library functions."""
    from pagellm.config import DataConfig
    from pagellm.data.layout import DataDir
    from pagellm.model.prompts import PromptCodec
    from pagellm.model.vocab import build_tokenizer
    from pagellm.train.sft import page_rows, read_data_dir

    data = read_data_dir(data_dir, DataConfig().positive_threshold)
    users = sorted(set(data["train"].user_id) | set(data["val"].user_id))
    tokenizer = build_tokenizer(None, DataDir(data_dir).read_items(), users, model_cfg.bpe_vocab_size)
    codec = PromptCodec.from_tokenizer(tokenizer)
    vocab = codec.vocab
    ft = data["ft"] if n_rows is None else data["ft"].head(n_rows)
    rows = page_rows(codec, ft.user_id, ft.prompt_items, ft.golden)
    val = data["val"].head(VALID_ROWS)
    valid = page_rows(codec, val.user_id, val.prompt_items, val.target)
    return tokenizer, vocab, rows, valid, len(data["ft"])


def make_spec(tokenizer, base_size: int, model_cfg, epochs: int, lr: float, seed: int):
    from pagellm.model.modeling import PolicyLM, build_lm, unwrap_lm
    from pagellm.train.loop import FitSpec
    from pagellm.train.sft import collate_lm

    def build():
        return PolicyLM(build_lm(model_cfg, tokenizer, base_size, seed))

    def export(module, directory: Path):
        unwrap_lm(module.lm).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return FitSpec(STAGE, epochs, lr, GLOBAL_BATCH, build, collate_lm(tokenizer.pad_token_id), export)


# ------------------------------------------------------------------------------ one run


def run_config(name: str, spec, rows, valid, tokens: int, out: Path, seed: int, pss_interval: float = 0.2) -> dict:
    import ray.data

    from pagellm.config import TrainConfig
    from pagellm.outputs import read_jsonl
    from pagellm.train.loop import fit

    workers, backend = name.split(":")
    train_cfg = TrainConfig(
        num_workers=int(workers),
        cpus_per_worker=1.0,
        deepspeed=backend == "deepspeed",
        zero_stage=1,
        max_failures=0,
        log_every_steps=10,
        seed=seed,
    )
    run_dir = out / "runs" / name.replace(":", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh log and no checkpoint to resume from
    datasets = {"train": ray.data.from_pandas(rows), "valid": ray.data.from_pandas(valid)}
    n_procs = settle()
    load_before = os.getloadavg()[0]
    sampler = TreeSampler(pss_interval or 0.2, pss=pss_interval > 0)
    base = sampler.baseline()
    sys_before = system_busy_s()
    sampler.start()
    t0 = time.perf_counter()
    metrics = fit(spec, datasets, train_cfg, run_dir, run_dir / "export")
    wall = time.perf_counter() - t0
    sampler.stop()
    sys_cpu = system_busy_s() - sys_before
    tree_cpu = sampler.cpu_seconds()
    records = read_jsonl(run_dir / f"{STAGE}.jsonl")
    epochs = [r for r in records if "epoch_seconds" in r]
    secs = [r["epoch_seconds"] for r in epochs]
    steady = secs[1:] or secs  # epochs 2..N; with one epoch (--quick) the first, flagged
    steady_s = sum(steady) / len(steady)
    micro = max(1, GLOBAL_BATCH // train_cfg.num_workers)
    steps_first = epochs[0]["step"]
    expected_steps = math.ceil(len(rows) / train_cfg.num_workers / micro)
    result = {
        "config": name,
        "workers": train_cfg.num_workers,
        "backend": "DeepSpeed ZeRO-1" if train_cfg.deepspeed else "DDP",
        "micro_batch": micro,
        "epochs": len(epochs),
        "epoch_seconds": [round(s, 3) for s in secs],
        "first_epoch_s": round(secs[0], 3),
        "steady_epoch_s": round(steady_s, 3),
        "steady_is_first_epoch": len(secs) < 2,
        "tokens_per_s": round(tokens / steady_s, 1),
        "samples_per_s": round(len(rows) / steady_s, 1),
        "first_epoch_tokens_per_s": round(tokens / secs[0], 1),
        "fit_wall_s": round(wall, 2),
        "steps_per_epoch": steps_first,
        "expected_steps_per_epoch": expected_steps,
        "memory_metric": "PSS" if sampler.pss else "RSS (--pss-interval 0: not comparable)",
        "peak_pss_above_baseline_mib": round((sampler.peak - base) / MiB, 1),
        "baseline_pss_mib": round(base / MiB, 1),
        "peak_pss_mib": round(sampler.peak / MiB, 1),
        "train_workers_peak_pss_mib": round(sampler.peak_workers / MiB, 1),
        "pss_samples": sampler.samples,
        "pss_mean_interval_s": round(wall / max(sampler.samples, 1), 3),
        "sampler_thread_nice19": sampler.niced,
        "baseline_processes": n_procs,
        "baseline_pss_by_process_mib": sampler.baseline_procs,
        "peak_pss_by_process_mib": sampler.peak_procs,
        "pss_rss_fallbacks": sampler.pss_fallbacks,
        "sampler_cpu_s": round(sampler.thread_cpu_s, 2),
        "tree_cpu_s": round(tree_cpu, 1),
        "machine_cpu_s": round(sys_cpu, 1),
        "foreign_cpu_s": round(max(0.0, sys_cpu - tree_cpu), 1),
        "tree_cores_busy": round(tree_cpu / wall, 2),
        "loadavg_1m_before": round(load_before, 2),
        "final_train_loss": round(epochs[-1].get("train_loss", float("nan")), 4),
        "final_valid_loss": round(epochs[-1].get("valid_loss", float("nan")), 4),
        "first_train_loss": round(epochs[0].get("train_loss", float("nan")), 4),
        "returned_epoch": metrics.get("epoch"),
    }
    shutil.rmtree(run_dir / "ray_train", ignore_errors=True)  # checkpoints: not needed afterwards
    shutil.rmtree(run_dir / "export", ignore_errors=True)
    return result


# ------------------------------------------------------------------------------ report


HEADER = (
    "workers",
    "backend",
    "tokens/s",
    "samples/s",
    "peak MiB above baseline",
    "first-epoch s",
    "steady epoch s",
    "final train loss",
)


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in results:
        steady = f"{r['steady_epoch_s']:.1f}" + (" (1 epoch only)" if r["steady_is_first_epoch"] else "")
        lines.append(
            f"| {r['workers']} | {r['backend']} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:,.1f} | "
            f"{r['peak_pss_above_baseline_mib']:,.0f} | {r['first_epoch_s']:.1f} | {steady} | {r['final_train_loss']:.3f} |"
        )
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    m, w = summary["machine"], summary["workload"]
    extra = [
        "| config | fit wall s | steps/epoch (expected) | tree cores busy | foreign CPU s | load 1m before | sampler CPU s | baseline / peak PSS MiB | train workers' peak PSS MiB | valid loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        extra.append(
            f"| {r['config']} | {r['fit_wall_s']:.1f} | {r['steps_per_epoch']} ({r['expected_steps_per_epoch']}) | "
            f"{r['tree_cores_busy']:.2f} | {r['foreign_cpu_s']:.1f} | {r['loadavg_1m_before']:.2f} | {r['sampler_cpu_s']:.2f} | {r['baseline_pss_mib']:,.0f} / {r['peak_pss_mib']:,.0f} | {r['train_workers_peak_pss_mib']:,.0f} | {r['final_valid_loss']:.3f} |"
        )
    md = [
        "# SFT training throughput",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, GPU available: {m['cuda_available']} ({m['gpu_note']}); "
        f"torch {m['torch']}, ray {m['ray']}, deepspeed {m['deepspeed']}.",
        "",
        f"Workload: {w['train_rows']} fine-tuning rows ({w['train_tokens']} non-pad tokens per epoch, "
        f"{w['mean_row_tokens']:.1f} per row), {w['valid_rows']} validation rows, global batch {w['global_batch']}, "
        f"{w['epochs']} epoch(s), lr {w['lr']}, model {w['model']}, vocabulary {w['vocab_size']}.",
        "",
        table(summary["results"]),
        "",
        extra and "\n".join(extra),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="output directory of `pagellm data` (default: built under --out)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=None, help="use the first N fine-tuning rows (default: all)")
    parser.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pss-interval",
        type=float,
        default=0.2,
        help="seconds between PSS samples; 0: no PSS (CPU times and RSS only, to gauge the sampler's cost)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up fit")
    parser.add_argument("--quick", action="store_true", help=f"1 epoch, {QUICK_ROWS} rows: a smoke check")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.rows = 1, args.rows or QUICK_ROWS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)

    import psutil
    import ray
    import torch

    from pagellm.config import EMBEDDED_PROFILE, ModelConfig, load_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = (args.data or out / "data").resolve()
    ensure_data(data_dir)
    cuda = torch.cuda.is_available()
    gpu_note = (
        "GPU present but this benchmark trains on CPU workers (train.use_gpu=false)"
        if cuda
        else "no GPU was available: CPU/gloo only"
    )
    log(f"torch.cuda.is_available() = {cuda}: {gpu_note}")

    model_cfg = ModelConfig()
    lr = load_config(EMBEDDED_PROFILE).sft.ft_lr
    t = time.perf_counter()
    tokenizer, vocab, rows, valid, ft_total = build_rows(data_dir, model_cfg, args.rows)
    tokens = int(sum(len(x) for x in rows.input_ids))
    log(
        f"{len(rows)} of {ft_total} fine-tuning rows, {tokens} tokens/epoch, vocabulary {len(tokenizer)} ({time.perf_counter() - t:.1f} s)"
    )
    spec = make_spec(tokenizer, vocab.base_size, model_cfg, args.epochs, lr, args.seed)
    n_params = sum(p.numel() for p in spec.build_model().parameters())

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log(f"ray.init(num_cpus=2) in {time.perf_counter() - t:.1f} s (not timed)")

    import deepspeed

    warmup_s = None
    if not args.no_warmup:
        # Ray Data / Ray Train keep singleton actors (_StatsActor, autoscaling coordinator) for the
        # session and the last run's controller, split coordinators and dataset manager until the
        # next fit replaces them; an untimed warm-up fit puts every measured configuration in that
        # same starting state (comparable baselines).
        log("untimed warm-up fit: 1 worker, DDP, 64 rows, 1 epoch")
        t = time.perf_counter()
        warm = make_spec(tokenizer, vocab.base_size, model_cfg, 1, lr, args.seed)
        from pagellm.config import TrainConfig
        from pagellm.train.loop import fit

        fit(
            warm,
            {"train": ray.data.from_pandas(rows.head(64)), "valid": ray.data.from_pandas(valid)},
            TrainConfig(num_workers=1, deepspeed=False, max_failures=0),
            out / "runs" / "warmup",
            out / "runs" / "warmup" / "export",
        )
        shutil.rmtree(out / "runs" / "warmup", ignore_errors=True)
        warmup_s = round(time.perf_counter() - t, 1)
        log(f"warm-up done in {warmup_s} s")

    command = (
        "OMP_NUM_THREADS=1 WANDB_MODE=offline RAY_AUTH_MODE=disabled python bench/train_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    summary = {
        "command": command.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda_available": cuda,
            "gpu_note": gpu_note,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "deepspeed": deepspeed.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "workload": {
            "data_dir": str(data_dir),
            "train_rows": len(rows),
            "ft_rows_available": ft_total,
            "train_tokens": tokens,
            "mean_row_tokens": tokens / max(len(rows), 1),
            "max_row_tokens": int(max(len(x) for x in rows.input_ids)),
            "valid_rows": len(valid),
            "global_batch": GLOBAL_BATCH,
            "epochs": args.epochs,
            "lr": lr,
            "model": f"GPT-2 {model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} dim, {n_params} parameters",
            "vocab_size": len(tokenizer),
            "quick": args.quick,
            "seed": args.seed,
            "pss_interval_s": args.pss_interval,
            "warmup_fit_s": warmup_s,
        },
        "results": [],
    }
    try:
        for name in args.configs:
            log(f"--- {name}: fit ({args.epochs} epoch(s))")
            result = run_config(name, spec, rows, valid, tokens, out, args.seed, args.pss_interval)
            summary["results"].append(result)
            log(
                f"{name}: {result['tokens_per_s']:,.0f} tokens/s, {result['samples_per_s']:.1f} samples/s, epochs "
                f"{result['epoch_seconds']} s, peak +{result['peak_pss_above_baseline_mib']:.0f} MiB, "
                f"train loss {result['final_train_loss']:.3f}, foreign CPU {result['foreign_cpu_s']:.1f} s"
            )
            write_report(out, summary)
    finally:
        ray.shutdown()
    print()
    print(f"GPU: {gpu_note}")
    print(table(summary["results"]))
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
