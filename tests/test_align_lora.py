"""The alignment loop (pipelines/align/train.py) on the tiny LLaVA, projector-only and with a LoRA
on the LM's attention (pipelines/align/lora.py, PEFT): what trains, what stays bit-identical, the
bf16 compute path, and save -> load + merge into a plain float32 model (minillava/lora.py, the
mini-LLaVA build's merge, without PEFT: the same weights as PEFT's own merge)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from autoselect.backbones import get_adapter
from autoselect.data import encode_example
from autoselect.testing import build_tiny_llava
from minillava.aligned import load_projector, projector_module, save_projector
from minillava.lora import ADAPTER_FILE, DEFAULT_TARGETS, LoraSettings, merge_lora, read_lora, write_lora
from pipelines.align.features import EncodedRecords
from pipelines.align.train import TrainConfig, train_projector

pytest.importorskip("peft")
from pipelines.align.lora import add_lora, attached_settings, has_lora, load_lora, save_lora  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
IDENTITY = {"dinov2_file_sha256": "a" * 64, "smollm2_file_sha256": "b" * 64, "settings": {"tiny": True}}
CONFIG = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, seed=0, compute_dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    yield
    torch.set_num_threads(threads)


def messages(colour: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is the marker?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": colour}]},
    ]


@pytest.fixture(scope="module")
def data():
    """Eight records over four solid-colour images, encoded like pipelines/align/features.py does,
    with the frozen tower's features precomputed (as the feature cache holds them)."""
    vlm, processor = build_tiny_llava(seed=0)
    images = [Image.new("RGB", (32, 32), colour) for colour in COLOURS]
    encoded = EncodedRecords([], [], [], [], [f"{c}.png" for c in COLOURS])
    pixels = []
    for i in range(8):
        example = encode_example(processor, messages(COLOURS[i % 4]), [images[i % 4]])
        encoded.records.append({"task": "colour" if i % 2 else "other"})
        encoded.input_ids.append(example["input_ids"])
        encoded.labels.append(example["labels"])
        encoded.image_index.append(i % 4)
        if i < 4:
            pixels.append(example["pixel_values"])
    with torch.no_grad():
        encoded.features = get_adapter(vlm).visual_tokens(torch.cat(pixels)).to(torch.bfloat16)
    probe = encode_example(processor, messages("red"), [images[0]])
    return {"encoded": encoded, "pad": processor.tokenizer.pad_token_id, "probe": probe}


def snapshot(vlm) -> dict[str, torch.Tensor]:
    """Every weight by its plain-model name (PEFT's ``.base_layer`` folded away), cloned."""
    return {name.replace(".base_layer", ""): p.detach().clone() for name, p in vlm.named_parameters() if "lora_" not in name}


def lora_state(vlm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in vlm.named_parameters() if "lora_" in name}


def logits(vlm, probe) -> torch.Tensor:
    with torch.no_grad():
        return vlm(input_ids=probe["input_ids"][None], pixel_values=probe["pixel_values"]).logits


def trained(data, config: TrainConfig):
    vlm = build_tiny_llava(seed=0)[0]
    before = snapshot(vlm)
    history = train_projector(vlm, data["encoded"], config, data["pad"])
    return vlm, before, history


def test_rank_zero_trains_only_the_projector(data):
    vlm, before, history = trained(data, CONFIG)
    assert not has_lora(vlm) and attached_settings(vlm) is None
    assert all("lora_lr" not in h for h in history)
    for name, param in vlm.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == name.startswith("model.multi_modal_projector."), name
        assert (param.grad is not None) == name.startswith("model.multi_modal_projector."), name
    again = train_projector(build_tiny_llava(seed=0)[0], data["encoded"], CONFIG, data["pad"])
    assert [h["loss"] for h in again] == [h["loss"] for h in history]  # deterministic under the seed


