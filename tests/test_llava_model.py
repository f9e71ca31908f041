"""AutoSelectModel on a tiny random LLaVA-1.5 (CLIP vision + Llama), built offline."""

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from autoselect import AutoSelectConfig, AutoSelectModel, ConfigError, InferenceOptions, OptionDependencyError, TrainingOptions
from autoselect.decode import ranking
from autoselect.denoiser import Denoiser
from autoselect.testing import build_tiny_llava
from tests.support.contract import check_generate_contract
from tests.support.inputs import PROMPTS, square_images

N = 64  # 32 px images, patch 4, CLS dropped


@pytest.fixture
def tiny():
    return build_tiny_llava(seed=0)


@pytest.fixture
def batch(tiny):
    _, processor = tiny
    return processor(images=square_images(2), text=PROMPTS, return_tensors="pt", padding=True)


def language_model_inputs(vlm: nn.Module):
    """Record the kwargs the frozen LLM receives (to inspect rebuilt sequences and positions)."""
    seen: list[dict] = []
    handle = vlm.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(dict(kwargs)), with_kwargs=True
    )
    return seen, handle


def test_attach_freezes_vlm_and_only_scorer_denoiser_train(tiny):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("scorer.", "denoiser.")) for n in trainable)
    assert not any(p.requires_grad for p in vlm.parameters())
    assert model.config.vision_width == 32 and model.config.backbone == "LlavaForConditionalGeneration"


def test_attach_leaves_the_callers_config_unchanged(tiny):
    import copy

    vlm, _ = tiny
    config = AutoSelectConfig(budget=16, training=TrainingOptions(budgets=[4, 16]))
    before = copy.deepcopy(config)
    model = AutoSelectModel.attach(vlm, config)
    assert config == before and config.vision_width is None and config.backbone is None
    assert model.config is not config and model.config.training.budgets is not config.training.budgets
    assert (model.config.vision_width, model.config.backbone) == (32, "LlavaForConditionalGeneration")
    AutoSelectModel.attach(build_tiny_llava(seed=0)[0], config)  # the same config serves another VLM
    assert config == before


def test_straight_through_builds_and_saves_no_denoiser_and_resumes_from_its_saves(tiny, batch, tmp_path):
    """The straight-through form never runs the denoiser: none is built, trained or saved, any save
    of it (inference-only too) can resume training, and an older save that still holds the unused
    denoiser loads without it."""
    vlm, _ = tiny
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]
    config = AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=True, straight_through=True))
    model = AutoSelectModel.attach(vlm, config)
    assert model.denoiser is None and not model.has_trained_denoiser and model.can_train
    assert all(n.startswith("scorer.") for n, p in model.named_parameters() if p.requires_grad)
    model.train()(**batch, labels=labels).loss.backward()
    for inference_only in (False, True):
        folder = model.save_pretrained(tmp_path / f"st-{inference_only}", inference_only=inference_only)
        with safetensors.safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            assert all(k.startswith("scorer.") for k in handle.keys())
            assert handle.metadata()["inference_only"] == "false"  # nothing a resumed run needs is left out
        loaded = AutoSelectModel.from_pretrained(folder, build_tiny_llava(seed=0)[0])
        assert loaded.denoiser is None and loaded.can_train
        assert torch.isfinite(loaded.train()(**batch, labels=labels).loss)
    # a save from before: the same scorer plus the denoiser the form never used
    state = safetensors.torch.load_file(str(tmp_path / "st-False" / "model.safetensors"))
    old_denoiser = Denoiser(32, 1, 4.0).state_dict()
    safetensors.torch.save_file({**state, **{f"denoiser.{k}": v for k, v in old_denoiser.items()}},
                                str(tmp_path / "st-False" / "model.safetensors"), metadata={"inference_only": "false"})
    loaded = AutoSelectModel.from_pretrained(tmp_path / "st-False", build_tiny_llava(seed=0)[0])
    assert loaded.denoiser is None
    assert all(torch.equal(loaded.scorer.state_dict()[k], v) for k, v in model.scorer.state_dict().items())


