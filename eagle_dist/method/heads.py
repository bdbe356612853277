"""Trainable heads on top of the frozen keys (ALGORITHM.md 3.2-3.3).

SegHead:        S = cluster1(Drop(K)) + cluster2(Drop(K)), two independent Dropout2d masks.
ProjectionHead: Z = L2-normalise(Linear(S)) per pixel, flattened to [(B*N), D] in (b, row, col)
                order, as the object-centric loss expects.

Parameter names follow the official checkpoint (``cluster1.0.*``, ``cluster2.0.*``,
``cluster2.2.*``) so that official head weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegHead(nn.Module):
    def __init__(self, in_channels: int, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(in_channels, dim, 1))
        self.cluster2 = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(), nn.Conv2d(in_channels, dim, 1)
        )
        # One module, called once per mask: every call draws a fresh whole-channel mask.
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        return self.cluster1(self.drop(feats_BCHW)) + self.cluster2(self.drop(feats_BCHW))

    def dropped(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        """K-hat: the features the losses see, under a third independent mask (no gradient)."""
        with torch.no_grad():
            return self.drop(feats_BCHW)


class ProjectionHead(nn.Module):
    def __init__(self, dim: int = 512):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, code_BDHW: torch.Tensor) -> torch.Tensor:
        pixels = code_BDHW.permute(0, 2, 3, 1).reshape(-1, code_BDHW.shape[1])
        return F.normalize(self.linear(pixels), dim=1)
