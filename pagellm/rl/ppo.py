"""PPO stage (paper 4.5, Algorithm 1 lines 7-12): the driver of the role actors.

One driver (single controller) runs every iteration:
  1. generate    the policy writes a page per prompt under the page constraint (sampling)
  2. score       in parallel: policy and reference log-probabilities, critic values, R_c, R_f
  3. advantages  R = w_c R_c + w_f R_f (eq. 15), normalised by running statistics, placed on the
                 last token (terminal) or per item (dense); per-token KL penalty beta against
                 the reference; GAE with gamma = 1
  4. train       policy (clipped surrogate) and critic (clipped value loss) in parallel
Every ``eval_every`` iterations it evaluates the policy on the validation split with the
protocol of ``pagellm evaluate`` (same users, masking, page length and page-writing code, so the
logged ``val_ndcg@100`` is what ``pagellm evaluate --split val`` gives for that checkpoint) and
scores pages for held-out prompts with both reward heads; every ``checkpoint_every`` it saves the policy, the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from pagellm.buckets import in_share
from pagellm.config import PPO_ROLES, PageLLMConfig, write_config
from pagellm.data.layout import DataDir
from pagellm.errors import InputError
from pagellm.eval.evaluate import eval_users, score_pages
from pagellm.eval.metrics import METRICS
from pagellm.model.artifact import load_codec, require_policy
from pagellm.model.decoding import PageConstraint
from pagellm.model.prompts import PromptCodec
from pagellm.outputs import append_jsonl, figure, read_jsonl, write_jsonl
from pagellm.ray_utils import verbose_console
from pagellm.rl.batch import PageScores, RolloutBatch, mean_stats, shard_rows
from pagellm.rl.groups import LocalRoles, RayRoles
from pagellm.rl.ppo_math import (
    KLController,
    RunningMeanStd,
    gae,
    group_advantages,
    kl_per_token,
    masked_whiten,
    token_rewards,
)
from pagellm.rl.workers import CriticWorker, PolicyWorker, RewardWorker
from pagellm.storage import exists, fetch, is_uri, join, local_copy, read_text, remove, staged, subdirs, write_text

log = logging.getLogger(__name__)
CHECKPOINTS, STATE_FILE, METRICS_FILE, EVENTS_FILE = "checkpoints", "state.json", "metrics.jsonl", "events.jsonl"


# ------------------------------------------------------------------------------ prompts


@dataclass
class RolloutPrompts:
    train: list[list[int]]  # rollout prompts: each validation user's training history
    holdout: list[list[int]]  # prompts of held-out users: their reward is monitored, never trained on
    validation: pd.DataFrame  # the val split's users as ``pagellm evaluate`` sees them (``eval_users``)
    category: dict[str, str]  # item -> category, for the diversity metrics


def rollout_rows(cfg: PageLLMConfig, data_dir: Path) -> pd.DataFrame:
    """(user_id, prompt_items) of the rollout prompts (``ppo.rollout_prompts``): each validation
    user's training history (the prompt validation itself reads), or every fine-tuning window's
    prompt (main and extra windows: earlier histories, never the validation prompt)."""
    if cfg.ppo.rollout_prompts == "training_windows":
        return DataDir(data_dir).read_ft().to_pandas()[["user_id", "prompt_items"]]
    return DataDir(data_dir).read_eval("val", ["user_id", "prompt_items"]).to_pandas()


def load_prompts(cfg: PageLLMConfig, data_dir: Path, codec: PromptCodec) -> RolloutPrompts:
    """Rollout prompts (``rollout_rows``); a hash-chosen share of users is held out of rollouts
    and their validation prompts only monitor the reward."""
    val = eval_users(Path(data_dir), "val", cfg)
    rows = rollout_rows(cfg, Path(data_dir))
    train = [
        codec.prompt(u, list(p))
        for u, p, h in zip(rows.user_id, rows.prompt_items, held_out(rows.user_id, cfg.ppo.holdout_fraction))
        if not h
    ]
    held = held_out(val.user_id, cfg.ppo.holdout_fraction)
    return RolloutPrompts(
        train=train,
        holdout=[codec.prompt(u, list(p)) for u, p, h in zip(val.user_id, val.prompt_items, held) if h],
        validation=val,
        category=DataDir(data_dir).categories(),
    )


def held_out(user_ids, fraction: float) -> np.ndarray:
    """Users whose prompts only monitor the reward: a stable hash, the same in every process."""
    return np.array([in_share(u, fraction, salt="ppo") for u in user_ids], dtype=bool)


def pages_per_prompt(ppo) -> int:
    """Pages sampled in a row for each rollout prompt: ``group_size`` for group-relative advantages, else 1."""
    return ppo.group_size if ppo.advantage == "group" else 1


def planned_iterations(cfg: PageLLMConfig, data_dir) -> int:
    """Iterations a run makes: ``max_iterations``, else ``epochs`` passes over the rollout prompts."""
    if cfg.ppo.max_iterations is not None:
        return cfg.ppo.max_iterations
    users = rollout_rows(cfg, Path(data_dir)).user_id
    prompts_per_iteration = cfg.ppo.batch_size // pages_per_prompt(cfg.ppo)
    return cfg.ppo.epochs * math.ceil(int((~held_out(users, cfg.ppo.holdout_fraction)).sum()) / prompts_per_iteration)


def rollout_setup(
    cfg: PageLLMConfig, sft_dir: Path, data_dir: Path
) -> tuple[PromptCodec, PageConstraint, RolloutPrompts]:
    """The reference policy's prompt codec, the page constraint of rollouts and the prompts."""
    ppo = cfg.ppo
    codec = load_codec(sft_dir)
    constraint = PageConstraint.for_vocab(codec.vocab, ppo.page_min_items, ppo.page_max_items, ppo.exclude_history)
    return codec, constraint, load_prompts(cfg, Path(data_dir), codec)