@pytest.mark.parametrize("gate_attention", [False, True])
def test_training_step_reaches_every_logit_and_no_vlm_parameter(tiny, batch, gate_attention):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=gate_attention)))
    logits_seen = []

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        logits_seen.append(out)

    model.scorer.register_forward_hook(keep_logits)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    model.train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == vlm.config.image_token_id, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

    (scores,) = logits_seen
    assert scores.shape == (2, N)
    assert torch.isfinite(scores.grad).all() and (scores.grad != 0).all()
    assert all(p.grad is None for p in vlm.parameters())
    # The soft top-K is shift-invariant per image (one constant added to every logit moves the
    # threshold with it), so the head's bias gets a gradient that is zero up to rounding: whether
    # Adam moves it depends on the CPU's summation order, not on the model. Every other weight moves.
    bias = model.scorer.head.bias
    assert bias.grad.abs().max() <= 1e-6 * scores.grad.abs().sum(), "the bias's gradient should cancel"
    for name, param in model.named_parameters():
        if param.requires_grad and param is not bias:
            assert not torch.equal(param.detach(), before[name]), f"{name} did not change"


def test_k_equals_n_matches_unmodified_vlm(tiny, batch):
    vlm, _ = tiny
    with torch.no_grad():
        reference = vlm(**batch).logits
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=N)).eval()
    with torch.no_grad():
        pruned = model(**batch).logits
    assert pruned.shape == reference.shape
    assert torch.allclose(pruned, reference, atol=1e-5)


@pytest.mark.parametrize("budget,k", [(16, 16), (0.5, 32), (1, 1)])
def test_k_below_n_keeps_exactly_k_sorted_tokens(tiny, batch, budget, k):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=budget)).eval()
    seen, handle = language_model_inputs(vlm)
    with torch.no_grad():
        out = model(**batch)
    handle.remove()
    indices = model.last_selection.indices
    assert indices.shape == (2, k)
    assert torch.all(indices[:, 1:] > indices[:, :-1])
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (N - k)
    assert seen[0]["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] - (N - k)


def test_budget_per_call_overrides_config(tiny, batch):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    with torch.no_grad():
        model(**batch, budget=8)
    assert model.last_selection.indices.shape == (2, 8)


def test_batched_generate_equals_per_sample_generate(tiny):
    """HF's contract on a left-padded batch: the caller's prompt, then per row the new tokens of that row alone."""
    vlm, processor = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    imgs = square_images(2, seed=3)
    batch = processor(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the test needs left padding"
    singles = [processor(images=[image], text=[prompt], return_tensors="pt") for image, prompt in zip(imgs, PROMPTS)]
    check_generate_contract(model, batch, singles, max_new_tokens=6, budget=16)
    assert model.last_selection.indices.shape == (1, 16)  # it did prune


def test_generate_k_equals_n_matches_unmodified_generate(tiny, batch):
    vlm, _ = tiny
    reference = vlm.generate(**batch, max_new_tokens=5, do_sample=False)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=N)).eval()
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), reference)
    as_dict = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(as_dict.sequences, reference) and len(as_dict.logits) == 5
    beams = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}  # rows repeated
    assert torch.equal(model.generate(**batch, **beams), vlm.generate(**batch, **beams))


def test_multi_image_rows_are_repadded(tiny):
    vlm, processor = tiny
    prompts = ["USER: <image><image>\nCompare them. ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
    batch = processor(images=square_images(3), text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = vlm(**batch).logits
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=N)).eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference, atol=1e-5)
    seen, handle = language_model_inputs(vlm)
    with torch.no_grad():
        model(**batch, budget=8)
    handle.remove()
    mask = seen[0]["attention_mask"]
    # row 0 lost 2 x 56 placeholders, row 1 lost 56; the shorter row is padded on the left
    lengths = [int(batch["attention_mask"][0].sum()) - 2 * (N - 8), int(batch["attention_mask"][1].sum()) - (N - 8)]
    assert mask.shape[1] == max(lengths)
    assert mask.sum(-1).tolist() == lengths
    short = int(np.argmin(lengths))
    assert mask[short, 0] == 0 and mask[short, -1] == 1


