"""A policy of K causal LMs trained with different seeds (``sft.members``), read as one model.

Why: the LM is small and its seeds disagree user by user; ranking with several of them lifts
NDCG@100 where any one is level with SASRec (docs/training.md, "SFT members"). They combine as
a product of experts: the next-token log-probabilities are the members' mean log-softmax. That is
the geometric mean of their distributions, whose ranking (and renormalised distribution) is the
same whether it is taken over the vocabulary, the item block, or the item block less the masked
items, so decoding, masking, PPO's log-probabilities and KL all read it as they read one LM.

On disk (SFT_DIR, PPO_DIR/policy): ``members/<k>/`` each a Hugging Face LM directory, and
``ensemble.json`` beside the tokenizer. A directory with ``config.json`` at its top is one LM."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from pagellm.model.decoding import cache_argument

ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"


def member_dir(directory: str | Path, k: int) -> Path:
    return Path(directory) / MEMBERS_DIR / str(k)


def lm_dirs(directory: str | Path) -> list[Path]:
    """The Hugging Face LM directories a policy directory holds: its members, or itself."""
    directory = Path(directory)
    meta = directory / ENSEMBLE_FILE
    if not meta.exists():
        return [directory]
    return [member_dir(directory, k) for k in range(json.loads(meta.read_text())["members"])]


class MemberEnsemble(nn.Module):
    """K LMs over one vocabulary; ``forward`` returns their mean log-softmax as ``logits`` (and,
    with ``use_cache``, one KV cache per member), so it stands wherever one causal LM does; other
    keyword arguments (``logits_to_keep``) reach every member."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len({m.config.vocab_size for m in members}) != 1:
            raise ValueError("ensemble members must share one vocabulary")
        self.members = nn.ModuleList(members)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache: bool = False, **kwargs):
        name = cache_argument(self)
        past = kwargs.pop(name, None)
        outs = [
            member(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **({name: past[k]} if past is not None else {}),
                **kwargs,
            )
            for k, member in enumerate(self.members)
        ]
        logits = torch.stack([out.logits.float().log_softmax(-1) for out in outs]).mean(0)
        caches = {name: [getattr(out, name) for out in outs]} if use_cache else {}
        return SimpleNamespace(logits=logits, **caches)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int, eos_token_id: int, **_):
        """Greedy decoding of left-padded prompts, as ``generate`` of one LM returns it (prompt
        and new tokens; a row that wrote EOS continues with pad): what SFT's page-validity check
        asks of a policy."""
        name = cache_argument(self)
        ids, attention = input_ids, attention_mask
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
            ids, done = torch.cat([ids, token[:, None]], 1), done | (token == eos_token_id)
            if bool(done.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            positions = positions[:, -1:] + 1
            out = self(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **{name: getattr(out, name)},
            )
        return ids

    def save_pretrained(self, directory: str | Path) -> None:
        for k, member in enumerate(self.members):
            member.save_pretrained(member_dir(directory, k))
        write_ensemble_meta(directory, len(self.members))


def write_ensemble_meta(directory: str | Path, members: int) -> None:
    """Mark ``directory`` (its ``members/0..members-1`` already written) as one ensemble policy."""
    (Path(directory) / ENSEMBLE_FILE).write_text(json.dumps({"members": members}) + "\n")


def load_lm(directory: str | Path) -> nn.Module:
    """The causal LM of a policy directory: one LM, or its members as a ``MemberEnsemble``."""
    from transformers import AutoModelForCausalLM

    from pagellm.model.modeling import load_pretrained

    lms = [load_pretrained(AutoModelForCausalLM, d) for d in lm_dirs(directory)]
    return lms[0] if len(lms) == 1 else MemberEnsemble(lms)
