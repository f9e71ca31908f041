"""Budgeted soft top-K (LapSum form): retention weights in [0, 1] that sum exactly to K.

``alpha_i = F(s_i / tau - b)`` where ``F`` is the Laplace CDF and the threshold ``b`` is the
unique root of ``sum_i F(s_i / tau - b) = K``. We find ``b`` by bisection in float64 (exact to
machine precision, batched, O(N) per iteration) and differentiate through it analytically with
the implicit-function theorem, so the backward pass is the exact Jacobian of the forward:

    d alpha_i / d r_j = f_i (delta_ij - f_j / sum_k f_k),   f = F'(r - b) > 0 everywhere.

Because ``f > 0`` for every token, every logit receives gradient, kept or not. As ``tau -> 0``
with no tie at the K-th score, ``alpha`` tends to the hard top-K mask.
"""

from __future__ import annotations

import torch

_BISECTION_STEPS = 96


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """Laplace(0, 1) CDF, written so neither branch can overflow."""
    return torch.where(
        x <= 0,
        0.5 * torch.exp(torch.clamp(x, max=0.0)),
        1.0 - 0.5 * torch.exp(torch.clamp(-x, max=0.0)),
    )


def laplace_pdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.exp(-x.abs())


def _threshold(r: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Solve ``sum_i F(r_i - b) = k`` for b per row by bisection (r float64, shape [B, N])."""
    n = valid.sum(-1, keepdim=True).to(r.dtype)
    big = torch.finfo(r.dtype).max / 4
    r_lo = torch.where(valid, r, torch.full_like(r, big)).amin(-1, keepdim=True)
    r_hi = torch.where(valid, r, torch.full_like(r, -big)).amax(-1, keepdim=True)
    # At b = lo every F(r_i - b) >= 1 - 1/(4n), so the sum exceeds any k <= n - 1/2;
    # at b = hi every F <= 1/(4n), so the sum is below any k >= 1/2.
    margin = torch.log(4 * n) + 1.0
    lo, hi = r_lo - margin, r_hi + margin
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        total = torch.where(valid, laplace_cdf(r - mid), torch.zeros_like(r)).sum(-1, keepdim=True)
        too_low = total > k  # threshold too low: too much mass kept
        lo = torch.where(too_low, mid, lo)
        hi = torch.where(too_low, hi, mid)
    return 0.5 * (lo + hi)


class _SoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        r64 = r.double()
        b = _threshold(r64, k.double(), valid)
        x = r64 - b
        alpha = torch.where(valid, laplace_cdf(x), torch.zeros_like(x))
        pdf = torch.where(valid, laplace_pdf(x), torch.zeros_like(x))
        full = k.double() >= valid.sum(-1, keepdim=True)  # K == N: everything kept, no freedom left
        alpha = torch.where(full & valid, torch.ones_like(alpha), alpha)
        ctx.save_for_backward(pdf)
        return alpha.to(r.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (pdf,) = ctx.saved_tensors
        g = grad.double()
        mean_g = (g * pdf).sum(-1, keepdim=True) / pdf.sum(-1, keepdim=True).clamp_min(1e-300)
        return (pdf * (g - mean_g)).to(grad.dtype), None, None


def soft_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable retention weights for the top ``k`` of ``scores`` along the last dim.

    Args:
        scores: ``[..., N]`` scorer logits.
        k: budget per row (int, or a tensor broadcastable to ``[..., 1]``); 1 <= k <= N.
        temperature: divides the scores; lower is closer to the hard top-K.
        valid: optional ``[..., N]`` bool mask of real (non-padding) tokens; padding gets 0.

    Returns:
        ``alpha`` with ``alpha.sum(-1) == k`` and every entry in [0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = scores.shape
    r = (scores / temperature).reshape(-1, shape[-1])
    valid_2d = (
        torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(-1, shape[-1]).bool()
    )
    k_t = torch.as_tensor(k, device=r.device).reshape(-1, 1).expand(r.shape[0], 1)
    n_valid = valid_2d.sum(-1, keepdim=True)
    if bool((k_t <= 0).any()) or bool((k_t > n_valid).any()):
        raise ValueError(f"soft_topk budget must satisfy 1 <= k <= N (N={shape[-1]}), got {k}")
    return _SoftTopK.apply(r, k_t, valid_2d).reshape(shape)
