"""Data-pipeline benchmark: the Ray Data engine on 2 CPUs against the local single-process engine.

Exact command (repository root, venv active):

    OMP_NUM_THREADS=1 python bench/data_pipeline.py                  # 100k, 1M and 10M interactions
    OMP_NUM_THREADS=1 python bench/data_pipeline.py --quick          # 100k only (smoke check)
    OMP_NUM_THREADS=1 python bench/data_pipeline.py --sizes 100000 1000000 --out bench/out/dp

Writes OUT/results.json, OUT/results.md and OUT/throughput.png (OUT defaults to
bench/out/data_pipeline) and prints a table. Results are saved after every measurement, so a
size that fails (out of memory, timeout) leaves the sizes before it recorded.

Method
------
* Per size the synthetic marketplace (``generate_synthetic(n, seed)``) is generated ONCE, in
  a helper process, and saved as Arrow IPC files under OUT/work/. Both engines load exactly
  these tables into ordinary (anonymous) memory and receive them as ``ingested=``; generation
  and loading are outside the timing.
* Every (size, engine) measurement runs in its own fresh process
  (``python bench/data_pipeline.py --engine ray|local --size N --data DIR --json FILE``),
  so memory kept by one measurement (Arrow pools, Ray's object store, warm workers) cannot
  pollute the next one.
* Ray: ``ray.init(num_cpus=2, include_dashboard=False)`` once, then one untimed warm-up
  ``build_dataset`` on 20k synthetic interactions (starts and warms the 2 worker processes and
  Ray Data; its time is reported as ``ray_warmup_s``). The timing then covers
  ``build_dataset(cfg, out, engine="ray", ingested=...)`` only. Ray Data's progress bars are
  switched off (they flood a log file); progress is printed by this script instead.
* Local: the timing covers ``build_dataset(cfg, out, engine="local", ingested=...)``.
* Throughput: users/s = stats["users_kept"] / wall, pairs/s = stats["pairs_total"] / wall.
  Per-step seconds come from stats["seconds"]; ``other`` is wall minus their sum (for Ray,
  mostly fetching the users table back from the object store).
* Memory: a background thread samples, every 0.2 s, the sum of PSS
  (``memory_full_info().pss``, RSS where PSS cannot be read) over the measuring process and
  all its descendants (for a local ``ray.init()`` these are gcs_server, raylet, the workers,
  ...). The Ray object store is a /dev/shm mapping and is counted through the PSS of the
  processes mapping it. Reported: peak minus the baseline sampled right before the timed call,
  and the absolute peak (which includes the loaded input tables and idle Ray processes).
  /dev/shm usage is also sampled as a cross-check for the object store.
* CPU: CPU seconds (user+system) of the same process tree during the timed call; cpu_s/wall
  is the number of cores kept busy on average (2.0 = both cores all the time).
* After both engines ran for a size, their output directories are compared file by file
  (bytes, else Arrow table equality; stats.json without ``engine``/``seconds``); then the
  input and output files are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import filecmp
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SIZES = [100_000, 1_000_000, 10_000_000]
ENGINES = ("ray", "local")
MiB = 1024 * 1024
SEED = 0
WARMUP_INTERACTIONS = 20_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ memory sampling


class TreeSampler:
    """Samples PSS (fallback RSS) and CPU time of this process and all its descendants."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.root = psutil.Process()
        self._procs: dict[int, "psutil.Process"] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}  # (pid, create_time) -> cpu s last seen
        self._cpu_start: dict[tuple[int, float], float] = {}
        self.peak = 0
        self.peak_shm = 0
        self.samples = 0
        self.rss_fallbacks = 0
        self.max_procs = 0
        self.thread_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _tree(self):
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except self.psutil.Error:
            pass
        return procs

    def sample(self) -> int:
        """One sample: total PSS (bytes) of the tree; also updates CPU-time bookkeeping."""
        total = 0
        n = 0
        for p in self._tree():
            try:
                cached = self._procs.get(p.pid)
                if cached is None or cached.create_time() != p.create_time():
                    self._procs[p.pid] = cached = p
                try:
                    mem = cached.memory_full_info().pss
                except (self.psutil.AccessDenied, AttributeError):
                    mem = cached.memory_info().rss
                    self.rss_fallbacks += 1
                cpu = cached.cpu_times()
                ident = (cached.pid, cached.create_time())
            except self.psutil.Error:  # exited between listing and reading
                continue
            total += mem
            n += 1
            with self._lock:
                self._cpu_last[ident] = cpu.user + cpu.system
        try:
            shm = shutil.disk_usage("/dev/shm").used
        except OSError:
            shm = 0
        with self._lock:
            self.samples += 1
            self.peak = max(self.peak, total)
            self.peak_shm = max(self.peak_shm, shm)
            self.max_procs = max(self.max_procs, n)
        return total

    def baseline(self) -> tuple[int, int]:
        """Sample right before the timed call: (PSS bytes, /dev/shm bytes); starts CPU accounting."""
        gc.collect()
        base = self.sample()
        shm = shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0
        with self._lock:
            self._cpu_start = dict(self._cpu_last)
            self.peak = base
            self.peak_shm = shm
        return base, shm

    def _loop(self) -> None:
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
        """CPU seconds of the tree since ``baseline`` (processes that exited count up to their
        last sample)."""
        with self._lock:
            return sum(v - self._cpu_start.get(k, 0.0) for k, v in self._cpu_last.items())

    def process_names(self) -> list[str]:
        names = []
        for p in self._tree():
            try:
                names.append(p.name())
            except self.psutil.Error:
                pass
        return sorted(names)


