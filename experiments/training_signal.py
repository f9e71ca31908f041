"""What the scorer's training objective rewards on a backbone, region by region of a scene.

Session 20 (docs/scenes.md) found that the recipe, on identical training captions and seed, taught
the scorer to keep a scene's garment over one backbone (E: logit AUC 0.94 for the garment's
patches) and to avoid it over a closely related one (G, which is E plus 150 alignment steps: AUC
0.19). This asks whether that preference is already in the objective, the frozen VLM's next-token
loss of the training captions, or arises during training. On training-split captions of a scenes
export, with each item's box known:

A. **Inference-like.** K tokens kept hard and re-packed (as evaluated), chosen by a rule that knows
   the boxes: the garment first, every item with an equal share, the drawings first, the background
   only, random, the uniform lattice; beside all tokens. Mean NLL per token of the whole caption and
   of the garment's name within it, per rule (the evaluation's exact scorer, `answer_log_likelihoods`).
B. **Training-like, at the start of a run.** The paper's training forward (every token through the
   noise gate, a fresh near-identity denoiser, the start temperature) with equal logits, so every
   retention weight is K/N: the gradient of the same two losses with respect to the scorer's
   logits, averaged over noise draws. Per image, the AUC of "raising this logit lowers the loss"
   (minus the gradient) for the garment's patches, and for the drawings' patches, against the rest.
   (The recipe's step sends the LLM only 2K candidates; here all N go, so every token has a gradient.)

It describes the signal the recipe trains on; it chooses nothing.

    python experiments/training_signal.py --model .cache/backbones/mini-llava-plain-g6 \
      --corpora .cache/corpora-small-plain --limit 64 --out signal.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from autoselect.config import AutoSelectConfig
from autoselect.data import collate, encode_example
from autoselect.model import AutoSelectModel
from autoselect.placeholders import IGNORE_INDEX
from autoselect.pruned import PrunedVLM, Selection
from autoselect.pruners.uniform import grid_indices
from autoselect.selection import topk_indices
from mlops.backbone import load_vlm_and_processor
from pipelines.corpora import load_records, open_image
from pipelines.corpora.scenes import CAPTION_TASK, names_caption
from pipelines.evaluation.methods import FullTokens, PreLLM
from pipelines.evaluation.oracle import box_scores
from pipelines.evaluation.report import paired_difference
from pipelines.evaluation.scoring import answer_log_likelihoods
from pipelines.preprocessing.corpus import conversation_turns
from pipelines.preprocessing.samples import chat_messages
from results_file import write_result
from scorer_box_hits import auc, mean_se, region_masks

RULES = ("garment first", "items, equal share", "drawings first", "background only", "random", "uniform lattice")
REGIONS = ("garment", "drawings")


def equal_share_order(record: dict, side: int) -> torch.Tensor:
    """Patch scores that take each item's patches in turn, nearest its centre first (the items
    oracle with an equal share per item); the background after every item's box is exhausted."""
    shares = [box_scores([i["box_fraction"]], side, side) for i in record["items"]]
    per_item = [torch.argsort(share, descending=True, stable=True) for share in shares]
    inside = [int((share > 0.5).sum()) for share in shares]
    scores, rank, taken = torch.full((side * side,), -1.0), side * side, set()
    for depth in range(max(inside, default=0)):
        for order, size in zip(per_item, inside):
            if depth < size and int(order[depth]) not in taken:
                taken.add(int(order[depth]))
                scores[order[depth]] = rank
                rank -= 1
    return scores


