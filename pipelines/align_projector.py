"""Stage-1 alignment of the real-weight mini-LLaVA: the VLM's own projector-only training.

DINOv2-S/14 and SmolLM2-135M stay frozen; only ``multi_modal_projector`` learns, with the
next-token loss on the answers of the packaged corpora's TRAIN splits (pipelines/packaged_corpora.py).
The frozen encoder's visual tokens are computed once and cached. Then the VAL half of the held-out
splits (the evaluation CLI's ``split_of``; the test half is left for the reported run) is scored at
full tokens (256 per image): Fashion-MNIST 10-way and Open Clip Art categories, each answer chosen
by the LM's log-likelihood of every candidate answer.

    python pipelines/align_projector.py --steps 200 --out-dir artifacts/mini-llava --eval-initial

Writes OUT_DIR/projector.safetensors (projector weights, float32) and OUT_DIR/metrics.json (the
exact command, settings, loss curve, timings, held-out accuracies); --out-model DIR also writes
a full model folder (LlavaForConditionalGeneration / AutoProcessor .from_pretrained).

--lora-rank R (8 is a good start) also trains a LoRA on the LM's attention (--lora-targets for more), jointly with the
projector (pipelines/align/lora.py, PEFT; --lora-lr for its own, usually smaller, peak LR): the
projector alone cannot learn to read a small object in a scene (docs/scenes.md). The adapter is
written to OUT_DIR/lm_lora.safetensors (with the projector's backbone identity check) and merged
into the LM weights (minillava.lora, no PEFT) for scoring and --out-model, which stays a plain
LlavaForConditionalGeneration. The same weights, built later from the two files:

    python pipelines/build_backbone.py --projector OUT_DIR/projector.safetensors --lora OUT_DIR/lm_lora.safetensors

--token-drop P shows a share P of the training examples only a subset of their visual tokens
(--token-keep LOW,HIGH, fractions of N; scattered or a grid window, re-packed as at inference;
pipelines/align/token_drop.py), so the shared backbone learns to read a pruned image at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from minillava.aligned import backbone_identity, load_projector, projector_module, save_aligned_model, save_projector
from minillava.assets import file_sha256
from minillava.cache import read_manifest as read_build_manifest
from minillava.mini_llava import DEFAULT_CACHE_DIR, build_mini_llava
from pipelines.align.evaluate import choice_accuracy, greedy_answers
from pipelines.align.features import cached_features, encode_records, features_key, source_key
from pipelines.align.token_drop import TokenDrop
from pipelines.align.train import TrainConfig, train_projector
from pipelines.corpora import DEFAULT_OUT, FILES, export_corpora, load_records, read_manifest
from pipelines.corpora.common import balanced_subset
from pipelines.evaluation.tasks.base import split_of

EVAL_FILES = {"fmnist_class": "fashion_mnist", "clipart_category": "openclipart"}
DEFAULT_WEIGHTS = "fmnist_class=0.4,clipart_category=0.4,clipart_title=0.2"


def parse_weights(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT,..., got {text!r}")
    return {task.strip(): float(weight) for task, weight in pairs}


def parse_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        low, high = (float(Fraction(p.strip())) for p in parts)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (fractions of the visual tokens), got {text!r}") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--corpora", type=Path, default=DEFAULT_OUT, help="exported corpora; exported with default settings if absent (default: %(default)s)")
    add("--backbone-cache", type=Path, default=DEFAULT_CACHE_DIR, help="mini-LLaVA build cache (default: %(default)s)")
    add("--out-dir", type=Path, default=Path("outputs/align"), help="projector.safetensors + metrics.json go here (default: %(default)s)")
    add("--out-model", type=Path, default=None, help="also write a full aligned model folder here")
    add("--feature-cache", type=Path, default=Path(".cache/alignment"), help="cached frozen-encoder features (default: %(default)s)")
    add("--task-weights", type=parse_weights, default=parse_weights(DEFAULT_WEIGHTS),
        help=f"share of each batch per task; tasks not named are not trained on (default: {DEFAULT_WEIGHTS})")
    add("--steps", type=int, default=d.steps, help="optimiser steps (default: %(default)s)")
    add("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    add("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default: %(default)s)")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up, then cosine to 0 (default: %(default)s)")
    add("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    add("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 for none (default: %(default)s)")
    add("--compute-dtype", choices=("bfloat16", "float32"), default=d.compute_dtype,
        help="dtype of the frozen parts during training; the projector trains in float32 (default: %(default)s)")
    add("--seed", type=int, default=d.seed, help="batch order seed (default: %(default)s)")
    add("--threads", type=int, default=1, help="torch CPU threads; 1 leaves a core to others (default: %(default)s)")
    add("--eval-limit", type=int, default=None, help="score at most this many held-out records per task, class-balanced (default: all)")
    add("--init-projector", type=Path, default=None,
        help="continue from this projector.safetensors (e.g. a committed one) instead of a fresh projector")
    add("--lora-rank", type=int, default=d.lora_rank,
        help="also train a LoRA of this rank on the LM's attention (q/k/v/o_proj; --lora-targets for more), e.g. 8; 0: projector only (default: %(default)s)")
    add("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha, the update is scaled by alpha / rank (default: 2 x rank)")
    add("--lora-lr", type=float, default=d.lora_lr, help="peak learning rate of the LoRA weights (default: --lr)")
    add("--lora-targets", type=parse_targets, default=None,
        help="comma-separated linears of each LM layer to adapt, by name (q_proj, ..., down_proj) or group "
        "(attention = q/k/v/o_proj, mlp = gate/up/down_proj) (default: attention, or --init-lora's)")
    add("--init-lora", type=Path, default=None,
        help="continue from this LoRA adapter (lm_lora.safetensors, or the run folder holding it); its rank, "
        "alpha and targets apply, or, with a higher --lora-rank and/or more --lora-targets, it is widened: "
        "the new adapter starts as the saved one (a smaller rank, fewer targets or another alpha at its rank is an error)")
    add("--token-drop", type=float, default=0.0,
        help="share of training examples that see only a subset of their visual tokens (default: %(default)s, off)")
    add("--token-keep", type=parse_range, default=(TokenDrop.keep_min, TokenDrop.keep_max),
        help="fewest,most tokens a dropped example keeps, as fractions of N (default: 1/16,1/2)")
    add("--eval-initial", action="store_true", help="also score the untrained projector first")
    add("--initial-eval-limit", type=int, default=100, help="records per task for --eval-initial (default: %(default)s)")
    add("--eval-batch-size", type=int, default=16, help="(default: %(default)s)")
    add("--examples", type=int, default=5, help="greedy free-form answers to record per task (default: %(default)s)")
    return parser


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def _made_by(projector: Path) -> dict | None:
    """The run record next to a projector (its metrics.json), so a chain of runs stays reproducible."""
    metrics = projector.parent / "metrics.json"
    if not metrics.is_file():
        return None
    run = json.loads(metrics.read_text())
    return {k: run.get(k) for k in ("command", "git_commit", "init_projector", "init_lora")}


def parse_targets(text: str) -> tuple[str, ...]:
    """``attention,mlp`` or linear names -> the LM linears to adapt, each once, in layer order."""
    from minillava.lora import KNOWN_TARGETS, TARGET_GROUPS, canonical_targets

    names = [n for part in text.split(",") if part.strip() for n in TARGET_GROUPS.get(part.strip(), (part.strip(),))]
    unknown = [n for n in names if n not in KNOWN_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown LoRA target(s) {unknown or text!r}: use {', '.join(TARGET_GROUPS)} or {', '.join(KNOWN_TARGETS)}")
    return canonical_targets(names)


def lora_settings(args: argparse.Namespace) -> dict:
    """TrainConfig's LoRA fields: from the flags, or from --init-lora's adapter (widened when the
    flags ask for a higher rank or more targets)."""
    targets = {"lora_targets": args.lora_targets} if args.lora_targets else {}
    if args.init_lora is None:
        if args.lora_rank < 0:
            raise SystemExit(f"--lora-rank must be >= 0, got {args.lora_rank}")
        if args.lora_rank == 0 and (args.lora_alpha is not None or args.lora_lr is not None or targets):
            raise SystemExit("--lora-alpha / --lora-lr / --lora-targets need --lora-rank R > 0 (or --init-lora)")
        return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_lr": args.lora_lr, **targets}
    from minillava.lora import LoraSettings, read_lora
    from pipelines.align.lora import check_widening

    _, saved = read_lora(args.init_lora)
    rank = args.lora_rank or saved.rank
    widened = rank != saved.rank or set(targets.get("lora_targets", saved.targets)) != set(saved.targets)
    alpha = args.lora_alpha if args.lora_alpha is not None else (None if widened else saved.alpha)
    wanted = LoraSettings(rank, alpha, targets.get("lora_targets", saved.targets))
    try:
        check_widening(saved, wanted, args.init_lora)
    except ValueError as err:
        raise SystemExit(f"--init-lora: {err}") from None
    return {"lora_rank": wanted.rank, "lora_alpha": wanted.alpha, "lora_lr": args.lora_lr, "lora_targets": wanted.targets}


def load_vlm(path: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def evaluate(vlm, processor, corpora: Path, manifest: dict, limit: int | None, batch_size: int, examples: int, tag: str) -> dict:
    results = {}
    for task, name in EVAL_FILES.items():
        if task not in manifest["tasks"]:
            continue
        val = [r for r in load_records(corpora, name, "heldout") if split_of(r["id"]) == "val"]
        records = balanced_subset(val, limit)
        started = time.perf_counter()
        result = choice_accuracy(vlm, processor, corpora, records, manifest["tasks"][task]["choices"], batch_size, desc=f"{tag} {task}")
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["split"] = "val"
        if examples:
            result["greedy_examples"] = greedy_answers(vlm, processor, corpora, balanced_subset(records, examples))
        results[task] = result
        print(f"  {tag} {task}: accuracy {result['accuracy']:.3f} on {result['n']} held-out val (chance {result['chance']:.3f})")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lora = lora_settings(args)  # before any slow step: a bad combination fails at once
    try:
        token_drop = TokenDrop(args.token_drop, *args.token_keep)
    except ValueError as err:
        raise SystemExit(f"--token-drop / --token-keep: {err}") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if argv is None else "pipelines/align_projector.py", *(argv if argv is not None else sys.argv[1:])])

    print("[1/6] corpora and backbone")
    corpus_build = export_corpora(args.corpora) if not (args.corpora / "manifest.json").is_file() else None
    manifest = read_manifest(args.corpora)
    corpus_inputs = (read_build_manifest(args.corpora) or {}).get("inputs", {})
    built = build_mini_llava(cache_dir=args.backbone_cache)
    identity = backbone_identity(built)
    model_dir = built["mini_llava"].path
    vlm, processor = load_vlm(model_dir), LlavaProcessor.from_pretrained(model_dir)

    print("[2/6] encoding the train splits and caching frozen DINOv2 features")
    records = [r for name in FILES for r in load_records(args.corpora, name, "train") if r["task"] in args.task_weights]
    t0 = time.perf_counter()
    encoded = encode_records(processor, args.corpora, records)
    key = features_key(identity, corpus_inputs, encoded.images)
    encoded.features, reused = cached_features(
        vlm, processor, args.corpora, encoded, args.feature_cache, key, source=source_key(identity, corpus_inputs)
    )
    feature_seconds = time.perf_counter() - t0
    tasks = {t: sum(r["task"] == t for r in records) for t in sorted(args.task_weights)}
    print(f"  {len(records)} records {tasks}, {len(encoded.images)} images, features {'reused' if reused else 'computed'} in {feature_seconds:.0f} s")

    init = None
    if args.init_projector is not None:
        load_projector(vlm, args.init_projector, identity)
        init = {"path": str(args.init_projector), "sha256": file_sha256(args.init_projector), "made_by": _made_by(args.init_projector)}
        print(f"  continuing from {args.init_projector}")
    init_lora = None
    if args.init_lora is not None:
        from minillava.lora import LoraSettings, lora_file, read_lora
        from pipelines.align.lora import load_lora

        init_path = lora_file(args.init_lora)
        wanted = LoraSettings(lora["lora_rank"], lora["lora_alpha"], lora["lora_targets"])
        saved = read_lora(init_path)[1]
        load_lora(vlm, init_path, identity, widen_to=wanted)
        init_lora = {"path": str(init_path), "sha256": file_sha256(init_path), "made_by": _made_by(init_path)}
        if wanted != saved:
            init_lora["widened_from"] = {"rank": saved.rank, "alpha": saved.alpha, "targets": list(saved.targets)}
        print(f"  continuing the LM's LoRA from {init_path}" + (f", widened from {saved} to {wanted}" if wanted != saved else ""))

    initial = None
    if args.eval_initial:
        print("[3/6] scoring the untrained projector on held-out records")
        initial = evaluate(vlm, processor, args.corpora, manifest, args.initial_eval_limit, args.eval_batch_size, args.examples, "initial")

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, compute_dtype=args.compute_dtype, task_weights=args.task_weights,
        token_drop=token_drop, **lora,
    )
    what = f"the projector + a rank-{config.lora_rank} LoRA on the LM" if config.lora_rank else "the projector"
    print(f"[4/6] training {what}: {config.steps} steps x batch {config.batch_size}, {args.threads} thread(s)")
    t0 = time.perf_counter()
    history = train_projector(vlm, encoded, config, processor.tokenizer.pad_token_id)
    train_seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in history]
    run = {
        "command": command,
        "git_commit": _git_commit(),
        "train": {**asdict(config), "threads": args.threads, "records_per_task": tasks, "images": len(encoded.images)},
        "init_projector": init,
        "trainable_parameters": {"projector": sum(p.numel() for p in projector_module(vlm).parameters())},
        "loss": {
            "first10_mean": round(sum(losses[:10]) / len(losses[:10]), 4),
            "last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "per_step": [round(x, 4) for x in losses],
        },
        "seconds": {"features": round(feature_seconds, 1), "features_reused": reused, "train": round(train_seconds, 1),
                    "train_per_step_median": round(sorted(h["seconds"] for h in history)[len(history) // 2], 2)},
        "backbone": identity,
        "corpora": {"dir": str(args.corpora), "files": manifest["files"], "skipped": manifest["skipped"], "settings": manifest["settings"]},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
    }
    projector_path = save_projector(vlm, args.out_dir / "projector.safetensors", identity, {"command": command, "steps": config.steps})
    print(f"  loss {run['loss']['first10_mean']:.3f} (first 10) -> {run['loss']['last10_mean']:.3f} (last 10) in {train_seconds:.0f} s; saved {projector_path}")
    lora_path = None
    if config.lora_rank:
        from minillava.lora import ADAPTER_FILE
        from pipelines.align.lora import attached_settings, lora_parameters, save_lora

        settings = attached_settings(vlm)
        lora_path = save_lora(vlm, args.out_dir / ADAPTER_FILE, identity,
                              {"command": command, "steps": config.steps, "projector_sha256": file_sha256(projector_path)})
        run["trainable_parameters"]["lora"] = sum(p.numel() for p in lora_parameters(vlm))
        run["lora"] = {"rank": settings.rank, "alpha": settings.alpha, "targets": list(settings.targets),
                       "lr": config.lr if config.lora_lr is None else config.lora_lr, "file": str(lora_path),
                       "sha256": file_sha256(lora_path), "init_lora": init_lora, "merged_for_eval_and_out_model": True}
        print(f"  saved the LM's LoRA ({run['trainable_parameters']['lora']:,} parameters) to {lora_path}")

    print(f"[5/6] scoring the aligned {'projector + merged LoRA' if lora_path else 'projector'} on held-out records (float32, full 256 visual tokens)")
    del vlm
    aligned = load_vlm(model_dir)  # fresh float32 weights: the bf16 training copy is not what users load
    load_projector(aligned, projector_path, identity)
    if lora_path is not None:
        from minillava.lora import merge_lora

        merge_lora(aligned, lora_path, identity)  # W += (alpha / rank) B @ A, no PEFT: what the mini-LLaVA build does
    t0 = time.perf_counter()
    run["heldout"] = evaluate(aligned, processor, args.corpora, manifest, args.eval_limit, args.eval_batch_size, args.examples, "aligned")
    if initial is not None:
        run["heldout_initial_projector"] = initial
    run["seconds"]["eval"] = round(time.perf_counter() - t0, 1)
    run["seconds"]["total"] = round(time.time() - started, 1)
    (args.out_dir / "metrics.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"[6/6] wrote {args.out_dir / 'metrics.json'}")
    if args.out_model is not None:
        notes = {k: run[k] for k in ("command", "backbone", "heldout")}
        if lora_path is not None:
            notes["lora"] = run["lora"]  # merged into the LM weights of this folder
        save_aligned_model(aligned, processor, args.out_model, notes)
        print(f"  full aligned model in {args.out_model}")
    if corpus_build is not None:
        print(f"  (corpora were exported into {corpus_build.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
