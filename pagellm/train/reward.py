"""Reward heads (paper 4.4): coarse page-level R_c and fine item-level R_f.

Both start from the SFT policy's backbone, train with the Bradley-Terry loss on D_reward
(eq. 11, eq. 14) on Ray Train + DeepSpeed, and stop early on validation log-likelihood.
Pairs are split by user (hash of the user id) into train / validation / test, so no user's
pairs straddle the split; pairwise accuracy on the test users is reported per family for
R_c, R_f and R_c + R_f. With ``reward.fine_model=multivae`` (ours) R_f is a Multi-VAE fitted
on the training positives instead (``fit_collaborative_fine``), scored by the same measures.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pagellm.buckets import in_share
from pagellm.config import PageLLMConfig, write_config
from pagellm.data.layout import DataDir
from pagellm.data.rules import FAMILIES
from pagellm.model.artifact import load_codec, load_policy
from pagellm.model.modeling import CollaborativeReward, RewardModel, load_reward_head, pad_batch, score_lists
from pagellm.model.prompts import PromptCodec, encode_list
from pagellm.outputs import figure, read_jsonl
from pagellm.train.loop import FitSpec, fit, fits_at_once

log = logging.getLogger(__name__)
KINDS = ("coarse", "fine")
POLICY_FAMILY = "ps"  # the pair family reward.policy_pairs adds (policy_sample_pairs)


def user_part(user: str, holdout: float) -> str:
    """train / valid / test by a stable hash of the user id."""
    return "test" if in_share(user, holdout) else "valid" if in_share(user, 2 * holdout) else "train"


def pair_rows(codec: PromptCodec, pairs: pd.DataFrame) -> pd.DataFrame:
    rows = {"chosen_ids": [], "chosen_mask": [], "rejected_ids": [], "rejected_mask": []}
    for user, prompt, chosen, rejected in pairs[["user_id", "prompt_items", "chosen", "rejected"]].itertuples(
        index=False
    ):
        for side, page in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = encode_list(codec, user, prompt, page)
            rows[f"{side}_ids"].append(ids)
            rows[f"{side}_mask"].append(mask)
    return pd.DataFrame(rows)


def collate_pairs(pad_id: int):
    """Chosen lists first, then the rejected lists of the same pairs (RewardModel.forward)."""

    def collate(batch: dict) -> dict:
        ids = list(batch["chosen_ids"]) + list(batch["rejected_ids"])
        masks = list(batch["chosen_mask"]) + list(batch["rejected_mask"])
        return {
            "input_ids": pad_batch(ids, pad_id),
            "attention_mask": pad_batch([np.ones(len(x)) for x in ids], 0),
            "item_mask": pad_batch(masks, 0),
        }

    return collate


def pairwise_accuracy(margins: dict[str, np.ndarray], families: np.ndarray) -> dict:
    """Share of pairs where the chosen list scores higher, per family (the data stage's and
    ``ps``) and overall."""
    report = {}
    for name, margin in margins.items():
        report[name] = {
            f: float((margin[families == f] > 0).mean()) if (families == f).any() else None for f in (*FAMILIES, "ps")
        }
        report[name]["all"] = float((margin > 0).mean()) if len(margin) else None
    return report


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def reward_agreement(rewards: dict[str, np.ndarray], ndcg: np.ndarray, users: np.ndarray) -> dict:
    """How well each reward ranks pages as NDCG does (issue target: >= 0.3). ``pooled``: the
    Spearman correlation over every page; ``within_user``: its mean over users whose pages differ
    in NDCG (what a per-prompt baseline in PPO sees), with that number of users."""
    report = {}
    for name, reward in rewards.items():
        per_user = [spearman(reward[users == u], ndcg[users == u]) for u in dict.fromkeys(users.tolist())]
        per_user = [r for r in per_user if r is not None]
        report[name] = {
            "pooled": spearman(reward, ndcg),
            "within_user": float(np.mean(per_user)) if per_user else None,
            "users": len(per_user),
        }
    report["pages"], report["mean_ndcg"] = len(ndcg), float(ndcg.mean()) if len(ndcg) else None
    return report


def sample_pages(
    cfg: PageLLMConfig, policy, rows: list[tuple], min_items: int, max_items: int, generator
) -> tuple[list[list[str]], np.ndarray]:
    """Pages sampled from ``policy`` as PPO rolls out (its temperature and top-p) for ``rows`` of
    (user, prompt items, items the page may not show), ``min_items``..``max_items`` long, and
    each page's mean log-probability per written step under the distribution it was drawn from."""
    from pagellm.model.decoding import generate_pages

    codec, vocab = policy.codec, policy.vocab
    constraint = policy.constraint(min_items, max_items)
    pages, logprobs = [], []
    for lo in range(0, len(rows), 64):
        part = rows[lo : lo + 64]
        written = generate_pages(
            policy.model,
            [codec.prompt(u, list(p)) for u, p, _ in part],
            constraint,
            vocab.pad_id,
            temperature=cfg.ppo.temperature,
            top_p=cfg.ppo.top_p,
            generator=generator,
            banned_items=[[vocab.item_token[i] for i in banned if i in vocab.item_token] for _, _, banned in part],
            with_logprobs=True,
        )
        pages += [[vocab.token_item[t] for t in row] for row in written.item_tokens(constraint)]
        steps = written.step_mask.float()
        logprobs.append(((written.logprobs * steps).sum(1) / steps.sum(1).clamp(min=1)).numpy())
    return pages, np.concatenate(logprobs) if logprobs else np.zeros(0)


