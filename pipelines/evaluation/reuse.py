"""Training-free baselines taken from an earlier report, so a new scorer is paired with them
without running them again (``evaluate.py --baselines-from REPORT``).

A baseline's scores depend on the backbone, the examples, the budgets, the position policy, the
dtype, the batching and its own settings (a seed, FastV's layer), never on the scorer: re-running
its cells to compare one more scorer costs over an hour on a CPU and changes nothing. The
earlier report is used only when all of those match this run, and when its all-token scores equal
this run's example for example (the proof that the examples, and how they are scored, are the
same: another machine's bf16 kernels can move them); otherwise it is refused, naming what differs.
The first batch's all-token scores are compared before the run, the rest at its end; with
``--reuse-all-tokens`` the all-token cells are taken from the report as well, once the first and
the last batch score as there (the all-token pass is about 3x a pruned method's on a CPU). Its
example ids (``per_example_ids``), where it has them, are checked before anything runs, so other
examples are refused at once. AutoSelect and
its decode variants are never taken from it: they are what the run is for. A task the report
does not have runs every method, so one report can add tasks to an earlier one's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.evaluation.methods import AUTOSELECT, AUTOSELECT_VARIANT, FULL
from pipelines.evaluation.runner import Tally

# what a baseline's scores depend on, besides its own settings (report["pruners"][name])
SAME = ("model", "split", "limit", "seed", "dtype", "position_policy", "batch_size", "visual_tokens_per_image", "budgets")


class ReuseError(ValueError):
    """The earlier report cannot stand in for running its baselines in this run."""


def load(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReuseError(f"--baselines-from {path}: cannot read a report.json ({exc})") from None
    if not isinstance(report, dict) or "per_example" not in report or "pruners" not in report:
        raise ReuseError(f"--baselines-from {path}: not an evaluate.py report.json (no per-example scores)")
    return report


def baselines(report: dict[str, Any]) -> list[str]:
    """The pruners whose cells the earlier report can give (not AutoSelect or its variants)."""
    return [name for name in report["pruners"] if name != AUTOSELECT and not name.startswith(AUTOSELECT_VARIANT)]


def check_settings(report: dict[str, Any], run: dict[str, Any], settings: dict[str, dict], tasks: list[str]) -> None:
    """Refuse when this run's settings (``run``, keyed as the report's) or a reused baseline's own
    settings differ from the report's, or when the report has none of this run's tasks."""
    for key in SAME:
        if report.get(key) != run.get(key):
            raise ReuseError(f"--baselines-from: {key} is {report.get(key)!r} there and {run.get(key)!r} here")
    if "fastv" in baselines(report) and report.get("scoring") != run.get("scoring"):
        # how FastV ranks while scoring answers changed in session 35 (a candidate's last token
        # then, the prompt's last token now); the pre-LLM methods are scored as before
        raise ReuseError(f"--baselines-from: FastV there was scored as {report.get('scoring')!r}, "
                         f"here as {run.get('scoring')!r}: its cells cannot stand in for this run's")
    for name in baselines(report):
        if report["pruners"][name] != settings.get(name, {}):
            raise ReuseError(f"--baselines-from: {name} ran with {report['pruners'][name]} there and {settings.get(name, {})} here")
    if not reused_tasks(report, tasks):
        raise ReuseError(f"--baselines-from: the report has no scores for any of the tasks {tasks} (it has {sorted(report['per_example'])})")


def reused_tasks(report: dict[str, Any], tasks: list[str]) -> list[str]:
    """This run's tasks whose baseline cells the report gives; the others run every method."""
    return [task for task in tasks if task in report["per_example"]]


def check_examples(report: dict[str, Any], ids: dict[str, list[str]]) -> None:
    """Refuse before anything runs when the report scored other examples (ids, in order) than this
    run's ``{task: ids}``; a report written before ids were recorded is checked by `merge` only."""
    theirs = report.get("per_example_ids") or {}
    for task, mine in ids.items():
        if task in theirs and theirs[task] != mine:
            differ = len(set(theirs[task]) ^ set(mine))
            raise ReuseError(f"--baselines-from: the report scored other examples on {task} ({len(theirs[task])} there, "
                             f"{len(mine)} here, {differ} ids in one only, or another order): is it the same --corpora?")


def labels(report: dict[str, Any]) -> set[str]:
    """Method labels (``name@budget``, with the policy where both ran) the report gives."""
    names = set(baselines(report))
    return {label for per_task in report["per_example"].values() for label in per_task
            if label != FULL and label.split("@")[0].split("[")[0] in names}


def check_full_scores(report: dict[str, Any], scores: dict[str, dict[str, dict]], start: dict[str, int] | None = None) -> None:
    """Refuse when this run's all-token scores (``runner.evaluate``'s form: every example, or one
    batch, which evaluate.py scores before anything else runs) are not the report's from example
    ``start[task]`` (default 0) on, example for example: other examples, or other numerics
    (another CPU's bf16 kernels move the scores too)."""
    for task in reused_tasks(report, list(scores)):
        mine, first = scores[task][FULL]["per_example"], (start or {}).get(task, 0)
        if (report["per_example"][task].get(FULL) or [])[first : first + len(mine)] != mine:
            raise ReuseError(f"--baselines-from: the all-token scores on {task} differ from this run's, so the examples "
                             "or their scoring (e.g. another machine's kernels, another dtype) are not the same; "
                             "run the baselines instead")


def merge(scores: dict[str, dict[str, dict]], report: dict[str, Any], all_tokens: bool = False) -> None:
    """Add the report's baseline cells to this run's ``scores`` (``runner.evaluate``'s form), each
    rebuilt from its per-example values as the run would have tallied them, after checking that each
    task's all-token scores are the report's, example for example. With ``all_tokens`` the
    all-token cells are the report's too (the caller has checked its first and last batches)."""
    wanted = labels(report) | ({FULL} if all_tokens else set())
    if not all_tokens:
        check_full_scores(report, scores)
    for task in reused_tasks(report, list(scores)):  # the others ran whole here
        by_label, theirs = scores[task], report["per_example"][task]
        if by_label:  # any method run here gives this run's example count
            ran = len(next(iter(by_label.values()))["per_example"])
            if len(theirs.get(FULL) or []) != ran:
                raise ReuseError(f"--baselines-from: the report scored {len(theirs.get(FULL) or [])} examples on {task}, "
                                 f"this run {ran}")
        choice = task in report.get("per_example_answer_nll", {})
        for label in sorted(wanted & set(theirs)):
            values = theirs[label]
            if values is None:
                continue
            if choice:
                tally = Tally(n=len(values), correct=int(sum(values)), per_example=list(values),
                              answer_nll=list(report["per_example_answer_nll"][task][label]))
            else:
                tokens = list(report["per_example_tokens"][task])
                tally = Tally(n=len(values), nll=float(sum(values)), tokens=sum(tokens), per_example=list(values), per_example_tokens=tokens)
            by_label[label] = tally.summary("choice" if choice else "nll")
