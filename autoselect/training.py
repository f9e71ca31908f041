"""The training step shared by every trainer (the single-process loop here, Ray Train later).

Only the scorer and denoiser are optimised; the loss is the frozen VLM's own next-token loss.
AdamW with cosine LR decay and the temperature schedule follow the paper (lr 2e-4).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

from autoselect.model import AutoSelectModel


def build_optimizer(model: AutoSelectModel, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def cosine_schedule(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def hold_schedule(total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, hold at the peak, cosine decay to 0 over the last
    ``decay_fraction`` of ``total_steps``: the near-hard, low-temperature phase of a run whose
    temperature anneals early trains at a useful rate instead of at a cosine's tail."""
    decay_steps = max(1, round(total_steps * decay_fraction))
    start = max(warmup_steps, total_steps - decay_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, max(0, step - start) / max(1, total_steps - start))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lr_schedule(name: str, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2) -> Callable[[int], float]:
    """``"cosine"`` (warm-up then cosine over the run) or ``"hold"`` (warm-up, hold, decay at the end)."""
    if name == "cosine":
        return cosine_schedule(total_steps, warmup_steps)
    if name == "hold":
        return hold_schedule(total_steps, warmup_steps, decay_fraction)
    raise ValueError(f"unknown LR schedule {name!r}; choose from {LR_SCHEDULES}")


LR_SCHEDULES = ("cosine", "hold")


def compute_loss(
    model: AutoSelectModel, batch: dict[str, Any], step: int, forward: Callable[..., Any] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one batch in train mode at optimiser ``step``; returns the loss and metrics.

    ``forward`` is what runs the batch (default: ``model``; a DeepSpeed engine wrapping it).
    """
    if batch.get("labels") is None:
        raise ValueError("training batches need `labels` (answer tokens; -100 elsewhere)")
    model.train()
    model.set_training_step(step)
    loss = (forward or model)(**batch).loss
    return loss, {"loss": float(loss.detach()), **model.retention_stats()}


def train(
    model: AutoSelectModel,
    batches: Iterable[dict[str, Any]],
    steps: int,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """A plain single-process loop around ``compute_loss`` (for tests, demos and small runs)."""
    optimizer = build_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup_steps))
    history: list[dict[str, float]] = []
    iterator: Iterator[dict[str, Any]] = iter(batches)
    for step in range(steps):
        loss, metrics = compute_loss(model, next(iterator), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip)
        optimizer.step()
        scheduler.step()
        metrics["lr"] = scheduler.get_last_lr()[0]
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    model.eval()
    return history
