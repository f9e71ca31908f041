"""Training-free baselines on the tiny LLaVA: the shared contract, then each method's own rule."""

import pytest
import torch

from autoselect.backbones import VisionAttention, get_adapter
from autoselect.pruners import available_pruners, build_pruner
from autoselect.pruners.divprune import max_min_diverse
from autoselect.pruners.uniform import grid_indices
from autoselect.pruners.visionzip import zip_tokens
from autoselect.selection import gather_tokens
from autoselect.testing import build_tiny_llava
from tests.support.contract import check_generate_contract
from tests.support.inputs import PROMPTS, square_images

N, K = 64, 16  # 32 px images, patch 4, CLS dropped
LAYER = 2  # FastV's default; the tiny LLM gets 3 layers so layer 2 is a real cut
PRE_LLM = ["random", "uniform", "pooled", "visionzip", "divprune"]
ALL = PRE_LLM + ["fastv"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(text_layers=3, seed=0)


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    out = processor(images=square_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    assert (out["attention_mask"][:, 0] == 0).any(), "the tests need left padding"
    return out


def valid(batch) -> torch.Tensor:
    return batch["attention_mask"].bool()


# ---- the shared contract ---------------------------------------------------------------------
def test_registry_names_and_errors(tiny):
    vlm, _ = tiny
    assert available_pruners() == sorted(ALL)
    with pytest.raises(ValueError, match="AutoSelectModel.from_pretrained"):
        build_pruner("autoselect", vlm, K)
    with pytest.raises(ValueError, match="unknown pruner 'tome'; available: divprune, fastv"):
        build_pruner("tome", vlm, K)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 2\]"):
        build_pruner("fastv", vlm, K, layer=3)


@pytest.mark.parametrize("name", ALL)
def test_keeps_exactly_k_sorted_tokens_per_image(tiny, batch, name):
    vlm, _ = tiny
    pruner = build_pruner(name, vlm, K)
    projected, llm_outputs = [], []
    hooks = [
        vlm.model.multi_modal_projector.register_forward_hook(lambda _m, args, _o: projected.append(args[0].shape)),
        vlm.get_decoder().norm.register_forward_pre_hook(lambda _m, args: llm_outputs.append(args[0].shape)),
    ]
    with torch.no_grad():
        out = pruner(**batch)
    for hook in hooks:
        hook.remove()
    indices = pruner.last_selection.indices
    assert indices.shape == (2, K)
    assert torch.all(indices[:, 1:] > indices[:, :-1]) and indices.min() >= 0 and indices.max() < N
    pruned_length = batch["input_ids"].shape[1] - (N - K)
    assert out.logits.shape[1] == pruned_length
    assert llm_outputs == [(2, pruned_length, vlm.config.text_config.hidden_size)]  # the LLM's last layer's output
    assert projected[-1] == (2, N if name == "fastv" else K, 32)  # FastV prunes inside the LLM only


@pytest.mark.parametrize("name", ALL)
def test_generate_keeps_hf_contract(tiny, batch, name):
    """The caller's prompt, then the new tokens; each row's as alone (random draws differ per call)."""
    vlm, processor = tiny
    pruner = build_pruner(name, vlm, K)
    singles = [processor(images=[i], text=[p], return_tensors="pt") for i, p in zip(square_images(2), PROMPTS)]
    check_generate_contract(pruner, batch, [] if name == "random" else singles, max_new_tokens=3)
    assert len(pruner.last_selection.indices[0]) == K


@pytest.mark.parametrize("name", ALL)
def test_generate_k_equals_n_matches_unmodified_generate(tiny, batch, name):
    vlm, _ = tiny
    reference = vlm.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(build_pruner(name, vlm, N).generate(**batch, max_new_tokens=5, do_sample=False), reference)


@pytest.mark.parametrize("name", ALL)
def test_deterministic(tiny, batch, name):
    vlm, _ = tiny
    runs = []
    for _ in range(2):
        pruner = build_pruner(name, vlm, K, **({"seed": 3} if name == "random" else {}))
        with torch.no_grad():
            runs.append((pruner(**batch).logits, pruner.last_selection.indices))
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    if name == "random":
        other = build_pruner(name, vlm, K, seed=4)
        with torch.no_grad():
            other(**batch)
        assert not torch.equal(other.last_selection.indices, runs[0][1])


@pytest.mark.parametrize("name", ["uniform", "pooled", "visionzip", "divprune", "fastv"])  # random draws differ per call
def test_left_padded_batch_matches_each_sample_alone(tiny, batch, name):
    vlm, processor = tiny
    pruner = build_pruner(name, vlm, K)
    with torch.no_grad():
        batched = pruner(**batch).logits
        batched_indices = pruner.last_selection.indices
        for row, (image, prompt) in enumerate(zip(square_images(2), PROMPTS)):
            alone = pruner(**processor(images=[image], text=[prompt], return_tensors="pt")).logits
            assert torch.equal(pruner.last_selection.indices[0], batched_indices[row])
            assert torch.allclose(batched[row, -1], alone[0, -1], atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_k_equals_n_matches_unmodified_vlm(tiny, batch, name):
    vlm, _ = tiny
    ignored = (batch["input_ids"] == vlm.config.image_token_id) | ~valid(batch)
    labels = batch["input_ids"].masked_fill(ignored, -100)
    with torch.no_grad():
        reference = vlm(**batch, labels=labels)
        out = build_pruner(name, vlm, N)(**batch, labels=labels)
    assert out.logits.shape == reference.logits.shape
    assert torch.allclose(out.logits[valid(batch)], reference.logits[valid(batch)], atol=1e-5)
    assert torch.allclose(out.loss, reference.loss, atol=1e-6)


# ---- uniform ---------------------------------------------------------------------------------
def test_uniform_grid_is_strided_lattice_and_exact_for_every_k():
    expected = [(2 * i + 1) * 8 + 2 * j + 1 for i in range(4) for j in range(4)]  # stride 2, cell centres
    assert grid_indices(16, 8, 8).tolist() == expected
    for k in range(1, 65):
        idx = grid_indices(k, 8, 8)
        assert idx.numel() == k and torch.all(idx[1:] > idx[:-1]) and idx.max() < 64
    rows = grid_indices(8, 8, 8) // 8
    assert rows.unique().numel() > 1  # spread over rows, not the first 8 patches


# ---- pooled grid -----------------------------------------------------------------------------
def test_pooled_grid_is_average_pooling_for_square_k_and_covers_every_patch_for_any_k():
    from autoselect.pruners.pooled import PooledGrid, cell_assignment

    vlm, _ = build_tiny_llava(seed=0)
    tokens = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    selection = PooledGrid(vlm, 16).choose(tokens, 16, {})
    grid = tokens.transpose(1, 2).reshape(2, 32, 8, 8)
    expected = torch.nn.functional.adaptive_avg_pool2d(grid, 4).flatten(2).transpose(1, 2)  # row-major 4 x 4 blocks
    assert torch.allclose(selection.tokens, expected, atol=1e-6)
    assert torch.equal(selection.indices[0], grid_indices(16, 8, 8))  # each block's token in its centre slot
    for k in (1, 7, 28, 63):
        centres, cell = cell_assignment(k, 8, 8)
        sizes = torch.bincount(cell, minlength=k)
        assert centres.numel() == k and bool((sizes >= 1).all()) and int(sizes.sum()) == 64
        assert torch.equal(cell[centres], torch.arange(k))  # every centre pools its own patch


# ---- DivPrune --------------------------------------------------------------------------------
def official_divprune(features: torch.Tensor, k: int) -> list[int]:
    """The official loop (vbdi/divprune ``DivPrune``), one image at a time, as the reference."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    chosen: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(chosen)].min(dim=0).values
        chosen.append(int(torch.argmax(scores)))
    return sorted(chosen)


def test_divprune_matches_the_official_greedy_and_covers_clusters():
    features = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0))
    picked = max_min_diverse(features, 7)
    assert [row.tolist() for row in picked] == [official_divprune(f, 7) for f in features]
    centres = torch.eye(3)
    noise = 0.01 * torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    clusters = centres.repeat_interleave(4, dim=0) + noise
    assert sorted((max_min_diverse(clusters[None], 3)[0] // 4).tolist()) == [0, 1, 2]  # one per cluster
    duplicates = centres.repeat(4, 1)[None]  # every token has exact copies: K = N must still be a permutation
    assert max_min_diverse(duplicates, 12)[0].tolist() == list(range(12))


# ---- VisionZip -------------------------------------------------------------------------------
def test_visionzip_keeps_dominant_and_merges_the_rest_into_contextual_tokens():
    tokens = torch.arange(16.0).view(1, 8, 2)
    cls_attention = torch.tensor([[0.01, 0.02, 0.9, 0.03, 0.04, 0.8, 0.05, 0.06]])
    a, b = [1.0, 0.0], [0.0, 1.0]
    keys = torch.tensor([[a, a, b, a, b, a, b, b]])  # rest = 0 1 3 4 6 7; targets (stride 3) = 0, 4
    selection = zip_tokens(VisionAttention(tokens, cls_attention, keys), k=4, contextual=2)
    assert selection.indices.tolist() == [[0, 2, 4, 5]]
    t = tokens[0]
    expected = torch.stack([t[0] + (t[1] + t[3]) / 2, t[2], t[4] + (t[6] + t[7]) / 2, t[5]])
    assert torch.equal(selection.tokens[0], expected)


def test_vision_attention_equals_eager_cls_attention():
    vlm, _ = build_tiny_llava(seed=1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seen = get_adapter(vlm).vision_attention(pixel_values=pixel_values)  # under sdpa
        vlm.set_attn_implementation("eager")
        eager = vlm.model.vision_tower(pixel_values, output_attentions=True).attentions[-2]  # the feature layer
    assert seen.tokens.shape == (2, N, 32) and seen.keys.shape == (2, N, 8)
    assert torch.allclose(seen.cls_attention, eager[:, :, 0, 1:].mean(1), atol=1e-6)


def test_visionzip_sends_k_tokens_some_merged(tiny, batch):
    vlm, _ = tiny
    pruner = build_pruner("visionzip", vlm, K)  # 16 = 13 dominant + 3 contextual
    with torch.no_grad():
        pruner(**batch)
        tokens = pruner.adapter.visual_tokens(pixel_values=batch["pixel_values"])
    selection = pruner.last_selection
    plain = (selection.tokens == gather_tokens(tokens, selection.indices)).all(-1)
    assert plain.sum(-1).tolist() == [13, 13]  # dominant tokens are sent as they are, contextual ones are new


# ---- FastV -----------------------------------------------------------------------------------
def test_fastv_ranks_by_last_token_attention_of_layer_before_the_cut():
    vlm, processor = build_tiny_llava(text_layers=3, seed=0)
    batch = processor(images=square_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    fastv = build_pruner("fastv", vlm, K)
    with torch.no_grad():
        fastv(**batch)  # under sdpa: no attention map exists
        vlm.set_attn_implementation("eager")
        attentions = vlm(**batch, output_attentions=True).attentions[LAYER - 1]
    rows, cols = (batch["input_ids"] == vlm.config.image_token_id).nonzero(as_tuple=True)
    expected = attentions[:, :, -1].mean(1)[rows, cols].view(2, N)  # left padding: the last column
    assert torch.allclose(fastv.last_selection.scores, expected, atol=1e-6)
    assert torch.equal(fastv.last_selection.indices, expected.topk(K).indices.sort().values)


def masked_reference(vlm, batch, sequences: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Logits of the unmodified VLM, no cache, where layers >= LAYER cannot attend to ``dropped`` columns:
    what FastV's in-place cut computes for every token it keeps."""
    length = sequences.shape[1]
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, length - batch["input_ids"].shape[1]), value=1)
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None] & ~dropped[:, None]
    allowed |= torch.eye(length, dtype=torch.bool)  # no empty rows (dropped/pad queries are never read)
    cut = lambda _m, args, kwargs: (args, {**kwargs, "attention_mask": allowed[:, None]})  # noqa: E731
    hooks = [layer.register_forward_pre_hook(cut, with_kwargs=True) for layer in vlm.get_decoder().layers[LAYER:]]
    try:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded batch
        inputs = {"input_ids": sequences, "pixel_values": batch["pixel_values"], "attention_mask": mask}
        return vlm(**inputs, position_ids=positions).logits
    finally:
        for hook in hooks:
            hook.remove()


