"""Supervised stages (paper 4.3): meta pre-training, then golden-list fine-tuning.

Reads the data stage's Parquet outputs (training interactions only), builds the vocabulary,
trains on Ray Train + DeepSpeed (``pagellm.train.loop``) and writes SFT_DIR: a Hugging Face
model directory (the reference policy) with its tokenizer, plus metrics.json, the JSONL
training logs and a loss-curve PNG; with ``sft.members`` > 1, one such directory per member
under SFT_DIR/members/ (``pagellm.model.ensemble``).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from pagellm.buckets import in_share
from pagellm.config import PageLLMConfig, write_config
from pagellm.data.layout import DataDir
from pagellm.data.schema import UNKNOWN_CATEGORY
from pagellm.model.modeling import (
    NextItemLM,
    PolicyLM,
    PolicyWithRatingHead,
    build_lm,
    collaborative_item_vectors,
    load_pretrained,
    pad_batch,
    unwrap_lm,
)
from pagellm.model.prompts import PromptCodec
from pagellm.model.vocab import Vocab, build_tokenizer
from pagellm.outputs import figure, read_jsonl
from pagellm.train.loop import FitSpec, fit, fits_at_once

log = logging.getLogger(__name__)
META_DIR, NEXT_ITEM_DIR, SFT_LOGS = "meta", "next_item", "logs"


# ------------------------------------------------------------------------------- data -> rows


def meta_rows(
    vocab: Vocab,
    items: pd.DataFrame,
    train: pd.DataFrame,
    max_tokens: int,
    seed: int,
    max_rows_per_pattern: int | None = None,
) -> pd.DataFrame:
    """Meta prompts of the four patterns (paper 4.3.1) plus rating-regression rows.

    (a) item content: item token, title, brand, category;
    (b) first-order user-item relations: "user rated item N stars" (the data has no review text);
    (c) second-order co-occurrence: two items sharing a category or a brand;
    (d) interaction sequences: a user's training items in time order.
    Rating rows ("user_u item_i" -> r_ui, eq. 7) carry no next-token labels.
    All built from the items table and *training* interactions only. ``max_rows_per_pattern``
    keeps a seeded random sample of at most that many rows of each pattern (None: all).
    """
    rng = np.random.default_rng(seed)
    text = vocab.text_ids
    rows: list[tuple[list[int], bool, float, str]] = []  # ids, lm?, rating, pattern

    def lm(ids, pattern):
        rows.append((ids[:max_tokens], True, float("nan"), pattern))

    for item, title, brand, category in items[["item_id", "title", "brand", "category"]].itertuples(index=False):
        words = f" title: {title or ''} brand: {brand or ''} category: {category}"
        lm([vocab.item_token[item], *text(words)], "a")
    for user, item, rating in train[["user_id", "item_id", "rating"]].itertuples(index=False):
        if user not in vocab.user_token:  # model.user_tokens off: no user to relate an item to
            break
        u, i = vocab.user_token[user], vocab.item_token[item]
        lm([u, *text(" rated"), i, *text(f" {rating:g} stars")], "b")
        rows.append(([u, i], False, float(rating), "rating"))
    for key in ("category", "brand"):
        groups = items[items[key].notna() & (items[key] != UNKNOWN_CATEGORY)].groupby(key).item_id.agg(list)
        for value, members in groups.items():
            if len(members) < 2:
                continue
            for item in members:
                other = members[rng.integers(len(members))]
                if other != item:
                    lm(
                        [
                            vocab.item_token[item],
                            *text(" and"),
                            vocab.item_token[other],
                            *text(f" share {key}: {value}"),
                        ],
                        "c",
                    )
    for user, seq in train.sort_values(["user_id", "ts"]).groupby("user_id").item_id:
        user_token = [vocab.user_token[user]] if user in vocab.user_token else []
        lm([*user_token, *text(" history:"), *vocab.items_to_ids(list(seq))], "d")
    ids, is_lm, rating, pattern = zip(*rows)
    out = pd.DataFrame(
        {
            "input_ids": [np.asarray(x, np.int64) for x in ids],
            "labels": [np.asarray(x if m else [-100] * len(x), np.int64) for x, m in zip(ids, is_lm)],
            "rating": np.asarray(rating, np.float32),
            "pattern": pattern,
        }
    )
    if max_rows_per_pattern is not None:
        keep = (
            out.groupby("pattern", group_keys=False)
            .apply(lambda g: g.sample(n=min(len(g), max_rows_per_pattern), random_state=seed), include_groups=False)
            .index
        )
        out = out.loc[sorted(keep)].reset_index(drop=True)
    return out


def page_rows(codec: PromptCodec, users, prompts, pages) -> pd.DataFrame:
    """(prompt || page) rows with the next-token loss on the page tokens only (eq. 9)."""
    ids, labels = [], []
    for user, prompt_items, page in zip(users, prompts, pages):
        prompt, target = codec.prompt(user, list(prompt_items)), codec.target(list(page))
        ids.append(np.asarray(prompt + target, np.int64))
        labels.append(np.asarray([-100] * len(prompt) + target, np.int64))
    return pd.DataFrame({"input_ids": ids, "labels": labels})


def next_item_rows(
    codec: PromptCodec, train: pd.DataFrame, positive_threshold: float, max_items: int, horizon: int = 1
):
    """Next-item rows, every prefix of a user's training positives in time order (as SASRec
    trains): for each positive i_t after the first, the prompt of the up to ``max_items``
    positives before it, ``[user] history: i_{t-k} .. i_{t-1} page:``, and ``next_item``, the
    indices in the item block of i_t .. i_{t+horizon-1} (fewer at the end of the history): the
    targets of the page's first slot, the position a page starts from at evaluation."""
    vocab, lo = codec.vocab, codec.vocab.item_id_range[0]
    positives = train[train.rating > positive_threshold].sort_values(["user_id", "ts", "item_id"], kind="stable")
    ids, targets = [], []
    for user, seq in positives.groupby("user_id").item_id:
        items = list(seq)
        index = np.asarray([vocab.item_token[i] - lo for i in items], np.int64)
        for t in range(1, len(items)):
            ids.append(np.asarray(codec.prompt(user, items[max(0, t - max_items) : t]), np.int64))
            targets.append(index[t : t + horizon])
    return pd.DataFrame({"input_ids": ids, "next_item": targets})


