"""Reward heads (paper 4.4): coarse page-level R_c and fine item-level R_f.

Both start from the SFT policy's backbone, train with the Bradley-Terry loss on D_reward
(eq. 11, eq. 14) on Ray Train + DeepSpeed, and stop early on validation log-likelihood.
Pairs are split by user (hash of the user id) into train / validation / test, so no user's
pairs straddle the split; pairwise accuracy on the test users is reported per family for
R_c, R_f and R_c + R_f.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pagellm.buckets import in_share
from pagellm.config import PageLLMConfig
from pagellm.data.layout import DataDir
from pagellm.data.rules import FAMILIES
from pagellm.model.artifact import load_codec
from pagellm.model.modeling import RewardModel, pad_batch, score_lists
from pagellm.model.prompts import PromptCodec, encode_list
from pagellm.outputs import figure, read_jsonl
from pagellm.train.loop import FitSpec, fit

log = logging.getLogger(__name__)
KINDS = ("coarse", "fine")


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
    """Share of pairs where the chosen list scores higher, per family and overall."""
    report = {}
    for name, margin in margins.items():
        report[name] = {
            f: float((margin[families == f] > 0).mean()) if (families == f).any() else None for f in FAMILIES
        }
        report[name]["all"] = float((margin > 0).mean()) if len(margin) else None
    return report


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

    init_ray(cfg.ray)
    out, sft_dir = Path(out_dir), Path(sft_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    codec = load_codec(sft_dir)
    tokenizer = codec.vocab.tokenizer
    pairs = DataDir(data_dir).read_pairs().to_pandas()
    pairs["part"] = [user_part(u, cfg.reward.holdout_fraction) for u in pairs.user_id]
    rows = pd.concat([pair_rows(codec, pairs), pairs[["family", "part"]].reset_index(drop=True)], axis=1)
    cols = ["chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"]
    datasets = {part: rows[rows.part == part] for part in ("train", "valid", "test")}
    log.info("reward pairs: %s", {p: len(d) for p, d in datasets.items()})

    fit_metrics = {}
    for kind in KINDS:

        def build(kind=kind):
            return RewardModel.from_policy(sft_dir, kind)

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
        fit_metrics[kind] = fit(
            spec, {"train": train_ds, "valid": valid_ds}, cfg.train, out / "logs", out / kind, storage_path
        )

    test = datasets["test"]
    margins = {}
    for kind in KINDS:
        model = RewardModel.from_pretrained(out / kind)
        chosen = score_lists(model, list(test.chosen_ids), list(test.chosen_mask), codec.vocab.pad_id)
        rejected = score_lists(model, list(test.rejected_ids), list(test.rejected_mask), codec.vocab.pad_id)
        margins[kind] = chosen - rejected
    margins["combined"] = margins["coarse"] + margins["fine"]  # R = R_c + R_f (eq. 15)
    logs = {kind: read_jsonl(out / "logs" / f"reward_{kind}.jsonl") for kind in KINDS}
    plot_reward_curves(logs, out / "reward_curves.png")
    metrics = {
        "accuracy": pairwise_accuracy(margins, test.family.to_numpy()),
        "test_pairs": test.family.value_counts().to_dict(),
        "pairs": {p: len(d) for p, d in datasets.items()},
        "fit": {
            k: {m: v for m, v in fm.items() if m.startswith(("train_", "valid_", "epoch", "step"))}
            for k, fm in fit_metrics.items()
        },
        "margin_std": {k: float(np.std(m)) for k, m in margins.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics
