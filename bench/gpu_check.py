"""The prepared GPU check: what to run, in one go, when a session is lent a GPU (issue #17).

Three parts, each recorded in one JSON file (``--out``) and a printed table:

* ``prefill``: full vs pruned LLM prefill at LLaVA-1.5-7B geometry with the *whole* 32-layer
  LLaMA-2-7B-shaped LM (random weights built directly on the device, SDPA, bf16 on CUDA) and a
  CLIP-L/336 vision tower (576 visual tokens, width 1024, patch 14): 576 vs K = 192/128/64 tokens,
  medians after a warm-up, CUDA-synchronised, full/K ratios; and the scorer's own milliseconds
  (scorer + top-K + gather on 576 tokens). Paper (A6000): 118.66 -> 41.61 ms = 2.85x at K = 64,
  scorer 0.69 ms. The model and the timed calls are ``bench/prefill.py``'s.
* ``training``: a few optimiser steps of AutoSelectModel in train mode on the tiny built-in LLaVA
  (``autoselect.testing.build_tiny_llava``) on the device: finite losses, the scorer's weights move,
  the frozen VLM does not.
* ``deepspeed``: the same steps under DeepSpeed ZeRO-2, only where ``import deepspeed`` works on a
  CUDA device; otherwise skipped with the reason recorded.

It imports only torch, transformers and this repository's ``autoselect`` (no Ray, DeepSpeed or
MLflow), since the device machine has only PyTorch and transformers. ``--device cuda`` without
CUDA fails at once (exit 2); a failed part is recorded with its error and makes the exit status 1.

    bash bench/gpu_check.sh                                  # on the device: $OUT/gpu_check.json
    python bench/gpu_check.py --device cpu --lm-layers 2 --vision-layers 2 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlavaForConditionalGeneration

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from prefill import FULL_7B_LAYERS, VISUAL_TOKENS, budget_rows, build_model, median_times, prefill_cases

PAPER = {"device": "RTX A6000", "full_prefill_ms": 118.66, "prefill_ms_k64": 41.61, "speedup_k64": 2.85, "scorer_ms": 0.69}
REQUIRED_PARTS = ("prefill", "training")


class CheckError(SystemExit):
    """A precondition that makes the whole check pointless (exit 2, message on stderr)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="the VLMs' dtype; auto: bfloat16 on cuda, float32 on cpu (the scorer is always float32)")
    parser.add_argument("--lm-layers", type=int, default=FULL_7B_LAYERS,
                        help="decoder layers of the 7B-shaped LM (default: %(default)s, the whole LLaMA-2-7B depth)")
    parser.add_argument("--vision-layers", type=int, default=24,
                        help="CLIP-L layers (default: %(default)s, CLIP-L/336's depth; not timed, it only feeds the "
                             "scorer, so a CPU smoke run may cut it to 2)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64], help="(default: %(default)s)")
    parser.add_argument("--text-tokens", type=int, default=98, help="text tokens around the image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts per timed prefill (default: %(default)s, the paper's setting)")
    parser.add_argument("--scorer-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the scorer's dtype in the prefill part (default: %(default)s, as the product runs it)")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds after the warm-up (default: %(default)s)")
    parser.add_argument("--train-steps", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check.json"), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def environment(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_from": str(Path(transformers.__file__).parent),  # a carried wheel shows here
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if args.device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def preflight(args: argparse.Namespace) -> None:
    """Fail before any work where the run could only waste device time."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckError(
            f"gpu_check: --device cuda was asked for, but torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
            "sees no CUDA device; run on a machine with a GPU, or pass --device cpu for a smoke run")
    if "mm_encoder_outputs" not in inspect.signature(LlavaForConditionalGeneration.forward).parameters:
        raise CheckError(
            f"gpu_check: transformers {transformers.__version__} has no mm_encoder_outputs seam, which autoselect "
            "needs (the project pins transformers~=5.23); carry a transformers 5.23 wheel in .whl/ "
            "(docs/benchmarks.md, GPU check)")


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_prefill(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    started = time.perf_counter()
    vlm = build_model(args.lm_layers, args.vision_layers, args.device, dtype)
    built_s = time.perf_counter() - started
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=max(args.budgets))).eval()
    model.scorer.to(getattr(torch, args.scorer_dtype))  # the scorer casts its input to its own dtype
    cases = prefill_cases(model, args.budgets, args.text_tokens, args.device, dtype, args.batch_size)
    med = median_times(cases, args.repeats, args.device)
    result = {
        "status": "ok",
        "geometry": {"visual_tokens": VISUAL_TOKENS, "text_tokens": args.text_tokens, "vision": "CLIP-L/336 (width 1024, patch 14)",
                     "vision_layers": args.vision_layers, "lm": "LLaMA-2-7B shape (hidden 4096, MLP 11008, 32 heads, vocab 32064)",
                     "lm_layers": args.lm_layers, "batch_size": args.batch_size, "attention": "sdpa", "weights": "random"},
        "repeats": args.repeats, "build_seconds": round(built_s, 1),
        "full_prefill_ms": round(med["full"], 3),
        "full_prefill_ms_32_layers": round(med["full"] * FULL_7B_LAYERS / args.lm_layers, 2),
        "budgets": budget_rows(med, args.budgets, args.text_tokens),
        "scorer_ms": round(med["scorer"], 3),
        "scorer_measures": f"scorer + top-K + gather on {VISUAL_TOKENS} tokens (K = {min(args.budgets)}), {args.scorer_dtype} scorer, "
                           f"batch {args.batch_size}",
        "scorer_fraction_of_full_prefill": round(med["scorer"] / (med["full"] * FULL_7B_LAYERS / args.lm_layers), 5),
        "peak_memory_gib": peak_memory_gib(args.device),
        "paper": PAPER,
    }
    result["prefill_speedup"] = {k: row["prefill_speedup"] for k, row in result["budgets"].items()}
    del cases, model, vlm
    release(args.device)
    return result


def tiny_batch(vlm: torch.nn.Module, device: str, dtype: torch.dtype, size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random text around the image placeholders and random pixels: no processor, no PIL."""
    config = vlm.config
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2  # CLS dropped ("default" strategy)
    generator = torch.Generator().manual_seed(seed)
    vocab, image_id = config.text_config.vocab_size, config.image_token_id
    words = lambda count: torch.randint(4, vocab, (size, count), generator=generator)  # noqa: E731  (ids 0-3: specials)
    input_ids = torch.cat([words(4), torch.full((size, n), image_id), words(12)], dim=1)
    assert (input_ids == image_id).sum() == size * n, "a random word hit the image token id"
    labels = input_ids.masked_fill(input_ids == image_id, -100)
    pixels = torch.randn(size, 3, vision.image_size, vision.image_size, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, "pixel_values": pixels}
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def tiny_autoselect(device: str, dtype: torch.dtype) -> tuple[AutoSelectModel, dict[str, torch.Tensor]]:
    vlm, _processor = build_tiny_llava(seed=0)
    vlm.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, temperature_start=0.5)).train()
    return model, tiny_batch(vlm, device, dtype)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def largest_change(before: dict[str, torch.Tensor], module: torch.nn.Module) -> float:
    return max(float((p.detach().float() - before[name]).abs().max()) for name, p in module.named_parameters())