def ranking_rows(codec: PromptCodec, users: pd.DataFrame) -> pd.DataFrame:
    """Validation rows of the evaluation protocol (``DataDir.eval_users``): each user's prompt,
    the item indices a page may not show (every item seen before the split) and the targets."""
    vocab, lo = codec.vocab, codec.vocab.item_id_range[0]

    def index(items):
        return np.asarray([vocab.item_token[i] - lo for i in items if i in vocab.item_token] or [-1], np.int64)

    return pd.DataFrame(
        {
            "input_ids": [
                np.asarray(codec.prompt(u, list(p)), np.int64) for u, p in zip(users.user_id, users.prompt_items)
            ],
            "banned": [index(seen) for seen in users.seen],
            "target": [index(t) for t in users.target],
        }
    )


def collate_lm(pad_id: int):
    def collate(batch: dict) -> dict:
        ids = batch["input_ids"]
        if "labels" not in batch:  # ranking and next-item rows: left padding, the next slot at the last column
            width = max(len(x) for x in ids)
            attention = pad_batch([np.r_[np.zeros(width - len(x)), np.ones(len(x))] for x in ids], 0)
            out = {
                "input_ids": pad_batch([np.r_[np.full(width - len(x), pad_id), x] for x in ids], pad_id),
                "attention_mask": attention,
                "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            }
            if "next_item" in batch:
                out["next_item"] = pad_batch(batch["next_item"], -1)
            else:
                out["banned"], out["target"] = pad_batch(batch["banned"], -1), pad_batch(batch["target"], -1)
            return out
        out = {
            "input_ids": pad_batch(ids, pad_id),
            "attention_mask": pad_batch([np.ones(len(x)) for x in ids], 0),
            "labels": pad_batch(batch["labels"], -100),
        }
        if "rating" in batch:
            out["rating"] = torch.as_tensor(np.asarray(batch["rating"], np.float32))
        return out

    return collate


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_pages(model, codec: PromptCodec, users, prompts, max_items: int, batch_size: int = 64) -> list:
    """Unconstrained greedy pages (any token may be generated), parsed back to items."""
    model.eval()
    pad = codec.vocab.pad_id
    parsed = []
    for lo in range(0, len(users), batch_size):
        batch = [codec.prompt(u, list(p)) for u, p in zip(users[lo : lo + batch_size], prompts[lo : lo + batch_size])]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_items + 1,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=codec.vocab.eos_id,
        )
        parsed.extend(codec.parse(row[width:].tolist()) for row in out)
    return parsed


