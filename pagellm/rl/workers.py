"""The PPO roles as plain classes; ``pagellm.rl.groups`` runs each as Ray actors.

policy     trainable; writes pages (constrained sampling) and gives their log-probabilities
reference  the frozen SFT policy; log-probabilities for the KL penalty
critic     trainable; a value at every page step. Initialised from the coarse reward model
           (backbone and scalar head), as in InstructGPT: it already scores whole pages.
coarse     R_c of a page (eq. 10), frozen
fine       R_f of a page and each item's score (eq. 13), frozen

Every call takes a ``RolloutBatch`` shard and returns one type (``pagellm.rl.batch``).
Trainable roles step through ``ModelOptimizer`` (DeepSpeed or AdamW), the helper of the
supervised stages. With several workers a role is one ``torch.distributed`` group and each
worker takes a shard of the batch. Models stay in eval mode (no dropout) so the log-probability
of a page is the same at sampling, in the ratio and in the reference.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pagellm.config import EvalConfig, PPOConfig, TrainConfig
from pagellm.model.artifact import FineTilt, load_policy
from pagellm.model.decoding import (
    PageConstraint,
    allowed_masks,
    gather_steps,
    generate_pages,
    masked_log_probs,
    masked_logprobs,
    rollout_batch,
)
from pagellm.model.modeling import CollaborativeReward, RewardModel, item_weights, load_reward_head
from pagellm.rl.batch import PageScores, RolloutBatch
from pagellm.rl.ppo_math import expected_reward_loss, policy_loss, value_loss
from pagellm.storage import local_copy, staged
from pagellm.train.loop import WEIGHTS_FILE, ModelOptimizer, load_module, save_module


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class CriticModel(nn.Module):
    """Values at every position: the coarse reward backbone and head (``RewardModel``)."""

    def __init__(self, reward: RewardModel):
        super().__init__()
        self.reward = reward

    def forward(self, input_ids, attention_mask):
        return self.reward.item_scores(input_ids, attention_mask)


class RoleWorker:
    """Shared set-up: threads, device, an optional process group for a trainable role."""

    def __init__(
        self, ppo: PPOConfig, train: TrainConfig, num_cpus: float, num_gpus: float, rank: int = 0, world: int = 1
    ):
        torch.set_num_threads(max(1, int(num_cpus)))
        self.ppo, self.train_cfg, self.rank, self.world = ppo, train, rank, world
        self.device = pick_device(num_gpus)
        self.optimizer: Optional[ModelOptimizer] = None

    def free_address(self) -> str:
        """Rank 0 hosts the process group's store: its address and a free port."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{socket.gethostbyname(socket.gethostname())}:{port}"

    def _init_group(self, address: Optional[str]) -> None:
        # what a torch launcher would set; Ray gives each actor its own visible GPU(s), so the
        # local device is always index 0
        host, port = address.removeprefix("tcp://").rsplit(":", 1) if address else ("127.0.0.1", "0")
        os.environ.update(
            LOCAL_RANK="0", RANK=str(self.rank), WORLD_SIZE=str(self.world), MASTER_ADDR=host, MASTER_PORT=port
        )
        if address and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, init_method=address, rank=self.rank, world_size=self.world)

    def ready(self) -> bool:
        return True

    def node(self) -> str:
        """The Ray node this worker runs on ("" outside Ray): where each role was placed."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _minibatches(self, batch: RolloutBatch, seed: int):
        """``update_epochs`` seeded passes over this shard in minibatches of
        ``minibatch_size / world`` pages."""
        n, micro = len(batch), max(1, self.ppo.minibatch_size // self.world)
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(self.ppo.update_epochs):
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, micro):
                yield batch.rows(order[lo : lo + micro])

    def _save_state(self, module: nn.Module, directory: Path) -> None:
        """Rank 0: the module's safetensors; every rank: its optimizer shard."""
        if self.rank == 0:
            save_module(module, directory / WEIGHTS_FILE)
        if self.optimizer is not None:
            torch.save(self.optimizer.optimizer.state_dict(), directory / f"optim_rank{self.rank}.pt")

    def load(self, location: str) -> None:
        """This rank's state from a checkpoint (a path, or a URI read from whichever node this runs on)."""
        with local_copy(location) as directory:
            load_module(self.model, directory / WEIGHTS_FILE)
            opt_file = directory / f"optim_rank{self.rank}.pt"
            if self.optimizer is not None and opt_file.exists():
                self.optimizer.load_optimizer(opt_file, self.rank, self.train_cfg.zero_stage, self.device)

    def _optimizer(self, module: nn.Module, lr: float) -> ModelOptimizer:
        micro = max(1, self.ppo.minibatch_size // self.world)
        wrap = None
        if self.world > 1 and not self.train_cfg.deepspeed:
            from torch.nn.parallel import DistributedDataParallel

            wrap = DistributedDataParallel
        optimizer = ModelOptimizer(module, lr, self.train_cfg, micro, self.device, wrap=wrap)
        module.eval()  # DeepSpeed may switch to train mode; keep dropout off
        # DeepSpeed places the module on its accelerator (a visible GPU even for a CPU role in
        # one process); inputs follow the module
        self.device = next(module.parameters()).device
        return optimizer


class PolicyWorker(RoleWorker):
    def __init__(
        self,
        model_dir: str,
        constraint: PageConstraint,
        pad_id: int,
        trainable: bool,
        tilt: Optional[tuple[str, float]] = None,
        **kw,
    ):
        """``tilt``: (a collaborative R_f's directory, its weight) that this policy's validation
        pages and saved policies carry (``FineTilt``, ``ppo.fine_objective=closed_form``);
        rollouts and the PPO loss read the model alone."""
        super().__init__(**kw)
        self.constraint, self.pad_id, self.trainable = constraint, pad_id, trainable
        with local_copy(model_dir) as directory:  # a URI: this node's own download
            self.policy = load_policy(directory, self.device)
        if tilt is not None:
            with local_copy(tilt[0]) as directory:
                self.policy.tilt = FineTilt.of_reward(directory, tilt[1], self.device)
        self.model = self.policy.model
        if not trainable:
            self.model.requires_grad_(False)

    def init_training(self, address: Optional[str]) -> None:
        self._init_group(address)
        self.optimizer = self._optimizer(self.model, self.ppo.lr)

    def _forward(self):
        return self.optimizer.forward if self.optimizer is not None else self.model

    def generate(self, prompts: list, greedy: bool, seed: int) -> RolloutBatch:
        """Rollout pages under the PPO page constraint, in chunks of ``generate_batch_size``."""
        gen = torch.Generator().manual_seed(seed)
        chunks = [
            RolloutBatch.from_pages(
                prompts[lo : lo + self.ppo.generate_batch_size],
                generate_pages(
                    self.model,
                    prompts[lo : lo + self.ppo.generate_batch_size],
                    self.constraint,
                    self.pad_id,
                    greedy,
                    self.ppo.temperature,
                    self.ppo.top_p,
                    gen,
                ),
            )
            for lo in range(0, len(prompts), self.ppo.generate_batch_size)
        ]
        return RolloutBatch.concat(chunks, self.pad_id)

    @torch.no_grad()
    def validation_pages(
        self, user_ids: list, histories: list, banned: list, whole_histories: list, eval_cfg: EvalConfig
    ) -> list[list[str]]:
        """Pages of the evaluation protocol (``Policy.write_pages``, as ``pagellm evaluate``)."""
        return self.policy.write_pages(
            user_ids, histories, banned, eval_cfg, torch.Generator().manual_seed(eval_cfg.seed), whole_histories
        )

    def _action_logits(self, batch: RolloutBatch, forward):
        """[B, T, A] action logits at every step and the allowed-action mask."""
        ids, attention, positions = rollout_batch(batch.prompts, batch.pages, self.pad_id)
        out = forward(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
        logits = self.constraint.restrict(gather_steps(out.logits, positions))
        allowed = allowed_masks(self.constraint, batch.prompts, batch.actions, batch.step_mask).to(self.device)
        return logits, allowed

    def _logprobs(self, batch: RolloutBatch, forward):
        logits, allowed = self._action_logits(batch, forward)
        return masked_logprobs(logits, allowed, batch.actions.to(self.device), self.ppo.temperature)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] log-probability of each written action."""
        return self._logprobs(batch, self.model)[0].cpu()

    @torch.no_grad()
    def action_log_probs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T, A] the whole masked distribution at every step (-inf where not allowed)."""
        return masked_log_probs(*self._action_logits(batch, self.model), self.ppo.temperature).cpu()

    def train(self, batch: RolloutBatch, seed: int) -> dict[str, float]:
        """PPO clipped surrogate over this shard's minibatches; with ``ref_log_probs`` and
        ``action_rewards`` attached (``ppo.fine_objective=expected``) plus the exact expected
        item reward of every step (``expected_reward_loss``)."""
        stats = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "entropy": 0.0}
        expected = batch.action_rewards is not None
        if expected:
            stats.update(expected_loss=0.0, expected_reward_fine=0.0)
        steps = 0
        for sub in self._minibatches(batch, seed):
            logits, allowed = self._action_logits(sub, self._forward())
            actions = sub.actions.to(self.device)
            logp, entropy = masked_logprobs(logits, allowed, actions, self.ppo.temperature)
            mask = sub.step_mask.to(self.device).float()
            loss, clip_frac, approx_kl = policy_loss(
                logp, sub.old_logp.to(self.device), sub.advantages.to(self.device), mask, self.ppo.clip
            )
            if expected:
                exact, reward = expected_reward_loss(
                    masked_log_probs(logits, allowed, self.ppo.temperature),
                    sub.ref_log_probs.to(self.device),
                    sub.action_rewards.to(self.device),
                    allowed,
                    mask,
                    self.ppo.kl_beta,
                    self.ppo.fine_weight,
                )
                loss = loss + exact
                stats["expected_loss"] += float(exact.detach())
                stats["expected_reward_fine"] += float(reward)
            self.optimizer.step(loss)
            ent = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
            for key, value in (
                ("policy_loss", loss),
                ("clip_fraction", clip_frac),
                ("approx_kl", approx_kl),
                ("entropy", ent),
            ):
                stats[key] += float(value.detach())
            steps += 1
        self.model.eval()
        return {k: v / max(steps, 1) for k, v in stats.items()}

    @torch.no_grad()
    def checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.model.parameters()))

    def save(self, location: str) -> None:
        """The HF model (rank 0) next to the module state and optimizer shards, written to
        ``location`` (a path, or a URI uploaded from this node)."""
        with staged(location) as directory:
            self._save_state(self.model, directory)
            if self.rank == 0:
                self.model.save_pretrained(directory)
                if self.policy.tilt is not None:
                    self.policy.tilt.save(directory)


