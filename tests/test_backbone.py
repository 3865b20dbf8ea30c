"""A real pretrained backbone offline: the packaged SmolLM2 (GGUF, Llama architecture) converted
to a Hugging Face directory, user/item tokens added, a few LoRA steps, saved, reloaded."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from conftest import REPO
from transformers import AutoModel, AutoModelForCausalLM

from pagellm.cli import SMOLLM2_DIR
from pagellm.config import ModelConfig
from pagellm.errors import ConfigError
from pagellm.model.gguf_import import SUMMARY_FILE, import_gguf, packaged_gguf
from pagellm.model.modeling import PolicyLM, RewardModel, build_lm, lora_targets, unwrap_lm
from pagellm.model.vocab import Vocab, build_tokenizer
from pagellm.train.sft import collate_lm


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The directory `pagellm setup smollm2` converted (.ci/run runs it) when it came from the
    installed GGUF; a conversion of its own otherwise (the same ~20 s, not twice in CI)."""
    setup = REPO / SMOLLM2_DIR
    if (setup / SUMMARY_FILE).exists():
        summary = json.loads((setup / SUMMARY_FILE).read_text())
        if summary["source"] == str(packaged_gguf()) and (setup / "model.safetensors").exists():
            return setup, summary
    out = tmp_path_factory.mktemp("smollm2")
    return out, import_gguf("smollm2", out)  # needs the package `pagellm setup smollm2` installs


def test_gguf_import_gives_a_plain_model_with_the_ggufs_logits(smollm2):
    out, summary = smollm2
    assert summary["model_type"] == "llama" and summary["hidden_size"] == 576 and summary["layers"] == 30
    assert 130e6 < summary["parameters"] < 140e6 and (out / "model.safetensors").exists()
    gguf = packaged_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 9569]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, saved(ids).logits)


def test_lora_chain_on_smollm2_saves_and_reloads_identically(smollm2, tmp_path):
    out, _ = smollm2
    items = pa.table({"item_id": [f"B{k:03d}" for k in range(12)], "title": ["guitar strings"] * 12})
    tokenizer = build_tokenizer(str(out), items, [], 300)
    vocab = Vocab.from_tokenizer(tokenizer)
    assert len(vocab.item_token) == 12 and vocab.base_size == 49152  # SmolLM2's own vocabulary, then items
    cfg = ModelConfig(name_or_path=str(out), lora_rank=4)
    lm = build_lm(cfg, tokenizer, vocab.base_size, seed=0)
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in lm.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}  # chosen by architecture (GPT-2 would get c_attn)
    policy = PolicyLM(lm)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in policy.parameters())
    lo, hi = vocab.item_id_range
    rows = [list(range(lo, hi))[k : k + 4] + [vocab.eos_id] for k in range(6)]
    batch = collate_lm(vocab.pad_id)({"input_ids": rows, "labels": rows})
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    losses = []
    for _ in range(4):
        loss, _ = policy(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = unwrap_lm(policy.lm).eval()
    merged.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    with torch.no_grad():
        assert torch.equal(merged(batch["input_ids"]).logits, reloaded(batch["input_ids"]).logits)
    # the reward heads and the critic sit on the backbone's hidden size (576, not GPT-2's n_embd)
    head = RewardModel(AutoModel.from_pretrained(tmp_path / "policy"), "fine")
    item_mask = (batch["input_ids"] >= lo) & (batch["input_ids"] < hi)
    with torch.no_grad():
        scores = head.score(batch["input_ids"], batch["attention_mask"], item_mask)
    assert head.head.in_features == 576 and scores.shape == (6,)


def test_lora_targets_by_architecture():
    assert lora_targets("gpt2") == ["c_attn"] and lora_targets("llama") == ["q_proj", "v_proj"]
    assert lora_targets("llama", ["o_proj"]) == ["o_proj"]
    with pytest.raises(ConfigError, match="model.lora_targets: no default for architecture 'falcon'"):
        lora_targets("falcon")


def test_backbone_experiment_trains_each_backbone_on_one_data_directory(ray_session, tmp_path):
    """`pagellm experiment backbone`: two backbones through the real SFT stage (Ray Train) on the
    same data directory, both scored beside popularity on one split, with size and time. (Two
    sizes of the embedded GPT-2: SmolLM2 through this path takes ~6 min on 2 CPUs, measured and
    reported in docs/results/amazon2014/backbone; its LoRA chain is the test above.)"""
    from pagellm.experiments import run_backbone
    from tests.conftest import TINY

    common = [
        "data.dataset=synthetic:1500",
        "data.extra_ft_fractions=[]",
        "train.num_workers=1",
        "sft.meta_epochs=0",  # skipped: fine-tuning starts from the initialised LM (one fit per backbone)
        "sft.next_item_epochs=0",
        "sft.ft_epochs=1",
        *TINY,
    ]
    backbones = {"one": [], "two": ["model.n_layer=2", "model.n_embd=48"]}
    with pytest.raises(ConfigError, match="would change the data or the evaluation"):
        run_backbone(None, common, {"x": ["eval.page_items=5"]}, ["popularity"], tmp_path / "refused")
    report = run_backbone(None, common, backbones, ["popularity"], tmp_path / "bb", command="test")
    trained = report["backbones"]
    assert 0 < trained["one"]["parameters"] < trained["two"]["parameters"] < 1e6
    assert trained["two"]["overrides"] == backbones["two"] and trained["one"]["train_seconds"] > 0
    assert set(report["mean_sd"]) == {"PageLLM SFT (one)", "PageLLM SFT (two)"}
    assert set(report["paired_vs_first"]) == {"PageLLM SFT (two)"}
    compare = json.loads((tmp_path / "bb" / "compare" / "compare.json").read_text())
    assert compare["best_baseline"] == "popularity" and set(compare["policies"]) == set(report["mean_sd"])
    for name, row in report["mean_sd"].items():
        assert row["ndcg@100"][0] == pytest.approx(compare["mean_sd"][name]["ndcg@100"][0])
    text = (tmp_path / "bb" / "backbone.md").read_text()
    assert "| one |" in text and "| two |" in text and "Δ ndcg@100 vs popularity" in text
    assert not (tmp_path / "bb" / "one" / "sft" / "logs" / "meta.jsonl").exists()  # meta_epochs=0: no meta fit
