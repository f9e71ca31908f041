"""Denoiser: transformer blocks whose attention mask is the identity ("diagonal attention").

With a token allowed to attend only to itself the softmax is exactly 1, so attention reduces to
``W_O W_V x`` per token: we compute it that way, without an N x N matrix (and without the
query/key weights, which could never receive gradient). No information moves between tokens,
so the denoiser can restore the feature distribution the frozen projector expects but cannot
copy content from kept tokens into noised ones. Train-only: removed at inference.
"""

from __future__ import annotations

import torch
from torch import nn

_OUT_INIT_STD = 1e-3  # near-identity at start: training begins from the plain gated tokens


class DiagonalAttentionBlock(nn.Module):
    def __init__(self, width: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm_attn = nn.LayerNorm(width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.dropout = nn.Dropout(dropout)
        for out in (self.o_proj, self.mlp[-1]):
            nn.init.normal_(out.weight, std=_OUT_INIT_STD)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.o_proj(self.v_proj(self.norm_attn(x))))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class Denoiser(nn.Module):
    def __init__(self, width: int, layers: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DiagonalAttentionBlock(width, mlp_ratio, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