class CriticWorker(RoleWorker):
    def __init__(self, coarse_dir: str, pad_id: int, **kw):
        super().__init__(**kw)
        self.pad_id = pad_id
        with local_copy(coarse_dir) as directory:
            self.model = CriticModel(RewardModel.from_pretrained(directory)).to(self.device).eval()

    def init_training(self, address: Optional[str]) -> None:
        self._init_group(address)
        self.optimizer = self._optimizer(self.model, self.ppo.critic_lr)

    def _values(self, batch: RolloutBatch, forward):
        ids, attention, positions = rollout_batch(batch.prompts, batch.pages, self.pad_id)
        scores = forward(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
        return gather_steps(scores, positions).float()

    @torch.no_grad()
    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] value at each page step."""
        return self._values(batch, self.model).cpu()

    def train(self, batch: RolloutBatch, seed: int) -> dict[str, float]:
        """Clipped value loss over this shard's minibatches."""
        total, steps = 0.0, 0
        for sub in self._minibatches(batch, seed):
            values = self._values(sub, self.optimizer.forward)
            mask = sub.step_mask.to(self.device).float()
            loss = self.ppo.value_loss_coef * value_loss(
                values, sub.old_values.to(self.device), sub.returns.to(self.device), mask, self.ppo.value_clip
            )
            self.optimizer.step(loss)
            total += float(loss.detach())
            steps += 1
        self.model.eval()
        return {"value_loss": total / max(steps, 1)}

    def save(self, location: str) -> None:
        with staged(location) as directory:
            self._save_state(self.model, directory)


