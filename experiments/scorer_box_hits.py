"""Where do trained scorers put their K tokens on a scene: on the garment the question asks about,
or elsewhere? (a check that needs the vision tower and the scorer only, no LLM).

For each scorer folder, on the validation garment scenes `pipelines/evaluate.py --limit` scores (the
same class-balanced pick, through the evaluation's own task loader):
the share of the garment box's patches (area share > 0.5) that the scorer keeps at K, under its
saved decode and under plain top-K, next to random and the uniform lattice at the same K; the
AUC of its logits for "patch in the garment box" (0.5: the logits ignore the garment); and where
each method's K kept patches lie (on the garment, on its one-patch ring of surroundings, on the
scene's drawings, elsewhere), the garment oracle's beside them. Validation only: it explains val
numbers, it chooses nothing.

    python experiments/scorer_box_hits.py --model .cache/backbones/mini-llava-plain-g6 \
      --corpora .cache/corpora-plain-g6 --scorer F=artifacts/mini-llava-scenes-drop2/scorer --out hits.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.config import InferenceOptions
from autoselect.decode import kept_indices
from autoselect.model import AutoSelectModel
from autoselect.pruners.uniform import grid_indices
from pipelines.corpora import load_records
from pipelines.evaluation.oracle import OraclePruner, box_scores
from pipelines.evaluation.scoring import heldout_task
from results_file import mean_se, write_result


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(a box patch outscores a patch outside it), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def regions(garment: torch.Tensor, drawings: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
    """``[N]`` masks of the regions a kept patch is counted in, each patch in exactly one: the
    garment, its ring (the patches within one patch of it, diagonals too), the drawings, elsewhere."""
    grown = torch.nn.functional.max_pool2d(garment.float().reshape(1, 1, side, side), 3, 1, 1).reshape(-1) > 0
    ring = grown & ~garment
    on_drawing = drawings & ~grown
    return {"garment": garment, "ring": ring, "drawings": on_drawing, "elsewhere": ~(grown | on_drawing)}


def region_masks(record: dict, side: int) -> dict[str, torch.Tensor]:
    """``[side * side]`` bool masks of the patches mostly inside the garment's box / a drawing's box."""
    def inside(boxes: list) -> torch.Tensor:
        return box_scores(boxes, side, side) > 0.5 if boxes else torch.zeros(side * side, dtype=torch.bool)
    items = record["items"]
    garment = inside([i["box_fraction"] for i in items if i["kind"] == "garment"])
    return {"garment": garment, "drawings": inside([i["box_fraction"] for i in items if i["kind"] != "garment"]) & ~garment}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the backbone folder the scorers were trained on")
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--scorer", action="append", required=True, metavar="NAME=DIR", help="a scorer folder (repeatable)")
    parser.add_argument("--budget", type=int, default=28)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the backbone's dtype: the one the scorers were trained and evaluated over (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.time()
    vlm = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    examples = heldout_task(vlm, processor, "scenes_garment", args.corpora, args.limit).examples
    records = {r["id"]: r for r in load_records(args.corpora, "scenes", "heldout")}  # the examples carry the garment's box only
    scorers = {}
    for spec in args.scorer:
        name, _, folder = spec.partition("=")
        model = AutoSelectModel.from_pretrained(folder, vlm).eval()
        scorers[name] = model
        scorers[name + "-topk"] = model.with_inference(InferenceOptions())
    any_model = next(iter(scorers.values()))
    k = args.budget
    oracle = OraclePruner(vlm, k)
    generator = torch.Generator().manual_seed(args.seed)
    kept_share: dict[str, list[float]] = {name: [] for name in [*scorers, "random", "uniform"]}
    kept_where: dict[str, dict[str, list[float]]] = {}
    aucs: dict[str, list[float]] = {name: [] for name in scorers if not name.endswith("-topk")}
    box_patches: list[int] = []
    for start in range(0, len(examples), args.batch_size):
        batch = examples[start:start + args.batch_size]
        pixels = processor.image_processor([e.image for e in batch], return_tensors="pt")["pixel_values"]
        tokens = any_model.visual_tokens(pixel_values=pixels)
        n = tokens.shape[1]
        side = math.isqrt(n)
        boxes = torch.stack([box_scores(e.boxes, side, side) > 0.5 for e in batch])
        box_patches += boxes.sum(1).tolist()
        masks = [region_masks(records[e.id], side) for e in batch]
        parts = [regions(m["garment"], m["drawings"], side) for m in masks]
        chosen = {"random": torch.stack([torch.randperm(n, generator=generator)[:k] for _ in batch]),
                  "uniform": grid_indices(k, side, side)[None].expand(len(batch), -1)}
        with torch.no_grad():
            for name, model in scorers.items():
                logits = model.scorer(tokens)
                chosen[name] = kept_indices(logits, tokens, k, model.config.inference)
                if name in aucs:
                    aucs[name] += [auc(s.float(), b) for s, b in zip(logits, boxes)]
        oracle.prepare(batch)
        chosen["oracle"] = oracle.choose(tokens, k, {}).indices
        for name, index in chosen.items():
            if name in kept_share:
                hits = torch.gather(boxes, 1, index).sum(1).float()
                kept_share[name] += (hits / boxes.sum(1).clamp(min=1)).tolist()
            for part, kept in zip(parts, index):
                for region, mask in part.items():
                    kept_where.setdefault(name, {}).setdefault(region, []).append(float(mask[kept].sum()))
    result = {"model": str(args.model), "dtype": args.dtype, "corpora": str(args.corpora), "split": "val", "k": k, "scenes": len(examples),
              "box_patches": mean_se([float(b) for b in box_patches]),
              "kept_share_of_box": {name: mean_se(v) for name, v in kept_share.items()},
              "logit_auc_box": {name: mean_se(v) for name, v in aucs.items()},
              "kept_patches_by_region": {name: {region: mean_se(v) for region, v in where.items()} for name, where in kept_where.items()},
              "seconds": round(time.time() - started, 1)}
    print(f"{len(examples)} val garment scenes, K = {k}; the garment box covers {result['box_patches']['mean']:.1f} patches on average")
    print(f"{'method':22s} {'box patches kept':>18s} {'logit AUC (box)':>16s}")
    for name, share in result["kept_share_of_box"].items():
        a = result["logit_auc_box"].get(name)
        auc_cell = f"{a['mean']:.3f} ± {a['stderr']:.3f}" if a else ""
        print(f"{name:22s} {share['mean']:10.3f} ± {share['stderr']:.3f} {auc_cell:>16s}")
    print(f"\nwhere the K = {k} kept patches lie (mean patches per scene)")
    print(f"{'method':22s} " + " ".join(f"{region:>10s}" for region in ("garment", "ring", "drawings", "elsewhere")))
    for name, where in result["kept_patches_by_region"].items():
        print(f"{name:22s} " + " ".join(f"{cell['mean']:10.2f}" for cell in where.values()))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
