"""Which hand-made K-subsets of an image's visual tokens the frozen VLM answers best from.

A ceiling check for a learned scorer: on held-out Fashion-MNIST questions, the mean answer NLL
with K tokens kept by rules that need no training (the brightest patches, i.e. the garment; the
darkest, i.e. the background; the highest / lowest feature norm; random; foreground at random;
the sharpest patches, i.e. the outline; the uniform lattice), under both position policies or one.
If the "obvious" subsets lose to random, the VLM reads the image from the mix of tokens, not from
the object alone, and a query-agnostic top-K ranking has little to gain over random on this
backbone. Each rule minus random is paired over the batches of 8 (the same examples in each).

    python experiments/fixed_selections.py [--model .cache/backbones/mini-llava-aligned] [--budget 28] [--limit 40] \
      [--rules "uniform,sharpest (outline)"] [--policy repack|original|both]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoselect.pruned import PrunedVLM, Selection
from autoselect.pruners.uniform import grid_indices
from autoselect.selection import topk_indices
from mlops.backbone import load_vlm_and_processor
from pipelines.evaluation.report import paired_difference
from train_inference_gap import add_heldout_arguments, heldout_batches, mean_loss, report

Rule = Callable[[torch.Tensor, dict[str, Any], torch.Generator], torch.Tensor]


def patch_means(tokens: torch.Tensor, image_inputs: dict[str, Any], power: int = 1) -> torch.Tensor:
    """Mean of the gray pixel values (to ``power``) over each patch (row-major, the visual tokens'
    order; square grid)."""
    gray = image_inputs["pixel_values"].float().mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(gray**power, int(tokens.shape[1] ** 0.5)).flatten(1)


def patch_brightness(tokens: torch.Tensor, image_inputs: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Mean pixel value of each patch."""
    return patch_means(tokens, image_inputs)


def foreground_at_random(tokens: torch.Tensor, image_inputs: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    bright = patch_brightness(tokens, image_inputs, generator)
    return (bright > bright.median(-1, keepdim=True).values).float() + torch.rand(bright.shape, generator=generator)


def patch_sharpness(tokens: torch.Tensor, image_inputs: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Pixel standard deviation inside each patch: highest where an edge crosses it (the garment's
    outline against the background), low on flat background and flat fabric."""
    return (patch_means(tokens, image_inputs, 2) - patch_means(tokens, image_inputs) ** 2).clamp_min(0).sqrt()


def lattice(budget: int) -> Rule:
    """The uniform baseline's K patches (`grid_indices`) as a rule: 1 on them, 0 elsewhere."""

    def rule(tokens: torch.Tensor, image_inputs: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        side = int(tokens.shape[1] ** 0.5)
        scores = torch.zeros(tokens.shape[:2])
        scores[:, grid_indices(budget, side, side)] = 1.0
        return scores

    return rule


RULES: dict[str, Rule] = {
    "random": lambda t, i, g: torch.rand(t.shape[:2], generator=g),
    "brightest (garment)": patch_brightness,
    "darkest (background)": lambda t, i, g: -patch_brightness(t, i, g),
    "garment at random": foreground_at_random,
    "highest feature norm": lambda t, i, g: t.float().norm(dim=-1),
    "lowest feature norm": lambda t, i, g: -t.float().norm(dim=-1),
    "sharpest (outline)": patch_sharpness,
}


class RulePruner(PrunedVLM):
    """Keeps the top K of a fixed rule's scores."""

    def __init__(self, vlm: nn.Module, budget: int, rule: Rule, seed: int, **kwargs: Any) -> None:
        super().__init__(vlm, budget, **kwargs)
        self.rule, self.generator = rule, torch.Generator().manual_seed(seed)

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        scores = self.rule(tokens, image_inputs, self.generator).float().to(tokens.device)
        return Selection(indices=topk_indices(scores, k), num_tokens=tokens.shape[1], scores=scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=28)
    parser.add_argument("--rules", default=None, help=f"comma-separated rules (default: all; random always runs): {', '.join(RULES)}, uniform")
    parser.add_argument("--policy", choices=("repack", "original", "both"), default="both")
    add_heldout_arguments(parser)
    args = parser.parse_args(argv)
    rules = {**RULES, "uniform": lattice(args.budget)}
    names = list(rules) if args.rules is None else ["random", *(n.strip() for n in args.rules.split(",") if n.strip() != "random")]
    unknown = [n for n in names if n not in rules]
    if unknown:
        parser.error(f"unknown rules {unknown}; known: {', '.join(rules)}")
    policies = ("repack", "original") if args.policy == "both" else (args.policy,)

    started = time.time()
    vlm, processor = load_vlm_and_processor(args.model, args.dtype, torch.device("cpu"))
    try:
        examples, batches = heldout_batches(vlm, processor, args.task, args.corpora, args.limit, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = {"all tokens": round(mean_loss(batches, lambda b: vlm(**b).loss, args.seed), 4)}
    per_batch: dict[str, list[float]] = {}
    for name in names:
        for policy in policies:
            pruner = RulePruner(vlm, args.budget, rules[name], args.seed, position_policy=policy)
            per_batch[f"{name}, {policy}"] = [mean_loss([b], lambda b: pruner(**b).loss, args.seed) for b in batches]
            rows[f"{name}, {policy}"] = round(sum(per_batch[f"{name}, {policy}"]) / len(batches), 4)
    # each rule minus random under the same policy, paired over the batches (the same examples in each)
    paired = {label: paired_difference(values, per_batch[f"random, {label.rsplit(', ', 1)[1]}"])
              for label, values in per_batch.items() if not label.startswith("random, ")}
    result = {"model": args.model, "task": args.task, "examples": len(examples), "budget": args.budget,
              "dtype": args.dtype, "answer_nll": rows, "minus_random_paired_over_batches": paired,
              "seconds": round(time.time() - started, 1)}
    report(result, f"kept tokens (K = {args.budget}), positions", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
