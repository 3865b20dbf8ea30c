"""Next-item pre-training step: the page slot's logits alone (``NextItemLM``, ``logits_to_keep=1``)
vs the simple version it replaced (the whole vocabulary projected at every position, the loss
read at the labelled page slot), side by side in one process on the same rows and weights.

Exact command (repository root, venv active; DATA a ``pagellm data`` output, SFT a ``pagellm
sft`` output of the same data, whose tokenizer and model are used):

    OMP_NUM_THREADS=1 python bench/next_item_step.py --data runs/ml/data50 --sft runs/ml/sft6 \\
        --max-items 20 50 --out bench/results/next_item_step_2026-12-05.json

Options: ``--steps N`` (timed steps after 2 untimed ones, default 10), ``--batch`` (default 128,
the MovieLens recipe's). Rows: ``pagellm.train.sft.next_item_rows`` of the data's training split,
the first ``batch x (steps + 2)`` after a seeded shuffle, batched by ``collate_lm``. Both versions
start from the same weights and take AdamW steps; the loss of the first step must agree (it is
the same cross-entropy; measured without dropout), which the script checks. Writes OUT (JSON) and OUT with .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagellm.config import load_config
from pagellm.data.layout import DataDir
from pagellm.model.modeling import NextItemLM
from pagellm.model.prompts import PromptCodec
from pagellm.train.sft import collate_lm, next_item_rows


def full_projection_loss(module: NextItemLM, batch: dict, pad_id: int) -> torch.Tensor:
    """The simple version: right-padded (prompt || item) rows, logits of the whole vocabulary at
    every position, item-block cross-entropy at the labelled position (the code before
    ``logits_to_keep``)."""
    ids, attention, lo = batch["input_ids"], batch["attention_mask"], module.item_lo
    lengths = attention.sum(1).long()
    right = torch.full((len(ids), ids.shape[1] + 1), pad_id, dtype=torch.long)
    mask = torch.zeros_like(right)
    labels = torch.full_like(right, -100)
    for row, n in enumerate(lengths.tolist()):
        right[row, :n] = ids[row, ids.shape[1] - n :]
        right[row, n] = batch["next_item"][row, 0] + lo  # horizon 1: one target per row
        mask[row, : n + 1] = 1
        labels[row, n] = batch["next_item"][row, 0]
    logits = module.lm(input_ids=right, attention_mask=mask).logits[..., lo : lo + module.n_items]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, module.n_items), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def loss_of(module: NextItemLM, batch: dict, pad_id: int | None) -> torch.Tensor:
    """``pad_id`` set: the full-projection version."""
    return module(**batch)[0] if pad_id is None else full_projection_loss(module, batch, pad_id)


def step_seconds(module: NextItemLM, batches: list, pad_id: int | None) -> tuple[float, float]:
    """Mean seconds of a timed AdamW step (after 2 untimed), and the first batch's loss without
    dropout (both versions must agree on it)."""
    with torch.no_grad():
        first_loss = float(loss_of(module.eval(), batches[0], pad_id))
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for n, batch in enumerate(batches):
        if n == 2:
            start = time.perf_counter()
        loss = loss_of(module, batch, pad_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / (len(batches) - 2), first_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--max-items", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="bench/out/next_item_step.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(Path(args.data) / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    codec = PromptCodec.from_tokenizer(tokenizer)
    lo, hi = codec.vocab.item_id_range
    train = DataDir(args.data).read_split("train").to_pandas()
    lm = AutoModelForCausalLM.from_pretrained(args.sft)
    collate = collate_lm(codec.vocab.pad_id)
    results = []
    for max_items in args.max_items:
        rows = next_item_rows(codec, train, cfg.data.positive_threshold, max_items)
        rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
        n = args.batch * (args.steps + 2)
        batches = [
            collate({c: list(rows[c].iloc[i : i + args.batch]) for c in rows.columns}) for i in range(0, n, args.batch)
        ]
        tokens = float(np.mean([len(x) for x in rows.input_ids.iloc[:n]]))
        timing = {}
        for name, pad_id in (("page_slot", None), ("full_projection", codec.vocab.pad_id)):
            module = NextItemLM(copy.deepcopy(lm), lo, hi - lo)
            timing[name] = step_seconds(module, batches, pad_id)
        assert abs(timing["page_slot"][1] - timing["full_projection"][1]) < 1e-4 * timing["page_slot"][1], timing
        results.append(
            {
                "max_items": max_items,
                "rows": len(rows),
                "mean_prompt_tokens": round(tokens, 1),
                "step_seconds_page_slot": round(timing["page_slot"][0], 4),
                "step_seconds_full_projection": round(timing["full_projection"][0], 4),
                "speedup": round(timing["full_projection"][0] / timing["page_slot"][0], 2),
                "first_step_loss": round(timing["page_slot"][1], 4),
                "epoch_seconds_page_slot_one_process": round(timing["page_slot"][0] * len(rows) / args.batch, 1),
            }
        )
        print(results[-1])
    report = {
        "command": f"OMP_NUM_THREADS=1 python bench/next_item_step.py --data {args.data} --sft {args.sft} "
        f"--max-items {' '.join(map(str, args.max_items))} --steps {args.steps} --batch {args.batch}",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "vocab": {"total": len(tokenizer), "items": hi - lo},
        "batch": args.batch,
        "timed_steps": args.steps,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| max history items | rows | mean prompt tokens | step s, page slot | step s, full projection | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['max_items']} | {r['rows']} | {r['mean_prompt_tokens']} | {r['step_seconds_page_slot']} | "
            f"{r['step_seconds_full_projection']} | {r['speedup']}x |"
        )
    out.with_suffix(".md").write_text(f"`{report['command']}`\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