def test_original_position_policy_keeps_positions_with_gaps(tiny):
    vlm, processor = tiny
    batch = processor(images=square_images(1), text=PROMPTS[:1], return_tensors="pt")
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=8, position_policy="original")).eval()
    seen, handle = language_model_inputs(vlm)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    positions = seen[0]["position_ids"][0]
    start = int((batch["input_ids"][0] == vlm.config.image_token_id).nonzero()[0])
    kept = model.last_selection.indices[0]
    assert positions[start : start + 8].tolist() == (start + kept).tolist()
    assert positions[start + 8] == start + N  # the first text token after the image keeps its place
    check_generate_contract(model, batch, max_new_tokens=3)


def test_save_and_load_round_trip(tiny, batch, tmp_path):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16))
    with torch.no_grad():
        for p in model.scorer.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init, so the test sees the weights move
    model.eval()
    scores = model.score(pixel_values=batch["pixel_values"])
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    fresh_vlm, _ = build_tiny_llava(seed=0)
    loaded = AutoSelectModel.from_pretrained(tmp_path, fresh_vlm).eval()
    assert torch.equal(loaded.score(pixel_values=batch["pixel_values"]), scores)
    assert loaded.config.budget == 16


def test_inference_only_save_keeps_the_scorer_prunes_the_same_and_refuses_training(tiny, batch, tmp_path):
    """The denoiser is train-only: an inference-only save holds the scorer alone, is smaller, keeps
    the same tokens and logits, refuses a training forward by name, and re-saves scorer-only."""
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16))
    with torch.no_grad():
        for p in model.trainable_modules().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "scorer", inference_only=True)
    keys = safetensors.torch.load_file(str(tmp_path / "scorer" / "model.safetensors")).keys()
    assert keys and all(k.startswith("scorer.") for k in keys)
    assert (tmp_path / "scorer" / "model.safetensors").stat().st_size < (tmp_path / "full" / "model.safetensors").stat().st_size
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = AutoSelectModel.from_pretrained(tmp_path / "scorer", build_tiny_llava(seed=0)[0]).eval()
        assert torch.equal(loaded(**inputs).logits, expected)
    assert torch.equal(loaded.last_selection.indices, model.last_selection.indices)
    with pytest.raises(ValueError, match="inference_only=True"):
        loaded.train()(**batch)
    loaded.save_pretrained(tmp_path / "again")  # a full save of it must not pass a fresh denoiser off as trained
    assert all(k.startswith("scorer.") for k in safetensors.torch.load_file(str(tmp_path / "again" / "model.safetensors")))
    full = AutoSelectModel.from_pretrained(tmp_path / "full", build_tiny_llava(seed=0)[0])
    assert full.has_trained_denoiser and torch.isfinite(full.train()(**batch).logits).all()  # the training path runs


def test_saved_scorer_records_its_vlm_dtype_and_warns_when_loaded_over_another(tiny, tmp_path):
    """A scorer trained over a bf16 VLM (what `auto` picks on some machines) is not passed off as
    one validated over float32: the save records the dtype and a mismatched load says so."""
    import warnings

    vlm, _ = tiny
    AutoSelectModel.attach(vlm.to(torch.bfloat16), AutoSelectConfig(budget=16)).save_pretrained(tmp_path)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["vlm_dtype"] == "bfloat16"
    with pytest.warns(UserWarning, match="trained over a bfloat16 VLM and now runs over a float32 one"):
        loaded = AutoSelectModel.from_pretrained(tmp_path, build_tiny_llava(seed=0)[0])
    assert loaded.trained_vlm_dtype == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoSelectModel.from_pretrained(tmp_path, build_tiny_llava(seed=0)[0].to(torch.bfloat16))


