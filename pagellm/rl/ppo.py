"""PPO stage (paper 4.5, Algorithm 1 lines 7-12): the driver of the role actors.

One driver (single controller) runs every iteration:
  1. generate    the policy writes a page per prompt under the page constraint (sampling)
  2. score       in parallel: policy and reference log-probabilities, critic values, R_c, R_f
  3. advantages  R = w_c R_c + w_f R_f (eq. 15), normalised by running statistics, placed on the
                 last token (terminal) or per item (dense); per-token KL penalty beta against
                 the reference; GAE with gamma = 1
  4. train       policy (clipped surrogate) and critic (clipped value loss) in parallel
Every ``eval_every`` iterations it reports validation NDCG@100 (greedy constrained pages) and
the reward of pages for held-out prompts; every ``checkpoint_every`` it saves the policy, the
critic, their optimizer states, the normaliser, the KL controller and the iteration, and
``--resume`` continues from there. PPO_DIR/policy is the final policy (``from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from pagellm.config import PageLLMConfig
from pagellm.errors import InputError
from pagellm.eval.metrics import ndcg_at_k, recall_at_k
from pagellm.model.prompts import PromptCodec
from pagellm.model.vocab import Vocab
from pagellm.model.decoding import PageConstraint, Pages
from pagellm.rl.groups import LocalRoles, RayRoles, merge, shard_rows, slice_batch
from pagellm.rl.ppo_math import KLController, RunningMeanStd, gae, kl_per_token, masked_whiten, token_rewards
from pagellm.rl.workers import CriticWorker, PolicyWorker, RewardWorker, to_pages

log = logging.getLogger(__name__)
CHECKPOINTS, STATE_FILE, METRICS_FILE, EVENTS_FILE = "checkpoints", "state.json", "metrics.jsonl", "events.jsonl"


# ------------------------------------------------------------------------------ prompts


def load_prompts(data_dir: Path, codec: PromptCodec, holdout: float) -> dict:
    """Rollout prompts: each validation user's training history (the prompt evaluation uses);
    a hash-chosen share of users is held out of rollouts and only monitors the reward."""
    path = Path(data_dir) / "eval" / "val.parquet"
    if not path.exists():
        raise InputError(f"{data_dir} is not a data-stage output (missing eval/val.parquet); run `pagellm data` first")
    val = pq.read_table(path).to_pandas()
    prompts = [codec.prompt(u, list(p)) for u, p in zip(val.user_id, val.prompt_items)]
    held = held_out(val.user_id, holdout)
    return {
        "train": [p for p, h in zip(prompts, held) if not h],
        "holdout": [p for p, h in zip(prompts, held) if h],
        "val": prompts,
        "val_targets": [list(t) for t in val.target],
    }


def held_out(user_ids, fraction: float) -> np.ndarray:
    """Users whose prompts only monitor the reward: a stable hash, the same in every process."""
    return np.array([zlib.crc32(f"ppo:{u}".encode()) % 10_000 < fraction * 10_000 for u in user_ids], dtype=bool)


def planned_iterations(ppo, data_dir) -> int:
    """Iterations a run makes: ``max_iterations``, else ``epochs`` passes over the rollout prompts."""
    if ppo.max_iterations is not None:
        return ppo.max_iterations
    users = pq.read_table(Path(data_dir) / "eval" / "val.parquet", columns=["user_id"]).column("user_id").to_pylist()
    return ppo.epochs * math.ceil(int((~held_out(users, ppo.holdout_fraction)).sum()) / ppo.batch_size)


def rollout_setup(ppo, sft_dir: Path, data_dir: Path):
    """The reference policy's tokenizer, its prompt codec, the page constraint of rollouts and
    the prompts (``load_prompts``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    codec = PromptCodec(Vocab.from_tokenizer(tokenizer))
    lo, hi = codec.vocab.item_id_range
    constraint = PageConstraint(lo, hi - lo, codec.vocab.eos_id, ppo.page_min_items, ppo.page_max_items, ppo.exclude_history)
    return tokenizer, codec, constraint, load_prompts(Path(data_dir), codec, ppo.holdout_fraction)


def batch_indices(n: int, batch: int, iteration: int, seed: int) -> np.ndarray:
    """Prompts of one iteration: epochs are seeded permutations, so the order depends only on
    (seed, iteration) and a resumed run draws exactly the batches it would have drawn."""
    per_epoch = math.ceil(n / batch)
    epoch, b = divmod(iteration, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = perm[b * batch : (b + 1) * batch]
    return np.concatenate([idx, perm[: batch - len(idx)]]) if len(idx) < batch else idx


# -------------------------------------------------------------------------------- roles


def role_specs(cfg: PageLLMConfig, sft_dir: Path, reward_dir: Path, constraint: PageConstraint, pad_id: int) -> dict:
    ppo, train = cfg.ppo, cfg.train

    def common(role: str, rank: int, world: int) -> dict:
        r = getattr(ppo, role)
        return {"ppo": ppo, "train": train, "num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "rank": rank, "world": world}

    return {
        "policy": (PolicyWorker, lambda rank, world: {"model_dir": str(sft_dir), "constraint": constraint, "pad_id": pad_id, "trainable": True, **common("policy", rank, world)}),
        "reference": (PolicyWorker, lambda rank, world: {"model_dir": str(sft_dir), "constraint": constraint, "pad_id": pad_id, "trainable": False, **common("reference", rank, world)}),
        "critic": (CriticWorker, lambda rank, world: {"coarse_dir": str(reward_dir / "coarse"), "pad_id": pad_id, **common("critic", rank, world)}),
        "coarse": (RewardWorker, lambda rank, world: {"reward_dir": str(reward_dir / "coarse"), "pad_id": pad_id, "eos_id": constraint.eos_id, **common("coarse", rank, world)}),
        "fine": (RewardWorker, lambda rank, world: {"reward_dir": str(reward_dir / "fine"), "pad_id": pad_id, "eos_id": constraint.eos_id, **common("fine", rank, world)}),
    }


def start_roles(cfg: PageLLMConfig, specs: dict, local: bool, placement_group=None, first_bundle: int = 0):
    roles = LocalRoles(specs, cfg.ppo) if local else RayRoles(specs, cfg.ppo, placement_group, first_bundle)
    for role in ("policy", "critic"):
        world = roles.world(role)
        # DeepSpeed needs a process group even for one worker; in one process the roles share it
        needs_group = world > 1 or cfg.train.deepspeed
        address = roles.collect(roles.submit(role, "free_address", [()]))[0] if needs_group else None
        roles.collect(roles.submit(role, "init_training", [(address,)] * world))
    return roles


def on_shards(roles, role: str, method: str, prompts: list, batch: dict) -> list:
    parts = shard_rows(len(prompts), roles.world(role))
    return roles.submit(role, method, [slice_batch(prompts, batch, p) for p in parts])


def generate(roles, prompts: list, greedy: bool, seed: int, max_items=None, min_items=None) -> dict:
    parts = shard_rows(len(prompts), roles.world("policy"))
    pending = roles.submit("policy", "generate", [(prompts[p], greedy, seed + 7919 * i, max_items, min_items) for i, p in enumerate(parts)])
    return Pages.concat([to_pages(p) for p in roles.collect(pending)], pad_id=0).as_dict()


# ---------------------------------------------------------------------------- iteration


def page_reward(ppo, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    wc = ppo.coarse_weight if ppo.rewards in ("both", "coarse") else 0.0
    wf = ppo.fine_weight if ppo.rewards in ("both", "fine") else 0.0
    return wc * coarse + wf * fine


def place_rewards(ppo, scores: dict, mask: torch.Tensor, normalizer: RunningMeanStd) -> torch.Tensor:
    """Task reward per step [B, T]: terminal puts the normalised R on the last step; dense puts
    each item's weighted fine score on its step and the rest of R on the last step."""
    total = page_reward(ppo, scores["coarse"]["page"], scores["fine"]["page"])
    if ppo.reward_normalization:
        normalizer.update(total)
        mean, std = normalizer.mean, normalizer.std + 1e-8
    else:
        mean, std = 0.0, 1.0
    rows, last = torch.arange(len(mask)), mask.sum(1).long() - 1
    placed = torch.zeros(mask.shape)
    if ppo.reward_placement == "dense" and ppo.rewards in ("both", "fine"):
        per_item = ppo.fine_weight * scores["fine"]["steps"]
        placed += per_item / std
        placed[rows, last] += (total - per_item.sum(1) - mean) / std
    else:
        placed[rows, last] = (total - mean) / std
    return placed * mask


def ppo_iteration(roles, cfg: PageLLMConfig, prompts: list, seed: int, normalizer: RunningMeanStd, kl_ctl: KLController) -> dict:
    ppo = cfg.ppo
    t0 = time.perf_counter()
    pages = generate(roles, prompts, greedy=False, seed=seed)
    t1 = time.perf_counter()
    pending = {
        "old_logp": on_shards(roles, "policy", "logprobs", prompts, pages),
        "ref_logp": on_shards(roles, "reference", "logprobs", prompts, pages),
        "values": on_shards(roles, "critic", "values", prompts, pages),
        "coarse": on_shards(roles, "coarse", "score", prompts, pages),
        "fine": on_shards(roles, "fine", "score", prompts, pages),
    }
    got = {k: merge(roles.collect(v)) for k, v in pending.items()}
    t2 = time.perf_counter()
    mask = pages["step_mask"].float()
    kl = kl_per_token(got["old_logp"], got["ref_logp"], ppo.kl_estimator) * mask
    task = place_rewards(ppo, {"coarse": got["coarse"], "fine": got["fine"]}, mask, normalizer)
    rewards = token_rewards(task, kl, kl_ctl.beta, mask)
    advantages, returns = gae(rewards, got["values"] * mask, mask, ppo.gamma, ppo.gae_lambda)
    advantages = masked_whiten(advantages, mask)
    batch = {**pages, "old_logp": got["old_logp"], "advantages": advantages, "old_values": got["values"], "returns": returns, "seed": seed}
    t3 = time.perf_counter()
    pending = {"policy": on_shards(roles, "policy", "train", prompts, batch), "critic": on_shards(roles, "critic", "train", prompts, batch)}
    trained = {k: merge(roles.collect(v)) for k, v in pending.items()}
    t4 = time.perf_counter()
    sync = 0.0
    if roles.world("policy") > 1:  # the replicas must hold the same weights after the step
        sums = roles.collect(roles.submit("policy", "checksum", [()] * roles.world("policy")))
        if not np.allclose(sums, sums[0], rtol=1e-5):
            raise RuntimeError(f"policy replicas diverged after the update: checksums {sums}")
        sync = time.perf_counter() - t4
    page_kl = kl.sum(1).mean().item()
    kl_ctl.update(page_kl, len(prompts))
    elapsed = time.perf_counter() - t0
    total = page_reward(ppo, got["coarse"]["page"], got["fine"]["page"])
    return {
        "reward_coarse": got["coarse"]["page"].mean().item(),
        "reward_fine": got["fine"]["page"].mean().item(),
        "reward_total": total.mean().item(),
        "kl": page_kl,
        "beta": kl_ctl.beta,
        "page_items": (mask.sum(1) - 1).mean().item(),
        **trained["policy"], **trained["critic"],
        "pages_per_s": len(prompts) / elapsed,
        "time_generate": t1 - t0, "time_score": t2 - t1, "time_advantage": t3 - t2, "time_train": t4 - t3, "time_sync": sync,
        "time_iteration": elapsed,
    }


def evaluate(roles, cfg: PageLLMConfig, prompts: dict, codec: PromptCodec, seed: int) -> dict:
    """Validation NDCG@100 / Recall@20 of greedy constrained pages of ``eval_page_items`` items,
    and the (unnormalised) reward of sampled pages for the held-out prompts."""
    ppo = cfg.ppo
    users = len(prompts["val"]) if ppo.eval_max_users is None else min(ppo.eval_max_users, len(prompts["val"]))
    val_prompts, targets = prompts["val"][:users], prompts["val_targets"][:users]
    pages = generate(roles, val_prompts, greedy=True, seed=seed, max_items=ppo.eval_page_items, min_items=ppo.eval_page_items)
    item_lists = [codec.parse(row[m].tolist()).items for row, m in zip(pages["tokens"], pages["step_mask"])]
    out = {
        "val_ndcg@100": float(np.mean([ndcg_at_k(p, t, 100) for p, t in zip(item_lists, targets)])),
        "val_recall@20": float(np.mean([recall_at_k(p, t, 20) for p, t in zip(item_lists, targets)])),
        "val_users": users,
    }
    held = prompts["holdout"]
    if held:
        pages = generate(roles, held, greedy=False, seed=seed + 1)
        pending = {kind: on_shards(roles, kind, "score", held, pages) for kind in ("coarse", "fine")}
        coarse, fine = (merge(roles.collect(pending[kind]))["page"] for kind in ("coarse", "fine"))
        out.update(
            holdout_reward_coarse=coarse.mean().item(), holdout_reward_fine=fine.mean().item(),
            holdout_reward_total=page_reward(ppo, coarse, fine).mean().item(), holdout_prompts=len(held),
        )
    return out


# ------------------------------------------------------------------------ checkpoints


def latest_checkpoint(out: Path) -> Path | None:
    done = [d for d in (out / CHECKPOINTS).glob("iter_*") if (d / STATE_FILE).exists()]
    return max(done, key=lambda d: int(d.name.split("_")[1]), default=None)


def checkpoint_dir(out: Path, iteration: int) -> Path:
    """Where iteration ``iteration``'s checkpoint of the PPO run in ``out`` lives."""
    return Path(out) / CHECKPOINTS / f"iter_{iteration:06d}"


def best_val_checkpoint(out: Path, metrics_path: Path) -> Path:
    """The saved checkpoint whose evaluation had the best validation NDCG@100 (``final_policy:
    best_val``); logged to events.jsonl. Iteration 0 (the SFT policy) is not a PPO checkpoint: if
    it was better than every update, that is said in the log and the best PPO checkpoint is used."""
    evals = [r for r in (json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()) if "val_ndcg@100" in r]
    saved = [r for r in evals if (checkpoint_dir(out, r["iteration"]) / STATE_FILE).exists()]
    best = max(saved, key=lambda r: r["val_ndcg@100"])
    start = next((r for r in evals if r["iteration"] == 0), None)
    if start is not None and start["val_ndcg@100"] > best["val_ndcg@100"]:
        log.warning("final_policy=best_val: the SFT policy (validation NDCG@100 %.4f) beat every PPO checkpoint (best %.4f)",
                    start["val_ndcg@100"], best["val_ndcg@100"])
    with (out / EVENTS_FILE).open("a") as f:
        f.write(json.dumps({"event": "final_policy", "rule": "best_val", "iteration": best["iteration"], "val_ndcg@100": best["val_ndcg@100"]}) + "\n")
    return checkpoint_dir(out, best["iteration"])


def save_checkpoint(roles, out: Path, iteration: int, normalizer: RunningMeanStd, kl_ctl: KLController, tokenizer) -> Path:
    """Written to a temporary directory and renamed: a checkpoint with state.json is complete.
    Its ``policy/`` holds the tokenizer too, so any checkpoint is a policy directory that
    evaluation and serving load (a Tune trial stopped by ASHA never reaches the final copy)."""
    final = checkpoint_dir(out, iteration)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    roles.collect(roles.submit("policy", "save", [(str(tmp / "policy"),)] * roles.world("policy")))
    tokenizer.save_pretrained(tmp / "policy")
    roles.collect(roles.submit("critic", "save", [(str(tmp / "critic"),)] * roles.world("critic")))
    state = {"iteration": iteration, "normalizer": normalizer.state_dict(), "kl_controller": kl_ctl.state_dict()}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def plot_ppo(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward (rollouts)", ["reward_total", "reward_coarse", "reward_fine"]),
        ("reward (held-out prompts)", ["holdout_reward_total", "holdout_reward_coarse", "holdout_reward_fine"]),
        ("KL to reference (per page)", ["kl"]),
        ("validation NDCG@100", ["val_ndcg@100"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.3))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["iteration"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", label=key, ms=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- stage


def run_ppo(
    cfg: PageLLMConfig, data_dir, sft_dir, reward_dir, out_dir, resume: bool = False, local: bool = False,
    on_evaluation: Optional[Callable[[dict], None]] = None, placement_group=None, first_bundle: int = 0,
) -> dict:
    """Run PPO; returns the last iteration's record. ``local`` keeps every role in this process.
    ``on_evaluation`` sees every record with validation metrics (Ray Tune reports them), the
    last one after the final policy and curves are written;
    ``placement_group``/``first_bundle`` place the roles in a caller's group (a Tune trial's)."""
    out, sft_dir, reward_dir = Path(out_dir), Path(sft_dir).resolve(), Path(reward_dir).resolve()
    for need in (sft_dir / "config.json", reward_dir / "coarse" / "reward_head.json", reward_dir / "fine" / "reward_head.json"):
        if not need.exists():
            raise InputError(f"missing {need}: run `pagellm sft` and `pagellm reward` first")
    if not local:
        from pagellm.ray_utils import init_ray

        init_ray(cfg.ray)
    out.mkdir(parents=True, exist_ok=True)
    ppo = cfg.ppo
    tokenizer, codec, constraint, prompts = rollout_setup(ppo, sft_dir, data_dir)
    vocab = codec.vocab
    if len(prompts["train"]) == 0:
        raise InputError(f"{data_dir}: no rollout prompts (every user is held out)")
    total = planned_iterations(ppo, data_dir)

    roles = start_roles(cfg, role_specs(cfg, sft_dir, reward_dir, constraint, vocab.pad_id), local, placement_group, first_bundle)
    normalizer, kl_ctl = RunningMeanStd(), KLController(ppo.kl_beta, ppo.kl_adaptive, ppo.kl_target, ppo.kl_horizon)
    start, metrics_path = 0, out / METRICS_FILE
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from iteration 0", out)
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        roles.collect(roles.submit("policy", "load", [(str(checkpoint / "policy"),)] * roles.world("policy")))
        roles.collect(roles.submit("critic", "load", [(str(checkpoint / "critic"),)] * roles.world("critic")))
        normalizer.load_state_dict(state["normalizer"])
        kl_ctl.load_state_dict(state["kl_controller"])
        start = state["iteration"]
        kept = [line for line in metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] <= start] if metrics_path.exists() else []
        metrics_path.write_text("".join(line + "\n" for line in kept))
        with (out / EVENTS_FILE).open("a") as f:
            f.write(json.dumps({"event": "resumed", "iteration": start, "checkpoint": checkpoint.name, **state}) + "\n")
        log.info("resumed from %s (iteration %d)", checkpoint, start)
    elif metrics_path.exists():
        metrics_path.unlink()

    import wandb

    run = wandb.init(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode, name="ppo", dir=str(out), config={"ppo": dataclasses.asdict(ppo)}, reinit="create_new")
    from tqdm import tqdm

    record: dict = {}
    try:
        if start == 0:  # the reference point: the SFT policy before any update
            first = {"iteration": 0, **evaluate(roles, cfg, prompts, codec, ppo.seed)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(first) + "\n")
            if on_evaluation:
                on_evaluation(first)
        for it in tqdm(range(start, total), desc="PPO", initial=start, total=total):
            idx = batch_indices(len(prompts["train"]), ppo.batch_size, it, ppo.seed)
            seed = (ppo.seed * 1_000_003 + it) % 2**31
            record = {"iteration": it + 1, **ppo_iteration(roles, cfg, [prompts["train"][i] for i in idx], seed, normalizer, kl_ctl)}
            if (it + 1) % ppo.eval_every == 0 or it + 1 == total:
                record.update(evaluate(roles, cfg, prompts, codec, ppo.seed))
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=it + 1)
            if (it + 1) % ppo.checkpoint_every == 0 or it + 1 == total:
                save_checkpoint(roles, out, it + 1, normalizer, kl_ctl, tokenizer)
            if on_evaluation and "val_ndcg@100" in record and it + 1 < total:
                on_evaluation(record)
        final = best_val_checkpoint(out, metrics_path) if ppo.final_policy == "best_val" else latest_checkpoint(out)
        policy_dir = out / "policy"
        shutil.rmtree(policy_dir, ignore_errors=True)
        shutil.copytree(final / "policy", policy_dir, ignore=shutil.ignore_patterns("optim_rank*.pt", "module.safetensors"))
        tokenizer.save_pretrained(policy_dir)
    finally:
        run.finish()
        roles.shutdown()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    plot_ppo(records, out / "ppo_curves.png")
    last = records[-1] if records else record
    if on_evaluation and "val_ndcg@100" in last:
        # the last evaluation is handed over only now that every output is written: a Tune
        # scheduler may end the trial at this report (ASHA does at max_t)
        on_evaluation(last)
    return last
