"""Compare AutoSelect with the training-free baselines on held-out tasks, in one run.

    python pipelines/evaluate.py --model .cache/backbones/mini-llava --autoselect outputs/scorer \
        --budgets 28 57 85 --limit 200 --out outputs/eval
    python pipelines/evaluate.py --model autoselect-testing/tiny-llava \
        --autoselect models:/autoselect-scorer@champion --budgets 1/9 2/9 1/3 --tasks markers,spatial_markers

Every method (all tokens, AutoSelect, random, uniform, pooled, FastV, VisionZip, DivPrune, and
the oracle on tasks that know where their answer is) scores the same encoded batches under one
position policy. Held-out data comes in two fixed halves: choose anything (seed, checkpoint,
recipe) on ``--split val`` and report ``--split test`` once. Multiple-choice tasks pick the candidate whose full answer turn has the
highest summed log-likelihood; caption_nll is the mean NLL of the reference answer's tokens.
Tasks whose data is absent (e.g. the packaged corpora were not exported) are reported as
skipped, with the reason.

--autoselect-decode dpp also runs the scorer under the greedy DPP-MAP decode (inference.decode="dpp",
docs/method.md) as the method autoselect-dpp, paired with autoselect (the scorer as saved) on the same
examples (topk_dpp: the top-K for part of K, the DPP for the rest, as autoselect-topk_dpp): a decode
is chosen on --split val, never on test.

Outputs in --out: report.json, report.md, retention_vs_budget.png, kept_patches.png.

--tag-version models:/NAME/VERSION (models:/NAME@ALIAS or /latest: resolved to a version before the run)
also writes AutoSelect's results to that registered version as tags, the fractions
`pipelines/promote.py --require` gates on (retention_avg, retention_margin_vs_random, per task and
budget retention.TASK.kK, ...; see pipelines/evaluation/report.py: version_tags) and where they came
from (eval_split, eval_n, eval_dtype, eval_position_policy, ...). It is refused before anything is
evaluated when the version does not exist, when --autoselect is not given, or when --autoselect is a
different registered version (a scorer folder is tagged with a warning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from autoselect.backbones import get_adapter
from autoselect.config import DECODES, DPP_DECODES, POSITION_POLICIES
from autoselect.pruners import available_pruners
from mlops.backbone import MINI_LLAVA, TINY_LLAVA
from pipelines.corpora import DEFAULT_OUT
from pipelines.evaluation import reuse
from pipelines.evaluation.methods import AUTOSELECT, FULL, baseline_settings, build_methods, decode_variants
from pipelines.evaluation.oracle import ORACLE
from pipelines.evaluation.plots import kept_patches_plot, processed_image, retention_plot
from pipelines.evaluation.report import Budget, build_report, example_ids, markdown, parse_budget, version_tags
from pipelines.evaluation.runner import evaluate, to_device
from pipelines.evaluation.scoring import SCORING, probe_prompt, prompt_inputs, task_context
from pipelines.evaluation.tasks import TASKS, Example, load_tasks
from pipelines.evaluation.tasks.base import EVAL_SPLITS
from pipelines.training.config import DTYPES

DEFAULT_BUDGETS = ["1/9", "2/9", "1/3"]  # 64 / 128 / 192 of LLaVA-1.5's 576 tokens; 28 / 57 / 85 of 256


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=MINI_LLAVA, help=f"local HF VLM folder, the built-in real {MINI_LLAVA} (default) or a tiny id ({TINY_LLAVA})")
    add("--autoselect", help="trained scorer: a save_pretrained folder or models:/name@alias (MLflow registry)")
    add("--budgets", nargs="+", default=DEFAULT_BUDGETS, help="K per image (int) or a ratio of N (0.25, 1/9) (default: %(default)s)")
    add("--pruners", type=names, default=None,
        help=f"comma-separated methods from {AUTOSELECT},{','.join(available_pruners())},{ORACLE} "
        "(default: all of them; autoselect only when --autoselect is given; the oracle runs only on tasks with "
        "answer boxes). All tokens always run, as the reference.")
    add("--split", choices=EVAL_SPLITS, default="val",
        help="held-out half: val to choose anything, test to report the chosen recipe once (default: %(default)s)")
    add("--position-policy", choices=(*POSITION_POLICIES, "both"), default=None,
        help="positions of the kept tokens for EVERY pre-LLM method: repack (contiguous) or original (the "
        "unpruned positions, gaps included); both runs each method under each (default: the AutoSelect "
        "scorer's own policy, else repack)")
    add("--autoselect-decode", type=names, default=[], metavar="DECODE[,DECODE]",
        help=f"also run the scorer under these inference decodes ({','.join(DECODES)}) where they are not its own, "
        "each as its own method (autoselect-dpp, autoselect-topk_dpp, autoselect-topk) on the same batches, paired with autoselect in the "
        "report: choose a decode on --split val. autoselect stays the scorer as saved")
    add("--dpp-quality-scale", type=float, default=None,
        help="inference.dpp_quality_scale of the autoselect-dpp and autoselect-topk_dpp variants (default: the scorer's own, else 1.0)")
    add("--dpp-share", type=float, default=None,
        help="inference.dpp_share of the autoselect-topk_dpp variant: the share of K the DPP picks (default: the scorer's own, else 0.5)")
    add("--tasks", type=names, default=list(TASKS), help=f"comma-separated tasks (default: {','.join(TASKS)})")
    add("--limit", type=int, default=None, help="examples per task (default: every held-out record; 200 for generated tasks)")
    add("--batch-size", type=int, default=8, help="examples per forward; a multiple-choice batch has examples x choices rows (default: %(default)s)")
    add("--corpora", type=Path, default=DEFAULT_OUT, help="packaged-corpora export (default: %(default)s)")
    add("--seed", type=int, default=0, help="seeds the generated tasks and the random baseline (default: %(default)s)")
    add("--fastv-layer", type=int, default=None, help="FastV's cut layer L (default: 2, or the LLM's depth - 1 if smaller)")
    add("--overlay", type=names, default=None, help="methods for kept_patches.png (default: autoselect and the first two baselines)")
    add("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bfloat16 on GPU and on CPUs with native bf16, else float32)")
    add("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and --tag-version (default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db)")
    add("--out", type=Path, default=Path("outputs/eval"), help="output folder (default: %(default)s)")
    add("--baselines-from", type=Path, default=None, metavar="REPORT_JSON",
        help="take every training-free baseline (and the oracle) from this earlier report.json instead of running it "
        "again, to pair a new scorer with them; refused unless model, split, limit, seed, dtype, position policy, "
        "batch size, budgets and each baseline's settings match, and the all-token scores (always run) equal the "
        "report's example for example; a task the report lacks runs every method")
    add("--reuse-all-tokens", action="store_true",
        help="with --baselines-from, take the all-token cells from the report too, once this run's all-token scores "
        "on each reused task's first and last batch equal the report's (the check runs two batches, not every "
        "example; the all-token pass costs about 3x a pruned method's on a CPU)")
    add("--tag-version", metavar="models:/NAME/VERSION", default=None,
        help="write AutoSelect's results to this registered version as tags that `promote --require` gates on "
        "(fractions: retention_avg, retention_margin_vs_random, retention.TASK.kK, ...; plus eval_split, eval_n, "
        "eval_dtype, eval_position_policy); models:/NAME@ALIAS or models:/NAME/latest is resolved to a version first. Refused before "
        "evaluating if the version does not exist, --autoselect is missing, or --autoselect is another version")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, int | float]]:
    budgets = []
    for text in args.budgets:
        try:
            budgets.append((text, parse_budget(text)))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    known = [AUTOSELECT, *available_pruners(), ORACLE]
    if args.pruners is None:
        args.pruners = known if args.autoselect else known[1:]
    unknown = [p for p in args.pruners if p not in known]
    if unknown:
        parser.error(f"unknown pruner(s) {unknown}; available: {', '.join(known)}")
    if AUTOSELECT in args.pruners and not args.autoselect:
        parser.error("--pruners includes autoselect: pass its trained scorer with --autoselect DIR_OR_models:/name@alias")
    unknown_decodes = [d for d in args.autoselect_decode if d not in DECODES]
    if unknown_decodes:
        parser.error(f"unknown --autoselect-decode {unknown_decodes}; choices: {', '.join(DECODES)}")
    if args.dpp_quality_scale is not None and not set(DPP_DECODES) & set(args.autoselect_decode):
        parser.error(f"--dpp-quality-scale sets the variants with a DPP part: add --autoselect-decode {' or '.join(DPP_DECODES)}")
    if args.dpp_quality_scale is not None and not (args.dpp_quality_scale > 0 and math.isfinite(args.dpp_quality_scale)):
        parser.error(f"--dpp-quality-scale must be a finite number > 0, got {args.dpp_quality_scale}")
    if args.dpp_share is not None and "topk_dpp" not in args.autoselect_decode:
        parser.error("--dpp-share sets the autoselect-topk_dpp variant: add --autoselect-decode topk_dpp")
    if args.dpp_share is not None and not 0 <= args.dpp_share <= 1:
        parser.error(f"--dpp-share must be in [0, 1], got {args.dpp_share}")
    if args.autoselect_decode and AUTOSELECT not in args.pruners:
        parser.error("--autoselect-decode compares decodes of the AutoSelect scorer: --pruners must include autoselect")
    unknown_tasks = [t for t in args.tasks if t not in TASKS]
    if unknown_tasks:
        parser.error(f"unknown task(s) {unknown_tasks}; available: {', '.join(TASKS)}")
    if args.reuse_all_tokens and not args.baselines_from:
        parser.error("--reuse-all-tokens takes the all-token cells from the --baselines-from report: give that report")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        parser.error("--limit and --batch-size must be >= 1")
    unknown_overlay = [m for m in args.overlay or [] if m not in args.pruners]
    if unknown_overlay:
        parser.error(f"--overlay names {unknown_overlay}, which are not in --pruners {args.pruners}")
    return budgets


def overlay_labels(pruners: list[str], chosen: list[str] | None, budget: str) -> list[str]:
    """``name@budget`` for AutoSelect and two baselines (or the methods asked for)."""
    if chosen is None:
        chosen = [p for p in pruners if p == AUTOSELECT][:1] + [p for p in pruners if p != AUTOSELECT][:2]
    return [f"{name}@{budget}" for name in chosen]


def write_overlay(path: Path, example: Example, methods, labels: list[str], processor, num_tokens: int, device, dtype) -> Path:
    """The patches each of ``labels`` (``pruner@budget``; the first policy when both ran) keeps on
    ``example``'s image (prompt only, as served)."""
    prompt = to_device(prompt_inputs(processor, example), device, dtype)
    by_label: dict[str, object] = {}
    for method in methods:
        by_label.setdefault(f"{method.base}@{method.budget_label}", method)
    panels = [(f"all {num_tokens} tokens", None)]
    for label in labels:
        method = by_label[label]
        method.prepare([example])
        panels.append((label, method.kept_indices(prompt)[0]))
    image = processed_image(prompt["pixel_values"][0], processor)
    return kept_patches_plot(image, num_tokens, panels, path, f"{example.id}: {example.question}")


