"""What each Ray Train worker runs: DeepSpeed over the AutoSelect model, fed by its data shard.

Only the scorer and denoiser are handed to DeepSpeed's optimiser; the frozen VLM is loaded once
per worker and never checkpointed (``exclude_frozen_parameters=True``). Checkpoints hold the
DeepSpeed state (weights, optimiser, LR scheduler), the step and the data position, plus the
AutoSelect folder (``autoselect/``) that registration and serving use.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import mlflow
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from autoselect import AutoSelectModel
from autoselect.data import collate
from autoselect.training import compute_loss, lr_schedule
from mlops import backbone
from pipelines.training.build_locks import warn_if_stale
from pipelines.training.config_io import from_mapping
from pipelines.preprocessing.shards import examples_from_table
from pipelines.training import AUTOSELECT_DIR
from pipelines.training.config import TrainConfig

CHECKPOINT_TAG = "state"


def load_vlm(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    return backbone.load_vlm(config.model.path, config.model.dtype, device, config.model.trust_remote_code)


def initial_model(config: TrainConfig, device: torch.device) -> AutoSelectModel:
    """The frozen VLM with the step-0 scorer and denoiser, drawn from ``optim.seed``: the same on
    every rank, and what a test compares a trained scorer with. ``model.gradient_checkpointing``
    checkpoints the LLM's decoder layers (the VLM stays in eval mode)."""
    vlm = load_vlm(config, device)
    torch.manual_seed(config.optim.seed)
    model = AutoSelectModel.attach(vlm, config.autoselect_config())
    return model.enable_gradient_checkpointing() if config.model.gradient_checkpointing else model


def seed_worker(seed: int, rank: int) -> None:
    """``seed + rank`` for the training draws (gate noise, Gumbel noise): ranks sharing one seed
    would draw identical noise on their different examples, halving the noise the scorer sees."""
    torch.manual_seed(seed + rank)


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """fp32 DeepSpeed: the only trained parameters (scorer, denoiser) are float32 whatever dtype the
    frozen VLM runs in, so DeepSpeed's bf16 mode (bf16 parameters, fp32 master copy) is not wanted."""
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused one would need a JIT build (and CUDA)
            "params": {"lr": config.optim.lr, "weight_decay": config.optim.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }


def batches(
    shard, batch_size: int, pad_token_id: int, skip: int, shuffle_buffer: int = 0, shuffle_seed: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of collated batches from this worker's shard, skipping the first ``skip``; the
    rows come with their image tensors (``pipelines.train.training_input``). ``shuffle_buffer > 0``
    shuffles them over that many rows, the same way for the same ``shuffle_seed``."""
    shuffle = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": shuffle_seed} if shuffle_buffer else {}
    tables = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True, **shuffle)
    for index, table in enumerate(tables):
        if index < skip:
            continue
        yield collate(examples_from_table(table), pad_token_id)


@contextlib.contextmanager
def full_parameters(model: AutoSelectModel, zero_stage: int):
    """ZeRO-3 shards parameters across ranks: gather the trainable ones to save them."""
    if zero_stage < 3:
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = from_mapping(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = initial_model(config, device)
    seed_worker(config.optim.seed, rank)
    if device.type == "cpu":
        warn_if_stale()  # else a lock left by a killed build hangs the next line without a word
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # reuses Ray's group
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(config.optim.schedule, config.optim.steps, config.optim.warmup_steps, config.optim.decay_fraction)
        ),
    )

    step, epoch, skip, resumed_from = 0, 0, 0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with restored(checkpoint) as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=False)
        step, epoch, skip = client_state["step"], client_state["epoch"], client_state["batch_in_epoch"]
        resumed_from = step

    if rank == 0:
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        mlflow.start_run(run_id=loop_config["run_id"], log_system_metrics=config.mlflow.log_system_metrics)
        if resumed_from >= 0:
            mlflow.set_tag("resumed_from_step", str(resumed_from))
    shard = ray.train.get_dataset_shard("train")
    pad = model.adapter.pad_token_id

    while step < config.optim.steps:
        batch_in_epoch = skip
        produced = False
        seed = (config.optim.seed * 1_000_003 + epoch) * 1_009 + rank  # per run, epoch and rank
        for batch in batches(shard, config.data.batch_size, pad, skip, config.data.shuffle_buffer, seed):
            produced = True
            started = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, metrics = compute_loss(model, batch, step, forward=engine)
            engine.backward(loss)
            engine.step()
            step += 1
            batch_in_epoch += 1
            tokens = torch.tensor([float(batch["attention_mask"].sum()), float(loss.detach())], device=device)
            dist.all_reduce(tokens)
            metrics.update(
                loss=float(tokens[1]) / world,
                lr=engine.get_lr()[0],
                tokens_per_s=float(tokens[0]) / max(time.perf_counter() - started, 1e-9),
                step=step,
                epoch=epoch,
                resumed_from_step=resumed_from,
            )
            save = step % config.optim.checkpoint_every == 0 or step == config.optim.steps
            if save:
                report_checkpoint(engine, model, config, metrics, step, epoch, batch_in_epoch, rank)
            elif step % config.optim.log_every == 0:
                ray.train.report(metrics)
            if rank == 0 and (save or step % config.optim.log_every == 0):
                mlflow.log_metrics({k: v for k, v in metrics.items() if k not in ("step", "epoch")}, step=step)
            if step >= config.optim.steps:
                break
        if not produced:
            raise ValueError(f"the training data yields no full batch of {config.data.batch_size} per worker")
        epoch, skip = epoch + 1, 0
    if rank == 0:
        mlflow.end_run()


@contextlib.contextmanager
def restored(checkpoint: ray.train.Checkpoint) -> Iterator[str]:
    """The checkpoint downloaded into a directory of this worker's own, removed on exit.

    ``Checkpoint.as_directory`` shares one temporary folder per checkpoint among the processes of
    a node: when one rank finishes and deletes it just as another rank starts its download, the
    second fails ("Checkpoint directory ... does not exist, even though it should have been
    created by another process"). Ranks that resume together on one node hit that window; a
    private folder costs one more download of a small (trainable-only) checkpoint and no race.
    """
    with tempfile.TemporaryDirectory(prefix="autoselect-restore-") as directory:
        yield checkpoint.to_directory(directory)


def report_checkpoint(engine, model: AutoSelectModel, config: TrainConfig, metrics: dict, step: int, epoch: int, batch_in_epoch: int, rank: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(
            directory,
            tag=CHECKPOINT_TAG,
            client_state={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch},
            exclude_frozen_parameters=True,
        )
        with full_parameters(model, config.deepspeed.zero_stage):
            if rank == 0:
                model.save_pretrained(Path(directory) / AUTOSELECT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