def test_lora_trains_projector_and_adapter_only_and_leaves_every_base_weight_bit_identical(data):
    vlm, before, history = trained(data, replace(CONFIG, lora_rank=4, lora_lr=5e-3))
    assert attached_settings(vlm) == LoraSettings(4, 8.0)
    assert all(h["lora_lr"] == pytest.approx(h["lr"] / 2) for h in history)
    lora = [name for name, _ in vlm.named_parameters() if "lora_" in name]
    assert lora and all(".language_model." in name and "self_attn" in name for name in lora)  # the vision tower has q_proj too
    assert {name.split(".")[-4] for name in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, param in vlm.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.dtype == torch.float32, name
            continue
        plain = name.replace(".base_layer", "")
        is_projector = plain.startswith("model.multi_modal_projector.")
        assert (param.grad is not None) == is_projector, name
        if not is_projector:
            assert torch.equal(param, before[plain]), f"{plain} changed"
    assert all(not torch.equal(vlm.get_parameter(n), before[n]) for n in before if n.startswith("model.multi_modal_projector."))


def test_lora_in_bf16_keeps_float32_adapters_that_learn_with_a_finite_loss(data):
    vlm = build_tiny_llava(seed=0)[0]
    before = snapshot(vlm)
    add_lora(vlm, LoraSettings(4))  # attached first (as --init-lora does), so its start is known
    initial = lora_state(vlm)
    config = replace(CONFIG, compute_dtype="bfloat16", lora_rank=4)
    history = train_projector(vlm, data["encoded"], config, data["pad"])
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    final = lora_state(vlm)
    assert final.keys() == initial.keys() and all(v.dtype == torch.float32 for v in final.values())
    # B starts at zero and moves at step 1; A gets a gradient once B is non-zero (step 2 on)
    assert [k for k in final if torch.equal(final[k], initial[k])] == []
    for name, param in vlm.named_parameters():
        if "lora_" not in name and not name.startswith("model.multi_modal_projector."):
            assert param.dtype == torch.bfloat16 and torch.equal(param, before[name.replace(".base_layer", "")].to(torch.bfloat16)), name


def test_continuing_keeps_the_saved_float32_adapter_exactly_under_bf16(data, tmp_path):
    vlm, _, _ = trained(data, replace(CONFIG, compute_dtype="bfloat16", lora_rank=2))
    adapter = save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)
    continued = build_tiny_llava(seed=0)[0]
    load_lora(continued, adapter, IDENTITY)
    saved = lora_state(continued)
    train_projector(continued, data["encoded"], replace(CONFIG, compute_dtype="bfloat16", lora_rank=2, steps=0), data["pad"])
    assert all(torch.equal(v, saved[k]) and v.dtype == torch.float32 for k, v in lora_state(continued).items())  # not rounded to bf16


def test_saved_adapter_merges_into_a_plain_float32_model_with_the_same_logits(data, tmp_path):
    vlm, _, _ = trained(data, replace(CONFIG, compute_dtype="bfloat16", lora_rank=4, lora_alpha=4.0))
    projector = save_projector(vlm, tmp_path / "projector.safetensors", IDENTITY)
    adapter = save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY, {"steps": 3})
    assert read_lora(tmp_path) == (IDENTITY, LoraSettings(4, 4.0))  # the run folder finds the file too

    wrapped = build_tiny_llava(seed=0)[0]  # float32, the adapter attached unmerged (PEFT layers)
    load_projector(wrapped, projector, IDENTITY)
    load_lora(wrapped, adapter, IDENTITY)
    assert all(torch.equal(v, lora_state(vlm)[k]) for k, v in lora_state(wrapped).items())  # saved exactly
    merged = build_tiny_llava(seed=0)[0]
    load_projector(merged, projector, IDENTITY)
    assert merge_lora(merged, tmp_path, IDENTITY) == LoraSettings(4, 4.0)

    assert not has_lora(merged) and not hasattr(merged.model.language_model, "peft_config")
    assert not any("peft" in type(m).__module__ for m in merged.modules())
    assert type(merged.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in merged.parameters())  # as from_pretrained leaves them
    expected = logits(wrapped, data["probe"])
    got = logits(merged, data["probe"])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    plain = build_tiny_llava(seed=0)[0]
    load_projector(plain, projector, IDENTITY)
    assert not torch.allclose(logits(plain, data["probe"]), expected, atol=1e-3)  # the adapter matters

    merged.save_pretrained(tmp_path / "model")  # what --out-model writes: an ordinary transformers folder
    reloaded = type(merged).from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded, data["probe"]), got)


def test_an_adapter_for_another_backbone_or_without_metadata_is_refused(data, tmp_path):
    vlm, _, _ = trained(data, replace(CONFIG, steps=1, lora_rank=2))
    adapter = save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)
    other = {**IDENTITY, "smollm2_file_sha256": "c" * 64}
    with pytest.raises(ValueError, match="trained against another mini-LLaVA backbone"):
        merge_lora(build_tiny_llava(seed=0)[0], adapter, other)
    fresh = build_tiny_llava(seed=0)[0]
    with pytest.raises(ValueError, match="trained against another mini-LLaVA backbone"):
        load_lora(fresh, adapter, other)
    assert not has_lora(fresh)  # refused before anything was attached
    projector = save_projector(vlm, tmp_path / "projector.safetensors", IDENTITY)
    with pytest.raises(ValueError, match="not written by save_lora"):
        load_lora(fresh, projector, IDENTITY)


