"""One PPO iteration with separate Ray actors per role vs the same loop in one process.

    OMP_NUM_THREADS=1 python bench/ppo_iteration.py --data DATA --sft SFT --reward REWARD \
        [--iterations 5] [--config FILE] [key=value ...]

Both sides run ``pagellm.rl.ppo.ppo_iteration`` on the same prompts and seeds: ``RayRoles`` (five
actors in a placement group, DeepSpeed for policy and critic) and ``LocalRoles`` (the five role
objects in this process sharing one world-1 process group, DeepSpeed likewise).
``--only single_process`` skips Ray (e.g. on a machine without it).
Prints a Markdown table (median over the measured iterations after one warm-up) and writes
bench/out/ppo_iteration.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pagellm.config import load_config  # noqa: E402
from pagellm.rl.ppo import batch_indices, ppo_iteration, role_specs, rollout_setup, start_roles  # noqa: E402
from pagellm.rl.ppo_math import KLController, RunningMeanStd  # noqa: E402

KEYS = ("pages_per_s", "time_iteration", "time_generate", "time_score", "time_advantage", "time_train", "time_sync")


def measure(cfg, args, local: bool) -> dict:
    sft, reward = Path(args.sft).resolve(), Path(args.reward).resolve()
    ppo = cfg.ppo
    codec, constraint, prompts = rollout_setup(cfg, sft, Path(args.data))
    prompts = prompts.train
    started = time.perf_counter()
    roles = start_roles(cfg, role_specs(cfg, sft, reward, constraint, codec.vocab.pad_id), local)
    start_s = time.perf_counter() - started
    records = []
    try:
        for it in range(args.iterations + 1):
            idx = batch_indices(len(prompts), ppo.batch_size, it, ppo.seed)
            rec = ppo_iteration(
                roles,
                cfg,
                [prompts[i] for i in idx],
                it,
                RunningMeanStd(),
                KLController(ppo.kl_beta),
                codec.vocab.pad_id,
            )
            if it > 0:  # the first iteration warms caches and DeepSpeed
                records.append(rec)
    finally:
        roles.shutdown()
    out = {k: statistics.median(r[k] for r in records) for k in KEYS}
    out["start_seconds"] = start_s
    out["page_items"] = statistics.mean(r["page_items"] for r in records)
    for key in ("policy_loss", "value_loss", "kl", "entropy", "reward_total"):  # sanity: finite numbers
        out[key] = statistics.mean(r[key] for r in records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--config", action="append")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "ppo_iteration.json"))
    parser.add_argument("--only", choices=("ray_actors", "single_process"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    results = {}
    if args.only != "single_process":
        from pagellm.ray_utils import init_ray

        init_ray(cfg.ray)
        results["ray_actors"] = measure(cfg, args, local=False)
    if args.only != "ray_actors":
        results["single_process"] = measure(cfg, args, local=True)
    if len(results) == 2:
        results["ratio_pages_per_s"] = results["ray_actors"]["pages_per_s"] / results["single_process"]["pages_per_s"]
    results["setup"] = {
        "batch_size": cfg.ppo.batch_size,
        "minibatch_size": cfg.ppo.minibatch_size,
        "iterations": args.iterations,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})",
        "roles": {r: vars(getattr(cfg.ppo, r)) for r in ("policy", "reference", "critic", "coarse", "fine")},
        "deepspeed": cfg.train.deepspeed,
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| loop | pages/s | iteration s | generate | score | advantage | train | sync | start s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("ray_actors", "single_process"):
        if name not in results:
            continue
        r = results[name]
        print(
            f"| {name} | {r['pages_per_s']:.1f} | {r['time_iteration']:.3f} | {r['time_generate']:.3f} | {r['time_score']:.3f} | "
            f"{r['time_advantage']:.3f} | {r['time_train']:.3f} | {r['time_sync']:.3f} | {r['start_seconds']:.1f} |"
        )
    if "ratio_pages_per_s" in results:
        print(f"\nray / single-process pages/s: {results['ratio_pages_per_s']:.2f}x")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
