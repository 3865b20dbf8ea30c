"""The one training path of the supervised stages: Ray Train ``TorchTrainer`` + DeepSpeed.

Every stage (meta pre-training, golden-list fine-tuning, each reward head) describes itself as a
``FitSpec`` (how to build the model, how to batch rows, epochs, learning rate); ``fit`` runs it
on N Ray Train workers. DeepSpeed wraps the model with a client ``torch.optim.AdamW`` (so CPUs
train over gloo without JIT-compiled optimizers; bf16 on GPU) or, with ``train.deepspeed=false``,
plain DDP. Each epoch ends in a checkpoint reported through ``ray.train.report``: the whole
module as safetensors, each rank's optimizer shard (loaded back with ``weights_only=True``), the
trainer state and a Hugging Face export. After a worker dies Ray Train restarts the group
(``FailureConfig``) and the loop resumes from the latest checkpoint, step count included.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from pagellm.config import TrainConfig
from pagellm.outputs import EpochLines, append_jsonl
from pagellm.ray_utils import verbose_console

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "module.safetensors"
EXPORT_DIR = "export"


@dataclass
class FitSpec:
    """One training run. The callables run inside Ray Train workers (they are pickled)."""

    stage: str
    epochs: int
    lr: float
    batch_size: int  # global: split evenly across workers
    build_model: Callable[[], torch.nn.Module]
    collate: Callable[[dict], dict]  # a numpy batch of rows -> model keyword tensors
    export: Callable[[torch.nn.Module, Path], None]  # write the HF-format artefact
    early_stopping: bool = False
    patience: int = 1
    # the validation metric that picks the best epoch (and stops early): "loss" (lowest), or a
    # metric the model returns on validation batches, e.g. "ndcg@100" with maximize=True
    select: str = "loss"
    maximize: bool = False


def _deepspeed_config(train_cfg: TrainConfig, micro_batch: int, on_gpu: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "bf16": {"enabled": bool(train_cfg.bf16 and on_gpu)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def save_module(module: torch.nn.Module, path: Path) -> None:
    """Safetensors of a module's state; tied weights (GPT-2's lm_head = wte) are stored once.
    DeepSpeed keeps parameters as views of flat buffers, so tensors are copied out first."""
    tensors, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path))


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Inverse of ``save_module``: every parameter must be restored (tied ones through their twin)."""
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    state = module.state_dict()
    untied = [
        k for k in missing if not any(state[k].data_ptr() == state[o].data_ptr() for o in state if o not in missing)
    ]
    if untied or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {untied}, unexpected {unexpected})")


