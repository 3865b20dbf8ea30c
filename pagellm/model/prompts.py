"""Prompts and pages as token ids (paper Figure 3), and the parser back to item ids.

    prompt = user_<u> " history:" item_<a> item_<b> ... " page:"
    target = item_<x> item_<y> ... <eos>

The user token comes first, history items follow in time order, and the page is the
continuation after " page:" (the masked target slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from pagellm.model.vocab import Vocab


@dataclass
class ParsedPage:
    """A generated page read back into item ids. Nothing is dropped silently: tokens that are
    not items and items that repeat are listed, and ``ended`` says whether EOS was reached."""

    items: list[str] = field(default_factory=list)
    invalid_tokens: list[int] = field(default_factory=list)
    repeated_items: list[str] = field(default_factory=list)
    ended: bool = False

    @property
    def valid(self) -> bool:
        return bool(self.items) and self.ended and not self.invalid_tokens and not self.repeated_items


class PromptCodec:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.history_ids = vocab.text_ids(" history:")
        self.page_ids = vocab.text_ids(" page:")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptCodec":
        """The codec of a tokenizer that holds the user and item tokens (its ``vocab``)."""
        return cls(Vocab.from_tokenizer(tokenizer))

    def prompt(self, user_id: Optional[str], history: Sequence[str]) -> list[int]:
        """Prompt ids; a user without a token (unseen at training) gets no user token."""
        user = [self.vocab.user_token[user_id]] if user_id in self.vocab.user_token else []
        return user + self.history_ids + self.vocab.items_to_ids(history) + self.page_ids

    def target(self, page: Sequence[str]) -> list[int]:
        return self.vocab.items_to_ids(page) + [self.vocab.eos_id]

    def parse(self, generated: Sequence[int]) -> ParsedPage:
        """Read generated ids (the continuation after the prompt) up to the first EOS."""
        page, seen = ParsedPage(), set()
        for token in generated:
            if token == self.vocab.eos_id:
                page.ended = True
                break
            item = self.vocab.token_item.get(int(token))
            if item is None:
                page.invalid_tokens.append(int(token))
            elif item in seen:
                page.repeated_items.append(item)
            else:
                seen.add(item)
                page.items.append(item)
        return page


def encode_list(
    codec: PromptCodec, user: Optional[str], prompt_items: Sequence[str], page: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """[prompt || page || eos] ids and a mask of the page's item positions: what a reward head
    scores (``RewardModel.score``)."""
    prompt, target = codec.prompt(user, list(prompt_items)), codec.target(list(page))
    mask = [0] * len(prompt) + [1] * (len(target) - 1) + [0]
    return np.asarray(prompt + target, np.int64), np.asarray(mask, np.int64)