def random_adapter(tmp_path, settings: LoraSettings, **tiny) -> str:
    """A saved adapter with random A and B (B != 0, so it changes the weights), written by alignment's
    own ``save_lora``; cheaper than training one."""
    vlm = build_tiny_llava(seed=0, **tiny)[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in add_lora(vlm, settings):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)


def test_the_merge_without_peft_gives_the_weights_of_pefts_own_merge(tmp_path):
    """``minillava.lora.merge_lora`` (what the mini-LLaVA build runs: W += alpha/r B @ A in float32)
    == PEFT merging the same file into the same model, on every weight; only the LM's targets move."""
    from peft.tuners.lora import Linear as LoraLinear

    adapter = random_adapter(tmp_path, LoraSettings(4, 6.0))
    by_peft = build_tiny_llava(seed=0)[0]
    load_lora(by_peft, adapter, IDENTITY)
    layers = [m for m in by_peft.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.merge()
    expected = snapshot(by_peft)

    plain = build_tiny_llava(seed=0)[0]
    before = snapshot(plain)
    assert merge_lora(plain, adapter, IDENTITY) == LoraSettings(4, 6.0)
    merged = snapshot(plain)
    targets = {n for n in merged if ".language_model." in n and n.endswith(tuple(f"{t}.weight" for t in DEFAULT_TARGETS))}
    assert merged.keys() == expected.keys() and len(targets) == len(layers) == 4 * len(plain.model.language_model.layers)
    for name, weight in merged.items():
        assert torch.allclose(weight, expected[name], rtol=0, atol=1e-5), f"{name}: {(weight - expected[name]).abs().max()}"
        assert torch.equal(weight, before[name]) == (name not in targets), name


def test_an_adapter_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    adapter = random_adapter(tmp_path, LoraSettings(2))
    narrower = build_tiny_llava(seed=0, text_width=32)[0]  # another LM: k_proj 16 x 32, not 32 x 64
    before = snapshot(narrower)
    with pytest.raises(ValueError, match=r"does not fit the language model: layers\.0\.self_attn\.k_proj is \(16, 32\)"):
        merge_lora(narrower, adapter)
    assert all(torch.equal(p, before[n]) for n, p in snapshot(narrower).items())  # checked before any weight moved
    attached = build_tiny_llava(seed=0)[0]
    load_lora(attached, adapter, IDENTITY)
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        merge_lora(attached, adapter, IDENTITY)
    state = {"layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64), "layers.0.mlp.up_proj.lora_B.weight": torch.zeros(64, 2)}
    stray = write_lora(state, tmp_path / "stray.safetensors", IDENTITY, LoraSettings(2))
    with pytest.raises(ValueError, match="is not one of the adapter's targets"):
        merge_lora(build_tiny_llava(seed=0)[0], stray, IDENTITY)


def test_an_attached_adapter_must_match_the_config(data, tmp_path):
    vlm, _, _ = trained(data, replace(CONFIG, steps=1, lora_rank=2))
    adapter = save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)
    continued = build_tiny_llava(seed=0)[0]
    load_lora(continued, adapter, IDENTITY)
    with pytest.raises(ValueError, match="lora_rank is 0"):
        train_projector(continued, data["encoded"], CONFIG, data["pad"])
    with pytest.raises(ValueError, match="config asks for"):
        train_projector(continued, data["encoded"], replace(CONFIG, lora_rank=4), data["pad"])
    history = train_projector(continued, data["encoded"], replace(CONFIG, steps=1, lora_rank=2), data["pad"])  # --init-lora
    assert len(history) == 1 and attached_settings(continued) == LoraSettings(2)


def test_cli_lora_flags(tmp_path):
    from pipelines.align_projector import build_parser, lora_settings

    parse = build_parser().parse_args
    assert lora_settings(parse([])) == {"lora_rank": 0, "lora_alpha": None, "lora_lr": None}
    assert lora_settings(parse(["--lora-rank", "8", "--lora-lr", "2e-4"])) == {"lora_rank": 8, "lora_alpha": None, "lora_lr": 2e-4}
    assert TrainConfig(**lora_settings(parse(["--lora-rank", "8"]))).lora_rank == 8
    with pytest.raises(SystemExit):
        lora_settings(parse(["--lora-alpha", "16"]))
    vlm = build_tiny_llava(seed=0)[0]
    add_lora(vlm, LoraSettings(2, 3.0))
    save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)
    assert lora_settings(parse(["--init-lora", str(tmp_path)]))["lora_rank"] == 2
    assert lora_settings(parse(["--init-lora", str(tmp_path)]))["lora_alpha"] == 3.0
    widened = lora_settings(parse(["--init-lora", str(tmp_path), "--lora-rank", "8", "--lora-targets", "attention,mlp"]))
    assert widened == {"lora_rank": 8, "lora_alpha": 16.0, "lora_lr": None, "lora_targets": DEFAULT_TARGETS + ("gate_proj", "up_proj", "down_proj")}
    for narrower in (["--lora-rank", "1"], ["--lora-targets", "q_proj,v_proj"], ["--lora-alpha", "4"]):
        with pytest.raises(SystemExit, match="--init-lora"):  # a smaller rank, a lost target, another alpha at its rank
            lora_settings(parse(["--init-lora", str(tmp_path), *narrower]))
    assert parse(["--lora-targets", "down_proj,attention"]).lora_targets == DEFAULT_TARGETS + ("down_proj",)
    with pytest.raises(SystemExit):
        parse(["--lora-targets", "lm_head"])
    with pytest.raises(SystemExit):
        lora_settings(parse(["--lora-targets", "mlp"]))  # no rank


