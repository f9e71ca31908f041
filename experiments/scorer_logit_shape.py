"""How peaked are a scorer's logits on each kind of image? (the vision tower and the scorer only, no LLM).

Per task (val questions, the evaluation's own loader and class-balanced pick), the scorer's logits
standardized per image (z, `autoselect.selection.standardized_logits`, what the DPP decode's quality reads): the mean z at a few ranks, and
per image the drop from the 1st to the K-th (z1 - zK) as quantiles. A plateau (small drop) means
the top-K is an arbitrary, clustered pick among near-equal tokens; a peak means a few tokens stand
out. Validation only: it explains val numbers, it chooses nothing (docs/scenes.md, session 38).

    python experiments/scorer_logit_shape.py --model .cache/backbones/mini-llava-plain-R \
      --scorer artifacts/mini-llava-scenes-R2/scorer --out shape.json \
      --task fmnist_vqa=.cache/corpora-plain-g6-d2 --task scenes_garment=.cache/corpora-plain-g6-d2-h4000
"""

from __future__ import annotations

import argparse
import time

import torch

from autoselect.model import AutoSelectModel
from autoselect.selection import standardized_logits
import scorer_tasks
from results_file import write_result

RANKS = (1, 5, 10, 14, 28, 57)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def scorer_z(model: AutoSelectModel, processor, examples, batch_size: int) -> torch.Tensor:
    """``[examples, N]`` the scorer's logits, each image's standardized (`standardized_logits`)."""
    return torch.cat([standardized_logits(logits) for _, _, logits in scorer_tasks.scored_batches(model, processor, examples, batch_size)])


def shape(z: torch.Tensor, budgets: list[int]) -> dict:
    """Mean z at ``RANKS`` (1-based) and the per-image drop z1 - zK's quantiles at each budget K."""
    too_large = [k for k in budgets if not 1 <= k <= z.shape[-1]]
    if too_large:
        raise ValueError(f"budgets {too_large} are not between 1 and the {z.shape[-1]} tokens per image")
    ordered = z.sort(-1, descending=True).values
    quantiles = torch.tensor(QUANTILES, dtype=z.dtype)
    drops = {f"K={k}": {str(q): round(float(v), 3) for q, v in zip(QUANTILES, (ordered[:, 0] - ordered[:, k - 1]).quantile(quantiles))}
             for k in budgets}
    return {"n": len(z), "mean_z_at_rank": {str(r): round(float(ordered[:, r - 1].mean()), 3) for r in RANKS},
            "drop_z1_minus_zK_quantiles": drops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scorer_tasks.add_arguments(parser, limit=300)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 28, 57])
    args = parser.parse_args(argv)
    started = time.time()
    vlm, processor, model = scorer_tasks.load(args)
    result = {"model": str(args.model), "scorer": str(args.scorer), "dtype": args.dtype, "split": "val", "limit": args.limit, "tasks": {}}
    for name, examples in scorer_tasks.tasks(vlm, processor, args):
        result["tasks"][name] = shape(scorer_z(model, processor, examples, args.batch_size), args.budgets)
        cell = result["tasks"][name]
        print(f"{name} (n = {cell['n']}): mean z at ranks {cell['mean_z_at_rank']}")
        for k, q in cell["drop_z1_minus_zK_quantiles"].items():
            print(f"    z1 - zK at {k}: quantiles {q}")
    result["seconds"] = round(time.time() - started, 1)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
