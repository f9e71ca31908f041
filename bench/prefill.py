"""Full vs pruned LLM prefill at LLaVA-1.5-7B geometry, and the scorer's own cost, in one run.

The model is a real ``LlavaForConditionalGeneration`` with LLaVA-1.5's 336 px / patch-14 vision
geometry (576 visual tokens, width 1024) and a LLaMA-2-7B-shaped language model (hidden 4096,
MLP 11008, 32 heads) cut to ``--lm-layers`` decoder layers with random weights, so it fits a
CPU. Prefill is 32 identical decoder layers plus a near-free embedding merge and one LM-head
row, so the full/pruned *ratio* of a few layers is the ratio of the whole 7B prefill; the 7B
prefill time is extrapolated as ``32 / lm_layers`` times the measured one (layer-exact
extrapolation). Timings are medians of interleaved repetitions after a warm-up.

    python bench/prefill.py                       # CPU, fp32
    python bench/prefill.py --device cuda --dtype bfloat16
    python bench/prefill.py --backbones all       # every family's geometry, reduced LM (bench/backbone_shapes.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from autoselect import AutoSelectConfig, AutoSelectModel, gather_tokens, topk_indices
from autoselect.placeholders import prune_placeholders

IMAGE_TOKEN_ID = 32000
FULL_7B_LAYERS = 32
VISUAL_TOKENS = 576  # (336 / 14)^2, CLS dropped


def build_model(lm_layers: int, vision_layers: int, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B geometry with random weights, built directly on ``device`` in ``dtype`` (a 32-layer
    7B never passes through host memory in float32). Shared with ``bench/gpu_check.py``."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
        num_attention_heads=16, image_size=336, patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def elapsed_ms(fn: Callable[[], object], device: str) -> float:
    """One call's wall time, synchronised on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def median_times(cases: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median ms per case: one warm-up call each, then ``repeats`` rounds, interleaved so drift hits
    every case alike."""
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                times[name].append(elapsed_ms(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def prefill_cases(model: AutoSelectModel, budgets: list[int], text_tokens: int, device: str,
                  dtype: torch.dtype, batch_size: int = 1) -> dict[str, Callable[[], object]]:
    """``full`` (all 576 visual tokens), ``pruned_K`` per budget (the scorer's top K, placeholders cut
    to K) and ``scorer`` (scorer + top-K + gather for the smallest K), each one LLM prefill of
    ``batch_size`` prompts with ``logits_to_keep=1``; the vision tower runs once, outside the timed
    calls. Batch 1 is the paper's setting; a server batches, and a GPU at batch 1 mostly waits on
    per-layer launches rather than on the tokens pruning removes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vlm = model.vlm
    n = VISUAL_TOKENS
    before = text_tokens // 10
    ids = torch.cat([
        torch.randint(0, 32000, (batch_size, before)),
        torch.full((batch_size, n), IMAGE_TOKEN_ID),
        torch.randint(0, 32000, (batch_size, text_tokens - before)),
    ], dim=1).to(device)
    pixel_values = torch.randn(batch_size, 3, 336, 336, device=device, dtype=dtype)

    with torch.inference_mode():
        tokens = model.visual_tokens(pixel_values=pixel_values)
        assert tokens.shape[1] == n, tokens.shape

        def prefill(kept: torch.Tensor, input_ids: torch.Tensor) -> None:
            projected = model.adapter.project(kept)
            vlm(input_ids=input_ids, mm_encoder_outputs=model.adapter.encoder_outputs(projected), logits_to_keep=1)

        def select(k: int) -> torch.Tensor:
            return gather_tokens(tokens, topk_indices(model.scorer(tokens), k))

        cases: dict[str, Callable[[], object]] = {"full": lambda: prefill(tokens, ids)}
        logits = model.scorer(tokens)  # once: every budget's kept tokens and placeholders come from it
        for k in budgets:
            indices = topk_indices(logits, k)
            pruned_ids = prune_placeholders(ids, indices, IMAGE_TOKEN_ID, n).input_ids
            cases[f"pruned_{k}"] = lambda kept=gather_tokens(tokens, indices), pruned_ids=pruned_ids: prefill(kept, pruned_ids)
        cases["scorer"] = lambda: select(min(budgets))
    return cases


