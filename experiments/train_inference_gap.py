"""How far the training forward of a scorer is from the inference forward it is trained for.

On held-out answers of the packaged corpora (Fashion-MNIST questions by default), the mean answer
NLL of the frozen VLM under: all tokens; the hard top-K inference path (the scorer, and random);
the training path (soft top-K + VP noise gate + denoiser) at the final temperature and at a
near-zero one; the training path with all N tokens kept (what the denoiser does to clean tokens).
A large gap between "train path, tau -> 0" and "inference, hard top-K" means the scorer is trained
on a sequence the LLM never sees at inference (see `AutoSelectConfig.training.gate_attention`).

    python experiments/train_inference_gap.py --model .cache/backbones/mini-llava-aligned \
        --autoselect models:/autoselect-mini-llava-results/1 [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from autoselect import AutoSelectModel
from autoselect.pruners.random import RandomPruner
from mlops.backbone import load_autoselect, load_vlm_and_processor
from pipelines.evaluation.scoring import encode_rows, heldout_task
from pipelines.evaluation.tasks.base import Example
from results_file import write_result

NEAR_ZERO = 1e-4


def mean_loss(batches: list[dict], forward: Callable[[dict], torch.Tensor], seed: int) -> float:
    losses = []
    with torch.no_grad():
        for batch in batches:
            torch.manual_seed(seed)  # the same gate noise for every path
            losses.append(float(forward(batch)))
    return sum(losses) / len(losses)


def add_heldout_arguments(parser: argparse.ArgumentParser) -> None:
    """The backbone, held-out task and output options every answer-NLL bench shares."""
    parser.add_argument("--model", default=".cache/backbones/mini-llava-aligned")
    parser.add_argument("--task", default="fmnist_vqa")
    parser.add_argument("--corpora", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on GPU / native-bf16 CPUs, else float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def report(result: dict, label: str, out: Path | None) -> None:
    """Print the JSON and a markdown table of ``result["answer_nll"]``; write the JSON to ``out``."""
    print(json.dumps(result, indent=2))
    print(f"\n| {label} | answer NLL |\n|---|---|")
    for name, value in result["answer_nll"].items():
        print(f"| {name} | {value:.3f} |")
    write_result(out, result)


def heldout_batches(vlm, processor, task: str, corpora: Path, limit: int, seed: int) -> tuple[list[Example], list[dict]]:
    """The held-out examples of ``task`` and their answer-labelled batches of 8."""
    examples = heldout_task(vlm, processor, task, corpora, limit, seed).examples
    return examples, [encode_rows(processor, [(e, e.answer) for e in examples[i : i + 8]]) for i in range(0, len(examples), 8)]


def measure(model: AutoSelectModel, batches: list[dict], budget: int, seed: int) -> dict[str, float]:
    vlm, config = model.vlm, model.config
    random_pruner = RandomPruner(vlm, budget, seed=seed, position_policy=config.position_policy)
    rows: dict[str, float] = {"all tokens": mean_loss(batches, lambda b: vlm(**b).loss, seed)}
    rows["inference: scorer hard top-K"] = mean_loss(batches, lambda b: model.eval()(budget=budget, **b).loss, seed)
    rows["inference: random hard top-K"] = mean_loss(batches, lambda b: random_pruner(**b).loss, seed)
    model.train().set_training_step(10**9)
    rows[f"train path, tau = {config.temperature_end:g}"] = mean_loss(batches, lambda b: model(budget=budget, **b).loss, seed)
    end = config.temperature_end
    config.temperature_end = NEAR_ZERO
    try:
        rows["train path, tau -> 0"] = mean_loss(batches, lambda b: model(budget=budget, **b).loss, seed)
    finally:
        config.temperature_end = end
    n = len(model.visual_tokens(**model.split_inputs(dict(batches[0]))[0])[0])
    rows["train path, all N kept (denoiser only)"] = mean_loss(batches, lambda b: model(budget=n, **b).loss, seed)
    model.eval()
    return {name: round(value, 4) for name, value in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoselect", required=True, help="save_pretrained folder or models:/name/version")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--budget", type=int, default=None, help="K (default: the scorer's trained budget)")
    add_heldout_arguments(parser)
    args = parser.parse_args(argv)

    started = time.time()
    vlm, processor = load_vlm_and_processor(args.model, args.dtype, torch.device("cpu"))
    model, info = load_autoselect(args.autoselect, vlm, args.tracking_uri)
    budget = args.budget or int(model.config.budget)
    try:
        examples, batches = heldout_batches(vlm, processor, args.task, args.corpora, args.limit, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = measure(model, batches, budget, args.seed)
    result = {"model": args.model, "autoselect": info, "gate_attention": model.config.training.gate_attention, "task": args.task,
              "examples": len(examples), "budget": budget, "dtype": args.dtype, "answer_nll": rows,
              "seconds": round(time.time() - started, 1)}
    report(result, f"path (K = {budget})", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