def load_optimizer_state(path: Path, device) -> dict:
    """``torch.load(weights_only=True)``, allowing only the three plain DeepSpeed types that a
    ZeRO optimizer's state holds (a loss scaler, the stage enum, parameter slice addresses)."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=device, weights_only=True)


def latest_checkpoint(registered: list[Path], root: Path, world: int) -> Optional[Path]:
    """The newest complete checkpoint: Ray Train's registered one, or a newer one in ``root``.

    A worker group that dies right after ``ray.train.report`` can lose the newest checkpoint
    before the controller registers it, although every rank has already written it to
    storage. When ``root`` is visible here (local or shared storage) such a checkpoint is used
    if it is complete (module, state and every rank's optimizer shard).
    """
    candidates = list(registered)
    if str(root) and root.is_dir():
        candidates += [d for d in root.glob("checkpoint_*") if d.is_dir()]

    def epoch(d: Path) -> int:
        complete = (d / WEIGHTS_FILE).exists() and (d / STATE_FILE).exists()
        complete = complete and all((d / f"optim_rank{r}.pt").exists() for r in range(world))
        return json.loads((d / STATE_FILE).read_text())["epoch"] if complete else -1

    best = max(candidates, key=epoch, default=None)
    return best if best is not None and epoch(best) >= 0 else None


class ModelOptimizer:
    """The shared training helper: one optimisation step of a module, through a DeepSpeed engine
    (client ``torch.optim.AdamW``, ZeRO stage and bf16 from ``TrainConfig``, gradient clipping
    1.0) or, with ``train.deepspeed=false``, plain AdamW with ``wrap`` (e.g. DDP) around the
    module. DeepSpeed needs ``torch.distributed`` initialised (one process group per role)."""

    def __init__(self, module: torch.nn.Module, lr: float, train_cfg: TrainConfig, micro_batch: int, device, wrap=None):
        self.module = module
        self.lr = lr
        self.optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=train_cfg.weight_decay
        )
        self.engine = None
        if train_cfg.deepspeed:
            on_gpu = torch.device(device).type == "cuda"
            # the accelerator DeepSpeed would pick, named: unnamed, its import warns that it fell
            # back to the CPU (console noise where PPO's roles run in the driver)
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
            import deepspeed

            module.to(device)
            # its first engine on a CPU prints that it built its shared-memory op: kept off the
            # console unless -v
            with contextlib.nullcontext() if verbose_console() else contextlib.redirect_stdout(io.StringIO()):
                self.engine, self.optimizer, _, _ = deepspeed.initialize(
                    model=module,
                    optimizer=self.optimizer,
                    config=_deepspeed_config(train_cfg, micro_batch, on_gpu),
                    dist_init_required=False,
                )
            self.forward = self.engine
        else:
            module.to(device)
            self.forward = wrap(module) if wrap is not None else module

    def step(self, loss: torch.Tensor, lr_factor: float = 1.0) -> None:
        """One update at ``lr_factor`` x the base learning rate (a schedule's value)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()

    def load_optimizer(self, path: Path, rank: int, zero_stage: int, device) -> None:
        saved = load_optimizer_state(path, device)
        # a ZeRO optimizer takes the saved states of all data-parallel ranks, read by rank
        self.optimizer.load_state_dict({rank: saved} if self.engine is not None and zero_stage > 0 else saved)


@dataclass
class _Worker:
    """What one Ray Train worker's steps share."""

    spec: FitSpec
    train_cfg: TrainConfig
    log_path: Path
    rank: int
    world: int
    device: torch.device
    micro_batch: int
    state: dict  # epoch, step, best_valid, best_epoch, bad_epochs: the trainer state a checkpoint holds
    total_steps: int = 0  # of the whole fit (the learning-rate schedule's length)
    trainer: Optional[ModelOptimizer] = None
    wandb_run: object = None


def _resume(worker: _Worker, module: torch.nn.Module, checkpoint_root: Path) -> Optional[Path]:
    """The weights and trainer state of the latest checkpoint, before DeepSpeed copies the
    weights into its fp32 partitions (the optimizer state, which holds those, comes after)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    resume_dir = latest_checkpoint(
        [Path(checkpoint.to_directory())] if checkpoint else [], checkpoint_root, worker.world
    )
    if resume_dir:
        load_module(module, resume_dir / WEIGHTS_FILE)
        worker.state = json.loads((resume_dir / STATE_FILE).read_text())
    return resume_dir


def _resume_optimizer(worker: _Worker, resume_dir: Path) -> None:
    opt_file = resume_dir / f"optim_rank{worker.rank}.pt"
    if opt_file.exists():  # same number of workers as the run that saved it
        worker.trainer.load_optimizer(opt_file, worker.rank, worker.train_cfg.zero_stage, worker.device)
    if worker.rank == 0:
        state = worker.state
        append_jsonl(
            worker.log_path,
            {"stage": worker.spec.stage, "event": "resumed", "epoch": state["epoch"], "step": state["step"]},
        )


def lr_factor(step: int, total_steps: int, train_cfg: TrainConfig) -> float:
    """The schedule's multiple of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if train_cfg.lr_schedule == "constant" or total_steps <= 0:
        return 1.0
    warmup = max(1, int(train_cfg.warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def _run_batches(worker: _Worker, split: str, train: bool) -> dict[str, float]:
    """One pass over this worker's shard of ``split`` (training rows reshuffled every epoch):
    row-weighted means of the loss and the model's metrics, summed over every worker."""
    import ray.train

    spec, state, cfg = worker.spec, worker.state, worker.train_cfg
    shuffle = {}
    if train and cfg.shuffle:  # a buffer as large as the shard: a full shuffle, seeded per epoch and rank
        seed = (cfg.seed * 100_003 + state["epoch"]) * worker.world + worker.rank
        shuffle = {"local_shuffle_buffer_size": 1_000_000, "local_shuffle_seed": seed}
    totals, n_rows = {}, 0
    shard = ray.train.get_dataset_shard(split)
    for batch in shard.iter_batches(batch_size=worker.micro_batch, batch_format="numpy", **shuffle):
        inputs = {k: v.to(worker.device) for k, v in spec.collate(batch).items()}
        rows = len(next(iter(batch.values())))
        if train:
            loss, metrics = worker.trainer.forward(**inputs)
            worker.trainer.step(loss, lr_factor(state["step"], worker.total_steps, cfg))
            state["step"] += 1
            if worker.rank == 0 and state["step"] % worker.train_cfg.log_every_steps == 0:
                record = {"stage": spec.stage, "epoch": state["epoch"], "step": state["step"], "loss": loss.item()}
                record.update({k: float(v) for k, v in metrics.items()})
                append_jsonl(worker.log_path, record)
                worker.wandb_run.log(record, step=state["step"])
        else:
            with torch.no_grad():
                loss, metrics = worker.trainer.forward(**inputs)
        for k, v in {"loss": loss.detach(), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * rows
        n_rows += rows
    keys = sorted(totals)
    sums = _all_reduce_sum([totals[k] for k in keys] + [n_rows], worker.device)
    return {k: s / max(sums[-1], 1) for k, s in zip(keys, sums[:-1])}


def _end_epoch(worker: _Worker, train_metrics: dict, valid_metrics: dict, seconds: float) -> dict:
    """Advance the trainer state (best epoch, early stopping) and return the epoch's report."""
    state, spec = worker.state, worker.spec
    state["epoch"] += 1
    sign = -1.0 if spec.maximize else 1.0  # compared as "lower is better"
    value = sign * valid_metrics[spec.select] if spec.select in valid_metrics else math.inf
    improved = value < state["best_valid"]
    if improved:
        state.update(best_valid=value, best_epoch=state["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return {
        "stage": spec.stage,
        "epoch": state["epoch"],
        "step": state["step"],
        **{f"train_{k}": v for k, v in train_metrics.items()},
        **{f"valid_{k}": v for k, v in valid_metrics.items()},
        "epoch_seconds": seconds,
        "improved": improved,
        "stopped_early": spec.early_stopping and state["bad_epochs"] >= spec.patience,
    }


def _checkpoint(worker: _Worker, module: torch.nn.Module, metrics: dict) -> None:
    """Every rank's optimizer shard, and from rank 0 the module, the state and the HF export,
    reported together so Ray Train persists one checkpoint per epoch."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(worker.trainer.optimizer.state_dict(), tmp / f"optim_rank{worker.rank}.pt")
        if worker.rank == 0:
            save_module(module, tmp / WEIGHTS_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(worker.state))
            worker.spec.export(module, tmp / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    if worker.rank == 0:  # logged once the checkpoint is persisted
        append_jsonl(worker.log_path, metrics)
        worker.wandb_run.log(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=worker.state["step"]
        )


def train_loop(config: dict) -> None:
    """Ray Train worker body: build, (resume,) train epochs, validate, checkpoint."""
    import ray.train
    import ray.train.torch

    spec: FitSpec = config["spec"]
    train_cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train_cfg.seed + rank)
    torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    worker = _Worker(
        spec,
        train_cfg,
        Path(config["log_path"]),
        rank,
        world,
        ray.train.torch.get_device(),
        max(1, spec.batch_size // world),
        state={"epoch": 0, "step": 0, "best_valid": math.inf, "best_epoch": -1, "bad_epochs": 0},
        total_steps=config["steps_per_epoch"] * spec.epochs,
    )
    module = spec.build_model()
    resume_dir = _resume(worker, module, Path(config["checkpoint_root"]))
    worker.trainer = ModelOptimizer(
        module, spec.lr, train_cfg, worker.micro_batch, worker.device, wrap=ray.train.torch.prepare_model
    )
    if resume_dir:
        _resume_optimizer(worker, resume_dir)
    if rank == 0:
        import wandb

        worker.wandb_run = wandb.init(
            project=train_cfg.wandb_project,
            mode=train_cfg.wandb_mode,
            name=spec.stage,
            dir=str(worker.log_path.parent),
            config={"stage": spec.stage, "epochs": spec.epochs, "lr": spec.lr},
            reinit="create_new",
            settings=wandb.Settings(quiet=True),  # 3 lines per run, not its history table
        )
    while worker.state["epoch"] < spec.epochs:
        started = time.perf_counter()
        module.train()
        train_metrics = _run_batches(worker, "train", train=True)
        module.eval()
        valid_metrics = _run_batches(worker, "valid", train=False)
        metrics = _end_epoch(worker, train_metrics, valid_metrics, time.perf_counter() - started)
        _checkpoint(worker, module, metrics)
        if metrics["stopped_early"]:
            break
    if worker.wandb_run is not None:
        worker.wandb_run.finish()


def fits_at_once(train_cfg: TrainConfig, fits: int) -> int:
    """How many of ``fits`` independent worker groups to run at the same time: 1 with
    ``train.side_by_side`` off, else as many as the cluster's free CPUs (and GPUs) hold now."""
    import ray

    if not train_cfg.side_by_side or fits < 2:
        return 1
    free = ray.available_resources()
    need = {"CPU": train_cfg.num_workers * train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        need["GPU"] = train_cfg.num_workers
    return max(1, min(fits, *(int(free.get(name, 0.0) // amount) for name, amount in need.items())))


def dashboard_up() -> bool:
    """Whether the connected Ray runs its dashboard (which serves the State API). Read from the
    node's address info, as ``ray.init().address_info["webui_url"]`` is; unknown -> True."""
    try:
        import ray._private.worker as ray_worker

        return bool(ray_worker.global_worker.node.address_info.get("webui_url"))
    except Exception:  # an older or newer Ray without this field: keep Ray's own behaviour
        return True


def trainer_class():
    """``TorchTrainer``, less Ray Train's placement-group cleaner when the cluster has no dashboard.

    The cleaner (Ray >= 2.5x, a detached actor) asks the State API whether the controller is
    alive, to remove a crashed controller's placement group. The State API is served by the
    dashboard, which a local Ray here starts without (``ray.include_dashboard``): every query
    fails, the cleaner logs "Failed to query Ray Train Controller actor state" every second and
    never cleans anything, and each fit's shutdown waits out its 12 s stop timeout. An empty fit
    on 2 CPUs takes 30 s with it, 15 s without (bench/train_fixed_cost.py). The controller's placement group still goes with
    the job that made it; with a dashboard Ray's default is kept."""
    from ray.train.torch import TorchTrainer

    if dashboard_up():
        return TorchTrainer

    class TrainerWithoutStateAPI(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return TrainerWithoutStateAPI


def fit(
    spec: FitSpec,
    datasets: dict,
    train_cfg: TrainConfig,
    run_dir: Path,
    out_dir: Path,
    storage_path: Optional[str] = None,
) -> dict:
    """Train ``spec`` on Ray Train and copy the chosen epoch's HF export to ``out_dir``.

    ``datasets`` holds Ray Datasets "train" and "valid". With early stopping the best epoch
    (by ``spec.select`` on validation: lowest loss by default) is exported, otherwise the last. Re-running with the same
    ``run_dir`` resumes from its latest checkpoint. Returns the chosen epoch's metrics.
    Checkpoints go to ``storage_path`` (a URI or shared path, ``pagellm.storage``) when given,
    else to ``run_dir/ray_train``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{spec.stage}.jsonl"
    storage = storage_path or str(run_dir / "ray_train")
    trainer = trainer_class()(
        train_loop,
        train_loop_config={
            "spec": spec,
            "train": train_cfg,
            "log_path": str(log_path),
            # scanned for checkpoints the controller missed: only where a path can be listed
            "checkpoint_root": str(Path(storage) / spec.stage) if "://" not in storage else "",
            # optimizer steps per epoch on each worker (its shard in micro-batches)
            "steps_per_epoch": math.ceil(
                math.ceil(datasets["train"].count() / train_cfg.num_workers)
                / max(1, spec.batch_size // train_cfg.num_workers)
            ),
        },
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=spec.stage,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        datasets=datasets,
    )
    if not verbose_console():  # the per-worker split bars of the training inputs (hundreds of lines a fit)
        for dataset in datasets.values():
            dataset.context.enable_progress_bars = False
    with EpochLines(log_path, spec.stage, spec.epochs, spec.select):
        result = trainer.fit()
    if result.error:
        raise result.error
    reported = list(getattr(result, "best_checkpoints", None) or [(result.checkpoint, result.metrics)])
    sign = -1.0 if spec.maximize else 1.0
    best_first = (lambda m: sign * m[f"valid_{spec.select}"]) if spec.early_stopping else (lambda m: -m["epoch"])
    ckpt, metrics = min(reported, key=lambda pair: best_first(pair[1]))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with ckpt.as_directory() as d:
        shutil.copytree(Path(d) / EXPORT_DIR, out_dir)
    return metrics