def write_outputs(args, report: dict, tasks, make_methods, budgets: list[Budget], processor, device, dtype) -> dict[str, Path]:
    """report.json and report.md first (a plotting failure must not lose the numbers), then the PNGs."""
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {"json": args.out / "report.json", "markdown": args.out / "report.md"}
    outputs["json"].write_text(json.dumps(report, indent=2) + "\n")
    outputs["markdown"].write_text(markdown(report))
    outputs["retention_plot"] = retention_plot(report, args.out / "retention_vs_budget.png")
    if not (tasks and args.pruners):
        report["overlay"] = {"skipped": "no task or no pruner ran"}
    else:
        smallest = min(budgets, key=lambda b: b.k)
        labels = overlay_labels(args.pruners, args.overlay, smallest.label)
        # the first task where every overlaid method runs (the oracle needs answer boxes)
        example = next((t.examples[0] for t in tasks if all(e.boxes for e in t.examples)), tasks[0].examples[0])
        labels = [label for label in labels if example.boxes or not label.startswith(ORACLE + "@")]
        try:
            outputs["overlay"] = write_overlay(
                args.out / "kept_patches.png", example, make_methods(), labels, processor, report["visual_tokens_per_image"], device, dtype
            )
            report["overlay"] = {"file": outputs["overlay"].name, "example": example.id, "methods": labels}
        except ValueError as exc:  # e.g. a patch grid that is not square
            report["overlay"] = {"skipped": str(exc)}
            print(f"kept-patch overlay skipped: {exc}")
    outputs["json"].write_text(json.dumps(report, indent=2) + "\n")
    return outputs


