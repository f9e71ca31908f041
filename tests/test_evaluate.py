"""The evaluation harness on the tiny LLaVA: exact scoring under every pruner, then the CLI end to
end (report, table, plots, skipped tasks, determinism) with a quickly trained AutoSelect scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.backbones import get_adapter
from autoselect.pruners import available_pruners
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import marker_batches, teach_vlm_markers
from autoselect.training import train
from pipelines.evaluate import main
from pipelines.evaluation.methods import FULL, InsideLLM, PreLLM, baseline_settings, build_methods
from pipelines.evaluation.scoring import answer_log_likelihoods, choice_batch, encode_rows
from pipelines.evaluation.tasks import TaskContext, load_tasks
from tests.support.scripts import load_script

N = 64  # tiny LLaVA: 32 px, patch 4
CAPTIONS_IN_VAL = 9  # of the 16 held-out caption records write_captions makes, by split_of's hash
PRUNERS = ["autoselect", *available_pruners(), "oracle"]
BUDGETS = ["8", "1/4", str(N)]  # K = 8, 16 and N


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make the tiny model slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def taught(tmp_path_factory, single_thread):
    """A tiny LLaVA that answers the marker question with all tokens, saved as an HF folder, and
    an AutoSelect scorer trained on it for a few steps (saved with save_pretrained)."""
    root = tmp_path_factory.mktemp("evaluate")
    vlm, processor = build_tiny_llava(seed=0)
    teach_vlm_markers(vlm, processor, steps=100, seed=1)
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, temperature_steps=20))
    torch.manual_seed(0)
    train(model, marker_batches(processor, 16, seed=2), steps=25, lr=1e-3)
    model.save_pretrained(root / "scorer")
    write_captions(root / "corpora")
    return {"root": root, "vlm": vlm.eval(), "processor": processor, "model_dir": root / "vlm", "scorer_dir": root / "scorer"}


def write_captions(out: Path, count: int = 16) -> None:
    """A packaged-corpora folder holding only held-out captions (so fmnist_vqa has no data)."""
    import numpy as np

    from autoselect.testing.synthetic import COLOURS, marker_image
    from pipelines.corpora.common import llava_record, save_png, write_jsonl

    rng = np.random.default_rng(7)
    records = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        image, _ = marker_image(rng, colour)
        path = save_png(image, out, f"images/captions/{i}.png")
        records.append(llava_record(f"caption-{i}", path, "Describe the picture.", f"A {colour} marker on grey noise.", task="photo_caption", label=colour))
    write_jsonl(out / "captions.heldout.jsonl", records)


def run_cli(taught, out: Path, *extra: str) -> dict:
    argv = [
        "--model", str(taught["model_dir"]), "--autoselect", str(taught["scorer_dir"]),
        "--budgets", *BUDGETS, "--pruners", ",".join(PRUNERS),
        "--tasks", "markers,spatial_markers,fmnist_vqa,caption_nll", "--corpora", str(taught["root"] / "corpora"),
        "--limit", "16", "--batch-size", "8", "--seed", "0", "--out", str(out), *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def out_dir(taught, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-out")
    run_cli(taught, out)
    return out


@pytest.fixture(scope="module")
def report(out_dir) -> dict:
    return json.loads((out_dir / "report.json").read_text())


# ---- scoring is exact under every method ------------------------------------------------------
def test_batched_scores_equal_each_rows_own_loss_under_every_pruner(taught):
    """Right-padded rows of different lengths, pruned before or inside the LLM: each row's summed
    answer log-likelihood equals -(the model's own loss on that row alone) x its answer tokens
    (FastV's alone ranked at the row's prompt end, as the evaluation and generation rank)."""
    from pipelines.evaluation.scoring import prompt_ends

    vlm, processor = taught["vlm"], taught["processor"]
    image_token_id = get_adapter(vlm).image_token_id
    (task,), _ = load_tasks(["spatial_markers"], TaskContext(32, 4, Path("/nonexistent"), seed=3, limit=3))
    choices = list(task.choices)
    batch = choice_batch(processor, task.examples, choices)
    assert len(set((batch["attention_mask"].sum(-1)).tolist())) > 1, "rows of different lengths"
    methods = build_methods(vlm, [p for p in available_pruners() if p != "random"], [("16", 16)], None, baseline_settings(vlm, 0, None))
    for method in methods:
        sums, counts = answer_log_likelihoods(method, batch, len(choices), image_token_id)
        for row, (example, choice) in enumerate((e, c) for e in task.examples for c in choices):
            alone = encode_rows(processor, [(example, choice)])
            with torch.no_grad():
                own = {"rank_columns": prompt_ends(alone["labels"], alone["attention_mask"])} if method.name == "fastv" else {}
                loss = method.model(**alone).loss if method.name == FULL else method.model(**alone, budget=method.budget, **own).loss
            assert int(counts[row]) == int((alone["labels"] != -100).sum())
            assert float(sums[row]) == pytest.approx(-float(loss) * int(counts[row]), abs=1e-4), (method.label, row)


@pytest.mark.parametrize("position_policy", ["repack", "original"])
def test_shared_prompt_scoring_equals_one_forward_per_row(taught, position_policy):
    """The fast path (each prompt once, its KV cache copied to every candidate) gives the numbers of
    a full forward per row, for full tokens, AutoSelect and every baseline, whether kept tokens are
    re-packed or keep their original positions (the tail then continues after the unpruned prompt)."""
    from autoselect.pruners.random import RandomPruner
    from pipelines.evaluation.scoring import shared_prompt_length

    vlm, processor = taught["vlm"], taught["processor"]
    image_token_id = get_adapter(vlm).image_token_id
    (task,), _ = load_tasks(["markers"], TaskContext(32, 4, Path("/nonexistent"), seed=4, limit=3))
    batch = choice_batch(processor, task.examples, task.choices)
    repeats = len(task.choices)
    assert shared_prompt_length(batch, repeats) is not None, "choice rows share their prompt"
    autoselect = AutoSelectModel.from_pretrained(taught["scorer_dir"], vlm).eval()
    autoselect.config.position_policy = position_policy
    if position_policy == "repack":
        methods = build_methods(vlm, PRUNERS, [("8", 8)], autoselect, baseline_settings(vlm, 0, None))
    else:  # the pruners whose position policy is a choice (FastV always keeps original positions)
        methods = [PreLLM("autoselect", "8", 8, autoselect), PreLLM("random", "8", 8, RandomPruner(vlm, 8, seed=0, position_policy="original"))]
    for method in methods:
        assert method.name not in ("autoselect", "random") or method.model.position_policy == position_policy
        method.prepare(task.examples)  # the oracle reads the examples' answer boxes
        fast, _ = answer_log_likelihoods(method, batch, repeats, image_token_id, share_prompts=True)
        if method.name == "random":  # a fresh draw per call: rebuild it so both paths see the same stream
            method = PreLLM("random", "8", 8, RandomPruner(vlm, 8, seed=0, position_policy=position_policy))
        slow, _ = answer_log_likelihoods(method, batch, repeats, image_token_id, share_prompts=False)
        assert torch.allclose(fast, slow, atol=1e-4), (method.label, (fast - slow).abs().max())


def test_alignment_scores_held_out_answers_with_the_evaluations_scorer(taught, tmp_path):
    """One multiple-choice scorer: the aligner's held-out accuracy over corpus records (in chunks
    that do not divide them) is the full-token accuracy the evaluation reports on them."""
    import numpy as np

    from autoselect.testing.synthetic import COLOURS, QUESTION, marker_image
    from pipelines.align.evaluate import choice_accuracy, record_example
    from pipelines.corpora.common import llava_record, save_png
    from pipelines.evaluation.methods import FullTokens
    from pipelines.evaluation.runner import evaluate_task
    from pipelines.evaluation.tasks import Task

    vlm, processor = taught["vlm"], taught["processor"]
    rng, colours = np.random.default_rng(11), list(COLOURS)
    records = []
    for i in range(7):
        colour = colours[i % len(colours)]
        image, _ = marker_image(rng, colour)
        records.append(llava_record(f"m{i}", save_png(image, tmp_path, f"images/{i}.png"), QUESTION, colour, label=colour))
    aligned = choice_accuracy(vlm, processor, tmp_path, records, colours, batch_size=3)
    task = Task("markers", "choice", [record_example(tmp_path, r) for r in records], "markers", "test", tuple(colours))
    full = FullTokens(vlm)
    scores = evaluate_task(task, [full], processor, get_adapter(vlm).image_token_id, 4, torch.device("cpu"), torch.float32)
    assert aligned["n"] == 7 and aligned["accuracy"] == round(scores[full.label]["score"], 4)
    assert sum(aligned["predicted_counts"].values()) == 7


def test_pre_llm_pruners_choose_once_per_image_for_all_candidates(taught):
    vlm, processor = taught["vlm"], taught["processor"]
    (task,), _ = load_tasks(["markers"], TaskContext(32, 4, Path("/nonexistent"), seed=5, limit=2))
    (method,) = build_methods(vlm, ["random"], [("16", 16)], None, {"random": {"seed": 0}})[1:]
    assert isinstance(method, PreLLM)
    repeats = len(task.choices)
    out = method.forward({k: v for k, v in choice_batch(processor, task.examples, task.choices).items() if k != "labels"}, repeats, 4)
    groups = out.selection.indices.view(len(task.examples), repeats, -1)
    assert (groups == groups[:, :1]).all(), "every candidate of an image sees the same random draw"
    assert not torch.equal(groups[0, 0], groups[1, 0]), "different images get different draws"


# ---- the CLI ----------------------------------------------------------------------------------
def test_cli_writes_json_markdown_and_both_plots(report, out_dir):
    assert report["overlay"]["file"] == "kept_patches.png"
    for name in ("retention_vs_budget.png", "kept_patches.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out_dir / "report.md").read_text()
    assert "| autoselect | 1/4 | 16 |" in table and "| full | all | 64 |" in table
    assert report["overlay"]["methods"] == ["autoselect@8", "divprune@8", "fastv@8"]
    assert report["pruners"]["fastv"] == {"layer": 1}  # the tiny LLM has 2 layers


def test_every_method_and_budget_has_a_score(report):
    tasks = ["markers", "spatial_markers", "caption_nll"]
    assert list(report["tasks"]) == tasks
    assert report["results"][FULL].keys() == {"all"}
    for method in PRUNERS:
        assert list(report["results"][method]) == BUDGETS
        for budget, row in report["results"][method].items():
            assert row["k"] == {"8": 8, "1/4": 16, str(N): N}[budget]
            for task in tasks[:2]:
                entry = row["tasks"][task]
                assert entry["n"] == 16 and 0.0 <= entry["score"] <= 1.0
            if method == "oracle":  # captions have no answer box: the oracle cannot run there
                assert "caption_nll" not in row["tasks"]
                continue
            assert row["tasks"]["caption_nll"]["n"] == CAPTIONS_IN_VAL and row["tasks"]["caption_nll"]["score"] > 0


def test_retention_is_100_at_full_tokens_and_when_k_equals_n(report):
    assert report["results"][FULL]["all"]["tasks"]["markers"]["score"] > 0.5, "the taught VLM reads the markers"
    assert report["results"][FULL]["all"]["average_retention"] == 100.0
    for method in PRUNERS:
        row = report["results"][method][str(N)]  # K = N
        assert all(entry["retention"] == 100.0 for entry in row["tasks"].values()), method
        assert row["average_retention"] == 100.0
    # and pruning hard does cost something (so the 100 % above is not vacuous)
    assert report["results"]["random"]["8"]["tasks"]["markers"]["retention"] < 90.0
    # a loss: retention is full / pruned, so it moves opposite to the NLL
    full, pruned = (report["results"][m][b]["tasks"]["caption_nll"] for m, b in ((FULL, "all"), ("random", "8")))
    assert pruned["retention"] == pytest.approx(100 * full["score"] / pruned["score"], abs=0.02)


def test_standard_errors_and_paired_differences_follow_the_per_example_scores(report, out_dir):
    """Every cell's stderr is the sample one over its examples; the paired AutoSelect-minus-baseline
    difference equals the difference of the two scores (same examples, same answer tokens), and is
    exactly 0 with no error at K = N, where both keep every token."""
    for task in ("markers", "spatial_markers"):
        for method, budget in (("random", "8"), ("autoselect", "1/4"), (FULL, "all")):
            entry = report["results"][method][budget]["tasks"][task]
            p, n = entry["score"], entry["n"]
            assert entry["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-4), (task, method)
            label = FULL if method == FULL else f"{method}@{budget}"
            assert sum(report["per_example"][task][label]) == pytest.approx(p * n)
    paired = report["paired"]
    for task in ("markers", "spatial_markers", "caption_nll"):
        same = paired[str(N)]["random"][task]
        assert same["difference"] == 0.0 and same["stderr"] == 0.0 and same["n"] == report["tasks"][task]["n"]
        ours, theirs = (report["results"][m]["8"]["tasks"][task]["score"] for m in ("autoselect", "random"))
        assert paired["8"]["random"][task]["difference"] == pytest.approx(ours - theirs, abs=2e-4), task
        if task != "caption_nll":  # choice tasks: the true answer's NLL, paired the same way
            nlls = [report["results"][m]["8"]["tasks"][task]["answer_nll"] for m in ("autoselect", "random")]
            assert paired["8"]["random"][task]["answer_nll"]["difference"] == pytest.approx(nlls[0] - nlls[1], abs=2e-4)
            assert same["answer_nll"] == {"difference": 0.0, "stderr": 0.0, "n": same["n"]}
    # FastV keeps original positions (its method) and, with no pre-LLM method under original here,
    # is paired with AutoSelect under this run's repack policy
    assert set(paired["8"]) == set(PRUNERS) - {"autoselect"}
    ours, theirs = (report["results"][m]["8"]["tasks"]["markers"]["score"] for m in ("autoselect", "fastv"))
    assert paired["8"]["fastv"]["markers"]["difference"] == pytest.approx(ours - theirs, abs=2e-4)
    # with all tokens the taught VLM's true answers are likelier than under random pruning at K = 8
    full_nll, random_nll = (report["results"][m][b]["tasks"]["markers"]["answer_nll"] for m, b in ((FULL, "all"), ("random", "8")))
    assert 0 < full_nll < random_nll
    nll = report["results"]["random"]["8"]["tasks"]["caption_nll"]
    assert nll["stderr"] is not None and 0 < nll["stderr"] < nll["score"]
    table = (out_dir / "report.md").read_text()
    assert "Paired on the same examples" in table and "| autoselect − random | 8 |" in table
    assert f"{report['results']['random']['8']['tasks']['markers']['score']:.3f} ± " in table


def test_missing_task_data_is_reported_as_skipped_with_the_reason(report, out_dir):
    reason = report["skipped"]["fmnist_vqa"]
    assert "fashion_mnist.heldout.jsonl not found" in reason and "pipelines/packaged_corpora.py" in reason
    assert "`fmnist_vqa`: " in (out_dir / "report.md").read_text()
    assert "fmnist_vqa" not in report["tasks"]


def test_results_are_deterministic_under_a_seed(report, taught, tmp_path):
    again = run_cli(taught, tmp_path / "again")
    assert again["results"] == report["results"]


def test_tiny_id_default_processor_and_bad_arguments(taught, tmp_path, capsys):
    out = tmp_path / "tiny"
    code = main(["--model", "autoselect-testing/tiny-llava", "--pruners", "random", "--budgets", "0.5",
                 "--tasks", "caption_nll", "--corpora", str(tmp_path / "none"), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and report["tasks"] == {} and "captions.heldout.jsonl not found" in report["skipped"]["caption_nll"]
    assert "Skipped tasks:" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["--pruners", "autoselect", "--out", str(out)])
    assert "--autoselect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "autoselect-testing/tiny-llava", "--pruners", "random", "--budgets", "65", "--tasks", "markers", "--out", str(out)])
    assert "exceeds the 64 visual tokens" in capsys.readouterr().err


def test_a_diverged_scorer_is_refused(taught, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-scorer"
    shutil.copytree(taught["scorer_dir"], broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.startswith("scorer."))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors")
    code = main(["--model", str(taught["model_dir"]), "--autoselect", str(broken), "--pruners", "autoselect",
                 "--budgets", "16", "--tasks", "markers", "--out", str(tmp_path / "out")])
    assert code == 2 and f"non-finite weights in {name}:" in capsys.readouterr().err


def test_scorer_from_the_mlflow_registry(taught, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlops import registry

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.setup_tracking(tracking, "evaluate-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("evaluate-test").experiment_id):
        version = registry.log_and_register(taught["scorer_dir"], "tiny-scorer", {"budget": "16"})["version"]
    MlflowClient().set_registered_model_alias("tiny-scorer", "champion", version)
    out = tmp_path / "out"
    assert main(["--model", str(taught["model_dir"]), "--autoselect", "models:/tiny-scorer@champion", "--tracking-uri", tracking,
                 "--pruners", "autoselect", "--budgets", "16", "--tasks", "markers", "--limit", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["autoselect"]["registered_model"] == "tiny-scorer" and report["autoselect"]["version"] == version
    assert report["results"]["autoselect"]["16"]["tasks"]["markers"]["n"] == 8


def test_budget_sampling_bench_compares_scorers_on_the_same_examples(taught, tmp_path, capsys):
    """experiments/budget_sampling_mini_llava.py on the tiny model: a scorer against itself differs by
    exactly 0; against another scorer the paired difference is the difference of accuracies."""
    bench = load_script("experiments/budget_sampling_mini_llava.py")
    untrained = tmp_path / "untrained"
    AutoSelectModel.attach(build_tiny_llava(seed=0)[0], AutoSelectConfig(budget=8)).save_pretrained(untrained)
    out = tmp_path / "bench.json"
    code = bench.main(["--model", str(taught["model_dir"]), "--task", "markers", "--limit", "16", "--dtype", "float32",
                       "--sampled", str(taught["scorer_dir"]), "--per-budget", f"8={taught['scorer_dir']}", f"16={untrained}",
                       "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 16 and set(result["budgets"]) == {"8", "16"}
    same, other = result["budgets"]["8"], result["budgets"]["16"]
    assert same["sampled_minus_per_budget"]["accuracy_points"] == 0.0 and same["within_tolerance"]
    assert same["sampled"] == same["per_budget"]
    expected = 100 * (other["sampled"]["accuracy"] - other["per_budget"]["accuracy"])
    assert other["sampled_minus_per_budget"]["accuracy_points"] == pytest.approx(expected, abs=0.02)
    assert "| 16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--sampled", "x", "--per-budget", "eight=x"])


def test_a_task_the_full_model_cannot_do_is_flagged_and_left_out_of_the_second_average():
    """Full tokens at 8/64 on a 10-way task is 0.7 binomial standard errors above chance: its
    retention is noise, flagged and averaged apart; 45/64 and the NLL task stay in both averages."""
    from PIL import Image

    from pipelines.evaluation.methods import FullTokens
    from pipelines.evaluation.report import Budget, build_report, markdown, not_above_chance
    from pipelines.evaluation.tasks import Example, Task

    classes = tuple(f"class {i}" for i in range(10))
    examples = [Example(str(i), Image.new("RGB", (8, 8)), "which?", classes[0]) for i in range(64)]
    noisy = Task("noisy", "choice", examples, "a 10-way task", "test", classes)
    clear = Task("clear", "choice", examples, "a 10-way task", "test", classes)
    caption = Task("caption", "nll", examples, "captions", "test")
    pruned = PreLLM("random", "8", 8, None)
    nll = {"per_example_answer_nll": [1.0] * 64}
    scores = {
        "noisy": {FULL: {"score": 8 / 64, "n": 64, **nll}, pruned.label: {"score": 12 / 64, "n": 64, **nll}},
        "clear": {FULL: {"score": 45 / 64, "n": 64, **nll}, pruned.label: {"score": 30 / 64, "n": 64, **nll}},
        "caption": {FULL: {"score": 3.0, "n": 64}, pruned.label: {"score": 4.0, "n": 64}},
    }
    report = build_report({"model": "m", "seed": 0}, [noisy, clear, caption], {}, scores, [FullTokens(None), pruned], [Budget("8", 8, 8)], 64)
    assert list(report["full_tokens_at_chance"]) == ["noisy"]
    assert "does not clear chance 0.100 by 2 standard errors (0.038 each at n = 64)" in report["full_tokens_at_chance"]["noisy"]
    row = report["results"]["random"]["8"]
    assert row["average_retention"] == pytest.approx((150.0 + 100 * 30 / 45 + 75.0) / 3, abs=0.01)
    assert row["average_retention_above_chance"] == pytest.approx((100 * 30 / 45 + 75.0) / 2, abs=0.01)
    assert "avg retention, tasks above chance" in markdown(report)
    # 13/64 on 10 ways clears chance by 2.7 standard errors; at or below chance is flagged as before
    assert not_above_chance(clear, {"score": 13 / 64, "n": 64}) is None
    assert not_above_chance(clear, {"score": 0.05, "n": 64}) is not None
    assert not_above_chance(caption, {"score": 9.0, "n": 64}) is None


def test_the_selection_check_reports_the_oracles_lead_over_the_best_baseline_of_its_policy():
    """Headroom: the oracle minus the best training-free baseline beside it (same budget and
    position policy, or FastV, which keeps its own positions; never AutoSelect or its decode
    variants), paired on the same examples; under 2 paired SE the report says no selector can lead
    every baseline by 2 SE there."""
    from PIL import Image

    from pipelines.evaluation.methods import FullTokens
    from pipelines.evaluation.report import Budget, build_report, markdown
    from pipelines.evaluation.tasks import Example, Task

    classes = tuple(f"class {i}" for i in range(10))
    n = 40
    task = Task("garment", "choice", [Example(str(i), Image.new("RGB", (8, 8)), "which?", classes[0]) for i in range(n)],
                "a 10-way task", "val", classes)
    methods = [FullTokens(None), *(PreLLM(name, "8", 8, None, "repack") for name in ("random", "divprune", "oracle", "autoselect")),
               PreLLM("autoselect-topk", "8", 8, None, "repack"), PreLLM("visionzip", "8", 8, None, "original"),
               InsideLLM("fastv", "8", 8, None, "original")]

    def cell(right: int) -> dict:  # the first ``right`` examples answered correctly
        return {"score": right / n, "n": n, "per_example": [1.0] * right + [0.0] * (n - right), "per_example_answer_nll": [1.0] * n}

    def check(oracle: int, divprune: int, fastv: int = 0, methods: list = methods) -> dict:
        scores = {"garment": {FULL: cell(30), "random@8": cell(10), "divprune@8": cell(divprune), "oracle@8": cell(oracle),
                              "autoselect@8": cell(40), "autoselect-topk@8": cell(40), "visionzip@8": cell(40),
                              "fastv@8": cell(fastv)}}
        report = build_report({"model": "m", "seed": 0}, [task], {}, scores, methods, [Budget("8", 8, 8)], 64)
        return report, report["selection_check"]["garment"]["oracle@8"]["headroom"]

    report, room = check(oracle=30, divprune=27)  # autoselect and visionzip (another policy) are no rivals
    lead = [1.0] * 3 + [0.0] * (n - 3)
    mean = 3 / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in lead) / (n - 1) / n)
    assert room == {"best_baseline": "divprune", "score": 0.675, "difference": 0.075, "stderr": round(stderr, 4), "n": n}
    assert 0.075 / stderr < 2 and "no selector can lead every baseline by 2 SE" in markdown(report)
    report, room = check(oracle=30, divprune=10)  # random and divprune tie; the lead is 20 of 40
    assert room["difference"] == 0.5 and "room for a selector to lead every baseline by 2 SE" in markdown(report)
    assert "fastv" not in report["paired"]["8"]  # visionzip ran under original: FastV is compared there only
    repack_only = [m for m in methods if m.base != "visionzip"]
    report, room = check(oracle=30, divprune=10, fastv=29, methods=repack_only)  # FastV (original positions) beside repack
    assert room["best_baseline"] == "fastv" and room["difference"] == 0.025
    assert set(report["paired"]["8"]) == {"random", "divprune", "oracle", "autoselect-topk", "fastv"}


# ---- like for like: one position policy, val/test halves, the oracle --------------------------
def test_every_pre_llm_method_runs_the_evaluations_position_policy(taught):
    """`both` builds each pre-LLM method under each policy (names say which) and FixedSelection
    replays the choice under the method's policy, whatever the pruner's own default: random under
    the evaluation's `original` gives the logits of a random pruner built with `original`."""
    from autoselect.pruners.random import RandomPruner

    vlm, processor = taught["vlm"], taught["processor"]
    methods = build_methods(vlm, ["random", "pooled", "fastv"], [("8", 8)], None, baseline_settings(vlm, 0, None), ("repack", "original"))
    assert [m.label for m in methods[1:]] == ["random[repack]@8", "random[original]@8", "pooled[repack]@8", "pooled[original]@8", "fastv[original]@8"]
    assert [m.position_policy for m in methods[1:]] == ["repack", "original", "repack", "original", "original"]
    (task,), _ = load_tasks(["markers"], TaskContext(32, 4, Path("/nonexistent"), seed=4, limit=2))
    batch = {k: v for k, v in encode_rows(processor, [(e, e.answer) for e in task.examples]).items() if k != "labels"}
    got = {m.label: m.forward(batch, 1, 3).logits for m in methods[1:3]}
    with torch.no_grad():
        for policy in ("repack", "original"):
            own = RandomPruner(vlm, 8, seed=0, position_policy=policy)(**batch, logits_to_keep=3).logits
            assert torch.allclose(got[f"random[{policy}]@8"], own, atol=1e-5), policy
    assert not torch.allclose(got["random[repack]@8"], got["random[original]@8"], atol=1e-3)


