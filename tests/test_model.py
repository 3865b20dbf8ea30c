"""The model layer on tiny real objects: vocabulary, P5 init, prompts, losses, LoRA, reward
models, and the supervised/reward row builders. No Ray, no mocks; the whole file runs in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from pagellm.config import ModelConfig
from pagellm.data.schema import build_items
from pagellm.errors import ConfigError
from pagellm.model.modeling import (
    CollaborativeReward,
    PolicyLM,
    PolicyWithRatingHead,
    RewardModel,
    build_lm,
    collaborative_item_vectors,
    cooccurrence_item_vectors,
    item_weights,
    load_pretrained,
    load_reward_head,
    p5_init_new_embeddings,
    pad_batch,
    token_nll,
    unwrap_lm,
)
from pagellm.model.prompts import ParsedPage, PromptCodec, encode_list
from pagellm.model.vocab import EOS, Vocab, build_tokenizer, train_bpe_tokenizer
from pagellm.train.reward import (
    collate_pairs,
    pair_rows,
    pairwise_accuracy,
    policy_sample_pairs,
    reward_agreement,
    spearman,
)
from pagellm.train.sft import collate_lm, greedy_pages, meta_rows, page_rows

torch.set_num_threads(1)

BPE = 300
AWKWARD_ITEMS = ["A 1", "x|y", "42", "b", "user_3", "4"]
FILLER_ITEMS = [f"p{k:02d}" for k in range(40)]  # enough new rows to estimate a std
ITEMS = AWKWARD_ITEMS + FILLER_ITEMS
USERS = ["u1", "u 2", "42", "x|y", "item_9", "val_only"]
WORDS = ["red electric guitar", "blue drum kit", "tube amp", "nylon strings", "guitar strap", "drum sticks"]


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=64, bpe_vocab_size=BPE, **kw)


def make_items(ids=ITEMS):
    n = len(ids)
    cats = [["guitars", "drums", "amps"][k % 3] for k in range(n)]
    return build_items(
        ids,
        cats,
        [[c, "music"] for c in cats],
        [WORDS[k % len(WORDS)] for k in range(n)],
        [["fender", "yamaha", None][k % 3] for k in range(n)],
    )


@pytest.fixture(scope="module")
def items():
    return make_items()


@pytest.fixture(scope="module")
def tokenizer(items):
    return build_tokenizer(None, items, USERS, BPE)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocab.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def codec(vocab):
    return PromptCodec(vocab)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer, vocab):
    """A saved plain policy (what SFT_DIR holds)."""
    d = tmp_path_factory.mktemp("policy")
    build_lm(tiny_cfg(), tokenizer, vocab.base_size, seed=1).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------ 1. vocabulary


def test_every_id_has_exactly_one_token_and_round_trips(tmp_path, tokenizer, vocab):
    assert set(vocab.user_token) == set(USERS) and set(vocab.item_token) == set(ITEMS)
    for prefix, mapping in (("user_", vocab.user_token), ("item_", vocab.item_token)):
        assert len(set(mapping.values())) == len(mapping)  # injective
        for entity, tid in mapping.items():
            assert tokenizer.convert_ids_to_tokens(tid) == f"{prefix}{entity}"
            # the token string encodes to that one id, spaces and punctuation included
            assert tokenizer(f"{prefix}{entity}", add_special_tokens=False).input_ids == [tid]
    assert vocab.token_item == {t: i for i, t in vocab.item_token.items()}
    # user "42" and item "42" are different tokens
    assert vocab.user_token["42"] != vocab.item_token["42"]

    tokenizer.save_pretrained(tmp_path)
    again = Vocab.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert again.user_token == vocab.user_token
    assert again.item_token == vocab.item_token
    assert again.token_item == vocab.token_item
    assert again.base_size == vocab.base_size
    assert (again.eos_id, again.pad_id) == (vocab.eos_id, vocab.pad_id)


def test_user_then_item_tokens_are_contiguous_blocks(tokenizer, vocab):
    base, n_users, n_items = vocab.base_size, len(USERS), len(ITEMS)
    assert sorted(vocab.user_token.values()) == list(range(base, base + n_users))
    assert sorted(vocab.item_token.values()) == list(range(base + n_users, base + n_users + n_items))
    assert len(tokenizer) == base + n_users + n_items
    assert vocab.item_id_range == (base + n_users, len(tokenizer))
    # sorted id order inside each block
    assert [vocab.user_token[u] for u in sorted(USERS)] == sorted(vocab.user_token.values())
    assert [vocab.item_token[i] for i in sorted(ITEMS)] == sorted(vocab.item_token.values())
    assert vocab.pad_id == vocab.eos_id < base


def test_embedded_bpe_is_trained_locally_on_catalogue_words(monkeypatch, items):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tok = build_tokenizer(None, items, USERS, BPE)
    vocab = Vocab.from_tokenizer(tok)
    assert vocab.base_size <= BPE
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    for word in (" guitar", " drum", " strings", "fender"):
        ids = vocab.text_ids(word)
        assert len(ids) < len(word), (word, ids)  # merges were learned from the catalogue
        assert all(i < vocab.base_size for i in ids)
        assert tok.decode(ids) == word


def test_pretrained_tokenizer_path_gets_entity_tokens_on_top(tmp_path, items):
    base_tok = train_bpe_tokenizer(["red electric guitar", "blue drum kit"], BPE)
    base_tok.save_pretrained(tmp_path)
    base_len = len(base_tok)
    tok = build_tokenizer(str(tmp_path), items, USERS, bpe_vocab_size=10_000)  # bpe size unused here
    vocab = Vocab.from_tokenizer(tok)
    assert vocab.base_size == base_len
    assert len(tok) == base_len + len(USERS) + len(ITEMS)
    assert (
        tok("electric guitar", add_special_tokens=False).input_ids
        == base_tok("electric guitar", add_special_tokens=False).input_ids
    )
    assert sorted(vocab.item_token.values()) == list(range(base_len + len(USERS), len(tok)))


# ------------------------------------------------------------------------------ 2. P5 init


def _check_p5(weight: torch.Tensor, base: int):
    new, old = weight[base:].detach().float(), weight[:base].detach().float()
    std_old = old.std().item()
    assert abs(new.mean().item()) < 0.15 * std_old
    assert abs(new.std().item() - std_old) < 0.2 * std_old
    dist = torch.cdist(new, new) + torch.eye(len(new)) * 1e9
    assert dist.min().item() > 1e-3 * std_old  # every new row is its own draw


def test_p5_init_on_embedded_model(tokenizer, vocab):
    model = build_lm(tiny_cfg(), tokenizer, vocab.base_size)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer)
    _check_p5(weight, vocab.base_size)
    assert torch.equal(model.get_output_embeddings().weight, weight)  # tied head sees the same rows
    # deterministic per seed, different across seeds
    assert torch.equal(build_lm(tiny_cfg(), tokenizer, vocab.base_size).get_input_embeddings().weight, weight)
    other = build_lm(tiny_cfg(), tokenizer, vocab.base_size, seed=5).get_input_embeddings().weight
    assert not torch.equal(other[vocab.base_size :], weight[vocab.base_size :])


def test_p5_init_scales_with_base_rows():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():
        model.get_input_embeddings().weight[:100] *= 25.0  # base std 0.5 instead of 0.02
    before = model.get_input_embeddings().weight[:100].clone()
    p5_init_new_embeddings(model, 100, torch.Generator().manual_seed(0))
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[:100], before)
    _check_p5(weight, 100)


def test_cooccurrence_vectors_separate_items_liked_by_different_users():
    # users like either items 0-4 or items 5-9 (sampled); item 10 is liked alone, item 11 by no one
    rng = np.random.default_rng(0)
    users = [rng.choice(range(5 * (u % 2), 5 * (u % 2) + 5), size=3, replace=False) for u in range(40)]
    vectors = cooccurrence_item_vectors([*users, np.array([10])], 12, dim=2)  # one direction a group
    assert vectors.shape == (12, 2) and not vectors[10:].any()
    unit = vectors[:10] / np.linalg.norm(vectors[:10], axis=1, keepdims=True)
    cos = unit @ unit.T
    same = np.equal.outer(np.arange(10) // 5, np.arange(10) // 5) & ~np.eye(10, dtype=bool)
    assert cos[same].min() > cos[~np.equal.outer(np.arange(10) // 5, np.arange(10) // 5)].max()
    assert np.array_equal(vectors, cooccurrence_item_vectors([*users, np.array([10])], 12, dim=2))
    assert not cooccurrence_item_vectors([np.array([1])], 3, dim=2).any()  # nothing co-occurs


def test_collaborative_item_init_replaces_item_rows_only(tokenizer, vocab):
    lo, hi = vocab.item_id_range
    liked = list(vocab.item_token)[:10]  # two users, five items each; the other items stay P5
    train = pd.DataFrame(
        {"user_id": ["a"] * 5 + ["b"] * 5 + ["a"], "item_id": liked + liked[:1], "rating": [5.0] * 10 + [1.0]}
    )
    vectors = collaborative_item_vectors(train, vocab, 3.0, 32)
    assert vectors.shape == (hi - lo, 32)
    known = np.abs(vectors).sum(1) > 0
    assert known.sum() == 10 and all(known[vocab.item_token[i] - lo] for i in liked)
    p5 = build_lm(tiny_cfg(), tokenizer, vocab.base_size).get_input_embeddings().weight
    weight = build_lm(tiny_cfg(), tokenizer, vocab.base_size, item_vectors=vectors).get_input_embeddings().weight
    assert torch.equal(weight[:lo], p5[:lo]) and torch.equal(weight[lo:hi][~known], p5[lo:hi][~known])
    rows, target = weight[lo:hi][known], torch.as_tensor(vectors[known])
    assert torch.allclose(rows / rows.norm(dim=1, keepdim=True), target / target.norm(dim=1, keepdim=True), atol=1e-5)
    assert abs(rows.std().item() - p5[vocab.base_size :].std().item()) < 1e-4  # P5's scale
    with pytest.raises(ValueError, match="item_vectors"):
        build_lm(tiny_cfg(), tokenizer, vocab.base_size, item_vectors=vectors[:-1])


def test_p5_init_from_pretrained_path(tmp_path, items):
    base_tok = train_bpe_tokenizer(["red electric guitar", "blue drum kit", "tube amp"], BPE)
    base_len = len(base_tok)
    pretrained = GPT2LMHeadModel(GPT2Config(vocab_size=base_len, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    pretrained.save_pretrained(tmp_path)
    base_tok.save_pretrained(tmp_path)
    tok = build_tokenizer(str(tmp_path), items, USERS, BPE)
    vocab = Vocab.from_tokenizer(tok)
    assert vocab.base_size == base_len

    model = build_lm(tiny_cfg(name_or_path=str(tmp_path)), tok, vocab.base_size)
    weight = model.get_input_embeddings().weight
    assert weight.shape == (len(tok), 32)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert torch.equal(weight[:base_len], pretrained.get_input_embeddings().weight)
    _check_p5(weight, base_len)
    # the other pretrained weights are untouched
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, pretrained.transformer.h[0].attn.c_attn.weight)


# ------------------------------------------------------------------------------ 3. prompts


def test_prompt_and_target_layout(codec, vocab):
    history = ["x|y", "A 1", "42"]
    prompt = codec.prompt("u 2", history)
    h, p = vocab.text_ids(" history:"), vocab.text_ids(" page:")
    assert h and p
    assert prompt == [vocab.user_token["u 2"], *h, *(vocab.item_token[i] for i in history), *p]
    assert vocab.tokenizer.decode(h) == " history:" and vocab.tokenizer.decode(p) == " page:"
    assert not set(h + p) & set(vocab.token_item)  # template words are not item tokens
    # an unseen user gets no user token, the rest is the same
    assert codec.prompt("never seen", history) == prompt[1:]
    assert codec.prompt(None, []) == h + p
    target = codec.target(["b", "4"])
    assert target == [vocab.item_token["b"], vocab.item_token["4"], vocab.eos_id]


def test_parse_reports_every_defect(codec, vocab):
    t, eos = vocab.item_token, vocab.eos_id
    ok = codec.parse([t["A 1"], t["x|y"], eos])
    assert ok == ParsedPage(items=["A 1", "x|y"], ended=True) and ok.valid

    text_token, user_token = vocab.text_ids(" page:")[0], vocab.user_token["u1"]
    bad = codec.parse([t["b"], text_token, user_token, eos])
    assert bad.items == ["b"] and bad.invalid_tokens == [text_token, user_token] and bad.ended
    assert not bad.valid

    rep = codec.parse([t["b"], t["42"], t["b"], eos])
    assert rep.items == ["b", "42"] and rep.repeated_items == ["b"] and not rep.valid

    open_ = codec.parse([t["b"], t["42"]])
    assert open_.items == ["b", "42"] and not open_.ended and not open_.valid

    empty = codec.parse([eos])
    assert empty.ended and not empty.items and not empty.valid
    assert not codec.parse([]).valid

    # stops at the first EOS: what follows (pad, junk, items) is ignored
    first = codec.parse(np.array([t["4"], eos, t["b"], text_token, eos], dtype=np.int64))
    assert first == ParsedPage(items=["4"], ended=True) and first.valid


# ------------------------------------------------------------------------------ 4. losses


def test_token_nll_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, -100, 1], [2, -100, 4, 0]])
    nll, count = token_nll(logits, labels)
    logp = torch.log_softmax(logits, -1)
    # label at position t is predicted from logits at t-1; the first label never counts
    expected = -(logp[0, 0, 3] + logp[0, 2, 1] + logp[1, 1, 4] + logp[1, 2, 0])
    assert count.item() == 4
    assert torch.allclose(nll, expected, atol=1e-5)
    # logits at positions whose next label is ignored do not matter
    changed = logits.clone()
    changed[0, 1] += 7.0
    changed[1, 0] -= 3.0
    changed[:, -1] = 100.0  # the last position predicts nothing
    assert torch.allclose(token_nll(changed, labels)[0], nll, atol=1e-5)
    all_masked = token_nll(logits, torch.full_like(labels, -100))
    assert all_masked[0].item() == 0.0 and all_masked[1].item() == 0


def _page_batch(codec, vocab):
    users = ["u1", "u 2", "never seen"]
    prompts = [["A 1", "b"], ["42"], ["x|y", "4", "p01"]]
    pages = [["x|y", "42"], ["A 1", "b", "x|y"], ["p02"]]
    rows = page_rows(codec, users, prompts, pages)
    prompt_lens = [len(codec.prompt(u, p)) for u, p in zip(users, prompts)]
    for row_ids, row_labels, n in zip(rows.input_ids, rows.labels, prompt_lens):
        assert (row_labels[:n] == -100).all() and (row_labels[n:] == row_ids[n:]).all()
        assert row_ids[-1] == vocab.eos_id
    batch = collate_lm(vocab.pad_id)({"input_ids": list(rows.input_ids), "labels": list(rows.labels)})
    return batch, prompt_lens


def test_policy_lm_loss_counts_only_target_tokens(codec, vocab, tokenizer):
    batch, prompt_lens = _page_batch(codec, vocab)
    lm = build_lm(tiny_cfg(), tokenizer, vocab.base_size).eval()
    policy = PolicyLM(lm)
    with torch.no_grad():
        loss, _ = policy(**batch)
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: mean -log p over target tokens, each predicted from the previous position
    logp = torch.log_softmax(logits, -1)
    terms = []
    for r, n in enumerate(prompt_lens):
        length = int(batch["attention_mask"][r].sum())
        for t in range(n, length):
            terms.append(-logp[r, t - 1, batch["input_ids"][r, t]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)

    # unmasking the prompt changes the loss
    full = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        unmasked, _ = policy(batch["input_ids"], batch["attention_mask"], full)
    assert not torch.allclose(unmasked, loss, atol=1e-4)

    # perturbing the logits of prompt positions (all but the last prompt token) changes nothing;
    # perturbing the last prompt position (it predicts the first page item) does
    def perturb(upto_offset):
        def hook(module, inputs, output):
            out = output.clone()
            for r, n in enumerate(prompt_lens):
                out[r, : n - 1 + upto_offset] += torch.randn_like(out[r, : n - 1 + upto_offset]) * 5
            return out

        return lm.lm_head.register_forward_hook(hook)

    for offset, same in ((0, True), (1, False)):
        handle = perturb(offset)
        try:
            with torch.no_grad():
                changed, _ = policy(**batch)
        finally:
            handle.remove()
        assert torch.allclose(changed, loss, atol=1e-5) == same


@pytest.fixture(scope="module")
def meta_data(items, vocab):
    """A small items table and training interactions (the tokenizer knows more users/items)."""
    items_df = items.to_pandas()
    items_df = items_df[items_df.item_id != "p39"].reset_index(drop=True)  # a token with no metadata
    train = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u 2", "u 2", "42", "x|y", "item_9"],
            "item_id": ["A 1", "x|y", "42", "b", "A 1", "user_3", "4", "p01"],
            "rating": [5.0, 3.5, 1.0, 4.0, 2.0, 4.5, 3.0, 5.0],
            "ts": [10, 20, 30, 50, 40, 1, 2, 3],
        }
    )
    return items_df, train


def test_rating_head_losses_are_separated(vocab, tokenizer, meta_data):
    items_df, train = meta_data
    rows = meta_rows(vocab, items_df, train, max_tokens=64, seed=0)
    lm_rows = rows[rows.pattern != "rating"].iloc[:6]
    rating_rows = rows[rows.pattern == "rating"].iloc[:4]
    mixed = pd.concat([lm_rows, rating_rows]).sample(frac=1.0, random_state=0)
    collate = collate_lm(vocab.pad_id)

    def batch_of(df):
        return collate({c: list(df[c]) for c in ("input_ids", "labels", "rating")})

    torch.manual_seed(0)
    model = PolicyWithRatingHead(build_lm(tiny_cfg(), tokenizer, vocab.base_size), rating_loss_weight=0.5).eval()
    b_mixed, b_lm, b_rate = batch_of(mixed), batch_of(lm_rows), batch_of(rating_rows)
    assert torch.isnan(b_lm["rating"]).all() and torch.isfinite(b_rate["rating"]).all()
    assert (b_rate["labels"] == -100).all()

    loss_mixed, m_mixed = model(**b_mixed)
    loss_lm, m_lm = model(**b_lm)
    loss_rate, m_rate = model(**b_rate)
    # rating rows add no NLL, LM rows (NaN rating) add no squared error
    assert torch.allclose(m_mixed["lm_loss"], m_lm["lm_loss"], atol=1e-5)
    assert torch.allclose(m_mixed["rating_mse"], m_rate["rating_mse"], atol=1e-5)
    assert m_lm["rating_mse"].item() == 0.0 and m_rate["lm_loss"].item() == 0.0
    assert torch.isfinite(loss_lm) and torch.isfinite(loss_rate)
    assert m_lm["lm_loss"].item() > 0 and m_rate["rating_mse"].item() > 0
    assert torch.allclose(loss_mixed, m_mixed["lm_loss"] + 0.5 * m_mixed["rating_mse"], atol=1e-6)

    # the rating MSE by hand: the head on the final hidden state at each row's last real token
    with torch.no_grad():
        out = model.lm(
            input_ids=b_rate["input_ids"], attention_mask=b_rate["attention_mask"], output_hidden_states=True
        )
        last = b_rate["attention_mask"].sum(1).long() - 1
        pred = model.rating_head(out.hidden_states[-1][torch.arange(len(last)), last]).squeeze(-1)
    assert torch.allclose(m_rate["rating_mse"], ((pred - b_rate["rating"]) ** 2).mean(), atol=1e-5)

    # gradients stay finite with NaN ratings in the batch, and the head learns only from rated rows
    model.zero_grad()
    loss_mixed.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    loss_lm.backward()
    assert model.rating_head.weight.grad is None or (model.rating_head.weight.grad == 0).all()


# ------------------------------------------------------------------------------ 5. LoRA


def test_lora_trains_only_adapters_and_new_token_rows(tmp_path, codec, vocab, tokenizer):
    base = vocab.base_size
    model = build_lm(tiny_cfg(lora_rank=4, lora_dropout=0.0), tokenizer, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens_delta" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("wte" in n for n in frozen) and any("mlp.c_fc" in n for n in frozen)

    before = unwrap_lm(build_lm(tiny_cfg(), tokenizer, base))  # same seed: the same start
    emb0 = before.get_input_embeddings().weight.detach().clone()
    c_fc0 = before.transformer.h[0].mlp.c_fc.weight.detach().clone()

    batch, _ = _page_batch(codec, vocab)
    policy = PolicyLM(model)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(2):  # LoRA B starts at zero: the second step moves both A and B
        opt.zero_grad()
        loss, _ = policy(**batch)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        peft_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    plain = unwrap_lm(model)
    assert type(plain) is GPT2LMHeadModel and not hasattr(plain, "peft_config")
    emb = plain.get_input_embeddings().weight
    assert torch.equal(emb[:base], emb0[:base])  # base rows frozen
    moved = (emb[base:] - emb0[base:]).abs().amax(dim=1)
    used = sorted({int(i) for i in batch["input_ids"].flatten() if i >= base})
    assert (moved[[i - base for i in used]] > 0).all()  # new-token rows in the batch trained
    assert torch.equal(plain.transformer.h[0].mlp.c_fc.weight, c_fc0)  # untargeted module frozen
    assert plain.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    with torch.no_grad():
        merged_logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-5)

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(again, merged_logits)


def test_rating_head_on_a_lora_model(tokenizer, vocab, meta_data):
    """Meta pre-training with LoRA: the head sits on a peft model and its export is plain."""
    items_df, train = meta_data
    rows = meta_rows(vocab, items_df, train, max_tokens=64, seed=0).iloc[::3]
    batch = collate_lm(vocab.pad_id)({c: list(rows[c]) for c in ("input_ids", "labels", "rating")})
    module = PolicyWithRatingHead(build_lm(tiny_cfg(lora_rank=4), tokenizer, vocab.base_size))
    assert module.rating_head.in_features == 32 and module.rating_head.weight.requires_grad
    loss, metrics = module(**batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["lm_loss"] > 0 and metrics["rating_mse"] > 0
    assert module.rating_head.weight.grad.abs().sum() > 0
    assert type(unwrap_lm(module.lm)) is GPT2LMHeadModel


def test_unwrap_lm_leaves_plain_model_alone(tokenizer, vocab):
    model = build_lm(tiny_cfg(), tokenizer, vocab.base_size)
    assert unwrap_lm(model) is model


def test_loads_from_two_threads_leave_every_later_model_tied(tmp_path):
    """Members and reward heads fit side by side from driver threads, each loading models;
    transformers swaps PreTrainedModel.tie_weights for a no-op during a load, so two unguarded
    loads at once (reliably within 2 x 20 tiny loads) leave it swapped and every later model of the
    process untied (a CI run's serve and checkpoint tests failed so)."""
    from concurrent.futures import ThreadPoolExecutor

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tie_weights = PreTrainedModel.tie_weights
    try:
        with ThreadPoolExecutor(2) as pool:
            loaded = list(pool.map(lambda _: load_pretrained(AutoModelForCausalLM, tmp_path), range(40)))
        assert PreTrainedModel.tie_weights is tie_weights
        for model in (loaded[-1], GPT2LMHeadModel(config)):
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    finally:
        PreTrainedModel.tie_weights = tie_weights  # a failure here must not break the rest of the suite


def test_greedy_pages_same_with_and_without_left_padding(codec, policy_dir):
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    users = ["u1", "u 2", "never seen", "42"]
    prompts = [["A 1", "b", "x|y", "4", "p03"], ["42"], [], ["p01", "p02"]]
    one_by_one = greedy_pages(model, codec, users, prompts, max_items=5, batch_size=1)
    batched = greedy_pages(model, codec, users, prompts, max_items=5, batch_size=4)
    assert len(batched) == len(users) and all(isinstance(p, ParsedPage) for p in batched)
    assert batched == one_by_one


# ------------------------------------------------------------------------------ 6. reward models


def _lists(codec):
    specs = [("u1", ["A 1"], ["x|y", "42", "b"]), ("u 2", ["42", "b"], ["4"]), ("x|y", [], ["p01", "p02"])]
    return [encode_list(codec, *s) for s in specs]


def test_coarse_score_reads_last_real_token(codec, vocab, policy_dir):
    torch.manual_seed(0)
    model = RewardModel.from_policy(policy_dir, "coarse").eval()
    ids, mask = _lists(codec)[0]
    pad = vocab.pad_id
    alone = model.score(torch.tensor(ids[None]), torch.ones(1, len(ids)), torch.tensor(mask[None]))
    padded_ids = torch.tensor([list(ids) + [pad] * 4])
    padded_att = torch.tensor([[1] * len(ids) + [0] * 4])
    padded = model.score(padded_ids, padded_att, torch.tensor([list(mask) + [0] * 4]))
    assert torch.allclose(alone, padded, atol=1e-5)
    per_pos = model.item_scores(padded_ids, padded_att)
    assert torch.allclose(padded, per_pos[:, len(ids) - 1], atol=1e-6)
    assert not torch.allclose(padded, per_pos[:, -1], atol=1e-4)  # not simply the last column


def test_fine_score_is_mean_over_item_positions(codec, vocab, policy_dir):
    torch.manual_seed(0)
    model = RewardModel.from_policy(policy_dir, "fine").eval()
    lists = _lists(codec)
    batch = collate_pairs(vocab.pad_id)(
        {
            "chosen_ids": [lists[0][0], lists[1][0]],
            "chosen_mask": [lists[0][1], lists[1][1]],
            "rejected_ids": [lists[2][0]],
            "rejected_mask": [lists[2][1]],
        }
    )
    with torch.no_grad():
        score = model.score(batch["input_ids"], batch["attention_mask"], batch["item_mask"])
        per_pos = model.item_scores(batch["input_ids"], batch["attention_mask"])
    for r, (ids, mask) in enumerate([lists[0], lists[1], lists[2]]):
        positions = np.flatnonzero(mask)
        assert torch.allclose(score[r], per_pos[r, positions].mean(), atol=1e-6)
        # and the same row scored alone agrees (padding does not leak in)
        with torch.no_grad():
            alone = model.score(torch.tensor(ids[None]), torch.ones(1, len(ids)), torch.tensor(mask[None]))
        assert torch.allclose(alone[0], score[r], atol=1e-5)


def test_fine_score_dcg_pooling_weights_the_top_slots(codec, vocab, policy_dir, tmp_path):
    torch.manual_seed(0)
    model = RewardModel.from_policy(policy_dir, "fine", pooling="dcg").eval()
    ids, mask = _lists(codec)[0]  # three items
    with torch.no_grad():
        score = model.score(torch.tensor(ids[None]), torch.ones(1, len(ids)), torch.tensor(mask[None]))
        per_item = model.item_scores(torch.tensor(ids[None]), torch.ones(1, len(ids)))[0, np.flatnonzero(mask)]
    w = 1.0 / np.log2(np.arange(2, 5))
    assert score.item() == pytest.approx(float((per_item.numpy() * w).sum() / w.sum()), abs=1e-6)
    weights = item_weights(torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]]), "dcg")
    assert torch.allclose(weights.sum(1), torch.ones(2)) and weights[0, 0] == weights[0, 3] == 0
    assert weights[0, 1] > weights[0, 2] > weights[0, 4] > 0
    assert torch.equal(item_weights(torch.tensor([[1, 1, 0]]), "mean"), torch.tensor([[0.5, 0.5, 0.0]]))
    model.save_pretrained(tmp_path)
    assert RewardModel.from_pretrained(tmp_path).pooling == "dcg"
    with pytest.raises(ValueError, match="pooling"):
        RewardModel.from_policy(policy_dir, "fine", pooling="max")


