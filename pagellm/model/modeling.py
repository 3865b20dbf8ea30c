"""Models: the policy LM (GPT-2 family), its rating head, and the two reward models.

Every model saves in Hugging Face format (safetensors) so a stage's output directory loads with
``from_pretrained``; heads are small extra safetensors files next to the backbone.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from pagellm.config import REWARD_POOLINGS, ModelConfig
from pagellm.errors import ConfigError
from pagellm.model.multivae import MultiVAE
from pagellm.model.sasrec import SASRec
from pagellm.model.vocab import Vocab

# Fits side by side (``train.side_by_side``) build and load models from driver threads, and two
# things are one per process: torch's global generator (a seed set by one thread must not be
# drawn from by another) and transformers' loading, which swaps PreTrainedModel.tie_weights and
# torch's init functions for no-ops while it runs: two loads at once leave them swapped for good,
# and every later model of the process has an untied LM head. Re-entrant: build_lm loads.
BUILD_LOCK = threading.RLock()

RATING_HEAD_FILE = "rating_head.safetensors"
REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_META_FILE = "reward_head.json"


def p5_init_new_embeddings(model: PreTrainedModel, first_new: int, generator: torch.Generator | None = None) -> None:
    """P5 (paper 4.2.1): rows from ``first_new`` on ~ N(0, var of the existing rows)."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        std = weight[:first_new].float().std().item()
        new = torch.randn(weight.shape[0] - first_new, weight.shape[1], generator=generator) * std
        weight[first_new:] = new.to(weight.dtype)


def cooccurrence_item_vectors(user_items: Iterable[np.ndarray], n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows ``U_k sqrt(S_k)`` of the rank-``dim`` truncated SVD of the positive PMI matrix of item
    co-occurrence (two items co-occur when one user liked both; the diagonal left out), sparse
    throughout so a large catalogue costs its co-occurrences, not n_items^2. ``user_items``: each
    user's item indices in [0, n_items). An item that co-occurs with nothing gets a zero row."""
    keys = [(a[:, None] * n_items + a[None, :]).ravel() for a in map(np.unique, user_items) if len(a) > 1]
    out = np.zeros((n_items, dim), dtype=np.float32)
    if not keys:
        return out
    pair, count = np.unique(np.concatenate(keys), return_counts=True)
    i, j = np.divmod(pair, n_items)
    off = i != j
    i, j, count = i[off], j[off], count[off].astype(np.float64)
    marginal = np.bincount(i, weights=count, minlength=n_items)
    pmi = np.log(count * count.sum() / (marginal[i] * marginal[j]))
    keep = pmi > 0
    if not keep.any():
        return out
    matrix = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([i[keep], j[keep]])),
        torch.from_numpy(pmi[keep]),
        (n_items, n_items),
        check_invariants=True,
    ).coalesce()
    rank = min(dim, n_items)
    with BUILD_LOCK, torch.random.fork_rng():  # svd_lowrank draws its sketch from the global generator
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(matrix, q=rank, niter=4)
    out[:, :rank] = (u * s.sqrt()).numpy()
    out[np.bincount(i[keep], minlength=n_items) == 0] = 0.0  # null-space noise of the sketch
    return out


def collaborative_item_vectors(train, vocab, positive_threshold: float, dim: int, seed: int = 0) -> np.ndarray:
    """``cooccurrence_item_vectors`` of the training positives (a frame of user_id, item_id,
    rating), one row per item token of ``vocab`` in token order (``model.item_init``)."""
    lo, hi = vocab.item_id_range
    pos = train[train.rating > positive_threshold]
    index = np.array([vocab.item_token[i] - lo for i in pos.item_id], dtype=np.int64)
    groups = pd.Series(index).groupby(pos.user_id.to_numpy()).agg(np.array)
    return cooccurrence_item_vectors(groups.tolist(), hi - lo, dim, seed)


def load_pretrained(auto_class, directory: str | Path) -> PreTrainedModel:
    """``auto_class.from_pretrained(directory)`` under ``BUILD_LOCK``: every model load of the
    package goes through here."""
    with BUILD_LOCK:
        return auto_class.from_pretrained(directory)


