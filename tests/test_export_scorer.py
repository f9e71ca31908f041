"""pipelines/export_scorer.py: a training checkpoint (scorer + denoiser) -> the scorer-only folder
inference loads, on the built-in tiny LLaVA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from autoselect import AutoSelectConfig, AutoSelectModel
from mlops.backbone import load_vlm
from pipelines.export_scorer import main

TINY = "autoselect-testing/tiny-llava"


@pytest.fixture
def checkpoint(tmp_path):
    """A Ray Train checkpoint's layout: the trainable modules under ``autoselect/``."""
    torch.manual_seed(0)
    model = AutoSelectModel.attach(load_vlm(TINY, "float32"), AutoSelectConfig(budget=8))
    with torch.no_grad():
        for p in model.trainable_modules().parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained": not the initialisation
    model.save_pretrained(tmp_path / "checkpoint_000003" / "autoselect")
    return tmp_path / "checkpoint_000003", model


def test_a_checkpoint_exports_its_scorer_alone_with_the_same_weights(checkpoint, tmp_path, capsys):
    source, trained = checkpoint
    out = tmp_path / "scorer"
    assert main(["--scorer", str(source), "--model", TINY, "--out", str(out), "--dtype", "float32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"]["path"] == str(source / "autoselect") and summary["budget"] == 8

    with safe_open(str(out / "model.safetensors"), "pt") as saved:
        keys, metadata = set(saved.keys()), saved.metadata()
        assert metadata["inference_only"] == "true"
        assert keys and all(k.startswith("scorer.") for k in keys)  # no denoiser
        for name, p in trained.scorer.named_parameters():
            assert torch.equal(saved.get_tensor(f"scorer.{name}"), p.detach())
    assert summary["bytes"] == (out / "model.safetensors").stat().st_size

    loaded = AutoSelectModel.from_pretrained(out, load_vlm(TINY, "float32"))
    assert loaded.config.budget == 8 and not loaded.can_train


def test_a_folder_that_is_neither_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--scorer", str(tmp_path / "empty"), "--model", TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither a saved AutoSelect folder" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "o").exists()


def test_an_out_folder_with_files_is_never_overwritten(checkpoint, tmp_path, capsys):
    source, _ = checkpoint
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    assert main(["--scorer", str(source), "--model", TINY, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"keep me"


def test_inference_options_replace_the_runs_own_and_bad_ones_are_refused_before_loading(checkpoint, tmp_path, capsys):
    """A run configured for the DPP decode exported for plain top-K: the folder's own decode is what
    Serve and `evaluate.py` run, so it is set at export, not by editing config.json."""
    source, _ = checkpoint
    config = json.loads((source / "autoselect" / "config.json").read_text())
    config["inference"].update(decode="dpp", dpp_quality_scale=0.5, grid_reserve=0.5)
    (source / "autoselect" / "config.json").write_text(json.dumps(config))

    out = tmp_path / "topk"
    assert main(["--scorer", str(source), "--model", TINY, "--out", str(out), "--dtype", "float32",
                 "--inference", "decode=topk"]) == 0
    expected = {"noise": 0.0, "seed": 0, "decode": "topk", "dpp_quality_scale": 1.0, "dpp_share": 0.5, "grid_reserve": 0.0,
                "dpp_head_quality_scale": None}
    assert json.loads(capsys.readouterr().out)["inference"] == expected
    assert json.loads((out / "config.json").read_text())["inference"] == expected
    assert AutoSelectModel.from_pretrained(out, load_vlm(TINY, "float32")).config.inference.decode == "topk"

    kept = tmp_path / "as-trained"
    assert main(["--scorer", str(source), "--model", TINY, "--out", str(kept), "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["inference"]["decode"] == "dpp"  # the run's own, untouched

    for bad, message in ((["decode=beam"], "inference.decode must be one of"),
                         (["topk"], "expected KEY=VALUE"), (["temperature=1"], "unknown key(s) ['temperature']"),
                         (["grid_reserve=half"], "--inference.grid_reserve: expected float, got 'half'"),
                         (["dpp_quality_scale=0.5"], "needs inference.decode in ('dpp', 'topk_dpp')")):
        out = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        assert main(["--scorer", str(source), "--model", TINY, "--out", str(out), "--inference", *bad]) == 2
        assert message in capsys.readouterr().err, bad
        assert not out.exists()
