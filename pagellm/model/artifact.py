"""A policy directory (SFT_DIR, PPO_DIR/policy, or a PPO checkpoint's ``policy/``) loaded one
way everywhere: PPO's roles, evaluation, experiments and serving get the same model, tokenizer,
vocabulary, prompt codec and page constraint, and write pages with the same code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pagellm.config import EvalConfig
from pagellm.errors import InputError
from pagellm.model.decoding import PageConstraint, write_pages
from pagellm.model.ensemble import lm_dirs, load_lm
from pagellm.model.modeling import CollaborativeReward, load_reward_head
from pagellm.model.prompts import PromptCodec

TILT_DIR = "fine_tilt"  # in a policy directory: the R_f its pages are tilted by (FineTilt)


def load_codec(directory: str | Path) -> PromptCodec:
    """The prompt codec of a stage output that holds a tokenizer (policy or reward head)."""
    from transformers import AutoTokenizer

    return PromptCodec.from_tokenizer(AutoTokenizer.from_pretrained(directory))


@dataclass
class FineTilt:
    """R_f applied where the policy writes pages (``ppo.fine_objective=closed_form``, ours): every
    slot's item logits get ``weight`` x R_f(item | prompt) added, so pages come from
    pi ∝ pi_theta exp(fine_weight R_f / kl_beta), the exact optimum of the KL-regularised R_f
    objective on top of pi_theta, where gradient steps reached under half of it (docs/ppo.md).
    Saved in the policy directory (``TILT_DIR``), so evaluation and serving apply it alike."""

    reward: CollaborativeReward  # a collaborative R_f: scores every item of the block in one pass
    weight: float  # fine_weight / kl_beta

    META = "tilt.json"

    def item_bias(self, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        return self.weight * self.reward.prompt_scores(prompts, pad_id).float()

    def save(self, policy_dir: str | Path) -> None:
        self.reward.save_pretrained(Path(policy_dir) / TILT_DIR)
        (Path(policy_dir) / TILT_DIR / self.META).write_text(json.dumps({"weight": self.weight}))

    @classmethod
    def of_reward(cls, reward_dir: str | Path, weight: float, device: str | torch.device = "cpu") -> "FineTilt":
        """A tilt by the collaborative R_f in ``reward_dir`` (a reward stage's ``fine``) at ``weight``."""
        return cls(load_reward_head(reward_dir).to(device).eval().requires_grad_(False), float(weight))

    @classmethod
    def load(cls, policy_dir: str | Path, device: str | torch.device = "cpu") -> Optional["FineTilt"]:
        """The tilt saved in ``policy_dir``, or None when its pages are the model's own."""
        directory = Path(policy_dir) / TILT_DIR
        if not directory.exists():
            return None
        return cls.of_reward(directory, json.loads((directory / cls.META).read_text())["weight"], device)


@dataclass
class Policy:
    model: torch.nn.Module  # a causal LM over the tokenizer's vocabulary, or a MemberEnsemble (eval mode)
    codec: PromptCodec  # prompts and pages <-> token ids; ``codec.vocab`` holds the tokenizer
    tilt: Optional[FineTilt] = None  # R_f added to the item logits of every slot (FineTilt)

    @property
    def vocab(self):
        return self.codec.vocab

    def constraint(self, min_items: int, max_items: int, exclude_history: bool = True) -> PageConstraint:
        return PageConstraint.for_vocab(self.vocab, min_items, max_items, exclude_history)

    def write_pages(
        self,
        user_ids: Sequence,
        histories: Sequence[Sequence[str]],
        banned: Sequence[Sequence[str]],
        cfg: EvalConfig,
        generator: Optional[torch.Generator] = None,
        tilt_histories: Optional[Sequence[Sequence[str]]] = None,
    ) -> list[list[str]]:
        """Pages of exactly ``cfg.page_items`` items (the evaluation protocol; ``cfg.page_mode``)
        for users with these prompt histories, never showing a ``banned`` item (unknown ids are
        ignored), in chunks of ``cfg.batch_size`` users. The same chunks give the same pages bit
        for bit, wherever this runs (an evaluation actor or a PPO policy worker).
        ``tilt_histories``: each user's whole history, for the tilt (``write_tokens``)."""
        pages: list[list[str]] = []
        for lo in range(0, len(user_ids), cfg.batch_size):
            hi = lo + cfg.batch_size
            whole = None if tilt_histories is None else tilt_histories[lo:hi]
            written, _ = self.write_tokens(
                user_ids[lo:hi], histories[lo:hi], banned[lo:hi], cfg.page_items, cfg, generator, whole
            )
            pages += [[self.vocab.token_item[t] for t in row] for row in written]
        return pages

    def write_tokens(
        self,
        user_ids: Sequence,
        histories: Sequence[Sequence[str]],
        banned: Sequence[Sequence[str]],
        k: int,
        cfg: EvalConfig,
        generator: Optional[torch.Generator] = None,
        tilt_histories: Optional[Sequence[Sequence[str]]] = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One batch of pages of ``k`` item tokens and their log-probabilities (``decoding.write_pages``
        with ``cfg``'s page mode and decoding); serving calls this with the request's k. The LM
        reads the prompt ``histories``; the tilt reads ``tilt_histories`` (each user's whole
        history) where given and ``cfg.tilt_history`` is ``all``: R_f's weights were chosen on
        whole histories, and a collaborative model reads them all as the baselines do."""
        token = self.vocab.item_token
        prompts = [self.codec.prompt(u, list(h)) for u, h in zip(user_ids, histories)]
        item_bias = None
        if self.tilt:  # no prompts built twice for a policy without one (serving's hot path)
            whole = tilt_histories is not None and cfg.tilt_history == "all"
            read = [self.codec.prompt(u, list(h)) for u, h in zip(user_ids, tilt_histories)] if whole else prompts
            item_bias = self.tilt.item_bias(read, self.vocab.pad_id)
        return write_pages(
            self.model,
            prompts,
            self.constraint(k, k),
            self.vocab.pad_id,
            k,
            mode=cfg.page_mode,
            hybrid_items=cfg.hybrid_items,
            banned_items=[[token[i] for i in items if i in token] for items in banned],
            item_bias=item_bias,
            greedy=cfg.decoding == "greedy",
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            generator=generator,
        )


def require_policy(directory: str | Path) -> Path:
    """``directory`` when it holds a policy (one LM or an ensemble's members), else one
    InputError naming it (before any work)."""
    directory = Path(directory)
    missing = [d for d in lm_dirs(directory) if not (d / "config.json").exists()]
    if missing:
        raise InputError(f"{missing[0]} holds no model (config.json missing): pass an SFT_DIR or PPO_DIR/policy")
    return directory


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> Policy:
    """The policy in ``directory``: its model (one LM or a ``MemberEnsemble``; eval mode, on
    ``device``), codec and tilt, if any."""
    model = load_lm(require_policy(directory)).to(device).eval()
    return Policy(model, load_codec(directory), FineTilt.load(directory, device))
