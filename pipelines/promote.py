"""Move a registry alias to a model version only if its evaluation metrics pass the gates.

    python -m pipelines.promote --model autoselect-scorer --version 3 --require retention_avg>=0.95
    python -m pipelines.promote --model autoselect-scorer --version latest --alias challenger
    python -m pipelines.promote --model autoselect-scorer --version 4 --require "retention_avg>@champion"
    python -m pipelines.promote --model autoselect-scorer --list

Metric values come from the version's tags (`pipelines/evaluate.py --tag-version` writes its
results there) and then from the metrics of the run that logged it. A threshold ``@ALIAS`` is that
alias's version's value of the same metric (champion/challenger), compared only when both versions
carry the same evaluation settings (every ``eval_*`` tag but the scorer: split, n, tasks, budgets,
dtype, policy, backbone, seed). Aliases only: MLflow stages are deprecated.
Exit status: 0 promoted (or would be, with --dry-run), 1 a gate failed or a metric is missing,
2 bad arguments or an unknown model/version.
"""

from __future__ import annotations

import argparse
import math
import operator
import re
import sys
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlops.registry import SETTINGS_TAG_PREFIX
from mlops.tracking import MlflowSection, resolve_tracking_uri

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}
_REQUIREMENT = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")
SCORER_TAG = SETTINGS_TAG_PREFIX + "scorer"  # the one evaluation tag two compared versions must differ in


@dataclass(frozen=True)
class Requirement:
    """``metric OP threshold``, e.g. ``retention_avg>=0.95``, or ``retention_avg>@champion``: the
    threshold is then the value the ``champion`` version has for the same metric (`resolve_aliases`)."""

    metric: str
    op: str
    threshold: float
    against: str | None = None  # the alias whose version set ``threshold``

    @classmethod
    def parse(cls, text: str) -> "Requirement":
        match = _REQUIREMENT.match(text)
        if not match:
            raise ValueError(f"--require expects METRIC(>=|<=|>|<|==)NUMBER or @ALIAS, got {text!r}")
        metric, op, threshold = match.groups()
        if threshold.startswith("@"):
            if len(threshold) == 1:
                raise ValueError(f"--require {text!r}: '@' needs an alias name (e.g. @champion)")
            return cls(metric, op, math.nan, against=threshold[1:])
        try:
            return cls(metric, op, float(threshold))
        except ValueError:
            raise ValueError(f"--require {text!r}: {threshold!r} is not a number or @ALIAS") from None

    def failure(self, value: float | None, source: str) -> str | None:
        """Why ``value`` fails this gate, or None when it passes."""
        if value is None:
            return f"{self.metric}: not found (required {self.op} {self._threshold()})"
        if not math.isnan(value) and OPERATORS[self.op](value, self.threshold):
            return None
        if value == self.threshold:  # a tie under a strict gate: "short by 0" would read as a bug
            why = f"equal: {self.op} asks for {'more' if self.op == '>' else 'less'}"
        else:
            gap = {">": "short", ">=": "short", "<": "over", "<=": "over"}.get(self.op, "off")
            why = f"{gap} by {abs(value - self.threshold):.6g}"
        return f"{self.metric} = {value:g} ({source}) fails {self.op} {self._threshold()} ({why})"

    def _threshold(self) -> str:
        return f"{self.threshold:g}" + (f" (@{self.against}'s)" if self.against else "")

    def __str__(self) -> str:
        return f"{self.metric}{self.op}" + (f"@{self.against}" if self.against else f"{self.threshold:g}")


def version_values(client: MlflowClient, version) -> dict[str, tuple[float, str]]:
    """``metric -> (value, source)`` for a version: numeric version tags win over run metrics."""
    values: dict[str, tuple[float, str]] = {}
    if version.run_id:
        for name, value in client.get_run(version.run_id).data.metrics.items():
            values[name] = (float(value), "run metric")
    for name, text in version.tags.items():
        try:
            values[name] = (float(text), "version tag")
        except ValueError:
            continue
    return values


def check(requirements: list[Requirement], values: dict[str, tuple[float, str]]) -> list[str]:
    """One message per failed gate (empty when every gate passes)."""
    failures = []
    for requirement in requirements:
        value, source = values.get(requirement.metric, (None, ""))
        message = requirement.failure(value, source)
        if message:
            failures.append(message)
    return failures


def evaluation_settings(version) -> dict[str, str]:
    """The ``eval_*`` tags `evaluate --tag-version` wrote, less the scorer's name: what makes two
    versions' metrics comparable."""
    return {k: v for k, v in version.tags.items() if k.startswith(SETTINGS_TAG_PREFIX) and k != SCORER_TAG}