def plot_losses(logs: dict[str, list[dict]], path: Path) -> None:
    """Training loss per step and validation loss per epoch, one panel per stage."""
    with figure(path, len(logs)) as (_, axes):
        for ax, (stage, records) in zip(axes, logs.items()):
            steps = [r for r in records if "loss" in r and "step" in r]
            epochs = [r for r in records if "valid_loss" in r]
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train (step)", lw=1)
            ax.plot([r["step"] for r in epochs], [r["valid_loss"] for r in epochs], "o-", label="validation (epoch)")
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()


# ---------------------------------------------------------------------------------- stage


def read_data_dir(data_dir: Path, positive_threshold: float) -> dict[str, pd.DataFrame]:
    """The tables SFT reads: items, training interactions, golden lists, and the validation
    users (prompt, targets, every item seen before the split)."""
    d = DataDir(data_dir)
    d.require_rows(d.items_path, d.split_path("train"), d.ft_path, d.eval_path("val"))
    return {
        "items": d.read_items().to_pandas(),
        "train": d.read_split("train").to_pandas(),
        "ft": d.read_ft().to_pandas(),
        "val": d.eval_users("val", positive_threshold),
    }


def meta_pretraining(cfg: PageLLMConfig, tokenizer, data: dict, out: Path, storage_path: Optional[str]) -> dict:
    """Meta pre-training (rating regression + next-token on the meta prompts) from the new LM;
    5% of meta rows (by hash) monitor validation loss. Exports OUT/meta."""
    import ray.data

    codec = PromptCodec.from_tokenizer(tokenizer)
    vocab, model_cfg, sft_cfg, train_cfg = codec.vocab, cfg.model, cfg.sft, cfg.train
    meta = meta_rows(
        vocab, data["items"], data["train"], sft_cfg.max_meta_tokens, cfg.data.seed, sft_cfg.max_meta_rows_per_pattern
    )
    held = np.array([in_share(str(k), 0.05, salt="meta") for k in range(len(meta))])
    base_size, rating_weight = vocab.base_size, sft_cfg.rating_loss_weight
    item_vectors = None
    if model_cfg.item_init == "cooccurrence":
        from transformers import AutoConfig

        # the embedding width without building the model (a pretrained one may be large)
        width = (
            AutoConfig.from_pretrained(model_cfg.name_or_path).hidden_size
            if model_cfg.name_or_path
            else model_cfg.n_embd
        )
        item_vectors = collaborative_item_vectors(
            data["train"], vocab, cfg.data.positive_threshold, width, train_cfg.seed
        )
        log.info(
            "item tokens from co-occurrence: %d of %d items", (abs(item_vectors).sum(1) > 0).sum(), len(item_vectors)
        )

    def build_meta():
        lm = build_lm(model_cfg, tokenizer, base_size, train_cfg.seed, item_vectors)
        return PolicyWithRatingHead(lm, rating_weight)

    def export_meta(module, directory: Path):
        unwrap_lm(module.lm).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        module.save_heads(directory)

    if sft_cfg.meta_epochs == 0:  # meta pre-training off: the next phase starts from the initialised LM
        export_meta(build_meta(), out / META_DIR)
        return {"metrics": {}, "rows": {}}
    log.info("meta pre-training on %d rows (%s)", (~held).sum(), meta.pattern.value_counts().to_dict())
    meta_cols = ["input_ids", "labels", "rating"]
    metrics = fit(
        FitSpec(
            "meta",
            sft_cfg.meta_epochs,
            sft_cfg.meta_lr,
            sft_cfg.batch_size,
            build_meta,
            collate_lm(vocab.pad_id),
            export_meta,
        ),
        {"train": ray.data.from_pandas(meta[~held][meta_cols]), "valid": ray.data.from_pandas(meta[held][meta_cols])},
        train_cfg,
        out / SFT_LOGS,
        out / META_DIR,
        storage_path,
    )
    return {"metrics": metrics, "rows": meta.pattern.value_counts().to_dict()}


def _lm_exporter(tokenizer):
    """A stage's export: the LM (LoRA merged away by ``unwrap_lm``) and its tokenizer, the
    directory every later stage loads with ``from_pretrained``."""

    def export(module, directory: Path):
        unwrap_lm(module.lm).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return export


