"""SASRec (Kang & McAuley 2018) as RecBole 1.2.1 builds it: the in-house sequential baseline
(trained in ``pagellm.eval.baselines``) and the sequential view of the collaborative fine reward
(``modeling.CollaborativeReward``, ``reward.fine_sasrecs``)."""

from __future__ import annotations

import torch
from torch import nn


class SASRec(nn.Module):
    """SASRec as RecBole 1.2.1 builds it: item + position embeddings, LayerNorm and dropout on
    their sum, post-norm Transformer layers (2 heads, GELU feed-forward of 4x width, dropout 0.5
    on hidden states and attention), N(0, 0.02) init; the state at the last history item is
    scored against every item embedding. Sequences are right-padded with 0 (items shift by 1)."""

    def __init__(
        self, n_items: int, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50, dropout: float = 0.5
    ):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=1e-12
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.max_len = max_len
        self.shape = {"dim": dim, "layers": layers, "heads": heads, "max_len": max_len}  # what rebuilds it
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] right-padded -> the causal Transformer's state at every position [B, L, dim]:
        position t has read items 0..t only, so it is the state of that prefix alone."""
        length = seq.shape[1]
        h = self.drop(self.norm(self.item(seq) + self.pos(torch.arange(length, device=seq.device))[None]))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), diagonal=1)
        return self.encoder(h, mask=causal)

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """seq [B, L] right-padded, lengths [B] (>= 1) -> logits over items [B, n_items] at the
        last history item."""
        last = self.states(seq)[torch.arange(len(seq), device=seq.device), lengths - 1]
        return last @ self.item.weight[1:].T

    def window_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy over items at every trained target of windows
        (``sasrec_windows``), from one causal pass."""
        hit = labels >= 0
        return nn.functional.cross_entropy(self.states(inputs)[hit] @ self.item.weight[1:].T, labels[hit])


def right_pad(seqs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``length`` items of each sequence, right-padded with 0, and their lengths
    (an empty history keeps length 1: a state from the padding item and position 0)."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    lengths = torch.ones(len(seqs), dtype=torch.long)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[row, : len(s)] = torch.as_tensor(s)
            lengths[row] = len(s)
    return out, lengths