def test_cli_states_split_and_policy_and_pairs_only_the_same_policy(taught, tmp_path):
    report = run_cli(taught, tmp_path / "both", "--pruners", "autoselect,random,fastv", "--budgets", "8",
                     "--tasks", "markers", "--position-policy", "both", "--split", "test")
    assert report["split"] == "test" and report["position_policy"] == "both"
    assert set(report["results"]) == {FULL, "autoselect[repack]", "autoselect[original]", "random[repack]", "random[original]", "fastv[original]"}
    assert set(report["paired"]["8"]) == {"random[repack]", "random[original]", "fastv[original]"}  # fastv: with autoselect[original] only
    table = (tmp_path / "both" / "report.md").read_text()
    assert "test split, position policy both" in table and "| autoselect[original] − fastv[original] | 8 |" in table
    assert "test stream" in report["tasks"]["markers"]["source"]


def test_val_and_test_are_fixed_disjoint_halves_of_every_heldout_set(taught):
    from pipelines.evaluation.tasks.base import split_of

    corpora = taught["root"] / "corpora"
    halves = {split: load_tasks(["caption_nll"], TaskContext(32, 4, corpora, split=split))[0][0] for split in ("val", "test")}
    ids = {split: {e.id for e in task.examples} for split, task in halves.items()}
    assert not ids["val"] & ids["test"] and len(ids["val"] | ids["test"]) == 16
    assert all(split_of(i) == split for split, chosen in ids.items() for i in chosen)
    assert len(ids["val"]) == CAPTIONS_IN_VAL
    generated = {split: load_tasks(["markers"], TaskContext(32, 4, corpora, seed=0, limit=4, split=split))[0][0] for split in ("val", "test")}
    assert not torch.equal(torch.tensor(list(generated["val"].examples[0].image.getdata())),
                           torch.tensor(list(generated["test"].examples[0].image.getdata())))
    with pytest.raises(ValueError, match="split must be one of"):
        TaskContext(32, 4, corpora, split="train")