def test_fastv_prefill_and_cached_decode_equal_masking_the_dropped_tokens(tiny, batch):
    vlm, _ = tiny
    fastv = build_pruner("fastv", vlm, K)
    out = fastv.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    selection, columns = fastv.last_selection, fastv.last_columns
    prompt = batch["input_ids"].shape[1]
    assert out.sequences.shape == (2, prompt + 4) and columns.shape == (2, prompt - (N - K))
    rows, cols = (batch["input_ids"] == vlm.config.image_token_id).nonzero(as_tuple=True)
    dropped = torch.zeros(out.sequences.shape, dtype=torch.bool)
    dropped[rows, cols] = True
    dropped[rows.view(2, N).gather(1, selection.indices), cols.view(2, N).gather(1, selection.indices)] = False
    with torch.no_grad():
        reference = masked_reference(vlm, batch, out.sequences, dropped)
    for step, scores in enumerate(out.logits):  # step 0 is the pruned prefill, then cached decode steps
        assert torch.allclose(scores, reference[:, prompt - 1 + step], atol=1e-4), f"step {step}"


def test_fastv_ranked_at_the_prompts_end_scores_an_answer_as_generating_it_does(tiny, batch):
    """One forward of prompt + answer with ``rank_columns`` at the prompt's last token gives the
    logits (and the selection) of `generate` producing that answer; `prefill` then `continuing`
    gives them too, each prompt continued twice on its copied cache."""
    vlm, _ = tiny
    fastv = build_pruner("fastv", vlm, K)
    out = fastv.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = torch.stack(out.logits, dim=1)  # [2, 4, vocab]: at the prompt's last token, then 3 steps
    chosen = fastv.last_selection.indices
    prompt = batch["input_ids"].shape[1]
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, 4), value=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded batch
    inputs = {"input_ids": out.sequences, "attention_mask": mask, "pixel_values": batch["pixel_values"]}
    end = torch.full((2,), prompt - 1)
    with torch.no_grad():
        whole = fastv(**inputs, position_ids=positions, rank_columns=end).logits
        assert torch.equal(fastv.last_selection.indices, chosen)
        assert torch.allclose(whole[:, -5:-1], generated, atol=1e-4)
        last = fastv(**inputs, position_ids=positions).logits  # ranked at its own last token: another cut
    assert not torch.equal(fastv.last_selection.indices, chosen)
    assert not torch.allclose(last[:, -5:-1], generated, atol=1e-4)

    with torch.no_grad():
        head = fastv.prefill(**batch, position_ids=positions[:, :prompt], logits_to_keep=1)
        assert torch.equal(fastv.last_selection.indices, chosen)
        head.past_key_values.batch_repeat_interleave(2)
        with fastv.continuing(2):
            tail = vlm(input_ids=out.sequences[:, prompt:].repeat_interleave(2, dim=0), attention_mask=mask.repeat_interleave(2, dim=0),
                       position_ids=positions[:, prompt:].repeat_interleave(2, dim=0), past_key_values=head.past_key_values).logits
    assert torch.allclose(head.logits[:, -1], generated[:, 0], atol=1e-4)
    assert torch.allclose(tail[:, :3], generated[:, 1:].repeat_interleave(2, dim=0), atol=1e-4)
    with pytest.raises(RuntimeError, match="needs a prefill first"):
        with fastv.continuing(2):
            pass
    on_padding = end.clone()
    on_padding[int((batch["attention_mask"][:, 0] == 0).nonzero()[0, 0])] = 0  # the left-padded row's column 0
    with pytest.raises(ValueError, match="rank columns"):
        fastv(**batch, rank_columns=on_padding)


def test_fastv_rows_with_different_image_counts_are_repadded(tiny):
    vlm, processor = tiny
    prompts = ["USER: <image><image>\nCompare them. ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
    batch = processor(images=square_images(3), text=prompts, return_tensors="pt", padding=True)
    fastv = build_pruner("fastv", vlm, K)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = fastv(**batch, position_ids=positions).logits
    rows, cols = (batch["input_ids"] == vlm.config.image_token_id).nonzero(as_tuple=True)
    dropped = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    dropped[rows, cols] = True
    keep = fastv.last_selection.indices
    dropped[rows.view(3, N).gather(1, keep), cols.view(3, N).gather(1, keep)] = False
    with torch.no_grad():
        reference = masked_reference(vlm, batch, batch["input_ids"], dropped)
    columns = fastv.last_columns
    lengths = [int(batch["attention_mask"][0].sum()) - 2 * (N - K), int(batch["attention_mask"][1].sum()) - (N - K)]
    assert logits.shape[1] == max(lengths)
    kept = batch["attention_mask"].gather(1, columns).bool()
    assert kept.sum(-1).tolist() == lengths
    assert torch.allclose(logits[kept], reference.gather(1, columns[..., None].expand_as(logits))[kept], atol=1e-4)
