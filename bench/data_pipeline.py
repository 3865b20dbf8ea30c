"""Data-pipeline benchmark: the streaming Ray engine, the earlier gather engine and one process.

Exact command (repository root, venv active):

    OMP_NUM_THREADS=1 python bench/data_pipeline.py --passes one     # 1M, 10M, 50M interactions
    OMP_NUM_THREADS=1 python bench/data_pipeline.py --quick          # 100k only (smoke check)
    OMP_NUM_THREADS=1 python bench/data_pipeline.py --sizes 100000 1000000 --out bench/out/dp

Writes OUT/results.json, OUT/results.md and OUT/throughput.png (OUT defaults to
bench/out/data_pipeline) and prints a table. Results are saved after every measurement, so a
size that fails (out of memory, timeout) leaves the sizes before it recorded.

Method
------
* Engines (``pagellm.data.stage.build_dataset``): ``ray``, the streaming engine (reads, shuffle,
  per-user steps and writes in Ray tasks); ``gather``, the earlier Ray engine (tables on the
  driver, per-user steps on Ray); ``local``, one process. The in-memory two run up to
  ``--in-memory-max`` (10M): they hold the whole log in one process.
* Per size the synthetic marketplace (``generate_synthetic(n, seed)``; above 10M the 10M data
  set repeated with renamed users) is written ONCE, in a helper process, as parquet shards of
  1M interactions plus ``items.parquet`` under OUT/work/; every engine runs
  ``data.dataset=parquet:SHARDS`` with ``data.items_path``, so reading the input is inside the
  timing (the streaming engine reads it in its tasks, the others in the driver).
* Memory is reported per process group as well: the driver (the measured process), Ray's
  worker processes (tasks and actors) and Ray's system processes; the driver's peak against the
  data size is fitted with a line (MiB per million interactions).
* Every (size, engine, pass) measurement runs in its own fresh process
  (``python bench/data_pipeline.py --engine ray|local --size N --mode time|mem --data DIR
  --json FILE``), so memory kept by one measurement (Arrow pools, Ray's object store, warm
  workers) cannot pollute the next one.
* The sampler is a background thread of the PARENT process, watching the child's process
  tree from outside. A first version ran it as a thread inside the measured process, where
  it competes with the local engine's main thread for the GIL (each /proc read releases and
  re-takes it; the thread got only ~1 sample/s instead of 5 at 10M): the local engine took
  150-170 s at 10M with it (RSS or PSS), 122.6 s with no sampler and 121-124 s with the
  sampler in the parent.
* Two passes per (size, engine), by default. Reading PSS walks the page tables of every
  process (/proc/PID/smaps_rollup), which costs CPU (~15 s per Ray 10M run, where it also
  slows the run by ~7 % because both cores are busy, and reaches only ~3.5 samples/s) and
  takes each process's mmap lock. So the TIMING pass samples only CPU times and RSS and gives wall,
  users/s, pairs/s, per-step seconds and cores busy; the MEMORY pass repeats the run with
  PSS sampling and gives peak memory only (its wall time is kept in results.json as
  ``mem_pass_wall_s``). ``--passes one`` measures both in one PSS run; ``--passes off``
  samples nothing (overhead check).
* Ray engines: ``ray.init(num_cpus=2, include_dashboard=False)`` once, then one untimed warm-up
  ``build_dataset`` on 20k synthetic interactions (starts and warms the 2 worker processes and
  Ray Data; its time is reported as ``ray_warmup_s``). The timing then covers
  ``build_dataset(cfg, out, engine=ENGINE)`` only. Ray Data's progress bars are
  switched off (they flood a log file); progress is printed by this script instead.
* Local: the timing covers ``build_dataset(cfg, out, engine="local")``.
* Throughput: users/s = stats["users_kept"] / wall, pairs/s = stats["pairs_total"] / wall.
  Per-step seconds come from stats["seconds"]; ``other`` is wall minus their sum (for Ray,
  mostly fetching the users table back from the object store).
* Memory (memory pass): the parent's sampler thread reads, every 0.2 s, the sum of PSS
  (``memory_full_info().pss``, RSS where PSS cannot be read) over the measured process and
  all its descendants (for a local ``ray.init()`` these are gcs_server, raylet, the workers,
  ...). The Ray object store is a /dev/shm mapping and is counted through the PSS of the
  processes mapping it. Reported: peak minus the baseline (one sample taken by the measured
  process itself right before the timed call),
  and the absolute peak (which includes the loaded input tables and idle Ray processes).
  /dev/shm usage is also sampled as a cross-check for the object store.
* CPU: CPU seconds (user+system) of the same process tree during the timed call, also per
  step (from the 0.2 s samples) and per process group (driver / Ray workers / Ray system);
  cpu_s/wall is the number of cores kept busy on average (2.0 = both cores all the time).
* The machine may be shared: before each measurement the parent waits (``--wait-idle``, up
  to 900 s) until other processes have used < 0.25 cores for 30 s in a row, and every result
  records the CPU that other processes used during the timed call (``foreign_cores_busy``,
  "other procs cores" in the table: system-wide busy CPU minus the measured tree and the
  sampler thread) and VM steal time.
* Calibration: before the sizes, the same small pure-Python workload runs in 1 process, then
  in 2 processes at once; 2 x alone / together is the best speed-up two processes can get on
  this machine (``machine.calibration.two_process_speedup``), whatever the engine.
* After the engines ran for a size, the ray engine's output is compared with each other's
  (``pagellm.data.stage.difference``: every table as the stages read it, stats.json without
  ``engine``/``seconds``); then the input and output files are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
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
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SIZES = [1_000_000, 10_000_000, 50_000_000]
ENGINES = ("ray", "gather", "local")
IN_MEMORY = ("gather", "local")  # engines that hold the whole table in one process
MiB = 1024 * 1024
SEED = 0
WARMUP_INTERACTIONS = 20_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ memory sampling


class TreeSampler:
    """Samples memory (PSS, or RSS when ``pss=False``) and CPU time of a process and all its
    descendants every ``interval`` s, in a thread of ANOTHER process (the parent), so that the
    measured process is not slowed by it; see the module docstring."""

    def __init__(self, root_pid: int, interval: float = 0.2, pss: bool = True):
        import psutil

        self.psutil = psutil
        self.pss = pss  # False: RSS from statm and CPU only (no page-table walk)
        self.interval = interval
        self.root = psutil.Process(root_pid)
        self._procs: dict[int, "psutil.Process"] = {}
        self._group: dict[tuple[int, float], str] = {}  # (pid, create_time) -> process group
        self._name: dict[tuple[int, float], str] = {}
        self._cpu_hist: dict[tuple[int, float], list[tuple[float, float]]] = {}  # -> [(t, cpu s)]
        # (epoch s, tree memory bytes, /dev/shm bytes, sampler thread CPU s)
        self.timeline: list[tuple[float, int, int, float]] = []
        self.group_timeline: list[tuple[float, dict[str, int]]] = []  # (epoch s, group -> bytes)
        self.rss_fallbacks = 0
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

    def sample(self, thread_cpu: float = 0.0) -> int:
        """One sample of the tree: memory bytes (PSS or RSS); records CPU per process."""
        total = 0
        by_group: dict[str, int] = {}
        now = time.time()
        for p in self._tree():
            try:
                cached = self._procs.get(p.pid)
                if cached is None or cached.create_time() != p.create_time():
                    self._procs[p.pid] = cached = p
                if not self.pss:
                    mem = cached.memory_info().rss
                else:
                    try:
                        mem = cached.memory_full_info().pss
                    except (self.psutil.AccessDenied, AttributeError):
                        mem = cached.memory_info().rss
                        self.rss_fallbacks += 1
                cpu = cached.cpu_times()
                ident = (cached.pid, cached.create_time())
                if self._group.get(ident) not in ("driver", "ray_workers"):  # names change
                    self._group[ident], self._name[ident] = self._classify(cached)
            except self.psutil.Error:  # exited between listing and reading
                continue
            total += mem
            group = self._group[ident]
            by_group[group] = by_group.get(group, 0) + mem
            with self._lock:
                self._cpu_hist.setdefault(ident, []).append((now, cpu.user + cpu.system))
        try:
            shm = shutil.disk_usage("/dev/shm").used
        except OSError:
            shm = 0
        with self._lock:
            self.timeline.append((now, total, shm, thread_cpu))
            self.group_timeline.append((now, by_group))
        return total

    def _classify(self, p) -> tuple[str, str]:
        """driver (the measured process), ray_workers (task/actor processes, named ray::...),
        ray_system (gcs_server, raylet, agents, monitors); a new worker is called python until
        it sets its title, so the group is re-checked until it is a worker."""
        name = p.name()
        if p.pid == self.root.pid:
            return "driver", name
        if name.startswith("ray::") and "Agent" not in name:
            return "ray_workers", name
        return "ray_system", name

    def _loop(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self.sample(time.thread_time() - t0)
        self.thread_cpu_s = time.thread_time() - t0

    def start(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ---- analysis of a time window (epoch seconds), after the measured process exited

    @staticmethod
    def _at(hist: list[tuple[float, float]], t: float) -> float:
        """CPU of one process at time t: linear between samples; 0 before it was first seen
        (a process first seen later started later), its last value after it was last seen."""
        import numpy as np

        if t <= hist[0][0]:
            return 0.0 if t < hist[0][0] - 0.5 else hist[0][1]
        return float(np.interp(t, [h[0] for h in hist], [h[1] for h in hist]))

    def cpu_between(self, t0: float, t1: float) -> dict[tuple[int, float], float]:
        out = {}
        for ident, hist in self._cpu_hist.items():
            if hist[-1][0] < t0:
                continue
            out[ident] = max(0.0, self._at(hist, t1) - self._at(hist, t0))
        return out

    def window(self, t0: float, t1: float, bounds: dict[str, tuple[float, float]]) -> dict:
        """CPU, per-step cores busy, per-group and per-process CPU, memory peak in [t0, t1]."""
        per = self.cpu_between(t0, t1)
        cpu_s = sum(per.values())
        groups: dict[str, float] = {}
        for ident, v in per.items():
            g = self._group.get(ident, "ray_system")
            groups[g] = round(groups.get(g, 0.0) + v, 2)
        procs = sorted(((self._name.get(k, "?"), k[0], round(v, 2)) for k, v in per.items()), key=lambda r: -r[2])
        cores = {}
        for step, (a, b) in bounds.items():
            cores[step] = round(sum(self.cpu_between(a, b).values()) / (b - a), 2) if b - a >= 0.5 else None
        inside = [x for x in self.timeline if t0 - 0.01 <= x[0] <= t1 + self.interval]
        peak = max(inside, key=lambda x: x[1]) if inside else (t0, 0, 0, 0.0)
        peak_step = next(
            (k for k, (a, b) in bounds.items() if a <= peak[0] <= b), "end" if peak[0] > t1 - 0.3 else "other"
        )
        thread = [x[3] for x in inside]
        step = max(1, len(inside) // 300)
        in_groups = [g for t, g in self.group_timeline if t0 - 0.01 <= t <= t1 + self.interval]
        group_peaks = {
            g: round(max((x.get(g, 0) for x in in_groups), default=0) / MiB, 1)
            for g in ("driver", "ray_workers", "ray_system")
        }
        return {
            "mem_peak_mib_by_group": group_peaks,
            "cpu_s": round(cpu_s, 2),
            "cores_busy_per_step": cores,
            "cpu_s_by_process_group": groups,
            "cpu_s_by_process": procs,
            "mem_peak_bytes": peak[1],
            "mem_peak_at_s": round(peak[0] - t0, 1),
            "mem_peak_step": peak_step,
            "shm_peak_mib": round(max((x[2] for x in inside), default=0) / MiB, 1),
            "mem_samples": len(inside),
            "max_processes": len(per),
            "sampler_cpu_s": round(thread[-1] - thread[0], 2) if len(thread) > 1 else 0.0,
            "mem_timeline": [(round(x[0] - t0, 2), round(x[1] / MiB, 1)) for x in inside[::step]],
        }


def system_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) since boot."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)  # guest time is already inside user/nice


def wait_quiet(max_wait: float, threshold: float = 0.25, quiet_for: float = 30.0, probe: float = 3.0) -> dict:
    """Wait until processes outside this benchmark have used < ``threshold`` cores for
    ``quiet_for`` seconds in a row (the machine is shared); give up after ``max_wait`` seconds
    and go on (the result then shows the load)."""
    t0 = time.perf_counter()
    quiet_since, last_log, busy = None, -1e9, 0.0
    while True:
        b0, _ = system_busy()
        time.sleep(probe)
        busy = (system_busy()[0] - b0) / probe
        now = time.perf_counter()
        if busy < threshold:
            quiet_since = quiet_since or now - probe
            if now - quiet_since >= quiet_for:
                return {"load_before_cores": round(busy, 2), "waited_s": round(now - t0, 1), "quiet": True}
        else:
            quiet_since = None
        if now - t0 >= max_wait:
            return {"load_before_cores": round(busy, 2), "waited_s": round(now - t0, 1), "quiet": False}
        if busy >= threshold and now - last_log > 60:
            log(f"machine busy ({busy:.2f} cores used by other processes); waiting ({now - t0:.0f}/{max_wait:.0f} s)")
            last_log = now


CALIBRATE_CODE = """
import time
t = time.perf_counter(); c = time.process_time()
acc = {}
for i in range(5_000_000):
    k = "u" + str(i % 5000)
    acc.setdefault(k, []).append(i)
    if len(acc[k]) > 50:
        acc[k] = sorted(acc[k], reverse=True)[:10]
