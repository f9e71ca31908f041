"""The evaluation report: JSON (everything) and a markdown table (what the paper reports).

Retention puts every task on one "higher is better, 100 % = as good as all tokens" scale, so
tasks can be averaged: pruned / full for accuracies, full / pruned for losses.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

from autoselect.config import validate_budget
from pipelines.evaluation.methods import AUTOSELECT, AUTOSELECT_VARIANT, FULL, Method
from pipelines.evaluation.oracle import ORACLE
from pipelines.evaluation.stats import stderr_of_mean
from pipelines.evaluation.tasks import Task

RETENTION = (
    "retention % = 100 x pruned score / full-token score for accuracies, and 100 x full-token NLL / "
    "pruned NLL for losses (lower NLL is better), so for every task higher is better and 100 means "
    "no loss against all visual tokens; the average is over the tasks whose retention is defined"
)
ALL_TOKENS = "all"
CHANCE_Z = 2.0  # a full-token accuracy this many binomial standard errors above chance is "above chance"


@dataclass(frozen=True)
class Budget:
    label: str  # as given on the command line: "64", "0.25", "1/9"
    value: int | float
    k: int  # visual tokens kept per image for this backbone's N


def parse_budget(text: str) -> int | float:
    """``"28"`` -> K = 28 tokens; ``"0.25"`` or ``"1/9"`` -> a ratio of N."""
    try:
        value: int | float = int(text) if text.strip().isdigit() else float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"budget {text!r} is neither an int K nor a ratio such as 0.25 or 1/9") from None
    try:
        validate_budget(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def retention(task: Task, full: float, pruned: float) -> float | None:
    """Retention % of ``pruned`` against ``full`` (None when undefined: a full-token accuracy of 0)."""
    if task.higher_is_better:
        return None if full == 0 else 100.0 * pruned / full
    return None if pruned == 0 else 100.0 * full / pruned


def not_above_chance(task: Task, full: dict[str, Any], z: float = CHANCE_Z) -> str | None:
    """Why a choice task's full-token accuracy does not clear chance by ``z`` standard errors
    (binomial, at chance, one-sided), or None when it does. Below that the model cannot do the task
    with all tokens, and a pruned/full ratio there measures sampling noise, not pruning."""
    if task.kind != "choice":
        return None
    chance, n, score = 1 / len(task.choices), int(full["n"]), float(full["score"])
    stderr = math.sqrt(chance * (1 - chance) / n)
    if score - chance > z * stderr:
        return None
    return (f"full-token accuracy {score:.3f} does not clear chance {chance:.3f} by {z:g} standard errors "
            f"({stderr:.3f} each at n = {n})")


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def example_ids(tasks: Sequence[Task]) -> dict[str, list[str]]:
    """``{task: its examples' ids}``, in the order every method's per-example values follow: what
    the report records, and what ``--baselines-from`` compares before anything runs."""
    return {t.name: [e.id for e in t.examples] for t in tasks}


def reused_on(report: dict[str, Any]) -> str:
    """`` on TASKS`` where an earlier report gave the baselines of only some of the run's tasks."""
    tasks = report.get("baselines_from_tasks")
    return f" on {', '.join(tasks)}" if tasks and set(tasks) != set(report.get("per_example", {})) else ""


def build_report(
    meta: dict[str, Any],
    tasks: Sequence[Task],
    skipped: dict[str, str],
    scores: dict[str, dict[str, dict[str, float | int]]],
    methods: Sequence[Method],
    budgets: Sequence[Budget],
    num_tokens: int,
) -> dict[str, Any]:
    """``results[method][budget][task] = {score, n, retention}`` plus each row's average retention."""
    k_of = {b.label: b.k for b in budgets}
    results: dict[str, dict[str, Any]] = {}
    average: dict[str, dict[str, float | None]] = {}
    undefined = {t.name: "full-token accuracy is 0" for t in tasks if t.higher_is_better and scores[t.name][FULL]["score"] == 0}
    at_chance = {  # the model cannot do the task even with all tokens: its retention there is noise
        t.name: why for t in tasks if t.name not in undefined and (why := not_above_chance(t, scores[t.name][FULL]))
    }
    for method in methods:
        budget = method.budget_label or ALL_TOKENS
        row: dict[str, Any] = {}
        retained: dict[str, float | None] = {}
        for task in tasks:
            full = float(scores[task.name][FULL]["score"])
            got = scores[task.name].get(method.label)
            if got is None:  # the method cannot run this task (the oracle without answer boxes)
                continue
            retained[task.name] = retention(task, full, float(got["score"]))
            row[task.name] = {
                "score": round(float(got["score"]), 4),
                "stderr": _round(got.get("stderr"), 4),
                "n": int(got["n"]),
                "retention": _round(retained[task.name], 2),
            }
            if "answer_nll" in got:
                row[task.name].update(answer_nll=round(got["answer_nll"], 4), answer_nll_stderr=_round(got["answer_nll_stderr"], 4))
        avg = _round(_mean(list(retained.values())), 2)
        results.setdefault(method.name, {})[budget] = {
            "k": k_of.get(budget, num_tokens),
            "tasks": row,
            "average_retention": avg,
            "average_retention_above_chance": _round(_mean([v for name, v in retained.items() if name not in at_chance]), 2),
        }
        average.setdefault(method.name, {})[budget] = avg
    return {
        **meta,
        "visual_tokens_per_image": num_tokens,
        "budgets": [{"budget": b.label, "k": b.k} for b in budgets],
        "retention_definition": RETENTION,
        "tasks": {t.name: t.describe() for t in tasks},
        "skipped": dict(skipped),
        "retention_undefined": undefined,
        "full_tokens_at_chance": at_chance,
        "results": results,
        "average_retention": average,
        "paired": paired_differences(tasks, scores, methods),
        "paired_variants": {name: paired_differences(tasks, scores, methods, name)
                            for name in sorted({m.base for m in methods if m.base.startswith(AUTOSELECT_VARIANT)})},
        "selection_check": selection_check(tasks, scores, methods),
        "per_example": {t.name: {label: got.get("per_example") for label, got in scores[t.name].items()} for t in tasks},
        "per_example_ids": example_ids(tasks),
        "per_example_answer_nll": {t.name: {label: got["per_example_answer_nll"] for label, got in scores[t.name].items()}
                                   for t in tasks if t.kind == "choice"},
        "per_example_tokens": {t.name: next(iter(scores[t.name].values())).get("per_example_tokens") for t in tasks if t.kind == "nll"},
    }


def paired_difference(ours: Sequence[float], theirs: Sequence[float], tokens: Sequence[int] | None = None) -> dict[str, float] | None:
    """``ours - theirs`` on the same examples with its paired standard error, in the task's units:
    accuracy for 1/0 values; for summed NLLs with their answer ``tokens`` (the same for both
    methods), NLL per answer token, token-weighted as the score is. Positive: ours is better for
    accuracy, worse for NLL. None below 2 examples."""
    n = len(ours)
    if n < 2 or len(theirs) != n:
        return None
    scale = sum(tokens) / n if tokens else 1.0
    diffs = [(a - b) / scale for a, b in zip(ours, theirs)]
    return {"difference": round(sum(diffs) / n, 4), "stderr": round(stderr_of_mean(diffs), 4), "n": n}


def beside(rival: Method, mine: Method, methods: Sequence[Method]) -> bool:
    """Whether ``rival`` is compared with ``mine``: the same budget and position policy, except
    that a rival fixing its own positions (FastV keeps the original ones, its method) is compared
    under the run's policy when the run has no pre-LLM method under the rival's."""
    if rival.budget_label != mine.budget_label:
        return False
    if rival.position_policy == mine.position_policy:
        return True
    return rival.own_positions and all(m.position_policy != rival.position_policy for m in methods if not m.own_positions)


def paired_differences(tasks: Sequence[Task], scores, methods: Sequence[Method], name: str = AUTOSELECT) -> dict[str, Any]:
    """``name`` (AutoSelect, or one of its decode variants) minus every other method at the same
    budget and policy (FastV: see `beside`), per task, on the same examples. AutoSelect is paired
    with its variants too; a variant only with the baselines and the oracle (its pair with
    AutoSelect is AutoSelect's)."""
    ours = [m for m in methods if m.base == name]
    out: dict[str, Any] = {}
    for mine in ours:
        rivals = [m for m in methods if m.base not in (name, FULL) and beside(m, mine, methods)
                  and (name == AUTOSELECT or is_baseline(m.base) or m.base == ORACLE)]
        for rival in rivals:
            cell = {}
            for task in tasks:
                a, b = scores[task.name].get(mine.label, {}), scores[task.name].get(rival.label, {})
                if "per_example" not in a or "per_example" not in b:
                    continue
                cell[task.name] = paired_difference(a["per_example"], b["per_example"], a.get("per_example_tokens"))
                if cell[task.name] is not None and "per_example_answer_nll" in a:
                    cell[task.name]["answer_nll"] = paired_difference(a["per_example_answer_nll"], b["per_example_answer_nll"])
            out.setdefault(mine.budget_label, {})[rival.name] = cell  # rival names carry the shared policy
    return out


# Go / no-go for a task meant to show selection, on validation, before any scorer is trained:
# the model must do it with all tokens, random selection must hurt, and the oracle must not.
GO_FULL, GO_RANDOM_GAP, GO_ORACLE_GAP = 0.60, 0.20, 0.05


def selection_check(tasks: Sequence[Task], scores, methods: Sequence[Method]) -> dict[str, Any]:
    """Per choice task the oracle ran on, per budget: full, random and oracle accuracy and whether
    the task can show selection (full >= 60 %, random >= 20 points below full, oracle within 5)."""
    out: dict[str, Any] = {}
    for task in tasks:
        if task.kind != "choice":
            continue
        got = scores[task.name]
        for oracle in (m for m in methods if m.base == ORACLE and m.label in got):
            rival = next((m for m in methods if m.base == "random" and m.budget_label == oracle.budget_label
                          and m.position_policy == oracle.position_policy and m.label in got), None)
            if rival is None:
                continue
            full, chance, ceiling = (float(got[label]["score"]) for label in (FULL, rival.label, oracle.label))
            why = [text for failed, text in (
                (full < GO_FULL, f"full-token accuracy {full:.3f} < {GO_FULL}"),
                (full - chance < GO_RANDOM_GAP, f"random is only {full - chance:+.3f} below full (needs {GO_RANDOM_GAP})"),
                (full - ceiling > GO_ORACLE_GAP, f"the oracle is {full - ceiling:.3f} below full (allowed {GO_ORACLE_GAP})"),
            ) if failed]
            out.setdefault(task.name, {})[oracle.name + "@" + oracle.budget_label] = {
                "full": round(full, 4), "random": round(chance, 4), "oracle": round(ceiling, 4), "go": not why, "why": why,
                "headroom": headroom(got, oracle, methods)}
    return out


def is_baseline(name: str) -> bool:
    """A training-free pruner: not all tokens, the oracle, AutoSelect or the scorer's other decodes
    (autoselect-dpp, ...)."""
    return name not in (AUTOSELECT, FULL, ORACLE) and not name.startswith(AUTOSELECT_VARIANT)


def headroom(got: dict[str, Any], oracle: Method, methods: Sequence[Method]) -> dict[str, Any] | None:
    """The oracle minus the best training-free baseline beside it (`beside`: same budget and
    position policy, FastV too), paired on the same examples: how far any selector could lead
    every baseline here. A lead under 2 paired SE means no selector can clear "2 SE over every
    baseline" on these examples, however it is trained (None when no such baseline ran)."""
    rivals = [m for m in methods if is_baseline(m.base) and beside(m, oracle, methods) and "per_example" in got.get(m.label, {})]
    if not rivals or "per_example" not in got[oracle.label]:
        return None
    best = max(rivals, key=lambda m: float(got[m.label]["score"]))
    lead = paired_difference(got[oracle.label]["per_example"], got[best.label]["per_example"])
    return None if lead is None else {"best_baseline": best.name, "score": round(float(got[best.label]["score"]), 4), **lead}


PAIRED_RIVALS = ("random", "uniform")  # the paired differences a version is tagged with


def version_tags(report: dict[str, Any]) -> dict[str, str]:
    """AutoSelect's results as registry version tags for ``promote --require`` (written by
    ``evaluate.py --tag-version``), numbers as fractions (retention 1.0 = as good as all tokens):

    - ``retention.TASK.kK``, ``retention_avg.kK``: retention per task, and its average, at K tokens;
    - ``retention_margin_vs_random.kK``, ``retention_margin_vs_best_baseline.kK``: the average minus
      random's, minus the best baseline's (the oracle is no baseline);
    - ``retention_avg``, ``retention_margin_vs_random``, ``retention_margin_vs_best_baseline``: those
      averaged over the budgets (the demo's gate names; at one budget, that budget's values);
    - ``paired_vs_random.TASK.kK`` (and ``uniform``, ``.stderr``): accuracy difference on the same
      examples, accuracy tasks only;
    - ``eval_split``, ``eval_n`` (the fewest examples of any task), ``eval_n.TASK``, ``eval_dtype``,
      ``eval_position_policy``, ``eval_model``, ``eval_scorer``, ``eval_tasks``, ``eval_budgets``, ``eval_seed``.

    An undefined value (retention over a full-token accuracy of 0) is left out, so a gate on it fails."""
    results = report["results"]
    if AUTOSELECT not in results:
        raise ValueError("the report has no AutoSelect results to tag")
    if any(name.endswith("]") for name in results):
        raise ValueError("the report ran two position policies; tag one (--position-policy repack|original)")
    baselines = [name for name in results if is_baseline(name)]
    numbers: dict[str, float | None] = {}
    overall: dict[str, list[float]] = {}
    for budget in report["budgets"]:
        label, k = budget["budget"], f"k{budget['k']}"
        row = results[AUTOSELECT].get(label)
        if row is None:
            continue
        numbers.update({f"retention.{task}.{k}": _percent(cell["retention"]) for task, cell in row["tasks"].items()})
        ours = row["average_retention"]
        theirs = {name: results[name][label]["average_retention"] for name in baselines if label in results[name]}
        defined = [v for v in theirs.values() if v is not None]
        for name, value in (("retention_avg", ours),
                            ("retention_margin_vs_random", _minus(ours, theirs.get("random"))),
                            ("retention_margin_vs_best_baseline", _minus(ours, max(defined) if defined else None))):
            numbers[f"{name}.{k}"] = _percent(value)
            if value is not None:
                overall.setdefault(name, []).append(value)
        for rival in PAIRED_RIVALS:
            for task, cell in report["paired"].get(label, {}).get(rival, {}).items():
                if cell is not None and report["tasks"][task]["higher_is_better"]:
                    numbers[f"paired_vs_{rival}.{task}.{k}"] = cell["difference"]
                    numbers[f"paired_vs_{rival}.{task}.{k}.stderr"] = cell["stderr"]
    numbers.update({name: _percent(_mean(values)) for name, values in overall.items()})
    tags = {key: f"{value:.4f}" for key, value in numbers.items() if value is not None and math.isfinite(value)}
    counts = {task: int(info["n"]) for task, info in report["tasks"].items()}
    scorer = report.get("autoselect") or {}
    tags.update({
        "eval_split": str(report.get("split")), "eval_n": str(min(counts.values(), default=0)),
        **{f"eval_n.{task}": str(n) for task, n in counts.items()},
        "eval_dtype": str(report.get("dtype")), "eval_position_policy": str(report.get("position_policy")),
        "eval_model": str(report.get("model")), "eval_scorer": str(scorer.get("uri") or scorer.get("path")),
        "eval_tasks": ",".join(counts), "eval_budgets": ",".join(str(b["k"]) for b in report["budgets"]),
        "eval_seed": str(report.get("seed")),
    })
    return tags


def _percent(value: float | None) -> float | None:
    return None if value is None else value / 100


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    retained = "n/a" if entry["retention"] is None else f"{entry['retention']:.1f}%"
    stderr = "" if entry.get("stderr") is None else f" ± {entry['stderr']:.3f}"
    return f"{entry['score']:.3f}{stderr} ({retained})"


def _paired_lines(report: dict[str, Any]) -> list[str]:
    """AutoSelect (then each decode variant) minus each other method at each budget, per task
    (difference ± paired stderr)."""
    tasks = report["tasks"]
    rows = []
    ours = [(AUTOSELECT, report.get("paired", {})), *report.get("paired_variants", {}).items()]
    for mine, by_budget in ours:
        rows += _paired_rows(mine, by_budget, tasks)
    if not rows:
        return []
    header = ["pair", "budget"] + [f"{name} ({'acc' if info['higher_is_better'] else 'NLL'})" for name, info in tasks.items()]
    return [
        "",
        "Paired on the same examples: AutoSelect (and each other decode of its scorer) minus each other "
        "method at the same budget (± standard "
        "error of the paired difference; positive is better for accuracy, worse for NLL; for choice "
        "tasks also the true answer's NLL per token, which separates methods with far fewer examples).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *rows,
    ]


def _paired_rows(mine: str, by_budget: dict[str, Any], tasks: dict[str, Any]) -> list[str]:
    rows = []
    for budget, rivals in by_budget.items():
        for rival, cells in rivals.items():
            shown = []
            for name in tasks:
                cell = cells.get(name)
                text = "n/a" if cell is None else f"{cell['difference']:+.3f} ± {cell['stderr']:.3f}"
                if cell and cell.get("answer_nll"):
                    text += f" (answer NLL {cell['answer_nll']['difference']:+.3f} ± {cell['answer_nll']['stderr']:.3f})"
                shown.append(text)
            policy = rival[rival.index("["):] if rival.endswith("]") else ""
            rows.append("| " + " | ".join([f"{mine}{policy} − {rival}", budget] + shown) + " |")
    return rows


def _check_lines(report: dict[str, Any]) -> list[str]:
    checks = report.get("selection_check") or {}
    if not checks:
        return []
    lines = ["", f"Can the task show selection? (go: full >= {GO_FULL:.0%}, random >= {GO_RANDOM_GAP:.0%} "
             f"below full, oracle within {GO_ORACLE_GAP:.0%} of full; decide on the val split)", ""]
    for task, by_budget in checks.items():
        for label, c in by_budget.items():
            verdict = "GO" if c["go"] else "NO-GO: " + "; ".join(c["why"])
            lines.append(f"- `{task}` {label}: full {c['full']:.3f}, random {c['random']:.3f}, oracle {c['oracle']:.3f} — {verdict}")
            room = c.get("headroom")
            if room:
                z = room["difference"] / room["stderr"] if room["stderr"] else (math.inf if room["difference"] > 0 else 0.0)
                lines.append(f"  - headroom: the oracle leads the best baseline ({room['best_baseline']} {room['score']:.3f}) by "
                             f"{room['difference']:+.3f} ± {room['stderr']:.3f} ({z:.1f} paired SE, n = {room['n']}); "
                             + ("no selector can lead every baseline by 2 SE on these examples" if z < 2
                                else "room for a selector to lead every baseline by 2 SE"))
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Score (retention) per task and the average retention, one row per method and budget."""
    tasks = report["tasks"]
    header = ["method", "budget", "K"] + [
        f"{name} ({'acc ↑' if info['higher_is_better'] else 'NLL ↓'}, n={info['n']})" for name, info in tasks.items()
    ] + ["avg retention"]
    some_at_chance = bool(report["full_tokens_at_chance"])
    if some_at_chance:
        header.append("avg retention, tasks above chance")
    lines = [
        "# Visual-token pruning evaluation",
        "",
        f"Model `{report['model']}`, N = {report['visual_tokens_per_image']} visual tokens per image, "
        f"seed {report['seed']}, {report.get('split', '?')} split, position policy {report.get('position_policy', '?')} "
        "for every pre-LLM method (FastV keeps original positions, its method, and is paired with them). "
        "Cells: score ± standard error over examples (retention); — where a method cannot run the task.",
        *([f"The training-free baselines' cells{reused_on(report)} come from `{report['baselines_from']}` (the same "
           "examples, settings and all-token scores; not run again)."] if report.get("baselines_from") else []),
        *(["So do the all-token cells (`--reuse-all-tokens`): this run scored all tokens on each of those tasks' "
           "first and last batch only, and found them equal there."] if report.get("all_tokens_from") else []),
        "",
        f"_{report['retention_definition'][0].upper()}{report['retention_definition'][1:]}._",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method, by_budget in report["results"].items():
        for budget, row in by_budget.items():
            avg = "n/a" if row["average_retention"] is None else f"{row['average_retention']:.1f}%"
            cells = [method, budget, str(row["k"])] + [_cell(row["tasks"].get(t)) for t in tasks] + [avg]
            if some_at_chance:
                above = row["average_retention_above_chance"]
                cells.append("n/a" if above is None else f"{above:.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
    lines += _paired_lines(report)
    lines += _check_lines(report)
    if not tasks:
        lines += ["", "No task could be evaluated."]
    if report["retention_undefined"]:
        lines += ["", "Retention undefined (left out of the average):"]
        lines += [f"- `{name}`: {why}" for name, why in report["retention_undefined"].items()]
    if report["full_tokens_at_chance"]:
        lines += ["", "At chance with all tokens (retention there measures noise, not pruning; the last column "
                  "averages the other tasks):"]
        lines += [f"- `{name}`: {why}" for name, why in report["full_tokens_at_chance"].items()]
    if report["skipped"]:
        lines += ["", "Skipped tasks:"]
        lines += [f"- `{name}`: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"
