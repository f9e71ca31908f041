"""Hard, order-preserving top-K selection for a batch (the inference path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Greedy DPP-MAP stops growing the determinant once no remaining token's cosine residual (its
# squared distance to the span of the kept features, in (0, 1]) exceeds this.
DPP_EPS = 1e-9


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


def cosine_kernel(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cosine similarity ``[B, N, N]`` of ``features [B, N, D]`` (in ``dtype``; a zero vector is
    similar to nothing, itself included)."""
    unit = F.normalize(features.to(dtype), dim=-1)
    return unit @ unit.transpose(1, 2)


def dpp_indices(scores: torch.Tensor, features: torch.Tensor, k: int, quality_scale: float = 1.0) -> torch.Tensor:
    """Greedy DPP-MAP decode, ``[B, k]`` sorted ascending: see `dpp_order` (``k == N`` keeps every token)."""
    if k == scores.shape[-1] and features.shape[:2] == scores.shape:
        return torch.arange(k, device=scores.device).expand(scores.shape[0], k).clone()
    return dpp_order(scores, features, k, quality_scale).sort(-1).values


def dpp_ranking(scores: torch.Tensor, features: torch.Tensor, quality_scale: float = 1.0) -> torch.Tensor:
    """``[B, N]`` values whose top K is `dpp_indices` for every K (the greedy is prefix-consistent:
    its first K picks do not depend on how many more follow): N - j for the j-th pick. O(N^3)."""
    order = dpp_order(scores, features, scores.shape[-1], quality_scale)
    picks = torch.arange(scores.shape[-1], 0, -1, dtype=torch.float32, device=scores.device)
    return torch.zeros(order.shape, device=scores.device).scatter_(-1, order, picks.expand_as(order))


def topk_dpp_indices(scores: torch.Tensor, features: torch.Tensor, k: int, dpp_share: float, quality_scale: float = 1.0,
                     head_quality_scale: float | None = None) -> torch.Tensor:
    """``[B, k]`` sorted: the top ``k - floor(dpp_share * k)`` of ``scores`` (the tokens the scorer is
    surest of), then the greedy DPP-MAP conditioned on them (`dpp_order`'s ``first``) for the last
    ``floor(dpp_share * k)``: what the kept tokens do not already cover. Share 0 is `topk_indices`,
    1 is `dpp_indices`; ``k`` outside 1..N is refused by the one they call. With
    ``head_quality_scale`` the head is the greedy DPP at that scale instead of the top-K, so a
    plateau of near-equal logits is spread while a peak standing above the head tokens' redundancy
    is taken as the top-K takes it."""
    head = k - math.floor(dpp_share * k + 1e-9)
    if head == k:
        if head_quality_scale is not None:
            return dpp_indices(scores, features, k, head_quality_scale)
        return topk_indices(scores, k)
    if not head:
        return dpp_indices(scores, features, k, quality_scale)
    # the set is what conditions the DPP, not the order it is given in
    first = topk_indices(scores, head) if head_quality_scale is None else dpp_order(scores, features, head, head_quality_scale)
    return dpp_order(scores, features, k, quality_scale, first=first).sort(-1).values