print(time.perf_counter() - t, time.process_time() - c)
"""


def calibrate_cores() -> dict:
    """How much faster can 2 processes go than 1 on this machine? The same pure-Python
    workload (dicts, lists, string keys, like the per-user rules) runs alone, then as 2
    processes at once; 2 x alone / together is the best speed-up any 2-process engine can get."""

    def run(k: int) -> list[float]:
        procs = [
            subprocess.Popen([sys.executable, "-c", CALIBRATE_CODE], stdout=subprocess.PIPE, text=True)
            for _ in range(k)
        ]
        return [float(p.communicate()[0].split()[0]) for p in procs]

    alone = min(run(1)[0] for _ in range(2))
    together = max(run(2))
    return {
        "one_process_s": round(alone, 2),
        "two_processes_s": round(together, 2),
        "two_process_speedup": round(2 * alone / together, 2),
    }


# ------------------------------------------------------------------------------ child: data


BASE_MAX = 10_000_000  # larger sizes replicate the 10M marketplace with renamed users
SHARD_ROWS = 1_000_000  # interactions per input file


def make_data(n: int, data_dir: Path) -> dict:
    """Write the synthetic marketplace of one size as the input every engine reads: parquet
    shards of ``SHARD_ROWS`` interactions (``interactions/``) and ``items.parquet``. Sizes
    above ``BASE_MAX`` repeat the ``BASE_MAX`` data set with each copy's users renamed
    (``r1:u7``), so the users are distinct and the items and their shares the same."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pagellm.data.synthetic import generate_synthetic

    t = time.perf_counter()
    base = min(n, BASE_MAX)
    ing = generate_synthetic(base, seed=SEED)
    gen_s = time.perf_counter() - t
    shards = data_dir / "interactions"
    shards.mkdir(parents=True, exist_ok=True)
    inter, part = ing.interactions, 0
    for copy in range(-(-n // base)):
        rows = min(base, n - copy * base)
        table = inter.slice(0, rows)
        if copy:
            table = table.set_column(0, "user_id", pc.binary_join_element_wise(f"r{copy}", table["user_id"], ":"))
        for lo in range(0, rows, SHARD_ROWS):
            pq.write_table(table.slice(lo, SHARD_ROWS), shards / f"part-{part:05d}.parquet")
            part += 1
    items = ing.items.select(["item_id", "categories", "title", "brand"]).rename_columns(
        ["item_id", "category", "title", "brand"]
    )
    pq.write_table(items, data_dir / "items.parquet")
    meta = {
        "notes": ing.notes,
        "copies": -(-n // base),
        "generate_s": round(gen_s, 3),
        "interactions": n,
        "files": part,
        "items": items.num_rows,
    }
    (data_dir / "meta.json").write_text(json.dumps(meta, default=str))
    return meta


def data_config(data_dir: Path, extra: tuple = ()):
    """The configuration every engine runs with on the written input."""
    from pagellm.config import load_config

    return load_config(
        overrides=[
            f"data.dataset=parquet:{data_dir / 'interactions'}",
            f"data.items_path={data_dir / 'items.parquet'}",
            "ray.num_cpus=2",
            "ray.include_dashboard=false",
            *extra,
        ]
    )


# ------------------------------------------------------------------------------ child: measure


STEP_ORDER = ("ingest", "split", "item_stats", "build", "write")  # order inside build_dataset


def measure(engine: str, n: int, data_dir: Path, out_dir: Path, mode: str = "time") -> dict:
    """One timed ``build_dataset`` call in this (fresh) process. The parent samples this
    process tree while it runs (mode "time": CPU and RSS; "mem": PSS; "off": nothing); here
    only one baseline sample is taken, right before the timed call, and the times of the
    call and of its steps are recorded for the parent.
    """
    import pyarrow

    from pagellm.config import load_config
    from pagellm.data.stage import build_dataset

    cfg = data_config(data_dir)
    result: dict = {"engine": engine, "size": n}
    if engine in ("ray", "gather"):
        import ray

        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
        result["ray_init_s"] = round(time.perf_counter() - t, 3)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["object_store_mib"] = round(ray.available_resources().get("object_store_memory", 0) / MiB)
        t = time.perf_counter()
        warm_cfg = load_config(overrides=[f"data.dataset=synthetic:{WARMUP_INTERACTIONS}"])
        build_dataset(warm_cfg, out_dir.parent / f"warmup_{engine}_{n}", engine=engine)
        shutil.rmtree(out_dir.parent / f"warmup_{engine}_{n}", ignore_errors=True)
        result["ray_warmup_s"] = round(time.perf_counter() - t, 3)
        log(f"{engine} {n:,}: ray.init {result['ray_init_s']:.1f} s, warm-up {result['ray_warmup_s']:.1f} s (untimed)")

    gc.collect()
    one_shot = TreeSampler(os.getpid(), pss=(mode == "mem"))
    base = one_shot.sample()
    base_shm = one_shot.timeline[-1][2]
    result["processes"] = sorted(one_shot._name.values())
    result["mode"] = mode
    log(
        f"{engine} {n:,} [{mode} pass]: timing build_dataset (baseline {base / MiB:,.0f} MiB "
        f"{'PSS' if mode == 'mem' else 'RSS'}, {len(result['processes'])} processes)"
    )
    sys0, steal0 = system_busy()
    t_start = time.time()
    t = time.perf_counter()
    stats = build_dataset(cfg, out_dir, engine=engine)
    wall = time.perf_counter() - t
    t_end = t_start + wall
    sys1, steal1 = system_busy()

    steps = dict(stats["seconds"])
    # step windows (epoch s) for the parent's per-step CPU; steps run in STEP_ORDER and
    # the gather engine's untimed users fetch sits between build and write
    bounds, t_acc = {}, 0.0
    for k in STEP_ORDER:
        if k == "write":
            t_acc = wall - steps.get("write", 0.0)
        bounds[k] = (t_start + t_acc, t_start + t_acc + steps.get(k, 0.0))
        t_acc += steps.get(k, 0.0)
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
        t_start=t_start,
        t_end=t_end,
        step_bounds=bounds,
        system_busy_cpu_s=round(sys1 - sys0, 2),
        steal_cores=round((steal1 - steal0) / wall, 2),
        mem_kind="PSS" if mode == "mem" else "RSS (sum over processes; shared pages counted repeatedly)",
        mem_baseline_bytes=base,
        mem_baseline_mib=round(base / MiB, 1),
        shm_baseline_mib=round(base_shm / MiB, 1),
        mem_rss_fallbacks=one_shot.rss_fallbacks,
        users_per_block=cfg.data.users_per_block,
        rows_per_partition=cfg.data.rows_per_partition,
        pyarrow=pyarrow.__version__,
    )
    log(f"{engine} {n:,} [{mode} pass]: wall {wall:.1f} s, {result['users_per_s']:,.0f} users/s, steps {steps}")

    if engine in ("ray", "gather"):
        import ray

        result["ray"] = ray.__version__
        ray.shutdown()
    return result


# ------------------------------------------------------------------------------ parent


def run_child(args: list[str], timeout: float, sample: Optional[str] = None) -> tuple[int, str, Optional[TreeSampler]]:
    """Run this script as a child in its own process group, sampled from here when ``sample``
    is "time" (CPU + RSS) or "mem" (CPU + PSS); returns (rc, why, sampler)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    sampler = TreeSampler(proc.pid, 0.2, pss=(sample == "mem")).start() if sample in ("time", "mem") else None
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -1, f"timeout after {timeout:.0f} s (killed)", None
    finally:
        if sampler is not None:
            sampler.stop()
    if rc != 0:
        why = f"exit code {rc}" + (" (SIGKILL: likely out of memory)" if rc == -9 else "")
        try:  # a killed Ray child can leave its raylet etc. in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return rc, why, sampler
    return 0, "", sampler


def add_samples(res: dict, sampler: Optional[TreeSampler]) -> None:
    """Merge what the parent sampled during the child's timed call into its result."""
    if sampler is None:
        res["cores_busy"] = res["foreign_cores_busy"] = None
        return
    t0, t1 = res.pop("t_start"), res.pop("t_end")
    bounds = res.pop("step_bounds")
    w = sampler.window(t0, t1, bounds)
    wall = res["wall_s"]
    peak = max(w.pop("mem_peak_bytes"), res["mem_baseline_bytes"])
    res.update(w)
    res["cores_busy"] = round(w["cpu_s"] / wall, 2)
    # CPU of the machine minus the measured tree minus the sampler thread here
    res["foreign_cores_busy"] = round(max(0.0, res["system_busy_cpu_s"] - w["cpu_s"] - w["sampler_cpu_s"]) / wall, 2)
    res["mem_peak_mib"] = round(peak / MiB, 1)
    res["mem_peak_above_baseline_mib"] = round((peak - res["mem_baseline_bytes"]) / MiB, 1)
    res["mem_rss_fallbacks"] += sampler.rss_fallbacks


def compare_outputs(a: Path, b: Path) -> dict:
    """Do two data directories hold the same tables? (``pagellm.data.stage.difference``)"""
    from pagellm.data.layout import DataDir
    from pagellm.data.stage import difference

    why = difference(DataDir(a), DataDir(b))
    return {"identical": why is None, **({"why": why} if why else {})}


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
        ray_r = entry.get("ray") or {}
        for other in IN_MEMORY:
            r = entry.get(other) or {}
            if "wall_s" in ray_r and "wall_s" in r:
                entry[f"speed_ratio_ray_over_{other}"] = round(r["wall_s"] / ray_r["wall_s"], 2)
    # the driver's peak memory against the data size: the slope of a least-squares line
    for engine in ENGINES:
        points = [
            (int(size), e[engine]["mem_peak_mib_by_group"]["driver"])
            for size, e in results["sizes"].items()
            if "mem_peak_mib_by_group" in (e.get(engine) or {})
        ]
        if len(points) >= 2:
            import numpy as np

            x, y = np.array(points, dtype=float).T
            slope = float(np.polyfit(x / 1e6, y, 1)[0])
            results.setdefault("driver_peak_slope_mib_per_million", {})[engine] = round(slope, 2)


STEP_NAMES = ("split", "item_stats", "build", "write")


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for size, entry in results["sizes"].items():
        ratio = entry.get("speed_ratio_ray_over_local")
        for engine in ENGINES:
            if engine in entry.get("skipped", {}):
                rows.append([fmt_size(int(size)), engine, "skipped: " + entry["skipped"][engine]] + [""] * 14)
                continue
            r = entry.get(engine)
            if r is None:
                continue
            if "wall_s" not in r:
                rows.append([fmt_size(int(size)), engine, f"FAILED: {r.get('error', '?')}"] + [""] * 14)
                continue
            s = r["seconds"]
            rows.append(
                [
                    fmt_size(int(size)),
                    engine,
                    f"{r['wall_s']:.1f}",
                    f"{r['users_per_s']:,.0f}",
                    f"{r['pairs_per_s']:,.0f}",
                    *(f"{s.get(k, 0):.1f}" for k in STEP_NAMES),
                    f"{max(r['other_s'], 0.0):.1f}",
                    *("n/a" if r.get(k) is None else f"{r[k]:.2f}" for k in ("cores_busy", "foreign_cores_busy")),
                    *(
                        (
                            f"{r['mem_peak_above_baseline_mib']:,.0f}",
                            f"{r['mem_peak_mib']:,.0f}",
                            f"{r['mem_peak_mib_by_group']['driver']:,.0f}",
                            f"{r['mem_peak_mib_by_group']['ray_workers']:,.0f}",
                        )
                        if r.get("mem_kind") == "PSS"
                        else ("n/a",) * 4
                    ),
                    f"{ratio:.2f}x" if (ratio and engine == "ray") else "",
                ]
            )
    return rows


HEADER = [
    "size",
    "engine",
    "wall s",
    "users/s",
    "pairs/s",
    "split s",
    "item_stats s",
    "build s",
    "write s",
    "other s",
    "cores busy",
    "other procs cores",
    "peak MiB above base",
    "peak MiB abs",
    "driver peak MiB",
    "workers peak MiB",
    "ray/local",
]


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
        f"Ray {m['ray']}, pyarrow {m['pyarrow']}; started {results['started']}.  ",
        f"Calibration (same pure-Python work in 1 vs 2 processes): {m.get('calibration')}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    out += [
        "",
        "ray = the streaming engine, gather = the earlier Ray engine (tables on the driver), "
        "local = one process. ray/local = local wall s / ray wall s. Times and cores busy from the timing pass; "
        "peak memory (PSS of the process tree) from the separate memory pass "
        "(see the bench/data_pipeline.py docstring).",
    ]
    for size, entry in results["sizes"].items():
        for key, value in entry.items():
            if key.startswith("outputs_identical"):
                out.append(f"- {fmt_size(int(size))}: {key.replace('_', ' ')}: {value}")
    for engine, slope in results.get("driver_peak_slope_mib_per_million", {}).items():
        out.append(f"- driver peak memory slope, {engine}: {slope} MiB per million interactions")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    """Kept users/s per size and engine (left) and the driver's peak memory (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = [s for s, e in results["sizes"].items() if any("wall_s" in (e.get(k) or {}) for k in ENGINES)]
    if not sizes:
        return
    x = np.arange(len(sizes))
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = {"ray": "#1f77b4", "gather": "#2ca02c", "local": "#ff7f0e"}
    labels = {"ray": "ray: streaming (2 CPUs)", "gather": "gather: tables on the driver", "local": "local (1 process)"}
    for i, engine in enumerate(ENGINES):
        runs = [results["sizes"][s].get(engine) or {} for s in sizes]
        vals = [r.get("users_per_s", 0) for r in runs]
        bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=labels[engine], color=colors[engine])
        text = [
            f"{v:,.0f}" if "wall_s" in r else ("skipped" if engine in IN_MEMORY else "") for v, r in zip(vals, runs)
        ]
        ax.bar_label(bars, labels=text, fontsize=8, padding=2)
        driver = [
            (int(s), r["mem_peak_mib_by_group"]["driver"]) for s, r in zip(sizes, runs) if "mem_peak_mib_by_group" in r
        ]
        if driver:
            mem.plot(
                [d[0] / 1e6 for d in driver], [d[1] for d in driver], "o-", color=colors[engine], label=labels[engine]
            )
    ax.set_xticks(x, [f"{fmt_size(int(s))} interactions" for s in sizes])
    ax.set_ylabel("kept users / s (higher is better)")
    ymax = max((results["sizes"][s].get(e) or {}).get("users_per_s", 0) for s in sizes for e in ENGINES)
    ax.set_ylim(0, ymax * 1.3)
    m = results["machine"]
    ax.set_title(
        f"build_dataset throughput, {m['cpus']} CPUs / {m['memory_gib']:.0f} GiB (Ray {m['ray']})", fontsize=10
    )
    ax.legend(loc="upper left", fontsize=8)
    mem.set_xlabel("interactions (millions)")
    mem.set_ylabel("driver peak memory, MiB (PSS)")
    slopes = results.get("driver_peak_slope_mib_per_million", {})
    mem.set_title("driver peak memory; slope: " + ", ".join(f"{e} {v:g} MiB/M" for e, v in slopes.items()), fontsize=9)
    mem.axhline(1024, color="grey", linestyle="--", linewidth=1)
    mem.text(0.5, 1060, "1 GiB", fontsize=8, color="grey")
    mem.legend(loc="upper left", fontsize=8)
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
    passes = {"two": ["time", "mem"], "one": ["mem"], "time": ["time"], "off": ["off"]}[ns.passes]
    results = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "method": "fresh process per (size, engine, pass); see bench/data_pipeline.py docstring",
        "passes": passes,
        "sizes": {},
    }
    log(f"sizes {sizes}, engines {ns.engines}, out {out}")
    if ns.wait_idle > 0:
        wait_quiet(ns.wait_idle)
    results["machine"]["calibration"] = calibrate_cores()
    log(f"calibration (pure-Python work, 1 vs 2 processes): {results['machine']['calibration']}")
    for n in sizes:
        entry = results["sizes"].setdefault(str(n), {})
        data_dir = work / f"data_{n}"
        log(f"--- {n:,} interactions: generating synthetic data (untimed)")
        rc, why, _ = run_child(["--make-data", str(n), "--data", str(data_dir)], ns.timeout)
        if rc != 0:
            entry["error"] = f"data generation failed: {why}"
            log(entry["error"])
            save(results, out)
            continue
        entry["data"] = json.loads((data_dir / "meta.json").read_text())
        for engine in ns.engines:
            if engine in IN_MEMORY and n > ns.in_memory_max:
                entry.setdefault("skipped", {})[engine] = (
                    f"above --in-memory-max {ns.in_memory_max:,}: the whole table in one process "
                    "(see the driver peak slope)"
                )
                log(f"{engine} {n:,}: {entry['skipped'][engine]}")
                continue
            for mode in passes:
                json_path = work / f"{engine}_{n}_{mode}.json"
                json_path.unlink(missing_ok=True)
                run_out = work / (f"run_{engine}_{n}" if mode == passes[0] else f"run_{engine}_{n}_{mode}")
                shutil.rmtree(run_out, ignore_errors=True)
                quiet = wait_quiet(ns.wait_idle) if ns.wait_idle > 0 else {}
                t = time.perf_counter()
                rc, why, sampler = run_child(
                    [
                        "--engine",
                        engine,
                        "--size",
                        str(n),
                        "--data",
                        str(data_dir),
                        "--mode",
                        mode,
                        "--run-out",
                        str(run_out),
                        "--json",
                        str(json_path),
                    ],
                    ns.timeout,
                    sample=mode,
                )
                if mode != passes[0]:
                    shutil.rmtree(run_out, ignore_errors=True)
                if rc == 0 and json_path.exists():
                    res = json.loads(json_path.read_text())
                    add_samples(res, sampler)
                    res.update(quiet)
                    log(
                        f"{engine} {n:,} [{mode} pass]: cores busy {res['cores_busy']}, other processes "
                        f"{res['foreign_cores_busy']} cores, peak +{res.get('mem_peak_above_baseline_mib', 0):,.0f} MiB "
                        f"(abs {res.get('mem_peak_mib', 0):,.0f} MiB, {'PSS' if mode == 'mem' else 'RSS'})"
                    )
                else:
                    res = {
                        "error": why or "no result written",
                        "seconds_until_failure": round(time.perf_counter() - t, 1),
                    }
                    log(f"{engine} {n:,} [{mode} pass]: FAILED: {res['error']}")
                if mode == passes[0]:
                    entry[engine] = res
                else:  # the memory pass: its memory fields replace the timing pass's RSS ones
                    entry[engine]["mem_pass"] = res
                    if "wall_s" in res and "wall_s" in entry[engine]:
                        entry[engine].update({k: v for k, v in res.items() if k.startswith(("mem_", "shm_"))})
                        entry[engine]["mem_pass_wall_s"] = res["wall_s"]
                    else:
                        entry[engine]["memory_error"] = res.get("error", "timing pass failed")
                save(results, out)
        for other in IN_MEMORY:
            if all("wall_s" in entry.get(e, {}) for e in ("ray", other)):
                log(f"{n:,}: comparing the ray and {other} engines' outputs")
                cmp = compare_outputs(work / f"run_ray_{n}", work / f"run_{other}_{n}")
                entry[f"outputs_identical_ray_vs_{other}"] = cmp["identical"]
                entry[f"outputs_compare_ray_vs_{other}"] = cmp
                log(f"{n:,}: {cmp}")
        if not ns.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
            for engine in ENGINES:
                shutil.rmtree(work / f"run_{engine}_{n}", ignore_errors=True)
                for mode in passes:
                    (work / f"{engine}_{n}_{mode}.json").unlink(missing_ok=True)
        save(results, out)
        print(render_text(results), flush=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save(results, out)
    print()
    print(render_text(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'throughput.png'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="interaction counts")
    ap.add_argument("--quick", action="store_true", help="100k only (smoke check)")
    ap.add_argument("--out", default=str(REPO / "bench/out/data_pipeline"))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per child process")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=900.0,
        help="before each measurement wait up to this many seconds until other processes "
        "have used < 0.25 cores for 30 s (0: do not wait); the load during a run is always recorded",
    )
    ap.add_argument("--keep", action="store_true", help="keep generated data and outputs under OUT/work")
    ap.add_argument(
        "--in-memory-max",
        type=int,
        default=10_000_000,
        help="largest size the gather and local engines run at (they hold the whole table in one "
        "process: ~0.4 GiB per million interactions)",
    )
    ap.add_argument(
        "--passes",
        choices=["two", "one", "time", "off"],
        default="two",
        help="two: a timing pass (cheap CPU/RSS sampler) then a memory pass (PSS sampler), "
        "each in a fresh process (default); one: only the PSS pass, timings taken from it; "
        "time: timing pass only (no PSS); off: no sampler thread at all (overhead check)",
    )
    # child modes (used by the parent)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run-out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["time", "mem", "off"], default="time", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    if ns.make_data:
        meta = make_data(ns.make_data, Path(ns.data))
        log(f"generated {meta['interactions']:,} interactions, {meta['items']:,} items in {meta['generate_s']:.1f} s")
        return 0
    if ns.engine:
        result = measure(ns.engine, ns.size, Path(ns.data), Path(ns.run_out), mode=ns.mode)
        Path(ns.json).write_text(json.dumps(result, indent=2, default=str))
        return 0
    return parent(ns)


if __name__ == "__main__":
    sys.exit(main())
