"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import os

from pagellm.config import RayConfig

VERBOSE_ENV = "PAGELLM_VERBOSE"  # set by `pagellm -v`: every library's own console output kept


def verbose_console() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def init_ray(ray_cfg: RayConfig) -> None:
    """Join the cluster when one is given (``ray job submit`` sets RAY_ADDRESS; RAY_ADDRESS=auto
    joins a `ray start` cluster of this machine), else start a new local Ray with the configured
    CPUs: never attach by surprise to another Ray running here (``address="local"``; a plain
    ``ray.init()`` would join the latest `ray start` cluster of the machine). A no-op when Ray
    is already up (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard)