def policy_sample_pairs(cfg: PageLLMConfig, policy, pairs: pd.DataFrame, interacted: dict) -> pd.DataFrame:
    """``ps`` pairs (``reward.policy_pairs``, ours): for each (user, prompt, golden list) of
    ``pairs``, the golden list against a page of its length sampled from the SFT policy as PPO
    rolls out, never showing an item the user interacted with in any split. The other families
    corrupt the golden list; these negatives come from the distribution PPO's reward will
    score, so the heads learn to tell the user's real next items from the policy's guesses."""
    import torch

    windows = pairs.assign(
        key=[(u, tuple(p), tuple(c)) for u, p, c in zip(pairs.user_id, pairs.prompt_items, pairs.chosen)]
    )
    windows = windows.drop_duplicates("key").drop(columns="key")
    gen, parts = torch.Generator().manual_seed(cfg.train.seed), []
    for n, group in windows.groupby(windows.chosen.map(len), sort=True):
        rows = [(u, list(p), interacted.get(u, set())) for u, p in zip(group.user_id, group.prompt_items)]
        parts.append(group.assign(family=POLICY_FAMILY, rejected=sample_pages(cfg, policy, rows, n, n, gen)[0]))
    return pd.concat(parts, ignore_index=True) if parts else windows.iloc[:0]


def sampled_validation_pages(
    cfg: PageLLMConfig, policy, users: pd.DataFrame
) -> tuple[list, list[list[str]], np.ndarray]:
    """``reward.agreement_samples`` pages per user sampled from ``policy`` as PPO rolls out
    (``ppo.page_min_items``..``page_max_items`` items), never showing an item the user saw
    before the split. Returns (user of each page, pages, their mean log-probability per step)."""
    import torch

    k = cfg.reward.agreement_samples
    rows = [(u, list(p), list(s)) for u, p, s in zip(users.user_id, users.prompt_items, users.seen) for _ in range(k)]
    gen = torch.Generator().manual_seed(cfg.train.seed)
    pages, logprobs = sample_pages(cfg, policy, rows, cfg.ppo.page_min_items, cfg.ppo.page_max_items, gen)
    return [u for u, _, _ in rows], pages, logprobs


def measure_agreement(
    cfg: PageLLMConfig, data: DataDir, policy, heads: dict[str, RewardModel | CollaborativeReward]
) -> dict:
    """``reward_agreement`` of R_c, R_f and R_c + R_f on pages the SFT ``policy`` samples for a
    seeded subset of ``reward.agreement_users`` validation users; ``sft_policy``, the policy's
    own mean log-probability of each page, is the reference: how well what the policy already
    knows ranks its pages. A head below it tells PPO less than the policy knows."""
    from pagellm.eval.metrics import ndcg_at_k

    users = data.eval_users("val", cfg.data.positive_threshold)
    users = users.sample(min(cfg.reward.agreement_users, len(users)), random_state=cfg.train.seed)
    owners, pages, logprobs = sampled_validation_pages(cfg, policy, users)
    target = dict(zip(users.user_id, users.target))
    ndcg = np.array([ndcg_at_k(page, target[u], cfg.ppo.page_max_items) for u, page in zip(owners, pages)])
    prompt = dict(zip(users.user_id, users.prompt_items))
    encoded = [encode_list(policy.codec, u, list(prompt[u]), page) for u, page in zip(owners, pages)]
    ids, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    rewards = {kind: score_lists(heads[kind], ids, masks, policy.vocab.pad_id) for kind in KINDS}
    rewards["combined"] = rewards["coarse"] + rewards["fine"]
    rewards["sft_policy"] = logprobs
    return reward_agreement(rewards, ndcg, np.asarray(owners))