def test_a_resaved_scorer_keeps_the_dtype_it_was_trained_over_until_it_trains_again(tiny, batch, tmp_path):
    """Exporting a bf16-trained scorer from a float32-loaded VLM must not relabel it float32 (the
    session-16 export did); a training step over the float32 VLM does make it float32's."""
    from autoselect.training import compute_loss

    vlm, _ = tiny
    AutoSelectModel.attach(vlm.to(torch.bfloat16), AutoSelectConfig(budget=16)).save_pretrained(tmp_path / "bf16")
    with pytest.warns(UserWarning, match="trained over a bfloat16 VLM"):
        loaded = AutoSelectModel.from_pretrained(tmp_path / "bf16", build_tiny_llava(seed=0)[0])
    loaded.save_pretrained(tmp_path / "exported", inference_only=True)
    with safetensors.safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["vlm_dtype"] == "bfloat16"
    compute_loss(loaded, {**batch, "labels": batch["input_ids"].clone()}, step=1)[0].backward()
    loaded.save_pretrained(tmp_path / "retrained")
    with safetensors.safe_open(str(tmp_path / "retrained" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["vlm_dtype"] == "float32"


def test_from_pretrained_refuses_other_vision_width(tiny, tmp_path):
    vlm, _ = tiny
    AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).save_pretrained(tmp_path)
    wider, _ = build_tiny_llava(vision_width=48)
    with pytest.raises(ValueError, match="width 32.*width 48"):
        AutoSelectModel.from_pretrained(tmp_path, wider)


def test_bad_inputs_raise_named_value_errors(tiny, batch):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    with pytest.raises(ValueError, match="positive"):
        model.generate(**batch, budget=0, max_new_tokens=1)
    with pytest.raises(ValueError, match="exceeds the 64 visual tokens"):
        model(**batch, budget=65)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        model(**batch, budget=1.5)
    one_image = {**batch, "pixel_values": batch["pixel_values"][:1]}
    with pytest.raises(ValueError, match="number of images and image tokens do not match"):
        model(**one_image)
    model.train()
    with pytest.raises(ValueError, match="number of images and image tokens do not match"):
        model(**one_image, labels=batch["input_ids"])


def test_unsupported_vlm_gets_a_clear_error():
    class NotAVLM(nn.Module):
        class config:
            model_type = "blip_2"

    with pytest.raises(ValueError, match="no backbone adapter for NotAVLM.*supported model types: .*llava"):
        AutoSelectModel.attach(NotAVLM())


def test_score_mass_budget_keeps_the_fewest_tokens_reaching_the_share(tiny, batch):
    from autoselect import ScoreMass

    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        model.scorer.head.weight.normal_(std=0.3)  # scores peaked enough that the images need different K
        scores = model.score(pixel_values=batch["pixel_values"])
        out = model(**batch, budget=ScoreMass(0.8))
    kept = model.last_selection.per_image()
    for row, keep in enumerate(kept):
        probs = torch.softmax(scores[row], -1)
        ordered = probs.sort(descending=True).values
        assert ordered[: len(keep)].sum() >= 0.8 - 1e-5  # the share is reached ...
        assert len(keep) == 1 or ordered[: len(keep) - 1].sum() < 0.8  # ... and not with one token fewer
        assert set(keep.tolist()) == set(probs.topk(len(keep)).indices.tolist())
    assert len({len(k) for k in kept}) > 1, "the two images should need different budgets"
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - max(N - len(k) for k in kept)
    check_generate_contract(model, batch, max_new_tokens=2, budget=ScoreMass(0.8))  # rows pruned to different K
    with pytest.raises(ValueError, match="share must be in"):
        ScoreMass(1.5)
    with pytest.raises(ValueError, match="only AutoSelect"):
        from autoselect.pruners import build_pruner

        build_pruner("random", vlm, ScoreMass(0.5))(**batch)


def test_train_budgets_draw_a_budget_per_batch(tiny, batch):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(budgets=[4, 16, 0.5]))).train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == vlm.config.image_token_id, -100)
    torch.manual_seed(0)
    drawn = set()
    for _ in range(12):
        model(**batch, labels=labels).loss.backward()
        drawn.add(model.retention_stats()["budget"])
        assert abs(float(model._last_alpha.sum(-1).mean()) - model.resolve_budget(N, model._last_budget)) < 1e-3
    assert drawn == {4.0, 16.0, 0.5}
    assert AutoSelectConfig.from_json_string(model.config.to_json_string()).training.budgets == [4, 16, 0.5]


