"""Where a Serve request's time goes, full budget vs pruned, in process (no Ray, no HTTP).

`bench/serve_load.py` measures req/s through the app; this splits one request's cost into the
parts the replica runs, with the app's own code: ``prepare`` (data-URL decode, chat template,
processor, plan; per request, before batching), the vision tower (per batch), ``generate`` with
one new token (the prefill: vision, scorer, pruned LLM prefill) and with ``--max-tokens`` new
tokens (so decode steps = the difference). From those it gives the req/s a replica could reach
with every batch full, and so the pruned/full ratio the load bench can at best show: what does not
shrink with K (processing, vision, decode steps) bounds it, whatever the batching does.

    python bench/serve_cost.py                       # mini-LLaVA, one thread (a replica's 0.5 CPU), batches 1 and 8
    python bench/serve_cost.py --backbone autoselect-testing/tiny-llava --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
from fractions import Fraction
from pathlib import Path

import torch

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.data import collate
from mlops.backbone import MINI_LLAVA, cpu_has_native_bf16
from serve.config import ServeArgs
from serve.engine import Scorer, load_backbone, prepare
from serve.images import ImageLoader
from serve.schemas import ChatCompletionRequest

from prefill import median_times  # bench/ is on sys.path when run as a script
from serve_load import image_url  # the load bench's image


def measure(backbone, scorer: Scorer, args, budget: float, batch_size: int) -> dict:
    serve_args = ServeArgs(backbone=args.backbone, default_max_tokens=args.max_tokens)
    loader = ImageLoader(serve_args.images)
    request = ChatCompletionRequest.model_validate({
        "model": "bench", "temperature": 0, "max_tokens": args.max_tokens, "autoselect": {"budget": budget},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                  {"type": "text", "text": "Describe the picture."}]}]})
    prepared = prepare(request, scorer, backbone, loader, serve_args)
    model = scorer.model
    batch = collate([prepared.example] * batch_size, model.adapter.pad_token_id, padding_side="left")
    batch.pop("labels")

    def generate(tokens: int):  # min = max: every row runs all steps, as a batch's longest request makes it
        return model.generate(budget=budget, **batch, do_sample=False, max_new_tokens=tokens,
                              min_new_tokens=tokens, pad_token_id=model.adapter.pad_token_id)

    def vision():
        return backbone.vlm.get_image_features(pixel_values=batch["pixel_values"])

    ms = median_times({"prepare": lambda: prepare(request, scorer, backbone, loader, serve_args), "vision": vision,
                       "prefill": lambda: generate(1), "full": lambda: generate(args.max_tokens)}, args.repeats, "cpu")
    prepare_s, vision_s, prefill_s, full_s = (ms[name] / 1e3 for name in ("prepare", "vision", "prefill", "full"))
    decode_step_s = (full_s - prefill_s) / max(args.max_tokens - 1, 1)
    per_batch_s = batch_size * prepare_s + full_s  # one replica thread does both, one after the other
    return {
        "budget": budget, "batch_size": batch_size, "prompt_tokens": prepared.pruned_length(),
        "visual_tokens": f"{prepared.kept_total}/{prepared.tokens_total}",
        "prepare_ms_per_request": 1e3 * prepare_s, "vision_ms_per_batch": 1e3 * vision_s,
        "prefill_ms_per_batch": 1e3 * prefill_s, "llm_prefill_and_scorer_ms_per_batch": 1e3 * (prefill_s - vision_s),
        "decode_ms_per_step": 1e3 * decode_step_s, "generate_ms_per_batch": 1e3 * full_s,
        "requests_per_s_ceiling": batch_size / per_batch_s,
        "requests_per_s_ceiling_one_token": batch_size / (batch_size * prepare_s + prefill_s),
    }


def table(rows: list[dict], max_tokens: int) -> str:
    lines = ["| batch | budget | prompt tokens | prepare ms/req | vision ms | LLM prefill + scorer ms | decode ms/step "
             f"| generate {max_tokens} ms | req/s ceiling | same, 1 token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['budget']:.4g} | {r['prompt_tokens']} | {r['prepare_ms_per_request']:.0f} "
                     f"| {r['vision_ms_per_batch']:.0f} | {r['llm_prefill_and_scorer_ms_per_batch']:.0f} "
                     f"| {r['decode_ms_per_step']:.0f} | {r['generate_ms_per_batch']:.0f} "
                     f"| {r['requests_per_s_ceiling']:.2f} | {r['requests_per_s_ceiling_one_token']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=MINI_LLAVA, help="(default: %(default)s, the real mini-LLaVA)")
    parser.add_argument("--dtype", default="bfloat16" if cpu_has_native_bf16() else "float32",
                        help="(default: what the replica's `auto` picks on this CPU: %(default)s)")
    parser.add_argument("--pruned-budget", default="1/9")
    parser.add_argument("--batch-sizes", default="1,8", help="(default: %(default)s; 8 is the app's max_batch_size)")
    parser.add_argument("--max-tokens", type=int, default=8, help="as bench/serve_load.py (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a replica with 0.5 CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 (decode steps are generate(max) - generate(1))")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, args.dtype)
    # an untrained scorer (as bench/serve_load.py serves): its cost does not depend on its weights
    model = AutoSelectModel.attach(backbone.vlm, AutoSelectConfig(budget=16)).eval()
    scorer = Scorer(model, uri="local", name="bench", version="0", alias=None, run_id=None)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    budgets = {"full": 1.0, "pruned": float(Fraction(args.pruned_budget))}
    rows = [measure(backbone, scorer, args, budget, size) for size in sizes for budget in budgets.values()]
    ratios = {}
    for size in sizes:
        full, pruned = (next(r for r in rows if r["batch_size"] == size and r["budget"] == b) for b in budgets.values())
        ratios[str(size)] = {
            "requests_per_s_ceiling": pruned["requests_per_s_ceiling"] / full["requests_per_s_ceiling"],
            "requests_per_s_ceiling_one_token": pruned["requests_per_s_ceiling_one_token"] / full["requests_per_s_ceiling_one_token"],
            "share_of_full_batch_time_that_does_not_shrink": (
                size * full["prepare_ms_per_request"] + full["vision_ms_per_batch"]
                + (args.max_tokens - 1) * full["decode_ms_per_step"])
                / (size * full["prepare_ms_per_request"] + full["generate_ms_per_batch"]),
        }
    report = {"backbone": args.backbone, "dtype": args.dtype, "threads": args.threads, "max_tokens": args.max_tokens,
              "cpu_native_bf16": cpu_has_native_bf16(), "cpus": os.cpu_count(), "rows": rows,
              "pruned_over_full": ratios}
    print(json.dumps(report, indent=2))
    print(table(rows, args.max_tokens))
    for size, r in ratios.items():
        print(f"batch {size}: pruned/full req/s ceiling {r['requests_per_s_ceiling']:.2f}x "
              f"({r['requests_per_s_ceiling_one_token']:.2f}x with one new token); "
              f"{100 * r['share_of_full_batch_time_that_does_not_shrink']:.0f} % of a full batch's time does not depend on K")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