# ------------------------------------------------------------------------------ child: data


def make_data(n: int, data_dir: Path) -> dict:
    """Generate the synthetic tables for one size and save them as Arrow IPC files."""
    import pyarrow as pa

    from pagellm.data.synthetic import generate_synthetic

    t = time.perf_counter()
    ing = generate_synthetic(n, seed=SEED)
    gen_s = time.perf_counter() - t
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("interactions", ing.interactions), ("items", ing.items)):
        with pa.OSFile(str(data_dir / f"{name}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    meta = {"notes": ing.notes, "dropped": dict(ing.dropped), "generate_s": round(gen_s, 3),
            "interactions": ing.interactions.num_rows, "items": ing.items.num_rows}
    (data_dir / "meta.json").write_text(json.dumps(meta, default=str))
    return meta


def load_data(data_dir: Path):
    """Read the saved tables into ordinary memory (not memory-mapped) as an ``Ingested``."""
    from collections import Counter

    import pyarrow as pa

    from pagellm.data.schema import Ingested

    tables = {}
    for name in ("interactions", "items"):
        with pa.OSFile(str(data_dir / f"{name}.arrow"), "rb") as source:
            tables[name] = pa.ipc.open_file(source).read_all()
    meta = json.loads((data_dir / "meta.json").read_text())
    return Ingested(interactions=tables["interactions"], items=tables["items"],
                    dropped=Counter(meta["dropped"]), notes=meta["notes"])


# ------------------------------------------------------------------------------ child: measure


def measure(engine: str, n: int, data_dir: Path, out_dir: Path) -> dict:
    """One timed ``build_dataset`` call in this (fresh) process."""
    import pyarrow

    from pagellm.config import load_config
    from pagellm.data.pipeline import build_dataset, user_blocks

    cfg = load_config(overrides=[f"data.dataset=synthetic:{n}", "ray.num_cpus=2", "ray.include_dashboard=false"])
    t = time.perf_counter()
    ingested = load_data(data_dir)
    load_s = time.perf_counter() - t
    log(f"{engine} {n:,}: loaded {ingested.interactions.num_rows:,} interactions in {load_s:.1f} s")

    result: dict = {"engine": engine, "size": n, "load_s": round(load_s, 3)}
    if engine == "ray":
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
        result["ray_init_s"] = round(time.perf_counter() - t, 3)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["object_store_mib"] = round(ray.available_resources().get("object_store_memory", 0) / MiB)
        from pagellm.data.synthetic import generate_synthetic

        t = time.perf_counter()
        warm_cfg = load_config(overrides=[f"data.dataset=synthetic:{WARMUP_INTERACTIONS}"])
        build_dataset(warm_cfg, out_dir.parent / f"warmup_{n}", engine="ray",
                      ingested=generate_synthetic(WARMUP_INTERACTIONS, seed=SEED + 1))
        shutil.rmtree(out_dir.parent / f"warmup_{n}", ignore_errors=True)
        result["ray_warmup_s"] = round(time.perf_counter() - t, 3)
        log(f"ray {n:,}: ray.init {result['ray_init_s']:.1f} s, warm-up {result['ray_warmup_s']:.1f} s (untimed)")

    sampler = TreeSampler(0.2)
    base, base_shm = sampler.baseline()
    result["processes"] = sampler.process_names()
    sampler.start()
    log(f"{engine} {n:,}: timing build_dataset (baseline {base / MiB:,.0f} MiB PSS, "
        f"{len(result['processes'])} processes)")
    t = time.perf_counter()
    stats = build_dataset(cfg, out_dir, engine=engine, ingested=ingested)
    wall = time.perf_counter() - t
    sampler.stop()
    cpu_s = sampler.cpu_seconds()

    steps = dict(stats["seconds"])
    result.update(
        wall_s=round(wall, 3),
        users=stats["users"],
        users_kept=stats["users_kept"],
        pairs_total=stats["pairs_total"],
        ft_rows=stats["ft_rows"],
        interactions=stats["interactions"],
        users_per_s=round(stats["users_kept"] / wall, 1),
        pairs_per_s=round(stats["pairs_total"] / wall, 1),
        interactions_per_s=round(stats["interactions"] / wall, 1),
        seconds=steps,
        other_s=round(wall - sum(steps.values()), 3),
        cpu_s=round(cpu_s, 2),
        cores_busy=round(cpu_s / wall, 2),
        mem_baseline_mib=round(base / MiB, 1),
        mem_peak_mib=round(sampler.peak / MiB, 1),
        mem_peak_above_baseline_mib=round((sampler.peak - base) / MiB, 1),
        shm_baseline_mib=round(base_shm / MiB, 1),
        shm_peak_mib=round(sampler.peak_shm / MiB, 1),
        mem_samples=sampler.samples,
        mem_rss_fallbacks=sampler.rss_fallbacks,
        max_processes=sampler.max_procs,
        sampler_cpu_s=round(sampler.thread_cpu_s, 2),
        users_per_block=cfg.data.users_per_block,
        pyarrow=pyarrow.__version__,
    )
    log(f"{engine} {n:,}: wall {wall:.1f} s, {result['users_per_s']:,.0f} users/s, steps {steps}, "
        f"peak +{result['mem_peak_above_baseline_mib']:,.0f} MiB (abs {result['mem_peak_mib']:,.0f} MiB)")

    if engine == "ray":
        import ray

        result["ray"] = ray.__version__
        # diagnostic, untimed above: the driver-side Arrow sort that cuts blocks of whole users
        t = time.perf_counter()
        user_blocks(ingested.interactions, cfg.data.users_per_block)
        result["diag_driver_sort_s"] = round(time.perf_counter() - t, 3)
        ray.shutdown()
    return result


# ------------------------------------------------------------------------------ parent


def run_child(args: list[str], timeout: float) -> tuple[int, str]:
    """Run this script as a child in its own process group; returns (rc, why)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -1, f"timeout after {timeout:.0f} s (killed)"
    if rc != 0:
        why = f"exit code {rc}" + (" (SIGKILL: likely out of memory)" if rc == -9 else "")
        try:  # a killed Ray child can leave its raylet etc. in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return rc, why
    return 0, ""


def compare_outputs(a: Path, b: Path) -> dict:
    """Are two build_dataset output directories the same? (bytes, else Arrow table equality)"""
    import pyarrow.parquet as pq

    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return {"identical": False, "why": f"file lists differ: {set(files_a) ^ set(files_b)}"}
    byte_equal = 0
    for rel in files_a:
        if filecmp.cmp(a / rel, b / rel, shallow=False):
            byte_equal += 1
            continue
        if rel.name == "stats.json":
            sa, sb = (json.loads((d / rel).read_text()) for d in (a, b))
            for s in (sa, sb):
                s.pop("engine"), s.pop("seconds")
            if sa != sb:
                return {"identical": False, "why": "stats.json differs"}
        elif rel.suffix == ".parquet":
            if not pq.read_table(a / rel).equals(pq.read_table(b / rel)):
                return {"identical": False, "why": f"{rel} differs"}
        else:
            return {"identical": False, "why": f"{rel} differs"}
    return {"identical": True, "files": len(files_a), "byte_identical_files": byte_equal}


def machine_info() -> dict:
    import psutil
    import pyarrow
    import ray

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "shm_gib": round(shutil.disk_usage("/dev/shm").total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "gpu": "none",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def fmt_size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (f"{n // 1000}k" if n % 1000 == 0 else str(n))


def summarize(results: dict) -> None:
    for size, entry in results["sizes"].items():
        ray_r, loc_r = entry.get("ray"), entry.get("local")
        if ray_r and loc_r and "wall_s" in ray_r and "wall_s" in loc_r:
            entry["speed_ratio_ray_over_local"] = round(loc_r["wall_s"] / ray_r["wall_s"], 2)


STEP_NAMES = ("split", "item_stats", "build", "write")


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for size, entry in results["sizes"].items():
        ratio = entry.get("speed_ratio_ray_over_local")
        for engine in ENGINES:
            r = entry.get(engine)
            if r is None:
                continue
            if "wall_s" not in r:
                rows.append([fmt_size(int(size)), engine, f"FAILED: {r.get('error', '?')}"] + [""] * 11)
                continue
            s = r["seconds"]
            rows.append([
                fmt_size(int(size)), engine, f"{r['wall_s']:.1f}", f"{r['users_per_s']:,.0f}",
                f"{r['pairs_per_s']:,.0f}",
                *(f"{s.get(k, 0):.1f}" for k in STEP_NAMES), f"{max(r['other_s'], 0.0):.1f}",
                f"{r['cores_busy']:.2f}",
                f"{r['mem_peak_above_baseline_mib']:,.0f}", f"{r['mem_peak_mib']:,.0f}",
                f"{ratio:.2f}x" if (ratio and engine == 'ray') else "",
            ])
    return rows


HEADER = ["size", "engine", "wall s", "users/s", "pairs/s", "split s", "item_stats s", "build s",
          "write s", "other s", "cores busy", "peak MiB above base", "peak MiB abs", "ray/local"]


def render_text(results: dict) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render_md(results: dict) -> str:
    m = results["machine"]
    out = [
        "# Data pipeline benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB RAM, no GPU; Python {m['python']}, "
        f"Ray {m['ray']}, pyarrow {m['pyarrow']}; started {results['started']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    out += ["", "ray/local = local wall s / Ray wall s. Peak memory: PSS of the process tree "
            "(see bench/data_pipeline.py)."]
    for size, entry in results["sizes"].items():
        if "outputs_identical" in entry:
            out.append(f"- {fmt_size(int(size))}: outputs of both engines identical: {entry['outputs_identical']}")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = [s for s, e in results["sizes"].items() if any("wall_s" in e.get(k, {}) for k in ENGINES)]
    if not sizes:
        return
    x = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"ray": "#1f77b4", "local": "#ff7f0e"}
    labels = {"ray": "Ray Data (2 CPUs)", "local": "local (1 process)"}
    for i, engine in enumerate(ENGINES):
        vals = [results["sizes"][s].get(engine, {}).get("users_per_s", 0) for s in sizes]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=labels[engine], color=colors[engine])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=8, padding=2)
    for j, s in enumerate(sizes):
        ratio = results["sizes"][s].get("speed_ratio_ray_over_local")
        if ratio:
            top = max(results["sizes"][s].get(e, {}).get("users_per_s", 0) for e in ENGINES)
            ax.text(x[j], top * 1.12, f"{ratio:.2f}x", ha="center", fontsize=10, fontweight="bold")
    ax.set_xticks(x, [f"{fmt_size(int(s))} interactions" for s in sizes])
    ax.set_ylabel("kept users / s (higher is better)")
    ymax = max(results["sizes"][s].get(e, {}).get("users_per_s", 0) for s in sizes for e in ENGINES)
    ax.set_ylim(0, ymax * 1.3)
    m = results["machine"]
    ax.set_title(f"build_dataset throughput, {m['cpus']} CPUs / {m['memory_gib']:.0f} GiB "
                 f"(Ray {m['ray']}, pyarrow {m['pyarrow']})", fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save(results: dict, out: Path) -> None:
    summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_md(results))
    plot(results, out / "throughput.png")


def parent(ns: argparse.Namespace) -> int:
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    sizes = [100_000] if ns.quick else ns.sizes
    results = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "method": "fresh process per (size, engine); see bench/data_pipeline.py docstring",
        "sizes": {},
    }
    log(f"sizes {sizes}, engines {ns.engines}, out {out}")
    for n in sizes:
        entry = results["sizes"].setdefault(str(n), {})
        data_dir = work / f"data_{n}"
        log(f"--- {n:,} interactions: generating synthetic data (untimed)")
        rc, why = run_child(["--make-data", str(n), "--data", str(data_dir)], ns.timeout)
        if rc != 0:
            entry["error"] = f"data generation failed: {why}"
            log(entry["error"])
            save(results, out)
            continue
        entry["data"] = json.loads((data_dir / "meta.json").read_text())
        for engine in ns.engines:
            json_path = work / f"{engine}_{n}.json"
            json_path.unlink(missing_ok=True)
            run_out = work / f"run_{engine}_{n}"
            shutil.rmtree(run_out, ignore_errors=True)
            t = time.perf_counter()
            rc, why = run_child(["--engine", engine, "--size", str(n), "--data", str(data_dir),
                                 "--run-out", str(run_out), "--json", str(json_path)], ns.timeout)
            if rc == 0 and json_path.exists():
                entry[engine] = json.loads(json_path.read_text())
            else:
                entry[engine] = {"error": why or "no result written",
                                 "seconds_until_failure": round(time.perf_counter() - t, 1)}
                log(f"{engine} {n:,}: FAILED: {entry[engine]['error']}")
            save(results, out)
        if all("wall_s" in entry.get(e, {}) for e in ENGINES) and set(ns.engines) == set(ENGINES):
            log(f"{n:,}: comparing the two engines' outputs")
            cmp = compare_outputs(work / f"run_local_{n}", work / f"run_ray_{n}")
            entry["outputs_identical"] = cmp["identical"]
            entry["outputs_compare"] = cmp
            log(f"{n:,}: outputs identical: {cmp}")
        if not ns.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
            for engine in ENGINES:
                shutil.rmtree(work / f"run_{engine}_{n}", ignore_errors=True)
        save(results, out)
        print(render_text(results), flush=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save(results, out)
    print()
    print(render_text(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'throughput.png'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="interaction counts")
    ap.add_argument("--quick", action="store_true", help="100k only (smoke check)")
    ap.add_argument("--out", default=str(REPO / "bench/out/data_pipeline"))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per child process")
    ap.add_argument("--keep", action="store_true", help="keep generated data and outputs under OUT/work")
    # child modes (used by the parent)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run-out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    if ns.make_data:
        meta = make_data(ns.make_data, Path(ns.data))
        log(f"generated {meta['interactions']:,} interactions, {meta['items']:,} items in {meta['generate_s']:.1f} s")
        return 0
    if ns.engine:
        result = measure(ns.engine, ns.size, Path(ns.data), Path(ns.run_out))
        Path(ns.json).write_text(json.dumps(result, indent=2, default=str))
        return 0
    return parent(ns)


if __name__ == "__main__":
    sys.exit(main())