def test_the_oracle_keeps_the_answers_patches_and_the_report_checks_the_task(taught, report, out_dir):
    """The oracle keeps the tokens inside the answer's boxes first (then the nearest ones); on the
    taught VLM that is the ceiling: it keeps what the full model reads, where random does not."""
    from pipelines.evaluation.oracle import OraclePruner, box_scores

    scores = box_scores([(0.25, 0.0, 0.5, 0.25)], 4, 4)  # patches (0, 1) of a 4 x 4 grid
    assert scores.argmax() == 1 and scores[1] == pytest.approx(1.0, abs=1e-5) and scores[0] < 1e-5
    vlm, processor = taught["vlm"], taught["processor"]
    (task,), _ = load_tasks(["markers"], TaskContext(32, 4, Path("/nonexistent"), seed=4, limit=3))
    oracle = OraclePruner(vlm, 2)
    oracle.prepare(task.examples)
    pixels = processor(images=[e.image for e in task.examples], text=["<image>"] * 3, return_tensors="pt")["pixel_values"]
    selection, _ = oracle.select(2, pixel_values=pixels)
    for example, kept in zip(task.examples, selection.indices):
        cells = sorted(round(b[1] * 8) * 8 + round(b[0] * 8) for b in example.boxes)
        assert kept.tolist() == cells, example.id
    with pytest.raises(ValueError, match="needs answer boxes"):
        oracle.prepare([task.examples[0].__class__("x", task.examples[0].image, "?", "red")])
    full, rand, best = (report["results"][m][b]["tasks"]["markers"]["score"] for m, b in ((FULL, "all"), ("random", "8"), ("oracle", "8")))
    assert best > rand and best >= full - 0.15
    check = report["selection_check"]["markers"]["oracle@8"]
    assert check["oracle"] == best and check["random"] == rand and isinstance(check["go"], bool)
    assert "Can the task show selection?" in (out_dir / "report.md").read_text()


