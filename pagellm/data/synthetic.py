"""A seeded, simulated marketplace: the embedded default data and the scale benchmark's input.

Items belong to categories of unequal size and have Zipf-like popularity and a latent quality.
Each user's taste is a sparse mixture over categories that drifts from one mixture to another
over the user's active period, so order in time carries signal. Ratings (1-5, including < 3)
rise with the user's affinity for the item's category and the item's quality. Everything is
vectorised with numpy so that 10M interactions take seconds, and the same seed gives the same
tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pagellm.data.schema import INTERACTIONS_SCHEMA, Ingested, build_items

DEFAULT_INTERACTIONS = 60_000
MIN_PER_USER = 5
MEAN_PER_USER = 16
CATEGORIES = (
    "Guitars", "Basses", "Drums", "Keyboards", "Microphones", "Amplifiers", "Effects Pedals",
    "Cables", "Strings", "Picks", "Straps", "Stands", "Tuners", "Headphones", "Recording",
    "DJ Gear", "Ukuleles", "Violins", "Brass", "Woodwinds", "Percussion", "Cases", "Lighting",
    "Sheet Music",
)  # fmt: skip


def _names(prefix: str, n: int) -> pa.Array:
    return pa.array([f"{prefix}{i}" for i in range(n)], pa.string())


def generate_synthetic(n_interactions: int | None = None, seed: int = 0) -> Ingested:
    """Exactly ``n_interactions`` unique (user, item) ratings (default 60,000)."""
    n = int(n_interactions or DEFAULT_INTERACTIONS)
    if n < 100:
        raise ValueError(f"synthetic data needs at least 100 interactions, got {n}")
    rng = np.random.default_rng(seed)
    n_users = max(20, n // MEAN_PER_USER)
    n_items = int(np.clip(8 * np.sqrt(n), 200, 200_000))
    n_cat = len(CATEGORIES)

    # items: category sizes are skewed, popularity is Zipf-like, quality is latent
    cat_share = rng.dirichlet(np.full(n_cat, 2.0))
    item_cat = rng.choice(n_cat, size=n_items, p=cat_share)
    item_pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_pop = item_pop[rng.permutation(n_items)]
    item_quality = rng.normal(0.0, 0.45, n_items)

    # users: two sparse category tastes; interactions drift from the first to the second
    taste_a = rng.dirichlet(np.full(n_cat, 0.25), size=n_users)
    taste_b = rng.dirichlet(np.full(n_cat, 0.25), size=n_users)
    user_bias = rng.normal(0.0, 0.35, n_users)
    extra = rng.lognormal(0.0, 1.0, n_users)
    lengths = MIN_PER_USER + rng.multinomial(max(0, n - MIN_PER_USER * n_users), extra / extra.sum())

    # oversample, then keep each (user, item) once and trim to exactly n rows
    user = np.repeat(np.arange(n_users), np.ceil(lengths * 1.5).astype(int) + 2)
    when = rng.random(len(user))  # position in the user's active period, 0..1
    use_b = rng.random(len(user)) < when
    pick = rng.random(len(user))
    cdf_a, cdf_b = taste_a.cumsum(axis=1), taste_b.cumsum(axis=1)
    cat = np.empty(len(user), dtype=np.int64)
    for lo in range(0, len(user), 1 << 20):  # chunked: a users x categories CDF per row is big
        sl = slice(lo, lo + (1 << 20))
        cdf = np.where(use_b[sl, None], cdf_b[user[sl]], cdf_a[user[sl]])
        cat[sl] = (cdf < pick[sl, None]).sum(axis=1).clip(0, n_cat - 1)
    item = np.empty(len(user), dtype=np.int64)
    for c in range(n_cat):
        rows = np.flatnonzero(cat == c)
        members = np.flatnonzero(item_cat == c)
        if len(members) == 0:  # an empty category: fall back to the whole catalogue
            members = np.arange(n_items)
        cdf = np.cumsum(item_pop[members])
        item[rows] = members[np.searchsorted(cdf, rng.random(len(rows)) * cdf[-1]).clip(0, len(members) - 1)]
    _, first = np.unique(user * n_items + item, return_index=True)
    keep = np.sort(first)
    rank = np.zeros(len(user), dtype=np.int64)  # occurrence number within the user
    u_kept = user[keep]
    start = np.r_[0, np.flatnonzero(np.diff(u_kept)) + 1]
    rank[keep] = np.arange(len(keep)) - np.repeat(start, np.diff(np.r_[start, len(keep)]))
    within = rank[keep] < lengths[u_kept]
    spare = keep[~within]  # unique draws beyond a user's length fill the shortfall, if any
    keep = keep[within]
    if len(keep) < n and len(spare):
        keep = np.sort(np.r_[keep, rng.choice(spare, size=min(n - len(keep), len(spare)), replace=False)])
    if len(keep) > n:
        keep = np.sort(rng.choice(keep, size=n, replace=False))
    user, item, when, use_b = user[keep], item[keep], when[keep], use_b[keep]

    share = np.where(use_b, taste_b[user, item_cat[item]], taste_a[user, item_cat[item]])
    affinity = np.log(share * n_cat + 1e-3)
    score = 3.7 + 0.35 * affinity.clip(-3, 2) + item_quality[item] + user_bias[user]
    rating = np.clip(np.rint(score + rng.normal(0.0, 0.7, len(user))), 1, 5)
    begin = rng.integers(1_262_304_000, 1_514_764_800, n_users)  # 2010 .. 2018
    span = rng.integers(30, 3 * 365, n_users) * 86_400
    ts = begin[user] + (when * span[user]).astype(np.int64)

    interactions = pa.table(
        {
            "user_id": pc.take(_names("u", n_users), pa.array(user)),
            "item_id": pc.take(_names("i", n_items), pa.array(item)),
            "rating": pa.array(rating, pa.float64()),
            "ts": pa.array(ts, pa.int64()),
        },
        schema=INTERACTIONS_SCHEMA,
    )
    used = np.unique(item)
    brand = [f"{CATEGORIES[item_cat[i]].split()[0]}Co {i % 7}" for i in used]
    items = build_items(
        item_ids=[f"i{i}" for i in used],
        category=[CATEGORIES[item_cat[i]] for i in used],
        categories=[[CATEGORIES[item_cat[i]], "Musical Instruments"] for i in used],
        titles=[f"{b} {CATEGORIES[item_cat[i]].rstrip('s')} model {i}" for b, i in zip(brand, used)],
        brands=brand,
    )
    notes = {"source": f"synthetic:{n}", "seed": seed, "users": n_users, "catalogue_items": n_items}
    return Ingested(interactions=interactions, items=items, notes=notes)