def training_summary(model: AutoSelectModel, losses: list[float], step_ms: list[float],
                     scorer_before: dict[str, torch.Tensor], vlm_before: dict[str, torch.Tensor]) -> dict[str, Any]:
    scorer_change = largest_change(scorer_before, model.scorer)
    vlm_change = largest_change(vlm_before, model.vlm)
    return {
        "status": "ok" if all(math.isfinite(x) for x in losses) and scorer_change > 0 and vlm_change == 0 else "failed",
        "steps": len(losses), "losses": [round(x, 5) for x in losses],
        "losses_finite": all(math.isfinite(x) for x in losses),
        "scorer_moved": scorer_change > 0, "scorer_max_abs_change": scorer_change,
        "vlm_unchanged": vlm_change == 0,
        "step_ms_median": round(sorted(step_ms)[len(step_ms) // 2], 2),
    }


def run_training(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    model, batch = tiny_autoselect(args.device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scorer_before, vlm_before = weights(model.scorer), weights(model.vlm)
    losses, step_ms = [], []
    for _ in range(args.train_steps):
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a sync on CUDA, so the step's time is complete
        step_ms.append((time.perf_counter() - started) * 1e3)
    result = {"model": "autoselect.testing.build_tiny_llava (64 visual tokens), K = 16, AdamW lr 1e-3",
              **training_summary(model, losses, step_ms, scorer_before, vlm_before)}
    del model, optimizer
    release(args.device)
    return result


def run_deepspeed(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """ZeRO-2 on one process: only where DeepSpeed imports and CUDA is there."""
    if args.device != "cuda":
        return {"status": "skipped", "reason": "ZeRO-2 is checked on CUDA only"}
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped", "reason": "deepspeed is not installed on this machine (carry it as a wheel to check ZeRO-2)"}
    import deepspeed  # only here: the device machine usually has none

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    model, batch = tiny_autoselect(args.device, dtype)
    config = {
        "train_micro_batch_size_per_gpu": int(batch["input_ids"].shape[0]), "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": False},  # the trainable scorer and denoiser are float32 whatever the VLM's dtype
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    scorer_before, vlm_before = weights(model.scorer), weights(model.vlm)
    losses, step_ms = [], []
    for _ in range(args.train_steps):
        started = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        step_ms.append((time.perf_counter() - started) * 1e3)
    return {"deepspeed": deepspeed.__version__, "zero_stage": 2,
            **training_summary(model, losses, step_ms, scorer_before, vlm_before)}


PARTS = {"prefill": run_prefill, "training": run_training, "deepspeed": run_deepspeed}


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\nGPU check on {env['device_name']} ({env['device']}, {env['dtype']}); torch {env['torch']}, "
          f"transformers {env['transformers']}; {report['seconds']} s; ok: {report['ok']}")
    prefill = report["parts"]["prefill"]
    if prefill.get("status") == "ok":
        print(f"\n| K | prefill ms ({prefill['geometry']['lm_layers']} LM layers, batch {prefill['geometry']['batch_size']}) "
              "| full / K | token limit |")
        print("|---|---|---|---|")
        print(f"| {VISUAL_TOKENS} (full) | {prefill['full_prefill_ms']:.2f} | 1.00x | 1.00x |")
        for k, row in prefill["budgets"].items():
            print(f"| {k} | {row['prefill_ms_measured']:.2f} | {row['prefill_speedup']:.2f}x | {row['compute_limit']:.2f}x |")
        print(f"\nscorer + top-K + gather on {VISUAL_TOKENS} tokens: {prefill['scorer_ms']:.3f} ms "
              f"(paper: {PAPER['scorer_ms']} ms; full prefill {PAPER['full_prefill_ms']} ms -> "
              f"{PAPER['prefill_ms_k64']} ms = {PAPER['speedup_k64']}x at K = 64 on an {PAPER['device']})")
    for name, part in report["parts"].items():
        if name == "prefill" and part.get("status") == "ok":
            continue
        detail = part.get("reason") or part.get("error") or (
            f"losses {part['losses']}, scorer moved: {part['scorer_moved']}, VLM unchanged: {part['vlm_unchanged']}, "
            f"{part['step_ms_median']} ms/step" if "losses" in part else "")
        print(f"{name}: {part['status']}: {detail}")


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, {"auto": "bfloat16" if args.device == "cuda" else "float32"}.get(args.dtype, args.dtype))
    report: dict[str, Any] = {
        "check": "bench/gpu_check.py", "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv, "environment": environment(args, dtype), "parts": {}, "skipped": [],
    }
    started = time.perf_counter()
    try:
        preflight(args)
    except CheckError as error:
        report.update(ok=False, error=error.message, seconds=0.0)
        write(report, args.out)
        print(error.message, file=sys.stderr)
        raise
    for name, part in PARTS.items():
        try:
            report["parts"][name] = part(args, dtype)
        except Exception as error:  # noqa: BLE001  (record it, go on with the next part)
            report["parts"][name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc(limit=8)}
            with contextlib.suppress(Exception):
                release(args.device)
        if report["parts"][name]["status"] == "skipped":
            report["skipped"].append({"part": name, "reason": report["parts"][name]["reason"]})
        write(report, args.out)  # after each part, so a run cut short still leaves what it measured
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(report["parts"][name]["status"] == "ok" for name in REQUIRED_PARTS)
    write(report, args.out)
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