def test_collaborative_fine_reward_scores_page_items_given_the_prompts_items(codec, vocab, policy_dir, tmp_path):
    from pagellm.config import PPOConfig, TrainConfig
    from pagellm.model.multivae import MultiVAE
    from pagellm.rl.batch import RolloutBatch
    from pagellm.rl.workers import RewardWorker

    torch.manual_seed(0)
    lo, hi = vocab.item_id_range
    n = hi - lo
    model = CollaborativeReward(MultiVAE(n, hidden=16, latent=4), lo, "dcg").eval()
    lists = _lists(codec)
    ids, mask = lists[1]  # prompt items 42 and b, page [4]
    ids0, mask0 = lists[0]  # prompt item A 1, page [x|y, 42, b]

    def expected(ids, mask):
        history = [t - lo for t, m in zip(ids, mask) if lo <= t < hi and not m]
        x = torch.zeros(1, n)
        x[0, history] = 1.0
        logp = model.vaes[0](x)[0][0].log_softmax(-1) + np.log(n)
        page = [t - lo for t, m in zip(ids, mask) if m]
        w = 1.0 / np.log2(np.arange(2, len(page) + 2))
        return float((logp[page].detach().numpy() * w).sum() / w.sum())

    with torch.no_grad():
        batch = pad_batch([ids, ids0], vocab.pad_id)
        attention = pad_batch([np.ones(len(ids)), np.ones(len(ids0))], 0)
        scores = model.score(batch, attention, pad_batch([mask, mask0], 0))
    assert scores.tolist() == pytest.approx([expected(ids, mask), expected(ids0, mask0)], abs=1e-5)
    # the page's items are not history: another page under the same prompt changes only the scored items
    other_ids, other_mask = encode_list(codec, "u 2", ["42", "b"], ["p01"])
    with torch.no_grad():
        other = model.score(
            torch.tensor(other_ids[None]), torch.ones(1, len(other_ids)), torch.tensor(other_mask[None])
        )
    assert other.item() == pytest.approx(expected(other_ids, other_mask), abs=1e-5) and other.item() != scores[0].item()

    model.save_pretrained(tmp_path / "fine")
    reloaded = load_reward_head(tmp_path / "fine")
    assert isinstance(reloaded, CollaborativeReward) and reloaded.pooling == "dcg" and not reloaded.training
    assert torch.allclose(reloaded.score(batch, attention, pad_batch([mask, mask0], 0)), scores)
    RewardModel.from_policy(policy_dir, "coarse").save_pretrained(tmp_path / "coarse")
    assert isinstance(load_reward_head(tmp_path / "coarse"), RewardModel)

    # PPO's fine role scores a rollout page as the reward stage scores the same list
    worker = RewardWorker(
        str(tmp_path / "fine"), vocab.pad_id, vocab.eos_id, ppo=PPOConfig(), train=TrainConfig(), num_cpus=1, num_gpus=0
    )
    pages = [["4"], ["x|y", "42", "b"]]
    tokens = pad_batch([vocab.items_to_ids(p) + [vocab.eos_id] for p in pages], vocab.pad_id)
    actions = torch.where(tokens == vocab.eos_id, n, tokens - lo).masked_fill(tokens == vocab.pad_id, -1)
    prompts = [codec.prompt("u 2", ["42", "b"]), codec.prompt("u1", ["A 1"])]
    rollout = RolloutBatch(prompts, actions, tokens, tokens != vocab.pad_id)
    out = worker.score(rollout)
    assert out.page.tolist() == pytest.approx(scores.tolist(), abs=1e-5)
    assert out.steps[1, 3] == 0 and out.steps[0, 1:].abs().sum() == 0  # EOS and padding score nothing


