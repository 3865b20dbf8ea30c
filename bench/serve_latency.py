"""Latency and throughput of `POST /v1/page` (K = 10) over real HTTP, at several concurrencies.

    OMP_NUM_THREADS=1 python bench/serve_latency.py --policy SFT_DIR --data DATA_DIR \
        [--page-modes score generate] [--topologies colocated split] [--concurrency 1 8 32] \
        [--requests 400] [--replicas 1] [--max-batch 16] [--batch-wait-ms 0] [--direct-ingress]

For every page mode (eval.page_mode) and topology (``colocated``: the policy inside the router's
replica, AppArgs.colocate; ``split``: a policy deployment behind the router) it starts the Serve
application of `pagellm serve` (one arm) on a local Ray, warms it up, then for each concurrency
runs that many client threads, each with its own HTTP session, until ``--requests`` requests are
answered, with user ids cycling over the data's users (the cached history path of production).
With ``--direct-ingress`` (Ray Serve's ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) every deployment is
also timed with the clients calling the router replica's own HTTP port, without the proxy.
Side by side, the same pages written by the model directly in this process (``Policy.write_tokens``
as a replica calls it; no HTTP, no Serve, batch of one) give the floor that serving adds to.
Prints a Markdown table and writes bench/out/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_clients(url: str, users: list[str], concurrency: int, total: int, k: int, route: str = "page") -> dict:
    """``route`` page: POST /v1/page; healthz: GET /healthz, answered by the router alone (HTTP,
    proxy and router: the floor under a page without the model)."""
    latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(total))

    def client():
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            if route == "healthz":
                r = session.get(f"{url}/healthz", timeout=120)
            else:
                r = session.post(f"{url}/v1/page", json={"user_id": users[i % len(users)], "k": k}, timeout=120)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                (latencies if r.status_code == 200 else errors).append(
                    elapsed if r.status_code == 200 else r.status_code
                )

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "route": route,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.mean(latencies),
    }


def direct_floor(
    policy: str,
    data: str,
    users: list[str],
    k: int,
    n: int,
    page_mode: str = "score",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 1,
) -> dict:
    """The same K-item pages, ``batch`` users at a time, in this process (``Policy.write_tokens``
    in ``page_mode``, as a replica writes them): model time alone (no HTTP, no Serve), on
    ``device`` in ``dtype``."""
    import torch

    from pagellm.config import EvalConfig
    from pagellm.model.artifact import load_policy
    from pagellm.serve.api import ServingData

    torch.set_num_threads(1)
    loaded = load_policy(policy, device)
    loaded.model.to(getattr(torch, dtype))
    cache, pages = ServingData.load(data), EvalConfig(page_mode=page_mode)
    times = []
    for i in range(n + 5):
        group = [users[(i * batch + j) % len(users)] for j in range(batch)]
        started = time.perf_counter()
        histories = [cache.user_history(u, None) for u in group]
        loaded.write_tokens(group, histories, [cache.seen.get(u, ()) for u in group], k, pages)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - started) * 1000)
    return {
        "page_mode": page_mode,
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "pages_per_s": batch * 1000 / statistics.mean(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--page-modes", nargs="+", default=["score", "generate"], help="eval.page_mode values")
    parser.add_argument("--topologies", nargs="+", default=["colocated", "split"], choices=("colocated", "split"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="answered requests per concurrency level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--policy-cpus", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="start Ray with Serve's direct ingress and also time requests sent straight to the router replica",
    )
    parser.add_argument("--out", default="bench/out/serve_latency.json")
    parser.add_argument(
        "--only", choices=("direct",), help="direct: only the in-process model timing (no Ray; e.g. a GPU machine)"
    )
    parser.add_argument("--device", default="cpu", help="direct timing device (cuda on a GPU)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="direct timing dtypes, e.g. float32 bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="direct timing batch sizes")
    args = parser.parse_args()
    from pagellm.serve.api import ServingData

    users = list(ServingData.load(args.data).history)
    if args.only == "direct":
        rows = [
            direct_floor(args.policy, args.data, users, args.k, 200, m, args.device, d, b)
            for m in args.page_modes
            for d in args.dtype
            for b in args.batch
        ]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"k": args.k, "direct": rows, "command": " ".join(sys.argv)}, indent=2) + "\n"
        )
        print("| page mode | device | dtype | batch | p50 ms | p99 ms | pages/s |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['page_mode']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['p50_ms']:.2f} "
                f"| {r['p99_ms']:.2f} | {r['pages_per_s']:.0f} |"
            )
        return

    import ray
    from ray import serve

    from pagellm.serve.app import DIRECT_INGRESS_ENV, AppArgs, build_app, direct_ingress_targets

    floors = {m: direct_floor(args.policy, args.data, users, args.k, 200, m) for m in args.page_modes}
    if args.direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"  # before Ray starts: its Serve processes read it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    proxy = f"http://127.0.0.1:{args.port}"
    rows = []
    for mode in args.page_modes:
        for topology in args.topologies:
            app = build_app(
                AppArgs(
                    arms={"A": args.policy},
                    data=args.data,
                    page_mode=mode,
                    colocate=topology == "colocated",
                    policy_replicas=args.replicas,
                    policy_cpus=args.policy_cpus,
                    max_batch_size=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms,
                )
            )
            serve.run(app, name="pagellm", route_prefix="/", blocking=False)
            # through the proxy; with direct ingress also straight to the (first) router replica
            urls = {"proxy": proxy}
            if args.direct_ingress:
                urls["direct"] = f"http://127.0.0.1:{direct_ingress_targets('pagellm')[0][1]}"
            for via, url in urls.items():
                run_clients(url, users, 4, 100, args.k)  # warm-up
                for c in args.concurrency:
                    rows.append(
                        {"page_mode": mode, "topology": topology, "via": via}
                        | run_clients(url, users, c, args.requests, args.k)
                    )
                health = run_clients(url, users, 1, args.requests, args.k, route="healthz")
                rows.append({"page_mode": mode, "topology": topology, "via": via} | health)
            serve.delete("pagellm")
    serve.shutdown()
    ray.shutdown()

    result = {
        "k": args.k,
        "replicas": args.replicas,
        "policy_cpus": args.policy_cpus,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "direct_single_process": floors,
        "http": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for mode, floor in floors.items():
        print(
            f"direct {mode} (one process, no HTTP, batch 1): p50 {floor['p50_ms']:.1f} ms, "
            f"p99 {floor['p99_ms']:.1f} ms, {floor['pages_per_s']:.0f} pages/s"
        )
    print("| page mode | topology | via | route | concurrency | requests | errors | req/s | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['page_mode']} | {r['topology']} | {r['via']} | {r['route']} | {r['concurrency']} | {r['requests']} | {r['errors']} "
            f"| {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