def rule_scores(rule: str, record: dict, masks: dict[str, torch.Tensor], side: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Scores whose top K is ``rule``'s choice, given the record's `region_masks` (random among
    equals: "drawings first" on a scene without a drawing is random, "garment first" on a garment
    of more than K patches keeps K of them)."""
    noise = torch.rand(side * side, generator=generator) * 1e-3
    if rule == "garment first":
        return masks["garment"].float() + noise
    if rule == "items, equal share":
        return equal_share_order(record, side) + noise
    if rule == "drawings first":
        return masks["drawings"].float() + noise
    if rule == "background only":
        return -(masks["garment"] | masks["drawings"]).float() + noise
    if rule == "random":
        return noise
    if rule == "uniform lattice":
        lattice = torch.zeros(side * side)
        lattice[grid_indices(k, side, side)] = 1.0
        return lattice + noise
    raise ValueError(f"unknown rule {rule!r}; choose from {RULES}")


class RankPruner(PrunedVLM):
    """Keeps the top K of ``scores`` ``[images, N]``, which the caller sets before each batch."""

    scores: torch.Tensor | None = None

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        if self.scores is None or self.scores.shape != tokens.shape[:2]:
            raise ValueError(f"RankPruner: set .scores to one score per token of each image first (shape {tuple(tokens.shape[:2])})")
        return Selection(indices=topk_indices(self.scores.to(tokens.device), k), num_tokens=tokens.shape[1], scores=self.scores)


def name_labels(batch: dict[str, torch.Tensor], tokenizer, names: list[str]) -> torch.Tensor:
    """``batch["labels"]`` with only the tokens of each row's garment name kept (its first
    occurrence within the answer, as " name" or "name"); a row whose name is not found keeps none."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    for row, name in enumerate(names):
        answer = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        ids = batch["input_ids"][row].tolist()
        for variant in (" " + name, name):
            needle = tokenizer.encode(variant, add_special_tokens=False)
            hits = [s for s in answer if ids[s:s + len(needle)] == needle and s + len(needle) - 1 in answer]
            if hits:
                labels[row, hits[0]:hits[0] + len(needle)] = batch["labels"][row, hits[0]:hits[0] + len(needle)]
                break
    return labels


