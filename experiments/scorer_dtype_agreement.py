"""Does a bfloat16 scorer keep the same tokens as the float32 one it was saved as?

`bench/gpu_check.py --scorer-dtype bfloat16` measured the scorer 9.5x cheaper in bf16 on a GPU;
before that is a serving option, the kept tokens must match. This runs one saved scorer twice
over the same visual tokens (the backbone in ``--dtype``), once as saved (float32) and once cast
to bf16, and reports per decode (the scorer's own and plain top-K) the mean share of the K kept
tokens the two agree on and the share of images whose kept sets are identical, on validation
images only: the scenes garment questions and centered Fashion-MNIST questions that
`pipelines/evaluate.py --limit` scores (its own task loader).

    python experiments/scorer_dtype_agreement.py --model .cache/backbones/mini-llava-plain-drop2 \
      --scorer artifacts/mini-llava-scenes-drop2/scorer --corpora .cache/corpora-small-plain --out agreement.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.config import InferenceOptions
from autoselect.decode import kept_indices
from autoselect.model import AutoSelectModel
from pipelines.evaluation.scoring import heldout_task
from results_file import write_result

TASKS = ("scenes_garment", "fmnist_vqa")


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Per image: the share of ``a``'s kept indices also in ``b``, and whether the sets are equal."""
    shared = [len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b)]
    return shared, [s == 1.0 for s in shared]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--scorer", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 28, 57])
    parser.add_argument("--limit", type=int, default=200, help="val questions per task (default: %(default)s)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the backbone's (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.time()
    vlm = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    saved = AutoSelectModel.from_pretrained(args.scorer, vlm).eval()
    cast = copy.deepcopy(saved.scorer).to(torch.bfloat16)  # the scorer casts its input to its own dtype
    decodes = {"saved": saved.config.inference, "topk": InferenceOptions()}
    rows = []
    for source in TASKS:
        examples = heldout_task(vlm, processor, source, args.corpora, args.limit).examples
        shared = {(d, k): [] for d in decodes for k in args.budgets}
        same = {(d, k): [] for d in decodes for k in args.budgets}
        for start in range(0, len(examples), args.batch_size):
            images = [e.image for e in examples[start:start + args.batch_size]]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                tokens = saved.visual_tokens(pixel_values=pixels)
                logits = {"float32": saved.scorer(tokens).float(), "bfloat16": cast(tokens).float()}
            for (decode, k), values in shared.items():
                a = kept_indices(logits["float32"], tokens, k, decodes[decode])
                b = kept_indices(logits["bfloat16"], tokens, k, decodes[decode])
                s, e = agreement(a, b)
                values += s
                same[decode, k] += e
        for decode, k in shared:
            s = torch.tensor(shared[decode, k], dtype=torch.float64)
            rows.append({"source": source, "images": len(s), "decode": decode, "k": k,
                         "kept_shared": round(float(s.mean()), 4), "kept_shared_stderr": round(float(s.std() / math.sqrt(len(s))), 4),
                         "identical_sets": round(sum(same[decode, k]) / len(s), 4)})
    result = {"model": str(args.model), "scorer": str(args.scorer), "backbone_dtype": args.dtype,
              "saved_decode": dataclasses.asdict(saved.config.inference),
              "rows": rows, "seconds": round(time.time() - started, 1)}
    print(f"float32 scorer (as saved) vs the same weights in bfloat16, backbone in {args.dtype}")
    print(f"{'source':14s} {'decode':6s} {'K':>4s} {'kept shared':>16s} {'identical sets':>15s}")
    for r in rows:
        print(f"{r['source']:14s} {r['decode']:6s} {r['k']:4d} {r['kept_shared']:9.3f} ± {r['kept_shared_stderr']:.3f} {r['identical_sets']:15.3f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
