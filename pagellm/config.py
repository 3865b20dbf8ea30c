"""Typed configuration: every default of the paper lives here, once.

The configuration is a tree of dataclasses (one section per stage). YAML files in ``configs/``
and dotted ``key=value`` command-line overrides are merged onto it with OmegaConf's structured
configs, which reject unknown keys and values of the wrong type and name the offending key.
Range checks that types cannot express live in each section's ``__post_init__``.

Paper references are to arXiv:2506.09084v2 ("PageLLM"); section 5.1.4 gives the training values.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import operator
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pagellm.errors import ConfigError

PAIR_FAMILIES = ("np", "rk", "d", "rd", "pm")  # data.pair_families (pagellm.data.rules builds each)
REWARD_POOLINGS = ("mean", "dcg")  # reward.fine_pooling (pagellm.model.modeling.item_weights)
FINE_MODELS = ("lm", "multivae")  # reward.fine_model (pagellm.model.modeling.load_reward_head)
TS_FORMATS = ("auto", "unix_s", "unix_ms", "iso")  # data.ts_format (pagellm.data.schema.parse_timestamps)
PAGE_MODES = ("generate", "score", "hybrid")  # eval.page_mode (pagellm.model.decoding.write_pages)
TILT_HISTORIES = ("all", "prompt")  # eval.tilt_history (pagellm.model.artifact.Policy.write_tokens)


BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def opt(default, help: str, **bounds):
    """A configuration field: its default, its help (which ``pagellm config`` prints and
    ``configs/default.yaml`` carries as comments, ``config_yaml``) and, for a number, the range
    ``load_config`` holds it to (``ge``/``gt``/``le``/``lt``; None always passes for Optional)."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"opt() got unknown bounds {sorted(unknown)}")
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def range_text(bounds: dict) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``>= 0 and < 1``."""
    return " and ".join(f"{BOUNDS[k][0]} {v:g}" for k, v in bounds.items())


def check_ranges(merged, cls: type, prefix: str = "") -> None:
    """Every number of ``merged`` (an OmegaConf tree of ``cls``) inside its field's bounds and
    finite; runs before the sections' ``__post_init__`` relations, so they see sane values."""
    for f in fields(cls):
        key, value = f"{prefix}{f.name}", merged[f.name]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            check_ranges(value, type(default), f"{key}.")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = f.metadata["bounds"]
        if not math.isfinite(value) or not all(BOUNDS[k][1](value, v) for k, v in bounds.items()):
            need = range_text(bounds) if bounds else "finite"
            raise ConfigError(f"{key} must be {need}, got {value}")


def section(cls, help: str):
    """A nested section (a dataclass of fields) with its help."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class DataConfig:
    """Data stage: ingestion, split, golden lists, preference pairs (paper 3, 4.2, 5.1.1)."""

    dataset: str = opt(
        "synthetic",
        "input as KIND[:PATH]: amazon2014, amazon2018, movielens, parquet, csv or synthetic "
        "(for synthetic PATH is the number of interactions, e.g. synthetic:100000)",
    )
    positive_threshold: float = opt(3.0, "r > positive_threshold is a positive interaction (paper section 3: r_ui > 3)")
    negative_threshold: float = opt(
        3.0, "r < negative_threshold is a non-preferred interaction (np family, section 4.2.4: r_ui < 3)"
    )
    rating_min: float = opt(
        0.5,
        "lowest valid rating; rows outside [rating_min, rating_max] are dropped as rating_out_of_range "
        "(0.5 admits MovieLens half stars; Amazon uses 1-5)",
    )
    rating_max: float = opt(5.0, "highest valid rating")
    split: list[float] = opt(
        [0.8, 0.1, 0.1], "per-user chronological train/validation/test fractions (section 5.1.1: 80/10/10)"
    )
    prompt_max_items: int = opt(
        20, "longest prompt history, in items (the paper's case study shows a 20-item history)", ge=1
    )
    golden_fraction: float = opt(
        0.5,
        "share of a user's training positives (the newest) kept out of the training prompt to "
        "build a golden list from (not given by the paper)",
        gt=0.0,
        lt=1.0,
    )
    extra_ft_fractions: list[float] = opt(
        [],
        "more fine-tuning windows per user: each fraction holds back that share of the "
        "training positives as another (prompt, golden list) row of ft/ (pairs use "
        "golden_fraction only); the paper has one instance per user",
    )
    pairs_from_extra_windows: bool = opt(
        False,
        "also build the four negatives for every extra window (the paper has one golden "
        "list, hence one pair per family, per user)",
    )
    golden_candidates: str = opt(
        "future",
        "a window's golden candidates: future (the training positives after its prompt cut: what the "
        "user went on to like) or outside_prompt (every training positive not in the prompt, older ones "
        "too: the paper's 4.2.3 step 1, which teaches pages of the past that evaluation masks)",
    )
    empty_history_windows: bool = opt(
        False,
        "keep windows whose prompt is empty (the paper does; on Amazon they were 21% of the fine-tuning "
        "rows, pages with nothing to condition on); skipped windows are counted as ft: empty_history",
    )
    golden_max_items: int = opt(20, "longest golden list K (and longest negative list)", ge=1)
    pair_families: list[str] = opt(
        list(PAIR_FAMILIES),
        "negative families of D_reward: np (disliked items), rk (ranking swaps), d (one category), rd "
        "(regrouped), and pm (each golden item swapped for an unseen item of nearly the same training "
        "popularity: the only family that asks the reward which items are relevant, not how they are "
        "arranged; not in the paper, configs/paper.yaml leaves it out)",
    )
    category_cap: float = opt(
        0.4, "lambda: no category may hold more than ceil(lambda * K) of the K golden items (4.2.3)", gt=0.0, le=1.0
    )
    rk_swaps: int = opt(2, "adjacent swaps applied to the golden list to make a ranking (rk) negative (4.2.4)", ge=1)
    seed: int = opt(0, "seed of every random choice of the data stage (synthetic data, swaps, replacements)", ge=0)
    train_keep: float = opt(
        1.0,
        "cold start (paper 5.6, RQ5): keep this seeded share of each user's training interactions "
        "(at least one; any rating) after the split; validation and test are untouched. The others "
        "are written to withheld.parquet and count as never seen (not in prompts, pairs or masks)",
        gt=0.0,
        le=1.0,
    )
    columns: dict[str, str] = opt(
        {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "ts": "ts"},
        "csv/parquet adapters: canonical column -> column in the interactions file",
    )
    items_path: Optional[str] = opt(None, "csv/parquet adapters: an optional items table")
    item_columns: dict[str, str] = opt(
        {"item_id": "item_id", "category": "category", "title": "title", "brand": "brand"},
        "csv/parquet adapters: the items table's columns (category may name a column holding a "
        "list or a |-separated string of categories; the first is the category)",
    )
    encoding_errors: str = opt(
        "strict",
        "text input that is not valid UTF-8: strict stops, naming the file and its first bad line; replace "
        "reads it with the bad bytes replaced by U+FFFD and counts the repaired lines per file in the stats",
    )
    ts_format: str = opt(
        "auto",
        "the time column: auto (detected per column: integer unix seconds, unix milliseconds when the median "
        "is >= 1e11, or ISO-8601 dates / datetimes, with or without a zone; a column mixing numbers and dates "
        "is an error naming a row), unix_s, unix_ms or iso; the stats say which was read",
    )
    min_users: int = opt(
        1,
        "the data stage fails (exit 2, naming why users were dropped) when it keeps fewer users than this; "
        "its outputs and statistics are still written for inspection",
        ge=1,
    )
    users_per_block: int = opt(
        2000, "users per block of the local and gather engines (smaller: more parallelism, more overhead)", ge=1
    )
    rows_per_partition: int = opt(
        500_000,
        "streaming (ray) engine: interactions per shuffle partition, the unit a task splits and builds "
        "(at least 2 per CPU; smaller: less memory per task, more tasks)",
        ge=1,
    )

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f <= 0 for f in self.split):
            raise ConfigError(f"data.split must be three positive fractions, got {self.split}")
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ConfigError(f"data.split must sum to 1, got {self.split} (sum {sum(self.split)})")
        if any(not 0.0 < f < 1.0 for f in self.extra_ft_fractions):
            raise ConfigError(f"data.extra_ft_fractions must lie in (0, 1), got {self.extra_ft_fractions}")
        if self.rating_min >= self.rating_max:
            raise ConfigError(f"data.rating_min ({self.rating_min}) must be below data.rating_max ({self.rating_max})")
        if self.positive_threshold >= self.rating_max:
            raise ConfigError(
                f"data.positive_threshold ({self.positive_threshold}) must be below data.rating_max "
                f"({self.rating_max}): no rating could be a positive"
            )
        if self.negative_threshold > self.positive_threshold:
            raise ConfigError(
                f"data.negative_threshold ({self.negative_threshold}) must be <= data.positive_threshold "
                f"({self.positive_threshold}): a rating cannot be both liked and disliked"
            )
        if self.golden_candidates not in ("future", "outside_prompt"):
            raise ConfigError(
                f"data.golden_candidates must be 'future' or 'outside_prompt', got {self.golden_candidates!r}"
            )
        unknown = [f for f in self.pair_families if f not in PAIR_FAMILIES]
        if unknown or not self.pair_families or len(set(self.pair_families)) < len(self.pair_families):
            raise ConfigError(
                f"data.pair_families must be distinct names among {list(PAIR_FAMILIES)}, got {self.pair_families}"
            )
        if self.encoding_errors not in ("strict", "replace"):
            raise ConfigError(f"data.encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}")
        if self.ts_format not in TS_FORMATS:
            raise ConfigError(f"data.ts_format must be one of {list(TS_FORMATS)}, got {self.ts_format!r}")
        missing = {"user_id", "item_id", "rating", "ts"} - set(self.columns)
        if missing:
            raise ConfigError(f"data.columns lacks a mapping for {sorted(missing)}")


@dataclass
class ModelConfig:
    """The policy backbone (section 5.1.4: GPT-2, max sequence length 1,024)."""

    name_or_path: Optional[str] = opt(
        None,
        "a pretrained model name or local path (e.g. a saved GPT-2); null builds the "
        "embedded small GPT-2 below, with a BPE tokenizer trained on the catalogue text",
    )
    n_layer: int = opt(4, "embedded GPT-2: transformer blocks", ge=1)
    n_head: int = opt(4, "embedded GPT-2: attention heads", ge=1)
    n_embd: int = opt(128, "embedded GPT-2: hidden size", ge=1)
    max_seq_len: int = opt(1024, "embedded GPT-2: longest sequence (positions)", ge=8)
    bpe_vocab_size: int = opt(2000, "embedded tokenizer: BPE vocabulary before the user and item tokens", ge=1)
    lora_rank: int = opt(
        0,
        "LoRA through peft: 0 trains the full model; > 0 freezes the base and trains adapters on "
        "lora_targets plus the new user/item token embeddings",
        ge=0,
    )
    lora_alpha: int = opt(16, "LoRA scaling alpha", gt=0)
    lora_dropout: float = opt(0.05, "LoRA dropout", ge=0.0, lt=1.0)
    lora_targets: list[str] = opt(
        [],
        "modules that get LoRA adapters; [] (default): by architecture, GPT-2 c_attn, Llama / Mistral / "
        "Qwen2 q_proj and v_proj (pagellm.model.modeling.LORA_TARGETS)",
    )
    user_tokens: bool = opt(
        False,
        "a user_<id> token per training user, first in every prompt (the paper's P5-style ids). Off: "
        "prompts are the history alone; on Amazon next-item validation NDCG@100 0.112 without vs 0.099 "
        "with them (the tokens let the model memorise each user's sequence; docs/deviations.md)",
    )
    dropout: float = opt(
        0.1, "embedded GPT-2: dropout on embeddings, attention and residuals (GPT-2's own default 0.1)", ge=0.0, lt=1.0
    )
    item_init: str = opt(
        "cooccurrence",
        "item-token embedding rows at the start of SFT: p5 (random, N(0, var of the base rows), paper "
        "4.2.1) or cooccurrence (truncated SVD of the positive PMI of item co-occurrence in training "
        "positives, rescaled to the same std; items without co-occurrence keep the random row). Amazon "
        "validation NDCG@100 after fine-tuning 0.1178 vs 0.0984 with p5 (docs/deviations.md)",
    )

    def __post_init__(self) -> None:
        if self.item_init not in ("p5", "cooccurrence"):
            raise ConfigError(f"model.item_init must be 'p5' or 'cooccurrence', got {self.item_init!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")


@dataclass
class TrainConfig:
    """The one training path of every supervised stage: Ray Train TorchTrainer + DeepSpeed."""

    num_workers: int = opt(2, "Ray Train workers (data-parallel ranks)", ge=1)
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float = opt(1.0, "CPUs per worker (also its torch threads)", gt=0.0)
    deepspeed: bool = opt(True, "DeepSpeed engine; false: plain DDP through ray.train.torch.prepare_model")
    zero_stage: int = opt(
        1,
        "DeepSpeed ZeRO stage (0, 1 or 2; not 3: checkpoints save the full module from rank 0, which "
        "ZeRO-3 partitions away)",
        ge=0,
        le=2,
    )
    bf16: bool = opt(True, "bf16 on GPU (CPU trains in fp32)")
    max_failures: int = opt(2, "worker deaths survived by resuming from the latest checkpoint", ge=-1)
    side_by_side: bool = opt(
        True,
        "independent fits (the coarse and fine reward heads, SFT members) run at the same time, as many as the "
        "cluster's free CPUs and GPUs hold worker groups for now, each fit's start-up and shut-down overlapping "
        "the others' work; false: one after the other",
    )
    weight_decay: float = opt(0.01, "AdamW weight decay (torch's default)", ge=0.0)
    lr_schedule: str = opt(
        "linear",
        "linear: warm-up over warmup_fraction of a fit's steps, then linear decay to 0; constant: the "
        "stage's learning rate throughout (the paper gives none)",
    )
    warmup_fraction: float = opt(0.05, "linear schedule: share of a fit's steps spent warming up", ge=0.0, lt=1.0)
    shuffle: bool = opt(
        True, "reshuffle each worker's rows every epoch (seeded): meta rows otherwise come in pattern blocks"
    )
    log_every_steps: int = opt(10, "a training-loss line in the JSONL log every N steps", ge=1)
    wandb_mode: str = opt("offline", "wandb mode: offline, or online once wandb is configured")
    wandb_project: str = opt("pagellm", "wandb project")
    seed: int = opt(0, "seed of model initialisation and data order", ge=0)

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"train.lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")


@dataclass
class SFTConfig:
    """Supervised stages (section 4.3; values from section 5.1.4)."""

    meta_epochs: int = opt(
        3, "meta-information pre-training epochs; 0 skips it (the next phase starts from the initialised LM)", ge=0
    )
    meta_lr: float = opt(5e-5, "meta pre-training learning rate", gt=0.0)
    batch_size: int = opt(32, "rows per step (global, split over the workers)", ge=1)
    ft_epochs: int = opt(10, "golden-list (ground-truth) fine-tuning epochs", ge=1)
    ft_lr: float = opt(2e-5, "golden-list fine-tuning learning rate", gt=0.0)
    rating_loss_weight: float = opt(
        1.0, "weight of the rating regression (eq. 7) next to the meta next-token loss (eq. 8)", ge=0.0
    )
    max_meta_tokens: int = opt(128, "meta prompts are cut to this many tokens", ge=8)
    max_meta_rows_per_pattern: Optional[int] = opt(
        None,
        "a seeded sample of at most this many meta rows per pattern (a-d, "
        "rating); null: all. Large logs otherwise make meta pre-training long",
        ge=1,
    )
    next_item_epochs: int = opt(
        50,
        "next-item pre-training after meta pre-training (pattern (d) as sequential recommenders train it: "
        "every prefix of a user's training positives predicts the next at the page's first slot, "
        "item-block cross-entropy); the most epochs, stopped on validation NDCG@100 (the best exported); "
        "0 skips it, as the paper does",
        ge=0,
    )
    next_item_lr: float = opt(1e-3, "next-item pre-training: peak learning rate", gt=0.0)
    next_item_max_items: int = opt(50, "next-item pre-training: the longest history before a target item", ge=1)
    next_item_horizon: int = opt(
        1,
        "next-item pre-training: a prefix's targets are the user's next this many positives, each "
        "weighted 1/n in a multinomial likelihood over the item block (PinnerFormer's dense all-action "
        "loss; evaluation's targets are every positive of the next period, not the next alone); "
        "1: the next item only, as SASRec trains",
        ge=1,
    )
    patience: int = opt(
        10,
        "next-item pre-training: epochs without a better validation NDCG@100 (score mode, every seen "
        "item masked) before stopping; the best epoch is exported",
        ge=1,
    )
    ft_patience: int = opt(
        3,
        "golden-list fine-tuning (ft_select ndcg@100): the same for its epochs. After next-item "
        "pre-training it peaks at epoch 1 or 2 (all 11 Amazon SFTs, docs/training.md), so 3 exports "
        "the same epoch as 10 did and stops 5-6 epochs sooner",
        ge=1,
    )
    ft_select: str = opt(
        "ndcg@100",
        "golden-list fine-tuning exports the epoch with the best validation ndcg@100 (stopped by ft_patience), or "
        "the last epoch (last, the paper's)",
    )
    valid_page_max_items: int = opt(20, "greedy decoding length for valid_page_rate", ge=1)
    members: int = opt(
        1,
        "LMs trained through every SFT phase with seeds train.seed, train.seed + 1, ... (SFT_DIR/members/k); "
        "the policy ranks with their geometric mean, which PPO then trains as one model "
        "(pagellm.model.ensemble). K times the SFT time and K forward passes a page; 1: one LM, the paper's",
        ge=1,
    )
    unlikelihood_weight: float = opt(
        0.0,
        "weight of an unlikelihood term on repeated page items and an empty page, added to "
        "eq. 9 (not in the paper: 0 keeps eq. 9 alone); teaches a small model the page schema",
        ge=0.0,
    )

    def __post_init__(self) -> None:
        if self.ft_select not in ("ndcg@100", "last"):
            raise ConfigError(f"sft.ft_select must be 'ndcg@100' or 'last', got {self.ft_select!r}")


@dataclass
class RewardConfig:
    """Coarse and fine reward heads (section 4.4; values from section 5.1.4)."""

    epochs: int = opt(5, "training epochs per head", ge=1)
    lr: float = opt(1e-5, "learning rate", gt=0.0)
    batch_size: int = opt(64, "pairs per step (global)", ge=1)
    early_stopping: bool = opt(True, "stop on validation log-likelihood and export the best epoch")
    patience: int = opt(1, "epochs without improvement before stopping", ge=1)
    fine_pooling: str = opt(
        "mean",
        "how R_f pools its item scores: mean (eq. 13, every slot alike) or dcg (slot k weighted "
        "1/log2(1 + k), normalised: the top of the page counts as it does in NDCG)",
    )
    fine_model: str = opt(
        "lm",
        "what R_f reads: lm (the paper's fine head: the SFT backbone with a scalar head, Bradley-Terry "
        "on D_reward) or multivae (ours: log(n p(item | the prompt's items)) of a Multi-VAE fitted on "
        "the training positives as the compare report fits it; a collaborative view the policy lacks)",
    )
    fine_vaes: int = opt(
        1,
        "with fine_model=multivae: Multi-VAEs fitted (seeds train.seed, train.seed + 1, ...) whose "
        "log-probabilities R_f averages; more than one smooths one fit's quirks (ours)",
        ge=1,
    )
    fine_itemknn: bool = opt(
        False,
        "with fine_model=multivae: add ItemKNN's log-normalised scores to R_f (a geometric mixture), "
        "its neighbourhood and weight the best of R_f's own validation NDCG@100 (ours)",
    )
    fine_ease: bool = opt(
        False,
        "with fine_model=multivae: add EASE's log-normalised scores to R_f (Steck 2019, the linear "
        "item-item autoencoder in closed form), its L2 penalty chosen as the ease baseline's and its "
        "weight, jointly with ItemKNN's, the best of R_f's own validation NDCG@100 (ours)",
    )
    fine_sasrecs: int = opt(
        0,
        "with fine_model=multivae: SASRec seeds (train.seed, train.seed + 1, ...; trained as the sasrec "
        "baseline, on fine_sasrec_batch_size targets a step) whose mean log-softmax after the history "
        "read in order joins R_f, its weight chosen "
        "jointly with ItemKNN's and EASE's on R_f's own validation NDCG@100; 0 leaves the sequential "
        "view out (ours: the set views are blind to order)",
        ge=0,
    )
    fine_sasrec_batch_size: int = opt(
        512,
        "targets per step of R_f's SASRec seeds; the sasrec baseline keeps RecBole's 2048. Amazon: "
        "R_f validation NDCG@100 0.1292 at 512 against 0.1293 at 2048, in about half the time (the "
        "seeds stop after 22-31 epochs instead of 47-65)",
        ge=1,
    )
    policy_pairs: bool = opt(
        False,
        "add a ps pair per (prompt, golden list) of D_reward: the golden list against a page of its "
        "length sampled from the SFT policy as PPO rolls out, of items the user never interacted with "
        "(negatives from the distribution the reward will score in PPO; ours, not the paper's)",
    )
    agreement_users: int = opt(
        300,
        "validation users whose policy-sampled pages measure how well each head ranks pages: the "
        "Spearman correlation of reward with page NDCG (metrics.json 'agreement'); 0 skips it",
        ge=0,
    )
    agreement_samples: int = opt(4, "pages sampled per agreement user (within-user correlation needs >= 2)", ge=2)
    holdout_fraction: float = opt(
        0.1,
        "pairs are split by user: this share of users is validation (early stopping) and "
        "the same share is test (the reported pairwise accuracy)",
        gt=0.0,
        le=0.5,
    )

    def __post_init__(self) -> None:
        if self.fine_pooling not in REWARD_POOLINGS:
            raise ConfigError(f"reward.fine_pooling must be one of {list(REWARD_POOLINGS)}, got {self.fine_pooling!r}")
        if self.fine_model not in FINE_MODELS:
            raise ConfigError(f"reward.fine_model must be one of {list(FINE_MODELS)}, got {self.fine_model!r}")
        if self.fine_model != "multivae" and (
            self.fine_vaes > 1 or self.fine_itemknn or self.fine_ease or self.fine_sasrecs
        ):
            raise ConfigError(
                "reward.fine_vaes > 1, reward.fine_itemknn, reward.fine_ease and reward.fine_sasrecs "
                "need reward.fine_model=multivae"
            )


@dataclass
class RoleConfig:
    """Resources of one PPO role: ``num_workers`` Ray actors, each with these CPUs/GPUs."""

    num_workers: int = opt(1, "actors of this role (policy and critic: data-parallel ranks)", ge=1)
    num_cpus: float = opt(0.25, "CPUs per actor", ge=0.0)
    num_gpus: float = opt(0.0, "GPUs per actor (fractions share one GPU)", ge=0.0)
    resources: dict[str, float] = opt(
        {}, "custom Ray resources per actor, e.g. {gpu_pool_a: 1}: pins the role to nodes started with them"
    )


PPO_ROLES = ("policy", "reference", "critic", "coarse", "fine")


@dataclass
class PPOConfig:
    """PPO (section 4.5; values from section 5.1.4)."""

    clip: float = opt(0.2, "clipped surrogate epsilon", gt=0.0)
    lr: float = opt(1e-5, "policy learning rate", gt=0.0)
    critic_lr: float = opt(1e-5, "critic learning rate", gt=0.0)
    batch_size: int = opt(64, "pages (prompts) per PPO iteration", ge=1)
    epochs: int = opt(5, "passes over the rollout prompts (the paper runs PPO for 5 epochs)", ge=1)
    max_iterations: Optional[int] = opt(None, "cap on the iterations (quick runs, tests); null: epochs decide", ge=1)
    update_epochs: int = opt(1, "optimisation passes over each iteration's rollouts", ge=1)
    minibatch_size: int = opt(16, "pages per optimisation step (batch_size / minibatch_size steps per pass)", ge=1)
    kl_beta: float = opt(0.1, "per-token KL penalty against the reference policy", ge=0.0)
    kl_estimator: str = opt("k1", "k1 = log pi - log pi_ref; k3 = (r - 1) - log r, always >= 0")
    kl_adaptive: bool = opt(False, "adaptive KL controller (Ziegler et al. 2019) instead of a fixed beta")
    kl_target: float = opt(6.0, "adaptive controller: target KL per page", gt=0.0)
    kl_horizon: int = opt(10000, "adaptive controller: horizon in pages", ge=1)
    advantage: str = opt(
        "gae",
        "gae: the critic's values and GAE (the paper); group: k = group_size pages per prompt, each "
        "page's reward (R minus beta x its KL) standardised within its group, no critic trained",
    )
    group_size: int = opt(
        4, "advantage=group: pages sampled per prompt (batch_size pages = batch_size / k prompts)", ge=1
    )
    gamma: float = opt(1.0, "discount (the paper: 1)", ge=0.0, le=1.0)
    gae_lambda: float = opt(0.95, "GAE lambda", ge=0.0, le=1.0)
    value_clip: float = opt(0.2, "clip of the value loss", gt=0.0)
    value_loss_coef: float = opt(1.0, "scale of the critic's loss (the critic is its own model)", ge=0.0)
    reward_normalization: bool = opt(True, "running mean/std of the page reward")
    rewards: str = opt(
        "both", "the reward-head ablation: both (R = w_c R_c + w_f R_f, eq. 15), coarse, fine or none (KL only)"
    )
    coarse_weight: float = opt(1.0, "w_c, the weight of R_c in R", ge=0.0)
    fine_weight: float = opt(1.0, "w_f, the weight of R_f in R", ge=0.0)
    fine_objective: str = opt(
        "sampled",
        "how R_f trains the policy. sampled: in the sampled page's reward, as PPO does (the paper); "
        "expected (ours; needs reward.fine_model=multivae, whose R_f scores every item at once): at "
        "every step of a rollout page, sum over all actions of pi(a) [kl_beta (log pi - log pi_ref) - "
        "fine_weight r(a)], minimised by pi ∝ pi_ref exp(fine_weight r / kl_beta); R_f and the KL "
        "penalty then leave the sampled reward, which keeps R_c. closed_form (ours; multivae too): "
        "that optimum taken exactly where pages are written: PPO trains on R_c (and the KL) alone "
        "and the policy's pages add fine_weight / kl_beta x r(item | prompt) to every slot's item "
        "logits (PPO_DIR/policy/fine_tilt, applied by evaluate, PPO validation and Serve)",
    )
    reward_placement: str = opt(
        "terminal",
        "terminal: all reward on the last token (the paper); dense: each item's fine score "
        "on its own token (divided by the page length, so the sum is R_f) and R_c on the last token",
    )
    temperature: float = opt(1.0, "rollout sampling temperature", gt=0.0)
    top_p: float = opt(1.0, "rollout nucleus sampling", gt=0.0, le=1.0)
    page_min_items: int = opt(1, "shortest rollout page (EOS allowed after this many items)", ge=1)
    page_max_items: int = opt(20, "longest rollout page (EOS forced after this many items)", ge=1)
    exclude_history: bool = opt(True, "rollout pages may not repeat an item of the prompt")
    eval_every: int = opt(
        10,
        "every N iterations: the validation metrics of `pagellm evaluate --split val` (the eval "
        "section's protocol: page length, masking, decoding) and the held-out reward",
        ge=1,
    )
    eval_max_users: Optional[int] = opt(None, "validate on the first N validation users; null: all", ge=1)
    generate_batch_size: int = opt(256, "prompts per rollout generation call inside a policy worker", ge=1)
    checkpoint_every: int = opt(10, "every N iterations a checkpoint for --resume", ge=1)
    final_policy: str = opt(
        "last",
        "PPO_DIR/policy: last (the paper: the policy after the last iteration) or best_val (the "
        "checkpoint with the best validation NDCG@100, the SFT policy of iteration 0 included; needs "
        "checkpoint_every to divide eval_every)",
    )
    holdout_fraction: float = opt(
        0.1, "users whose prompts are held out of rollouts (the held-out reward curve)", ge=0.0, le=0.5
    )
    rollout_prompts: str = opt(
        "validation",
        "validation: each validation user's training history, the prompt validation NDCG reads (the "
        "policy is tuned on the very prompts it is selected on); training_windows: the prompts of every "
        "fine-tuning window (data ft/, main and extra), earlier histories of the same users",
    )
    seed: int = opt(0, "seed of rollout order and sampling", ge=0)
    colocate: bool = opt(
        True,
        "pack the i-th worker of every role into one bundle (one GPU shared by fractions); false: "
        "every actor its own bundle",
    )
    roles_in_driver: bool = opt(
        False,
        "every role in the driver process, one worker each, no Ray actors: quick runs of small models on "
        "one machine (a laptop, CI), where five actors' start-up outweighs the training; the roles' "
        "workers and colocate are then unused (a Tune trial still reserves the roles' CPUs and GPUs, in its own "
        "bundle)",
    )
    policy: RoleConfig = section(RoleConfig, "the trainable policy's actors")
    reference: RoleConfig = section(RoleConfig, "the frozen SFT policy's actors")
    critic: RoleConfig = section(RoleConfig, "the critic's actors (initialised from the coarse reward model)")
    coarse: RoleConfig = section(RoleConfig, "the coarse reward head's actors")
    fine: RoleConfig = section(RoleConfig, "the fine reward head's actors")

    def __post_init__(self) -> None:
        choices = {
            "kl_estimator": ("k1", "k3"),
            "rewards": ("both", "coarse", "fine", "none"),
            "reward_placement": ("terminal", "dense"),
            "fine_objective": ("sampled", "expected", "closed_form"),
            "final_policy": ("last", "best_val"),
            "advantage": ("gae", "group"),
            "rollout_prompts": ("validation", "training_windows"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"ppo.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(
                f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.minibatch_size ({self.minibatch_size})"
            )
        pins = {role: sorted(getattr(self, role).resources) for role in PPO_ROLES}
        if self.colocate and len({tuple(p) for p in pins.values()}) > 1:
            raise ConfigError(
                f"ppo.colocate packs every role into one bundle, which no node offers when roles ask for different "
                f"custom resources ({', '.join(f'{r}: {p}' for r, p in pins.items())}): set ppo.colocate=false"
            )
        for role in ("policy", "critic"):
            workers = getattr(self, role).num_workers
            if self.minibatch_size % workers:
                raise ConfigError(
                    f"ppo.minibatch_size ({self.minibatch_size}) must split evenly over ppo.{role}.num_workers ({workers})"
                )
        if self.final_policy == "best_val" and self.eval_every % self.checkpoint_every:
            raise ConfigError(
                f"ppo.final_policy=best_val needs ppo.checkpoint_every ({self.checkpoint_every}) to divide ppo.eval_every ({self.eval_every}): "
                "every evaluated policy must be saved"
            )
        if self.advantage == "group" and (self.group_size < 2 or self.batch_size % self.group_size):
            raise ConfigError(
                f"ppo.advantage=group needs ppo.group_size >= 2 dividing ppo.batch_size ({self.batch_size}), "
                f"got {self.group_size}"
            )
        if self.fine_objective == "closed_form" and (self.kl_adaptive or self.kl_beta <= 0):
            raise ConfigError(
                "ppo.fine_objective=closed_form tilts pages by fine_weight / kl_beta: it needs a fixed "
                f"ppo.kl_beta > 0 (got kl_beta={self.kl_beta}, kl_adaptive={self.kl_adaptive})"
            )
        if self.page_min_items > self.page_max_items:
            raise ConfigError(
                f"ppo.page_min_items ({self.page_min_items}) must be <= ppo.page_max_items ({self.page_max_items})"
            )


@dataclass
class EvalConfig:
    """`pagellm evaluate` and PPO's validation: pages for every user of a split, scored with docs/metrics.md."""

    page_items: int = opt(100, "page length K (NDCG@100 needs 100)", ge=1)
    page_mode: str = opt(
        "score",
        "how a page of page_items is written: generate (every slot decoded under PPO's page constraint), "
        "score (the item block ranked by the first slot's distribution, one forward pass) or hybrid "
        "(hybrid_items slots decoded, the rest ranked by the distribution after them); evaluation, "
        "PPO validation and serving alike. score is the default: Amazon validation NDCG@100 of one SFT "
        "policy 0.0981 (score), 0.0956 (hybrid, 3 slots), 0.0949 (generate)",
    )
    hybrid_items: int = opt(3, "hybrid page mode: slots decoded before the rest are ranked by score", ge=1)
    tilt_history: str = opt(
        "all",
        "what a closed-form R_f tilt (ppo.fine_objective=closed_form) reads for a user: all (every positive "
        "before the split, as R_f's weights were chosen; ours) or prompt (the LM prompt's last "
        "data.prompt_max_items items); evaluation, PPO validation and serving alike (rollouts read the "
        "prompt). MovieLens validation NDCG@100 of the SFT policy tilted by the embedded R_f at w 0.7: "
        "0.1956 (all) vs 0.1920 (prompt, 50 items)",
    )
    decoding: str = opt("greedy", "greedy or sample, both under the page constraint of PPO")
    temperature: float = opt(1.0, "sample only: temperature", gt=0.0)
    top_p: float = opt(1.0, "sample only: nucleus", gt=0.0, le=1.0)
    mask_seen: bool = opt(
        True,
        "full-ranking protocol: every item the user interacted with before the split is excluded "
        "(train; train + validation for test), not only the prompt's items",
    )
    batch_size: int = opt(64, "users per generation batch", ge=1)
    num_actors: int = opt(1, "Ray Data actor pool size, each actor holding the model", ge=1)
    num_cpus: float = opt(1.0, "CPUs per actor (also its torch threads)", ge=0.0)
    num_gpus: float = opt(0.0, "GPUs per actor", ge=0.0)
    seed: int = opt(0, "seed of sampled decoding", ge=0)
    report_baselines: list[str] = opt(
        ["popularity", "itemknn", "userknn", "multivae", "sasrec", "ease"],
        "in-house baselines (docs/baselines.md; epoch or neighbourhood chosen on validation) that "
        "`pagellm run` scores on the test split beside SFT and PPO in its report",
    )
    baseline_epochs: int = opt(
        0,
        "in-house trained baselines (bprmf, multivae, sasrec): most training epochs; 0 keeps each model's "
        "own (100, 200, 100)",
        ge=0,
    )
    baseline_patience: int = opt(
        10,
        "in-house trained baselines: epochs without a better validation NDCG@100 before stopping (best restored)",
        ge=1,
    )
    recbole_python: str = opt(
        ".venv-recbole/bin/python",
        "python of RecBole's own environment, for `recbole:MODEL` baselines (built by `pagellm setup recbole`)",
    )
    recbole_epochs: int = opt(100, "recbole:MODEL baselines: most training epochs (one for Pop)", ge=1)
    recbole_patience: int = opt(
        10, "recbole:MODEL baselines: epochs without a better validation NDCG@100 before stopping (best restored)", ge=1
    )
    recbole_settings: dict[str, Any] = opt(
        {}, "further RecBole settings per model, e.g. {MultiVAE: {total_anneal_steps: 2000}}"
    )

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "sample"):
            raise ConfigError(f"eval.decoding must be 'greedy' or 'sample', got {self.decoding!r}")
        if self.page_mode not in PAGE_MODES:
            raise ConfigError(f"eval.page_mode must be one of {PAGE_MODES}, got {self.page_mode!r}")
        if self.tilt_history not in TILT_HISTORIES:
            raise ConfigError(f"eval.tilt_history must be one of {TILT_HISTORIES}, got {self.tilt_history!r}")


@dataclass
class TuneConfig:
    """`pagellm tune`: Ray Tune over the KL coefficient beta (ppo.kl_beta) and the golden-list
    category cap lambda (data.category_cap), the two the paper studies (section 5.1.4)."""

    search: str = opt(
        "grid",
        "grid: every (beta, lambda) of the two lists, num_samples times; optuna / hyperopt: that searcher "
        "proposes beta log-uniformly in [min(betas), max(betas)] and lambda among lambdas, for num_samples trials",
    )
    betas: list[float] = opt([0.05, 0.1, 0.2], "values (grid) or range (searchers) of ppo.kl_beta")
    lambdas: list[float] = opt(
        [0.3, 0.4, 0.5],
        "values of data.category_cap; each changes the golden lists, so the data, SFT and "
        "reward stages run once per distinct lambda (cached by a hash of their configuration; "
        "meta and next-item pre-training, which lambda leaves alone, run once for all)",
    )
    num_samples: int = opt(1, "grid repeats, or trials of a searcher", ge=1)
    scheduler: str = opt(
        "asha",
        "asha: stop weak trials early on validation NDCG@100 (reported every ppo.eval_every "
        "iterations); fifo: run every trial to the end",
    )
    grace_period: int = opt(20, "ASHA: PPO iterations a trial runs before it may be stopped", ge=1)
    reduction_factor: int = opt(2, "ASHA: keep the best 1/reduction_factor at each rung", ge=2)
    max_concurrent_trials: Optional[int] = opt(None, "null: as many as the resources allow", ge=1)
    driver_cpus: float = opt(
        0.25,
        "CPUs of the trial's own process (bundle 0 of its placement group); the PPO roles' bundles "
        "follow, from ppo.<role>",
        ge=0.0,
    )
    seed: int = opt(0, "the searcher's seed", ge=0)

    def __post_init__(self) -> None:
        if self.search not in ("grid", "optuna", "hyperopt"):
            raise ConfigError(f"tune.search must be grid, optuna or hyperopt, got {self.search!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"tune.scheduler must be asha or fifo, got {self.scheduler!r}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise ConfigError(f"tune.betas must be non-empty and >= 0, got {self.betas}")
        if self.search != "grid" and min(self.betas) <= 0:
            raise ConfigError(
                f"tune.betas: a searcher samples beta log-uniformly, so min(betas) must be > 0, got {self.betas}"
            )
        if not self.lambdas or any(not 0.0 < x <= 1.0 for x in self.lambdas):
            raise ConfigError(f"tune.lambdas must be non-empty and in (0, 1], got {self.lambdas}")


@dataclass
class RayConfig:
    """How the local Ray is started when no cluster is attached (RAY_ADDRESS unset)."""

    num_cpus: Optional[int] = opt(None, "CPUs of the local Ray; null: all cores of this machine", ge=1)
    include_dashboard: bool = opt(False, "start Ray's dashboard")

    def cores(self) -> int:
        """The CPUs PageLLM uses on this machine: ``num_cpus``, else every core this process may run
        on (as Ray counts them); the torch threads of work the driver does alone (the baselines)."""
        if self.num_cpus:
            return self.num_cpus
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PageLLMConfig:
    """Every setting of PageLLM, one section per stage."""

    data: DataConfig = section(DataConfig, DataConfig.__doc__)
    model: ModelConfig = section(ModelConfig, ModelConfig.__doc__)
    train: TrainConfig = section(TrainConfig, TrainConfig.__doc__)
    sft: SFTConfig = section(SFTConfig, SFTConfig.__doc__)
    reward: RewardConfig = section(RewardConfig, RewardConfig.__doc__)
    ppo: PPOConfig = section(PPOConfig, PPOConfig.__doc__)
    eval: EvalConfig = section(EvalConfig, EvalConfig.__doc__)
    tune: TuneConfig = section(TuneConfig, TuneConfig.__doc__)
    ray: RayConfig = section(RayConfig, RayConfig.__doc__)


PROFILE_DIR = Path(__file__).parent / "configs"
# --profile NAME: packaged YAMLs applied before any --config file, in this order
PROFILES = {
    # the small GPT-2 from scratch with learning rates that learn (the paper's are for a pretrained GPT-2)
    "embedded": [PROFILE_DIR / "embedded.yaml"],
    # embedded plus sizes that run the whole chain on 2 CPUs in minutes (`pagellm run`'s default)
    "quickstart": [PROFILE_DIR / "embedded.yaml", PROFILE_DIR / "quickstart.yaml"],
    # the paper's recipe where the defaults deviate (docs/deviations.md); layer it after embedded
    "paper": [PROFILE_DIR / "paper.yaml"],
}
# learning rates the embedded profile sets: left at the paper's values on a from-scratch model,
# nothing is learnt (`from_scratch_warning`)
_EMBEDDED_RATES = ("sft.meta_lr", "sft.ft_lr", "reward.lr", "ppo.lr", "ppo.critic_lr")


def sections_key(cfg: "PageLLMConfig", sections, *extra) -> str:
    """Hash of the named configuration sections (and any ``extra`` JSON values): what a cached
    result depends on, so that a changed setting is never answered from the cache."""
    text = json.dumps([{s: asdict(getattr(cfg, s)) for s in sections}, list(extra)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def profile_paths(names: Optional[list[str]]) -> list[Path]:
    """The YAML files of the named profiles, in order (a file named twice is applied once)."""
    paths: list[Path] = []
    for name in names or []:
        if name not in PROFILES:
            raise ConfigError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
        paths += [p for p in PROFILES[name] if p not in paths]
    return paths


def from_scratch_warning(cfg: "PageLLMConfig") -> Optional[str]:
    """A one-line warning when a from-scratch model would train at the paper's learning rates."""
    if cfg.model.name_or_path is not None:
        return None
    defaults = PageLLMConfig()
    if any(_get(cfg, key) != _get(defaults, key) for key in _EMBEDDED_RATES):
        return None
    return (
        "model.name_or_path is unset (a small GPT-2 from scratch) and the learning rates are the paper's, "
        "which are for a pretrained GPT-2 and learn next to nothing here; add --profile embedded "
        "(or --profile quickstart for a run of minutes)"
    )


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


CONFIG_FILE = "config.yaml"  # every stage's resolved configuration, beside its outputs


def write_config(cfg: "PageLLMConfig", directory: str | Path) -> Path:
    """Write ``cfg`` (every key, resolved) as DIRECTORY/config.yaml; it loads back with --config."""
    path = Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def load_config(
    path: Optional[str | Path | list] = None, overrides: Optional[list[str]] = None, values: Optional[dict] = None
) -> PageLLMConfig:
    """Defaults, then the YAML file(s) at ``path`` in order, then dotted ``key=value`` overrides,
    then ``values`` (a nested dict taken verbatim: a path holding ``#`` or ``=`` stays whole,
    where a dotlist would read a comment)."""
    where = "defaults"
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    try:
        merged = OmegaConf.structured(PageLLMConfig)
        for one in paths:
            where = str(one)
            if not Path(one).is_file():
                raise ConfigError(f"config file {one} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(one))
        if overrides:
            bad = [o for o in overrides if "=" not in o or o.startswith("=")]
            if bad:
                raise ConfigError(f"overrides must look like section.key=value, got {bad}")
            where = "command-line overrides"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        if values:
            where = "command-line options"
            merged = OmegaConf.merge(merged, OmegaConf.create(values))
        check_ranges(merged, PageLLMConfig)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"invalid config key '{key}' in {where}: {reason}") from None


def to_yaml(cfg: PageLLMConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


DEFAULT_YAML_HEADER = """# Every setting of PageLLM with its default (the paper's values, section 5.1.4) and its help.
# Generated from pagellm/config.py by `pagellm config > configs/default.yaml`; tests keep it in step.
# Override any key in a YAML file of your own (--config) or on the command line, e.g.
#   pagellm data --dataset KIND:PATH --out DIR data.category_cap=0.3
"""


def _wrap(text: str, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(
        " ".join(text.split()), width=110 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
    )


def _value(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def config_yaml(cfg, indent: str = "") -> str:
    """``cfg`` as YAML with each section's and each field's help above it as comments: what
    ``pagellm config`` prints and ``configs/default.yaml`` holds (for the defaults)."""
    lines = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not indent and lines:
            lines.append("")  # a blank line between top-level sections
        bounds = f.metadata.get("bounds")
        lines += _wrap(f.metadata["help"] + (f" (range: {range_text(bounds)})" if bounds else ""), indent)
        if is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.append(config_yaml(value, indent + "  ").rstrip("\n"))
        else:
            lines.append(f"{indent}{f.name}: {_value(value)}")
    return "\n".join(lines) + "\n"
