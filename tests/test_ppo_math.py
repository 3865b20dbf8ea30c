"""PPO math, the page constraint and masked log-probabilities against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagellm.config import ModelConfig, PPOConfig
from pagellm.model.decoding import PageConstraint, allowed_masks, generate_pages, masked_logprobs
from pagellm.model.modeling import build_lm
from pagellm.model.vocab import Vocab, add_entity_tokens, train_bpe_tokenizer
from pagellm.rl.batch import PageScores
from pagellm.rl.ppo import batch_indices, place_rewards
from pagellm.rl.ppo_math import (
    KLController,
    RunningMeanStd,
    gae,
    group_advantages,
    kl_per_token,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    want_k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert torch.allclose(kl_per_token(logp, ref, "k3"), want_k3)
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, ref, "k2")


def test_token_rewards_subtract_beta_kl_on_real_steps_only():
    task = torch.tensor([[0.0, 0.0, 2.0]])
    kl = torch.tensor([[0.5, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(token_rewards(task, kl, 0.1, mask), torch.tensor([[-0.05, 0.1, 0.0]]))


def test_gae_by_hand_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*0.25
    assert torch.allclose(adv[0], torch.tensor([0.225, 0.25, 0.3]))
    assert torch.allclose(ret[0], torch.tensor([0.725, 0.85, 1.0]))
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 1 ends at step 1 (value after it 0, the padded value 9 is never used)
    assert torch.allclose(adv[1], torch.tensor([1.9, 1.8, 0.0]))
    assert torch.allclose(ret[1], torch.tensor([2.0, 2.0, 0.0]))


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])  # two groups of three pages
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
    adv = group_advantages(rewards, 3, mask)
    first = (np.array([1.0, 3.0, 2.0]) - 2.0) / np.std([1.0, 3.0, 2.0], ddof=1)
    second = (np.array([2.0, 0.0, 4.0]) - 2.0) / np.std([2.0, 0.0, 4.0], ddof=1)
    expected = np.r_[first, second][:, None] * mask.numpy()
    assert np.allclose(adv.numpy(), expected, atol=1e-5)
    same = group_advantages(torch.tensor([5.0, 5.0]), 2, torch.ones(2, 2))
    assert torch.equal(same, torch.zeros(2, 2))  # pages that score alike teach nothing


def test_clipped_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clip_fraction, _ = policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    # step 0 clipped at 1.2; step 1 keeps 0.5 (the min of the objective); step 2 inside the range
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)
    masked, _, _ = policy_loss(logp, old, adv, torch.tensor([[1.0, 0.0, 0.0]]), clip=0.2)
    assert masked.item() == pytest.approx(-1.2)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.7 - 2.0) ** 2 + 0.3**2) / 2)


def test_whitening_uses_real_steps_only():
    x, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_running_mean_std_matches_numpy_and_round_trips():
    norm = RunningMeanStd()
    norm.update(torch.tensor([1.0, 2.0, 3.0]))
    norm.update(torch.tensor([4.0, 5.0]))
    assert norm.mean == pytest.approx(3.0) and norm.std == pytest.approx(np.std([1, 2, 3, 4, 5]))
    other = RunningMeanStd()
    other.load_state_dict(norm.state_dict())
    assert other == norm
    assert torch.allclose(norm.normalize(torch.tensor([3.0])), torch.tensor([0.0]))


def test_adaptive_kl_controller():
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n_steps=64)
    assert fixed.beta == 0.1
    adaptive = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    adaptive.update(kl=12.0, n_steps=10)  # error clipped to +0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    adaptive.update(kl=3.0, n_steps=10)  # error -0.5 clipped to -0.2
    assert adaptive.beta == pytest.approx(0.1 * 1.02 * 0.98)


def test_reward_placement_terminal_and_dense():
    ppo = PPOConfig(reward_normalization=False)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    coarse = PageScores(torch.tensor([1.0, 2.0]), torch.zeros(2, 3))
    fine = PageScores(torch.tensor([0.5, -1.0]), torch.tensor([[0.2, 0.3, 0.0], [-1.0, 0.0, 0.0]]))
    scores = (coarse, fine)
    terminal = place_rewards(ppo, *scores, mask, RunningMeanStd())
    assert torch.allclose(terminal, torch.tensor([[0.0, 0.0, 1.5], [0.0, 1.0, 0.0]]))
    dense = place_rewards(
        PPOConfig(reward_normalization=False, reward_placement="dense"), *scores, mask, RunningMeanStd()
    )
    assert torch.allclose(dense, torch.tensor([[0.2, 0.3, 1.0], [-1.0, 2.0, 0.0]]))
    assert torch.allclose(dense.sum(1), terminal.sum(1))
    coarse_only = place_rewards(
        PPOConfig(reward_normalization=False, rewards="coarse"), *scores, mask, RunningMeanStd()
    )
    assert torch.allclose(coarse_only.sum(1), torch.tensor([1.0, 2.0]))
    none = place_rewards(PPOConfig(reward_normalization=False, rewards="none"), *scores, mask, RunningMeanStd())
    assert none.abs().sum() == 0
    norm = RunningMeanStd()
    normalised = place_rewards(PPOConfig(), *scores, mask, norm)
    assert norm.count == 2 and torch.allclose(normalised.sum(1), torch.tensor([1.0, -1.0]), atol=1e-4)  # R = 1.5, 1.0


def test_batches_depend_only_on_seed_and_iteration():
    first = [batch_indices(10, 4, it, seed=3) for it in range(6)]
    again = [batch_indices(10, 4, it, seed=3) for it in range(6)]
    assert all((a == b).all() for a, b in zip(first, again))
    assert all(len(b) == 4 for b in first)
    assert sorted(np.concatenate(first[:3])[:10]) == list(range(10))  # one epoch covers every prompt


# ------------------------------------------------------------------- constraint and masks


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe_tokenizer(["guitar strings picks amp"] * 20, 300)
    add_entity_tokens(tok, ["u1", "u2"], [f"i{k}" for k in range(12)])
    vocab = Vocab.from_tokenizer(tok)
    lm = build_lm(ModelConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=128), tok, vocab.base_size, seed=0).eval()
    lo, hi = vocab.item_id_range
    return tok, vocab, lm, lo, hi


def hand_allowed(constraint: PageConstraint, prompt, written, vocab_size):
    """Allowed *vocabulary* tokens after ``written`` page tokens, by the rule in words."""
    items = range(constraint.item_lo, constraint.item_lo + constraint.n_items)
    left = [t for t in items if t not in written and not (constraint.exclude_history and t in prompt)]
    allowed = set() if len(written) >= constraint.max_items else set(left)
    if len(written) >= constraint.min_items or not left or len(written) >= constraint.max_items:
        allowed.add(constraint.eos_id)
    return allowed


def test_masked_logprobs_equal_unmasked_restricted_by_hand(tiny):
    tok, vocab, lm, lo, hi = tiny
    constraint = PageConstraint(lo, hi - lo, vocab.eos_id, min_items=2, max_items=4)
    torch.manual_seed(1)
    vocab_size = len(tok)
    prompts = [[vocab.user_token["u1"], lo + 1, lo + 2], [lo + 5]]
    # pages: [i0, i3, i7, eos] and [i2, eos] (+ padding)
    tokens = [[lo, lo + 3, lo + 7, vocab.eos_id], [lo + 2, lo + 4, vocab.eos_id, 0]]
    step_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    actions = constraint.to_action(torch.tensor(tokens)).masked_fill(~step_mask, -1)
    logits = torch.randn(2, 4, vocab_size)
    allowed = allowed_masks(constraint, prompts, actions, step_mask)
    logp, entropy = masked_logprobs(constraint.restrict(logits), allowed, actions, temperature=0.7)
    for b in range(2):
        for t in range(int(step_mask[b].sum())):
            ok = hand_allowed(constraint, prompts[b], tokens[b][:t], vocab_size)
            full = torch.full((vocab_size,), float("-inf"))
            idx = torch.tensor(sorted(ok))
            full[idx] = logits[b, t, idx] / 0.7
            ref = full.log_softmax(-1)
            assert logp[b, t].item() == pytest.approx(ref[tokens[b][t]].item(), abs=1e-5)
            p = ref[idx].exp()
            assert entropy[b, t].item() == pytest.approx(-(p * ref[idx]).sum().item(), abs=1e-5)
    assert logp[1, 3].item() == 0.0  # padding is 0, not -inf


def test_many_sampled_rollouts_are_all_valid_pages(tiny):
    tok, vocab, lm, lo, hi = tiny
    constraint = PageConstraint(lo, hi - lo, vocab.eos_id, min_items=2, max_items=6, exclude_history=True)
    rng = np.random.default_rng(0)
    prompts = [
        [vocab.user_token["u1"], *(lo + rng.choice(hi - lo, size=rng.integers(0, 4), replace=False))]
        for _ in range(300)
    ]
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for temperature, top_p in ((1.0, 1.0), (2.0, 1.0), (1.0, 0.5)):
        pages = generate_pages(
            lm, prompts, constraint, vocab.pad_id, greedy=False, temperature=temperature, top_p=top_p, generator=gen
        )
        allowed = allowed_masks(constraint, prompts, pages.actions, pages.step_mask)
        for row, prompt in enumerate(prompts):
            n = int(pages.step_mask[row].sum())
            page = pages.tokens[row, :n].tolist()
            assert page[-1] == vocab.eos_id and vocab.eos_id not in page[:-1]
            items = page[:-1]
            assert all(lo <= t < hi for t in items), "only item tokens"
            assert len(set(items)) == len(items), "no repeats"
            assert not set(items) & set(prompt), "no history items"
            assert constraint.min_items <= len(items) <= constraint.max_items
            assert all(allowed[row, t, pages.actions[row, t]] for t in range(n)), "sampler and mask agree"
            checked += 1
    assert checked == 900


def test_greedy_pages_run_out_of_items_gracefully(tiny):
    tok, vocab, lm, lo, hi = tiny
    constraint = PageConstraint(lo, hi - lo, vocab.eos_id, min_items=50, max_items=60)
    pages = generate_pages(lm, [[lo, lo + 1]], constraint, vocab.pad_id, greedy=True)
    items = pages.tokens[0, : int(pages.step_mask[0].sum())].tolist()[:-1]
    assert sorted(items) == list(range(lo + 2, hi))  # every item not in the history, then EOS


def test_expected_reward_loss_reaches_the_tilted_reference():
    """Minimising the exact KL-regularised expected reward over free logits lands on
    pi ∝ pi_ref exp(w r / beta) at every real step, disallowed actions keep no mass, padding
    steps do not count, and the reported reward is the expectation under pi."""
    from pagellm.rl.ppo_math import expected_reward_loss

    g = torch.Generator().manual_seed(0)
    allowed = torch.ones(2, 3, 5, dtype=torch.bool)
    allowed[0, 1, 2] = allowed[1, :, 4] = False
    ref = torch.randn(2, 3, 5, generator=g).masked_fill(~allowed, float("-inf")).log_softmax(-1)
    rewards = torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    beta, weight = 0.5, 0.3
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        log_probs = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        loss, reward = expected_reward_loss(log_probs, ref, rewards, allowed, mask, beta, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(logits.grad).all()
    pi = logits.detach().masked_fill(~allowed, float("-inf")).softmax(-1)
    target = (ref + weight * rewards[:, None, :] / beta).masked_fill(~allowed, float("-inf")).softmax(-1)
    real = mask.bool()
    assert torch.allclose(pi[real], target[real], atol=1e-3)
    assert (pi[~allowed] == 0).all()
    assert torch.allclose(logits.detach()[1, 2], torch.zeros(5))  # a padding step gets no gradient
    expected = (pi * rewards[:, None, :]).sum(-1)
    assert reward.item() == pytest.approx(float((expected * mask).sum() / mask.sum()), abs=1e-4)
