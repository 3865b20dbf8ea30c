"""Next-item probe: the next-item pre-training of ``pagellm sft`` in one process, to choose its
settings on validation before a full chain (model size, dropout, user tokens).

Exact commands behind docs/deviations.md (repository root, venv active; data from
``pagellm data --config configs/amazon2014.yaml --out runs/amz/data``):

    OMP_NUM_THREADS=1 python bench/next_item_probe.py --data runs/amz/data --layers 4 --width 128 --heads 4 --dropout 0.3 --no-user-tokens
    OMP_NUM_THREADS=1 python bench/next_item_probe.py --data runs/amz/data --layers 2 --width 64 --heads 2 --dropout 0.3 --no-user-tokens
    OMP_NUM_THREADS=1 python bench/next_item_probe.py --data runs/amz/data --layers 2 --width 64 --heads 2 --dropout 0.3
    OMP_NUM_THREADS=1 python bench/next_item_probe.py --data runs/amz/data --no-user-tokens --item-init cooccurrence

Rows are each user's newest ``--window`` training positives (and windows every half window
before), ``[user] history: i_1 .. i_n``, item-block cross-entropy at every item; AdamW 1e-3,
weight decay 0.01, batch 64, warm-up then linear decay. Every second epoch prints validation
NDCG@100 (every seen item masked, the item block ranked from the last history item and from
" page:") via ``pagellm.eval.metrics.ndcg_at_k``, and popularity's for reference.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from pagellm.config import load_config
from pagellm.data.layout import DataDir
from pagellm.eval.baselines import baseline_pages, load_protocol
from pagellm.eval.metrics import ndcg_at_k
from pagellm.model.modeling import build_lm, collaborative_item_vectors
from pagellm.model.prompts import PromptCodec
from pagellm.model.vocab import build_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--no-user-tokens", action="store_true")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--item-init", default="p5", choices=["p5", "cooccurrence"], help="model.item_init")
    p.add_argument("--init", help="start from this model directory (e.g. SFT_DIR/meta) and its tokenizer")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = [f"model.n_layer={args.layers}", f"model.n_embd={args.width}", f"model.n_head={args.heads}"]
    cfg = load_config(["pagellm/configs/embedded.yaml"], [*overrides, f"model.dropout={args.dropout}"])
    data = DataDir(args.data)
    train, val = data.read_split("train").to_pandas(), data.eval_users("val", cfg.data.positive_threshold)
    users = [] if args.no_user_tokens else sorted(set(train.user_id) | set(val.user_id))
    if args.init:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer, model = AutoTokenizer.from_pretrained(args.init), AutoModelForCausalLM.from_pretrained(args.init)
    else:
        tokenizer = build_tokenizer(None, data.read_items(), users, cfg.model.bpe_vocab_size)
    codec = PromptCodec.from_tokenizer(tokenizer)
    vocab, (lo, hi) = codec.vocab, codec.vocab.item_id_range
    if not args.init:
        vectors = None
        if args.item_init == "cooccurrence":
            vectors = collaborative_item_vectors(train, vocab, cfg.data.positive_threshold, args.width)
        model = build_lm(cfg.model, tokenizer, vocab.base_size, 0, vectors)
    positives = train[train.rating > cfg.data.positive_threshold].sort_values(["user_id", "ts", "item_id"])
    rows = []
    for user, seq in positives.groupby("user_id").item_id:
        ids, head = vocab.items_to_ids(list(seq)), codec.prompt(user, [])[: -len(codec.page_ids)]
        for end in range(len(ids), 0, -(args.window // 2)):
            rows.append((len(head), head + ids[max(0, end - args.window) : end]))
    protocol = load_protocol(data.root, "val", cfg.data.positive_threshold)
    pop = np.mean(
        [
            ndcg_at_k(pg, list(t), 100)
            for pg, t in zip(baseline_pages("popularity", protocol, 100), protocol.users.target)
        ]
    )
    print(
        f"{len(rows)} windows, {hi - lo} items, {sum(q.numel() for q in model.parameters())} parameters; "
        f"validation NDCG@100 of popularity {pop:.4f}"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batch_size, rng = 64, np.random.default_rng(0)
    steps = args.epochs * math.ceil(len(rows) / batch_size)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * max(0.0, (steps - s) / (steps - warm))
    )

    @torch.no_grad()
    def validate(read: str) -> float:
        model.eval()
        scores = []
        for start in range(0, len(val), 128):
            part = val.iloc[start : start + 128]
            prompts = [codec.prompt(u, list(h)[-args.window :]) for u, h in zip(part.user_id, part.history)]
            if read == "last item":
                prompts = [q[: len(q) - len(codec.page_ids)] for q in prompts]
            width = max(map(len, prompts))
            ids = torch.tensor([[vocab.pad_id] * (width - len(q)) + q for q in prompts])
            att = (torch.arange(width)[None, :] >= torch.tensor([width - len(q) for q in prompts])[:, None]).long()
            logits = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
            for row, seen, target in zip(logits[:, -1, lo:hi], part.seen, part.target):
                row = row.clone()
                row[[vocab.item_token[i] - lo for i in seen]] = float("-inf")
                page = [vocab.token_item[int(j) + lo] for j in row.topk(100).indices]
                scores.append(ndcg_at_k(page, list(target), 100))
        model.train()
        return float(np.mean(scores))

    for epoch in range(1, args.epochs + 1):
        began = time.perf_counter()
        for chunk in np.array_split(rng.permutation(len(rows)), math.ceil(len(rows) / batch_size)):
            batch = [rows[k] for k in chunk]
            width = max(len(r) for _, r in batch)
            ids = torch.full((len(batch), width), vocab.pad_id)
            labels = torch.full_like(ids, -100)
            for r, (first, seq) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                labels[r, first : len(seq)] = torch.tensor(seq[first:]) - lo
            logits = model(input_ids=ids, attention_mask=(ids != vocab.pad_id).long()).logits[:, :-1, lo:hi]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, hi - lo), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
        if epoch % 2 == 0:
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, validation NDCG@100 from the last item {validate('last item'):.4f}, "
                f"from ' page:' {validate('page'):.4f} ({time.perf_counter() - began:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
