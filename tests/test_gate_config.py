import json
from pathlib import Path

import pytest
import torch

from autoselect import (
    AutoSelectConfig,
    InferenceOptions,
    LegacyConfigError,
    OptionDependencyError,
    TrainingOptions,
    UnknownConfigKey,
    resolve_budget,
    vp_noise_gate,
)
from autoselect.config import RENAMED_KEYS

SAMPLED_SCORER = Path(__file__).resolve().parent.parent / "artifacts" / "mini-llava" / "scorer-k28-sampled" / "config.json"


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("standardize", [True, False])
def test_vp_gate_preserves_per_feature_variance(alpha, standardize):
    torch.manual_seed(0)
    x = torch.randn(16, 2048, 16)
    out = vp_noise_gate(x, torch.full((16, 2048), alpha), standardize=standardize)
    ratio = out.var(dim=(0, 1)) / x.var(dim=(0, 1))
    assert torch.all((ratio - 1).abs() < 0.05), ratio


def test_vp_gate_is_identity_at_one_and_noise_at_zero():
    x = torch.randn(2, 16, 8) * 3 + 1
    noise = torch.randn_like(x)
    assert torch.allclose(vp_noise_gate(x, torch.ones(2, 16), noise), x, atol=1e-5)
    out = vp_noise_gate(x, torch.zeros(2, 16), noise, standardize=False)
    assert torch.allclose(out, noise)


def test_vp_gate_standardized_preserves_variance_of_scaled_features():
    torch.manual_seed(1)
    x = torch.randn(16, 2048, 16) * 5 + 2
    out = vp_noise_gate(x, torch.rand(16, 2048))
    assert ((out.var(dim=(0, 1)) / x.var(dim=(0, 1))) - 1).abs().max() < 0.05


def test_config_json_round_trip_and_defaults():
    config = AutoSelectConfig(budget=0.25, scorer_width=48, position_policy="original")
    again = AutoSelectConfig.from_json_string(config.to_json_string())
    assert again == config
    assert json.loads(config.to_json_string())["budget"] == 0.25
    default = AutoSelectConfig()
    assert (default.scorer_layers, default.denoiser_layers) == (2, 1)
    assert default.temperature(0) == pytest.approx(2.0)
    assert default.temperature(1000) == pytest.approx(1.05)
    assert default.temperature(2000) == pytest.approx(0.1)
    assert default.temperature(5000) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "budget,match",
    [(0, "positive"), (-3, "positive"), (0.0, r"ratio must be in \(0, 1\]"), (1.5, r"ratio must be in \(0, 1\]"),
     (-0.2, r"ratio must be in \(0, 1\]"), ("64", "int K or a float ratio")],
)
def test_bad_budgets_are_named(budget, match):
    with pytest.raises(ValueError, match=match):
        AutoSelectConfig(budget=budget)


def test_budget_resolution():
    assert resolve_budget(64, 576) == 64
    assert resolve_budget(1 / 9, 576) == 64
    assert resolve_budget(1.0, 576) == 576
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        resolve_budget(577, 576)


def test_unknown_config_keys_are_rejected():
    with pytest.raises(UnknownConfigKey, match="unknown AutoSelectConfig keys"):
        AutoSelectConfig.from_dict({"budget": 4, "bugdet": 3})
    with pytest.raises(UnknownConfigKey, match=r"unknown AutoSelectConfig training keys: \['gate_atention'\]"):
        AutoSelectConfig.from_dict({"training": {"gate_atention": True}})
    with pytest.raises(UnknownConfigKey, match="inference keys"):
        AutoSelectConfig.from_dict({"inference": {"position_policy": "original"}})


def test_the_committed_flat_config_loads_into_the_nested_form_with_the_same_values():
    """``artifacts/mini-llava/scorer-k28-sampled/config.json`` was saved in the flat form (and with
    an empty ``extra``): every old key's value lands at its new path, the rest unchanged."""
    assert "train_candidates" not in json.loads(SAMPLED_SCORER.read_text())
    flat = json.loads(SAMPLED_SCORER.read_text())
    assert "gate_attention" in flat and flat["extra"] == {}  # the old form, as committed
    config = AutoSelectConfig.load(SAMPLED_SCORER)
    defaults = AutoSelectConfig()
    for old, new in RENAMED_KEYS.items():  # train_candidates is newer than this save: the default
        group, key = new.split(".")
        assert getattr(getattr(config, group), key) == flat.get(old, getattr(getattr(defaults, group), key)), old
    nested = config.to_dict()
    for key, value in flat.items():
        if key not in RENAMED_KEYS and key != "extra":
            assert nested[key] == value, key
    assert config.training == TrainingOptions(gate_attention=True, score_noise=1.0, score_noise_anneal=False)
    assert config.inference == InferenceOptions(noise=1.0, seed=0)
    assert AutoSelectConfig.from_json_string(config.to_json_string()) == config  # the new form round-trips


