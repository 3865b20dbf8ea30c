"""A/B assignment: a salted, stable hash bucket of the user id (``pagellm.buckets``), split by weight.

The bucket is the same in every process and on every replica, so a user lands in the same arm
on every request: sticky without any state. Changing the salt reshuffles every user; changing
the weights moves only the users whose bucket crosses a boundary.
"""

from __future__ import annotations

from pagellm.buckets import BUCKETS, bucket


def parse_split(text: str | None, arms: list[str]) -> dict[str, float]:
    """ "A=50,B=50" -> {"A": 50.0, "B": 50.0}; None splits evenly over ``arms``."""
    if not text:
        return {arm: 1.0 for arm in arms}
    split = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            split[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--split: {part!r} is not ARM=WEIGHT") from None
    check_split(split, arms)
    return split


def check_split(split: dict[str, float], arms: list[str]) -> None:
    if set(split) != set(arms):
        raise ValueError(f"the split names arms {sorted(split)} but the arms are {sorted(arms)}")
    if any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
        raise ValueError(f"split weights must be >= 0 with a positive sum, got {split}")


def assign(user_id: str, split: dict[str, float], salt: str) -> str:
    """The arm of ``user_id``: arms own consecutive bucket ranges in proportion to their weight
    (in the order of ``split``)."""
    total, b, edge = sum(split.values()), bucket(user_id, salt), 0.0
    last = None
    for arm, weight in split.items():
        if weight <= 0:
            continue
        edge += weight / total * BUCKETS
        last = arm
        if b < edge:
            return arm
    return last