def build_lm(
    model_cfg: ModelConfig, tokenizer, base_size: int, seed: int = 0, item_vectors: Optional[np.ndarray] = None
) -> PreTrainedModel:
    """The policy LM with the user/item tokens: a pretrained model (name or local path) with
    resized embeddings, or the embedded small GPT-2; optional LoRA (base frozen). New rows are
    P5-initialised; ``item_vectors`` (one row per item token, ``collaborative_item_vectors``)
    then replace the item rows that are not zero, rescaled to the P5 rows' std."""
    with BUILD_LOCK:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if model_cfg.name_or_path:
            model = load_pretrained(AutoModelForCausalLM, model_cfg.name_or_path)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        else:
            config = GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=model_cfg.max_seq_len,
                n_embd=model_cfg.n_embd,
                n_layer=model_cfg.n_layer,
                n_head=model_cfg.n_head,
                resid_pdrop=model_cfg.dropout,
                embd_pdrop=model_cfg.dropout,
                attn_pdrop=model_cfg.dropout,
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            model = GPT2LMHeadModel(config)
        model.config.pad_token_id = tokenizer.pad_token_id
        p5_init_new_embeddings(model, base_size, gen)
        if item_vectors is not None:
            lo, hi = Vocab.from_tokenizer(tokenizer).item_id_range
            weight, vectors = model.get_input_embeddings().weight, torch.as_tensor(item_vectors, dtype=torch.float32)
            known = vectors.norm(dim=1) > 0
            if len(vectors) != hi - lo:
                raise ValueError(f"item_vectors has {len(vectors)} rows for {hi - lo} item tokens")
            if known.any():
                with torch.no_grad():
                    std = weight[base_size:].float().std()
                    block = weight[lo:hi]
                    block[known] = (vectors[known] * (std / vectors[known].std())).to(weight.dtype)
        if model_cfg.lora_rank > 0:
            model = apply_lora(model, model_cfg, list(range(base_size, len(tokenizer))))
        return model


# the attention projections LoRA adapts by default, per Hugging Face model_type (the LoRA paper's q, v)
LORA_TARGETS = {
    "gpt2": ["c_attn"],  # q, k, v in one Conv1D
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


def lora_targets(model_type: str, configured: Optional[list[str]] = None) -> list[str]:
    """The modules that get LoRA adapters: ``model.lora_targets`` when set, else by architecture."""
    if configured:
        return list(configured)
    if model_type not in LORA_TARGETS:
        known = "; ".join(f"{k}: {v}" for k, v in LORA_TARGETS.items())
        raise ConfigError(
            f"model.lora_targets: no default for architecture '{model_type}'; name its attention "
            f"projection modules (defaults known: {known})"
        )
    return LORA_TARGETS[model_type]


def apply_lora(model: PreTrainedModel, model_cfg: ModelConfig, new_token_ids: list[int]):
    """peft LoRA on ``lora_targets`` (by architecture unless configured); the base is frozen but
    the new user/item token rows train (they start random, so freezing them would leave the
    model unable to name items)."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    config = LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=lora_targets(model_type, model_cfg.lora_targets),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's projections are Conv1D (weights transposed)
        trainable_token_indices=new_token_ids,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def unwrap_lm(model) -> PreTrainedModel:
    """A plain HF model: LoRA adapters merged in, so the result loads with from_pretrained."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding)."""
    return attention_mask.long().sum(dim=1) - 1


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods over labelled positions, and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, (shift_labels != -100).sum()


class PolicyWithRatingHead(nn.Module):
    """The LM plus the rating regression head of meta pre-training (eq. 7-8).

    Rows with ``labels`` train next-token prediction (eq. 8) on their labelled tokens; rows with
    a finite ``rating`` regress the score read from the hidden state of their last token
    (the prompt "user_u item_i") onto r_ui (eq. 7). The loss is their sum.
    """

    def __init__(self, lm: PreTrainedModel, rating_loss_weight: float = 1.0):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size  # n_embd on GPT-2 (transformers maps the name)
        self.rating_head = nn.Linear(hidden, 1)
        self.rating_loss_weight = rating_loss_weight

    def forward(self, input_ids, attention_mask, labels, rating):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        nll, n_tokens = token_nll(out.logits, labels)
        lm_loss = nll / n_tokens.clamp(min=1)
        rated = torch.isfinite(rating)
        hidden = out.hidden_states[-1][torch.arange(len(input_ids)), last_token_index(attention_mask)]
        pred = self.rating_head(hidden).squeeze(-1)
        sq_err = ((pred - rating.nan_to_num(0.0)) ** 2) * rated
        rating_loss = sq_err.sum() / rated.sum().clamp(min=1)
        loss = lm_loss + self.rating_loss_weight * rating_loss
        return loss, {"lm_loss": lm_loss.detach(), "rating_mse": rating_loss.detach()}

    def save_heads(self, directory: Path) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.rating_head.state_dict().items()},
            str(directory / RATING_HEAD_FILE),
        )