def test_gate_attention_at_low_temperature_trains_on_the_inference_sequence(tiny, batch):
    """With attention throttling, the training forward at a near-zero temperature gives the loss
    of the hard top-K inference forward (original positions), even with a denoiser far from
    identity (it leaves kept tokens alone); the noise gate alone does not (the LLM still attends
    to N - K noised tokens)."""
    vlm, _ = tiny
    # Answer-like labels: the last text tokens. (The token right after the image would be
    # predicted from a dropped column in training and from the last kept one at inference.)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]
    losses = {}
    for throttle in (True, False):
        config = AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=throttle), position_policy="original",
                                  temperature_start=1e-6, temperature_end=1e-6)
        torch.manual_seed(0)
        model = AutoSelectModel.attach(vlm, config)
        with torch.no_grad():
            for param in model.denoiser.parameters():  # a denoiser far from identity (as after training)
                param.normal_(std=0.5)
            model.train()
            trained = float(model(**batch, labels=labels).loss)
            model.eval()
            inferred = float(model(**batch, labels=labels).loss)
        losses[throttle] = (trained, inferred)
    trained, inferred = losses[True]
    assert trained == pytest.approx(inferred, abs=1e-4)
    trained, inferred = losses[False]
    assert abs(trained - inferred) > 1e-3  # 10x the tolerance above


def test_score_noise_turns_tied_logits_into_a_hard_random_choice(tiny, batch):
    vlm, _ = tiny
    tokens = torch.randn(2, N, vlm.config.vision_config.hidden_size)
    k = torch.tensor([16, 16])
    weights = {}
    for noise in (0.0, 1.0):
        config = AutoSelectConfig(budget=16, training=TrainingOptions(score_noise=noise), temperature_start=1e-3, temperature_end=1e-3)
        model = AutoSelectModel.attach(vlm, config).train()
        torch.nn.init.zeros_(model.scorer.head.weight)  # every logit ties
        with torch.no_grad():
            weights[noise] = model.retention_weights(tokens, k)
    assert torch.allclose(weights[0.0], torch.full_like(weights[0.0], 16 / N))  # spread evenly: leaks all tokens
    hard = weights[1.0]
    undecided = ((hard > 1e-3) & (hard < 1 - 1e-3)).sum(-1)
    assert (undecided <= 2).all(), undecided  # at most the pair straddling the threshold is soft
    assert torch.allclose(hard.sum(-1), k.to(hard.dtype))
    with pytest.raises(ValueError, match="score_noise"):
        TrainingOptions(score_noise=-1.0)


@pytest.mark.parametrize("inference", [InferenceOptions(), InferenceOptions(decode="dpp", dpp_quality_scale=0.5),
                                       InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5),
                                       InferenceOptions(grid_reserve=0.5)], ids=["topk", "dpp", "topk_dpp", "grid_reserve"])