def tag_target(args: argparse.Namespace):
    """The registered version ``--tag-version`` names, checked (``mlops.registry.tag_target``)
    before anything loads; a ``TagVersionError`` when it cannot take this run's results."""
    import mlflow

    from mlops import registry
    from mlops.tracking import resolve_tracking_uri

    if args.position_policy == "both":
        raise registry.TagVersionError("--tag-version tags one position policy; --position-policy both runs two")
    mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    return registry.tag_target(args.tag_version, args.autoselect if AUTOSELECT in args.pruners else None)


def probe_budgets(adapter, probe: dict, given_budgets) -> tuple[list[Budget], int]:
    """Each budget's K on the probe image, and that image's N: the adapter's plan (its own count of
    the visual tokens, not of the placeholders), resolved as the pruned forward resolves it.
    ValueError naming N when a budget cannot apply."""
    num_tokens = adapter.plan(probe, 1.0)[0].n
    try:
        return [Budget(label, value, adapter.plan(probe, value)[0].k) for label, value in given_budgets], num_tokens
    except ValueError as exc:
        raise ValueError(f"{exc} (this backbone has N = {num_tokens} visual tokens per image)") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given_budgets = check_args(parser, args)
    target = None
    if args.tag_version:
        from mlops.registry import TagVersionError

        try:
            target = tag_target(args)
        except TagVersionError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    started = time.time()
    torch.manual_seed(args.seed)

    from mlops.backbone import default_device, load_autoselect, load_vlm_and_processor

    device = default_device()
    print(f"loading {args.model} on {device}")
    vlm, processor = load_vlm_and_processor(args.model, args.dtype, device)
    dtype = next(vlm.parameters()).dtype
    adapter = get_adapter(vlm)
    image_token_id = adapter.image_token_id
    probe = probe_prompt(processor)
    try:
        budgets, num_tokens = probe_budgets(adapter, probe, given_budgets)
    except ValueError as exc:
        parser.error(str(exc))

    autoselect, autoselect_info = None, None
    if AUTOSELECT in args.pruners:
        try:
            autoselect, autoselect_info = load_autoselect(args.autoselect, vlm, args.tracking_uri)
            if target is not None and "version" in autoselect_info:  # an alias may have moved since the check
                from mlops.registry import check_evaluated

                check_evaluated(target, autoselect_info["registered_model"], autoselect_info["version"])
        except (ValueError, FileNotFoundError) as exc:  # ScorerVersionMismatch is a ValueError
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"AutoSelect scorer from {args.autoselect} (trained at budget {autoselect.config.budget})")

    policy = args.position_policy or (autoselect.position_policy if autoselect is not None else "repack")
    policies = POSITION_POLICIES if policy == "both" else (policy,)
    tasks, skipped = load_tasks(args.tasks, task_context(vlm, probe, args.corpora, args.seed, args.limit, args.split))
    for name, reason in skipped.items():
        print(f"skipped task {name}: {reason}")
    settings = baseline_settings(vlm, args.seed, args.fastv_layer)
    budget_args = [(b.label, b.value) for b in budgets]
    if autoselect is not None:  # the report records which decode the scorer ran (its own)
        settings[AUTOSELECT] = {"inference": dataclasses.asdict(autoselect.config.inference)}
    variants = decode_variants(autoselect, args.autoselect_decode, args.dpp_quality_scale, args.dpp_share) if autoselect is not None else {}
    for name, variant in variants.items():
        settings[name] = {"inference": dataclasses.asdict(variant.config.inference)}
        print(f"{name}: the same scorer with inference {settings[name]['inference']}")

    run = {"model": args.model, "split": args.split, "limit": args.limit, "seed": args.seed,
           "dtype": str(dtype).removeprefix("torch."), "position_policy": policy, "batch_size": args.batch_size,
           "visual_tokens_per_image": num_tokens, "budgets": [{"budget": b.label, "k": b.k} for b in budgets],
           "scoring": SCORING}

    def make_methods():
        return build_methods(vlm, args.pruners, budget_args, autoselect, settings, policies, variants)

    def batch_full_scores(names: list[str], last: bool = False):
        """All tokens on the first (or the last) batch of each named task, as the run batches it: a
        check of the earlier report in seconds, not after the run; and where each batch starts."""
        starts = {t.name: ((len(t.examples) - 1) // args.batch_size) * args.batch_size if last else 0 for t in tasks}
        chosen = [dataclasses.replace(t, examples=t.examples[starts[t.name]: starts[t.name] + args.batch_size])
                  for t in tasks if t.name in names]
        return evaluate(chosen, lambda: [m for m in make_methods() if m.label == FULL], processor, image_token_id,
                        args.batch_size, device, dtype), starts

    earlier, reused, from_earlier = None, set(), []
    if args.baselines_from:
        try:
            earlier = reuse.load(args.baselines_from)
            reuse.check_settings(earlier, run, settings, [t.name for t in tasks])
            reuse.check_examples(earlier, example_ids(tasks))
            from_earlier = reuse.reused_tasks(earlier, [t.name for t in tasks])
            reuse.check_full_scores(earlier, batch_full_scores(from_earlier)[0])
            if args.reuse_all_tokens:
                reuse.check_full_scores(earlier, *batch_full_scores(from_earlier, last=True))
        except reuse.ReuseError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.pruners = [*args.pruners, *(p for p in reuse.baselines(earlier) if p not in args.pruners)]
        reused = reuse.labels(earlier) | ({FULL} if args.reuse_all_tokens else set())
        print(f"baselines from {args.baselines_from}: {', '.join(reuse.baselines(earlier))} (not run again) on "
              f"{', '.join(from_earlier)}; other tasks run every method")

    scores = {
        **evaluate([t for t in tasks if t.name in from_earlier], lambda: [m for m in make_methods() if m.label not in reused],
                   processor, image_token_id, args.batch_size, device, dtype),
        **evaluate([t for t in tasks if t.name not in from_earlier], make_methods, processor, image_token_id,
                   args.batch_size, device, dtype),
    }
    scores = {t.name: scores[t.name] for t in tasks}  # the tasks' order, as given
    if earlier is not None:
        try:
            reuse.merge(scores, earlier, all_tokens=args.reuse_all_tokens)
        except reuse.ReuseError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    meta = {
        **{k: run[k] for k in ("model", "seed", "split", "position_policy", "limit", "batch_size")},
        "autoselect": autoselect_info,
        "pruners": {p: settings.get(p, {}) for p in [*args.pruners, *variants]},
        "baselines_from": str(args.baselines_from) if args.baselines_from else None,
        "baselines_from_tasks": from_earlier,
        "all_tokens_from": str(args.baselines_from) if args.reuse_all_tokens else None,
        "device": str(device),
        "dtype": run["dtype"],
        "scoring": SCORING,
        "seconds": round(time.time() - started, 1),
    }
    report = build_report(meta, tasks, skipped, scores, make_methods(), budgets, num_tokens)
    outputs = write_outputs(args, report, tasks, make_methods, budgets, processor, device, dtype)

    print()
    print(markdown(report))
    for what, path in outputs.items():
        print(f"{what:>15}: {path}")
    if target is not None and not tasks:
        print(f"no task ran: {target.name} v{target.version} not tagged", file=sys.stderr)
    elif target is not None:
        from mlops.registry import tag_evaluation

        written = tag_evaluation(target, version_tags(report))
        print(f"tagged {target.name} v{target.version} with {len(written)} evaluation tags "
              f"(retention_avg={written.get('retention_avg', 'undefined')}, {args.split} split)")
    return 0 if tasks else 1


if __name__ == "__main__":
    sys.exit(main())
