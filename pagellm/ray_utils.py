"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from pagellm.config import RayConfig

VERBOSE_ENV = "PAGELLM_VERBOSE"  # set by `pagellm -v`: every library's own console output kept


def verbose_console() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """The console without library chatter unless ``-v``: transformers' weight-loading bars and
    infos (a ``from_pretrained`` prints one per load). Set through the libraries' own environment
    variables, read when they are imported: nothing is imported here (this runs at every command's
    start), and a local Ray's workers inherit them. Ray's own: ``init_ray``."""
    if verbose_console():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def copy_ray_logs(dest: Path) -> Optional[Path]:
    """Every Ray process's log files of this session (what the quiet console leaves out: the
    training workers' and role actors' output) copied to ``dest``; None when Ray is not up or
    keeps them elsewhere (a remote head: its dashboard has them)."""
    try:
        import ray._private.worker as ray_worker

        source = Path(ray_worker._global_node.get_logs_dir_path())
    except Exception:  # no local node (Ray not started, or a Ray without this accessor)
        return None
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True)
    return dest


def init_ray(ray_cfg: RayConfig) -> None:
    """Join the cluster when one is given (``ray job submit`` sets RAY_ADDRESS; RAY_ADDRESS=auto
    joins a `ray start` cluster of this machine), else start a new local Ray with the configured
    CPUs: never attach by surprise to another Ray running here (``address="local"``; a plain
    ``ray.init()`` would join the latest `ray start` cluster of the machine). A no-op when Ray
    is already up (tests, notebooks). Without ``-v`` Ray logs at WARNING and keeps the workers'
    output in its log files (``copy_ray_logs``)."""
    import ray

    if ray.is_initialized():
        return
    # the console keeps PageLLM's lines: workers' output stays in Ray's log files (-v: forwarded)
    quiet = {} if verbose_console() else {"log_to_driver": False, "logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard, **quiet)
    if quiet:  # Ray Data logs each execution's plan and, off a terminal, its progress as INFO text
        import ray.data  # noqa: F401  (configures the ray.data logger, which is then turned down)

        logging.getLogger("ray.data").setLevel(logging.WARNING)
