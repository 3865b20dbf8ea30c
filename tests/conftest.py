"""Shared fixtures: one local Ray for the whole session, real data paths, quiet threads."""

from __future__ import annotations

import os
import socket
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.bpe_vocab_size=300", "model.max_seq_len=256"]
TINY_STAGES = [
    "data.dataset=synthetic:4000",
    # one Ray Train worker: the stages' fits are start-up bound at this size (reward 61 s vs 103 s with
    # two); two ranks and DeepSpeed's shard merge are covered by test_train.py
    "train.num_workers=1",
    *TINY,
    "sft.meta_epochs=1",
    "sft.ft_epochs=2",
    "sft.next_item_epochs=2",
    "reward.epochs=1",
    "sft.meta_lr=1e-3",
    "sft.ft_lr=1e-3",
    "reward.lr=1e-3",
    "data.extra_ft_fractions=[0.3]",
    "sft.unlikelihood_weight=1.0",
    # the non-default fine pooling and policy-sampled pairs, through the real reward stage and
    # PPO's fine-reward actor
    "reward.fine_pooling=dcg",
    "reward.policy_pairs=true",
    "reward.agreement_users=40",  # the reward-NDCG agreement on a few users: CI time
]


@pytest.fixture(scope="session")
def tiny_stages(ray_session, tmp_path_factory):
    """Data, SFT and reward stages of a tiny model on synthetic data, built once per session
    with the real stage functions (Ray Train + DeepSpeed); later stages' tests start from it."""
    from pagellm.config import load_config
    from pagellm.data.stage import build_dataset
    from pagellm.train.reward import run_reward
    from pagellm.train.sft import run_sft

    root = tmp_path_factory.mktemp("tiny_stages")
    cfg = load_config(overrides=TINY_STAGES)
    build_dataset(cfg, root / "data", engine="local")
    sft = run_sft(cfg, root / "data", root / "sft")
    reward = run_reward(cfg, root / "data", root / "sft", root / "reward")
    return {"root": root, "cfg": cfg, "overrides": TINY_STAGES, "sft": sft, "reward": reward}


def free_port() -> int:
    """A TCP port nobody listens on now (for HTTP servers and Ray heads the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
