"""One scorer trained with a budget drawn per batch vs one scorer per budget, and the adaptive
(score-mass) budget, on the synthetic marker task (tiny LLaVA, CPU, one run).

The task's answer sits in one of 64 patches (``--markers``), so tight budgets (K = 1..8) separate good scorers from
bad ones. Every scorer trains the same number of steps on the same batches; held-out accuracy
and loss are measured at every budget. The budget-sampled scorer passes if it is within
``--tolerance`` points of the per-budget scorer at every budget.

    python experiments/budget_sampling.py [--steps 200] [--budgets 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from autoselect import AutoSelectConfig, AutoSelectModel, ScoreMass, TrainingOptions
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import answer_accuracy, marker_batches, teach_vlm_markers
from autoselect.training import train
from results_file import write_result


def evaluate(model: AutoSelectModel, held_out: dict, budget) -> dict:
    with torch.no_grad():
        loss = float(model(**held_out, budget=budget).loss)
    kept = [len(k) for k in model.last_selection.per_image()]
    return {"accuracy": round(100 * answer_accuracy_at(model, held_out, budget), 2), "loss": round(loss, 4),
            "mean_kept": round(sum(kept) / len(kept), 2)}


def answer_accuracy_at(model: AutoSelectModel, batch: dict, budget) -> float:
    class AtBudget(torch.nn.Module):  # answer_accuracy calls model(**batch)
        def forward(self, **inputs):
            return model(**inputs, budget=budget)

        @property
        def last_selection(self):
            return model.last_selection

    return answer_accuracy(AtBudget(), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--markers", type=int, default=1, help="marker patches per image (1: K = 1 must find it)")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="ScoreMass shares to report")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points of accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    torch.manual_seed(0)
    vlm, processor = build_tiny_llava(seed=0)
    teach_vlm_markers(vlm, processor, steps=200, seed=1)
    held_out = next(marker_batches(processor, args.held_out, seed=99, markers=args.markers))

    def trained(config: AutoSelectConfig) -> AutoSelectModel:
        torch.manual_seed(0)
        model = AutoSelectModel.attach(vlm, config)
        train(model, marker_batches(processor, 16, seed=2, markers=args.markers), steps=args.steps, lr=1e-3)
        return model.eval()

    schedule = {"temperature_steps": max(1, args.steps * 3 // 4)}
    rows: dict[str, dict] = {}
    for k in args.budgets:
        per_budget = trained(AutoSelectConfig(budget=k, **schedule))
        rows[str(k)] = {"per_budget": evaluate(per_budget, held_out, k)}
    sampled = trained(AutoSelectConfig(budget=args.budgets[-1], training=TrainingOptions(budgets=list(args.budgets)), **schedule))
    for k in args.budgets:
        rows[str(k)]["sampled"] = evaluate(sampled, held_out, k)
        rows[str(k)]["gap_points"] = round(rows[str(k)]["per_budget"]["accuracy"] - rows[str(k)]["sampled"]["accuracy"], 2)
    adaptive = {str(share): evaluate(sampled, held_out, ScoreMass(share)) for share in args.shares}
    result = {
        "task": f"markers ({args.markers} of 64 patches, 4 colours, chance 25%)", "steps": args.steps, "held_out": args.held_out,
        "budgets": rows, "adaptive_score_mass": adaptive,
        "sampled_within_tolerance": all(row["gap_points"] <= args.tolerance for row in rows.values()),
        "tolerance_points": args.tolerance, "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    write_result(args.json_out, result)
    print("\n| K | per-budget scorer acc % (loss) | budget-sampled scorer acc % (loss) | gap (points) |")
    print("|---|---|---|---|")
    for k, row in rows.items():
        a, b = row["per_budget"], row["sampled"]
        print(f"| {k} | {a['accuracy']:.1f} ({a['loss']:.3f}) | {b['accuracy']:.1f} ({b['loss']:.3f}) | {row['gap_points']:+.1f} |")
    print("\n| score-mass share | mean K kept | acc % (loss) |")
    print("|---|---|---|")
    for share, row in adaptive.items():
        print(f"| {share} | {row['mean_kept']:.1f} | {row['accuracy']:.1f} ({row['loss']:.3f}) |")


if __name__ == "__main__":
    main()
