"""Do the reward heads know anything the SFT policy does not? The closed-form answer for the
page's first slot, without PPO.

PPO maximises E[R] - beta * KL(pi || pi_ref); for a single decision its optimum is
pi*(i) ∝ pi_ref(i) exp(R(i) / beta). So ranking the item block by
log pi_ref(i | prompt) + w * R(prompt, [i]) (w = 1 / beta) is the score-mode page that PPO
with this reward can at best reach at slot 1. If no w lifts validation NDCG@100 above w = 0
(the SFT policy), the heads carry no relevance signal beyond the policy and PPO cannot add
any; if one does, PPO has something to find. R is scored for every (user, item) pair: R_c on
[prompt || item || eos] at the eos, R_f at the item (a one-item page: mean and dcg pooling
agree), the prompt run once per user and its KV cache repeated over the items.

w is chosen on validation only; the test split reports that w against w = 0 with the paired
bootstrap interval. It writes the JSON and, beside it, a PNG of validation NDCG@100 against w.
Exact command behind docs/results/amazon2014/reward_tilt/ (262 s on 2 CPUs):

    python bench/reward_tilt_probe.py --data runs/amz/data --sft runs/amz/sft \\
        --reward runs/amz/reward --out runs/amz/reward_tilt.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pagellm.data.layout import DataDir
from pagellm.eval.metrics import ndcg_at_k, paired_bootstrap
from pagellm.model.artifact import load_policy
from pagellm.model.modeling import RewardModel
from pagellm.train.reward import KINDS
from pagellm.train.sft import ranking_rows

WEIGHTS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
HEADS = ("coarse", "fine", "combined")


@torch.no_grad()
def policy_logprobs(policy, rows) -> torch.Tensor:
    """[users, items] log pi_ref over the item block at the page's first slot."""
    lo, hi = policy.vocab.item_id_range
    out = []
    for prompt in rows.input_ids:
        logits = policy.model(input_ids=torch.as_tensor(prompt)[None]).logits[0, -1, lo:hi]
        out.append(logits.float().log_softmax(-1))
    return torch.stack(out)


@torch.no_grad()
def item_rewards(head: RewardModel, rows, item_ids: torch.Tensor, eos_id: int, chunk: int = 1024) -> torch.Tensor:
    """[users, items] reward of the one-item page [prompt || item || eos] for every item."""
    out = []
    for prompt in tqdm(rows.input_ids, desc=f"R_{head.kind[0]} per item", unit="user"):
        prompt = torch.as_tensor(prompt)[None]
        cache = head.backbone(input_ids=prompt, use_cache=True).past_key_values
        n_prompt, scores = prompt.shape[1], []
        for lo in range(0, len(item_ids), chunk):
            items = item_ids[lo : lo + chunk]
            n = len(items)
            repeated = copy.deepcopy(cache)
            repeated.batch_repeat_interleave(n)
            ids = torch.stack([items, torch.full_like(items, eos_id)], 1)
            hidden = head.backbone(
                input_ids=ids,
                past_key_values=repeated,
                attention_mask=torch.ones(n, n_prompt + 2, dtype=torch.long),
                position_ids=torch.tensor([[n_prompt, n_prompt + 1]]).expand(n, 2),
            ).last_hidden_state
            s = head.head(hidden).squeeze(-1)
            scores.append(s[:, 1] if head.kind == "coarse" else s[:, 0])
        out.append(torch.cat(scores).float())
    return torch.stack(out)


def per_user_ndcg(scores: torch.Tensor, rows, k: int = 100) -> np.ndarray:
    """NDCG@k of ranking each user's item block by ``scores``, seen items masked (the protocol)."""
    masked = scores.clone()
    for r, banned in enumerate(rows.banned):
        masked[r, banned[banned >= 0]] = float("-inf")
    top = masked.topk(k, dim=-1).indices.numpy()
    return np.array([ndcg_at_k(list(t), [x for x in target if x >= 0], k) for t, target in zip(top, rows.target)])


def write_report(report: dict, out: str | Path, plot) -> None:
    """A probe's report as JSON at ``out`` (its directory made) and ``plot(report, PNG)`` beside it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(out).with_suffix(".png"))


def split_scores(policy, heads, data: DataDir, split: str, threshold: float, max_users: int | None):
    users = data.eval_users(split, threshold)
    if max_users:
        users = users.sample(min(max_users, len(users)), random_state=0)
    rows = ranking_rows(policy.codec, users)
    lo, hi = policy.vocab.item_id_range
    item_ids = torch.arange(lo, hi)
    logp = policy_logprobs(policy, rows)
    r = {kind: item_rewards(heads[kind], rows, item_ids, policy.vocab.eos_id) for kind in KINDS}
    r["combined"] = r["coarse"] + r["fine"]
    return rows, logp, r


def plot(report: dict, path: Path) -> None:
    """Validation NDCG@100 of log pi_ref + w * R against w, one line per head, SFT (w = 0) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = report["validation"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for head in HEADS:
        ws = [w for w in WEIGHTS if w > 0]
        ax.plot(ws, [val[head][str(w)] for w in ws], marker="o", label=f"SFT + w * R ({head})")
    ax.axhline(val["sft"], color="black", linestyle="--", label="SFT policy (w = 0)")
    ax.set_xscale("log")
    ax.set_xlabel("w = 1 / beta")
    ax.set_ylabel("validation NDCG@100")
    ax.set_title(f"Reward tilt of the SFT policy's first slot ({val['users']} users)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sft", required=True, help="the SFT policy directory (pi_ref)")
    p.add_argument("--reward", required=True, help="the reward stage's directory (coarse/ and fine/)")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--positive-threshold", type=float, default=3.0)
    p.add_argument("--max-users", type=int, default=None, help="a seeded sample of each split's users")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.time()
    policy = load_policy(args.sft)
    heads = {kind: RewardModel.from_pretrained(Path(args.reward) / kind).eval() for kind in KINDS}
    data = DataDir(args.data)
    report: dict = {
        "command": "python bench/reward_tilt_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    }

    rows, logp, r = split_scores(policy, heads, data, "val", args.positive_threshold, args.max_users)
    sft = per_user_ndcg(logp, rows)
    val = {"users": len(sft), "sft": float(sft.mean())}
    for head in HEADS:
        val[f"{head} alone"] = float(per_user_ndcg(r[head], rows).mean())
        val[head] = {str(w): float(per_user_ndcg(logp + w * r[head], rows).mean()) for w in WEIGHTS}
    chosen = {h: max(WEIGHTS, key=lambda w: val[h][str(w)]) for h in HEADS}
    report["validation"], report["chosen_w"] = val, chosen
    print(json.dumps(val, indent=1))

    rows, logp, r = split_scores(policy, heads, data, "test", args.positive_threshold, args.max_users)
    sft = per_user_ndcg(logp, rows)
    test = {"users": len(sft), "sft": float(sft.mean())}
    for head in HEADS:
        tilted = per_user_ndcg(logp + chosen[head] * r[head], rows)
        mean, low, high = paired_bootstrap(tilted - sft)
        test[head] = {"w": chosen[head], "ndcg@100": float(tilted.mean()), "vs_sft": [mean, low, high]}
        test[f"{head} alone"] = float(per_user_ndcg(r[head], rows).mean())
    report["test"], report["seconds"] = test, round(time.time() - start, 1)
    print(json.dumps(test, indent=1))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