def plot_reward_curves(logs: dict[str, list[dict]], path: Path) -> None:
    with figure(path, 2) as (_, axes):
        for kind, records in logs.items():
            epochs = [r for r in records if "valid_loss" in r]
            axes[0].plot([r["epoch"] for r in epochs], [-r["valid_loss"] for r in epochs], "o-", label=kind)
            axes[1].plot([r["epoch"] for r in epochs], [r["valid_accuracy"] for r in epochs], "o-", label=kind)
        axes[0].set_title("validation log-likelihood per pair")
        axes[1].set_title("validation pairwise accuracy")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend()


# candidates for the weight of each item-item view in R_f, chosen jointly; 0 leaves the view out
KNN_WEIGHTS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0)  # reward.fine_itemknn
EASE_WEIGHTS = (0.0, 0.35, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)  # reward.fine_ease
SASREC_WEIGHTS = (0.0, 0.35, 0.7, 1.0, 1.5, 2.0, 3.0)  # reward.fine_sasrecs
# EASE weights kept per item (largest magnitudes): 78 MB for MovieLens's 9.7k items; EASE alone
# reads validation NDCG@100 0.1883 with them, 0.1895 dense, 0.1856 with 400
EASE_ENTRIES = 1000


def _top_entries(matrix, k: int, magnitude: bool = False):
    """Each row's ``k`` largest entries (by magnitude: EASE's negative weights count too) as
    (index, value) [rows, k], the sparse form ``CollaborativeReward`` keeps."""
    import torch

    matrix = torch.as_tensor(matrix)
    k = min(k, matrix.shape[1])
    index = (matrix.abs() if magnitude else matrix).topk(k, dim=1).indices
    return index, matrix.gather(1, index)