def page_unlikelihood(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level unlikelihood (Welleck et al., 2019) on the schema errors of a page.

    At every target position of a row (its labelled span, the page), the items already written
    in that page and, at the first position only, EOS (pages are never empty) are negative
    candidates: the loss is -sum log(1 - p(candidate)). Maximum likelihood alone leaves these
    tokens with a small probability that greedy decoding still picks when the probability of
    the right item is spread over a large catalogue. Returns (sum, number of target positions).
    """
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    labelled = shift_labels != -100
    lengths = labelled.sum(1)
    width = int(lengths.max().item()) if len(lengths) else 0
    if width == 0:
        zero = logits.sum() * 0.0
        return zero, lengths.sum()
    start = labelled.float().argmax(1)  # the page is one contiguous labelled span
    offsets = torch.arange(width, device=logits.device)
    valid = offsets[None, :] < lengths[:, None]  # [B, P]
    pos = (start[:, None] + offsets[None, :]).clamp(max=shift_labels.shape[1] - 1)
    rows = torch.arange(len(labels), device=logits.device)[:, None]
    log_probs = shift_logits[rows, pos].float().log_softmax(-1)  # [B, P, V]
    page_tokens = shift_labels[rows, pos].clamp(min=0)  # [B, P]
    # p[b, t, s] = probability at step t of the token written at step s; candidates s < t
    probs = log_probs.gather(2, page_tokens[:, None, :].expand(-1, width, -1)).exp()
    earlier = torch.tril(torch.ones(width, width, dtype=torch.bool, device=logits.device), diagonal=-1)
    not_eos = page_tokens != eos_id
    repeat = earlier[None] & valid[:, :, None] & valid[:, None, :] & not_eos[:, None, :]
    loss = -(torch.log1p(-probs.clamp(max=1 - 1e-6)) * repeat).sum()
    p_eos_first = log_probs[:, 0, eos_id].exp().clamp(max=1 - 1e-6)
    loss = loss - (torch.log1p(-p_eos_first) * (lengths > 0)).sum()
    return loss, lengths.sum()


def ranking_validation(
    item_logits: torch.Tensor, banned: torch.Tensor, target: torch.Tensor, k: int = 100
) -> tuple[torch.Tensor, dict]:
    """The evaluation protocol inside a training loop: each row's next-slot item logits [B, N]
    rank the item block with its ``banned`` items (indices, -1 padded) masked; returns the mean
    negative log-likelihood of the ``target`` items (indices, -1 padded) and NDCG@k with binary
    gains (``pagellm.eval.metrics.ndcg_at_k``)."""
    rows = torch.arange(len(item_logits), device=item_logits.device)[:, None]
    masked = item_logits.float().masked_fill(
        torch.zeros_like(item_logits, dtype=torch.bool).index_put(
            (rows.expand_as(banned)[banned >= 0], banned[banned >= 0]), torch.tensor(True, device=banned.device)
        ),
        float("-inf"),
    )
    logp = masked.log_softmax(-1)
    real = target >= 0
    nll = -(logp.gather(1, target.clamp(min=0)).masked_fill(~real, 0.0)).sum() / real.sum().clamp(min=1)
    top = masked.topk(min(k, masked.shape[1]), dim=-1).indices
    hit = (top[:, :, None] == target[:, None, :]).any(-1) & torch.isfinite(masked.gather(1, top))
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, device=top.device, dtype=torch.float32))
    ideal = torch.cumsum(discount, 0)[(real.sum(1).clamp(max=top.shape[1]) - 1).clamp(min=0)]
    ndcg = torch.where(real.any(1), (hit.float() * discount).sum(1) / ideal, torch.zeros_like(ideal))
    return nll, {f"ndcg@{k}": ndcg.mean().detach()}


def future_items_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean negative log-likelihood of each row's targets (a [rows, k]
    index tensor, -1 padded) under the softmax of ``logits``: a multinomial over the items the
    user rates next (PinnerFormer's dense all-action loss); with one target per row, cross-entropy."""
    logp = logits.float().log_softmax(-1)
    valid = targets >= 0
    picked = logp.gather(1, targets.clamp(min=0)) * valid
    return (-picked.sum(1) / valid.sum(1).clamp(min=1)).mean()


class NextItemLM(nn.Module):
    """Next-item pre-training (the paper's pattern (d) done as sequential recommenders do it):
    cross-entropy over the item block at the page's first slot, the last position of a
    left-padded prompt, against ``next_item`` ([rows, k] indices into the item block, -1
    padded: the next ``sft.next_item_horizon`` items, ``future_items_nll``). Validation rows
    carry ``banned`` and ``target`` instead and are scored by ``ranking_validation`` there.

    Only that position is projected onto the vocabulary (``logits_to_keep=1``): projecting every
    position was ~88% of a 2 x 64 model's step, 8.1-8.3x slower (docs/benchmarks.md)."""

    def __init__(self, lm: PreTrainedModel, item_lo: int, n_items: int):
        super().__init__()
        self.lm, self.item_lo, self.n_items = lm, item_lo, n_items

    def forward(self, input_ids, attention_mask, position_ids=None, next_item=None, banned=None, target=None):
        logits = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
        ).logits
        items = logits[:, -1, self.item_lo : self.item_lo + self.n_items]
        if next_item is None:
            return ranking_validation(items, banned, target)
        loss = future_items_nll(items, next_item)
        return loss, {"item_loss": loss.detach()}