def batch_indices(n: int, batch: int, iteration: int, seed: int) -> np.ndarray:
    """Prompts of one iteration: epochs are seeded permutations, so the order depends only on
    (seed, iteration) and a resumed run draws exactly the batches it would have drawn."""
    per_epoch = math.ceil(n / batch)
    epoch, b = divmod(iteration, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = perm[b * batch : (b + 1) * batch]
    return np.concatenate([idx, perm[: batch - len(idx)]]) if len(idx) < batch else idx


# -------------------------------------------------------------------------------- roles


def role_specs(cfg: PageLLMConfig, sft_dir: str, reward_dir: str, constraint: PageConstraint, pad_id: int) -> dict:
    """Each role's actor class and arguments; ``sft_dir``/``reward_dir`` are locations (paths or
    URIs) that every actor reads on its own node."""
    ppo, train = cfg.ppo, cfg.train
    # fine_objective=closed_form: the policy's pages carry R_f exactly (FineTilt); the reference's do not
    tilted = ppo.fine_objective == "closed_form" and ppo.rewards in ("both", "fine")
    tilt = (join(reward_dir, "fine"), ppo.fine_weight / ppo.kl_beta) if tilted else None

    def common(role: str, rank: int, world: int) -> dict:
        r = getattr(ppo, role)
        return {
            "ppo": ppo,
            "train": train,
            "num_cpus": r.num_cpus,
            "num_gpus": r.num_gpus,
            "rank": rank,
            "world": world,
        }

    return {
        "policy": (
            PolicyWorker,
            lambda rank, world: {
                "model_dir": str(sft_dir),
                "constraint": constraint,
                "pad_id": pad_id,
                "trainable": True,
                "tilt": tilt,
                **common("policy", rank, world),
            },
        ),
        "reference": (
            PolicyWorker,
            lambda rank, world: {
                "model_dir": str(sft_dir),
                "constraint": constraint,
                "pad_id": pad_id,
                "trainable": False,
                **common("reference", rank, world),
            },
        ),
        "critic": (
            CriticWorker,
            lambda rank, world: {
                "coarse_dir": join(reward_dir, "coarse"),
                "pad_id": pad_id,
                **common("critic", rank, world),
            },
        ),
        "coarse": (
            RewardWorker,
            lambda rank, world: {
                "reward_dir": join(reward_dir, "coarse"),
                "pad_id": pad_id,
                "eos_id": constraint.eos_id,
                **common("coarse", rank, world),
            },
        ),
        "fine": (
            RewardWorker,
            lambda rank, world: {
                "reward_dir": join(reward_dir, "fine"),
                "pad_id": pad_id,
                "eos_id": constraint.eos_id,
                **common("fine", rank, world),
            },
        ),
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


def on_shards(roles, role: str, method: str, batch: RolloutBatch, *args) -> list:
    """Start ``method`` on every worker of ``role`` with its shard of ``batch``."""
    return roles.submit(role, method, [(part, *args) for part in batch.shard(roles.world(role))])


def generate(roles, prompts: list, greedy: bool, seed: int, pad_id: int) -> RolloutBatch:
    parts = shard_rows(len(prompts), roles.world("policy"))
    pending = roles.submit("policy", "generate", [(prompts[p], greedy, seed + 7919 * i) for i, p in enumerate(parts)])
    return RolloutBatch.concat(roles.collect(pending), pad_id)


def scores_of(roles, kinds: tuple[str, ...], batch: RolloutBatch) -> dict[str, PageScores]:
    pending = {kind: on_shards(roles, kind, "score", batch) for kind in kinds}
    return {kind: PageScores.concat(roles.collect(p)) for kind, p in pending.items()}


# ---------------------------------------------------------------------------- iteration


def page_reward(ppo, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    wc = ppo.coarse_weight if ppo.rewards in ("both", "coarse") else 0.0
    wf = ppo.fine_weight if ppo.rewards in ("both", "fine") else 0.0
    return wc * coarse + wf * fine


def place_rewards(
    ppo, coarse: PageScores, fine: PageScores, mask: torch.Tensor, normalizer: RunningMeanStd
) -> torch.Tensor:
    """Task reward per step [B, T]: terminal puts the normalised R on the last step; dense puts
    each item's weighted fine score on its step and the rest of R on the last step."""
    total = page_reward(ppo, coarse.page, fine.page)
    if ppo.reward_normalization:
        normalizer.update(total)
        mean, std = normalizer.mean, normalizer.std + 1e-8
    else:
        mean, std = 0.0, 1.0
    rows, last = torch.arange(len(mask)), mask.sum(1).long() - 1
    placed = torch.zeros(mask.shape)
    if ppo.reward_placement == "dense" and ppo.rewards in ("both", "fine"):
        per_item = ppo.fine_weight * fine.steps
        placed += per_item / std
        placed[rows, last] += (total - per_item.sum(1) - mean) / std
    else:
        placed[rows, last] = (total - mean) / std
    return placed * mask


def ppo_iteration(
    roles, cfg: PageLLMConfig, prompts: list, seed: int, normalizer: RunningMeanStd, kl_ctl: KLController, pad_id: int
) -> dict:
    ppo = cfg.ppo
    t0 = time.perf_counter()
    batch = generate(roles, prompts, greedy=False, seed=seed, pad_id=pad_id)
    t1 = time.perf_counter()
    critic = ppo.advantage == "gae"  # group-relative advantages need no values
    # fine_objective=expected: R_f trains the policy through the whole distribution at every step;
    # closed_form: R_f is applied where pages are written (FineTilt). Either way not sampled.
    fine_apart = ppo.fine_objective != "sampled" and ppo.rewards in ("both", "fine")
    expected = fine_apart and ppo.fine_objective == "expected"
    pending = {
        "old_logp": on_shards(roles, "policy", "logprobs", batch),
        "ref_logp": on_shards(roles, "reference", "logprobs", batch),
        **({"values": on_shards(roles, "critic", "values", batch)} if critic else {}),
        **(
            {
                "ref_log_probs": on_shards(roles, "reference", "action_log_probs", batch),
                "action_rewards": on_shards(roles, "fine", "action_scores", batch),
            }
            if expected
            else {}
        ),
    }
    scores = scores_of(roles, ("coarse", "fine"), batch)
    old_logp, ref_logp = (torch.cat(roles.collect(pending[k])) for k in ("old_logp", "ref_logp"))
    exact = {k: torch.cat(roles.collect(pending[k])) for k in ("ref_log_probs", "action_rewards") if expected}
    t2 = time.perf_counter()
    mask = batch.step_mask.float()
    kl = kl_per_token(old_logp, ref_logp, ppo.kl_estimator) * mask
    sampled_fine = scores["fine"]
    if fine_apart:  # R_f is in the exact term or the tilt, not in the sampled reward
        sampled_fine = PageScores(torch.zeros_like(sampled_fine.page), torch.zeros_like(sampled_fine.steps))
    task = place_rewards(ppo, scores["coarse"], sampled_fine, mask, normalizer)
    # with the exact term the KL is in it, at every step and over every action: not sampled twice
    rewards = token_rewards(task, kl, 0.0 if expected else kl_ctl.beta, mask)
    if critic:
        values = torch.cat(roles.collect(pending["values"]))
        advantages, returns = gae(rewards, values * mask, mask, ppo.gamma, ppo.gae_lambda)
        advantages = masked_whiten(advantages, mask)
    else:
        advantages = group_advantages(rewards.sum(1), ppo.group_size, mask)
        values = returns = torch.zeros_like(mask)
    batch = batch.with_fields(old_logp=old_logp, advantages=advantages, old_values=values, returns=returns, **exact)
    t3 = time.perf_counter()
    pending = {role: on_shards(roles, role, "train", batch, seed) for role in ("policy", "critic")[: 1 + critic]}
    trained = {role: mean_stats(roles.collect(p)) for role, p in pending.items()}
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
    total = page_reward(ppo, scores["coarse"].page, scores["fine"].page)
    return {
        "reward_coarse": scores["coarse"].page.mean().item(),
        "reward_fine": scores["fine"].page.mean().item(),
        "reward_total": total.mean().item(),
        "kl": page_kl,
        "beta": kl_ctl.beta,
        "page_items": (mask.sum(1) - 1).mean().item(),
        **trained["policy"],
        **trained.get("critic", {}),
        "pages_per_s": len(prompts) / elapsed,
        "time_generate": t1 - t0,
        "time_score": t2 - t1,
        "time_advantage": t3 - t2,
        "time_train": t4 - t3,
        "time_sync": sync,
        "time_iteration": elapsed,
    }


def validate(roles, cfg: PageLLMConfig, users: pd.DataFrame, category: dict) -> dict:
    """The evaluation protocol of ``pagellm evaluate`` on the live policy: every metric of
    docs/metrics.md as ``val_<metric>``. Workers get whole chunks of ``eval.batch_size`` users,
    so pages are written in the same chunks as by the evaluation actors."""
    chunks = math.ceil(len(users) / cfg.eval.batch_size)
    parts = [
        slice(s.start * cfg.eval.batch_size, min(s.stop * cfg.eval.batch_size, len(users)))
        for s in shard_rows(chunks, roles.world("policy"))
    ]
    columns = [list(users[c]) for c in ("user_id", "prompt_items", "seen_items", "history")]
    pending = roles.submit("policy", "validation_pages", [(*(col[p] for col in columns), cfg.eval) for p in parts])
    pages = [page for part in roles.collect(pending) for page in part]
    _, metrics = score_pages(pages, users.target, category)
    return {**{f"val_{k}": metrics[k] for k in METRICS}, "val_users": len(users)}


def evaluate(roles, cfg: PageLLMConfig, prompts: RolloutPrompts, seed: int, pad_id: int) -> dict:
    """Validation metrics (``validate``, on ``ppo.eval_max_users`` users or all) and the
    (unnormalised) reward of sampled pages for the held-out prompts."""
    ppo = cfg.ppo
    users = prompts.validation if ppo.eval_max_users is None else prompts.validation.head(ppo.eval_max_users)
    out = validate(roles, cfg, users, prompts.category)
    if prompts.holdout:
        scores = scores_of(
            roles, ("coarse", "fine"), generate(roles, prompts.holdout, greedy=False, seed=seed + 1, pad_id=pad_id)
        )
        coarse, fine = scores["coarse"].page, scores["fine"].page
        out.update(
            holdout_reward_coarse=coarse.mean().item(),
            holdout_reward_fine=fine.mean().item(),
            holdout_reward_total=page_reward(ppo, coarse, fine).mean().item(),
            holdout_prompts=len(prompts.holdout),
        )
    return out


# ------------------------------------------------------------------------ checkpoints


def latest_checkpoint(root) -> str | None:
    """The newest complete checkpoint (one with its state file) of the PPO run at ``root``."""
    done = [d for d in subdirs(join(root, CHECKPOINTS)) if d.startswith("iter_")]
    done = [d for d in done if exists(join(root, CHECKPOINTS, d, STATE_FILE))]
    newest = max(done, key=lambda d: int(d.split("_")[1]), default=None)
    return join(root, CHECKPOINTS, newest) if newest else None


def checkpoint_dir(root, iteration: int) -> str:
    """Where iteration ``iteration``'s checkpoint of the PPO run at ``root`` lives (a path or URI)."""
    return join(root, CHECKPOINTS, f"iter_{iteration:06d}")


def best_val_checkpoint(root, out: Path) -> str:
    """The saved checkpoint whose evaluation had the best validation NDCG@100 (``final_policy:
    best_val``), iteration 0 (the SFT policy, saved before any update) included: a run whose
    updates never beat the reference on validation exports the reference, as early stopping would.
    Ties go to the earlier iteration. Logged to events.jsonl."""
    evals = [r for r in read_jsonl(out / METRICS_FILE) if "val_ndcg@100" in r]
    saved = [r for r in evals if exists(join(checkpoint_dir(root, r["iteration"]), STATE_FILE))]
    best = max(saved, key=lambda r: r["val_ndcg@100"])
    if best["iteration"] == 0:
        log.warning(
            "final_policy=best_val: no PPO checkpoint beat the SFT policy on validation (NDCG@100 %.4f): "
            "exporting iteration 0",
            best["val_ndcg@100"],
        )
    append_jsonl(
        out / EVENTS_FILE,
        {
            "event": "final_policy",
            "rule": "best_val",
            "iteration": best["iteration"],
            "val_ndcg@100": best["val_ndcg@100"],
        },
    )
    return checkpoint_dir(root, best["iteration"])


def save_checkpoint(
    roles, root, out: Path, iteration: int, normalizer: RunningMeanStd, kl_ctl: KLController, tokenizer
) -> str:
    """Each role actor writes its part straight to ``root`` (a URI on a multi-node run: the actors
    may be on other nodes), the driver its state file last: a checkpoint with one is complete.
    The run's metrics and events go along, so a run resumed from ``root`` on another machine
    loses no iteration. Its ``policy/`` holds the tokenizer too, so any checkpoint is a policy
    directory that evaluation and serving load (a Tune trial stopped by ASHA never reaches the
    final copy)."""
    final = checkpoint_dir(root, iteration)
    remove(final)  # an incomplete one of an earlier, interrupted run
    roles.collect(roles.submit("policy", "save", [(join(final, "policy"),)] * roles.world("policy")))
    with staged(join(final, "policy")) as policy:
        tokenizer.save_pretrained(policy)
    roles.collect(roles.submit("critic", "save", [(join(final, "critic"),)] * roles.world("critic")))
    if str(root) != str(out):
        for name in (METRICS_FILE, EVENTS_FILE):
            if (out / name).exists():
                write_text(join(root, name), (out / name).read_text())
    state = {"iteration": iteration, "normalizer": normalizer.state_dict(), "kl_controller": kl_ctl.state_dict()}
    write_text(join(final, STATE_FILE), json.dumps(state))
    return final


def plot_ppo(records: list[dict], path: Path) -> None:
    panels = [
        ("reward (rollouts)", ["reward_total", "reward_coarse", "reward_fine"]),
        ("reward (held-out prompts)", ["holdout_reward_total", "holdout_reward_coarse", "holdout_reward_fine"]),
        ("KL to reference (per page)", ["kl"]),
        ("validation NDCG@100", ["val_ndcg@100"]),
    ]
    with figure(path, len(panels), panel_size=(4.5, 3.3)) as (_, axes):
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                pts = [(r["iteration"], r[key]) for r in records if key in r]
                if pts:
                    ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", label=key, ms=3)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------- stage


def check_inputs(ppo, sft_dir: Path, reward_dir: Path) -> None:
    require_policy(sft_dir)
    for need in (reward_dir / "coarse" / "reward_head.json", reward_dir / "fine" / "reward_head.json"):
        if not need.exists():
            raise InputError(f"missing {need}: run `pagellm reward` first")
    fine = reward_dir / "fine" / "reward_head.json"
    if ppo.fine_objective != "sampled" and json.loads(fine.read_text()).get("model") != "multivae":
        raise InputError(
            f"{fine}: ppo.fine_objective={ppo.fine_objective} needs a fine reward that scores every item "
            "(run `pagellm reward` with reward.fine_model=multivae)"
        )


def restore(roles, root, out: Path, normalizer: RunningMeanStd, kl_ctl: KLController) -> int:
    """Load the latest checkpoint at ``root`` into the roles and the PPO state; take the run's
    metrics from ``root`` and drop those of iterations after the checkpoint. Returns the
    iteration to continue from (0 without a checkpoint)."""
    checkpoint = latest_checkpoint(root)
    if checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from iteration 0", root)
        return 0
    state = json.loads(read_text(join(checkpoint, STATE_FILE)))
    for role in ("policy", "critic"):
        roles.collect(roles.submit(role, "load", [(join(checkpoint, role),)] * roles.world(role)))
    normalizer.load_state_dict(state["normalizer"])
    kl_ctl.load_state_dict(state["kl_controller"])
    metrics_path = out / METRICS_FILE
    for name in (METRICS_FILE, EVENTS_FILE):
        if str(root) != str(out) and exists(join(root, name)):
            (out / name).write_text(read_text(join(root, name)))
    kept = [r for r in read_jsonl(metrics_path) if r["iteration"] <= state["iteration"]]
    write_jsonl(metrics_path, kept)
    name = checkpoint.rsplit("/", 1)[1]
    append_jsonl(out / EVENTS_FILE, {"event": "resumed", "iteration": state["iteration"], "checkpoint": name, **state})
    log.info("resumed from %s (iteration %d)", checkpoint, state["iteration"])
    return state["iteration"]


def export_policy(root, out: Path, final_policy: str, tokenizer) -> Path:
    """PPO_DIR/policy: the last checkpoint's policy, or the best validated one (``best_val``)."""
    final = best_val_checkpoint(root, out) if final_policy == "best_val" else latest_checkpoint(root)
    policy_dir = out / "policy"
    shutil.rmtree(policy_dir, ignore_errors=True)
    with local_copy(join(final, "policy")) as source:
        shutil.copytree(source, policy_dir, ignore=shutil.ignore_patterns("optim_rank*.pt", "module.safetensors"))
    tokenizer.save_pretrained(policy_dir)
    return policy_dir


def run_ppo(
    cfg: PageLLMConfig,
    data_dir,
    sft_dir,
    reward_dir,
    out_dir,
    resume: bool = False,
    on_evaluation: Optional[Callable[[dict], None]] = None,
    placement_group=None,
    first_bundle: int = 0,
    storage: Optional[str] = None,
) -> dict:
    """Run PPO; returns the last iteration's record (``ppo.roles_in_driver``: every role in this
    process).
    ``sft_dir``/``reward_dir`` may be URIs (this process and every role actor read their own
    copy); ``storage``: the run's URI, where the role actors write their checkpoints and the
    driver the metrics that go with them, so that nodes share nothing but it (None: ``out_dir``).
    ``on_evaluation`` sees every record with validation metrics (Ray Tune reports them), the
    last one after the final policy and curves are written;
    ``placement_group``/``first_bundle`` place the roles in a caller's group (a Tune trial's)."""
    import wandb
    from tqdm import tqdm

    out = Path(out_dir)
    root = storage or str(out)
    # actors get locations they can read on any node: a URI as given, a path made absolute
    sft_at, reward_at = (str(d) if is_uri(d) else str(Path(d).resolve()) for d in (sft_dir, reward_dir))
    sft_dir, reward_dir = fetch(sft_dir).resolve(), fetch(reward_dir).resolve()
    check_inputs(cfg.ppo, sft_dir, reward_dir)
    local = cfg.ppo.roles_in_driver
    if not local:
        from pagellm.ray_utils import init_ray

        init_ray(cfg.ray)
    write_config(cfg, out)
    ppo = cfg.ppo
    codec, constraint, prompts = rollout_setup(cfg, sft_dir, data_dir)
    pad_id, tokenizer = codec.vocab.pad_id, codec.vocab.tokenizer
    if not prompts.train:
        raise InputError(f"{data_dir}: no rollout prompts (every user is held out)")
    total = planned_iterations(cfg, data_dir)

    roles = start_roles(
        cfg, role_specs(cfg, sft_at, reward_at, constraint, pad_id), local, placement_group, first_bundle
    )
    normalizer, kl_ctl = RunningMeanStd(), KLController(ppo.kl_beta, ppo.kl_adaptive, ppo.kl_target, ppo.kl_horizon)
    metrics_path = out / METRICS_FILE
    start = restore(roles, root, out, normalizer, kl_ctl) if resume else 0
    nodes = {role: roles.collect(roles.submit(role, "node", [()] * roles.world(role))) for role in PPO_ROLES}
    append_jsonl(out / EVENTS_FILE, {"event": "roles", "iteration": start, "nodes": nodes, "storage": root})
    if start == 0:
        metrics_path.unlink(missing_ok=True)
    run = wandb.init(
        project=cfg.train.wandb_project,
        mode=cfg.train.wandb_mode,
        name="ppo",
        dir=str(out),
        config={"ppo": dataclasses.asdict(ppo)},
        reinit="create_new",
        settings=wandb.Settings(silent=not verbose_console()),  # one line of ours, not its 3 + history table
    )
    if not run.disabled:
        log.info("wandb run (%s): %s", run.settings.mode, Path(run.dir).parent)
    try:
        if start == 0:  # the reference point: the SFT policy before any update
            first = {"iteration": 0, **evaluate(roles, cfg, prompts, ppo.seed, pad_id)}
            append_jsonl(metrics_path, first)
            if ppo.final_policy == "best_val":  # the reference is a candidate of the final policy
                save_checkpoint(roles, root, out, 0, normalizer, kl_ctl, tokenizer)
            if on_evaluation:
                on_evaluation(first)
        bar = tqdm(range(start, total), desc="PPO", initial=start, total=total)
        shown = {"val_ndcg@100": first["val_ndcg@100"]} if start == 0 and "val_ndcg@100" in first else {}
        for it in bar:
            k = pages_per_prompt(ppo)
            idx = batch_indices(len(prompts.train), ppo.batch_size // k, it, ppo.seed)
            seed = (ppo.seed * 1_000_003 + it) % 2**31
            record = {
                "iteration": it + 1,
                **ppo_iteration(
                    roles, cfg, [prompts.train[i] for i in idx for _ in range(k)], seed, normalizer, kl_ctl, pad_id
                ),
            }
            if (it + 1) % ppo.eval_every == 0 or it + 1 == total:
                record.update(evaluate(roles, cfg, prompts, ppo.seed, pad_id))
            append_jsonl(metrics_path, record)
            shown.update({k: record[k] for k in ("reward_total", "kl", "val_ndcg@100") if k in record})
            bar.set_postfix({k.replace("val_", "last val "): f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=it + 1)
            if (it + 1) % ppo.checkpoint_every == 0 or it + 1 == total:
                save_checkpoint(roles, root, out, it + 1, normalizer, kl_ctl, tokenizer)
            if on_evaluation and "val_ndcg@100" in record and it + 1 < total:
                on_evaluation(record)
        export_policy(root, out, ppo.final_policy, tokenizer)
    finally:
        run.finish()
        roles.shutdown()
    records = read_jsonl(metrics_path)
    plot_ppo(records, out / "ppo_curves.png")
    last = records[-1]
    if on_evaluation and "val_ndcg@100" in last:
        # the last evaluation is handed over only now that every output is written: a Tune
        # scheduler may end the trial at this report (ASHA does at max_t)
        on_evaluation(last)
    return last