def test_a_widened_adapter_starts_as_the_saved_one_and_its_new_rank_learns(data, tmp_path):
    """--init-lora with a higher rank / more targets: the same logits before training, then every
    new weight trains (the new B columns and new targets start at zero, the new A rows at random)."""
    vlm, _, _ = trained(data, replace(CONFIG, lora_rank=2, lora_alpha=3.0))
    adapter = save_lora(vlm, tmp_path / ADAPTER_FILE, IDENTITY)
    expected = logits(vlm, data["probe"])
    wider = LoraSettings(4, None, DEFAULT_TARGETS + ("gate_proj", "up_proj", "down_proj"))
    widened = build_tiny_llava(seed=0)[0]
    load_projector(widened, save_projector(vlm, tmp_path / "projector.safetensors", IDENTITY), IDENTITY)
    load_lora(widened, adapter, IDENTITY, widen_to=wider)
    assert attached_settings(widened) == wider
    assert torch.allclose(logits(widened, data["probe"]), expected, atol=1e-5)
    start = lora_state(widened)
    assert any("mlp.up_proj.lora_B" in k for k in start) and all(not v.any() for k, v in start.items() if "mlp" in k and "lora_B" in k)
    train_projector(widened, data["encoded"], replace(CONFIG, steps=2, lora_rank=4, lora_targets=wider.targets), data["pad"])
    moved = {k for k, v in lora_state(widened).items() if not torch.equal(v, start[k])}
    assert any("mlp.down_proj.lora_B" in k for k in moved) and any("self_attn.q_proj.lora_B" in k for k in moved)
    for narrower in (LoraSettings(1, 2.0), LoraSettings(4, None, ("q_proj",))):
        with pytest.raises(ValueError, match="cannot continue as rank"):
            load_lora(build_tiny_llava(seed=0)[0], adapter, IDENTITY, widen_to=narrower)


def test_freezing_in_bf16_keeps_the_projectors_exact_float32_weights():
    """Continuing from a float32 projector (``--init-projector``) must not round it through bf16."""
    from pipelines.align.train import freeze_all_but_projector

    vlm, _ = build_tiny_llava(seed=0)
    projector = projector_module(vlm)
    with torch.no_grad():
        for p in projector.parameters():
            p.add_(1e-4 * torch.randn_like(p))  # values bf16 cannot hold exactly
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in before.values())
    params = freeze_all_but_projector(vlm, torch.bfloat16)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(torch.equal(projector.state_dict()[k], v) for k, v in before.items())
    assert vlm.model.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_token_drop_trains_on_subsets_deterministically(data, monkeypatch):
    import pipelines.align.train as loop
    from pipelines.align.token_drop import TokenDrop

    seen = []  # per step, the number of visual tokens each example's LM input held
    real = loop.answer_loss

    def recording(vlm, batch, projected):
        seen.append([len(p) for p in projected])
        return real(vlm, batch, projected)

    monkeypatch.setattr(loop, "answer_loss", recording)
    config = replace(CONFIG, token_drop=TokenDrop(prob=1.0, keep_min=0.25, keep_max=0.5))
    vlm, before, history = trained(data, config)
    n = data["encoded"].features.shape[1]
    assert all(n // 4 - 2 <= k <= n // 2 + 2 for step in seen for k in step)  # every example saw a subset
    assert all(math.isfinite(h["loss"]) for h in history)
    assert not torch.equal(projector_module(vlm).linear_1.weight, before["model.multi_modal_projector.linear_1.weight"])
    full = trained(data, CONFIG)[2]
    assert [h["loss"] for h in history] != [h["loss"] for h in full]
    again = trained(data, config)[2]
    assert [h["loss"] for h in again] == [h["loss"] for h in history]
