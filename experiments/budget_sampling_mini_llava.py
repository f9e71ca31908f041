"""One scorer trained with budgets sampled per batch vs one scorer per budget, on the real-weight
mini-LLaVA (held-out Fashion-MNIST questions by default), in one run.

At every budget the sampled scorer, the scorer trained at that budget and the random baseline
score the same held-out examples: accuracy and the true answer's NLL per token, each with its
standard error, and the paired difference sampled - per-budget (same examples). With
``--seeds`` a scorer that samples at inference (``inference.noise``) is measured under each
``inference.seed`` and the seeds are averaged, so no lucky seed decides the comparison.

    python experiments/budget_sampling_mini_llava.py --tracking-uri sqlite:///outputs/mlflow.db \
        --sampled models:/autoselect-mini-llava-results/2 \
        --per-budget 28=models:/autoselect-mini-llava-results/1 85=models:/autoselect-mini-llava-results/3 \
        --limit 200 --seeds 0 1 2 --out experiments/results/budget_sampling_mini_llava.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from autoselect.backbones import get_adapter
from autoselect.pruners import build_pruner
from mlops.backbone import load_autoselect, load_vlm_and_processor
from pipelines.evaluation.methods import PreLLM
from pipelines.evaluation.report import paired_difference
from pipelines.evaluation.runner import evaluate_task
from pipelines.evaluation.scoring import heldout_task
from pipelines.evaluation.stats import stderr_of_mean
from results_file import write_result


def per_budget(text: str) -> tuple[int, str]:
    k, _, source = text.partition("=")
    if not k.isdigit() or not source:
        raise argparse.ArgumentTypeError(f"expected K=SCORER (e.g. 28=models:/name/1), got {text!r}")
    return int(k), source


def seed_averaged(values: list[list[float]]) -> list[float]:
    """Per example, the mean over inference seeds."""
    return [sum(column) / len(column) for column in zip(*values)]


def summary(correct: list[float], nll: list[float]) -> dict[str, float]:
    return {"accuracy": round(sum(correct) / len(correct), 4), "accuracy_stderr": round(stderr_of_mean(correct), 4),
            "answer_nll": round(sum(nll) / len(nll), 4), "answer_nll_stderr": round(stderr_of_mean(nll), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampled", required=True, help="the budget-sampled scorer (folder or models:/name/version)")
    parser.add_argument("--per-budget", type=per_budget, nargs="+", required=True, help="K=SCORER for each budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="inference seeds (scorers with inference.noise)")
    parser.add_argument("--model", default=".cache/backbones/mini-llava-aligned")
    parser.add_argument("--task", default="fmnist_vqa")
    parser.add_argument("--corpora", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on GPU / native-bf16 CPUs, else float32")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--tolerance", type=float, default=0.5, help="points of accuracy")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    started = time.time()
    vlm, processor = load_vlm_and_processor(args.model, args.dtype, torch.device("cpu"))
    dtype = next(vlm.parameters()).dtype
    try:
        task = heldout_task(vlm, processor, args.task, args.corpora, args.limit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image_token_id = get_adapter(vlm).image_token_id
    sampled, sampled_info = load_autoselect(args.sampled, vlm, args.tracking_uri)
    scorers = {k: load_autoselect(source, vlm, args.tracking_uri) for k, source in args.per_budget}

    def run(methods):
        return evaluate_task(task, methods, processor, image_token_id, 8, torch.device("cpu"), dtype)

    rows: dict[str, dict] = {}
    for k, (own, own_info) in sorted(scorers.items()):
        values: dict[str, dict[str, list[list[float]]]] = {"sampled": {"correct": [], "nll": []}, "per_budget": {"correct": [], "nll": []}}
        for seed in args.seeds:
            for name, model in (("sampled", sampled), ("per_budget", own)):
                if model.config.inference.noise:  # a top-K scorer uses no seed
                    model.config.inference = replace(model.config.inference, seed=seed)
                got = run([PreLLM(name, str(k), k, model)])[f"{name}@{k}"]
                values[name]["correct"].append(got["per_example"])
                values[name]["nll"].append(got["per_example_answer_nll"])
        rand = run([PreLLM("random", str(k), k, build_pruner("random", vlm, k, seed=0, position_policy=own.config.position_policy))])[f"random@{k}"]
        averaged = {name: {key: seed_averaged(v) for key, v in parts.items()} for name, parts in values.items()}
        gap = paired_difference(averaged["sampled"]["correct"], averaged["per_budget"]["correct"])
        rows[str(k)] = {
            "per_budget_scorer": own_info,
            "sampled": summary(averaged["sampled"]["correct"], averaged["sampled"]["nll"]),
            "per_budget": summary(averaged["per_budget"]["correct"], averaged["per_budget"]["nll"]),
            "random": summary(rand["per_example"], rand["per_example_answer_nll"]),
            "sampled_minus_per_budget": {"accuracy_points": round(100 * gap["difference"], 2), "stderr_points": round(100 * gap["stderr"], 2),
                                          "answer_nll": paired_difference(averaged["sampled"]["nll"], averaged["per_budget"]["nll"])},
            "per_seed_accuracy": {name: [round(sum(c) / len(c), 4) for c in parts["correct"]] for name, parts in values.items()},
        }
        rows[str(k)]["within_tolerance"] = rows[str(k)]["sampled_minus_per_budget"]["accuracy_points"] >= -args.tolerance

    result = {"model": args.model, "task": args.task, "examples": len(task.examples), "seeds": args.seeds,
              "sampled_scorer": sampled_info, "train_budgets": list(sampled.config.training.budgets), "dtype": args.dtype,
              "tolerance_points": args.tolerance, "budgets": rows, "seconds": round(time.time() - started, 1)}
    print(json.dumps(result, indent=2))
    print("\n| K | per-budget acc | sampled acc | sampled - per-budget (points) | per-budget NLL | sampled NLL | random acc | random NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for k, row in rows.items():
        p, s, r, d = row["per_budget"], row["sampled"], row["random"], row["sampled_minus_per_budget"]
        print(f"| {k} | {p['accuracy']:.3f} ± {p['accuracy_stderr']:.3f} | {s['accuracy']:.3f} ± {s['accuracy_stderr']:.3f} | "
              f"{d['accuracy_points']:+.1f} ± {d['stderr_points']:.1f} | {p['answer_nll']:.3f} | {s['answer_nll']:.3f} | "
              f"{r['accuracy']:.3f} | {r['answer_nll']:.3f} |")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
