"""Candidate I (docs/scenes.md, session 42): a scorer fine-tuned by a signal that scores whole kept sets.

The recipe's straight-through gradient prices each token's share of the loss; on this backbone a
full-frame garment is read only from spread sets (session 40), a property of the set. Here the
frozen VLM reads whole sets and the scorer is trained by the score-function (REINFORCE) estimator:

- per image, M heads of ``K - floor(K/2)`` tokens are sampled from the Plackett-Luce distribution
  of the scorer's standardized logits (Gumbel-top-k), each completed by the greedy DPP conditioned
  on it (q = 0.5, C's tail), so every sampled set has the shape C and E12 keep at inference;
- the VLM reads each set as evaluation does (kept tokens re-packed; `answer_log_likelihoods`) and
  the answer's NLL per token is the set's cost, with the mean over the image's other M - 1 sets as
  its baseline;
- the loss is ``mean((cost - baseline) * log p(head))``: heads whose set read better than the
  others become more likely. No gradient passes through the VLM, only through log p.

Where random heads read better than a cluster (a full-frame garment) this flattens the logits; where
the garment's cluster reads better (a small garment in a scene) it sharpens them. The result is
saved with E12's decode (C with its head by the greedy DPP at q_h = 12), which spreads the head on
flat logits and is the top-K on peaked ones. Training splits only; nothing here reads val.

    python experiments/set_level_finetune.py --model .cache/backbones/mini-llava-plain-R \
      --scorer artifacts/mini-llava-scenes-R2/scorer --corpora .cache/corpora-plain-g6-d2-h4000 \
      --steps 100 --out outputs/scorers/I
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from autoselect import AutoSelectModel
from autoselect.data import collate, encode_example
from autoselect.selection import dpp_order
from mlops.backbone import load_vlm_and_processor
from pipelines.corpora import load_records, open_image
from pipelines.corpora.export import record_messages
from pipelines.evaluation.methods import PreLLM
from training_signal import RankPruner, row_nll

SOURCES = {"scenes": "scenes_garment", "fashion_mnist": "fmnist_class"}  # corpus -> task trained on


class SetPruner(RankPruner):
    """`RankPruner` over visual tokens computed once per image and repeated per sampled set."""

    tokens: torch.Tensor | None = None

    def visual_tokens(self, **image_inputs):
        return self.tokens


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """Each row at mean 0 and unit (population) std, as the DPP's quality reads the logits."""
    return (scores - scores.mean(-1, keepdim=True)) / scores.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6)


