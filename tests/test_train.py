"""Ray Train + DeepSpeed: the shared loop, worker failure and resume, and the SFT / reward stages."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm.config import ModelConfig, TrainConfig
from pagellm.model.modeling import PolicyLM, build_lm
from pagellm.model.vocab import Vocab, add_entity_tokens, train_bpe_tokenizer
from pagellm.outputs import read_jsonl
from pagellm.train.loop import WEIGHTS_FILE, FitSpec, dashboard_up, fit, fits_at_once, load_module, trainer_class
from pagellm.train.sft import collate_lm


def tiny_lm_spec(epochs: int, tokenizer, base_size: int, stage: str) -> FitSpec:
    model_cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=64)

    def build():
        return PolicyLM(build_lm(model_cfg, tokenizer, base_size, seed=0))

    def export(module, directory: Path):
        module.lm.save_pretrained(directory)

    return FitSpec(stage, epochs, 1e-3, 16, build, collate_lm(tokenizer.pad_token_id), export)


def tiny_rows(tokenizer, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    lo = len(tokenizer) - 20
    ids = [rng.integers(lo, len(tokenizer), size=12) for _ in range(n)]
    return pd.DataFrame({"input_ids": ids, "labels": ids})


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(["guitar strings picks amp"] * 20, 300)
    add_entity_tokens(tok, ["u1"], [f"i{k}" for k in range(20)])
    return tok


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and "ray::" in cmd:
            found.append(proc)
    return found


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_session, tmp_path, tokenizer):
    import ray.data

    epochs = 3  # killed in epoch 2, resumed from epoch 1's checkpoint, one more epoch after it
    spec = tiny_lm_spec(epochs, tokenizer, Vocab.from_tokenizer(tokenizer).base_size, "killed")
    rows = tiny_rows(tokenizer, 1600)
    datasets = {"train": ray.data.from_pandas(rows), "valid": ray.data.from_pandas(rows.head(64))}
    train_cfg = TrainConfig(num_workers=2, deepspeed=True, zero_stage=1, max_failures=2, log_every_steps=5)
    log = tmp_path / "runs" / "killed.jsonl"
    outcome = {}

    def run():
        try:
            outcome["metrics"] = fit(spec, datasets, train_cfg, tmp_path / "runs", tmp_path / "out")
        except Exception as exc:  # surfaced below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        records = read_jsonl(log)
        done = [r for r in records if "valid_loss" in r]
        # epoch 1 is checkpointed and epoch 2 is well under way: kill a worker mid-epoch
        if done and any(r.get("step", 0) >= done[0]["step"] + 30 for r in records):
            workers = _train_workers()
            if workers:
                killed = workers[-1]
                killed.kill()
                break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "no worker was killed: training finished too fast"
    records = read_jsonl(log)
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed, "training did not resume from a checkpoint"
    first_epoch = next(r for r in records if "valid_loss" in r)
    assert resumed[0]["epoch"] >= 1 and resumed[0]["step"] >= first_epoch["step"]
    # the step count continued: steps after the resume start where the checkpoint left off
    after = records[records.index(resumed[0]) + 1 :]
    assert min(r["step"] for r in after if "step" in r) > resumed[0]["step"]
    finals = [r for r in records if "valid_loss" in r]
    assert finals[-1]["epoch"] == epochs and outcome["metrics"]["epoch"] == epochs
    steps_per_epoch = first_epoch["step"]
    assert finals[-1]["step"] == epochs * steps_per_epoch


def test_no_placement_group_cleaner_without_a_dashboard(ray_session):
    """The session's Ray has no dashboard, so no State API: the trainer leaves out Ray Train's
    placement-group cleaner (which would poll it in vain and hold each fit 12 s at shutdown)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    assert not dashboard_up()
    trainer = trainer_class()(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    assert isinstance(trainer, TorchTrainer)
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "BackendSetupCallback" in names and "PlacementGroupCleanerCallback" not in names
    default = [type(c).__name__ for c in TorchTrainer(lambda config: None)._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" in default  # this Ray has one to leave out


def test_independent_fits_run_as_many_at_once_as_the_free_cpus_hold(ray_session):
    """train.side_by_side: SFT members and reward heads run as many worker groups at once as the
    session's free CPUs (2 here, nothing else running) hold, capped by the fits there are."""
    deadline = time.time() + 60  # an earlier test's placement groups go back asynchronously
    while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources()["CPU"] == 2
    assert fits_at_once(TrainConfig(num_workers=1), 3) == 2
    assert fits_at_once(TrainConfig(num_workers=1, cpus_per_worker=0.5), 3) == 3
    assert fits_at_once(TrainConfig(num_workers=2), 3) == 1  # one group takes both CPUs
    assert fits_at_once(TrainConfig(num_workers=1, side_by_side=False), 3) == 1
    assert fits_at_once(TrainConfig(num_workers=1, use_gpu=True), 2) == 1  # no GPU here: one at a time


@pytest.mark.parametrize("deepspeed", [True, False], ids=["deepspeed", "ddp"])
def test_checkpoint_and_export_give_identical_logits(ray_session, tmp_path, tokenizer, deepspeed):
    import ray.data

    spec = tiny_lm_spec(1, tokenizer, Vocab.from_tokenizer(tokenizer).base_size, "roundtrip")
    rows = tiny_rows(tokenizer, 64)
    metrics = fit(
        spec,
        {"train": ray.data.from_pandas(rows), "valid": ray.data.from_pandas(rows)},
        TrainConfig(num_workers=2, deepspeed=deepspeed),
        tmp_path / "runs",
        tmp_path / "out",
    )
    assert metrics["epoch"] == 1 and metrics["step"] >= 1
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ckpt_dirs = list((tmp_path / "runs" / "ray_train").rglob(WEIGHTS_FILE))
    assert ckpt_dirs
    fresh = spec.build_model()
    load_module(fresh, ckpt_dirs[-1])
    fresh.eval()
    ids = torch.tensor([list(rows.input_ids[0])])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, fresh.lm(input_ids=ids).logits)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_sft_and_reward_stages_on_synthetic_data(tiny_stages):
    tmp_path, sft = tiny_stages["root"], tiny_stages["sft"]
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert policy.get_input_embeddings().weight.shape[0] == sft["vocab"]["total"]
    assert 0.0 <= sft["valid_page_rate"] <= 1.0 and sft["valid_pages_checked"] > 0
    assert (tmp_path / "sft" / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "sft" / "tokenizer.json").exists()
    meta_log = read_jsonl(tmp_path / "sft" / "logs" / "meta.jsonl")
    assert any("valid_loss" in r for r in meta_log) and any("lm_loss" in r for r in meta_log)
    ft_log = read_jsonl(tmp_path / "sft" / "logs" / "golden_ft.jsonl")
    assert any("unlikelihood" in r or "train_unlikelihood" in r for r in ft_log)
    # next-item pre-training and fine-tuning select their epoch on validation NDCG@100 (the
    # exported one is the best)
    for stage, log in (("next_item", read_jsonl(tmp_path / "sft" / "logs" / "next_item.jsonl")), ("golden_ft", ft_log)):
        epochs = [r for r in log if "valid_ndcg@100" in r]
        assert epochs, stage
        assert sft[stage]["valid_ndcg@100"] == max(r["valid_ndcg@100"] for r in epochs)
    assert sft["next_item_rows"] > 0
    acc = tiny_stages["reward"]["accuracy"]
    assert set(acc) == {"coarse", "fine", "combined"}
    assert all(set(v) == {"np", "rk", "d", "rd", "pm", "ps", "all"} for v in acc.values())
    assert tiny_stages["reward"]["test_pairs"].get("ps", 0) > 0  # reward.policy_pairs
    saved = json.loads((tmp_path / "reward" / "metrics.json").read_text())
    assert saved["accuracy"] == json.loads(json.dumps(acc))
    # how each head ranks the SFT policy's sampled validation pages against their NDCG
    agreement = tiny_stages["reward"]["agreement"]
    assert agreement["pages"] == tiny_stages["cfg"].reward.agreement_samples * min(
        tiny_stages["cfg"].reward.agreement_users, len(pd.read_parquet(tmp_path / "data" / "eval" / "val.parquet"))
    )
    for name in ("coarse", "fine", "combined", "sft_policy"):
        assert agreement[name]["pooled"] is None or -1 <= agreement[name]["pooled"] <= 1
    # the policy's own page log-probability, the reference row, is scored on the same pages
    assert agreement["sft_policy"]["users"] == agreement["coarse"]["users"]
    for kind in ("coarse", "fine"):
        assert (tmp_path / "reward" / kind / "reward_head.safetensors").exists()
    meta = {k: json.loads((tmp_path / "reward" / k / "reward_head.json").read_text()) for k in ("coarse", "fine")}
    assert meta == {"coarse": {"kind": "coarse", "pooling": "mean"}, "fine": {"kind": "fine", "pooling": "dcg"}}


def test_latest_checkpoint_prefers_newest_complete(tmp_path):
    from pagellm.train.loop import STATE_FILE, latest_checkpoint

    def make(name, epoch, ranks):
        d = tmp_path / "root" / name
        d.mkdir(parents=True)
        (d / WEIGHTS_FILE).write_bytes(b"x")
        (d / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
        for r in ranks:
            (d / f"optim_rank{r}.pt").write_bytes(b"x")
        return d

    registered = make("checkpoint_a", 1, [0, 1])
    newer = make("checkpoint_b", 2, [0, 1])
    make("checkpoint_c", 3, [0])  # rank 1 died before writing its shard: incomplete
    assert latest_checkpoint([registered], tmp_path / "root", world=2) == newer
    assert latest_checkpoint([], tmp_path / "missing", world=2) is None
    assert latest_checkpoint([registered], tmp_path / "missing", world=2) == registered


def test_linear_schedule_warms_up_then_decays_to_zero():
    from pagellm.config import TrainConfig
    from pagellm.train.loop import lr_factor

    cfg = TrainConfig(warmup_fraction=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(50, 100, TrainConfig(lr_schedule="constant")) == 1.0