class RewardWorker(RoleWorker):
    """R_c or R_f of pages (``PageScores``)."""

    def __init__(self, reward_dir: str, pad_id: int, eos_id: int, **kw):
        super().__init__(**kw)
        self.pad_id, self.eos_id = pad_id, eos_id
        with local_copy(reward_dir) as directory:
            self.model = load_reward_head(directory).to(self.device).eval().requires_grad_(False)
        self.kind = self.model.kind

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> PageScores:
        ids, attention, positions = rollout_batch(batch.prompts, batch.pages, self.pad_id)
        is_item = batch.step_mask & (batch.tokens != self.eos_id)
        rows = torch.arange(len(batch))
        # item at step s sits at position len(prompt) + s, one after the logit position
        item_positions = (positions + 1).clamp(max=ids.shape[1] - 1)
        item_mask = torch.zeros(ids.shape, dtype=torch.bool)
        item_mask[rows[:, None].expand_as(item_positions)[is_item], item_positions[is_item]] = True
        scores = self.model.item_scores(ids.to(self.device), attention.to(self.device), item_mask.to(self.device))
        scores = scores.float().cpu()
        if self.kind == "coarse":
            last = torch.tensor([len(p) for p in batch.prompts]) + batch.step_mask.sum(1) - 1
            return PageScores(scores[rows, last], torch.zeros(batch.actions.shape))
        item_scores = gather_steps(scores, item_positions)
        steps = item_scores * item_weights(is_item, self.model.pooling)
        return PageScores(steps.sum(1), steps)

    @torch.no_grad()
    def action_scores(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, A] R_f's score of every action given each page's prompt (EOS: 0), for
        ``ppo.fine_objective=expected``; a collaborative R_f only (one pass scores every item)."""
        if not isinstance(self.model, CollaborativeReward):
            raise ValueError(
                "ppo.fine_objective=expected needs a fine reward that scores every item: reward.fine_model=multivae"
            )
        scores = self.model.prompt_scores(batch.prompts, self.pad_id).float().cpu()
        return torch.cat([scores, torch.zeros(len(batch), 1)], 1)
