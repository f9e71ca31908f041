"""Stage-1 alignment loop: encoder and LM frozen, only the projector trained on answer tokens.

Frozen parts run in ``compute_dtype`` (bf16 halves a CPU step) while the projector keeps float32
master weights and AdamW state. Batches are left-padded so every answer ends the sequence; the
LM head then runs only on the tail that holds answers (``logits_to_keep``) instead of on all
~300 positions x 49k vocabulary.

With ``lora_rank > 0`` a LoRA on the LM's attention, or ``lora_targets`` (``pipelines/align/lora.py``, PEFT) trains
jointly with the projector, in its own AdamW group (``lora_lr``); the base LM stays frozen.
With ``token_drop.prob > 0`` that share of examples sees a subset of its visual tokens
(``pipelines/align/token_drop.py``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from autoselect.backbones import get_adapter
from minillava.aligned import projector_module
from minillava.lora import DEFAULT_TARGETS
from autoselect.data import collate
from autoselect.placeholders import IGNORE_INDEX
from autoselect.training import cosine_schedule
from pipelines.align.features import EncodedRecords
from pipelines.align.token_drop import TokenDrop, drop_tokens, sample_subsets


@dataclass
class TrainConfig:
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    compute_dtype: str = "bfloat16"
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> share of each batch; empty: by count
    lora_rank: int = 0  # > 0: also train a LoRA of this rank on the LM's attention (8 is a good start); 0: projector only
    lora_alpha: float | None = None  # LoRA scale alpha / rank; None: 2 x rank (16 for rank 8)
    lora_lr: float | None = None  # peak LR of the LoRA group (same schedule); None: ``lr``
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # linears of the LM's layers to adapt (attention; + MLP: minillava.lora.TARGET_GROUPS)
    token_drop: TokenDrop = field(default_factory=TokenDrop)  # examples that see only some visual tokens


def task_batches(records: Sequence[dict], weights: dict[str, float], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of record indices: each slot picks a task by ``weights``, then the next
    record of that task from a reshuffled-every-epoch order (seeded, so runs repeat exactly)."""
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(record["task"], []).append(i)
    tasks = sorted(by_task)
    missing = sorted(set(weights) - set(tasks))
    if missing:
        raise ValueError(f"task weights for {missing}, which have no training records (tasks: {tasks})")
    shares = [weights.get(t, 0.0) if weights else len(by_task[t]) for t in tasks]
    if sum(shares) <= 0:
        raise ValueError("task weights must put weight on at least one task")
    rng = random.Random(seed)
    orders: dict[str, list[int]] = {t: [] for t in tasks}
    while True:
        batch = []
        for task in rng.choices(tasks, weights=shares, k=batch_size):
            if not orders[task]:
                orders[task] = rng.sample(by_task[task], len(by_task[task]))
            batch.append(orders[task].pop())
        yield batch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (0 on pad slots)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def answer_loss(vlm, batch: dict[str, torch.Tensor], projected: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on the labelled (answer) tokens of a left-padded batch."""
    labels = batch["labels"]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled) == 0:
        raise ValueError("the batch has no answer tokens")
    keep = labels.shape[1] - int(labelled[0]) + 1  # from the position that predicts the first answer token
    outputs = vlm(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids(batch["attention_mask"]),
        mm_encoder_outputs=get_adapter(vlm).encoder_outputs(projected),
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, -keep + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def freeze_all_but_projector(vlm, compute_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Everything frozen in ``compute_dtype``; the projector trainable in float32, with the exact
    float32 weights it had (a projector loaded to continue from is not rounded through bf16)."""
    vlm.requires_grad_(False)
    projector = projector_module(vlm)
    weights = {k: v.detach().to(torch.float32, copy=True) for k, v in projector.state_dict().items()}
    vlm.to(compute_dtype)
    projector.to(torch.float32).load_state_dict(weights)
    projector.requires_grad_(True)
    return list(projector.parameters())


def _lora_weights(vlm) -> dict[str, torch.Tensor]:
    """Float32 copies of an attached LoRA adapter's weights (found without importing PEFT)."""
    return {n: p.detach().to(torch.float32, copy=True) for n, p in vlm.model.language_model.named_parameters() if "lora_" in n}


def _no_lora(attached: dict[str, torch.Tensor]) -> list[torch.nn.Parameter]:
    if attached:
        raise ValueError("the language model carries a LoRA adapter but config.lora_rank is 0")
    return []


def _lora_for_training(vlm, config: TrainConfig, attached: dict[str, torch.Tensor]) -> list[torch.nn.Parameter]:
    """On the frozen VLM, attach a fresh LoRA to the LM (or keep the one already attached, e.g. by
    ``load_lora`` to continue a run, if its settings match ``config``, with its exact float32
    weights ``attached``); returns the adapter's float32 trainable parameters."""
    from minillava.lora import LoraSettings
    from pipelines.align.lora import add_lora, attached_settings, lora_parameters  # PEFT only when asked for

    wanted = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_targets)
    settings = attached_settings(vlm)
    if settings is None:
        return add_lora(vlm, wanted)
    if settings != wanted:
        raise ValueError(f"the attached LoRA adapter has {settings}, the config asks for {wanted}")
    params = lora_parameters(vlm)
    with torch.no_grad():
        for name, param in vlm.model.language_model.named_parameters():
            if name in attached:
                param.copy_(attached[name])
    return params


