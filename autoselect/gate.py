"""Variance-preserving noise gate: ``x~ = sqrt(a) * x + sqrt(1 - a) * eps``.

A token with retention ``a ~ 1`` passes unchanged; ``a ~ 0`` replaces its content with noise.
Unlike a scale gate ``a * x``, the token keeps its feature scale, so normalisation layers
downstream cannot undo the restriction, and the output is differentiable in ``a`` for every
token (noise held fixed), which is how the scorer gets gradient from dropped tokens.
"""

from __future__ import annotations

import torch

_SQRT_EPS = 1e-20
# A dropped token's attention weight in the straight-through forward: small enough that the
# sequence is the pruned one (its share of attention is 1e-6 of a kept token's), large enough
# that the attention logits stay finite and the backward sees the token's marginal value.
STRAIGHT_THROUGH_FLOOR = 1e-6


def vp_noise_gate(
    x: torch.Tensor,
    alpha: torch.Tensor,
    noise: torch.Tensor | None = None,
    standardize: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate tokens ``x [B, N, D]`` with retention weights ``alpha [B, N]``.

    With ``standardize`` the gate acts on ``(x - mu) / sigma`` with per-channel statistics of
    the batch (detached), and maps back, i.e. ``mu + sqrt(a)(x - mu) + sqrt(1-a) sigma eps``:
    the exact paper form for unit-variance features, and variance-preserving for any others.
    ``noise`` defaults to fresh standard normal noise for every token and channel.
    """
    if noise is None:
        noise = torch.randn_like(x)
    a = alpha.to(x.dtype).clamp(0.0, 1.0).unsqueeze(-1)
    # sqrt has an infinite slope at 0; at low temperature alpha saturates to exactly 0 or 1 in
    # float32, and inf * 0 from the soft top-K Jacobian would turn the whole update into NaN.
    keep, mix = a.clamp_min(_SQRT_EPS).sqrt(), (1.0 - a).clamp_min(_SQRT_EPS).sqrt()
    if not standardize:
        return keep * x + mix * noise
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1]) if valid is None else x[valid.bool()]
        mu = flat.mean(0)
        sigma = flat.std(0, unbiased=False).clamp_min(1e-6) if flat.shape[0] > 1 else torch.ones_like(mu)
    return mu + keep * (x - mu) + mix * sigma * noise


def throttled_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    alpha: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Causal 4D additive mask ``[B, 1, L, L]`` in which every visual column ``i`` carries the
    bias ``log alpha_i`` (text columns 0; padding and the future: the dtype's minimum).

    Why: the noise gate alone trains the scorer on a sequence that still holds all N visual
    columns (noised), while inference shows the LLM only the K kept ones. With this bias a token's
    share of attention scales with ``alpha_i`` (proportional attention), so as the temperature
    falls the training sequence becomes the hard-pruned sequence inference runs. ``alpha`` holds
    the retention weights of the placeholder columns in row-major order (one per placeholder).
    """
    rows, length = input_ids.shape
    placeholders = input_ids == image_token_id
    if int(placeholders.sum()) != alpha.numel():
        raise ValueError(
            f"attention throttling needs one retention weight per image placeholder: the text has "
            f"{int(placeholders.sum())} placeholders but the scorer weighed {alpha.numel()} tokens "
            "(this backbone fills placeholders that hold no scored token)"
        )
    floor = torch.finfo(dtype).min
    bias = torch.zeros(rows, length, dtype=alpha.dtype, device=alpha.device)
    bias = bias.masked_scatter(placeholders, alpha.clamp_min(_SQRT_EPS).log())
    allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return torch.where(allowed, bias[:, None, :].to(dtype), torch.tensor(floor, dtype=dtype, device=bias.device))[:, None]


def straight_through_kept(alpha: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Hard retention ``[B, N]`` in the forward (1 where ``kept``, the set inference's decode keeps,
    `STRAIGHT_THROUGH_FLOOR` elsewhere), with the gradient of the soft weights ``alpha``.

    Why: used as the attention throttle, the forward is the hard-pruned sequence inference runs,
    and ``dL/d alpha_i`` of a dropped token is finite (``log`` of the floor, not of 0): the loss
    change of letting token ``i`` back in next to the kept ones.
    """
    hard = torch.where(kept.to(alpha.device), 1.0, STRAIGHT_THROUGH_FLOOR).to(alpha.dtype)
    return hard + (alpha - alpha.detach())
