"""Token drop for alignment: teach the shared backbone to read an image from a subset of its tokens.

A 135M LM aligned on all 256 tokens reads a pruned image far worse than a 7B LLaVA does: on the
plain scenes every 28-token selection, the oracle included, loses about a third of full-token
accuracy (docs/scenes.md), so no selector can reach the paper's 95 %. Here a share of the
alignment examples sees only some of its visual tokens, re-packed as at inference. The subsets
know nothing of the answer or of any pruner: half are scattered (uniformly random tokens), half a
random window of the patch grid (a clustered subset, the shape learned selectors keep), so the
backbone every method shares is not tilted toward one of them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from autoselect.placeholders import prune_placeholders
from autoselect.pruners.uniform import square_side


@dataclass(frozen=True)
class TokenDrop:
    prob: float = 0.0  # share of examples that see a subset; 0 turns token drop off
    keep_min: float = 1 / 16  # fewest tokens kept, as a fraction of N
    keep_max: float = 1 / 2  # most tokens kept, as a fraction of N

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"token drop probability must be in [0, 1], got {self.prob}")
        if not 0.0 < self.keep_min <= self.keep_max <= 1.0:
            raise ValueError(f"token drop keeps a fraction in (0, 1] with min <= max, got {self.keep_min}..{self.keep_max}")


def window(rng: random.Random, side: int, count: int) -> list[int]:
    """Row-major indices of a random rectangle of about ``count`` cells in a ``side x side`` grid
    (aspect ratio between 1:2 and 2:1)."""
    height = min(side, max(1, round(math.sqrt(count) * 2 ** rng.uniform(-0.5, 0.5))))
    width = min(side, max(1, round(count / height)))
    top, left = rng.randrange(side - height + 1), rng.randrange(side - width + 1)
    return [(top + r) * side + left + c for r in range(height) for c in range(width)]


def sample_subsets(rng: random.Random, batch: int, n_tokens: int, drop: TokenDrop) -> list[torch.Tensor]:
    """Per example, the sorted visual-token indices it keeps (all ``n_tokens`` for those not dropped)."""
    side = square_side(n_tokens, "token drop")
    low, high = max(1, round(drop.keep_min * n_tokens)), max(1, round(drop.keep_max * n_tokens))
    subsets = []
    for _ in range(batch):
        if rng.random() >= drop.prob:
            subsets.append(torch.arange(n_tokens))
            continue
        count = rng.randint(low, high)
        kept = window(rng, side, count) if rng.random() < 0.5 else rng.sample(range(n_tokens), count)
        subsets.append(torch.tensor(sorted(kept)))
    return subsets


def drop_tokens(
    batch: dict[str, torch.Tensor], projected: torch.Tensor, subsets: list[torch.Tensor], image_token_id: int, pad_token_id: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The batch with each image's placeholders cut to its subset (re-packed positions, as the
    evaluation's ``repack`` policy), and each image's kept embeddings."""
    n_tokens = projected.shape[1]
    text = prune_placeholders(
        batch["input_ids"], subsets, image_token_id, [n_tokens] * len(subsets),
        attention_mask=batch["attention_mask"], labels=batch["labels"], position_policy="repack", pad_token_id=pad_token_id,
    )
    return text.as_kwargs(), [tokens[kept] for tokens, kept in zip(projected, subsets)]