class PolicyLM(nn.Module):
    """Golden-list fine-tuning (eq. 9): next-token loss on the target tokens only, plus an
    optional unlikelihood term on repeated items and an empty page (``page_unlikelihood``).
    Validation rows with ``banned``/``target`` (and ``item_range``) are scored by
    ``ranking_validation`` at the page's first slot, the evaluation protocol's score mode."""

    def __init__(
        self,
        lm: PreTrainedModel,
        unlikelihood_weight: float = 0.0,
        eos_id: int | None = None,
        item_range: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.unlikelihood_weight = unlikelihood_weight
        self.eos_id = lm.config.eos_token_id if eos_id is None else eos_id
        self.item_range = item_range

    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, banned=None, target=None):
        if labels is None:
            lo, hi = self.item_range
            logits = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
            ).logits
            return ranking_validation(logits[:, -1, lo:hi], banned, target)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        nll, n_tokens = token_nll(out.logits, labels)
        lm_loss = nll / n_tokens.clamp(min=1)
        if not self.unlikelihood_weight:
            return lm_loss, {"lm_loss": lm_loss.detach()}
        ul, n = page_unlikelihood(out.logits, labels, self.eos_id)
        ul_loss = ul / n.clamp(min=1)
        loss = lm_loss + self.unlikelihood_weight * ul_loss
        return loss, {"lm_loss": lm_loss.detach(), "unlikelihood": ul_loss.detach()}


