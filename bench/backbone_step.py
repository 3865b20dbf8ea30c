"""Per-token training cost of the two backbones on CPU: the embedded small GPT-2 (full
fine-tuning, the ModelConfig defaults) vs SmolLM2-135M with LoRA (rank 8, q_proj/v_proj), side
by side in one process on the same rows.

Exact command (repository root, venv active, after `pagellm setup smollm2`):

    OMP_NUM_THREADS=2 python bench/backbone_step.py

Options: ``--smollm2 DIR`` (default runs/models/smollm2-135m-instruct), ``--steps N`` (timed
steps after 2 untimed ones, default 10), ``--batch``/``--length`` (default 16 x 64 tokens).
Writes bench/out/backbone_step/results.json and prints one line per backbone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pagellm.config import ModelConfig
from pagellm.data.schema import build_items
from pagellm.model.modeling import PolicyLM, build_lm
from pagellm.model.vocab import Vocab, build_tokenizer


def step_seconds(policy: PolicyLM, batch: dict, steps: int) -> float:
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for n in range(steps + 2):
        if n == 2:
            start = time.perf_counter()
        loss, _ = policy(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", default="runs/models/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    ids = [f"B{k:04d}" for k in range(900)]
    items = build_items(ids, ["Strings"] * 900, [["Strings"]] * 900, ["guitar strings"] * 900, ["Fender"] * 900)
    torch.manual_seed(0)
    results = {}
    for name, cfg in {
        "embedded GPT-2 (full)": ModelConfig(),
        "SmolLM2-135M (LoRA r=8)": ModelConfig(name_or_path=args.smollm2, lora_rank=8),
    }.items():
        tokenizer = build_tokenizer(cfg.name_or_path, items, [], cfg.bpe_vocab_size)
        vocab = Vocab.from_tokenizer(tokenizer)
        policy = PolicyLM(build_lm(cfg, tokenizer, vocab.base_size))
        lo, hi = vocab.item_id_range
        ids = torch.randint(lo, hi, (args.batch, args.length))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        seconds = step_seconds(policy, batch, args.steps)
        total = sum(p.numel() for p in policy.parameters())
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        results[name] = {
            "parameters": total,
            "trainable": trainable,
            "trainable_share": trainable / total,
            "step_seconds": seconds,
            "tokens_per_second": args.batch * args.length / seconds,
        }
        print(f"{name}: {total / 1e6:.1f}M parameters ({trainable / total:.2%} trainable), "
              f"{seconds:.3f} s/step, {args.batch * args.length / seconds:.0f} tokens/s", flush=True)  # fmt: skip
    out = Path("bench/out/backbone_step")
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": "OMP_NUM_THREADS=2 python bench/backbone_step.py", "args": vars(args), "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