def test_collaborative_ensemble_averages_its_vaes_and_adds_item_item_views_as_log_probabilities(vocab, tmp_path):
    """reward.fine_vaes / fine_itemknn / fine_ease: R_f = mean of the Multi-VAEs' log p + for each
    item-item view w x log of its scores normalised to sum 1 (+ (1 + sum w) log n); an item whose
    score is not positive (no neighbour in the history; EASE's negative weights) gets a floor, not
    -inf or NaN; it saves and reloads whole, and a single-VAE file of the older layout still loads."""
    import json

    from safetensors.torch import save_file

    from pagellm.model.modeling import REWARD_META_FILE
    from pagellm.model.multivae import MultiVAE

    torch.manual_seed(0)
    lo, hi = vocab.item_id_range
    n = hi - lo
    vaes = [MultiVAE(n, hidden=16, latent=4).eval() for _ in range(2)]
    index = torch.tensor([[(i + 1) % n, (i + 2) % n] for i in range(n)])
    value = torch.rand(n, 2) + 0.1
    ease_index = torch.tensor([[(i + 3) % n, (i + 5) % n, (i + 7) % n] for i in range(n)])
    ease_value = torch.randn(n, 3)  # EASE's weights are signed
    views = {"knn": (index, value, 0.5), "ease": (ease_index, ease_value, 2.0)}
    head = CollaborativeReward(vaes, lo, "mean", views).eval()
    history = [0, 2]
    x = torch.zeros(1, n)
    x[0, history] = 1.0

    def log_normalised(idx, val):
        s = torch.zeros(n)
        for h in history:
            s[idx[h]] += val[h]
        return s, (s.clamp(min=1e-12) / s.clamp(min=1e-12).sum()).log()

    s, knn_logq = log_normalised(index, value)
    e, ease_logq = log_normalised(ease_index, ease_value)
    with torch.no_grad():
        vae_logp = torch.stack([v(x)[0][0].log_softmax(-1) for v in vaes]).mean(0)
        expected = vae_logp + 0.5 * knn_logq + 2.0 * ease_logq + 3.5 * np.log(n)
        got = head.prompt_scores([[lo + h for h in history]], vocab.pad_id)[0]
    assert torch.allclose(got, expected, atol=1e-4) and torch.isfinite(got).all()
    assert (s == 0).any() and (e < 0).any()  # the floor, finite above

    head.save_pretrained(tmp_path / "ensemble")
    reloaded = load_reward_head(tmp_path / "ensemble")
    assert len(reloaded.vaes) == 2 and reloaded.view_weights == {"knn": 0.5, "ease": 2.0}
    assert torch.equal(reloaded.knn_index, index) and torch.equal(reloaded.ease_value, ease_value)
    with torch.no_grad():
        assert torch.allclose(reloaded.prompt_scores([[lo + h for h in history]], vocab.pad_id)[0], got)

    # the layout of a single Multi-VAE saved before ensembles: unprefixed keys, no "vaes" in the meta
    old = tmp_path / "single"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in vaes[0].state_dict().items()}, str(old / CollaborativeReward.FILE))
    meta = {"kind": "fine", "model": "multivae", "pooling": "mean", "item_lo": lo, "n_items": n, "hidden": 16}
    (old / REWARD_META_FILE).write_text(json.dumps({**meta, "latent": 4}))
    single = load_reward_head(old)
    with torch.no_grad():
        one = single.prompt_scores([[lo + h for h in history]], vocab.pad_id)[0]
        assert torch.allclose(one, vaes[0](x)[0][0].log_softmax(-1) + np.log(n), atol=1e-5)