def item_weights(item_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Each item's weight in R_f (rows sum to 1 over a page's items, 0 elsewhere): ``mean``
    1/n (eq. 13), ``dcg`` the slot's DCG discount 1/log2(1 + slot) normalised, so the top of the
    page counts as it does in NDCG. Works on any layout where ``item_mask`` marks the items."""
    mask = item_mask.float()
    if pooling == "dcg":
        slot = mask.cumsum(1)
        mask = torch.where(mask > 0, 1.0 / torch.log2(slot + 1).clamp(min=1e-12), 0.0)
    return mask / mask.sum(1, keepdim=True).clamp(min=1e-12)


class RewardModel(nn.Module):
    """A GPT-2 backbone with a scalar head.

    coarse (eq. 10): R_c = head(h at the last token of [prompt || list]), the pooled final state.
    fine (eq. 13):   R_f = the ``item_weights``-weighted sum over the list's item positions of
                     head(h_t), one score per item (``pooling``: mean, the paper's, or dcg).
    """

    def __init__(self, backbone: PreTrainedModel, kind: str, pooling: str = "mean"):
        super().__init__()
        if kind not in ("coarse", "fine"):
            raise ValueError(f"reward kind must be 'coarse' or 'fine', got {kind!r}")
        if pooling not in REWARD_POOLINGS:
            raise ValueError(f"reward pooling must be one of {REWARD_POOLINGS}, got {pooling!r}")
        self.backbone, self.kind, self.pooling = backbone, kind, pooling
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def item_scores(self, input_ids, attention_mask, item_mask=None) -> torch.Tensor:
        """A score at every position (the item there, for R_f); ``item_mask`` is not needed:
        the causal backbone reads what came before."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1)

    def score(self, input_ids, attention_mask, item_mask) -> torch.Tensor:
        scores = self.item_scores(input_ids, attention_mask)
        if self.kind == "coarse":
            return scores[torch.arange(len(input_ids)), last_token_index(attention_mask)]
        return (scores * item_weights(item_mask, self.pooling)).sum(1)

    def forward(self, input_ids, attention_mask, item_mask, n_pairs=None):
        """Bradley-Terry (eq. 11 / eq. 14): rows [0, n) are chosen lists, rows [n, 2n) the
        rejected lists of the same pairs."""
        r = self.score(input_ids, attention_mask, item_mask)
        n = len(r) // 2
        margin = r[:n] - r[n:]
        loss = -F.logsigmoid(margin).mean()
        return loss, {"bt_loss": loss.detach(), "accuracy": (margin > 0).float().mean().detach()}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
            str(directory / REWARD_HEAD_FILE),
        )
        (directory / REWARD_META_FILE).write_text(json.dumps({"kind": self.kind, "pooling": self.pooling}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "RewardModel":
        directory = Path(directory)
        meta = json.loads((directory / REWARD_META_FILE).read_text())
        model = cls(load_pretrained(AutoModel, directory), meta["kind"], meta.get("pooling", "mean"))
        model.head.load_state_dict(load_file(str(directory / REWARD_HEAD_FILE)))
        return model

    @classmethod
    def from_policy(cls, policy_dir: str | Path, kind: str, pooling: str = "mean") -> "RewardModel":
        """Backbone initialised from the SFT policy (its LM head is dropped; of an ensemble
        policy, its first member's)."""
        from pagellm.model.ensemble import lm_dirs

        return cls(load_pretrained(AutoModel, lm_dirs(policy_dir)[0]), kind, pooling)


class CollaborativeReward(nn.Module):
    """R_f from a collaborative model (``reward.fine_model=multivae``, ours): each item of the
    list scores log(n p(item | the row's other items)), n the item block's size, the history
    being every item token outside ``item_mask`` (the prompt's items); pooled over the list by
    ``item_weights`` as the LM fine head. p is a Multi-VAE fitted on the training positives, or
    an ensemble (``reward.fine_vaes``, ``reward.fine_itemknn``, ``reward.fine_ease``,
    ``reward.fine_sasrecs``): the mean log-probability of several Multi-VAEs plus, for each
    item-item view (ItemKNN's similarities, EASE's weights), its weight x the log of its scores
    normalised to sum 1, plus ``sasrec_weight`` x the mean log-softmax of SASRec seeds reading the
    history in order (the last ``max_len`` items): a geometric mixture of views that err
    differently, the set views blind to order, SASRec to everything older than its window. A
    log-probability is a Bradley-Terry score as it stands (Luce's choice rule: P(a over b) =
    p_a / (p_a + p_b)), so nothing is fitted on D_reward; the log n terms make a uniform guess score 0. Columns are the item block (token id
    - ``item_lo``)."""

    kind = "fine"
    FILE = "collaborative.safetensors"
    VIEWS = ("knn", "ease")  # item-item views, in the order they are summed

    def __init__(
        self,
        vaes: nn.Module | Sequence[nn.Module],
        item_lo: int,
        pooling: str = "mean",
        views: Optional[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = None,
        sasrecs: Sequence[SASRec] = (),
        sasrec_weight: float = 0.0,
    ):
        """``views``: name (``VIEWS``) -> (index, value, weight), an item-item matrix kept sparse as
        each row's top entries [n_items, k] (row i: the items history item i lends its value to).
        ``sasrecs``: SASRec models over the same item block (item k is SASRec's k + 1)."""
        super().__init__()
        if pooling not in REWARD_POOLINGS:
            raise ValueError(f"reward pooling must be one of {REWARD_POOLINGS}, got {pooling!r}")
        unknown = set(views or {}) - set(self.VIEWS)
        if unknown:
            raise ValueError(f"unknown item-item views {sorted(unknown)}; choose from {self.VIEWS}")
        self.vaes = nn.ModuleList([vaes] if isinstance(vaes, nn.Module) else vaes)
        self.item_lo, self.pooling = item_lo, pooling
        self.n_items = self.vaes[0].decoder[-1].out_features
        self.view_weights = {name: float(weight) for name, (_, _, weight) in (views or {}).items()}
        for name, (index, value, _) in (views or {}).items():
            self.register_buffer(f"{name}_index", index.long(), persistent=False)
            self.register_buffer(f"{name}_value", value.float(), persistent=False)
        # a weight of 0 leaves the sequential view out (and its models unsaved)
        self.sasrec_weight = float(sasrec_weight) if sasrecs else 0.0
        self.sasrecs = nn.ModuleList(sasrecs if self.sasrec_weight else [])

    def _items(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        block = input_ids - self.item_lo
        return block, (block >= 0) & (block < self.n_items) & attention_mask.bool()

    def _view_logq(self, name: str, block, history) -> torch.Tensor:
        """log of an item-item view's scores (each history item lends its row's values), normalised
        to sum 1 over the block; an item whose score is not positive gets a floor of 1e-12."""
        rows, length = block.shape
        index = getattr(self, f"{name}_index")[block.clamp(0, self.n_items - 1)]  # [B, L, k]
        value = getattr(self, f"{name}_value")[block.clamp(0, self.n_items - 1)] * history[..., None]
        s = torch.zeros(rows, self.n_items, device=block.device)
        s.scatter_add_(1, index.reshape(rows, -1), value.reshape(rows, -1))
        s = s.clamp(min=1e-12)
        return (s / s.sum(1, keepdim=True)).log()

    def _sasrec_logp(self, block, history) -> torch.Tensor:
        """The SASRec seeds' mean log-softmax after each row's history items, taken in their order
        (the last ``max_len``), as ``pagellm.eval.baselines.sasrec_scores`` reads a user."""
        length, width = history.sum(1), block.shape[1]
        first = torch.argsort((~history).to(torch.int8), dim=1, stable=True)  # history positions first, in order
        seq = torch.where(torch.arange(width, device=block.device) < length[:, None], block.gather(1, first) + 1, 0)
        keep = self.sasrecs[0].max_len
        seq = F.pad(seq, (0, max(0, keep - width)))
        start = (length - keep).clamp(min=0)
        seq = seq.gather(1, start[:, None] + torch.arange(keep, device=block.device))
        lengths = length.clamp(min=1, max=keep)
        return torch.stack([m(seq, lengths).log_softmax(-1) for m in self.sasrecs]).mean(0)

    def _block_logp(self, block, history) -> torch.Tensor:
        rows = torch.arange(len(block), device=block.device)[:, None].expand_as(block)
        x = torch.zeros(len(block), self.n_items, device=block.device)
        x[rows[history], block[history]] = 1.0
        logp = torch.stack([vae(x)[0].log_softmax(-1) for vae in self.vaes]).mean(0)
        for name, weight in self.view_weights.items():
            logp = logp + weight * self._view_logq(name, block, history)
        if self.sasrec_weight:
            logp = logp + self.sasrec_weight * self._sasrec_logp(block, history)
        total = 1.0 + sum(self.view_weights.values()) + self.sasrec_weight
        return logp + total * math.log(self.n_items)

    def block_scores(self, input_ids, attention_mask) -> torch.Tensor:
        """[B, n_items] log(n p(item | every item token of the row)): each item's score as the
        next item of a list after these ids (a prompt)."""
        block, is_item = self._items(input_ids, attention_mask)
        return self._block_logp(block, is_item)

    def prompt_scores(self, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """``block_scores`` of token-id prompts of any lengths: [len(prompts), n_items]."""
        device = next(self.parameters()).device
        ids = pad_batch(prompts, pad_id).to(device)
        return self.block_scores(ids, pad_batch([[1] * len(p) for p in prompts], 0).to(device))

    def item_scores(self, input_ids, attention_mask, item_mask) -> torch.Tensor:
        """log(n p(token at t | history)) at every item position t, 0 elsewhere."""
        block, is_item = self._items(input_ids, attention_mask)
        logp = self._block_logp(block, is_item & ~item_mask.bool())
        return torch.where(is_item, logp.gather(1, block.clamp(0, self.n_items - 1)), 0.0)

    def score(self, input_ids, attention_mask, item_mask) -> torch.Tensor:
        scores = self.item_scores(input_ids, attention_mask, item_mask)
        return (scores * item_weights(item_mask, self.pooling)).sum(1)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"vaes.{k}": v for k, v in self.vaes.state_dict().items()}
        tensors.update({f"sasrecs.{k}": v for k, v in self.sasrecs.state_dict().items()})
        for name in self.view_weights:
            tensors.update(
                {f"{name}.index": getattr(self, f"{name}_index").int(), f"{name}.value": getattr(self, f"{name}_value")}
            )
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / self.FILE))
        hidden, latent = self.vaes[0].encoder[0].out_features, self.vaes[0].latent
        meta = {"kind": "fine", "model": "multivae", "pooling": self.pooling, "item_lo": self.item_lo}
        meta.update(n_items=self.n_items, hidden=hidden, latent=latent, vaes=len(self.vaes))
        for name, weight in self.view_weights.items():
            meta.update({f"{name}_weight": weight, f"{name}_neighbours": getattr(self, f"{name}_index").shape[1]})
        if self.sasrec_weight:
            meta.update(sasrecs=len(self.sasrecs), sasrec_weight=self.sasrec_weight, sasrec_shape=self.sasrecs[0].shape)
        (directory / REWARD_META_FILE).write_text(json.dumps(meta))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CollaborativeReward":
        directory = Path(directory)
        meta = json.loads((directory / REWARD_META_FILE).read_text())
        tensors = load_file(str(directory / cls.FILE))
        vaes = nn.ModuleList(
            [MultiVAE(meta["n_items"], meta["hidden"], meta["latent"]) for _ in range(meta.get("vaes", 1))]
        )
        if "vaes" in meta:
            vaes.load_state_dict({k[len("vaes.") :]: v for k, v in tensors.items() if k.startswith("vaes.")})
        else:  # a single Multi-VAE saved before ensembles (its keys unprefixed)
            vaes[0].load_state_dict(tensors)
        views = {  # a view saved with weight 0 (ItemKNN before EASE, when off) is left out
            name: (tensors[f"{name}.index"], tensors[f"{name}.value"], meta[f"{name}_weight"])
            for name in cls.VIEWS
            if meta.get(f"{name}_weight")
        }
        sasrecs = nn.ModuleList(
            [SASRec(meta["n_items"], **meta["sasrec_shape"]) for _ in range(meta.get("sasrecs", 0))]
        )
        sasrecs.load_state_dict({k[len("sasrecs.") :]: v for k, v in tensors.items() if k.startswith("sasrecs.")})
        return cls(
            list(vaes), meta["item_lo"], meta["pooling"], views, list(sasrecs), meta.get("sasrec_weight", 0.0)
        ).eval()


def load_reward_head(directory: str | Path) -> RewardModel | CollaborativeReward:
    """A reward stage's ``coarse`` or ``fine`` directory, whichever model it holds."""
    meta = json.loads((Path(directory) / REWARD_META_FILE).read_text())
    return (
        CollaborativeReward.from_pretrained(directory)
        if meta.get("model") == "multivae"
        else RewardModel.from_pretrained(directory)
    )


def pad_batch(rows, pad_value: int, dtype=torch.long) -> torch.Tensor:
    """Right-pad a sequence of 1-d arrays into a [rows, longest] tensor."""
    longest = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), max(longest, 1)), pad_value, dtype=np.int64 if dtype == torch.long else np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.as_tensor(out, dtype=dtype)


@torch.no_grad()
def score_lists(
    model: RewardModel | CollaborativeReward, ids: list, masks: list, pad_id: int, batch_size: int = 128
) -> np.ndarray:
    """Reward scores of ``encode_list`` rows, in batches."""
    model.eval()
    out = []
    for lo in range(0, len(ids), batch_size):
        chunk_ids, chunk_masks = ids[lo : lo + batch_size], masks[lo : lo + batch_size]
        out.append(
            model.score(
                pad_batch(chunk_ids, pad_id),
                pad_batch([np.ones(len(x)) for x in chunk_ids], 0),
                pad_batch(chunk_masks, 0),
            ).numpy()
        )
    return np.concatenate(out) if out else np.zeros(0)
