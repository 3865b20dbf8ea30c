"""The Multi-VAE network (Liang et al. 2018): the in-house baseline (trained in
``pagellm.eval.baselines``) and the collaborative fine reward (``modeling.CollaborativeReward``)."""

from __future__ import annotations

import torch
from torch import nn


class MultiVAE(nn.Module):
    """[items] -> 600 -> (mu, logvar) 200 -> 600 -> [items] logits, tanh, input dropout 0.5."""

    def __init__(self, n_items: int, hidden: int = 600, latent: int = 200, dropout: float = 0.5):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_items, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, n_items))
        self.drop, self.latent = nn.Dropout(dropout), latent

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.drop(nn.functional.normalize(x, dim=1)))
        mu, logvar = h[:, : self.latent], h[:, self.latent :]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        return self.decoder(z), kl