def test_collaborative_reward_adds_sasrec_seeds_reading_the_history_in_order(vocab, tmp_path):
    """reward.fine_sasrecs: R_f adds w x the SASRec seeds' mean log-softmax after the prompt's item
    tokens in their order (the last max_len of them, other tokens skipped), exactly the sasrec
    baseline's scores of that history; the order matters; it saves and reloads whole."""
    from pagellm.eval.baselines import right_pad
    from pagellm.model.multivae import MultiVAE
    from pagellm.model.sasrec import SASRec

    torch.manual_seed(0)
    lo, hi = vocab.item_id_range
    n = hi - lo
    vae = MultiVAE(n, hidden=16, latent=4).eval()
    sasrecs = [SASRec(n, dim=8, max_len=3).eval() for _ in range(2)]
    head = CollaborativeReward([vae], lo, "mean", None, sasrecs, 0.7).eval()
    user = vocab.user_token["u1"]  # a non-item token inside the row
    histories = [[0, 2, 1, 3], [3], []]
    prompts = [[user, *[lo + h for h in histories[0]]], [lo + 3, user], [user]]

    def expected(history):
        x = torch.zeros(1, n)
        x[0, history] = 1.0
        seq, length = right_pad([[h + 1 for h in history]], 3)
        seq_logp = torch.stack([m(seq, length)[0].log_softmax(-1) for m in sasrecs]).mean(0)
        return vae(x)[0][0].log_softmax(-1) + 0.7 * seq_logp + 1.7 * np.log(n)

    with torch.no_grad():
        got = head.prompt_scores(prompts, vocab.pad_id)
        for row, history in enumerate(histories):
            assert torch.allclose(got[row], expected(history), atol=1e-4)
        reordered = head.prompt_scores([[user, *[lo + h for h in [2, 0, 3, 1]]]], vocab.pad_id)[0]
    assert not torch.allclose(reordered, got[0], atol=1e-3)  # the set views alone would not tell

    head.save_pretrained(tmp_path / "seq")
    reloaded = load_reward_head(tmp_path / "seq")
    assert len(reloaded.sasrecs) == 2 and reloaded.sasrec_weight == pytest.approx(0.7)
    with torch.no_grad():
        assert torch.allclose(reloaded.prompt_scores(prompts, vocab.pad_id), got, atol=1e-6)


