"""Constrained page decoding and the log-probabilities of the pages it writes.

A page may hold only item tokens (and EOS once ``min_items`` are written; EOS is forced after
``max_items``), no item twice, and optionally no item of the prompt's history. The policy
samples in a restricted action space: the contiguous block of item tokens followed by EOS,
index ``a < n_items`` is token ``item_lo + a`` and index ``n_items`` is EOS.

The same per-step mask is applied whenever a log-probability of a page is taken (policy at
sampling time, reference, and the PPO ratio). The pages were drawn from the *masked*
distribution, so that is the distribution whose probabilities PPO's importance ratio and the
KL penalty must compare; with unmasked log-probabilities the KL would also count mass on tokens
that can never be written, and the penalty would fight the constraint instead of measuring how
far the policy moved from the reference on real pages.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from pagellm.config import PAGE_MODES

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PageConstraint:
    item_lo: int  # token id of the first item token (items are one contiguous block)
    n_items: int
    eos_id: int
    min_items: int = 1
    max_items: int = 20
    exclude_history: bool = True

    @classmethod
    def for_vocab(cls, vocab, min_items: int, max_items: int, exclude_history: bool = True) -> "PageConstraint":
        """The constraint over a ``Vocab``'s item block and its EOS."""
        lo, hi = vocab.item_id_range
        return cls(lo, hi - lo, vocab.eos_id, min_items, max_items, exclude_history)

    @property
    def eos_action(self) -> int:
        return self.n_items

    def to_action(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where(tokens == self.eos_id, torch.full_like(tokens, self.n_items), tokens - self.item_lo)

    def to_token(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.where(actions == self.n_items, torch.full_like(actions, self.eos_id), actions + self.item_lo)

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] vocabulary logits -> [..., n_items + 1] action logits (items, then EOS)."""
        items = logits[..., self.item_lo : self.item_lo + self.n_items]
        return torch.cat([items, logits[..., self.eos_id : self.eos_id + 1]], dim=-1)

    def history_actions(self, prompt: Sequence[int]) -> list[int]:
        return [t - self.item_lo for t in prompt if self.item_lo <= t < self.item_lo + self.n_items]


def add_item_bias(action_logits: torch.Tensor, item_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, n_items + 1] action logits with a per-prompt [B, n_items] bias on the items (EOS as is)."""
    if item_bias is None:
        return action_logits
    n = item_bias.shape[-1]
    return torch.cat([action_logits[:, :n] + item_bias, action_logits[:, n:]], dim=-1)


def step_allowed(constraint: PageConstraint, written: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Allowed actions [B, A] for rows that have written ``written`` items, ``banned`` [B, A]
    holding the items already used (and the history). EOS needs ``min_items`` items (or no
    item left to write); after ``max_items`` only EOS is allowed."""
    allowed = ~banned.clone()
    any_item = allowed[:, : constraint.n_items].any(1)
    allowed[:, constraint.eos_action] = (written >= constraint.min_items) | ~any_item
    full = written >= constraint.max_items
    allowed[full, : constraint.n_items] = False
    allowed[full, constraint.eos_action] = True
    return allowed


def initial_banned(constraint: PageConstraint, prompts, banned_items, device) -> torch.Tensor:
    """[B, A] actions no page step may take: the prompt's items (``exclude_history``) and any
    ``banned_items`` (item token ids per prompt)."""
    banned = torch.zeros(len(prompts), constraint.n_items + 1, dtype=torch.bool, device=device)
    sources = ([prompts] if constraint.exclude_history else []) + ([banned_items] if banned_items is not None else [])
    for source in sources:
        for row, tokens in enumerate(source):
            items = constraint.history_actions(tokens)
            if items:
                banned[row, items] = True
    return banned


def allowed_masks(
    constraint: PageConstraint, prompts: Sequence[Sequence[int]], actions: torch.Tensor, step_mask: torch.Tensor
) -> torch.Tensor:
    """The allowed-action mask [B, T, A] at every step of given pages, rebuilt from the prompts
    and the actions written before each step (the same rule ``generate_pages`` applied)."""
    batch, steps = actions.shape
    banned = initial_banned(constraint, prompts, None, actions.device)
    out = torch.empty(batch, steps, constraint.n_items + 1, dtype=torch.bool, device=actions.device)
    rows = torch.arange(batch, device=actions.device)
    for t in range(steps):
        out[:, t] = step_allowed(constraint, torch.full((batch,), t, device=actions.device), banned)
        is_item = (actions[:, t] < constraint.n_items) & step_mask[:, t].bool()
        banned[rows[is_item], actions[is_item, t]] = True
    return out


def masked_log_probs(action_logits: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, A] log-probabilities of the masked, temperature-scaled distribution (-inf where
    not ``allowed``). ``action_logits`` [B, T, A] (``PageConstraint.restrict``)."""
    return (action_logits.float() / temperature).masked_fill(~allowed, NEG_INF).log_softmax(-1)


def masked_logprobs(
    action_logits: torch.Tensor, allowed: torch.Tensor, actions: torch.Tensor, temperature: float = 1.0
):
    """log pi(a_t) and the entropy of the masked, temperature-scaled distribution at every step.
    ``action_logits`` [B, T, A] (``PageConstraint.restrict``), ``allowed`` [B, T, A]."""
    log_probs = masked_log_probs(action_logits, allowed, temperature)
    logp = log_probs.gather(-1, actions.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # padding steps (action -1) get 0, never -inf, so that masked sums and ratios stay finite
    logp = torch.where((actions >= 0) & torch.isfinite(logp), logp, torch.zeros_like(logp))
    probs = log_probs.exp()
    entropy = -(probs * log_probs.masked_fill(~allowed, 0.0)).sum(-1)
    return logp, entropy


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, order, sorted_logits)


@dataclass
class Pages:
    """Generated pages: ``actions`` [B, T] in the action space (padding -1 after EOS), the
    matching token ids, and ``step_mask`` [B, T] of real steps (EOS included)."""

    actions: torch.Tensor
    tokens: torch.Tensor
    step_mask: torch.Tensor
    # log-probability of each written action under the masked distribution it was drawn from
    # (``generate_pages(with_logprobs=True)``; serving returns them as item scores)
    logprobs: Optional[torch.Tensor] = None

    def item_tokens(self, constraint: PageConstraint) -> list[list[int]]:
        return [
            [int(t) for t, m in zip(row, mask) if m and t != constraint.eos_id]
            for row, mask in zip(self.tokens, self.step_mask)
        ]


def cache_argument(model) -> str:
    """The name of the KV-cache argument (and output field) of ``model``'s forward: ``cache`` in
    transformers 5.x (where ``past_key_values`` is deprecated and warns), ``past_key_values``
    before. A PEFT wrapper's forward takes ``**kwargs``: its base model's signature decides; a
    ``MemberEnsemble`` names its members'."""
    if hasattr(model, "members"):
        return cache_argument(model.members[0])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_pages(
    model,
    prompts: Sequence[Sequence[int]],
    constraint: PageConstraint,
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    banned_items: Optional[Sequence[Sequence[int]]] = None,
    with_logprobs: bool = False,
    item_bias: Optional[torch.Tensor] = None,
) -> Pages:
    """Write one page per prompt under the constraint, with the model's KV cache.
    ``banned_items`` adds, per prompt, item token ids that may not be written (evaluation masks
    every item the user has already seen, not only the prompt's); ``item_bias`` [B, n_items] is
    added to the items' logits at every slot (a policy's ``FineTilt``)."""
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    banned = initial_banned(constraint, prompts, banned_items, device)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache = cache_argument(model)
    written = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    actions, step_masks, step_logprobs = [], [], []
    for _ in range(constraint.max_items + 1):
        allowed = step_allowed(constraint, written, banned)
        logits = add_item_bias(constraint.restrict(out.logits[:, -1].float()), item_bias).masked_fill(~allowed, NEG_INF)
        if greedy:
            action = logits.argmax(-1)
        else:
            probs = _top_p_filter(logits / temperature, top_p).softmax(-1)
            action = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        action = torch.where(done, torch.full_like(action, -1), action)
        if with_logprobs:
            scaled = logits if greedy else logits / temperature
            step_logprobs.append(
                scaled.log_softmax(-1).gather(-1, action.clamp(min=0)[:, None]).squeeze(-1).masked_fill(done, 0.0)
            )
        actions.append(action)
        step_masks.append(~done)
        is_item = (action >= 0) & (action < constraint.n_items)
        banned[rows[is_item], action[is_item]] = True
        written += is_item.long()
        done = done | (action == constraint.eos_action)
        if bool(done.all()):
            break
        token = constraint.to_token(action.clamp(min=0))
        attention = torch.cat([attention, torch.ones(batch, 1, dtype=attention.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache: getattr(out, cache)},
        )
    actions_t = torch.stack(actions, 1)
    mask = torch.stack(step_masks, 1)
    tokens = torch.where(mask, constraint.to_token(actions_t.clamp(min=0)), torch.full_like(actions_t, pad_id))
    logprobs = torch.stack(step_logprobs, 1).cpu() if with_logprobs else None
    return Pages(actions_t.cpu(), tokens.cpu(), mask.cpu(), logprobs)


@torch.no_grad()
def fill_by_score(
    model,
    prompts: Sequence[Sequence[int]],
    pages: Sequence[Sequence[int]],
    constraint: PageConstraint,
    pad_id: int,
    k: int,
    banned_items: Optional[Sequence[Sequence[int]]] = None,
    item_bias: Optional[torch.Tensor] = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Extend each (possibly empty) page of item tokens to ``k`` items with the items the model
    ranks highest for the next slot: one forward pass over [prompt || page], the next-token
    distribution (items' logits plus ``item_bias``) renormalised over the item block less the
    prompt's history (``exclude_history``), ``banned_items`` and the page's own items. Returns the
    added tokens and their log-probabilities under that distribution, best first."""
    device = next(model.parameters()).device
    seqs = [list(p) + list(w) for p, w in zip(prompts, pages)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):  # left padding: the next slot is the last column
        ids[row, width - len(seq) :] = torch.tensor(seq)
        attention[row, width - len(seq) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device))
    items = add_item_bias(constraint.restrict(logits.logits[:, -1].float()), item_bias)[:, : constraint.n_items]
    banned = initial_banned(constraint, prompts, banned_items, device)[:, : constraint.n_items]
    for row, page in enumerate(pages):
        banned[row, constraint.history_actions(page)] = True
    logp = items.masked_fill(banned, NEG_INF).log_softmax(-1)
    tokens, scores = [], []
    for row, page in enumerate(pages):
        need = min(max(0, k - len(page)), int((~banned[row]).sum()))
        top = logp[row].topk(need)
        tokens.append((top.indices + constraint.item_lo).tolist())
        scores.append(top.values.tolist())
    return tokens, scores


def write_pages(
    model,
    prompts: Sequence[Sequence[int]],
    constraint: PageConstraint,
    pad_id: int,
    k: int,
    mode: str = "generate",
    hybrid_items: int = 3,
    banned_items: Optional[Sequence[Sequence[int]]] = None,
    item_bias: Optional[torch.Tensor] = None,
    **sampling,
) -> tuple[list[list[int]], list[list[float]]]:
    """Pages of ``k`` item tokens and each item's log-probability, by ``mode``: ``generate``
    writes all k slots under the constraint (``generate_pages``; ``sampling``: greedy,
    temperature, top_p, generator), ``score`` ranks the item block by the first slot's
    distribution (one forward pass), ``hybrid`` generates the first ``hybrid_items`` and fills
    the rest by the distribution after them (``fill_by_score``); ``item_bias`` [B, n_items] is
    added to the items' logits of every slot, in every mode."""
    if mode not in PAGE_MODES:
        raise ValueError(f"page mode must be one of {PAGE_MODES}, got {mode!r}")
    n = {"generate": k, "score": 0, "hybrid": min(hybrid_items, k)}[mode]
    tokens: list[list[int]] = [[] for _ in prompts]
    scores: list[list[float]] = [[] for _ in prompts]
    if n:
        head = replace(constraint, min_items=n, max_items=n)
        pages = generate_pages(
            model, prompts, head, pad_id, banned_items=banned_items, with_logprobs=True, item_bias=item_bias, **sampling
        )
        for row in range(len(prompts)):
            steps = [
                (int(t), float(lp))
                for t, lp, m in zip(pages.tokens[row], pages.logprobs[row], pages.step_mask[row])
                if m and t != constraint.eos_id
            ]
            tokens[row], scores[row] = [t for t, _ in steps], [lp for _, lp in steps]
    if n < k:
        more, more_scores = fill_by_score(model, prompts, tokens, constraint, pad_id, k, banned_items, item_bias)
        tokens = [t + m for t, m in zip(tokens, more)]
        scores = [s + m for s, m in zip(scores, more_scores)]
    return tokens, scores


def rollout_batch(prompts: Sequence[Sequence[int]], pages: Pages, pad_id: int):
    """[prompt || page] right-padded, and for each page step the position whose logits predict
    it (the token before it). Returns input_ids, attention_mask, logit_positions [B, T]."""
    lengths = pages.step_mask.sum(1).tolist()
    width = max(len(p) + n for p, n in zip(prompts, lengths))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (prompt, n) in enumerate(zip(prompts, lengths)):
        seq = list(prompt) + pages.tokens[row, :n].tolist()
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    starts = torch.tensor([len(p) - 1 for p in prompts])
    positions = (starts[:, None] + torch.arange(pages.actions.shape[1])[None, :]).clamp(max=width - 1)
    return ids, attention, positions


def gather_steps(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, ...] -> [B, T, ...] at the given per-row positions."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return hidden[rows, positions.to(hidden.device)]