def test_old_flat_keys_map_to_their_groups_and_a_non_empty_extra_is_refused():
    old = AutoSelectConfig.from_dict({"budget": 8, "train_budgets": [4, 8], "train_candidates": 1.0,
                                      "inference_seed": 2, "inference_noise": 0.5, "extra": {}})
    assert old == AutoSelectConfig(budget=8, training=TrainingOptions(budgets=[4, 8], candidates=1.0),
                                   inference=InferenceOptions(noise=0.5, seed=2))
    with pytest.raises(LegacyConfigError, match="extra"):
        AutoSelectConfig.from_dict({"budget": 8, "extra": {"note": "x"}})
    with pytest.raises(LegacyConfigError, match="score_noise .* and training.score_noise are both given"):
        AutoSelectConfig.from_dict({"score_noise": 1.0, "training": {"score_noise": 0.5}})


@pytest.mark.parametrize("build,match", [
    (lambda: TrainingOptions(straight_through=True), "straight_through needs training.gate_attention"),
    (lambda: TrainingOptions(gate_attention=True, straight_through=True, gate_standardize=False),
     "gate_standardize=False has no effect with training.straight_through"),
    (lambda: TrainingOptions(score_noise_anneal=False), "score_noise_anneal=False needs training.score_noise > 0"),
    (lambda: InferenceOptions(seed=3), "inference.seed=3 needs inference.noise > 0"),
])
def test_option_dependencies_are_named_errors(build, match):
    with pytest.raises(OptionDependencyError, match=match):
        build()


def test_option_groups_are_frozen_and_must_be_their_type():
    options = TrainingOptions(budgets=(4, 8))
    assert options.budgets == [4, 8]  # a list, as JSON and YAML give it
    with pytest.raises(AttributeError):
        options.gate_attention = True  # change a group by replacing it: its checks then run
    with pytest.raises(ValueError, match="training must be a TrainingOptions"):
        AutoSelectConfig(training={"gate_attention": True})


def test_vp_gate_gradient_is_finite_at_saturated_weights():
    """At low temperature alpha is exactly 0 or 1 in float32; sqrt's slope there must not give NaN."""
    from autoselect import soft_topk

    scores = (torch.randn(2, 32) * 50).requires_grad_()
    alpha = soft_topk(scores, 8, temperature=0.1)
    assert ((alpha == 0) | (alpha == 1)).any()
    out = vp_noise_gate(torch.randn(2, 32, 4), alpha)
    out.sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_score_noise_anneals_to_zero_with_the_temperature():
    config = AutoSelectConfig(training=TrainingOptions(score_noise=1.5), temperature_steps=100)
    assert config.noise_scale(0) == 1.5
    assert 0 < config.noise_scale(50) < 1.5
    assert config.noise_scale(100) == 0 and config.noise_scale(1000) == 0
    assert AutoSelectConfig().noise_scale(0) == 0  # off by default (paper form)
    constant = AutoSelectConfig(training=TrainingOptions(score_noise=1.5, score_noise_anneal=False), temperature_steps=100)
    assert constant.noise_scale(0) == constant.noise_scale(50) == constant.noise_scale(1000) == 1.5


def test_hold_schedule_warms_up_holds_and_decays_only_in_the_last_fifth():
    from autoselect.training import lr_schedule

    factor = lr_schedule("hold", 100, warmup_steps=5, decay_fraction=0.2)
    assert [factor(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(factor(s) == 1.0 for s in range(5, 81))  # the peak held through step 80
    decay = [factor(s) for s in range(80, 101)]
    assert all(a > b for a, b in zip(decay[1:], decay[2:])) and decay[-1] == 0.0
    cosine = lr_schedule("cosine", 100, warmup_steps=5)
    assert cosine(50) < 0.6  # the cosine is already halfway down where "hold" is at its peak
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_schedule("linear", 100)
