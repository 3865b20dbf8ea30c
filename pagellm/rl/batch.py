"""The typed batches that cross Ray between the PPO driver and the role actors.

B is the number of pages, T the longest page of the batch plus its EOS step (rows are padded
after their EOS), A = n_items + 1 the action space of ``PageConstraint``. Every role call takes
a ``RolloutBatch`` shard and returns one type: a [B, T] tensor (log-probabilities, values),
``PageScores`` (rewards) or a dict of float statistics (a training step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pagellm.model.decoding import Pages

# what a padded step holds in each per-step field
_PAD = {"actions": -1, "step_mask": False, "old_logp": 0.0, "advantages": 0.0, "old_values": 0.0, "returns": 0.0}
_STEP_FIELDS = ("actions", "tokens", "step_mask", "old_logp", "advantages", "old_values", "returns")
_ROW_FIELDS = (*_STEP_FIELDS, "ref_log_probs", "action_rewards")  # what ``rows`` picks


def shard_rows(n: int, parts: int) -> list[slice]:
    """Contiguous, near-equal slices of n rows (equal when parts divides n)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass
class RolloutBatch:
    """B pages with their prompts, and what PPO attaches to them before the update."""

    prompts: list[list[int]]  # B prompts as token ids (ragged: each prompt its own length)
    actions: torch.Tensor  # [B, T] long: item index a < n_items, EOS = n_items, -1 after EOS
    tokens: torch.Tensor  # [B, T] long: the token written at each step, pad id after EOS
    step_mask: torch.Tensor  # [B, T] bool: real steps (EOS included)
    old_logp: Optional[torch.Tensor] = None  # [B, T] float: log pi_old(a_t), masked distribution
    advantages: Optional[torch.Tensor] = None  # [B, T] float: whitened GAE advantages
    old_values: Optional[torch.Tensor] = None  # [B, T] float: critic values at rollout time
    returns: Optional[torch.Tensor] = None  # [B, T] float: GAE returns (the critic's targets)
    # ppo.fine_objective=expected: the reference's whole distribution and R_f of every action
    ref_log_probs: Optional[torch.Tensor] = None  # [B, T, A] float: log pi_ref(a) at every step
    action_rewards: Optional[torch.Tensor] = None  # [B, A] float: R_f's score of each action

    @classmethod
    def from_pages(cls, prompts: Sequence[Sequence[int]], pages: Pages) -> "RolloutBatch":
        return cls([list(p) for p in prompts], pages.actions, pages.tokens, pages.step_mask)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def pages(self) -> Pages:
        return Pages(self.actions, self.tokens, self.step_mask)

    def with_fields(self, **fields: torch.Tensor) -> "RolloutBatch":
        return dataclasses.replace(self, **fields)

    def rows(self, index: slice | torch.Tensor) -> "RolloutBatch":
        """The rows at ``index`` (a slice or a 1-d index tensor), every field alike."""
        picked = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        fields = {name: getattr(self, name)[index] for name in _ROW_FIELDS if getattr(self, name) is not None}
        return RolloutBatch([self.prompts[i] for i in picked], **fields)

    def shard(self, parts: int) -> list["RolloutBatch"]:
        """``parts`` contiguous shards, one per worker of a role."""
        return [self.rows(s) for s in shard_rows(len(self), parts)]

    @staticmethod
    def concat(parts: Sequence["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Shards back in one batch, padded to the longest page (shards stop when theirs end);
        the per-step fields only (what generation returns)."""
        width = max(p.actions.shape[1] for p in parts)
        fields = {}
        for name in _STEP_FIELDS:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                continue
            pad = _PAD.get(name, pad_id)
            fields[name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pad) for v in values])
        return RolloutBatch([prompt for p in parts for prompt in p.prompts], **fields)


@dataclass
class PageScores:
    """What a reward role returns for a batch of pages."""

    page: torch.Tensor  # [B] the page's reward (R_c or R_f)
    steps: torch.Tensor  # [B, T] each step's share: R_f's item score / items on the page; 0 for R_c and EOS

    @staticmethod
    def concat(parts: Sequence["PageScores"]) -> "PageScores":
        return PageScores(torch.cat([p.page for p in parts]), torch.cat([p.steps for p in parts]))


def mean_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Training statistics of a role: the mean over its workers."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