def test_spearman_and_reward_agreement():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2, 3]), np.zeros(3)) is None  # constant NDCG: undefined
    users = np.array(["a", "a", "b", "b", "c", "c"])
    ndcg = np.array([0.0, 1.0, 0.2, 0.1, 0.0, 0.0])
    good, bad = np.array([0.1, 0.9, 0.5, 0.4, 0.3, 0.3]), np.array([0.9, 0.1, 0.4, 0.5, 0.3, 0.3])
    report = reward_agreement({"good": good, "bad": bad}, ndcg, users)
    assert report["good"]["within_user"] == pytest.approx(1.0) and report["good"]["users"] == 2  # c: all 0
    assert report["bad"]["within_user"] == pytest.approx(-1.0)
    assert report["good"]["pooled"] > 0.5 > report["bad"]["pooled"]
    assert report["pages"] == 6 and report["mean_ndcg"] == pytest.approx(ndcg.mean())


def test_policy_sample_pairs_contrast_each_golden_list_with_a_policy_page(policy_dir):
    from pagellm.config import load_config
    from pagellm.model.artifact import load_policy

    pairs = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u 2", "x|y"],
            "family": ["rk", "d", "rk", "np"],
            "prompt_items": [["A 1"], ["A 1"], ["42", "b"], []],
            "chosen": [["x|y", "42"], ["x|y", "42"], ["4"], ["p01", "p02", "p03"]],
            "rejected": [["42", "x|y"], ["p09", "42"], ["p05"], ["b"]],
            "window": ["main"] * 4,
        }
    )
    interacted = {"u1": {"A 1", "x|y", "42", "p00", "p01"}, "u 2": set(FILLER_ITEMS[:30]), "x|y": {"b"}}
    cfg = load_config(overrides=["ppo.temperature=1.0"])
    ps = policy_sample_pairs(cfg, load_policy(policy_dir), pairs, interacted)
    assert sorted(ps.user_id) == ["u 2", "u1", "x|y"] and set(ps.family) == {"ps"}  # one per window
    for row in ps.itertuples():
        assert len(row.rejected) == len(row.chosen) == len(set(row.rejected))
        assert not set(row.rejected) & interacted[row.user_id] and set(row.rejected) <= set(ITEMS)
    again = policy_sample_pairs(cfg, load_policy(policy_dir), pairs, interacted)
    assert again.rejected.tolist() == ps.rejected.tolist()  # seeded by train.seed


@pytest.mark.parametrize("kind", ["coarse", "fine"])
def test_reward_bt_loss_and_save_load(tmp_path, codec, vocab, policy_dir, kind):
    torch.manual_seed(0)
    model = RewardModel.from_policy(policy_dir, kind).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.3)
    pairs = pd.DataFrame(
        {
            "user_id": ["u1", "u 2", "x|y"],
            "prompt_items": [["A 1"], ["42", "b"], []],
            "chosen": [["x|y", "42"], ["4"], ["p01", "p02", "p03"]],
            "rejected": [["42", "x|y"], ["p05", "p06"], ["b"]],
        }
    )
    rows = pair_rows(codec, pairs)
    batch = collate_pairs(vocab.pad_id)({c: list(rows[c]) for c in rows.columns})
    assert batch["input_ids"].shape[0] == 6
    with torch.no_grad():
        loss, metrics = model(**batch)
        r = model.score(batch["input_ids"], batch["attention_mask"], batch["item_mask"])
    margin = r[:3] - r[3:]
    assert torch.allclose(loss, -F.logsigmoid(margin).mean(), atol=1e-6)
    assert metrics["accuracy"].item() == pytest.approx((margin > 0).float().mean().item())

    model.save_pretrained(tmp_path)
    reloaded = RewardModel.from_pretrained(tmp_path).eval()
    assert reloaded.kind == kind
    with torch.no_grad():
        r2 = reloaded.score(batch["input_ids"], batch["attention_mask"], batch["item_mask"])
    assert torch.equal(r2, r)


