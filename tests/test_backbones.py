"""Every backbone adapter on a tiny from-config model: the invariants the method relies on."""

import pytest
import torch

from autoselect import AutoSelectConfig, AutoSelectModel, InferenceOptions, TrainingOptions
from autoselect.backbones import get_adapter
from autoselect.pruners import build_pruner
from autoselect.testing.tiny_backbones import TINY_BACKBONES
from tests.support.contract import check_generate_contract
from tests.support.inputs import noise_images

QUESTIONS = ["What is in the image?", "Describe the picture in one short sentence please."]
SIZES = [(32, 32), (24, 40)]  # (height, width): native-resolution backbones get different N per image


def make_batch(processor, questions=QUESTIONS, sizes=SIZES, seed=0):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    return processor(images=[[i] for i in noise_images(sizes, seed)], text=texts, return_tensors="pt", padding=True)


@pytest.fixture(params=sorted(TINY_BACKBONES))
def backbone(request):
    vlm, processor = TINY_BACKBONES[request.param](seed=0)
    return request.param, vlm, processor


def image_inputs(vlm, batch):
    return {k: batch[k] for k in get_adapter(vlm).image_input_names if k in batch}


def token_counts(vlm, batch) -> list[int]:
    tokens = get_adapter(vlm).visual_tokens(**image_inputs(vlm, batch))
    return [len(t) for t in tokens]


def vlm_inputs(vlm):
    """Record the keyword arguments the frozen VLM receives."""
    seen: list[dict] = []
    handle = vlm.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen, handle


def test_k_equals_n_gives_the_unmodified_logits(backbone):
    _, vlm, processor = backbone
    batch = make_batch(processor)
    with torch.no_grad():
        reference = vlm(**batch).logits
        pruned = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=1.0)).eval()(**batch).logits
    assert pruned.shape == reference.shape
    assert torch.allclose(pruned, reference, atol=1e-5)


def test_k_below_n_sends_exactly_k_tokens_per_image_at_documented_positions(backbone):
    _, vlm, processor = backbone
    batch = make_batch(processor)
    counts = token_counts(vlm, batch)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).eval()
    adapter = model.adapter
    seen, handle = vlm_inputs(vlm)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    ids = seen[0]["input_ids"]
    kept = model.last_selection.per_image()
    expected_k = [max(1, round(0.5 * n)) for n in counts]
    assert [len(k) for k in kept] == expected_k
    assert all(bool((k[1:] > k[:-1]).all()) for k in kept), "kept indices must be sorted"
    placeholders = (ids == adapter.image_token_id).sum(-1).tolist()
    original = (batch["input_ids"] == adapter.image_token_id).sum(-1).tolist()
    dropped = [o - p for o, p in zip(original, placeholders)]
    assert sum(dropped) == sum(n - k for n, k in zip(counts, expected_k))
    if len(counts) == len(dropped):  # one view per image: check each row (Idefics3 has several views per image)
        assert dropped == [n - k for n, k in zip(counts, expected_k)]
    if adapter.layout_positions:  # M-RoPE: kept tokens and the text keep their full-sequence positions
        full = adapter.position_ids(batch["input_ids"], batch["attention_mask"], image_inputs(vlm, batch), dict(batch))
        got = seen[0]["position_ids"]
        for row, keep in enumerate(kept):
            old_cols = (batch["input_ids"][row] == adapter.image_token_id).nonzero()[:, 0]
            new_cols = (ids[row] == adapter.image_token_id).nonzero()[:, 0]
            assert torch.equal(got[1:, row, new_cols], full[1:, row, old_cols[keep]])
            assert torch.equal(got[1:, row, -1], full[1:, row, -1])  # the prompt's last token keeps its position
            mask = seen[0]["attention_mask"][row]
            assert got[0, row][mask.bool()].tolist() == list(range(int(mask.sum())))


def test_training_step_reaches_every_scorer_logit_and_no_vlm_parameter(backbone):
    _, vlm, processor = backbone
    batch = make_batch(processor)
    counts = token_counts(vlm, batch)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5))
    logits = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        logits.append(out)

    model.scorer.register_forward_hook(keep)
    model.train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.adapter.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    (scores,) = logits
    for row, n in enumerate(counts):
        grad = scores.grad[row, :n]
        assert torch.isfinite(grad).all() and (grad != 0).all()
    assert all(p.grad is None for p in vlm.parameters())
    assert all(p.grad is not None for p in model.scorer.parameters())