def resolve_aliases(client: MlflowClient, name: str, target, requirements: list[Requirement]) -> tuple[list[Requirement], list[str]]:
    """``@ALIAS`` thresholds replaced by that version's value, and one message per gate that cannot be
    compared: the alias is not set, lacks the metric, or was evaluated under other settings."""
    resolved, failures = [], []
    for requirement in requirements:
        if requirement.against is None:
            resolved.append(requirement)
            continue
        alias = requirement.against
        try:
            other = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            failures.append(f"{requirement}: {name} has no alias {alias!r} to compare with")
            continue
        value, _ = version_values(client, other).get(requirement.metric, (None, ""))
        if value is None:
            failures.append(f"{requirement}: {name}@{alias} (v{other.version}) has no {requirement.metric}")
            continue
        ours, theirs = evaluation_settings(target), evaluation_settings(other)
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ or not ours:
            why = ", ".join(f"{k}: {ours.get(k)} vs {theirs.get(k)}" for k in differ) or "no eval_* tags on either"
            failures.append(f"{requirement}: v{target.version} and {name}@{alias} (v{other.version}) were not "
                            f"evaluated alike ({why}); evaluate both with the same settings (evaluate.py --tag-version)")
            continue
        resolved.append(Requirement(requirement.metric, requirement.op, value, against=f"{alias} v{other.version}"))
    return resolved, failures


def get_version(client: MlflowClient, name: str, version: str):
    """A version by number, or the newest one for ``latest``."""
    if version != "latest":
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise MlflowException(f"registered model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


def list_versions(client: MlflowClient, name: str) -> str:
    """A plain table of every version with its aliases, metrics and tags."""
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    aliases: dict[str, list[str]] = {}  # search results leave ModelVersion.aliases empty; ask the model
    for alias, number in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    lines = [f"{name}: {len(versions)} version(s)"]
    for version in versions:
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        lines.append(
            f"  v{version.version:<4} aliases=[{', '.join(sorted(aliases.get(str(version.version), [])))}]"
            f" run={(version.run_id or '-')[:8]}"
            f" metrics={{{', '.join(f'{k}={v:g}' for k, v in sorted(metrics.items()))}}}"
            f" tags={{{', '.join(f'{k}={v}' for k, v in sorted(version.tags.items()))}}}"
        )
    return "\n".join(lines)


def promote(client: MlflowClient, name: str, version: str, alias: str, requirements: list[Requirement],
            dry_run: bool = False) -> tuple[bool, str]:
    """Check the gates; move ``alias`` to the version when they pass. Returns (passed, report)."""
    target = get_version(client, name, version)
    resolved, failures = resolve_aliases(client, name, target, requirements)
    failures += check(resolved, version_values(client, target))
    gates = ", ".join(map(str, requirements)) or "no gates"
    if failures:
        return False, (f"refused: {name} v{target.version} does not meet {gates}; alias {alias!r} unchanged\n  "
                       + "\n  ".join(failures))
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    if dry_run:
        return True, f"dry run: {name} v{target.version} meets {gates}; would move {alias!r} from v{previous} to v{target.version}"
    client.set_registered_model_alias(name, alias, target.version)
    return True, f"promoted: {name}@{alias} -> v{target.version} (was v{previous}); passed {gates}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MlflowSection().registered_model, help="registered model name (default: %(default)s)")
    parser.add_argument("--version", help="version number, or 'latest'")
    parser.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    parser.add_argument("--require", action="append", default=[], metavar="METRIC>=VALUE",
                        help="gate on a run metric or version tag; repeatable (ops: >= <= > < ==); the value may be "
                             "@ALIAS: that alias's value of the metric (e.g. retention_avg>@champion)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db")
    parser.add_argument("--list", action="store_true", help="list versions with aliases, metrics and tags")
    parser.add_argument("--dry-run", action="store_true", help="check the gates without moving the alias")
    args = parser.parse_args(argv)
    if not args.list and not args.version:
        parser.error("--version is required unless --list is given")
    try:
        requirements = [Requirement.parse(text) for text in args.require]
    except ValueError as exc:
        parser.error(str(exc))

    mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    client = MlflowClient()
    try:
        if args.list:
            print(list_versions(client, args.model))
            return 0
        passed, report = promote(client, args.model, args.version, args.alias, requirements, args.dry_run)
    except MlflowException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(report, file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
