"""User and item tokens (paper 4.2.1): one added token per user and per item.

Item tokens are added after user tokens and both in sorted id order, so each kind occupies
one contiguous block of token ids; constrained decoding and the page parser use those blocks.
Prompts are assembled from token ids, never by re-tokenising item names, so any id string
(spaces, punctuation) maps 1:1 and round-trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

USER_PREFIX, ITEM_PREFIX = "user_", "item_"
EOS = "<|endoftext|>"
TEMPLATE_WORDS = "history page rated stars title brand category share also bought user item"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style) trained locally on catalogue text: no download."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # a second's work; its bars print blank lines into a non-terminal console
    )
    tok.train_from_iterator([TEMPLATE_WORDS, *texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def catalogue_text(items: pa.Table) -> list[str]:
    """Titles, brands and categories: the text the embedded tokenizer is trained on."""
    out = []
    for title, brand, cats in zip(
        items.column("title").to_pylist(), items.column("brand").to_pylist(), items.column("categories").to_pylist()
    ):
        out.append(" ".join(t for t in [title, brand, *(cats or [])] if t))
    return out


def add_entity_tokens(tokenizer: PreTrainedTokenizerBase, users: Sequence[str], items: Sequence[str]) -> None:
    """Add ``user_<id>`` and ``item_<id>`` tokens (sorted, users first); EOS doubles as pad."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for prefix, ids in ((USER_PREFIX, users), (ITEM_PREFIX, items)):
        tokens = [AddedToken(f"{prefix}{i}", normalized=False, special=False) for i in sorted(set(map(str, ids)))]
        tokenizer.add_tokens(tokens)


def build_tokenizer(name_or_path: str | None, items: pa.Table, users: Sequence[str], bpe_vocab_size: int):
    """Base tokenizer (a pretrained one from a local path or name, else a local BPE) plus the
    user and item tokens."""
    if name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        tokenizer = train_bpe_tokenizer(catalogue_text(items), bpe_vocab_size)
    add_entity_tokens(tokenizer, users, items.column("item_id").to_pylist())
    return tokenizer


@dataclass
class Vocab:
    """Token id <-> user/item id maps, recovered from a tokenizer's added vocabulary."""

    tokenizer: PreTrainedTokenizerBase
    user_token: dict[str, int]
    item_token: dict[str, int]
    token_item: dict[int, str]
    base_size: int  # token ids below this belong to the base tokenizer

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "Vocab":
        added = tokenizer.get_added_vocab()
        users = {t[len(USER_PREFIX) :]: i for t, i in added.items() if t.startswith(USER_PREFIX)}
        items = {t[len(ITEM_PREFIX) :]: i for t, i in added.items() if t.startswith(ITEM_PREFIX)}
        entity_ids = list(users.values()) + list(items.values())
        return cls(tokenizer, users, items, {i: t for t, i in items.items()}, min(entity_ids, default=len(tokenizer)))

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def item_id_range(self) -> tuple[int, int]:
        """[lo, hi) of the item token ids (contiguous by construction)."""
        ids = self.item_token.values()
        return min(ids), max(ids) + 1

    @property
    def item_block(self) -> list[str]:
        """Item ids in token order: column k of a score over the item block is ``item_block[k]``."""
        lo, hi = self.item_id_range
        return [self.token_item[t] for t in range(lo, hi)]

    def items_to_ids(self, items: Sequence[str]) -> list[int]:
        return [self.item_token[i] for i in items]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids
