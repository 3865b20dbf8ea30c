"""Shared fixtures: one local Ray for the whole session, real data paths, quiet threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
AMAZON = SHARED_DATA / "amazon2014-musical-instruments"
MOVIELENS = SHARED_DATA / "movielens-latest-small"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
