"""Paired differences between trained scorers evaluated in separate `pipelines/evaluate.py` runs.

`evaluate.py` takes one scorer a run; recipes are compared on validation by running it once per
scorer over the same examples. This joins those reports: it refuses reports that differ in model,
split, limit, dtype, position policy or seed, checks that the all-token reference scored every
example identically in each (the same examples, in the same order), and prints each scorer's
accuracy and true-answer NLL (choice tasks) or NLL per token (NLL tasks) minus the first
report's, paired, with standard errors:

    python experiments/compare_scorers.py A/report.json B/report.json [--method autoselect@28 ...] [--out F.json]

A report may be read as ``PATH:METHOD=AS``: its method METHOD (every budget) stands in as AS, so a
scorer run as a decode variant beside another (``autoselect-topk_dpp`` in that report) pairs with
a scorer run on its own (``autoselect``), e.g. the committed scorer under its decode read beside a
candidate in an earlier run.

--backbones compares the same methods on different backbones instead (e.g. a re-aligned VLM
against the one before it): the reports may differ in model, so their all-token scores differ
too, and the examples are matched by split, limit and seed alone (each task's count is checked);
every method all the reports ran is compared by default, all tokens included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.evaluation.report import paired_difference
from results_file import write_result

SAME = ("model", "split", "limit", "dtype", "position_policy", "seed")


def load(spec: str) -> dict:
    """A report from ``PATH`` or ``PATH:METHOD=AS`` (METHOD's scores under the label AS, see above)."""
    path, _, rename = spec.partition(":")
    path = Path(path)
    report = json.loads(path.read_text())
    report["_name"] = path.parent.name if path.name == "report.json" else path.stem
    if rename:
        method, equals, alias = rename.partition("=")
        if not (equals and method and alias):
            raise SystemExit(f"{spec}: expected PATH:METHOD=AS, e.g. report.json:autoselect-topk_dpp=autoselect")
        for key in ("per_example", "per_example_answer_nll"):
            for task, methods in report.get(key, {}).items():
                old = {m.partition("@")[2]: v for m, v in methods.items() if m.partition("@")[0] == method}
                if key == "per_example" and not old:
                    raise SystemExit(f"{spec}: no method {method!r} on {task} (there: {sorted(methods)})")
                methods = {m: v for m, v in methods.items() if m.partition("@")[0] not in (method, alias)}
                report[key][task] = {**methods, **{f"{alias}@{budget}": v for budget, v in old.items()}}
        report["_name"] += f":{method}"
    return report


def check_like_for_like(reports: list[dict], backbones: bool = False) -> None:
    first = reports[0]
    for other in reports[1:]:
        for key in SAME:
            if backbones and key == "model":
                continue
            if other.get(key) != first.get(key):
                raise SystemExit(f"{other['_name']}: {key} is {other.get(key)!r}, {first['_name']} has {first.get(key)!r}")
        for task, methods in first["per_example"].items():
            full = other["per_example"].get(task, {}).get("full")
            if backbones:
                if full is None or len(full) != len(methods["full"]):
                    raise SystemExit(f"{other['_name']}: {task} has {0 if full is None else len(full)} examples, "
                                     f"{first['_name']} has {len(methods['full'])}")
            elif full != methods.get("full"):
                raise SystemExit(f"{other['_name']}: the all-token scores on {task} differ, so the examples are not the same")


def compare(reports: list[dict], methods: list[str]) -> dict:
    """``{task: {method: {name: {...}}}}``: for choice tasks accuracy and the true answer's NLL, for
    NLL tasks the NLL per answer token, each with its paired difference against the first report."""
    out: dict = {}
    for task in reports[0]["per_example"]:
        choice = task in reports[0].get("per_example_answer_nll", {})
        tokens = None if choice else reports[0]["per_example_tokens"][task]  # the same answers for every method
        for method in methods:
            if any(method not in r["per_example"][task] for r in reports):
                continue  # a method run on some tasks only
            base = reports[0]["per_example"][task][method]
            for report in reports:
                values = report["per_example"][task][method]
                if choice:
                    nll, base_nll = (r["per_example_answer_nll"][task][method] for r in (report, reports[0]))
                    row = {"accuracy": round(sum(values) / len(values), 4), "answer_nll": round(sum(nll) / len(nll), 4),
                           "accuracy_vs_first": paired_difference(values, base),
                           "answer_nll_vs_first": paired_difference(nll, base_nll)}
                else:
                    row = {"nll": round(sum(values) / sum(tokens), 4), "nll_vs_first": paired_difference(values, base, tokens)}
                out.setdefault(task, {}).setdefault(method, {})[report["_name"]] = row
    return out


def _cell(value: float, paired: dict) -> str:
    return f"{value:.3f} | {paired['difference']:+.3f} ± {paired['stderr']:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="report.json files (PATH or PATH:METHOD=AS); the first is the reference")
    parser.add_argument("--method", action="append", help="method labels to compare (default: every autoselect one that all the reports ran)")
    parser.add_argument("--backbones", action="store_true", help="the reports ran on different backbones (see above)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    reports = [load(path) for path in args.reports]
    check_like_for_like(reports, args.backbones)
    task = next(iter(reports[0]["per_example"]))
    present = [m for m in reports[0]["per_example"][task] if all(m in r["per_example"][task] for r in reports)]
    methods = args.method or [m for m in present if args.backbones or m.startswith("autoselect")]
    missing = sorted(set(methods) - set(present))
    if missing:
        raise SystemExit(f"{missing} not in every report (in all of them: {present})")
    result = compare(reports, methods)
    for task, by_method in result.items():
        for method, rows in by_method.items():
            print(f"\n{task}, {method}, n = {len(reports[0]['per_example'][task]['full'])} "
                  f"(paired against {reports[0]['_name']})")
            choice = "accuracy" in next(iter(rows.values()))
            print("| scorer | accuracy | minus first | answer NLL | minus first |\n|---|---|---|---|---|" if choice
                  else "| scorer | NLL / token | minus first |\n|---|---|---|")
            for name, row in rows.items():
                cells = [_cell(row["accuracy"], row["accuracy_vs_first"]), _cell(row["answer_nll"], row["answer_nll_vs_first"])] \
                    if choice else [_cell(row["nll"], row["nll_vs_first"])]
                print(f"| {name} | " + " | ".join(cells) + " |")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
