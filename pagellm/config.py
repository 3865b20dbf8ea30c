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

from pagellm.errors import ConfigError


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
    # Also build the four negatives for every extra window (more pairs per user; the paper has
    # one golden list, hence one pair per family, per user).
    pairs_from_extra_windows: bool = False
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
    # a seeded sample of at most this many meta rows per pattern (a-d, rating); None: all.
    # Large logs (MovieLens: ~80k ratings -> ~170k rows) otherwise make meta pre-training long.
    max_meta_rows_per_pattern: Optional[int] = None
    valid_page_max_items: int = 20  # greedy decoding length for valid_page_rate
    # Weight of an unlikelihood term on repeated page items and an empty page, added to eq. 9
    # (not in the paper: 0 keeps eq. 9 alone). Teaches a small model the page schema so that
    # even unconstrained greedy pages are valid.
    unlikelihood_weight: float = 0.0


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
class RoleConfig:
    """Resources of one PPO role: ``num_workers`` Ray actors, each with these CPUs/GPUs."""

    num_workers: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0


def _role(num_cpus: float = 0.25) -> RoleConfig:
    return RoleConfig(num_cpus=num_cpus)


PPO_ROLES = ("policy", "reference", "critic", "coarse", "fine")


@dataclass
class PPOConfig:
    """PPO (section 4.5; values from section 5.1.4)."""

    clip: float = 0.2  # clipped surrogate epsilon
    lr: float = 1e-5  # policy learning rate
    critic_lr: float = 1e-5
    batch_size: int = 64  # pages (prompts) per PPO iteration
    # Passes over the training prompts (the paper runs PPO for 5 epochs); max_iterations caps
    # the number of iterations when set (quick runs, tests).
    epochs: int = 5
    max_iterations: Optional[int] = None
    update_epochs: int = 1  # optimisation passes over each iteration's rollouts
    minibatch_size: int = 16  # pages per optimisation step (per iteration: batch_size / this)
    kl_beta: float = 0.1  # per-token KL penalty against the reference policy
    kl_estimator: str = "k1"  # k1 = log pi - log pi_ref; k3 = (r - 1) - log r, always >= 0
    kl_adaptive: bool = False  # adaptive controller (Ziegler et al. 2019) instead of a fixed beta
    kl_target: float = 6.0  # adaptive controller: target KL per page
    kl_horizon: int = 10000
    gamma: float = 1.0  # the paper: gamma = 1
    gae_lambda: float = 0.95
    value_clip: float = 0.2
    value_loss_coef: float = 1.0  # the critic is its own model; this scales its loss
    reward_normalization: bool = True  # running mean/std of the page reward
    # R = coarse_weight * R_c + fine_weight * R_f (eq. 15); `rewards` picks the ablation:
    # both, coarse, fine or none (KL penalty only).
    rewards: str = "both"
    coarse_weight: float = 1.0
    fine_weight: float = 1.0
    # terminal: all reward on the last token (the paper); dense: each item's fine score on its
    # own token (divided by the page length, so the sum is R_f) and R_c on the last token.
    reward_placement: str = "terminal"
    # rollouts: sampling temperature / nucleus, page length, and whether prompt items may recur
    temperature: float = 1.0
    top_p: float = 1.0
    page_min_items: int = 1
    page_max_items: int = 20
    exclude_history: bool = True
    # every N iterations: validation NDCG@100 (greedy constrained pages of eval_page_items) and
    # held-out reward; a checkpoint for --resume
    eval_every: int = 10
    eval_page_items: int = 100
    eval_max_users: Optional[int] = None  # None: every validation user
    generate_batch_size: int = 256  # prompts per generation call inside a policy worker
    checkpoint_every: int = 10
    # PPO_DIR/policy: "last" (the paper: the policy after the last iteration) or "best_val" (the
    # checkpoint with the best validation NDCG@100; PPO can over-optimise the learned rewards,
    # docs/results/amazon2014/tune/). best_val needs checkpoint_every to divide eval_every.
    final_policy: str = "last"
    holdout_fraction: float = 0.1  # users whose prompts are held out of rollouts (reward curve)
    seed: int = 0
    # actors by role; colocate=True packs the i-th worker of every role into one bundle (one
    # GPU shared by fractions), False gives every actor its own bundle
    colocate: bool = True
    policy: RoleConfig = field(default_factory=_role)
    reference: RoleConfig = field(default_factory=_role)
    critic: RoleConfig = field(default_factory=_role)
    coarse: RoleConfig = field(default_factory=_role)
    fine: RoleConfig = field(default_factory=_role)

    def __post_init__(self) -> None:
        choices = {
            "kl_estimator": ("k1", "k3"), "rewards": ("both", "coarse", "fine", "none"),
            "reward_placement": ("terminal", "dense"), "final_policy": ("last", "best_val"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"ppo.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.minibatch_size ({self.minibatch_size})")
        for role in ("policy", "critic"):
            workers = getattr(self, role).num_workers
            if self.minibatch_size % workers:
                raise ConfigError(f"ppo.minibatch_size ({self.minibatch_size}) must split evenly over ppo.{role}.num_workers ({workers})")
        if self.final_policy == "best_val" and self.eval_every % self.checkpoint_every:
            raise ConfigError(f"ppo.final_policy=best_val needs ppo.checkpoint_every ({self.checkpoint_every}) to divide ppo.eval_every ({self.eval_every}): "
                              "every evaluated policy must be saved")
        if not 1 <= self.page_min_items <= self.page_max_items:
            raise ConfigError(f"need 1 <= ppo.page_min_items <= ppo.page_max_items, got {self.page_min_items}, {self.page_max_items}")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"ppo.top_p must be in (0, 1] and ppo.temperature > 0, got {self.top_p}, {self.temperature}")