def sample_heads(z: torch.Tensor, head: int, samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` Plackett-Luce draws of ``head`` tokens per row of ``z [B, N]`` (Gumbel-top-k):
    indices ``[B, samples, head]`` in draw order and their log-probability ``[B, samples]``
    (differentiable in ``z``)."""
    uniform = torch.rand((z.shape[0], samples, z.shape[1]), generator=generator, dtype=z.dtype).clamp(1e-20, 1 - 1e-7)
    order = (z.detach()[:, None, :] - torch.log(-torch.log(uniform))).topk(head, dim=-1).indices
    expanded = z[:, None, :].expand(-1, samples, -1)
    left = torch.ones_like(expanded, dtype=torch.bool)
    normalizers = []
    for j in range(head):
        normalizers.append(expanded.masked_fill(~left, float("-inf")).logsumexp(-1))
        left = left.scatter(-1, order[..., j : j + 1], False)
    return order, expanded.gather(-1, order).sum(-1) - torch.stack(normalizers, -1).sum(-1)


def complete_sets(scores: torch.Tensor, tokens: torch.Tensor, heads: torch.Tensor, k: int, quality_scale: float) -> torch.Tensor:
    """Each head ``[B, M, h]`` completed to ``k`` by the greedy DPP conditioned on it: ``[B * M, k]`` sorted."""
    samples = heads.shape[1]
    return dpp_order(scores.detach().repeat_interleave(samples, 0), tokens.repeat_interleave(samples, 0), k,
                     quality_scale, first=heads.reshape(-1, heads.shape[-1])).sort(-1).values


def set_costs(method: PreLLM, pruner: SetPruner, batch: dict, tokens: torch.Tensor, kept: torch.Tensor,
              samples: int, image_token_id: int) -> torch.Tensor:
    """The answer's NLL per token ``[B, M]`` with each sampled set kept (the evaluation's forward)."""
    pruner.tokens = tokens.repeat_interleave(samples, 0)
    pruner.scores = torch.zeros(kept.shape[0], tokens.shape[1]).scatter_(1, kept, 1.0)  # its top K is the set
    rows = {key: value.repeat_interleave(samples, 0) for key, value in batch.items()}
    with torch.no_grad():
        sums, counts = row_nll(method, rows, image_token_id)
    return (sums / counts.clamp_min(1)).float().view(-1, samples)


def leave_one_out(costs: torch.Tensor) -> torch.Tensor:
    """Each sample's cost minus the mean of the image's other samples (a baseline that keeps the
    estimator unbiased: it does not depend on the sample it is subtracted from)."""
    samples = costs.shape[1]
    return costs - (costs.sum(1, keepdim=True) - costs) / (samples - 1)


def draw_batch(pools: dict[str, list[dict]], per_source: int, rng: random.Random) -> list[dict]:
    return [record for pool in pools.values() for record in rng.sample(pool, per_source)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the backbone folder (frozen)")
    parser.add_argument("--scorer", required=True, type=Path, help="the AutoSelect folder to start from")
    parser.add_argument("--corpora", required=True, type=Path, help="an export with scenes and fashion_mnist train splits")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--per-source", type=int, default=2, help="images per step from each source (scenes, Fashion-MNIST)")
    parser.add_argument("--samples", type=int, default=4, help="sampled sets per image (M >= 2)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--head-quality-scale", type=float, default=12.0, help="the saved decode's DPP head scale (E12's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2 (each sample's baseline is the others' mean)")
    started = time.time()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    pools = {name: [r for r in load_records(args.corpora, name, "train") if r["task"] == task] for name, task in SOURCES.items()}
    for name, pool in pools.items():
        if len(pool) < args.per_source:
            print(f"error: {args.corpora}/{name}.train.jsonl has {len(pool)} {SOURCES[name]} records", file=sys.stderr)
            return 2

    vlm, processor = load_vlm_and_processor(args.model, "float32", torch.device("cpu"))
    model = AutoSelectModel.from_pretrained(args.scorer, vlm)
    model.scorer.float().train()
    inference = model.config.inference
    if inference.decode != "topk_dpp":
        print(f"error: {args.scorer} decodes by {inference.decode!r}; this trains heads for topk_dpp (C)", file=sys.stderr)
        return 2
    k = model.config.budget
    head = k - math.floor(inference.dpp_share * k + 1e-9)
    image_token_id = model.adapter.image_token_id
    pruner = SetPruner(vlm, k, position_policy="repack")
    method = PreLLM("set", None, k, pruner)
    optimizer = torch.optim.Adam(model.scorer.parameters(), lr=args.lr)
    history = []
    for step in range(1, args.steps + 1):
        tick = time.time()
        records = draw_batch(pools, args.per_source, rng)
        batch = collate([encode_example(processor, record_messages(r), [open_image(args.corpora, r)]) for r in records],
                        processor.tokenizer.pad_token_id, padding_side="right")
        tokens = model.visual_tokens(pixel_values=batch["pixel_values"])
        scores = model.scorer(tokens)
        heads, log_prob = sample_heads(standardized(scores), head, args.samples, generator)
        kept = complete_sets(scores, tokens, heads, k, inference.dpp_quality_scale)
        costs = set_costs(method, pruner, batch, tokens, kept, args.samples, image_token_id)
        advantage = leave_one_out(costs)
        loss = (advantage * log_prob).mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.scorer.parameters(), 1.0))
        optimizer.step()
        split = args.per_source
        row = {"step": step, "seconds": round(time.time() - tick, 2), "grad_norm": round(grad_norm, 4),
               "logit_std": round(float(scores.detach().std(-1).mean()), 4),
               **{f"nll_{name}": round(float(costs[i * split:(i + 1) * split].mean()), 4) for i, name in enumerate(SOURCES)},
               **{f"spread_{name}": round(float(costs[i * split:(i + 1) * split].std(1).mean()), 4) for i, name in enumerate(SOURCES)}}
        history.append(row)
        print(json.dumps(row), flush=True)

    model.scorer.eval().to(torch.bfloat16)  # saved in the committed scorer's dtype, as export_scorer does
    model.trained_vlm_dtype = None  # recorded from the VLM it was fine-tuned over (float32), not the start's
    model = model.with_inference(replace(inference, dpp_head_quality_scale=args.head_quality_scale))
    model.save_pretrained(args.out, inference_only=True)
    (args.out / "finetune.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "minutes": round((time.time() - started) / 60, 1),
                                                        "history": history}, indent=1))
    print(f"saved {args.out} after {args.steps} steps in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