def _load_lm(directory: Path, model_cfg, tokenizer, base_size: int):
    """The LM a stage starts from (a previous stage's export), with LoRA when configured."""
    from transformers import AutoModelForCausalLM

    from pagellm.model.modeling import apply_lora

    lm = load_pretrained(AutoModelForCausalLM, directory)
    if model_cfg.lora_rank > 0:
        lm = apply_lora(lm, model_cfg, list(range(base_size, len(tokenizer))))
    return lm


def next_item_pretraining(cfg: PageLLMConfig, tokenizer, data: dict, out: Path, storage_path: Optional[str]) -> dict:
    """Next-item pre-training (``next_item_rows``) from the meta checkpoint, the epoch with the
    best validation NDCG@100 exported to OUT/next_item."""
    import ray.data

    codec = PromptCodec.from_tokenizer(tokenizer)
    vocab, sft_cfg = codec.vocab, cfg.sft
    rows = next_item_rows(
        codec,
        data["train"],
        cfg.data.positive_threshold,
        sft_cfg.next_item_max_items,
        sft_cfg.next_item_horizon,
    )
    log.info("next-item pre-training on %d prefixes", len(rows))
    meta_dir, (lo, hi) = (out / META_DIR).resolve(), vocab.item_id_range

    def build():
        return NextItemLM(_load_lm(meta_dir, cfg.model, tokenizer, vocab.base_size), lo, hi - lo)

    metrics = fit(
        FitSpec(
            "next_item",
            sft_cfg.next_item_epochs,
            sft_cfg.next_item_lr,
            sft_cfg.batch_size,
            build,
            collate_lm(vocab.pad_id),
            _lm_exporter(tokenizer),
            early_stopping=True,
            patience=sft_cfg.patience,
            select="ndcg@100",
            maximize=True,
        ),
        {"train": ray.data.from_pandas(rows), "valid": ray.data.from_pandas(ranking_rows(codec, data["val"]))},
        cfg.train,
        out / SFT_LOGS,
        out / NEXT_ITEM_DIR,
        storage_path,
    )
    return {"metrics": metrics, "rows": len(rows)}


def golden_finetuning(cfg: PageLLMConfig, tokenizer, data: dict, out: Path, storage_path: Optional[str]) -> dict:
    """Golden-list fine-tuning (eq. 9) from the next-item (else the meta) checkpoint. Validation:
    NDCG@100 of the validation users' first-slot ranking (``sft.ft_select: ndcg@100``, the best
    epoch exported) or the loss of their next page (``last``: the last epoch exported). SFT_DIR
    itself becomes the reference policy (``from_pretrained``)."""
    import ray.data

    codec = PromptCodec.from_tokenizer(tokenizer)
    vocab, sft_cfg = codec.vocab, cfg.sft
    start = (out / (NEXT_ITEM_DIR if sft_cfg.next_item_epochs > 0 else META_DIR)).resolve()
    ft = page_rows(codec, data["ft"].user_id, data["ft"].prompt_items, data["ft"].golden)
    val = data["val"]
    by_ndcg = sft_cfg.ft_select == "ndcg@100"
    ft_valid = ranking_rows(codec, val) if by_ndcg else page_rows(codec, val.user_id, val.prompt_items, val.target)

    def build_ft():
        lm = _load_lm(start, cfg.model, tokenizer, vocab.base_size)
        return PolicyLM(lm, sft_cfg.unlikelihood_weight, vocab.eos_id, vocab.item_id_range)

    metrics = fit(
        FitSpec(
            "golden_ft",
            sft_cfg.ft_epochs,
            sft_cfg.ft_lr,
            sft_cfg.batch_size,
            build_ft,
            collate_lm(vocab.pad_id),
            _lm_exporter(tokenizer),
            early_stopping=by_ndcg,
            patience=sft_cfg.ft_patience,
            select="ndcg@100" if by_ndcg else "loss",
            maximize=by_ndcg,
        ),
        {"train": ray.data.from_pandas(ft), "valid": ray.data.from_pandas(ft_valid)},
        cfg.train,
        out / SFT_LOGS,
        out / "policy_tmp",
        storage_path,
    )
    for f in (out / "policy_tmp").iterdir():
        f.replace(out / f.name)
    (out / "policy_tmp").rmdir()
    return {"metrics": metrics, "rows": len(ft)}