@pytest.mark.parametrize("candidates", [0.0, 1.0], ids=["all-tokens", "candidates"])
def test_straight_through_trains_on_the_hard_pruned_sequence_with_gradient_for_every_logit(tiny, batch, inference, candidates):
    """With ``straight_through`` the training forward is the inference forward of the scorer's own
    decode (top-K, DPP, grid reserve; original positions) at any temperature, also when the LLM is
    sent only the kept tokens plus candidates, and the backward still reaches every scorer logit,
    dropped tokens included (their gradient is the value of letting them back in)."""
    vlm, _ = tiny
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]  # answer-like labels, as above
    config = AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=True, straight_through=True, candidates=candidates),
                              position_policy="original", temperature_start=1.0, temperature_end=1.0, inference=inference)
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, config)
    logits_seen = []

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        logits_seen.append(out)

    handle = model.scorer.register_forward_hook(keep_logits)
    training_kept, kept_in_training = model.training_kept, []

    def record_kept(*args):
        kept_in_training.append(training_kept(*args))
        return kept_in_training[-1]

    model.training_kept = record_kept
    model.train()
    trained = model(**batch, labels=labels).loss
    trained.backward()
    handle.remove()
    (scores,) = logits_seen
    assert torch.isfinite(scores.grad).all() and (scores.grad != 0).all()
    assert model.retention_stats()["alpha_entropy"] > 0.1  # the stats describe the soft weights the backward uses
    model.eval()
    with torch.no_grad():
        inferred = float(model(**batch, labels=labels).loss)
        decoded = model.select(pixel_values=batch["pixel_values"])[0].indices
        topk = model.with_inference(InferenceOptions()).select(pixel_values=batch["pixel_values"])[0].indices
    assert float(trained.detach()) == pytest.approx(inferred, abs=1e-4)
    (kept,) = kept_in_training
    assert [row.nonzero()[:, 0].tolist() for row in kept] == decoded.tolist()
    if inference != InferenceOptions():  # the decode keeps another set than the top-K here, so the check can tell
        assert not torch.equal(decoded, topk)
    with pytest.raises(OptionDependencyError, match="straight_through needs training.gate_attention"):
        TrainingOptions(straight_through=True)


def test_training_decode_topk_trains_under_the_top_k_whatever_inference_decodes(tiny):
    """``training.decode="topk"``: a straight-through scorer read under another decode (here top-K
    then DPP) keeps the hard top-K of its training logits, as the scorer it retrains was trained;
    the default keeps inference's set. Needs straight_through."""
    from autoselect.selection import topk_dpp_indices, topk_indices

    vlm, _ = tiny
    inference = InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5)
    torch.manual_seed(0)
    tokens, scores, k = torch.randn(2, 64, vlm.config.vision_config.hidden_size), torch.randn(2, 64), torch.tensor([16, 16])
    kept = {}
    for decode in ("inference", "topk"):
        training = TrainingOptions(gate_attention=True, straight_through=True, decode=decode)
        model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=training, inference=inference))
        kept[decode] = [row.nonzero()[:, 0] for row in model.training_kept(scores, tokens, k, None)]
    assert torch.equal(torch.stack(kept["topk"]), topk_indices(scores, 16))
    assert torch.equal(torch.stack(kept["inference"]), topk_dpp_indices(scores, tokens, 16, 0.5, 0.5))
    assert not torch.equal(torch.stack(kept["topk"]), torch.stack(kept["inference"]))
    with pytest.raises(OptionDependencyError, match="training.decode='topk' needs training.straight_through=True"):
        TrainingOptions(decode="topk")
    with pytest.raises(ConfigError, match=r"training.decode must be one of \('inference', 'topk'\), got 'dpp'"):
        TrainingOptions(gate_attention=True, straight_through=True, decode="dpp")
    config = AutoSelectConfig(training=TrainingOptions(gate_attention=True, straight_through=True, decode="topk"), inference=inference)
    assert AutoSelectConfig.from_json_string(config.to_json_string()) == config
    assert AutoSelectConfig.from_dict({"training": {"straight_through": True, "gate_attention": True}}).training.decode == "inference"