@pytest.mark.parametrize("family, n", [("llava", N), ("llava_next", None), ("qwen2_5_vl", None)])
def test_budgets_resolve_on_the_adapters_plan_of_the_probe_image(family, n):
    """N is the probe image's visual tokens as the adapter plans them (for LLaVA-NeXT not its
    placeholders, which include the row newlines), and each K is what the pruned forward keeps."""
    from autoselect.testing.tiny_backbones import TINY_BACKBONES
    from pipelines.evaluate import probe_budgets
    from pipelines.evaluation.scoring import probe_prompt

    vlm, processor = TINY_BACKBONES[family](seed=0)
    adapter = get_adapter(vlm)
    probe = probe_prompt(processor)
    with torch.no_grad():
        (tokens,) = adapter.visual_tokens(**{k: probe[k] for k in adapter.image_input_names if k in probe})
    budgets, num_tokens = probe_budgets(adapter, probe, [("8", 8), ("1/4", 0.25)])
    assert num_tokens == len(tokens) == (n or num_tokens)
    assert [b.k for b in budgets] == [8, max(1, round(num_tokens / 4))]
    if family == "llava_next":
        assert num_tokens < int((probe["input_ids"] == adapter.image_token_id).sum())
    with pytest.raises(ValueError, match=f"this backbone has N = {num_tokens} visual tokens"):
        probe_budgets(adapter, probe, [("big", num_tokens + 1)])


def test_decode_variants_run_the_same_scorer_under_dpp_and_are_paired_with_autoselect(taught, tmp_path, capsys):
    """``--autoselect-decode dpp``: an ``autoselect-dpp`` method (the same weights, the dpp decode)
    next to ``autoselect`` (the scorer as saved), paired with it and (as ``paired_variants``) with the
    baselines, and never a baseline in the tags."""
    from autoselect.selection import dpp_indices
    from pipelines.evaluation.methods import decode_variants
    from pipelines.evaluation.report import version_tags

    vlm = taught["vlm"]
    autoselect = AutoSelectModel.from_pretrained(taught["scorer_dir"], vlm).eval()
    assert decode_variants(autoselect, ["topk"]) == {}  # its own decode: no variant
    (name, variant), = decode_variants(autoselect, ["topk_dpp"], 0.5, 0.25).items()
    assert name == "autoselect-topk_dpp" and variant.scorer is autoselect.scorer
    assert (variant.config.inference.decode, variant.config.inference.dpp_quality_scale, variant.config.inference.dpp_share) == ("topk_dpp", 0.5, 0.25)
    (name, variant), = decode_variants(autoselect, ["topk", "dpp"], 2.0).items()
    assert name == "autoselect-dpp" and variant.scorer is autoselect.scorer
    assert variant.config.inference.dpp_quality_scale == 2.0 and autoselect.config.inference.decode == "topk"
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        selection, _ = variant.select(8, pixel_values=pixels)
        tokens = autoselect.visual_tokens(pixel_values=pixels)
        assert torch.equal(selection.indices, dpp_indices(autoselect.scorer(tokens), tokens, 8, 2.0))
    report = run_cli(taught, tmp_path / "dpp", "--pruners", "autoselect,random", "--budgets", "8", "--tasks", "markers",
                     "--autoselect-decode", "dpp")
    assert set(report["results"]) == {FULL, "autoselect", "autoselect-dpp", "random"}
    assert set(report["paired"]["8"]) == {"autoselect-dpp", "random"}
    assert set(report["paired_variants"]) == {"autoselect-dpp"} and set(report["paired_variants"]["autoselect-dpp"]["8"]) == {"random"}
    (variant_vs_random,) = report["paired_variants"]["autoselect-dpp"]["8"]["random"].values()
    variant, rival = (report["per_example"]["markers"][label] for label in ("autoselect-dpp@8", "random@8"))
    assert variant_vs_random["difference"] == pytest.approx(sum(variant) / len(variant) - sum(rival) / len(rival), abs=1e-4)
    assert report["pruners"]["autoselect-dpp"]["inference"]["decode"] == "dpp"
    assert report["pruners"]["autoselect"]["inference"]["decode"] == "topk"
    tags = version_tags(report)
    random_margin = report["results"]["autoselect"]["8"]["average_retention"] - report["results"]["random"]["8"]["average_retention"]
    assert float(tags["retention_margin_vs_best_baseline.k8"]) == pytest.approx(random_margin / 100, abs=1e-4)  # random, not the variant
    assert "| autoselect − autoselect-dpp | 8 |" in (tmp_path / "dpp" / "report.md").read_text()
    assert "| autoselect-dpp − random | 8 |" in (tmp_path / "dpp" / "report.md").read_text()
    for bad, match in ((["--autoselect-decode", "beam"], "unknown --autoselect-decode"),
                       (["--dpp-quality-scale", "2"], "add --autoselect-decode dpp"),
                       (["--autoselect-decode", "dpp", "--dpp-share", "0.3"], "add --autoselect-decode topk_dpp"),
                       (["--autoselect-decode", "topk_dpp", "--dpp-share", "1.5"], "--dpp-share must be in [0, 1], got 1.5"),
                       (["--pruners", "random", "--autoselect-decode", "dpp"], "must include autoselect")):
        with pytest.raises(SystemExit):
            main(["--model", str(taught["model_dir"]), "--out", str(tmp_path / "bad"), *bad])
        assert match in capsys.readouterr().err


