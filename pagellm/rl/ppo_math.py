"""PPO math on padded [batch, steps] tensors, free of Ray and of models (paper 4.5, eq. 15-17).

A rollout is a page of generated tokens; ``mask`` marks its real steps (1) and the padding after
EOS (0). Everything here is a pure function of tensors so that it is tested by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real steps of the whole batch (advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate at the sampled token (Schulman, "Approximating KL").

    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, always >= 0, lower variance).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"KL estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(task_rewards: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = task reward placed on step t - beta * KL_t (the per-token penalty of section 4.5)."""
    return (task_rewards - beta * kl) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation backwards over each row's real steps.

    The value after the last real step is 0 (the page has ended). Returns (advantages,
    returns = advantages + values), zero on padding.
    """
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # padding steps pass nothing back: the next real step sees value 0 and advantage 0
        next_value = values[:, t] * m
        next_adv = adv * m
    return advantages, (advantages + values) * mask


def group_advantages(page_rewards: torch.Tensor, group_size: int, mask: torch.Tensor, eps: float = 1e-6):
    """Group-relative advantages (GRPO, Shao et al. 2024) instead of a critic: rows
    ``[g * k, (g + 1) * k)`` are k pages for one prompt; each page's advantage is its reward
    standardised within its group, on every step of the page. A group whose pages score alike
    teaches nothing (advantage 0)."""
    groups = page_rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + eps)).reshape(-1, 1) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """Clipped surrogate: mean over real steps of max(-A r, -A clip(r, 1-e, 1+e)).
    Returns (loss, clip fraction, approximate KL to the behaviour policy)."""
    ratio = (logp - old_logp).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) over real steps."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class RunningMeanStd:
    """Running mean and variance of page rewards (parallel Welford), for reward normalisation.
    Its state goes into PPO checkpoints so a resumed run normalises exactly as before."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (values - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class KLController:
    """beta: fixed, or adaptive (Ziegler et al., 2019): beta *= 1 + clip(KL/target - 1, +-0.2) * n/horizon."""

    beta: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


def expected_reward_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    allowed: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-regularised expected item reward at every visited step, summed over the whole
    action space instead of sampled (``ppo.fine_objective=expected``, ours):

        loss = mean over steps of sum_a pi(a) [beta (log pi(a) - log pi_ref(a)) - weight r(a)]

    Its minimiser at each step is pi ∝ pi_ref exp(weight r / beta), the optimum PPO only
    approaches by sampling. ``log_probs``, ``ref_log_probs`` [B, T, A] (masked distributions,
    any value where not ``allowed``), ``rewards`` [B, A] (one per action, the same at every step
    of a page), ``mask`` [B, T] the real steps. Returns (loss, the expected reward per step)."""
    probs = log_probs.masked_fill(~allowed, -math.inf).exp()
    log_ratio = log_probs.masked_fill(~allowed, 0.0) - ref_log_probs.masked_fill(~allowed, 0.0)
    expected = (probs * rewards[:, None, :]).sum(-1)
    per_step = beta * (probs * log_ratio).sum(-1) - weight * expected
    return masked_mean(per_step, mask), masked_mean(expected.detach(), mask)
