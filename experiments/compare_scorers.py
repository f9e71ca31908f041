"""Paired differences between trained scorers evaluated in separate `pipelines/evaluate.py` runs.

`evaluate.py` takes one scorer a run; recipes are compared on validation by running it once per
scorer over the same examples. This joins those reports: it refuses reports that differ in model,
split, limit, dtype, position policy or seed, checks that the all-token reference scored every
example identically in each (the same examples, in the same order), and prints each scorer's
accuracy and answer NLL minus the first report's, paired, with standard errors:

    python experiments/compare_scorers.py A/report.json B/report.json [--method autoselect@28 ...] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.evaluation.report import paired_difference

SAME = ("model", "split", "limit", "dtype", "position_policy", "seed")


def load(path: Path) -> dict:
    report = json.loads(path.read_text())
    report["_name"] = path.parent.name if path.name == "report.json" else path.stem
    return report


def check_like_for_like(reports: list[dict]) -> None:
    first = reports[0]
    for other in reports[1:]:
        for key in SAME:
            if other.get(key) != first.get(key):
                raise SystemExit(f"{other['_name']}: {key} is {other.get(key)!r}, {first['_name']} has {first.get(key)!r}")
        for task, methods in first["per_example"].items():
            if other["per_example"].get(task, {}).get("full") != methods.get("full"):
                raise SystemExit(f"{other['_name']}: the all-token scores on {task} differ, so the examples are not the same")


def compare(reports: list[dict], methods: list[str]) -> dict:
    """``{task: {method: {name: {accuracy, accuracy_vs_first, answer_nll_vs_first}}}}``."""
    out: dict = {}
    for task in reports[0]["per_example"]:
        for method in methods:
            base_hits = reports[0]["per_example"][task][method]
            base_nll = reports[0]["per_example_answer_nll"][task][method]
            for report in reports:
                hits = report["per_example"][task][method]
                nll = report["per_example_answer_nll"][task][method]
                out.setdefault(task, {}).setdefault(method, {})[report["_name"]] = {
                    "accuracy": round(sum(hits) / len(hits), 4),
                    "answer_nll": round(sum(nll) / len(nll), 4),
                    "accuracy_vs_first": paired_difference(hits, base_hits),
                    "answer_nll_vs_first": paired_difference(nll, base_nll),
                }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files; the first is the reference")
    parser.add_argument("--method", action="append", help="method labels to compare (default: every autoselect one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    reports = [load(path) for path in args.reports]
    check_like_for_like(reports)
    task = next(iter(reports[0]["per_example"]))
    methods = args.method or [m for m in reports[0]["per_example"][task] if m.startswith("autoselect")]
    result = compare(reports, methods)
    for task, by_method in result.items():
        for method, rows in by_method.items():
            print(f"\n{task}, {method}, n = {len(reports[0]['per_example'][task]['full'])} "
                  f"(paired against {reports[0]['_name']})")
            print("| scorer | accuracy | minus first | answer NLL | minus first |\n|---|---|---|---|---|")
            for name, row in rows.items():
                acc, nll = row["accuracy_vs_first"], row["answer_nll_vs_first"]
                print(f"| {name} | {row['accuracy']:.3f} | {acc['difference']:+.3f} ± {acc['stderr']:.3f} "
                      f"| {row['answer_nll']:.3f} | {nll['difference']:+.3f} ± {nll['stderr']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
