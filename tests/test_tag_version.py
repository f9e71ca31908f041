"""evaluate -> promote without the demo: `pipelines/evaluate.py --tag-version` writes the evaluation
to a registered version as tags (`mlops.registry.tag_evaluation`), `pipelines/promote.py --require`
gates on them, and every refusal is a named error before anything is evaluated. Tiny LLaVA built
in-process, an untrained scorer, a sqlite MLflow store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from mlops import registry
from pipelines import promote
from pipelines.evaluate import main
from pipelines.evaluation.report import version_tags

MODEL = "tiny-scorer"
TINY = "autoselect-testing/tiny-llava"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two registered versions of one untrained scorer in a fresh sqlite store."""
    root = tmp_path_factory.mktemp("tag-version")
    AutoSelectModel.attach(build_tiny_llava(seed=0)[0], AutoSelectConfig(budget=16)).save_pretrained(root / "scorer")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    registry.setup_tracking(tracking, "tag-version-test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("tag-version-test").experiment_id):
        versions = [registry.log_and_register(root / "scorer", MODEL, {"budget": "16"})["version"] for _ in range(2)]
    return {"root": root, "tracking": tracking, "scorer": root / "scorer", "versions": versions}


def evaluate(store, out, autoselect: str | None, tag: str, *extra: str) -> int:
    argv = ["--model", TINY, "--tag-version", tag, "--tracking-uri", store["tracking"], "--budgets", "16",
            "--tasks", "markers", "--limit", "8", "--dtype", "float32", "--out", str(out), *extra]
    if autoselect:
        argv += ["--autoselect", autoselect, "--pruners", "autoselect,random,uniform"]
    else:
        argv += ["--pruners", "random,uniform"]
    return main(argv)


@pytest.fixture(scope="module")
def tagged(store):
    """Version 1 evaluated from the registry and tagged with its results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = store["root"] / "eval"
    uri = f"models:/{MODEL}/{store['versions'][0]}"
    try:
        assert evaluate(store, out, uri, uri) == 0
    finally:
        torch.set_num_threads(threads)
    tags = MlflowClient(store["tracking"]).get_model_version(MODEL, store["versions"][0]).tags
    return {"report": json.loads((out / "report.json").read_text()), "tags": tags}


def test_evaluation_tags_are_the_reports_fractions_with_their_provenance(tagged):
    report, tags = tagged["report"], tagged["tags"]
    ours, random = (report["results"][name]["16"] for name in ("autoselect", "random"))
    assert float(tags["retention_avg"]) == pytest.approx(ours["average_retention"] / 100)
    assert float(tags["retention_avg.k16"]) == float(tags["retention_avg"])
    assert float(tags["retention.markers.k16"]) == pytest.approx(ours["tasks"]["markers"]["retention"] / 100)
    assert float(tags["retention_margin_vs_random"]) == pytest.approx(
        (ours["average_retention"] - random["average_retention"]) / 100)
    assert "retention_margin_vs_best_baseline" in tags
    paired = report["paired"]["16"]["uniform"]["markers"]
    assert float(tags["paired_vs_uniform.markers.k16"]) == pytest.approx(paired["difference"])
    assert float(tags["paired_vs_random.markers.k16.stderr"]) == pytest.approx(report["paired"]["16"]["random"]["markers"]["stderr"])
    assert {k: tags[k] for k in ("eval_split", "eval_n", "eval_n.markers", "eval_dtype", "eval_position_policy", "eval_budgets")} == {
        "eval_split": "val", "eval_n": "8", "eval_n.markers": "8", "eval_dtype": "float32",
        "eval_position_policy": "repack", "eval_budgets": "16"}
    assert tags["eval_scorer"] == f"models:/{MODEL}/1" and tags["budget"] == "16"  # the training tags stay


def test_promote_gates_on_the_tags_evaluate_wrote(store, tagged, capsys):
    version, value = store["versions"][0], float(tagged["tags"]["retention_avg"])
    gate = ["--model", MODEL, "--version", version, "--tracking-uri", store["tracking"]]
    client = MlflowClient(store["tracking"])
    assert promote.main([*gate, "--alias", "strict", "--require", f"retention_avg>={value + 0.01:.4f}"]) == 1
    assert "(version tag) fails" in capsys.readouterr().err
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL, "strict")
    assert promote.main([*gate, "--alias", "champion", "--require", f"retention_avg>={value:.4f}",
                         "--require", "eval_n>=8"]) == 0
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version


def test_tagging_again_replaces_the_previous_evaluations_tags(store):
    client = MlflowClient(store["tracking"])
    target = client.get_model_version(MODEL, store["versions"][1])
    registry.tag_evaluation(target, {"retention.old_task.k99": "0.5", "retention_avg": "0.5"}, client)
    registry.tag_evaluation(target, {"retention_avg": "0.9", "eval_split": "test"}, client)
    tags = client.get_model_version(MODEL, target.version).tags
    assert tags["retention_avg"] == "0.9" and tags["eval_split"] == "test" and "retention.old_task.k99" not in tags
    assert tags["budget"] == "16"
    with pytest.raises(ValueError, match="must start with"):
        registry.tag_evaluation(target, {"budget": "8"}, client)


@pytest.mark.parametrize("autoselect, tag, error", [
    ("models:/tiny-scorer/1", "models:/tiny-scorer", "NotAVersionURI"),
    ("models:/tiny-scorer/1", "models:/tiny-scorer/1/2", "NotAVersionURI"),
    ("models:/tiny-scorer/1", "runs:/0123/scorer", "NotAVersionURI"),
    ("models:/tiny-scorer/1", "models:/tiny-scorer/99", "VersionNotFound"),
    ("models:/tiny-scorer/1", "models:/no-such-model/1", "VersionNotFound"),
    ("models:/tiny-scorer/1", "models:/tiny-scorer@no-such-alias", "VersionNotFound"),
    (None, "models:/tiny-scorer/1", "NoScorerToTag"),
    ("models:/tiny-scorer/1", "models:/tiny-scorer/2", "ScorerVersionMismatch"),
])
def test_refusals_are_named_and_come_before_any_evaluation(store, tmp_path, capsys, autoselect, tag, error):
    out = tmp_path / "out"
    assert evaluate(store, out, autoselect, tag) == 2
    assert f"error: {error}:" in capsys.readouterr().err
    assert not out.exists()  # nothing was evaluated


def test_the_registry_check_resolves_aliases_and_warns_on_a_folder(store):
    client = MlflowClient(store["tracking"])
    first, second = store["versions"]
    client.set_registered_model_alias(MODEL, "evaluated", first)
    assert str(registry.tag_target(f"models:/{MODEL}@evaluated", f"models:/{MODEL}/{first}", client).version) == first
    with pytest.raises(registry.ScorerVersionMismatch, match=f"not {MODEL} v{second}"):
        registry.tag_target(f"models:/{MODEL}/{second}", f"models:/{MODEL}@evaluated", client)
    assert str(registry.tag_target(f"models:/{MODEL}/latest", f"models:/{MODEL}/{second}", client).version) == second
    with pytest.raises(registry.NoScorerToTag):
        registry.tag_target(f"models:/{MODEL}/{first}", None, client)
    with pytest.raises(registry.VersionNotFound):
        registry.tag_target(f"models:/{MODEL}/{first}", f"models:/{MODEL}@no-such-alias", client)
    with pytest.warns(registry.UnverifiedScorerWarning, match="is a folder"):
        assert str(registry.tag_target(f"models:/{MODEL}/{second}", str(store["scorer"]), client).version) == second

def test_both_position_policies_cannot_be_tagged(store, tmp_path, capsys):
    assert main(["--autoselect", str(store["scorer"]), "--tag-version", f"models:/{MODEL}/1", "--out", str(tmp_path / "out"),
                 "--position-policy", "both", "--tracking-uri", store["tracking"]]) == 2
    assert "error: TagVersionError: --tag-version tags one position policy" in capsys.readouterr().err


def test_version_tags_average_the_budgets_and_leave_undefined_values_out():
    def row(avg, tasks):
        return {"k": 0, "tasks": {t: {"retention": r} for t, r in tasks.items()}, "average_retention": avg}

    report = {
        "budgets": [{"budget": "1/8", "k": 8}, {"budget": "16", "k": 16}],
        "tasks": {"markers": {"n": 20, "higher_is_better": True}, "caption_nll": {"n": 12, "higher_is_better": False}},
        "results": {
            "full": {"all": row(100.0, {})},
            "autoselect": {"1/8": row(80.0, {"markers": 70.0, "caption_nll": 90.0}), "16": row(90.0, {"markers": None, "caption_nll": 90.0})},
            "random": {"1/8": row(60.0, {}), "16": row(None, {})},
            "oracle": {"1/8": row(99.0, {}), "16": row(99.0, {})},
            "uniform": {"1/8": row(70.0, {}), "16": row(85.0, {})},
        },
        "paired": {"1/8": {"random": {"markers": {"difference": 0.1, "stderr": 0.05, "n": 20},
                                      "caption_nll": {"difference": -0.2, "stderr": 0.1, "n": 12}}}},
        "split": "test", "dtype": "bfloat16", "position_policy": "original", "model": "m", "seed": 3,
        "autoselect": {"path": "outputs/scorer"},
    }
    tags = version_tags(report)
    assert tags["retention_avg"] == "0.8500" and tags["retention_avg.k8"] == "0.8000"
    assert tags["retention.markers.k8"] == "0.7000" and "retention.markers.k16" not in tags
    assert tags["retention_margin_vs_random.k8"] == "0.2000" and "retention_margin_vs_random.k16" not in tags
    assert tags["retention_margin_vs_random"] == "0.2000"  # the only budget where it is defined
    assert tags["retention_margin_vs_best_baseline.k8"] == "0.1000"  # uniform: the oracle is no baseline
    assert tags["retention_margin_vs_best_baseline"] == "0.0750"
    assert tags["paired_vs_random.markers.k8"] == "0.1000" and not any("caption_nll" in k and "paired" in k for k in tags)
    assert (tags["eval_n"], tags["eval_n.caption_nll"], tags["eval_split"], tags["eval_scorer"]) == ("12", "12", "test", "outputs/scorer")
    report["results"]["random[repack]"] = report["results"].pop("random")
    with pytest.raises(ValueError, match="two position policies"):
        version_tags(report)


def test_a_challenger_is_gated_on_the_champions_value_only_when_evaluated_alike(store, tagged, tmp_path, capsys):
    """``--require retention_avg>@incumbent``: the threshold is the incumbent's own tag, and versions
    evaluated under other settings (here fewer examples) are refused rather than compared."""
    client = MlflowClient(store["tracking"])
    first, second = store["versions"]
    client.set_registered_model_alias(MODEL, "incumbent", first)
    gate = ["--model", MODEL, "--version", second, "--tracking-uri", store["tracking"]]
    uri = f"models:/{MODEL}/{second}"

    assert evaluate(store, tmp_path / "fewer", uri, uri, "--limit", "6") == 0
    assert promote.main([*gate, "--alias", "contender", "--require", "retention_avg>=@incumbent"]) == 1
    assert "not evaluated alike (eval_n: 6 vs 8" in capsys.readouterr().err

    assert evaluate(store, tmp_path / "alike", uri, uri) == 0  # same settings as v1's: the same untrained weights
    ours = float(client.get_model_version(MODEL, second).tags["retention_avg"])
    assert ours == float(tagged["tags"]["retention_avg"])
    assert promote.main([*gate, "--alias", "contender", "--require", "retention_avg>@incumbent"]) == 1
    tie = capsys.readouterr().err  # a tie does not win, and says so (not "short by 0")
    assert f"fails > {ours:g} (@incumbent v{first}'s) (equal: > asks for more)" in tie
    assert promote.main([*gate, "--alias", "contender", "--require", "retention_avg>=@incumbent"]) == 0
    assert str(client.get_model_version_by_alias(MODEL, "contender").version) == second

    assert promote.main([*gate, "--require", "retention_avg>@no-such-alias"]) == 1
    assert "has no alias 'no-such-alias'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        promote.main([*gate, "--require", "retention_avg>@"])
    assert "'@' needs an alias name" in capsys.readouterr().err


def test_the_registered_model_pins_what_the_scorer_imports(store):
    """Written by `log_and_register`, not inferred by MLflow (which left torch out)."""
    from importlib.metadata import version

    mlflow.set_tracking_uri(store["tracking"])
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{MODEL}/{store['versions'][0]}")).read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in requirements
    assert f"autoselect=={version('autoselect')}" in requirements and f"mlflow=={version('mlflow')}" in requirements
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{store['versions'][0]}")
    tokens = np.random.default_rng(0).standard_normal((1, 64, 32)).astype(np.float32)
    assert model.predict({"visual_tokens": tokens}, params={"k": 16}).shape == (1, 16)
