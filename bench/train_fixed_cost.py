"""Ray Train's fixed cost per fit: an empty ``TorchTrainer.fit`` with and without the
placement-group cleaner, side by side in one Ray session.

Exact command (repository root, venv active):

    OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled python bench/train_fixed_cost.py

Options: ``--repeats N`` (default 3, alternating the two trainers), ``--out DIR`` (default
bench/out/train_fixed_cost). Writes OUT/results.json and prints one line per fit.

Method: ``ray.init(address="local", num_cpus=2, include_dashboard=False)``, as a local
``pagellm`` stage starts Ray. Each fit runs one worker (1 CPU) whose loop returns at once, so the
wall time is all controller, worker-group and shutdown cost. "with cleaner" is Ray's
``TorchTrainer``; "without" is ``pagellm.train.loop.trainer_class()``, which leaves the cleaner
out when the cluster has no dashboard (docs/training.md). One untimed warm-up fit comes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def empty_loop(config: dict) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out/train_fixed_cost"))
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pagellm.train.loop import dashboard_up, trainer_class

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    trainers = {"with cleaner (Ray's TorchTrainer)": TorchTrainer, "without (trainer_class())": trainer_class()}
    storage = tempfile.mkdtemp(prefix="fixed_cost_")

    def one_fit(cls, name: str) -> float:
        start = time.perf_counter()
        cls(
            empty_loop,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(storage_path=storage, name=name),
        ).fit()
        return time.perf_counter() - start

    one_fit(TorchTrainer, "warmup")
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.repeats):
        for name, cls in trainers.items():
            seconds[name].append(one_fit(cls, f"r{r}_{len(seconds[name])}_{cls.__name__}"))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    results = {
        "command": "OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled python bench/train_fixed_cost.py",
        "ray": ray.__version__,
        "dashboard": dashboard_up(),
        "seconds": seconds,
        "median": {name: statistics.median(s) for name, s in seconds.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["median"]))


if __name__ == "__main__":
    main()