def test_compare_scorers_pairs_reports_of_the_same_examples_and_refuses_others(tmp_path, capsys):
    """experiments/compare_scorers.py: scorers from separate evaluate runs, paired per example; runs
    on other examples (the all-token scores differ) or another split are refused."""
    compare = load_script("experiments/compare_scorers.py")

    def report(name: str, hits: list[float], nll: list[float], full=(1.0, 1.0, 0.0, 1.0), split="val", model="m") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        body = {"model": model, "split": split, "limit": 4, "dtype": "float32", "position_policy": "repack", "seed": 0,
                "per_example": {"t": {"full": list(full), "autoselect@2": hits},
                                "c": {"full": [2.0, 2.0], "autoselect@2": [2.0 + 10 * nll[0], 2.0 + 10 * nll[1]]}},
                "per_example_answer_nll": {"t": {"full": [0.1] * 4, "autoselect@2": nll}},
                "per_example_tokens": {"c": [10, 10]}}  # an NLL task: summed NLL over 10 answer tokens
        (folder / "report.json").write_text(json.dumps(body))
        return folder / "report.json"

    a = report("a", [1.0, 0.0, 0.0, 1.0], [0.5, 0.7, 0.9, 0.3])
    b = report("b", [1.0, 1.0, 0.0, 1.0], [0.4, 0.6, 0.9, 0.3])
    out = tmp_path / "cmp.json"
    compare.main([str(a), str(b), "--out", str(out)])
    rows = json.loads(out.read_text())["t"]["autoselect@2"]
    assert rows["a"]["accuracy_vs_first"]["difference"] == 0.0
    assert rows["b"]["accuracy"] == 0.75 and rows["b"]["accuracy_vs_first"]["difference"] == 0.25
    assert rows["b"]["answer_nll_vs_first"]["difference"] == pytest.approx(-0.05)
    captions = json.loads(out.read_text())["c"]["autoselect@2"]  # per token: (2 + 10 x) / 10
    assert captions["b"]["nll"] == pytest.approx(0.2 + 0.5) and captions["b"]["nll_vs_first"]["difference"] == pytest.approx(-0.1)
    assert "| b | 0.750 | +0.250" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not the same"):
        compare.main([str(a), str(report("c", [1.0] * 4, [0.1] * 4, full=(0.0, 1.0, 0.0, 1.0)))])
    with pytest.raises(SystemExit, match="split"):
        compare.main([str(a), str(report("d", [1.0] * 4, [0.1] * 4, split="test"))])
    # --backbones: another model, so other all-token scores, paired on the same split/limit/seed
    other = report("e", [1.0] * 4, [0.1] * 4, full=(0.0, 1.0, 1.0, 1.0), model="m2")
    with pytest.raises(SystemExit, match="model is 'm2'"):
        compare.main([str(a), str(other)])
    compare.main([str(a), str(other), "--backbones", "--out", str(out)])
    rows = json.loads(out.read_text())["t"]
    assert set(rows) == {"full", "autoselect@2"}  # every method, all tokens included
    assert rows["full"]["e"]["accuracy_vs_first"]["difference"] == 0.0 and rows["full"]["e"]["accuracy"] == 0.75
    assert rows["autoselect@2"]["e"]["accuracy_vs_first"]["difference"] == 0.5
    short = tmp_path / "f.json"
    short.write_text(json.dumps({**json.loads(other.read_text()), "per_example": {"t": {"full": [1.0] * 3, "autoselect@2": [1.0] * 3}}}))
    with pytest.raises(SystemExit, match="t has 3 examples"):
        compare.main([str(a), str(short), "--backbones"])
    # PATH:METHOD=AS: a decode variant run beside another scorer pairs with a scorer run on its own
    beside = tmp_path / "g.json"
    beside.write_text(json.dumps({**json.loads(b.read_text()), "per_example": {
        "t": {"full": [1.0, 1.0, 0.0, 1.0], "autoselect@2": [0.0] * 4, "autoselect-topk_dpp@2": [1.0, 1.0, 1.0, 1.0]},
        "c": {"full": [2.0, 2.0], "autoselect@2": [9.0, 9.0], "autoselect-topk_dpp@2": [7.0, 9.0]}},
        "per_example_answer_nll": {"t": {"full": [0.1] * 4, "autoselect@2": [2.0] * 4, "autoselect-topk_dpp@2": [0.5, 0.7, 0.9, 0.3]}}}))
    compare.main([f"{beside}:autoselect-topk_dpp=autoselect", str(a), "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["t"]) == {"autoselect@2"}  # the variant stands in for the scorer; its own run's cells are gone
    assert result["t"]["autoselect@2"]["a"]["accuracy_vs_first"]["difference"] == -0.5
    assert result["t"]["autoselect@2"]["a"]["answer_nll_vs_first"]["difference"] == pytest.approx(0.0)
    assert result["c"]["autoselect@2"]["g:autoselect-topk_dpp"]["nll"] == pytest.approx(0.8)
    for bad, match in ((f"{beside}:autoselect-dpp=autoselect", "no method 'autoselect-dpp' on t"),
                       (f"{beside}:autoselect-topk_dpp", "expected PATH:METHOD=AS")):
        with pytest.raises(SystemExit, match=match):
            compare.main([bad, str(a)])


def test_baselines_from_an_earlier_report_give_the_report_that_running_them_gives(report, out_dir, taught, tmp_path, monkeypatch, capsys):
    """``--baselines-from``: only all tokens and AutoSelect run; every baseline's cells (and so the
    paired differences and the oracle check) come from the earlier report and equal what running
    them gave. Refused, naming why, when a setting or the all-token scores differ."""
    import pipelines.evaluation.runner as runner

    ran: set[str] = set()
    calls: dict[str, int] = {}
    real = runner.answer_log_likelihoods

    def spy(method, *args, **kwargs):
        ran.add(method.label)
        calls[method.label] = calls.get(method.label, 0) + 1
        return real(method, *args, **kwargs)

    monkeypatch.setattr(runner, "answer_log_likelihoods", spy)
    earlier = out_dir / "report.json"
    again = run_cli(taught, tmp_path / "reused", "--pruners", "autoselect", "--baselines-from", str(earlier))
    assert {label.split("@")[0] for label in ran} == {FULL, "autoselect"}
    assert set(again["results"]) == set(report["results"]) and "oracle" in again["results"]
    for key in ("results", "paired", "selection_check", "per_example", "per_example_answer_nll", "per_example_ids"):
        assert again[key] == report[key], key
    for task, ids in report["per_example_ids"].items():  # one id per scored example, none twice
        assert len(ids) == len(set(ids)) == len(report["per_example"][task][FULL])
    assert again["baselines_from"] == str(earlier)
    assert f"come from `{earlier}`" in (tmp_path / "reused" / "report.md").read_text()

    # a task the earlier report lacks (spatial_markers) runs every method; the others still take its cells
    partial = json.loads(earlier.read_text())
    for key in ("per_example", "per_example_ids", "per_example_answer_nll"):
        partial[key].pop("spatial_markers", None)
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    calls.clear()
    joined = run_cli(taught, tmp_path / "joined", "--pruners", "autoselect", "--baselines-from", str(tmp_path / "partial.json"))
    for key in ("results", "paired", "per_example", "per_example_answer_nll"):
        assert joined[key] == report[key], key
    spatial_batches = -(-len(report["per_example"]["spatial_markers"][FULL]) // 8)
    assert spatial_batches and calls["random@8"] == calls["divprune@1/4"] == spatial_batches  # spatial_markers' batches only
    assert joined["baselines_from_tasks"] == ["markers", "caption_nll"]
    assert "cells on markers, caption_nll come from" in (tmp_path / "joined" / "report.md").read_text()
    none = {**partial, "per_example": {"other_task": {}}}
    (tmp_path / "none.json").write_text(json.dumps(none))

    changed = json.loads(earlier.read_text())
    changed["per_example"]["markers"][FULL][0] = 1.0 - changed["per_example"]["markers"][FULL][0]
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    reordered = json.loads(earlier.read_text())
    reordered["per_example_ids"]["markers"].reverse()
    (tmp_path / "reordered.json").write_text(json.dumps(reordered))
    old_fastv = json.loads(earlier.read_text())
    old_fastv["scoring"]["choice"] = old_fastv["scoring"]["choice"].replace("the prompt's last token", "each candidate row's last token")
    (tmp_path / "old-fastv.json").write_text(json.dumps(old_fastv))
    base = ["--model", str(taught["model_dir"]), "--autoselect", str(taught["scorer_dir"]), "--pruners", "autoselect",
            "--budgets", *BUDGETS, "--tasks", "markers", "--limit", "16", "--out", str(tmp_path / "bad")]
    for extra, why in ((["--baselines-from", str(tmp_path / "changed.json")], "all-token scores on markers differ"),
                       (["--baselines-from", str(tmp_path / "reordered.json")], "scored other examples on markers"),
                       (["--baselines-from", str(earlier), "--limit", "8"], "limit is 16 there and 8 here"),
                       (["--baselines-from", str(earlier), "--budgets", "8"], "budgets is"),
                       (["--baselines-from", str(tmp_path / "missing.json")], "cannot read a report.json"),
                       (["--baselines-from", str(tmp_path / "old-fastv.json")], "FastV there was scored as"),
                       (["--baselines-from", str(tmp_path / "none.json")], "no scores for any of the tasks ['markers']")):
        assert main([*base, *extra]) == 2
        assert why in capsys.readouterr().err
    ran.clear()
    assert main([*base, "--baselines-from", str(tmp_path / "reordered.json")]) == 2
    assert not ran  # other examples are refused before a single batch runs
    assert main([*base, "--baselines-from", str(tmp_path / "changed.json")]) == 2
    assert ran == {FULL}  # other all-token scores on the first batch: refused before any other method runs
    changed_last = json.loads(earlier.read_text())
    changed_last["per_example"]["markers"][FULL][-1] = 1.0 - changed_last["per_example"]["markers"][FULL][-1]
    (tmp_path / "changed-last.json").write_text(json.dumps(changed_last))
    assert main([*base, "--baselines-from", str(tmp_path / "changed-last.json")]) == 2  # past the first batch: at the end
    assert "all-token scores on markers differ" in capsys.readouterr().err


def test_reuse_all_tokens_takes_the_all_token_cells_too_after_its_first_and_last_batch(report, out_dir, taught, tmp_path, monkeypatch, capsys):
    """``--reuse-all-tokens``: all tokens run on each reused task's first and last batch only (the
    check), AutoSelect on every batch; the report equals running everything. A report whose last
    batch scores otherwise is refused before AutoSelect runs; without --baselines-from it is an error."""
    import pipelines.evaluation.runner as runner

    calls: dict[str, int] = {}
    real = runner.answer_log_likelihoods

    def spy(method, *args, **kwargs):
        calls[method.label] = calls.get(method.label, 0) + 1
        return real(method, *args, **kwargs)

    monkeypatch.setattr(runner, "answer_log_likelihoods", spy)
    earlier = out_dir / "report.json"
    again = run_cli(taught, tmp_path / "reused", "--pruners", "autoselect", "--baselines-from", str(earlier), "--reuse-all-tokens")
    batches = {task: -(-len(values[FULL]) // 8) for task, values in report["per_example"].items()}
    assert min(batches.values()) == 2 and calls[FULL] == 2 * len(batches)  # a first and a last batch per task
    assert calls["autoselect@8"] == sum(batches.values())
    for key in ("results", "paired", "selection_check", "per_example", "per_example_answer_nll", "per_example_ids"):
        assert again[key] == report[key], key
    assert again["all_tokens_from"] == str(earlier)
    assert "So do the all-token cells" in (tmp_path / "reused" / "report.md").read_text()

    changed_last = json.loads(earlier.read_text())
    changed_last["per_example"]["markers"][FULL][-1] = 1.0 - changed_last["per_example"]["markers"][FULL][-1]
    (tmp_path / "changed-last.json").write_text(json.dumps(changed_last))
    base = ["--model", str(taught["model_dir"]), "--autoselect", str(taught["scorer_dir"]), "--pruners", "autoselect",
            "--budgets", *BUDGETS, "--tasks", "markers", "--limit", "16", "--out", str(tmp_path / "bad")]
    calls.clear()
    assert main([*base, "--baselines-from", str(tmp_path / "changed-last.json"), "--reuse-all-tokens"]) == 2
    assert "all-token scores on markers differ" in capsys.readouterr().err and set(calls) == {FULL}
    with pytest.raises(SystemExit):
        main([*base, "--reuse-all-tokens"])
    assert "--reuse-all-tokens takes the all-token cells from the --baselines-from report" in capsys.readouterr().err