def test_batched_generate_equals_per_sample_generate(backbone):
    """HF's contract on a left-padded batch: the caller's prompt, then per row the new tokens of that row alone."""
    _, vlm, processor = backbone
    batch = make_batch(processor, seed=3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the test needs left padding"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}], add_generation_prompt=True
    )  # the second image alone: same pixels as in the batch
    singles = [make_batch(processor, QUESTIONS[:1], SIZES[:1], seed=3),
               processor(images=[noise_images(SIZES, 3)[1:]], text=[text], return_tensors="pt")]
    for model in AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).eval(), build_pruner("divprune", vlm, 0.5):
        check_generate_contract(model, batch, singles, max_new_tokens=5)


@pytest.mark.parametrize("pruner", ["autoselect", "random"])
def test_generate_keeps_the_callers_prompt_and_k_equals_n_is_the_unmodified_generate(backbone, pruner):
    _, vlm, processor = backbone
    batch = make_batch(processor)

    def build(budget):
        return AutoSelectModel.attach(vlm, AutoSelectConfig(budget=budget)).eval() if pruner == "autoselect" \
            else build_pruner(pruner, vlm, budget)

    check_generate_contract(build(0.25), batch)
    reference = vlm.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(build(1.0).generate(**batch, max_new_tokens=4, do_sample=False), reference)


def test_save_and_load_round_trip(backbone, tmp_path):
    name, vlm, processor = backbone
    batch = make_batch(processor)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5))
    with torch.no_grad():
        for p in model.scorer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    scores = model.score(**image_inputs(vlm, batch))
    model.save_pretrained(tmp_path)
    fresh, _ = TINY_BACKBONES[name](seed=0)
    loaded = AutoSelectModel.from_pretrained(tmp_path, fresh).eval()
    again = loaded.score(**image_inputs(fresh, batch))
    for a, b in zip(scores, again):
        assert torch.equal(a, b)
    assert loaded.config.vision_width == get_adapter(vlm).vision_width


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "llava_next"])
def test_saved_backbone_folder_loads_with_its_processor(name, tmp_path):
    """What pipelines load: a saved folder, through the shared loader (Qwen-VL without torchvision)."""
    from mlops.backbone import load_vlm_and_processor

    vlm, processor = TINY_BACKBONES[name](seed=0)
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # float32 like the original it is compared with: `auto` would be bf16 on a CPU with native bf16
    loaded, loaded_processor = load_vlm_and_processor(str(tmp_path), "float32", torch.device("cpu"))
    assert loaded.dtype == torch.float32
    batch, again = make_batch(processor), make_batch(loaded_processor)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.allclose(vlm(**batch).logits, loaded(**again).logits, atol=1e-5)


def test_encoded_examples_collate_and_train_on_every_backbone(backbone):
    """The training data path: chat examples of different image sizes -> encode -> collate -> a
    soft-gated AutoSelect step with a finite loss (labels only on the answers)."""
    from autoselect.data import collate, encode_example

    _, vlm, processor = backbone
    examples = [
        encode_example(
            processor,
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}],
            noise_images([size], seed=row),
        )
        for row, (q, size) in enumerate(zip(QUESTIONS, SIZES))
    ]
    batch = collate(examples, get_adapter(vlm).pad_token_id, padding_side="right")
    assert all((batch["labels"][row] != -100).sum() == (e["labels"] != -100).sum() for row, e in enumerate(examples))
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.scorer.parameters())


@pytest.mark.parametrize("pruner", ["random", "divprune", "fastv", "visionzip", "uniform"])
def test_baselines_run_or_refuse_by_name_on_every_backbone(backbone, pruner):
    """A baseline either prunes to exactly K per image or refuses the backbone with a clear error."""
    from autoselect.pruners import build_pruner

    name, vlm, processor = backbone
    batch = make_batch(processor)
    try:
        model = build_pruner(pruner, vlm, 0.5, **({"layer": 1} if pruner == "fastv" else {}))
        with torch.no_grad():
            model(**batch)
    except (ValueError, NotImplementedError) as error:
        assert name != "llava", f"{pruner} must work on LLaVA-1.5: {error}"
        assert any(word in str(error) for word in ("FastV", "attention", "grid")), str(error)
        return
    kept = model.last_selection.per_image()
    assert [len(k) for k in kept] == [max(1, round(0.5 * n)) for n in model.last_selection.counts()]