def test_reward_kind_is_checked(policy_dir):
    with pytest.raises(ValueError, match="coarse"):
        RewardModel.from_policy(policy_dir, "medium")


# ------------------------------------------------------------------------------ 7. reward rows


def test_pairwise_accuracy_by_family():
    families = np.array(["np", "np", "rk", "d", "d"])
    margins = {"coarse": np.array([1.0, -1.0, 0.5, 2.0, 0.0]), "fine": np.array([-1.0, -1.0, -0.5, 2.0, 3.0])}
    report = pairwise_accuracy(margins, families)
    assert report["coarse"] == {
        "np": 0.5,
        "rk": 1.0,
        "d": 0.5,
        "rd": None,
        "pm": None,
        "ps": None,
        "all": 0.6,
    }  # a tie is not a win
    assert report["fine"] == {"np": 0.0, "rk": 0.0, "d": 1.0, "rd": None, "pm": None, "ps": None, "all": 0.4}
    empty = pairwise_accuracy({"coarse": np.zeros(0)}, np.array([], dtype=object))
    assert empty == {"coarse": {"np": None, "rk": None, "d": None, "rd": None, "pm": None, "ps": None, "all": None}}


def test_encode_list_marks_exactly_the_page_items(codec, vocab):
    prompt_items, page = ["A 1", "b"], ["x|y", "42", "4"]
    ids, mask = encode_list(codec, "u1", prompt_items, page)
    prompt = codec.prompt("u1", prompt_items)
    assert list(ids) == prompt + codec.target(page)
    assert len(mask) == len(ids) and mask.sum() == len(page)
    assert list(ids[mask == 1]) == vocab.items_to_ids(page)
    assert not mask[: len(prompt)].any()  # history items in the prompt are not marked
    assert ids[-1] == vocab.eos_id and mask[-1] == 0
    assert mask.dtype == np.int64 and ids.dtype == np.int64


# ------------------------------------------------------------------------------ 8. meta rows


def test_meta_rows_patterns_and_ratings(vocab, meta_data):
    items_df, train = meta_data
    rows = meta_rows(vocab, items_df, train, max_tokens=64, seed=0)
    assert set(rows.pattern) == {"a", "b", "c", "d", "rating"}
    counts = rows.pattern.value_counts()
    assert counts["a"] == len(items_df) and counts["b"] == len(train) and counts["rating"] == len(train)
    assert counts["d"] == train.user_id.nunique()

    rating = rows[rows.pattern == "rating"]
    assert all((lab == -100).all() for lab in rating.labels)
    assert np.isfinite(rating.rating).all()
    expected = sorted(
        ((vocab.user_token[u], vocab.item_token[i]), r)
        for u, i, r in train[["user_id", "item_id", "rating"]].itertuples(index=False)
    )
    assert sorted((tuple(x), float(r)) for x, r in zip(rating.input_ids, rating.rating)) == expected

    lm = rows[rows.pattern != "rating"]
    assert np.isnan(lm.rating).all()
    assert all(np.array_equal(x, lab) for x, lab in zip(lm.input_ids, lm.labels))

    # (d): the user's training items in time order ("u 2" rated "A 1" at ts 40, "b" at 50)
    d_u2 = [list(x) for x, p in zip(rows.input_ids, rows.pattern) if p == "d" and x[0] == vocab.user_token["u 2"]]
    assert d_u2 == [
        [vocab.user_token["u 2"], *vocab.text_ids(" history:"), vocab.item_token["A 1"], vocab.item_token["b"]]
    ]
    # (b) says the rating
    b_rows = [list(x) for x, p in zip(rows.input_ids, rows.pattern) if p == "b"]
    u1, xy = vocab.user_token["u1"], vocab.item_token["x|y"]
    assert [u1, *vocab.text_ids(" rated"), xy, *vocab.text_ids(" 3.5 stars")] in b_rows

    # only items from the items table or training interactions, only training users
    known_items = {vocab.item_token[i] for i in set(items_df.item_id) | set(train.item_id)}
    train_users = {vocab.user_token[u] for u in train.user_id}
    for x in rows.input_ids:
        entity = [int(t) for t in x if t >= vocab.base_size]
        items_in = {t for t in entity if t in vocab.token_item}
        assert items_in <= known_items
        assert set(entity) - items_in <= train_users
    assert vocab.item_token["p39"] not in {int(t) for x in rows.input_ids for t in x}
    assert vocab.user_token["val_only"] not in {int(t) for x in rows.input_ids for t in x}


def test_meta_rows_co_occurrence_pairs_really_share(vocab, meta_data):
    items_df, train = meta_data
    rows = meta_rows(vocab, items_df, train, max_tokens=64, seed=3)
    by_id = items_df.set_index("item_id")
    c_rows = [x for x, p in zip(rows.input_ids, rows.pattern) if p == "c"]
    assert c_rows
    for x in c_rows:
        a, b = [vocab.token_item[int(t)] for t in x if int(t) in vocab.token_item]
        assert a != b
        text = vocab.tokenizer.decode(x)
        key = "category" if "share category:" in text else "brand"
        assert by_id.loc[a, key] == by_id.loc[b, key] and text.endswith(f"share {key}: {by_id.loc[a, key]}")


def test_meta_rows_do_not_pair_items_without_category(vocab):
    items_df = build_items(
        ["A 1", "b", "42"], [None, None, "drums"], [[], [], ["drums"]], ["red guitar", "blue drum", "amp"]
    ).to_pandas()
    train = pd.DataFrame({"user_id": ["u1"], "item_id": ["A 1"], "rating": [4.0], "ts": [1]})
    rows = meta_rows(vocab, items_df, train, max_tokens=64, seed=0)
    assert "c" not in set(rows.pattern)


def test_meta_rows_are_cut_to_max_tokens(vocab, meta_data):
    items_df, train = meta_data
    full = meta_rows(vocab, items_df, train, max_tokens=1000, seed=0)
    cut = meta_rows(vocab, items_df, train, max_tokens=6, seed=0)
    assert max(map(len, full.input_ids)) > 6
    assert list(cut.pattern) == list(full.pattern)
    for x, lab, fx, flab in zip(cut.input_ids, cut.labels, full.input_ids, full.labels):
        assert len(x) == len(lab) == min(6, len(fx))
        assert np.array_equal(x, fx[:6]) and np.array_equal(lab, flab[:6])


def test_page_unlikelihood_matches_hand_computation():
    """Two rows; vocabulary {0: eos, 1..4: items}. Row 0's page is [1, 2, 1?] -> candidates:
    step 0: eos; step 1: item 1; step 2 (eos target): items 1 and 2 (eos itself is never one)."""
    from pagellm.model.modeling import page_unlikelihood

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    # row 0: prompt at 0..2, page tokens 1, 2 then eos at positions 3, 4, 5
    # row 1: prompt at 0..3, page token 3 then eos at 4, 5 is padding (-100)
    labels = torch.tensor([[-100, -100, -100, 1, 2, 0], [-100, -100, -100, -100, 3, 0]])
    loss, n = page_unlikelihood(logits, labels, eos_id=0)
    p = logits.softmax(-1)
    # next-token distributions: step predicting position j is logits[:, j-1]
    want = -(
        torch.log(1 - p[0, 2, 0])  # row 0 first step: eos
        + torch.log(1 - p[0, 3, 1])  # row 0 second step: item 1 again
        + torch.log(1 - p[0, 4, 1])
        + torch.log(1 - p[0, 4, 2])  # row 0 eos step: items 1, 2
        + torch.log(1 - p[1, 3, 0])  # row 1 first step: eos
        + torch.log(1 - p[1, 4, 3])  # row 1 eos step: item 3
    )
    assert n.item() == 5
    assert torch.allclose(loss, want, atol=1e-5)