def test_inference_noise_keeps_a_seeded_sample_the_same_alone_or_in_a_batch(tiny, batch, tmp_path):
    """``inference.noise`` ranks by logits + a fixed per-position Gumbel vector: exactly K sorted
    tokens, the same on every call and for an image alone or in a batch, another set than the
    plain top-K, and another one again under another seed; 0 is the paper's top-K."""
    vlm, processor = tiny
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    with torch.no_grad():
        model(**batch)
        plain = model.last_selection.indices.clone()
        model.config.inference = InferenceOptions(noise=1.0)
        model(**batch)
        sampled = model.last_selection.indices.clone()
        model(**batch)
        assert torch.equal(model.last_selection.indices, sampled)  # deterministic
        alone = processor(images=square_images(2)[1:], text=PROMPTS[1:], return_tensors="pt")
        model(**alone)
        assert torch.equal(model.last_selection.indices[0], sampled[1])  # batch-invariant
        model.config.inference = InferenceOptions(noise=1.0, seed=1)
        model(**batch)
        other_seed = model.last_selection.indices.clone()
    assert sampled.shape == (2, 16) and torch.all(sampled[:, 1:] > sampled[:, :-1])
    assert not torch.equal(sampled, plain) and not torch.equal(sampled, other_seed)
    scores = torch.randn(2, N)
    shift = ranking(scores, model.config.inference) - scores.double()
    assert torch.allclose(shift[0], shift[1]) and shift.std() > 0.5  # one Gumbel vector per position
    model.config.inference = InferenceOptions(noise=0.0)
    assert torch.equal(ranking(scores, model.config.inference), scores)
    model.config.inference = InferenceOptions(noise=1.0, seed=0)
    model.save_pretrained(tmp_path / "s")
    assert AutoSelectModel.from_pretrained(tmp_path / "s", vlm).config.inference == InferenceOptions(noise=1.0, seed=0)
    with pytest.raises(ValueError, match="inference.noise"):
        InferenceOptions(noise=-0.5)
    with pytest.raises(OptionDependencyError, match="inference.seed=1 needs inference.noise"):
        InferenceOptions(seed=1)


def test_registered_pyfunc_ranks_as_the_model_selects(tiny, batch, tmp_path):
    """The MLflow pyfunc's output has the same top K as `AutoSelectModel`, sampled scorer included."""
    from types import SimpleNamespace

    from autoselect.selection import topk_indices
    from mlops.registry import ARTIFACT_KEY, AutoSelectScorerModel

    vlm, _ = tiny
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=InferenceOptions(noise=1.0, seed=3))).eval()
    model.save_pretrained(tmp_path / "s")
    pyfunc = AutoSelectScorerModel()
    pyfunc.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(tmp_path / "s")}))
    with torch.no_grad():
        tokens = model.visual_tokens(pixel_values=batch["pixel_values"])
        model(**batch)
    ranked = torch.from_numpy(pyfunc.predict(None, {"visual_tokens": tokens.numpy()}))
    assert torch.equal(topk_indices(ranked, 16), model.last_selection.indices)
    assert not torch.equal(topk_indices(model.scorer(tokens), 16), model.last_selection.indices)  # the noise matters


def test_train_candidates_send_the_llm_top_k_plus_a_draw_and_every_logit_still_learns(tiny, batch):
    """``training.candidates=1``: the LLM sees 2K tokens per image (the scorer's top K and K drawn at
    random), the loss is finite, and every scorer logit gets gradient, including those of the
    tokens not sent (through the soft top-K's threshold). With room for every token the step is
    the full one, draw for draw."""
    vlm, _ = tiny
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]
    logits_seen = []

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        logits_seen.append(out)

    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(candidates=1.0), temperature_start=0.5)).train()
    handle = model.scorer.register_forward_hook(keep_logits)
    seen, hook = language_model_inputs(vlm)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    handle.remove(), hook.remove()
    assert seen[0]["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] - (N - 32)
    (scores,) = logits_seen
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all() and (scores.grad != 0).all()

    losses = []
    for candidates in (0.0, N / 16):  # 16 + 64 >= N: everything is sent
        torch.manual_seed(0)
        model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(candidates=candidates))).train()
        with torch.no_grad():
            losses.append(float(model(**batch, labels=labels).loss))
    assert losses[0] == losses[1]
    with pytest.raises(ValueError, match="training.candidates"):
        TrainingOptions(candidates=-1.0)