def test_pickled_weights_are_refused(tmp_path):
    """The shared loader reads safetensors only: a folder with just a pickled .bin is refused."""
    from safetensors.torch import load_file

    from mlops.backbone import load_vlm

    vlm, processor = TINY_BACKBONES["llava"](seed=0)
    vlm.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_vlm(str(tmp_path), "float32", device=torch.device("cpu"))


GATE_ATTENTION_REFUSED = {"llava_next": "placeholders", "gemma3": "causal"}  # newline slots; bidirectional images


def test_gate_attention_trains_on_the_inference_sequence_or_refuses_by_name(backbone):
    """At a near-zero temperature the attention-throttled training forward gives the hard top-K
    inference loss (original positions) on every family it supports."""
    name, vlm, processor = backbone
    batch = make_batch(processor)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]  # answer-like: text far from the image
    config = AutoSelectConfig(budget=0.5, training=TrainingOptions(gate_attention=True), position_policy="original",
                              temperature_start=1e-6, temperature_end=1e-6)
    model = AutoSelectModel.attach(vlm, config)
    with torch.no_grad():
        model.train()
        if name in GATE_ATTENTION_REFUSED:
            with pytest.raises(ValueError, match=GATE_ATTENTION_REFUSED[name]):
                model(**batch, labels=labels)
            return
        trained = float(model(**batch, labels=labels).loss)
        inferred = float(model.eval()(**batch, labels=labels).loss)
    assert trained == pytest.approx(inferred, abs=1e-4)


@pytest.mark.parametrize("name", sorted(set(TINY_BACKBONES) - set(GATE_ATTENTION_REFUSED)))
def test_straight_through_under_the_dpp_decode_trains_on_the_inference_sequence(name):
    """``training.straight_through`` with ``inference.decode: dpp`` keeps each image's DPP set in the
    training forward (images of different sizes, so ragged token counts, included): the training
    loss is the DPP inference loss, and every scorer logit still gets a gradient."""
    vlm, processor = TINY_BACKBONES[name](seed=0)
    batch = make_batch(processor)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]
    config = AutoSelectConfig(budget=0.5, training=TrainingOptions(gate_attention=True, straight_through=True, candidates=1.0),
                              position_policy="original", inference=InferenceOptions(decode="dpp", dpp_quality_scale=0.5))
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, config).train()
    trained = model(**batch, labels=labels).loss
    trained.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.scorer.parameters())
    assert any(bool((p.grad != 0).any()) for p in model.scorer.parameters())
    with torch.no_grad():
        inferred = float(model.eval()(**batch, labels=labels).loss)
    assert float(trained.detach()) == pytest.approx(inferred, abs=1e-4)


def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16(tmp_path, monkeypatch):
    """bf16 on a CPU without bf16 instructions is emulated (a matmul ~30x slower than float32 on an
    AVX2-only EPYC), so `auto` picks it only on GPUs and CPUs that list avx512_bf16 or amx_bf16."""
    from mlops import backbone

    monkeypatch.delenv(backbone.CPU_BF16_ENV, raising=False)  # the suite pins it (conftest); detect here
    avx2, amx = tmp_path / "avx2", tmp_path / "amx"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert not backbone.cpu_has_native_bf16(avx2) and backbone.cpu_has_native_bf16(amx)
    assert not backbone.cpu_has_native_bf16(tmp_path / "absent")
    native = backbone.cpu_has_native_bf16
    for cpuinfo, expected in ((avx2, torch.float32), (amx, torch.bfloat16)):
        with pytest.MonkeyPatch.context() as patch:  # undone per branch; the delenv above stays
            patch.setattr(backbone, "cpu_has_native_bf16", lambda c=cpuinfo: native(c))
            assert backbone.resolve_dtype("auto", torch.device("cpu")) == expected
    assert backbone.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert backbone.resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_cpu_bf16_override_pins_what_auto_assumes(tmp_path, monkeypatch):
    """AUTOSELECT_CPU_BF16 decides `auto` on CPU whatever /proc/cpuinfo says (both ways), and a
    value other than 0/1 is refused by name rather than read as either."""
    from mlops import backbone

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    monkeypatch.setenv(backbone.CPU_BF16_ENV, "0")
    assert not backbone.cpu_has_native_bf16(amx)
    assert backbone.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv(backbone.CPU_BF16_ENV, "1")
    assert backbone.cpu_has_native_bf16(avx2)
    assert backbone.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(backbone.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="AUTOSELECT_CPU_BF16 must be 0 or 1"):
        backbone.cpu_has_native_bf16(avx2)
