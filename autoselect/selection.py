"""Hard, order-preserving top-K selection for a batch (the inference path)."""

from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores [B, N]`` per row, sorted ascending (original order).

    Ties are broken towards the earlier token, so the result is deterministic.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"budget K={k} must be between 1 and the {n} visual tokens")
    # A stable descending sort breaks ties towards the earlier token on every device.
    idx = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return idx.sort(dim=-1).values


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, D]``, ``indices [B, K]`` -> ``[B, K, D]``."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def pad_tokens(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[N_i, D]`` per image -> ``[num_images, max N_i, D]`` (zero padded) and the bool mask of real tokens."""
    padded = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    lengths = torch.tensor([len(t) for t in tokens], device=padded.device)
    valid = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
    return padded, valid


def mass_budget(scores: torch.Tensor, share: float, min_tokens: int = 1) -> int:
    """The fewest top tokens of ``scores [N]`` whose softmax probability mass reaches ``share``."""
    mass = torch.softmax(scores.float(), dim=-1).sort(descending=True).values.cumsum(-1)
    k = int((mass < share - 1e-6).sum()) + 1  # the first prefix whose mass reaches the share
    return max(min(min_tokens, scores.shape[-1]), min(k, scores.shape[-1]))


def seeded_ranking(scores: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """``scores [..., N]`` plus ``noise`` times one Gumbel vector per token position drawn from
    ``seed``: its top K is a seeded sample of the scorer's selection policy (``noise = 0``: the
    scores themselves, the paper's top-K). Depends on the position only, so it is batch-invariant."""
    if not noise:
        return scores
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(scores.shape[-1], generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    return scores.double() + noise * gumbel.to(scores.device)


def candidate_indices(scores: torch.Tensor, k: torch.Tensor, extra: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row of ``scores [B, N]``: its top ``k[b]`` plus ``extra[b]`` other real tokens drawn
    uniformly (``torch.rand``, so the caller's seed decides), sorted ascending. A training step
    that sends the LLM only these costs O(K + extra) LLM tokens instead of O(N)."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    rows = []
    for row, kept, more, real in zip(scores.detach().float(), k.tolist(), extra.tolist(), valid):
        n = int(real.sum())
        if kept + more >= n:
            rows.append(torch.arange(n, device=scores.device))
            continue
        top = torch.zeros_like(real)
        top[torch.sort(row.masked_fill(~real, -torch.inf), descending=True, stable=True).indices[:kept]] = True
        priority = torch.where(top, 2.0, torch.rand(row.shape, device=row.device)).masked_fill(~real, -1.0)
        rows.append(priority.topk(kept + more).indices.sort().values)
    return rows