def fit_collaborative_fine(cfg: PageLLMConfig, data_dir: Path, vocab, out: Path) -> dict:
    """R_f of ``reward.fine_model=multivae``: ``reward.fine_vaes`` Multi-VAEs fitted on the training
    positives as the compare report fits its baseline (best epoch on validation NDCG@100); with
    ``reward.fine_itemknn`` / ``reward.fine_ease`` the item-item views ItemKNN (its neighbourhood
    chosen as the baseline's) and EASE (its L2 penalty chosen as the baseline's), and with
    ``reward.fine_sasrecs`` that many SASRec seeds (trained as the baseline), their weights the
    best combination of R_f's validation NDCG@100. Columns are the policy's item block. Written to
    ``out`` (``CollaborativeReward``)."""
    import itertools

    import torch

    from pagellm.eval.baselines import (
        best_ease,
        best_itemknn_neighbours,
        itemknn_similarity,
        load_protocol,
        reindexed,
        train_multivae,
        train_sasrec,
        validation_ndcg,
    )

    val = reindexed(load_protocol(data_dir, "val", cfg.data.positive_threshold), vocab.item_block)
    epochs = {"epochs": cfg.eval.baseline_epochs} if cfg.eval.baseline_epochs else {}
    # no epoch bars (a job log shows every redraw as a line of its own): each fit logs one line
    # when it ends, its best validation epoch, as the Ray Train fits print a line per epoch
    budget = {"patience": cfg.eval.baseline_patience, "progress": False, **epochs}
    vaes = [train_multivae(val, seed=cfg.train.seed + k, val=val, **budget) for k in range(cfg.reward.fine_vaes)]
    batch = cfg.reward.fine_sasrec_batch_size
    sasrecs = [
        train_sasrec(val, seed=cfg.train.seed + k, val=val, batch_size=batch, **budget)
        for k in range(cfg.reward.fine_sasrecs)
    ]
    lo, pooling = vocab.item_id_range[0], cfg.reward.fine_pooling
    prompts = [[lo + j for j in history] for history in val.users.history]

    def prompt_scores(views: dict, sasrec_weight: float = 0.0) -> torch.Tensor:
        with torch.no_grad():
            head = CollaborativeReward(vaes, lo, pooling, views, sasrecs, sasrec_weight)
            return head.prompt_scores(prompts, vocab.pad_id)

    base = prompt_scores({})
    selection = {
        "vae_epochs": [v.selection.best_epoch for v in vaes],
        "vaes_ndcg@100": validation_ndcg(base.numpy(), val),
    }
    sparse, grids = {}, {}
    if cfg.reward.fine_itemknn:
        neighbours = best_itemknn_neighbours(val, val)
        sparse["knn"], grids["knn"] = _top_entries(itemknn_similarity(val, neighbours), neighbours), KNN_WEIGHTS
        selection["knn_neighbours"] = neighbours
    if cfg.reward.fine_ease:
        l2, weights = best_ease(val, val)
        sparse["ease"], grids["ease"] = _top_entries(weights, EASE_ENTRIES, magnitude=True), EASE_WEIGHTS
        selection.update(ease_l2=l2, ease_entries=sparse["ease"][0].shape[1])
    # R_f is linear in each view's log-scores, so every weight pair is scored from one pass per view
    offsets = {name: prompt_scores({name: (*sparse[name], 1.0)}) - base for name in sparse}
    if sasrecs:
        offsets["sasrec"], grids["sasrec"] = prompt_scores({}, 1.0) - base, SASREC_WEIGHTS
        selection["sasrec_epochs"] = [m.selection.best_epoch for m in sasrecs]
    scored = {
        weights: validation_ndcg((base + sum(w * offsets[n] for n, w in zip(grids, weights))).numpy(), val)
        for weights in itertools.product(*grids.values())
    }
    chosen = dict(zip(grids, max(scored, key=scored.get)))
    views = {n: (*sparse[n], chosen[n]) for n in sparse if chosen[n]}
    sasrec_weight = chosen.get("sasrec", 0.0)
    head = CollaborativeReward(vaes, lo, pooling, views, sasrecs, sasrec_weight)
    head.save_pretrained(out)
    with torch.no_grad():  # the saved head's own score (the grid's sums may round differently)
        ndcg = validation_ndcg(head.prompt_scores(prompts, vocab.pad_id).numpy(), val)
    selection.update({f"{n}_weight": w for n, w in chosen.items()})
    if grids:
        selection["view_weights_ndcg"] = {" ".join(f"{n}={w}" for n, w in zip(grids, k)): v for k, v in scored.items()}
    # one console line, as the Ray Train fits print one per epoch (EpochLines)
    parts = f"{len(vaes)} Multi-VAE{'s' if len(vaes) > 1 else ''}"
    if "knn" in sparse:
        parts += f" + {selection['knn_weight']} x ItemKNN ({selection['knn_neighbours']} neighbours)"
    if "ease" in sparse:
        parts += f" + {selection['ease_weight']} x EASE (L2 {selection['ease_l2']:g})"
    if sasrecs:
        parts += f" + {selection['sasrec_weight']} x {len(sasrecs)} SASRec{'s' if len(sasrecs) > 1 else ''}"
    print(f"  reward_fine: {parts}, validation NDCG@100 {ndcg:.4f}", flush=True)
    return {"valid_ndcg@100": ndcg, **selection}


