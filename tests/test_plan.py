"""`PrunedVLM.plan`: the adapter's (N_i, K_i) per image, before any forward pass, on every tiny family.

Each check compares the plan with a fact measured another way: the vision tower's output, the
processor's ``image_grid_thw``, the model's own image features, the selection the pruned forward
made, and the sequence length the language model was handed.
"""

from __future__ import annotations

import pytest
import torch

from autoselect import AutoSelectConfig, AutoSelectModel, ImagePlan, ScoreMass, pruned_length
from autoselect.testing.tiny_backbones import TINY_BACKBONES
from tests.support.inputs import noise_images

SIZES = [(32, 32), (24, 40)]  # (height, width): native-resolution backbones get different N per image


def encode(processor, sizes, rows_of_images=None, question="What is in the image?"):
    """One row per entry of ``rows_of_images`` (image counts per row; default one image per row)."""
    rows_of_images = rows_of_images or [1] * len(sizes)
    pictures, texts, start = [], [], 0
    for count in rows_of_images:
        content = [{"type": "image"}] * count + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        pictures.append(noise_images(sizes)[start:start + count])
        start += count
    return processor(images=pictures, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(params=sorted(TINY_BACKBONES))
def family(request):
    vlm, processor = TINY_BACKBONES[request.param](seed=0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).eval()
    return request.param, model, processor


def image_inputs(model, batch):
    return {k: batch[k] for k in model.adapter.image_input_names if k in batch}


def independent_counts(name, model, processor, batch) -> list[int]:
    """N per image, known without the plan's arithmetic."""
    vlm = model.vlm
    if name.startswith("qwen"):  # the processor's patch grid, merge_size^2 patches to a token
        merge = processor.image_processor.merge_size
        return (batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    if name == "llava_next":  # the model's own features (newlines included) less the newline rows
        with torch.no_grad():
            out = vlm.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        newline = vlm.model.image_newline
        return [len(f) - int((f == newline).all(-1).sum()) for f in features]
    with torch.no_grad():  # the vision tower's output
        return [len(t) for t in model.adapter.visual_tokens(**image_inputs(model, batch))]


def test_plan_counts_the_real_visual_tokens_and_keeps_what_the_forward_keeps(family):
    name, model, processor = family
    batch = encode(processor, SIZES)
    plan = model.plan(batch)  # the default budget, 0.5
    assert all(isinstance(p, ImagePlan) for p in plan)
    assert [p.image for p in plan] == list(range(len(plan)))
    assert [p.n for p in plan] == independent_counts(name, model, processor, batch)
    with torch.no_grad():
        model(**batch)
    selection = model.last_selection
    assert [p.n for p in plan] == selection.counts()
    assert [p.k for p in plan] == [len(i) for i in selection.per_image()]
    assert [p.k for p in model.plan(batch, 4)] == [4] * len(plan)


def test_usage_length_is_what_the_language_model_prefills(family):
    """One row, so no padding: the plan's pruned length is the sequence the decoder receives."""
    name, model, processor = family
    seen: list[int] = []
    decoder = model.vlm.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(int(kwargs["inputs_embeds"].shape[1])), with_kwargs=True
    )
    try:
        for budget in (0.25, 3):
            batch = encode(processor, SIZES[:1])
            seen.clear()
            with torch.no_grad():
                model(budget=budget, **batch)
            plan = model.plan(batch, budget)
            assert seen == [pruned_length(batch["input_ids"].shape[1], plan)], (name, budget, plan)
            assert seen[0] < batch["input_ids"].shape[1]
    finally:
        handle.remove()


def test_two_images_of_different_sizes_in_one_qwen_request_get_two_n():
    vlm, processor = TINY_BACKBONES["qwen2_5_vl"](seed=0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).eval()
    batch = encode(processor, [(32, 32), (48, 48)], rows_of_images=[2])
    plan = model.plan(batch)
    assert [p.n for p in plan] == (batch["image_grid_thw"].prod(-1) // 4).tolist() == [16, 36]
    assert [p.k for p in plan] == [8, 18]  # a ratio resolves on each image's own N
    seen: list[int] = []
    handle = vlm.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(int(kwargs["inputs_embeds"].shape[1])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    assert seen == [batch["input_ids"].shape[1] - (16 - 8) - (36 - 18)]


def test_llava_next_ratio_resolves_on_the_patch_tokens_not_the_newline_placeholders():
    vlm, processor = TINY_BACKBONES["llava_next"](seed=0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=0.5)).eval()
    batch = encode(processor, [(32, 32)])
    placeholders = int((batch["input_ids"] == model.adapter.image_token_id).sum())
    assert placeholders == 88  # 80 patch tokens and 8 row newlines
    assert model.plan(batch) == [ImagePlan(0, 80, 40)]
    assert model.plan(batch, 0.25) == [ImagePlan(0, 80, 20)]
    assert pruned_length(batch["input_ids"].shape[1], model.plan(batch, 0.25)) == batch["input_ids"].shape[1] - 60


def test_plan_refuses_what_cannot_apply_and_is_empty_without_images():
    vlm, processor = TINY_BACKBONES["llava"](seed=0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).eval()
    batch = encode(processor, [(32, 32)])
    with pytest.raises(ValueError, match="exceeds the 64 visual tokens"):
        model.plan(batch, 65)
    with pytest.raises(ValueError, match="ScoreMass"):
        model.plan(batch, ScoreMass(0.5))
    text_only = processor(text=["no image here"], return_tensors="pt")
    assert model.plan(dict(text_only)) == []
    assert pruned_length(10, []) == 10
    with pytest.raises(ValueError, match="2 kept counts for 1 images"):
        pruned_length(100, model.plan(batch), [1, 2])