def _copy_pretraining(src: Path, out: Path, has_next_item: bool) -> tuple[dict, Optional[dict]]:
    """``run_sft``'s meta and next-item results taken from ``src``, another SFT directory: their
    exports and epoch logs copied into ``out``, their metrics read from its metrics.json."""
    done = json.loads((src / "metrics.json").read_text())
    stages = [(META_DIR, "meta")] + ([(NEXT_ITEM_DIR, "next_item")] if has_next_item else [])
    (out / SFT_LOGS).mkdir(parents=True, exist_ok=True)
    for directory, stage in stages:
        shutil.copytree(src / directory, out / directory, dirs_exist_ok=True)
        if (src / SFT_LOGS / f"{stage}.jsonl").exists():  # meta pre-training off writes no log
            shutil.copy2(src / SFT_LOGS / f"{stage}.jsonl", out / SFT_LOGS / f"{stage}.jsonl")
    meta = {"metrics": done["meta"], "rows": done["meta_rows"]}
    next_item = {"metrics": done["next_item"], "rows": done["next_item_rows"]} if has_next_item else None
    return meta, next_item


def page_validity(pages: list) -> dict:
    """How many unconstrained greedy pages are valid, and why the others are not."""
    return {
        "valid_page_rate": float(np.mean([p.valid for p in pages])) if pages else 0.0,
        "valid_pages_checked": len(pages),
        "invalid_page_reasons": {
            "no_items": sum(not p.items for p in pages),
            "non_item_tokens": sum(bool(p.invalid_tokens) for p in pages),
            "repeated_items": sum(bool(p.repeated_items) for p in pages),
            "no_eos": sum(not p.ended for p in pages),
        },
    }


def _epoch_summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("train_", "valid_", "epoch", "step"))}


def run_sft(
    cfg: PageLLMConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    storage_path: Optional[str] = None,
    pretrained: Optional[Path] = None,
) -> dict:
    """Meta pre-training then golden-list fine-tuning; SFT_DIR is the reference policy.
    ``storage_path``: Ray Train's checkpoints (a URI for multi-node runs; default SFT_DIR/logs).
    ``pretrained``: an SFT directory whose meta and next-item pre-training read the same inputs
    under the same settings (``pagellm.tune.pretraining_key``: a sweep over lambda); its
    tokenizer, exports and epoch logs are copied and only golden-list fine-tuning is trained."""
    from transformers import AutoTokenizer

    from pagellm.ray_utils import init_ray

    out, data = Path(out_dir), read_data_dir(Path(data_dir), cfg.data.positive_threshold)
    init_ray(cfg.ray)
    if pretrained:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    else:
        users = sorted(set(data["train"].user_id) | set(data["val"].user_id)) if cfg.model.user_tokens else []
        tokenizer = build_tokenizer(
            cfg.model.name_or_path, DataDir(data_dir).read_items(), users, cfg.model.bpe_vocab_size
        )
    if cfg.sft.members == 1:
        return _train_policy(cfg, data, tokenizer, out, storage_path, pretrained)
    return _train_members(cfg, data, tokenizer, out, storage_path, pretrained)


def _train_members(cfg: PageLLMConfig, data: dict, tokenizer, out: Path, storage_path, pretrained) -> dict:
    """``sft.members`` > 1: the whole SFT once per member, ``train.seed`` + k, each into
    OUT/members/k (a policy directory of its own; from ``pretrained``'s member k under Tune),
    then OUT becomes their ensemble (``pagellm.model.ensemble``); metrics.json holds each
    member's and the ensemble's validation NDCG@100 (the fits' own measure). Members train side by
    side, as many at once as the cluster holds worker groups for (``train.side_by_side``): each
    member's fits are its own, and the results are the same either way."""
    from pagellm.model.ensemble import MEMBERS_DIR, member_dir, write_ensemble_meta

    write_config(cfg, out)
    at_once = fits_at_once(cfg.train, cfg.sft.members)
    log.info("SFT: %d members, %s", cfg.sft.members, f"{at_once} side by side" if at_once > 1 else "one at a time")

    def train_member(k: int) -> dict:
        seed = cfg.train.seed + k
        log.info("SFT member %d of %d (train.seed %d)", k + 1, cfg.sft.members, seed)
        member_cfg = replace(cfg, train=replace(cfg.train, seed=seed), sft=replace(cfg.sft, members=1))
        storage = f"{storage_path}/{MEMBERS_DIR}/{k}" if storage_path else None
        source = member_dir(pretrained, k) if pretrained else None
        # a fast tokenizer is not safe to call from two threads at once: each member its own copy
        own = copy.deepcopy(tokenizer) if at_once > 1 else tokenizer
        return _train_policy(member_cfg, data, own, member_dir(out, k), storage, source)

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        members = list(pool.map(train_member, range(cfg.sft.members)))
    tokenizer.save_pretrained(out)
    write_ensemble_meta(out, cfg.sft.members)
    return ensemble_metrics(cfg, data, out, members)


