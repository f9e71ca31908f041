"""Scorer: a few transformer blocks with global attention over the visual tokens, then a
linear head giving one logit per token. It sees visual tokens only (query-agnostic), before
the projector, so it can run once per image and be cached by a server."""

from __future__ import annotations

import torch
from torch import nn


class Scorer(nn.Module):
    def __init__(
        self,
        vision_width: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(vision_width)
        self.proj_in = nn.Linear(vision_width, width) if width != vision_width else nn.Identity()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=width,
                nhead=heads,
                dim_feedforward=int(width * mlp_ratio),
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [B, N, D]`` -> logits ``[B, N]``; padding (``valid == False``) gets -inf."""
        padding = None if valid is None else ~valid.bool()
        h = self.proj_in(self.norm_in(tokens.to(self.head.weight.dtype)))  # the scorer's own dtype (float32)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=padding)
        logits = self.head(self.norm_out(h)).squeeze(-1)
        if padding is not None:
            logits = logits.masked_fill(padding, float("-inf"))
        return logits
