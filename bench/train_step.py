"""Training examples/s of the AutoSelect step on the real-weight mini-LLaVA, per training form.

One optimiser step (forward, backward, AdamW) over a batch of scenes caption records (the
recipe's training target), for the paper form (all N gated tokens reach the LLM), the
straight-through form, and each with ``training.candidates`` (the LLM sees the top K plus c*K
drawn tokens). Median of ``--repeats`` steps after a warm-up, forms interleaved; the ratio to the
paper form is what to read (absolute numbers depend on the CPU: the JSON says whether it has
native bf16).

    python bench/train_step.py                       # K = 28 of 256, batch 8, the VLM in float32
    python bench/train_step.py --dtype bfloat16      # where the CPU has avx512_bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from autoselect import AutoSelectConfig, AutoSelectModel, TrainingOptions
from autoselect.data import collate, encode_example
from minillava.aligned import build_aligned_mini_llava
from mlops.backbone import cpu_has_native_bf16
from pipelines.corpora import DEFAULT_OUT, export_corpora, load_records, open_image, record_messages

FORMS = {
    "paper": {},
    "paper+candidates": {"candidates": 1.0},
    "straight_through": {"gate_attention": True, "straight_through": True},
    "straight_through+candidates": {"gate_attention": True, "straight_through": True, "candidates": 1.0},
}


def batch_of(processor, corpora: Path, size: int) -> dict[str, torch.Tensor]:
    records = [r for r in load_records(corpora, "scenes", "train") if r["task"] == "scenes_caption"][:size]
    examples = [encode_example(processor, record_messages(r), [open_image(corpora, r)]) for r in records]
    return collate(examples, processor.tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=28, help="K of the 256 visual tokens (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the frozen VLM's dtype (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per form (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--corpora", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--forms", default=",".join(FORMS), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.corpora / "manifest.json").is_file():
        export_corpora(args.corpora)
    model_dir = build_aligned_mini_llava().path
    vlm = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    batch = batch_of(LlavaProcessor.from_pretrained(model_dir), args.corpora, args.batch_size)
    forms = [f.strip() for f in args.forms.split(",")]
    models, optimizers = {}, {}
    for form in forms:
        torch.manual_seed(0)
        models[form] = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=args.budget, temperature_start=0.5, training=TrainingOptions(**FORMS[form]))).train()
        optimizers[form] = torch.optim.AdamW([p for p in models[form].parameters() if p.requires_grad], lr=1e-4)
    seconds: dict[str, list[float]] = {form: [] for form in forms}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for form in forms:
            started = time.perf_counter()
            loss = models[form](**batch).loss
            loss.backward()
            optimizers[form].step()
            optimizers[form].zero_grad(set_to_none=True)
            if repeat:
                seconds[form].append(time.perf_counter() - started)
    base = statistics.median(seconds[forms[0]])
    result = {
        "bench": "train_step", "backbone": "mini-llava-aligned", "budget": args.budget, "tokens": 256,
        "batch_size": args.batch_size, "dtype": args.dtype, "threads": args.threads,
        "cpu_native_bf16": cpu_has_native_bf16(), "sequence_length": int(batch["input_ids"].shape[1]),
        "forms": {form: {"seconds_per_step": round(statistics.median(s), 3),
                         "examples_per_s": round(args.batch_size / statistics.median(s), 3),
                         f"speedup_vs_{forms[0]}": round(base / statistics.median(s), 2),
                         "config": {"training": FORMS[form]}} for form, s in seconds.items()},
    }
    print(json.dumps(result, indent=2))
    print(f"\n| form (K={args.budget}, batch {args.batch_size}, {args.dtype}) | s / step | examples / s | x {forms[0]} |")
    print("|---|---|---|---|")
    for form, row in result["forms"].items():
        print(f"| {form} | {row['seconds_per_step']} | {row['examples_per_s']} | {row[f'speedup_vs_{forms[0]}']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