def budget_rows(med: dict[str, float], budgets: list[int], text_tokens: int) -> dict[str, dict[str, float]]:
    """Per K: measured ms, full/K speedup, the token-count limit (N + text) / (K + text) and the share reached."""
    rows = {}
    for k in budgets:
        limit = (VISUAL_TOKENS + text_tokens) / (k + text_tokens)
        speedup = med["full"] / med[f"pruned_{k}"]
        rows[str(k)] = {
            "prefill_ms_measured": round(med[f"pruned_{k}"], 2),
            "prefill_speedup": round(speedup, 3),
            "compute_limit": round(limit, 3),
            "fraction_of_limit": round(speedup / limit, 3),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--text-tokens", type=int, default=98, help="text tokens around the image (paper FLOPs imply ~98)")
    parser.add_argument("--lm-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=2, help="vision depth (not timed; only feeds the scorer)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per prefill (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json-out", default=None, help="also write the JSON result here")
    parser.add_argument("--backbones", default=None,
                        help="'all' or a comma list of families (bench/backbone_shapes.py): prefill at each family's "
                             "visual-token geometry with a reduced LM, budgets N/3, N/4.5, N/9")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backbones:
        return backbone_sweep(args)

    dtype = getattr(torch, args.dtype)
    vlm = build_model(args.lm_layers, args.vision_layers, args.device, dtype)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=args.budgets[0])).eval()
    n = VISUAL_TOKENS
    med = median_times(prefill_cases(model, args.budgets, args.text_tokens, args.device, dtype, args.batch_size), args.repeats, args.device)

    full_ms = med["full"]
    full_7b_ms = full_ms * FULL_7B_LAYERS / args.lm_layers
    result = {
        "geometry": {"visual_tokens": n, "text_tokens": args.text_tokens, "lm": "llama-2-7b shape",
                     "lm_layers_run": args.lm_layers, "batch_size": args.batch_size, "extrapolation": f"layer-exact, x{FULL_7B_LAYERS / args.lm_layers:g}"},
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "full_prefill_ms_measured": round(full_ms, 2),
        "full_prefill_ms_7b_extrapolated": round(full_7b_ms, 1),
        "scorer_ms": round(med["scorer"], 3),
        "scorer_fraction_of_full_prefill": round(med["scorer"] / full_7b_ms, 5),
        "budgets": budget_rows(med, args.budgets, args.text_tokens),
    }
    result["prefill_speedup"] = {k: v["prefill_speedup"] for k, v in result["budgets"].items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")

    print(f"\n| K | prefill ms ({args.lm_layers} layer{'s' if args.lm_layers > 1 else ''}) | speedup | token limit | of limit |")
    print("|---|---|---|---|---|")
    print(f"| {n} (full) | {full_ms:.1f} | 1.00x | 1.00x | - |")
    for k, row in result["budgets"].items():
        print(f"| {k} | {row['prefill_ms_measured']:.1f} | {row['prefill_speedup']:.2f}x | {row['compute_limit']:.2f}x | {100 * row['fraction_of_limit']:.0f}% |")
    print(f"\nscorer + top-K: {med['scorer']:.2f} ms = {100 * result['scorer_fraction_of_full_prefill']:.2f}% "
          f"of the extrapolated 7B full prefill ({full_7b_ms:.0f} ms)")


RATIOS = {"N/3": 1 / 3, "N/4.5": 1 / 4.5, "N/9": 1 / 9}


def backbone_sweep(args) -> None:
    """Full vs pruned prefill for every family at its real token layout (one run, interleaved)."""
    from backbone_shapes import SHAPES, prompt  # bench/ is on sys.path when run as a script

    names = sorted(SHAPES) if args.backbones == "all" else args.backbones.split(",")
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown backbone(s) {unknown}; known: {', '.join(sorted(SHAPES))}")
    dtype = getattr(torch, args.dtype)
    results = {}
    for name in names:
        torch.manual_seed(0)
        shape = SHAPES[name]()
        vlm = shape.vlm.to(device=args.device, dtype=dtype).eval()
        model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=1.0)).eval()
        image_inputs = {k: v.to(args.device) for k, v in shape.image_inputs.items()}
        image_inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in image_inputs.items()}
        text = {k: v.to(args.device) for k, v in prompt(shape, args.text_tokens).items()}
        cases, lengths, kept = {}, {}, {}
        with torch.inference_mode():
            for label, budget in {"full": 1.0, **RATIOS}.items():
                kwargs = model.pruned_inputs(dict(image_inputs), dict(text), budget, for_generation=False)
                lengths[label] = int(kwargs["input_ids"].shape[1])
                kept[label] = sum(len(i) for i in model.last_selection.per_image())
                cases[label] = lambda kwargs=kwargs: vlm(**kwargs, logits_to_keep=1, use_cache=False)
        med = median_times(cases, args.repeats, args.device)
        results[name] = {
            "geometry": shape.note, "visual_tokens": kept["full"], "sequence_full": lengths["full"],
            "full_prefill_ms": round(med["full"], 1),
            "budgets": {label: {"kept_tokens": kept[label], "sequence": lengths[label],
                                "prefill_speedup": round(med["full"] / med[label], 3),
                                "token_limit": round(lengths["full"] / lengths[label], 3)} for label in RATIOS},
        }
        del shape, vlm, model
    result = {"lm": "reduced (hidden 2048, 2 layers), random", "text_tokens": args.text_tokens, "device": args.device,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "repeats": args.repeats, "backbones": results}
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text_out + "\n")
    print("\n| backbone | N | sequence | " + " | ".join(f"{label} speedup (limit)" for label in RATIOS) + " |")
    print("|---|---|---|" + "---|" * len(RATIOS))
    for name, row in results.items():
        cells = " | ".join(f"{b['prefill_speedup']:.2f}x ({b['token_limit']:.2f}x)" for b in row["budgets"].values())
        print(f"| {name} | {row['visual_tokens']} | {row['sequence_full']} | {cells} |")


if __name__ == "__main__":
    main()
