"""Stable hash buckets: a key lands in the same bucket in every process and on every machine
(Python's ``hash`` of a str differs per process), so splits by user (A/B arms, held-out users
and rows) need no shared state. Changing the salt reshuffles every key."""

from __future__ import annotations

import zlib

BUCKETS = 10_000


def bucket(key: str, salt: str = "") -> int:
    """crc32 of ``"salt:key"`` (of the bare key when there is no salt), in [0, BUCKETS)."""
    text = f"{salt}:{key}" if salt else key
    return zlib.crc32(text.encode()) % BUCKETS


def in_share(key: str, share: float, salt: str = "") -> bool:
    """Whether ``key`` falls in the first ``share`` of the buckets."""
    return bucket(key, salt) < share * BUCKETS