def row_nll(method, batch: dict[str, torch.Tensor], image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: the summed NLL of its labelled tokens under ``method`` and their count."""
    if not bool(batch["labels"].ne(IGNORE_INDEX).any()):
        return torch.zeros(len(batch["labels"]), dtype=torch.float64), torch.zeros(len(batch["labels"]), dtype=torch.long)
    sums, counts = answer_log_likelihoods(method, batch, 1, image_token_id, share_prompts=False)
    return -sums, counts


def nll_summary(rows: dict[str, tuple[torch.Tensor, torch.Tensor]], reference: str) -> dict[str, dict[str, float]]:
    """Per method: the NLL per token pooled over the rows, and minus ``reference``'s, paired by row
    (each row's NLL per token; rows without labelled tokens left out)."""
    scored = rows[reference][1] > 0
    per_row = {name: (s[scored] / c[scored]).tolist() for name, (s, c) in rows.items()}
    summary = {}
    for name, (s, c) in rows.items():
        paired = paired_difference(per_row[name], per_row[reference])
        summary[name] = {"per_token": round(float(s.sum() / c.sum().clamp(min=1)), 4),
                         f"minus_{reference}": paired["difference"], "stderr": paired["stderr"]}
    return summary


def logit_gradients(model: AutoSelectModel, batch: dict[str, torch.Tensor], labels: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """d loss / d logits ``[B, N]`` at equal logits, mean over ``draws`` noise draws."""
    tokens = model.visual_tokens(**model.split_inputs(dict(batch))[0])
    total = torch.zeros(tokens.shape[:2])
    for draw in range(draws):
        leaf = torch.zeros(tokens.shape[:2], requires_grad=True)
        model.training_scores = lambda padded, valid=None, leaf=leaf: leaf  # the logits under test, no Gumbel noise
        torch.manual_seed(seed + draw)  # the same gate noise for every loss
        model.train()
        model.set_training_step(0)
        model(**{**batch, "labels": labels}).loss.backward()
        total += leaf.grad.float()
    return total / draws


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the backbone folder")
    parser.add_argument("--corpora", type=Path, required=True, help="a scenes export (its train captions are read)")
    parser.add_argument("--limit", type=int, default=64, help="the first N train captions")
    parser.add_argument("--budget", type=int, default=28)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per gradient (B)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the backbone's dtype (default: the one the recipe trains in on a native-bf16 CPU)")
    parser.add_argument("--temperature-start", type=float, default=AutoSelectConfig.temperature_start)
    parser.add_argument("--caption", choices=("exported", "names"), default="exported",
                        help="the export's captions, or the same items named without places or background (`names_caption`)")
    parser.add_argument("--no-gradients", action="store_true", help="part A only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.time()
    records = [r for r in load_records(args.corpora, "scenes", "train") if r["task"] == CAPTION_TASK][: args.limit]
    if not records:
        print(f"error: {args.corpora}/scenes.train.jsonl has no {CAPTION_TASK} records", file=sys.stderr)
        return 2
    vlm, processor = load_vlm_and_processor(str(args.model), args.dtype, torch.device("cpu"))
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=args.budget, temperature_start=args.temperature_start))
    image_token_id = model.adapter.image_token_id
    pruner = RankPruner(vlm, args.budget, position_policy="repack")
    methods = {"all tokens": FullTokens(vlm), **{rule: PreLLM(rule, None, args.budget, pruner) for rule in RULES}}
    generator = torch.Generator().manual_seed(args.seed)
    nll: dict[str, dict[str, list]] = {loss: {name: [] for name in methods} for loss in ("caption", "garment name")}
    aucs = {f"{loss}: {region}": [] for loss in ("caption", "garment name") for region in REGIONS}
    missing_names = 0
    for start in range(0, len(records), args.batch_size):
        chunk = records[start:start + args.batch_size]
        encoded = []
        for record in chunk:
            question, caption = conversation_turns(record["conversations"])[0]
            image = open_image(args.corpora, record)
            if args.caption == "names":
                caption = names_caption(record["items"], image.width)
            encoded.append(encode_example(processor, chat_messages([(question, caption)]), [image]))
        batch = collate(encoded, processor.tokenizer.pad_token_id, padding_side="right")
        garment_names = [next(i["label"] for i in r["items"] if i["kind"] == "garment") for r in chunk]
        labels = {"caption": batch["labels"], "garment name": name_labels(batch, processor.tokenizer, garment_names)}
        missing_names += int((~labels["garment name"].ne(IGNORE_INDEX).any(-1)).sum())
        side = math.isqrt(int((batch["input_ids"][0] == image_token_id).sum()))  # one square image per row
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        masks = [region_masks(r, side) for r in chunk]
        for name, method in methods.items():
            if name in RULES:
                pruner.scores = torch.stack([rule_scores(name, r, m, side, args.budget, generator) for r, m in zip(chunk, masks)])
            for loss, target in labels.items():
                nll[loss][name].append(row_nll(method, {**inputs, "labels": target}, image_token_id))
        for loss, target in labels.items():
            if args.no_gradients or not bool(target.ne(IGNORE_INDEX).any()):
                continue
            gradient = logit_gradients(model, batch, target, args.draws, args.seed)
            for row, mask in enumerate(masks):
                if not bool(target[row].ne(IGNORE_INDEX).any()):
                    continue
                for region in REGIONS:
                    aucs[f"{loss}: {region}"].append(auc(-gradient[row], mask[region]))
        print(f"{start + len(chunk)}/{len(records)} captions, {time.time() - started:.0f} s", flush=True)
    result = {
        "model": str(args.model), "corpora": str(args.corpora), "split": "train", "captions": len(records), "caption": args.caption, "k": args.budget,
        "dtype": args.dtype, "draws": args.draws, "garment_name_not_found": missing_names,
        "nll": {loss: nll_summary({name: tuple(map(torch.cat, zip(*parts))) for name, parts in v.items()}, "random")
                for loss, v in nll.items()},
        "start_gradient_auc": None if args.no_gradients else {name: mean_se(v) for name, v in aucs.items()},
        "seconds": round(time.time() - started, 1),
    }
    print(f"\n{len(records)} train captions, K = {args.budget}, {args.dtype}; garment name not found in {missing_names}")
    print(f"| kept (K = {args.budget}, re-packed) | caption NLL/token | − random, paired | garment-name NLL/token | − random, paired |")
    print("|---|---|---|---|---|")
    caption, name_nll = result["nll"]["caption"], result["nll"]["garment name"]
    for name in methods:
        cells = [f"{v[name]['per_token']:.3f} | {v[name]['minus_random']:+.3f} ± {v[name]['stderr']:.3f}" for v in (caption, name_nll)]
        print(f"| {name} | {' | '.join(cells)} |")
    if result["start_gradient_auc"]:
        print("\n| start-of-training gradient: AUC of -dL/dlogit for | mean ± SE (n) |\n|---|---|")
        for name, v in result["start_gradient_auc"].items():
            print(f"| {name} patches vs the rest | {v['mean']:.3f} ± {v['stderr']:.3f} ({v['n']}) |")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
