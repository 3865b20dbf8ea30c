"""A policy directory (SFT_DIR, PPO_DIR/policy, or a PPO checkpoint's ``policy/``) loaded one
way everywhere: PPO's roles, evaluation, experiments and serving get the same model, tokenizer,
vocabulary, prompt codec and page constraint, and write pages with the same code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pagellm.config import EvalConfig
from pagellm.errors import InputError
from pagellm.model.decoding import PageConstraint, write_pages
from pagellm.model.prompts import PromptCodec


def load_codec(directory: str | Path) -> PromptCodec:
    """The prompt codec of a stage output that holds a tokenizer (policy or reward head)."""
    from transformers import AutoTokenizer

    return PromptCodec.from_tokenizer(AutoTokenizer.from_pretrained(directory))


@dataclass
class Policy:
    model: torch.nn.Module  # a causal LM over the tokenizer's vocabulary (eval mode)
    codec: PromptCodec  # prompts and pages <-> token ids; ``codec.vocab`` holds the tokenizer

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
    ) -> list[list[str]]:
        """Pages of exactly ``cfg.page_items`` items (the evaluation protocol; ``cfg.page_mode``)
        for users with these prompt histories, never showing a ``banned`` item (unknown ids are
        ignored), in chunks of ``cfg.batch_size`` users. The same chunks give the same pages bit
        for bit, wherever this runs (an evaluation actor or a PPO policy worker)."""
        pages: list[list[str]] = []
        for lo in range(0, len(user_ids), cfg.batch_size):
            hi = lo + cfg.batch_size
            written, _ = self.write_tokens(
                user_ids[lo:hi], histories[lo:hi], banned[lo:hi], cfg.page_items, cfg, generator
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
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One batch of pages of ``k`` item tokens and their log-probabilities (``decoding.write_pages``
        with ``cfg``'s page mode and decoding); serving calls this with the request's k."""
        token = self.vocab.item_token
        return write_pages(
            self.model,
            [self.codec.prompt(u, list(h)) for u, h in zip(user_ids, histories)],
            self.constraint(k, k),
            self.vocab.pad_id,
            k,
            mode=cfg.page_mode,
            hybrid_items=cfg.hybrid_items,
            banned_items=[[token[i] for i in items if i in token] for items in banned],
            greedy=cfg.decoding == "greedy",
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            generator=generator,
        )


def require_policy(directory: str | Path) -> Path:
    """``directory`` when it holds a policy, else one InputError naming it (before any work)."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise InputError(f"{directory} holds no model (config.json missing): pass an SFT_DIR or PPO_DIR/policy")
    return directory


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> Policy:
    """The policy in ``directory``: its model (eval mode, on ``device``) and codec."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(require_policy(directory)).to(device).eval()
    return Policy(model, load_codec(directory))
