"""The HTTP API's requests, limits and the per-replica cache of users and items.

POST /v1/page {user_id, k?, history?, exclude?} -> {user_id, arm, model, items, scores, source}
POST /v1/rank {user_id, candidates, history?}   -> {user_id, model, items, scores}
GET  /healthz
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from pagellm.data.layout import SPLITS, DataDir

MAX_BODY_BYTES = 64 * 1024
MAX_HISTORY = 500
MAX_EXCLUDE = 1000
MAX_CANDIDATES = 1000
MAX_K = 100

ItemId = Union[StrictStr, StrictInt]  # MovieLens ids arrive as JSON numbers; kept as strings


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: ItemId = Field(description="the user; ids unseen at training are served from history or popularity")

    @field_validator("user_id")
    @classmethod
    def _user(cls, value) -> str:
        value = str(value)
        if not 1 <= len(value) <= 128:
            raise ValueError("user_id must be 1-128 characters")
        return value


def _items(value):
    return None if value is None else [str(v) for v in value]


class PageRequest(_Request):
    k: StrictInt = Field(10, ge=1, le=MAX_K, description='items on the page (a JSON integer: no "5", no true)')
    history: Optional[list[ItemId]] = Field(
        None, max_length=MAX_HISTORY, description="the user's recent items, oldest first; replaces the cached history"
    )
    exclude: Optional[list[ItemId]] = Field(None, max_length=MAX_EXCLUDE, description="items the page may not show")

    @field_validator("history", "exclude")
    @classmethod
    def _as_strings(cls, value):
        return _items(value)


class RankRequest(_Request):
    candidates: list[ItemId] = Field(min_length=1, max_length=MAX_CANDIDATES)
    history: Optional[list[ItemId]] = Field(None, max_length=MAX_HISTORY)

    @field_validator("candidates", "history")
    @classmethod
    def _as_strings(cls, value):
        return _items(value)

    @field_validator("candidates")
    @classmethod
    def _unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("candidates must be unique")
        return value


def validation_errors(exc) -> list[dict]:
    """pydantic's errors as [{field, message}] for a 422 body."""
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()]


@dataclass
class ServingData:
    """What a replica caches (paper 4.6 (i)-(ii)), read once from a data-stage output: every
    user's positives in time order (the prompt history, built as the data stage builds
    evaluation prompts), every item they interacted with at any rating (what a page must not
    repeat, as evaluation masks) and item popularity by positives."""

    history: dict[str, list[str]]
    seen: dict[str, set[str]]
    popular: list[str]  # items by number of positive interactions, most first
    prompt_items: int

    @classmethod
    def load(
        cls, data_dir: str | Path, prompt_items: int = 20, positive_threshold: float = 3.0, before: Optional[str] = None
    ) -> "ServingData":
        """``before``: what is known before that split (``DataDir.interactions_before``; None: all)."""
        data = DataDir(data_dir)
        data.require(*(data.split_path(s) for s in SPLITS))
        known = data.interactions_before(before)
        positives = known[known.rating > positive_threshold]
        history: dict[str, list[str]] = {}
        for user, item in zip(positives.user_id, positives.item_id):
            history.setdefault(str(user), []).append(str(item))
        seen: dict[str, set[str]] = {}
        for user, item in zip(known.user_id, known.item_id):
            seen.setdefault(str(user), set()).add(str(item))
        return cls(
            history=history,
            seen=seen,
            popular=[item for item, _ in Counter(str(i) for i in positives.item_id).most_common()],
            prompt_items=prompt_items,
        )

    def whole_history(self, user_id: str, given: Optional[list[str]]) -> list[str]:
        """The request's history when given, else the cached one: what a tilt reads (eval.tilt_history)."""
        return given if given is not None else self.history.get(user_id, [])

    def user_history(self, user_id: str, given: Optional[list[str]]) -> list[str]:
        """The prompt history: the latest ``prompt_items`` of ``whole_history``."""
        return self.whole_history(user_id, given)[-self.prompt_items :]

    def excluded(self, user_id: str, given_history: Optional[list[str]], exclude: Optional[list[str]]) -> set[str]:
        return self.seen.get(user_id, set()) | set(given_history or []) | set(exclude or [])

    def popular_page(self, k: int, excluded: set[str]) -> list[str]:
        return [i for i in self.popular if i not in excluded][:k]