def test_candidate_indices_keep_the_top_k_and_draw_the_rest_uniformly():
    from autoselect.selection import candidate_indices, topk_mask

    scores = torch.arange(10.0).repeat(2, 1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 8:] = False  # a shorter image: its top 3 are 5, 6, 7
    torch.manual_seed(0)
    kept = topk_mask(scores, torch.tensor([3, 3]), valid)
    drawn = [candidate_indices(kept, torch.tensor([2, 2]), valid) for _ in range(400)]
    for row, top in ((0, {7, 8, 9}), (1, {5, 6, 7})):
        assert all(len(d[row]) == 5 and top <= set(d[row].tolist()) and d[row].tolist() == sorted(d[row].tolist()) for d in drawn)
        others = torch.cat([d[row] for d in drawn])
        counts = torch.bincount(others, minlength=10)[: 10 - len(top) - 2 * row]
        assert counts.min() > 0.5 * counts.float().mean()  # every other real token gets drawn
    assert not any(set(d[1].tolist()) & {8, 9} for d in drawn)  # never a padded slot


def checkpointed_step(model: AutoSelectModel, batch, labels, seed: int = 0):
    """(loss, scorer logits' gradient, scorer parameters' gradients, LLM attention calls) of one seeded step."""
    logits_seen, calls = [], []

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        logits_seen.append(out)

    # a pre-hook on a layer's attention fires inside the layer's forward, so again when it is recomputed
    # (not a forward hook: the recompute stops once it has rebuilt the tensors the backward needs)
    hooks = [model.scorer.register_forward_hook(keep_logits)] + [
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.vlm.get_decoder().layers
    ]
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    (scores,) = logits_seen
    grads = {n: p.grad.clone() for n, p in model.scorer.named_parameters()}
    return loss.detach(), scores.grad, grads, len(calls)


@pytest.mark.parametrize("gate_attention", [False, True])
def test_gradient_checkpointing_keeps_the_loss_and_every_logits_gradient(tiny, batch, gate_attention):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=gate_attention)))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == vlm.config.image_token_id, -100)
    layers = len(vlm.get_decoder().layers)

    loss, logit_grad, grads, calls = checkpointed_step(model, batch, labels)
    assert not model.gradient_checkpointing and calls == layers

    assert model.enable_gradient_checkpointing() is model and model.gradient_checkpointing
    loss_ckpt, logit_grad_ckpt, grads_ckpt, calls_ckpt = checkpointed_step(model, batch, labels)
    assert calls_ckpt == 2 * layers  # every decoder layer really was recomputed in the backward pass
    assert not vlm.training and not any(m.training for m in vlm.modules())  # the VLM stayed in eval mode
    assert torch.allclose(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logit_grad_ckpt).all() and (logit_grad_ckpt != 0).all()
    assert torch.allclose(logit_grad_ckpt, logit_grad, rtol=1e-5, atol=1e-8)
    for name, grad in grads.items():
        assert torch.allclose(grads_ckpt[name], grad, rtol=1e-5, atol=1e-8), name
    assert all(p.grad is None for p in vlm.parameters())

    model.enable_gradient_checkpointing(False)
    assert not model.gradient_checkpointing
    assert checkpointed_step(model, batch, labels)[3] == layers


def test_gradient_checkpointing_leaves_no_grad_inference_and_its_kv_cache_alone(tiny, batch):
    vlm, _ = tiny
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=4, do_sample=False)
        logits = model(**batch).logits
    model.enable_gradient_checkpointing()
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), reference)
        assert torch.equal(model(**batch).logits, logits)