@dataclass
class EvalConfig:
    """`pagellm evaluate`: pages for every user of a split, scored with docs/metrics.md."""

    page_items: int = 100  # page length K (NDCG@100 needs 100)
    decoding: str = "greedy"  # greedy or sample, both under the page constraint of PPO
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only
    # full-ranking protocol: every item the user interacted with before the split is excluded
    # (train; train + validation for test), not only the prompt's items
    mask_seen: bool = True
    batch_size: int = 64  # users per generation batch
    num_actors: int = 1  # Ray Data actor pool size, each actor holding the model
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "sample"):
            raise ConfigError(f"eval.decoding must be 'greedy' or 'sample', got {self.decoding!r}")
        if not 1 <= self.page_items:
            raise ConfigError(f"eval.page_items must be >= 1, got {self.page_items}")


@dataclass
class TuneConfig:
    """`pagellm tune`: Ray Tune over the KL coefficient beta (ppo.kl_beta) and the golden-list
    category cap lambda (data.category_cap), the two the paper studies (section 5.1.4)."""

    # grid: every (beta, lambda) of the two lists, `num_samples` times;
    # optuna / hyperopt: that searcher proposes beta log-uniformly in [min(betas), max(betas)]
    # and lambda among `lambdas`, for `num_samples` trials
    search: str = "grid"
    betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    # each lambda changes the golden lists, hence the data, SFT and reward stages: they run once
    # per distinct lambda (cached by a hash of their configuration) before the trials start
    lambdas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5])
    num_samples: int = 1
    # asha: stop weak trials early on validation NDCG@100 (reported every ppo.eval_every
    # iterations); fifo: run every trial to the end
    scheduler: str = "asha"
    grace_period: int = 20  # ASHA: PPO iterations a trial runs before it may be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: Optional[int] = None  # None: as many as the resources allow
    # CPUs of the trial's own process (bundle 0 of its placement group); the PPO roles'
    # bundles follow, from ppo.<role>.num_cpus / num_gpus
    driver_cpus: float = 0.25
    seed: int = 0  # the searcher's seed

    def __post_init__(self) -> None:
        if self.search not in ("grid", "optuna", "hyperopt"):
            raise ConfigError(f"tune.search must be grid, optuna or hyperopt, got {self.search!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"tune.scheduler must be asha or fifo, got {self.scheduler!r}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise ConfigError(f"tune.betas must be non-empty and >= 0, got {self.betas}")
        if self.search != "grid" and min(self.betas) <= 0:
            raise ConfigError(f"tune.betas: a searcher samples beta log-uniformly, so min(betas) must be > 0, got {self.betas}")
        if not self.lambdas or any(not 0.0 < x <= 1.0 for x in self.lambdas):
            raise ConfigError(f"tune.lambdas must be non-empty and in (0, 1], got {self.lambdas}")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("tune.num_samples >= 1, tune.grace_period >= 1 and tune.reduction_factor >= 2 are required")


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)


EMBEDDED_PROFILE = Path(__file__).parent / "configs" / "embedded.yaml"
# `pagellm run` without --config: the embedded profile plus sizes that finish on 2 CPUs in minutes
QUICKSTART_PROFILE = Path(__file__).parent / "configs" / "quickstart.yaml"


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