def test_unlikelihood_term_pushes_down_repeats(codec, vocab, tokenizer):
    """Same model, same steps: training with the term leaves repeats and an empty page far
    less likely than maximum likelihood alone."""
    from pagellm.model.modeling import page_unlikelihood

    items = sorted(vocab.item_token)[:3]
    prompt, target = codec.prompt(None, items[:1]), codec.target(items[1:3])
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])

    def train(weight):
        lm = build_lm(ModelConfig(n_layer=1, n_head=2, n_embd=32), tokenizer, vocab.base_size, seed=0)
        policy = PolicyLM(lm, unlikelihood_weight=weight, eos_id=vocab.eos_id)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        torch.manual_seed(0)
        for _ in range(20):
            loss, metrics = policy(ids, torch.ones_like(ids), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return page_unlikelihood(policy.lm(ids).logits, labels, vocab.eos_id)[0].item(), metrics

    plain, plain_metrics = train(0.0)
    with_term, metrics = train(1.0)
    assert "unlikelihood" not in plain_metrics and "unlikelihood" in metrics
    assert with_term < plain * 0.7


def test_meta_rows_sampled_per_pattern(vocab, meta_data):
    items_df, train = meta_data
    full = meta_rows(vocab, items_df, train, max_tokens=64, seed=0)
    capped = meta_rows(vocab, items_df, train, max_tokens=64, seed=0, max_rows_per_pattern=3)
    counts, full_counts = capped.pattern.value_counts(), full.pattern.value_counts()
    assert all(counts[p] == min(3, full_counts[p]) for p in full_counts.index)
    # a sample of the rows themselves, not new ones, and the same sample for the same seed
    full_rows = {tuple(x) for x in full.input_ids}
    assert all(tuple(x) in full_rows for x in capped.input_ids)
    again = meta_rows(vocab, items_df, train, max_tokens=64, seed=0, max_rows_per_pattern=3)
    assert [tuple(x) for x in again.input_ids] == [tuple(x) for x in capped.input_ids]


def test_page_modes_score_and_hybrid(codec, vocab, policy_dir):
    """score: the page is the item block ranked by the first slot's distribution (one plain
    forward pass of each prompt alone, so left padding changes nothing); hybrid: the first n
    items are the greedy pages' first n, the rest ranked after them; every mode writes k
    distinct items, none of the prompt's or banned, with log-probabilities in page order."""
    from pagellm.config import EvalConfig
    from pagellm.model.artifact import load_policy

    policy = load_policy(policy_dir)
    users, histories = ["u1", "u 2", "42"], [["A 1", "b", "x|y"], ["42"], []]
    banned = [["p01"], [], ["p02", "p03"]]
    k = 6
    pages = {
        mode: policy.write_tokens(users, histories, banned, k, EvalConfig(page_mode=mode, hybrid_items=2))
        for mode in ("generate", "score", "hybrid")
    }
    lo, hi = vocab.item_id_range
    for mode, (tokens, scores) in pages.items():
        for row, (page, lp) in enumerate(zip(tokens, scores)):
            forbidden = {vocab.item_token[i] for i in histories[row] + banned[row]}
            assert len(page) == len(set(page)) == k and all(lo <= t < hi for t in page), mode
            assert not forbidden & set(page) and len(lp) == k and all(v <= 0 for v in lp), mode
    for row, (user, history) in enumerate(zip(users, histories)):
        prompt = codec.prompt(user, history)
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([prompt])).logits[0, -1, lo:hi].clone()
        logits[[vocab.item_token[i] - lo for i in histories[row] + banned[row]]] = float("-inf")
        ranked = (logits.topk(k).indices + lo).tolist()
        assert pages["score"][0][row] == ranked
        assert pages["score"][1][row] == pytest.approx(sorted(pages["score"][1][row], reverse=True))
        assert pages["hybrid"][0][row][:2] == pages["generate"][0][row][:2]
    assert pages["hybrid"][0] != pages["generate"][0]


def test_a_policy_with_a_fine_tilt_ranks_by_its_logits_plus_the_weighted_reward(codec, vocab, policy_dir, tmp_path):
    """A policy directory holding a FineTilt (ppo.fine_objective=closed_form) loads with it, and
    every page mode writes from log pi + w R_f(item | prompt): score pages are the item block
    ranked by that sum, the first generated item is its argmax; without the tilt the pages differ
    (the reward is strong enough to reorder them)."""
    import shutil

    from pagellm.config import EvalConfig
    from pagellm.model.artifact import TILT_DIR, FineTilt, load_policy
    from pagellm.model.multivae import MultiVAE

    torch.manual_seed(0)
    lo, hi = vocab.item_id_range
    tilted_dir = tmp_path / "tilted"
    shutil.copytree(policy_dir, tilted_dir)
    FineTilt(CollaborativeReward(MultiVAE(hi - lo, hidden=16, latent=4), lo).eval(), 5.0).save(tilted_dir)
    plain, tilted = load_policy(policy_dir), load_policy(tilted_dir)
    assert plain.tilt is None and tilted.tilt.weight == 5.0 and (tilted_dir / TILT_DIR / "tilt.json").exists()
    users, histories, banned, k = ["u1", "u 2", "42"], [["A 1", "b"], ["42"], []], [["p01"], [], ["p02"]], 6
    for row, (user, history) in enumerate(zip(users, histories)):
        prompt = codec.prompt(user, history)
        with torch.no_grad():
            logits = tilted.model(input_ids=torch.tensor([prompt])).logits[0, -1, lo:hi].clone()
            r = tilted.tilt.reward.prompt_scores([prompt], vocab.pad_id)[0]
        total = logits + 5.0 * r
        total[[vocab.item_token[i] - lo for i in history + banned[row]]] = float("-inf")
        score, _ = tilted.write_tokens([user], [history], [banned[row]], k, EvalConfig(page_mode="score"))
        first, _ = tilted.write_tokens([user], [history], [banned[row]], 1, EvalConfig(page_mode="generate"))
        assert score[0] == (total.topk(k).indices + lo).tolist()
        assert first[0] == [int(total.argmax()) + lo]
    cfg = EvalConfig(page_mode="score")
    assert (
        tilted.write_tokens(users, histories, banned, k, cfg)[0]
        != plain.write_tokens(users, histories, banned, k, cfg)[0]
    )
    # eval.tilt_history: the LM reads the prompt's history, the tilt each user's whole history
    user, prompt_items, whole, ban = "u1", ["b"], ["A 1", "42", "b"], ["A 1", "42"]
    with torch.no_grad():
        logits = tilted.model(input_ids=torch.tensor([codec.prompt(user, prompt_items)])).logits[0, -1, lo:hi]
        r_whole, r_prompt = tilted.tilt.reward.prompt_scores(
            [codec.prompt(user, whole), codec.prompt(user, prompt_items)], vocab.pad_id
        )
    assert not torch.allclose(r_whole, r_prompt)
    for mode, r in (("all", r_whole), ("prompt", r_prompt)):
        total = logits + 5.0 * r
        total[[vocab.item_token[i] - lo for i in prompt_items + ban]] = float("-inf")
        cfg = EvalConfig(page_mode="score", tilt_history=mode)
        pages, _ = tilted.write_tokens([user], [prompt_items], [ban], 3, cfg, tilt_histories=[whole])
        assert pages[0] == (total.topk(3).indices + lo).tolist(), mode
    assert tilted.write_tokens([user], [prompt_items], [ban], 3, cfg)[0] == pages  # prompt: as if none given
    with pytest.raises(ConfigError, match="tilt_history"):
        EvalConfig(tilt_history="everything")


