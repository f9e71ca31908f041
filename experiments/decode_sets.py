"""How far do other decodes of one scorer move its kept set? (the vision tower and the scorer only, no LLM).

Per task (val questions, the evaluation's own loader and class-balanced pick), at one budget K, for
the scorer's saved decode, each variant (`--variant NAME=KEY=VALUE[,KEY=VALUE]`, fields of
``inference`` replaced), each other scorer (`--compare NAME=SCORER`, read with its own saved
decode on the same tokens) and the uniform lattice as a reference:
- changed / swapped: the share of images whose kept set differs from the saved decode's, and the
  mean number of its K tokens swapped (an unchanged set gets the same answer, so these bound how
  much a reading can move);
- coverage: each token's largest cosine similarity to a kept token, averaged (1: the kept set
  stands near every token in feature space);
- reach: each patch's grid distance to the nearest kept patch, averaged (spread in space; the
  lattice's is the least);
- dark_kept: the share of kept patches that are near-black (a centered Fashion-MNIST garment's
  background);
- box_kept: the share of the garment box's patches kept (tasks whose examples carry boxes).
Validation only; it explains or narrows a val reading and reads no answers (docs/scenes.md, session 39).

    python experiments/decode_sets.py --model .cache/backbones/mini-llava-plain-R \
      --scorer artifacts/mini-llava-scenes-R2/scorer --variant E2=dpp_head_quality_scale=2 \
      --task fmnist_vqa=.cache/corpora-plain-g6-d2-h4000 --task scenes_garment=.cache/corpora-plain-g6-d2-h4000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time

import numpy as np
import torch
from PIL import Image

from autoselect.config import InferenceOptions
from autoselect.decode import kept_indices
from autoselect.pruners.uniform import grid_indices
from autoselect.selection import cosine_kernel
from pipelines.evaluation.oracle import box_scores
from mlops.backbone import load_autoselect
from pipelines.export_scorer import inference_options
import scorer_tasks
from results_file import mean_se, write_result


DARK = 8  # gray level (0-255) under which a patch counts as background: Fashion-MNIST's is 0


def parse_variant(spec: str, saved: InferenceOptions) -> tuple[str, InferenceOptions]:
    """``NAME=KEY=VALUE[,KEY=VALUE]`` -> (NAME, the saved options with those fields replaced), read
    and checked as `export_scorer --inference` reads its options."""
    name, _, fields = spec.partition("=")
    if not name or not fields:
        raise ValueError(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE]")
    return name, inference_options(fields.split(","), base=saved, where=f"--variant {name}")


def dark_patches(image, side: int, level: int = DARK) -> torch.Tensor:
    """``[side * side]`` bool: the patches whose mean gray level (0-255) is under ``level``."""
    gray = np.asarray(image.convert("L").resize((side, side), Image.BOX), dtype=np.float32)
    return torch.from_numpy(gray < level).reshape(-1)


@functools.lru_cache
def grid_distances(side: int) -> torch.Tensor:
    """``[N, N]`` the Euclidean distances between the cells of a ``side x side`` patch grid."""
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).float()
    return torch.cdist(cells, cells)


def reach(kept: torch.Tensor, side: int) -> torch.Tensor:
    """``[B]`` each image's mean over its ``side x side`` patches of the grid (Euclidean) distance to
    the nearest kept patch (0 where every patch is kept)."""
    distance = grid_distances(side)
    return torch.stack([distance[:, k].amin(-1).mean() for k in kept])


def coverage(tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[B]`` each image's mean over its tokens of the largest cosine similarity to a kept token."""
    similarity = cosine_kernel(tokens)
    return torch.gather(similarity, 2, kept[:, None, :].expand(-1, tokens.shape[1], -1)).amax(-1).mean(-1)


def measure(model, processor, examples, options: dict[str, InferenceOptions], k: int, batch_size: int,
            others: dict | None = None) -> dict:
    """Per decode name, other scorer (``others``: name -> a model over the same VLM, read with its
    own saved decode on the same tokens) and the uniform lattice: changed (vs the first decode),
    swapped, coverage, the share of dark patches kept and, with boxes, the box share kept."""
    others = others or {}
    names = [*options, *others, "uniform"]
    rows: dict[str, dict[str, list[float]]] = {name: {"changed": [], "swapped": [], "coverage": [], "reach": [], "dark_kept": [], "box_kept": []} for name in names}
    reference = next(iter(options))
    for batch, tokens, logits in scorer_tasks.scored_batches(model, processor, examples, batch_size):
        side = math.isqrt(tokens.shape[1])
        boxes = [box_scores(e.boxes, side, side) > 0.5 if getattr(e, "boxes", None) else None for e in batch]
        kept = {name: kept_indices(logits, tokens, k, opts) for name, opts in options.items()}
        with torch.no_grad():
            kept.update({name: other.decode(other.scorer(tokens), tokens, k) for name, other in others.items()})
        kept["uniform"] = grid_indices(k, side, side).expand(len(batch), -1)
        dark = torch.stack([dark_patches(e.image, side) for e in batch])
        for name, index in kept.items():
            same = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(index, kept[reference])])
            rows[name]["changed"] += (same < k).float().tolist()
            rows[name]["swapped"] += (k - same).float().tolist()
            rows[name]["coverage"] += coverage(tokens.float(), index).tolist()
            rows[name]["reach"] += reach(index, side).tolist()
            rows[name]["dark_kept"] += (torch.gather(dark, 1, index).float().mean(1)).tolist()
            rows[name]["box_kept"] += [float(box[i].sum() / box.sum().clamp(min=1)) for box, i in zip(boxes, index) if box is not None]
    return {name: {key: mean_se(values) for key, values in cells.items() if values} for name, cells in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scorer_tasks.add_arguments(parser, limit=None)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=SCORER",
                        help="another scorer folder, read with its own saved decode on the same tokens")
    parser.add_argument("--budget", type=int, default=28)
    args = parser.parse_args(argv)
    if not args.variant and not args.compare:
        parser.error("give at least one --variant or --compare")
    compared = dict(spec.split("=", 1) for spec in args.compare if "=" in spec)
    if len(compared) != len(args.compare):
        parser.error("--compare takes NAME=SCORER, each NAME once")
    started = time.time()
    vlm, processor, model = scorer_tasks.load(args)
    saved = model.config.inference
    options = {"saved": saved, **dict(parse_variant(spec, saved) for spec in args.variant)}
    others = {name: load_autoselect(path, vlm)[0].eval() for name, path in compared.items()}
    result = {"model": str(args.model), "scorer": str(args.scorer), "dtype": args.dtype, "split": "val", "k": args.budget,
              "decodes": {name: dataclasses.asdict(o) for name, o in options.items()},
              "compared": {name: {"scorer": path, "decode": dataclasses.asdict(others[name].config.inference)}
                           for name, path in compared.items()}, "tasks": {}}
    for task, examples in scorer_tasks.tasks(vlm, processor, args):
        cells = measure(model, processor, examples, options, args.budget, args.batch_size, others)
        result["tasks"][task] = {"n": len(examples), **cells}
        print(f"{task} (n = {len(examples)}, K = {args.budget})")
        for name, cell in cells.items():
            print(f"  {name:10s} " + "  ".join(f"{key} {value['mean']:.3f}" for key, value in cell.items()))
    result["seconds"] = round(time.time() - started, 1)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