def standardized_logits(scores: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` float64: each row of ``scores`` at mean 0 and unit (population) std, the
    scale-free logit z whose multiple is the DPP's quality (a constant row stays 0), so a scorer's
    logits read the same whatever their overall scale."""
    logits = scores.detach().double()
    std = logits.std(-1, unbiased=False, keepdim=True).clamp_min(1e-12)
    return (logits - logits.mean(-1, keepdim=True)) / std


def dpp_order(scores: torch.Tensor, features: torch.Tensor, k: int, quality_scale: float = 1.0,
              first: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy DPP-MAP (Chen et al., NeurIPS 2018, fast greedy MAP by incremental Cholesky) of ``k``
    tokens per row: ``[B, k]`` indices in pick order (`dpp_indices` sorts them into original order).

    The kernel is ``L = diag(q) S diag(q)``: S the cosine similarity of ``features [B, N, D]`` (the
    pre-projector visual tokens the scorer reads) and quality ``q = exp(quality_scale * z)``, z the
    row's ``scores [B, N]`` standardised (mean 0, std 1; a constant row gives pure diversity). So
    ``log det L_Y = 2 quality_scale * sum_Y z + log det S_Y``: the kept set's summed logits traded
    against the volume its features span; with orthogonal features it is the top-K of ``scores``
    for every scale. The Cholesky runs on S (well scaled) and each step adds the token with the
    largest ``log(q_i^2 r_i) = 2 quality_scale z_i + log r_i``, r_i its residual under S: the same
    choice as greedy on L, O(N K^2) per row, in float64. Deterministic: ties go to the earlier token.

    Breakdown: once no remaining token has a residual above ``DPP_EPS`` (the kept features already
    span every other one, e.g. K above the feature rank or duplicated tokens), the rest of the K
    are the highest-scored remaining tokens (top-K order). ``k`` outside 1..N is an error, as for
    `topk_indices`.

    ``first [B, m]`` (m <= k, distinct per row): the first m picks are these, whatever their gain,
    and the greedy goes on from them, so the last k - m are the DPP conditioned on that set. A
    forced token already in the span of the earlier ones adds nothing to the factor.
    """
    batch, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"budget K={k} must be between 1 and the {n} visual tokens")
    if features.shape[:2] != scores.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match scores {tuple(scores.shape)}")
    forced = 0 if first is None else first.shape[-1]
    if forced > k:
        raise ValueError(f"{forced} forced picks exceed the budget K={k}")
    device = scores.device
    logits = scores.detach().double()
    quality = 2.0 * quality_scale * standardized_logits(scores)  # log q_i^2
    similarity = cosine_kernel(features.detach(), torch.float64)  # [B, N, N]
    residual = similarity.diagonal(dim1=1, dim2=2).clone()  # r_i = S_ii - |c_i|^2
    factors = torch.zeros(batch, n, k, dtype=torch.float64, device=device)  # rows of the Cholesky factor
    rows = torch.arange(batch, device=device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=device)
    broken = torch.zeros(batch, dtype=torch.bool, device=device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=device)
    for step in range(k):
        spans = residual > DPP_EPS
        gain = torch.where(spans, quality + residual.clamp_min(DPP_EPS).log(), -torch.inf).masked_fill(taken, -torch.inf)
        broken |= ~(spans & ~taken).any(-1)
        fill = logits.masked_fill(taken, -torch.inf).argmax(-1)  # the breakdown's top-K fill
        pick = first[:, step].to(device) if step < forced else torch.where(broken, fill, gain.argmax(-1))
        chosen[:, step] = pick
        taken[rows, pick] = True
        if step + 1 == k:
            break
        # e_i = (S_ij - <c_i, c_j>) / sqrt(r_j): the new column of the Cholesky factor
        spent = residual[rows, pick] <= DPP_EPS  # only a forced pick can be in the span already
        scale = residual[rows, pick].clamp_min(DPP_EPS).sqrt()
        dot = torch.einsum("bnt,bt->bn", factors[..., :step], factors[rows, pick, :step])
        column = ((similarity[rows, pick] - dot) / scale[:, None]).masked_fill((broken | spent)[:, None], 0.0)
        factors[..., step] = column
        residual = residual - column.square()
    return chosen


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


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]`` bool: the ``k[b]`` highest ``scores`` among each row's real tokens (``valid``),
    ties to the earlier token as in `topk_indices`."""
    masked = scores.detach().float()
    if valid is not None:
        masked = masked.masked_fill(~valid.bool(), float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks < k.to(ranks.device)[:, None]


def candidate_indices(kept: torch.Tensor, extra: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row of the mask ``kept [B, N]`` (the tokens the decode keeps): those plus ``extra[b]``
    other real tokens drawn uniformly (``torch.rand``, so the caller's seed decides), sorted
    ascending. A training step that sends the LLM only these costs O(K + extra) LLM tokens instead
    of O(N)."""
    valid = torch.ones_like(kept, dtype=torch.bool) if valid is None else valid.bool()
    rows = []
    for top, more, real in zip(kept.bool(), extra.tolist(), valid):
        n, chosen = int(real.sum()), int(top.sum())
        if chosen + more >= n:
            rows.append(torch.arange(n, device=kept.device))
            continue
        priority = torch.where(top, 2.0, torch.rand(top.shape, device=top.device)).masked_fill(~real, -1.0)
        rows.append(priority.topk(chosen + more).indices.sort().values)
    return rows