def test_an_ensemble_policy_ranks_and_writes_by_its_members_mean_log_probabilities(codec, vocab, tokenizer, tmp_path):
    """sft.members: a policy directory of K LMs loads as one model whose next-token logits are the
    members' mean log-softmax. Score pages rank the item block by it, greedy pages (KV cache per
    member) equal a step-by-step recomputation without cache, and the directory is checked,
    counted and versioned member by member."""
    from pagellm.config import EvalConfig
    from pagellm.errors import InputError
    from pagellm.experiments import saved_parameters
    from pagellm.model.artifact import Policy, load_policy, require_policy
    from pagellm.model.ensemble import MemberEnsemble, lm_dirs
    from pagellm.serve.app import model_version

    lms = [build_lm(tiny_cfg(), tokenizer, vocab.base_size, seed=s).eval() for s in (1, 2)]
    directory = tmp_path / "ensemble"
    MemberEnsemble(lms).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert lm_dirs(directory) == [directory / "members" / "0", directory / "members" / "1"]
    policy = load_policy(directory)
    assert isinstance(policy.model, MemberEnsemble) and len(policy.model.members) == 2
    assert saved_parameters(directory) == 2 * sum(p.numel() for p in lms[0].parameters())
    lo, hi = vocab.item_id_range

    def combined(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logps = [lm(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1) for lm in lms]
        return torch.stack(logps).mean(0)[lo:hi].clone()

    users, histories, banned, k = ["u1", "u 2"], [["A 1", "b"], ["42"]], [["p01"], []], 5
    score, _ = policy.write_tokens(users, histories, banned, k, EvalConfig(page_mode="score"))
    greedy, _ = policy.write_tokens(users, histories, banned, k, EvalConfig(page_mode="generate"))
    for row, (user, history) in enumerate(zip(users, histories)):
        prompt, hidden = codec.prompt(user, history), [vocab.item_token[i] - lo for i in history + banned[row]]
        logits = combined(prompt)
        logits[hidden] = float("-inf")
        assert score[row] == (logits.topk(k).indices + lo).tolist()
        written: list[int] = []
        for _ in range(k):  # no cache: the whole sequence again at every slot
            logits = combined(prompt + written)
            logits[hidden + [t - lo for t in written]] = float("-inf")
            written.append(int(logits.argmax()) + lo)
        assert greedy[row] == written
    twins = MemberEnsemble([lms[0], lms[0]])  # unconstrained greedy pages (SFT's validity check), as one LM's
    assert greedy_pages(twins, codec, users, histories, 4) == greedy_pages(lms[0], codec, users, histories, 4)
    single = Policy(lms[0], policy.codec)
    assert score != single.write_tokens(users, histories, banned, k, EvalConfig(page_mode="score"))[0]
    version = model_version(directory)
    next(lms[1].parameters()).data.add_(1.0)
    lms[1].save_pretrained(directory / "members" / "1")
    assert model_version(directory) != version
    (directory / "members" / "1" / "config.json").unlink()
    with pytest.raises(InputError, match="members/1 holds no model"):
        require_policy(directory)


def test_next_item_rows_are_every_prefix_with_its_next_items_at_the_page_slot(codec, vocab):
    """One row per positive after a user's first: the prompt of the up to max_items positives
    before it (time order) and the item-block indices of it and the horizon - 1 positives after
    it (fewer at the history's end), the page's first slot's targets; non-positives and other
    users' items never enter a row, a lone positive gives none."""
    from pagellm.train.sft import next_item_rows

    train = pd.DataFrame(
        {
            "user_id": ["u1"] * 5 + ["u 2", "42", "42"],
            "item_id": ["A 1", "x|y", "42", "b", "p00", "p02", "p03", "p04"],
            "rating": [5.0, 4.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0],
            "ts": [1, 2, 3, 4, 5, 1, 2, 1],
        }
    )
    t, lo = vocab.item_token, vocab.item_id_range[0]
    # u1's positives in time order: A 1, x|y, b, p00 ("42" has r = 2); "42": p04 then p03
    want = [
        ("u1", ["A 1"], ["x|y", "b"]),
        ("u1", ["A 1", "x|y"], ["b", "p00"]),
        ("u1", ["x|y", "b"], ["p00"]),
        ("42", ["p04"], ["p03"]),
    ]
    for horizon in (1, 2):
        rows = next_item_rows(codec, train, 3.0, max_items=2, horizon=horizon)
        got = sorted((r.input_ids.tolist(), r.next_item.tolist()) for r in rows.itertuples())
        ref = [(codec.prompt(user, history), [t[i] - lo for i in nexts[:horizon]]) for user, history, nexts in want]
        assert got == sorted(ref)


def test_next_item_loss_is_item_block_cross_entropy_and_validation_ranks_like_evaluate(codec, vocab, policy_dir):
    """The loss, computed from the last position's logits alone, equals item-block cross-entropy
    of the full forward pass at each left-padded prompt's page slot; validation NDCG@100 equals
    evaluate's ranking (every seen item masked)."""
    from pagellm.eval.metrics import ndcg_at_k
    from pagellm.model.modeling import NextItemLM, PolicyLM
    from pagellm.train.sft import collate_lm, ranking_rows

    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    lo, hi = vocab.item_id_range
    module = NextItemLM(lm, lo, hi - lo).eval()
    prompts = [codec.prompt("u1", ["b", "42"]), codec.prompt("u 2", [])]
    nexts = [vocab.item_token["p00"] - lo, vocab.item_token["b"] - lo]
    batch = collate_lm(vocab.pad_id)({"input_ids": prompts, "next_item": [np.array([n]) for n in nexts]})
    assert batch["input_ids"][1, 0] == vocab.pad_id  # the shorter prompt is left-padded
    loss, _ = module(**batch)
    with torch.no_grad():
        last = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1, lo:hi] for p in prompts])
    assert loss.item() == pytest.approx(F.cross_entropy(last, torch.tensor(nexts)).item(), rel=1e-5)
    # several next items (sft.next_item_horizon): each row's mean NLL of its own targets, -1 padding ignored
    futures = [np.array([nexts[0], vocab.item_token["A 1"] - lo, vocab.item_token["x|y"] - lo]), np.array([nexts[1]])]
    loss, _ = module(**collate_lm(vocab.pad_id)({"input_ids": prompts, "next_item": futures}))
    logp = last.log_softmax(-1)
    ref = (-logp[0, futures[0]].mean() - logp[1, futures[1]].mean()) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)

    users = pd.DataFrame(
        {
            "user_id": ["u1", "u 2", "new"],
            "prompt_items": [["A 1", "b"], [], ["42"]],
            "seen": [["A 1", "b", "p00"], ["x|y"], ["42"]],
            "target": [["p01", "p02"], ["p03"], ["p04"]],
        }
    )
    batch = collate_lm(vocab.pad_id)({c: list(v) for c, v in ranking_rows(codec, users).items()})
    for model in (module, PolicyLM(lm, item_range=(lo, hi)).eval()):
        _, metrics = model(**batch)
        ref = []
        for user, prompt, seen, target in users.itertuples(index=False):
            with torch.no_grad():
                row = lm(input_ids=torch.tensor([codec.prompt(user, prompt)])).logits[0, -1, lo:hi].clone()
            row[[vocab.item_token[i] - lo for i in seen]] = float("-inf")
            page = [vocab.token_item[int(j) + lo] for j in row.topk(hi - lo - len(seen)).indices[:100]]
            ref.append(ndcg_at_k(page, target, 100))
        assert metrics["ndcg@100"].item() == pytest.approx(float(np.mean(ref)), abs=1e-6)


def test_without_user_tokens_prompts_are_the_history_alone(items, meta_data):
    """model.user_tokens off: the tokenizer holds no user tokens, so every prompt (training,
    evaluation, serving: all read the policy's tokenizer) starts at " history:", and meta
    pre-training has no user-relation or rating rows."""
    from pagellm.train.sft import meta_rows, next_item_rows

    tok = build_tokenizer(None, items, [], BPE)
    vocab = Vocab.from_tokenizer(tok)
    codec = PromptCodec(vocab)
    assert not vocab.user_token
    assert codec.prompt("u1", ["b"]) == codec.history_ids + [vocab.item_token["b"]] + codec.page_ids
    items_df, train = meta_data
    rows = meta_rows(vocab, items_df, train, 128, seed=0)
    assert set(rows.pattern) == {"a", "c", "d"}
    assert all(list(r[: len(codec.history_ids)]) == codec.history_ids for r in rows[rows.pattern == "d"].input_ids)
    windows = next_item_rows(codec, train, 3.0, 50)
    assert len(windows) and all(list(r[: len(codec.history_ids)]) == codec.history_ids for r in windows.input_ids)
