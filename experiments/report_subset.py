"""One `pipelines/evaluate.py` report read again on part of its examples, from its per-example scores.

Why: a held-out half can share items with a split an earlier export used. The 4000-scene export's
test garments include 306 that the 1200-scene export's val scenes showed (in other layouts), and
recipes were chosen on that val; its test run is read on all its questions and on the ones whose
garment no earlier val scene showed, from the one run, with nothing run again:

    python experiments/report_subset.py outputs/eval-test/report.json --corpora .cache/corpora-plain-g6-d2-h4000 \\
      --drop-garments-shown-in .cache/corpora-plain-g6-d2 [--shown-split val] [--out F.json]

It reads the garment question (``scenes_garment``): each method's score with its standard error on
all questions and on those kept, and AutoSelect minus every other method at its budget, paired.
Garments are matched by their source item (``items[].source`` of a scene).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.corpora.scenes import GARMENT_TASK
from pipelines.evaluation.methods import AUTOSELECT, FULL
from pipelines.evaluation.report import paired_difference
from pipelines.evaluation.stats import stderr_of_mean
from pipelines.evaluation.tasks import scenes
from pipelines.evaluation.tasks.base import EVAL_SPLITS, TaskContext, heldout_records
from results_file import write_result


def garment_sources(records: list[dict]) -> dict[str, str]:
    """``{garment question id: its garment's source item}`` of scene records."""
    return {r["id"]: item["source"] for r in records if r.get("task") == GARMENT_TASK
            for item in r["items"] if item["kind"] == "garment"}


def split_records(corpora: Path, split: str) -> list[dict]:
    """The scenes of one held-out half of an export, as the evaluation splits them."""
    ctx = TaskContext(image_size=224, patch_size=14, corpora_dir=corpora, split=split)  # geometry unused here
    return heldout_records(ctx, "scenes")


def shown_ids(corpora: Path, split: str, shown_in: Path, shown_split: str) -> set[str]:
    """The garment question ids of ``corpora``'s ``split`` whose garment a scene of ``shown_in``'s
    ``shown_split`` showed."""
    shown = set(garment_sources(split_records(shown_in, shown_split)).values())
    return {qid for qid, source in garment_sources(split_records(corpora, split)).items() if source in shown}


def read(report: dict, task: str, keep: set[str] | None) -> dict:
    """Each method's score (mean of its per-example values) with its standard error, and AutoSelect
    minus every other method at its budget, paired, on the examples whose id is in ``keep`` (all: None)."""
    ids = report["per_example_ids"][task]
    rows = [i for i, example in enumerate(ids) if keep is None or example in keep]
    values = {label: [v[i] for i in rows] for label, v in report["per_example"][task].items() if v is not None}
    out = {"n": len(rows), "methods": {label: {"score": round(sum(v) / len(v), 4), "stderr": stderr_of_mean(v)}
                                       for label, v in values.items()}, "paired": {}}
    for ours in (label for label in values if label.startswith(AUTOSELECT)):
        budget = ours.partition("@")[2]
        for theirs in values:
            if theirs != ours and (theirs == FULL or theirs.partition("@")[2] == budget):
                out["paired"].setdefault(ours, {})[theirs] = paired_difference(values[ours], values[theirs])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="an evaluate.py report.json with per_example_ids")
    parser.add_argument("--corpora", type=Path, required=True, help="the export the report was run on")
    parser.add_argument("--drop-garments-shown-in", type=Path, required=True, help="an earlier export")
    parser.add_argument("--shown-split", choices=EVAL_SPLITS, default="val", help="its half that was used (default: val)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    ids = (report.get("per_example_ids") or {}).get(scenes.NAME)
    if ids is None:
        raise SystemExit(f"{args.report}: no per_example_ids for {scenes.NAME} (not run, or a report written before "
                         "ids were recorded: run it again)")
    drop = shown_ids(args.corpora, report["split"], args.drop_garments_shown_in, args.shown_split) & set(ids)
    keep = set(ids) - drop
    result = {"report": str(args.report), "split": report["split"], "task": scenes.NAME, "dropped": len(drop),
              "why_dropped": f"their garment was shown in {args.drop_garments_shown_in}'s {args.shown_split} scenes",
              "all": read(report, scenes.NAME, None), "not_shown": read(report, scenes.NAME, keep)}
    print(f"{scenes.NAME} ({report['split']}): all {len(ids)} questions, and the {len(keep)} whose garment "
          f"{args.drop_garments_shown_in}'s {args.shown_split} scenes never showed ({len(drop)} dropped)")
    for reading in ("all", "not_shown"):
        got = result[reading]
        for ours, rows in got["paired"].items():
            cells = ", ".join(f"{theirs} {d['difference']:+.3f} ± {d['stderr']:.3f}" for theirs, d in rows.items() if d)
            print(f"  {reading:>9}: {ours} {got['methods'][ours]['score']:.3f}; minus {cells}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