def run_reward(
    cfg: PageLLMConfig,
    data_dir: str | Path,
    sft_dir: str | Path,
    out_dir: str | Path,
    storage_path: Optional[str] = None,
) -> dict:
    """Train R_c and R_f from the SFT policy; write REWARD_DIR/{coarse,fine} and metrics.json.
    ``storage_path``: Ray Train's checkpoints (a URI for multi-node runs; default REWARD_DIR/logs)."""
    import ray.data

    from pagellm.ray_utils import init_ray

    data = DataDir(data_dir)
    data.require_rows(data.pairs_path)
    init_ray(cfg.ray)
    out, sft_dir = Path(out_dir), Path(sft_dir).resolve()
    write_config(cfg, out)
    codec = load_codec(sft_dir)
    tokenizer = codec.vocab.tokenizer
    pairs = data.read_pairs().to_pandas()
    policy = load_policy(sft_dir) if cfg.reward.policy_pairs or cfg.reward.agreement_users else None
    if cfg.reward.policy_pairs:
        everything = data.interactions_before(None)
        interacted = everything.groupby("user_id").item_id.agg(set).to_dict()
        sampled = policy_sample_pairs(cfg, policy, pairs, interacted)
        log.info("ps pairs sampled from the SFT policy: %d", len(sampled))
        pairs = pd.concat([pairs, sampled[pairs.columns]], ignore_index=True)
    pairs["part"] = [user_part(u, cfg.reward.holdout_fraction) for u in pairs.user_id]
    rows = pd.concat([pair_rows(codec, pairs), pairs[["family", "part"]].reset_index(drop=True)], axis=1)
    cols = ["chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"]
    datasets = {part: rows[rows.part == part] for part in ("train", "valid", "test")}
    log.info("reward pairs: %s", {p: len(d) for p, d in datasets.items()})

    def fit_head(kind: str) -> dict:
        def build():
            return RewardModel.from_policy(sft_dir, kind, cfg.reward.fine_pooling if kind == "fine" else "mean")

        def export(module, directory: Path):
            module.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        spec = FitSpec(
            f"reward_{kind}",
            cfg.reward.epochs,
            cfg.reward.lr,
            cfg.reward.batch_size,
            build,
            collate_pairs(codec.vocab.pad_id),
            export,
            early_stopping=cfg.reward.early_stopping,
            patience=cfg.reward.patience,
        )
        train_ds = ray.data.from_pandas(datasets["train"][cols])
        valid_ds = ray.data.from_pandas(datasets["valid"][cols])
        return fit(spec, {"train": train_ds, "valid": valid_ds}, cfg.train, out / "logs", out / kind, storage_path)

    # the two heads are independent fits from the same SFT backbone: side by side when the
    # cluster holds both worker groups at once (each fit's start-up and shut-down, ~40 s on a
    # small machine, then overlaps), one after the other otherwise
    lm_kinds = KINDS if cfg.reward.fine_model == "lm" else ("coarse",)
    at_once = fits_at_once(cfg.train, len(lm_kinds))
    log.info("reward heads: %s", "coarse and fine side by side" if at_once > 1 else ", then ".join(lm_kinds))
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        running = {kind: pool.submit(fit_head, kind) for kind in lm_kinds}
    fit_metrics = {kind: job.result() for kind, job in running.items()}
    if cfg.reward.fine_model == "multivae":
        from pagellm.eval.baselines import torch_threads

        # the driver fits these alone, after the LM heads: every core, as the report's baselines
        with torch_threads(cfg.ray.cores()):
            fit_metrics["fine"] = fit_collaborative_fine(cfg, data.root, codec.vocab, out / "fine")

    test = datasets["test"]
    margins, heads = {}, {kind: load_reward_head(out / kind) for kind in KINDS}
    for kind, model in heads.items():
        chosen = score_lists(model, list(test.chosen_ids), list(test.chosen_mask), codec.vocab.pad_id)
        rejected = score_lists(model, list(test.rejected_ids), list(test.rejected_mask), codec.vocab.pad_id)
        margins[kind] = chosen - rejected
    margins["combined"] = margins["coarse"] + margins["fine"]  # R = R_c + R_f (eq. 15)
    agreement = None
    if cfg.reward.agreement_users:
        agreement = measure_agreement(cfg, data, policy, heads)
        log.info("reward vs page NDCG (Spearman): %s", {k: v for k, v in agreement.items() if isinstance(v, dict)})
    logs = {kind: read_jsonl(out / "logs" / f"reward_{kind}.jsonl") for kind in lm_kinds}
    plot_reward_curves(logs, out / "reward_curves.png")
    metrics = {
        "accuracy": pairwise_accuracy(margins, test.family.to_numpy()),
        "test_pairs": test.family.value_counts().to_dict(),
        "pairs": {p: len(d) for p, d in datasets.items()},
        "fit": {
            k: {
                m: v
                for m, v in fm.items()
                if m.startswith(("train_", "valid_", "epoch", "step", "vae", "knn_", "ease_", "sasrec_", "view_"))
            }
            for k, fm in fit_metrics.items()
        },
        "margin_std": {k: float(np.std(m)) for k, m in margins.items()},
        "agreement": agreement,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics
