"""Typed configuration: every default of the paper lives here, once.

The configuration is a tree of dataclasses (one section per stage). YAML files in ``configs/``
and dotted ``key=value`` command-line overrides are merged onto it with OmegaConf's structured
configs, which reject unknown keys and values of the wrong type and name the offending key.
Range checks that types cannot express live in each section's ``__post_init__``.

Paper references are to arXiv:2506.09084v2 ("PageLLM"); section 5.1.4 gives the training values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _default_columns() -> dict[str, str]:
    return {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "ts": "ts"}


def _default_item_columns() -> dict[str, str]:
    return {"item_id": "item_id", "category": "category", "title": "title", "brand": "brand"}


@dataclass
class DataConfig:
    """Data stage: ingestion, split, golden lists, preference pairs (paper 3, 4.2, 5.1.1)."""

    # Input as KIND[:PATH]; KIND is amazon2014, amazon2018, movielens, parquet, csv or
    # synthetic (PATH for synthetic is the number of interactions, e.g. synthetic:100000).
    dataset: str = "synthetic"
    # r > positive_threshold is a positive interaction (paper section 3: r_ui > 3).
    positive_threshold: float = 3.0
    # r < negative_threshold is a non-preferred interaction (np family, section 4.2.4: r_ui < 3).
    negative_threshold: float = 3.0
    # Valid rating range; rows outside it are dropped as `rating_out_of_range`.
    # 0.5 admits MovieLens half stars; Amazon uses 1-5.
    rating_min: float = 0.5
    rating_max: float = 5.0
    # Per-user chronological train/validation/test fractions (section 5.1.1: 80/10/10).
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # Longest prompt history, in items (the paper's case study shows a 20-item history).
    prompt_max_items: int = 20
    # Share of a user's training positives (the newest ones) kept out of the training prompt so
    # that a golden list can be built from them. Not given by the paper.
    golden_fraction: float = 0.5
    # More fine-tuning windows per user: each fraction holds back that share of the training
    # positives as another (prompt, golden list) row of ft/ (pairs use golden_fraction only).
    # The paper has one instance per user ([]); a small model trained from scratch needs more.
    extra_ft_fractions: list[float] = field(default_factory=list)
    # Longest golden list K (and longest negative list).
    golden_max_items: int = 20
    # lambda: no category may hold more than ceil(lambda * K) of the K golden items (4.2.3).
    category_cap: float = 0.4
    # Adjacent swaps applied to the golden list to make a ranking (rk) negative (4.2.4).
    rk_swaps: int = 2
    # Seed for every random choice of the data stage (synthetic data, swaps, replacements).
    seed: int = 0
    # csv/parquet adapters: canonical column -> column in the user's interactions file.
    columns: dict[str, str] = field(default_factory=_default_columns)
    # csv/parquet adapters: optional items table and its column mapping (category may name a
    # column holding a list or a "|"-separated string of categories; the first is `category`).
    items_path: Optional[str] = None
    item_columns: dict[str, str] = field(default_factory=_default_item_columns)
    # Users per block in the Ray Data pipeline (smaller blocks: more parallelism, more overhead).
    users_per_block: int = 2000

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f <= 0 for f in self.split):
            raise ConfigError(f"data.split must be three positive fractions, got {self.split}")
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ConfigError(f"data.split must sum to 1, got {self.split} (sum {sum(self.split)})")
        if not 0.0 < self.category_cap <= 1.0:
            raise ConfigError(f"data.category_cap must be in (0, 1], got {self.category_cap}")
        if not 0.0 < self.golden_fraction < 1.0:
            raise ConfigError(f"data.golden_fraction must be in (0, 1), got {self.golden_fraction}")
        if any(not 0.0 < f < 1.0 for f in self.extra_ft_fractions):
            raise ConfigError(f"data.extra_ft_fractions must lie in (0, 1), got {self.extra_ft_fractions}")
        if self.rating_min >= self.rating_max:
            raise ConfigError(
                f"data.rating_min ({self.rating_min}) must be below data.rating_max ({self.rating_max})"
            )
        for key in ("prompt_max_items", "golden_max_items", "users_per_block"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.rk_swaps < 1:
            raise ConfigError(f"data.rk_swaps must be >= 1, got {self.rk_swaps}")
        missing = {"user_id", "item_id", "rating", "ts"} - set(self.columns)
        if missing:
            raise ConfigError(f"data.columns lacks a mapping for {sorted(missing)}")


def _default_lora_targets() -> list[str]:
    return ["c_attn"]


@dataclass
class ModelConfig:
    """The policy backbone (section 5.1.4: GPT-2, max sequence length 1,024)."""

    # A pretrained model name or local path (e.g. a saved GPT-2); None or "" builds the embedded
    # small GPT-2 from the fields below, with a BPE tokenizer trained on the catalogue text.
    name_or_path: Optional[str] = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    max_seq_len: int = 1024
    bpe_vocab_size: int = 2000  # embedded tokenizer only
    # LoRA through peft: rank 0 trains the full model; > 0 freezes the base and trains adapters
    # on lora_targets plus the new user/item token embeddings.
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=_default_lora_targets)


@dataclass
class TrainConfig:
    """The one training path of every supervised stage: Ray Train TorchTrainer + DeepSpeed."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    deepspeed: bool = True  # False: plain DDP through ray.train.torch.prepare_model
    zero_stage: int = 1
    bf16: bool = True  # only on GPU; CPU trains in fp32
    max_failures: int = 2  # worker deaths survived by resuming from the latest checkpoint
    log_every_steps: int = 10
    wandb_mode: str = "offline"  # "online" once the user has configured wandb
    wandb_project: str = "pagellm"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(
                f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}: checkpoints save the full "
                "module from rank 0, which ZeRO-3 partitions away"
            )
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class SFTConfig:
    """Supervised stages (section 4.3; values from section 5.1.4)."""

    meta_epochs: int = 3  # meta-information pre-training epochs
    meta_lr: float = 5e-5
    batch_size: int = 32
    ft_epochs: int = 10  # golden-list (ground-truth) fine-tuning epochs
    ft_lr: float = 2e-5
    rating_loss_weight: float = 1.0  # L_rating + w * ... : eq. 7 and eq. 8 are summed
    max_meta_tokens: int = 128  # meta prompts are cut to this many tokens
    valid_page_max_items: int = 20  # greedy decoding length for valid_page_rate


@dataclass
class RewardConfig:
    """Coarse and fine reward heads (section 4.4; values from section 5.1.4)."""

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 64
    early_stopping: bool = True  # on validation log-likelihood
    patience: int = 1  # epochs without improvement before stopping
    # Pairs are split by user: this share of users is validation (early stopping) and the
    # same share is test (the reported pairwise accuracy).
    holdout_fraction: float = 0.1


@dataclass
class PPOConfig:
    """PPO (section 4.5; values from section 5.1.4)."""

    clip: float = 0.2
    lr: float = 1e-5
    batch_size: int = 64
    kl_beta: float = 0.1  # per-token KL penalty against the reference policy
    epochs: int = 5
    reward_normalization: bool = True


@dataclass
class RayConfig:
    """How the local Ray is started when no cluster is attached (RAY_ADDRESS unset)."""

    num_cpus: Optional[int] = None  # None: all cores of this machine
    include_dashboard: bool = False


@dataclass
class PageLLMConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ray: RayConfig = field(default_factory=RayConfig)


EMBEDDED_PROFILE = Path(__file__).parent / "configs" / "embedded.yaml"


def load_config(
    path: Optional[str | Path | list] = None, overrides: Optional[list[str]] = None
) -> PageLLMConfig:
    """Defaults, then the YAML file(s) at ``path`` in order, then dotted ``key=value`` overrides."""
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
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"invalid config key '{key}' in {where}: {reason}") from None


def to_yaml(cfg: PageLLMConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
