"""Does the frozen encoder put the garment's class only where the garment is? (a scenes check
that needs no LLM).

A multinomial logistic regression reads the class of the scene's garment from the mean of K
pre-projector visual tokens (DINOv2's, as the projector sees them), chosen four ways: all N, the
oracle's K (the garment's box), a seeded random K and the uniform grid's K. It is fitted on
training scenes and scored on the validation half of the held-out scenes (never on test).

If the box's tokens read the class far better than random ones, the information a selector must
find is local in the encoder, and a VLM that fails the scenes question fails for its projector/LM;
if random tokens read it as well as the box's, selection cannot matter on this task.

    python experiments/scenes_probe.py --budget 28 --out docs/scenes/probe-val.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from autoselect.pruners.uniform import grid_indices
from minillava.aligned import backbone_identity
from minillava.cache import read_manifest as read_build_manifest
from minillava.mini_llava import DEFAULT_CACHE_DIR, build_mini_llava
from pipelines.align.features import EncodedRecords, cached_features, cached_rows, features_key, source_key
from pipelines.corpora import DEFAULT_OUT, load_records
from pipelines.evaluation.oracle import box_scores
from pipelines.evaluation.tasks.base import split_of
from results_file import write_result

WAYS = ("all", "oracle", "random", "uniform")


def garment_records(corpora: Path, split: str, limit: int | None) -> list[dict]:
    records = [r for r in load_records(corpora, "scenes", split) if r["task"] == "scenes_garment"]
    if split == "heldout":
        records = [r for r in records if split_of(r["id"]) == "val"]
    return records[:limit]


def features_for(vlm, processor, corpora: Path, images: list[str], cache: Path) -> torch.Tensor:
    """Rows of an alignment feature cache of this backbone and corpus export (``align_projector.py``
    caches the train splits) when one holds every image, else computed and cached."""
    identity = backbone_identity(build_mini_llava(cache_dir=DEFAULT_CACHE_DIR))
    inputs = (read_build_manifest(corpora) or {}).get("inputs", {})
    source = source_key(identity, inputs)
    rows = cached_rows(cache, source, images)
    if rows is not None:
        return rows
    encoded = EncodedRecords([], [], [], [], list(images))
    return cached_features(vlm, processor, corpora, encoded, cache, features_key(identity, inputs, images), source=source)[0]


def pooled(features: torch.Tensor, records: list[dict], k: int, seed: int) -> dict[str, np.ndarray]:
    """``{way: [len(records), D]}``: the mean of each way's K tokens per scene."""
    n = features.shape[1]
    side = math.isqrt(n)
    generator = torch.Generator().manual_seed(seed)
    grid = grid_indices(k, side, side)
    out: dict[str, list[torch.Tensor]] = {way: [] for way in WAYS}
    for tokens, record in zip(features.float(), records):
        box = box_scores([tuple(record["boxes"][0])], side, side).topk(k).indices
        chosen = {"all": torch.arange(n), "oracle": box, "random": torch.randperm(n, generator=generator)[:k], "uniform": grid}
        for way, index in chosen.items():
            out[way].append(tokens[index].mean(0))
    return {way: torch.stack(rows).numpy() for way, rows in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--budget", type=int, default=28, help="K tokens per scene (default: %(default)s, N/9)")
    parser.add_argument("--train-limit", type=int, default=None, help="training scenes to fit on (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random selection's seed (default: %(default)s)")
    parser.add_argument("--feature-cache", type=Path, default=Path(".cache/alignment"), help="reuse cached train features (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model_dir = build_mini_llava(cache_dir=DEFAULT_CACHE_DIR)["mini_llava"].path
    vlm = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(model_dir)
    data = {}
    for split in ("train", "heldout"):
        records = garment_records(args.corpora, split, args.train_limit if split == "train" else None)
        features = features_for(vlm, processor, args.corpora, [r["image"] for r in records], args.feature_cache)
        data[split] = (pooled(features, records, args.budget, args.seed), np.array([r["label"] for r in records]))
    result = {"budget": args.budget, "tokens": int(features.shape[1]), "train_scenes": len(data["train"][1]),
              "val_scenes": len(data["heldout"][1]), "chance": 1 / len(set(data["train"][1])), "accuracy": {}}
    for way in WAYS:
        scaler = StandardScaler().fit(data["train"][0][way])
        classifier = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(data["train"][0][way]), data["train"][1])
        correct = classifier.predict(scaler.transform(data["heldout"][0][way])) == data["heldout"][1]
        result["accuracy"][way] = {"mean": round(float(correct.mean()), 4),
                                   "stderr": round(float(correct.std(ddof=1) / math.sqrt(len(correct))), 4)}
    result["seconds"] = round(time.time() - started, 1)
    print(f"linear probe of the garment class from the mean of K={args.budget} of {result['tokens']} tokens "
          f"({result['train_scenes']} train scenes -> {result['val_scenes']} val scenes, chance {result['chance']:.2f})")
    for way, acc in result["accuracy"].items():
        print(f"  {way:8s} {acc['mean']:.3f} +- {acc['stderr']:.3f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