def train_projector(
    vlm,
    encoded: EncodedRecords,
    config: TrainConfig,
    pad_token_id: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``config.steps`` optimiser steps; returns per-step ``loss``, ``lr``, ``seconds`` (and
    ``lora_lr``). With ``config.lora_rank > 0`` the LoRA stays attached (unmerged) to ``vlm``
    afterwards: ``pipelines.align.lora.save_lora`` writes it."""
    if encoded.features is None:
        raise ValueError("encoded records carry no vision features; compute them first")
    dtype = getattr(torch, config.compute_dtype)
    attached = _lora_weights(vlm)  # float32 copies: freezing casts an attached adapter to `dtype`
    params = freeze_all_but_projector(vlm, dtype)
    lora_params = _lora_for_training(vlm, config, attached) if config.lora_rank > 0 else _no_lora(attached)
    projector = projector_module(vlm)
    vlm.eval()  # no dropout anywhere; the projector has none either, LoRA dropout is 0
    groups = [{"params": params, "lr": config.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lr if config.lora_lr is None else config.lora_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    batches = task_batches(encoded.records, config.task_weights, config.batch_size, config.seed)
    drop_rng = random.Random(f"token-drop-{config.seed}")  # its own stream: batches stay those of a run without it
    image_token_id = get_adapter(vlm).image_token_id
    history: list[dict[str, float]] = []
    progress = tqdm(range(config.steps), desc="align", unit="step")
    for step in progress:
        started = time.perf_counter()
        rows = next(batches)
        batch = collate(
            [{"input_ids": encoded.input_ids[i], "labels": encoded.labels[i]} for i in rows], pad_token_id, padding_side="left"
        )
        features = encoded.features[[encoded.image_index[i] for i in rows]].to(torch.float32)
        projected = projector(features).to(dtype)
        if config.token_drop.prob > 0:
            subsets = sample_subsets(drop_rng, len(rows), projected.shape[1], config.token_drop)
            batch, projected = drop_tokens(batch, projected, subsets, image_token_id, pad_token_id)
        loss = answer_loss(vlm, batch, projected)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        lora_lr = optimizer.param_groups[-1]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params + lora_params, config.grad_clip) if config.grad_clip else torch.tensor(math.nan)
        optimizer.step()
        scheduler.step()
        metrics = {
            "step": step,
            "loss": float(loss.detach()),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - started,
        }
        if lora_params:
            metrics["lora_lr"] = lora_lr
        history.append(metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        if on_step is not None:
            on_step(step, metrics)
    return history