def ensemble_metrics(cfg: PageLLMConfig, data: dict, out: Path, members: list[dict]) -> dict:
    """metrics.json of an ensemble SFT_DIR: each member's metrics, their and the ensemble's
    validation NDCG@100 (the fits' measure, ``ranking_validation``) and the ensemble's greedy
    page validity."""
    from pagellm.model.artifact import load_policy

    policy = load_policy(out)
    codec, val = policy.codec, data["val"]
    model = PolicyLM(policy.model, 0.0, codec.vocab.eos_id, codec.vocab.item_id_range)
    rows, collate = ranking_rows(codec, val), collate_lm(codec.vocab.pad_id)
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(rows), 256):
            chunk = rows.iloc[lo : lo + 256]
            total += float(model(**collate(chunk.to_dict("list")))[1]["ndcg@100"]) * len(chunk)
    pages = greedy_pages(policy.model, codec, list(val.user_id), list(val.prompt_items), cfg.sft.valid_page_max_items)
    metrics = {
        "members": members,
        "member_valid_ndcg@100": [m["golden_ft"].get("valid_ndcg@100") for m in members],
        "ensemble_valid_ndcg@100": total / max(len(rows), 1),
        **page_validity(pages),
    }
    log.info(
        "SFT ensemble of %d: validation NDCG@100 %.4f (members %s)",
        len(members),
        metrics["ensemble_valid_ndcg@100"],
        ", ".join(f"{v:.4f}" for v in metrics["member_valid_ndcg@100"] if v is not None),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics


def _train_policy(cfg: PageLLMConfig, data: dict, tokenizer, out: Path, storage_path, pretrained) -> dict:
    """One LM through the SFT phases into ``out`` (with ``tokenizer`` beside it); from
    ``pretrained``, its meta and next-item phases copied and only golden-list fine-tuning trained."""
    from transformers import AutoModelForCausalLM

    write_config(cfg, out)
    has_next_item = cfg.sft.next_item_epochs > 0
    if pretrained:
        meta, next_item = _copy_pretraining(Path(pretrained), out, has_next_item)
    else:
        meta = meta_pretraining(cfg, tokenizer, data, out, storage_path)
        next_item = next_item_pretraining(cfg, tokenizer, data, out, storage_path) if has_next_item else None
    codec = PromptCodec.from_tokenizer(tokenizer)
    ft = golden_finetuning(cfg, tokenizer, data, out, storage_path)

    val = data["val"]
    pages = greedy_pages(
        load_pretrained(AutoModelForCausalLM, out),
        codec,
        list(val.user_id),
        list(val.prompt_items),
        cfg.sft.valid_page_max_items,
    )
    stages = [s for s, on in (("meta", cfg.sft.meta_epochs), ("next_item", next_item), ("golden_ft", True)) if on]
    logs = {stage: read_jsonl(out / SFT_LOGS / f"{stage}.jsonl") for stage in stages}
    plot_losses(logs, out / "loss_curves.png")
    vocab = codec.vocab
    metrics = {
        "meta": _epoch_summary(meta["metrics"]),
        "golden_ft": _epoch_summary(ft["metrics"]),
        **(
            {"next_item": _epoch_summary(next_item["metrics"]), "next_item_rows": next_item["rows"]}
            if next_item
            else {}
        ),
        "meta_first_epoch_valid_loss": next((r["valid_loss"] for r in logs.get("meta", []) if "valid_loss" in r), None),
        "ft_first_epoch_valid_loss": next((r["valid_loss"] for r in logs["golden_ft"] if "valid_loss" in r), None),
        **page_validity(pages),
        "vocab": {
            "base": vocab.base_size,
            "users": len(vocab.user_token),
            "items": len(vocab.item_token),
            "total": len(tokenizer),
        },
        "meta_rows": meta["rows"],
        "ft_rows": ft["rows"],
        "pretrained_from": str(pretrained) if pretrained else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics
