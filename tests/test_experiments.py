"""The measures behind the session-20 and -21 scorer checks (experiments/scorer_box_hits.py,
experiments/scorer_dtype_agreement.py, experiments/training_signal.py): the numbers
docs/scenes.md reports come from these."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoselect.pruners.uniform import grid_indices
from tests.support.scripts import load_script


def load(name: str):
    return load_script(f"experiments/{name}.py")


def test_box_auc_is_the_chance_a_box_patch_outscores_one_outside():
    auc = load("scorer_box_hits").auc
    box = torch.tensor([True, True, False, False, False])
    assert auc(torch.tensor([5.0, 4.0, 1.0, 2.0, 3.0]), box) == 1.0  # every box patch above every other
    assert auc(torch.tensor([0.0, -1.0, 1.0, 2.0, 3.0]), box) == 0.0
    assert auc(torch.tensor([2.5, 1.5, 1.0, 2.0, 3.0]), box) == 0.5  # 3 of 6 pairs won
    assert auc(torch.ones(5), box) == 0.5  # ties count half: logits that ignore the box
    assert math.isnan(auc(torch.ones(5), torch.zeros(5, dtype=torch.bool)))  # no box patch: undefined, not 0


def test_kept_patch_regions_split_the_grid_into_garment_ring_drawings_and_the_rest():
    regions = load("scorer_box_hits").regions
    garment = torch.zeros(4, 4, dtype=torch.bool)
    garment[0, 0] = True
    drawings = torch.zeros(4, 4, dtype=torch.bool)
    drawings[:, 1] = True  # a column of drawing that crosses the garment's ring
    parts = regions(garment.reshape(-1), drawings.reshape(-1), 4)
    assert list(parts) == ["garment", "ring", "drawings", "elsewhere"]
    assert sum(mask.long() for mask in parts.values()).eq(1).all()  # every patch in exactly one region
    assert parts["ring"].reshape(4, 4).nonzero().tolist() == [[0, 1], [1, 0], [1, 1]]  # the ring wins over a drawing
    assert parts["drawings"].reshape(4, 4).nonzero().tolist() == [[2, 1], [3, 1]]


def test_dtype_agreement_counts_shared_kept_tokens_per_image():
    agreement = load("scorer_dtype_agreement").agreement
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = torch.tensor([[3, 2, 1, 0], [4, 5, 8, 9]])  # the same set in another order; half shared
    shared, identical = agreement(a, b)
    assert shared == [1.0, 0.5]
    assert identical == [True, False]


def test_items_oracle_boxes_every_item_and_can_split_k_evenly():
    items = load("scenes_heldout_copy").items_boxes
    record = {"task": "scenes_garment", "boxes": [[0.0, 0.0, 0.25, 0.25]],
              "items": [{"box_fraction": [0.0, 0.0, 0.25, 0.25]}, {"box_fraction": [0.5, 0.5, 1.0, 1.0]}]}
    assert items(record)["boxes"] == [[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]]
    # 32 tokens, 2 items, a 16 x 16 grid: a 4-patch (0.25) square each, clipped to its item
    assert items(record, equal_share=32, grid=16)["boxes"] == [[0.0, 0.0, 0.25, 0.25], [0.625, 0.625, 0.875, 0.875]]
    caption = {"task": "scenes_caption", "items": record["items"]}
    assert items(caption) is caption  # only garment questions change


def test_scenes_heldout_copy_keeps_questions_by_item_count_and_links_the_rest(tmp_path, capsys):
    copy = load("scenes_heldout_copy")
    source = tmp_path / "corpora"
    (source / "images").mkdir(parents=True)
    item = {"box_fraction": [0.0, 0.0, 0.5, 0.5]}
    records = [{"id": "q1", "task": "scenes_garment", "boxes": [[0, 0, 0.5, 0.5]], "items": [item]},
               {"id": "q2", "task": "scenes_garment", "boxes": [[0, 0, 0.5, 0.5]], "items": [item, item]},
               {"id": "c2", "task": "scenes_caption", "items": [item, item, item]}]
    (source / "scenes.heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "two"
    assert copy.main(["--corpora", str(source), "--out", str(out), "--items", "2", "--box-items"]) == 0
    written = [json.loads(line) for line in (out / "scenes.heldout.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["q2", "c2"]  # the one-item question dropped, captions untouched
    assert written[0]["boxes"] == [item["box_fraction"]] * 2
    assert (out / "images").is_symlink()
    assert "1 garment questions kept, 1 dropped" in capsys.readouterr().out


SCENE = {"items": [{"kind": "garment", "box_fraction": [0.0, 0.0, 0.25, 0.25]},
                   {"kind": "clipart", "box_fraction": [0.5, 0.5, 1.0, 1.0]}]}


def test_training_signal_regions_are_the_garment_and_the_drawings_patches():
    masks = load("training_signal").region_masks(SCENE, 4)  # a 4 x 4 grid: the garment is patch 0
    assert masks["garment"].nonzero().flatten().tolist() == [0]
    assert masks["drawings"].nonzero().flatten().tolist() == [10, 11, 14, 15]


def test_equal_share_order_takes_the_items_in_turn_then_the_background():
    order = torch.argsort(load("training_signal").equal_share_order(SCENE, 4), descending=True, stable=True).tolist()
    assert order[0] == 0 and order[1] in (10, 11, 14, 15)  # one patch of each item before a second of either
    assert set(order[:5]) == {0, 10, 11, 14, 15}  # then the rest of the drawing, then the background
    signal = load("training_signal")
    background = signal.rule_scores("background only", SCENE, signal.region_masks(SCENE, 4), 4, 2, torch.Generator().manual_seed(0))
    assert set(torch.topk(background, 11).indices.tolist()).isdisjoint({0, 10, 11, 14, 15})


class WordTokenizer:
    """One id per word, a leading space makes no difference: enough to place a name."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [{"a": 1, "shirt": 4, "on": 5, "x": 9}[w] for w in text.split()]


def test_name_labels_keep_the_garment_name_inside_the_answer_only():
    name_labels = load("training_signal").name_labels
    batch = {"input_ids": torch.tensor([[4, 7, 1, 4, 5], [4, 7, 1, 4, 5]]),
             "labels": torch.tensor([[-100, -100, 1, 4, 5], [-100, -100, 1, 4, 5]])}
    labels = name_labels(batch, WordTokenizer(), ["shirt", "x"])
    assert labels[0].tolist() == [-100, -100, -100, 4, -100]  # the answer's "shirt", not the prompt's
    assert labels[1].tolist() == [-100] * 5  # a name the caption lacks: no labels, not a wrong span


def test_report_subset_reads_a_report_again_without_the_garments_an_earlier_val_showed(tmp_path, capsys):
    """experiments/report_subset.py: the questions whose garment an earlier export's val scenes
    showed are left out, counted, and every score and paired difference is recomputed on the rest."""
    from pipelines.evaluation.tasks.base import split_of

    subset = load("report_subset")

    def ids_in(split: str, prefix: str, n: int) -> list[str]:
        return [i for i in (f"{prefix}-{k}" for k in range(200)) if split_of(i) == split][:n]

    def export(folder, ids, sources):
        folder.mkdir()
        records = [{"id": i, "task": "scenes_garment", "items": [{"kind": "garment", "source": s},
                                                                 {"kind": "clipart", "source": "drawing"}]}
                   for i, s in zip(ids, sources)]
        (folder / "scenes.heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    old_val, old_test = ids_in("val", "old", 2), ids_in("test", "old", 1)
    export(tmp_path / "old", old_val + old_test, ["g1", "g2", "g3"])  # g3: shown in the old test half only
    new = ids_in("test", "new", 4)
    export(tmp_path / "new", new, ["g1", "g3", "g4", "g5"])
    report = {"split": "test", "per_example_ids": {"scenes_garment": new},
              "per_example": {"scenes_garment": {"full": [1.0, 1.0, 1.0, 0.0], "autoselect@28": [0.0, 1.0, 1.0, 1.0],
                                                 "random@28": [1.0, 0.0, 0.0, 0.0]}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "subset.json"
    subset.main([str(tmp_path / "report.json"), "--corpora", str(tmp_path / "new"),
                 "--drop-garments-shown-in", str(tmp_path / "old"), "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["dropped"] == 1 and got["all"]["n"] == 4 and got["not_shown"]["n"] == 3  # only g1 (old val)
    assert got["all"]["methods"]["autoselect@28"]["score"] == 0.75
    assert got["not_shown"]["methods"]["autoselect@28"]["score"] == 1.0
    assert got["not_shown"]["paired"]["autoselect@28"]["random@28"]["difference"] == 1.0
    assert got["all"]["paired"]["autoselect@28"]["random@28"]["difference"] == 0.5
    assert "3 whose garment" in capsys.readouterr().out
    del report["per_example_ids"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="no per_example_ids"):
        subset.main([str(tmp_path / "report.json"), "--corpora", str(tmp_path / "new"),
                     "--drop-garments-shown-in", str(tmp_path / "old")])


def test_mix_annotations_weights_a_source_by_drawing_n_of_its_task_and_refuses_a_bad_n(tmp_path, capsys):
    mix = load("mix_annotations")
    scenes, fmnist = tmp_path / "scenes.jsonl", tmp_path / "fmnist.jsonl"
    scenes.write_text("".join(json.dumps({"id": f"{task}{i}", "task": task}) + "\n"
                              for task in ("scenes_garment", "scenes_caption") for i in range(10)))
    fmnist.write_text("".join(json.dumps({"id": f"f{i}", "task": "fmnist_class"}) + "\n" for i in range(10)))
    out = tmp_path / "mix.jsonl"
    specs = [f"{scenes}:scenes_garment", f"{scenes}:scenes_caption:3", f"{fmnist}:fmnist_class:4"]
    assert mix.main(["--out", str(out), "--seed", "0", *specs]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = [r["task"] for r in rows]
    assert (tasks.count("scenes_garment"), tasks.count("scenes_caption"), tasks.count("fmnist_class")) == (10, 3, 4)
    assert len({r["id"] for r in rows}) == 17  # drawn without repeats
    assert tasks[:10] != ["scenes_garment"] * 10  # shuffled together, not one source after the other
    first = out.read_text()
    assert mix.main(["--out", str(out), "--seed", "0", *specs]) == 0 and out.read_text() == first  # same seed, same mix
    for bad in ("0", "11", "x"):
        with pytest.raises(SystemExit, match="N must be a whole number from 1 to 10"):
            mix.main(["--out", str(out), f"{fmnist}:fmnist_class:{bad}"])


def test_logit_shape_reads_ranks_and_the_per_image_drop_to_the_kth():
    shape = load("scorer_logit_shape").shape
    plateau = torch.tensor([[3.0, 2.9, 2.8, 2.7] + [0.0] * 96])  # four near-equal tokens on top
    peak = torch.tensor([[9.0, 5.0, 1.0, 0.5] + [0.0] * 96])  # one token standing out
    cell = shape(torch.cat([plateau, peak]), budgets=[4])
    assert cell["n"] == 2
    assert cell["mean_z_at_rank"]["1"] == 6.0 and cell["mean_z_at_rank"]["5"] == 0.0  # mean of the two images
    drops = cell["drop_z1_minus_zK_quantiles"]["K=4"]
    assert drops["0.1"] == pytest.approx(0.3 + 0.1 * 8.2, abs=1e-3)  # 0.3 (plateau) .. 8.5 (peak), linear
    assert drops["0.5"] == pytest.approx(4.4, abs=1e-3)
    assert shape(torch.cat([plateau, peak]).double(), budgets=[4]) == cell  # float64, as standardized_logits gives
    with pytest.raises(ValueError, match=r"budgets \[101\] are not between 1 and the 100 tokens"):
        shape(plateau, budgets=[101])


def test_decode_sets_parses_variants_and_measures_change_and_coverage():
    script = load("decode_sets")
    from autoselect.config import InferenceOptions
    saved = InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5)
    name, options = script.parse_variant("E2=dpp_head_quality_scale=2,dpp_share=0.25", saved)
    assert name == "E2" and (options.dpp_head_quality_scale, options.dpp_share, options.dpp_quality_scale) == (2.0, 0.25, 0.5)
    assert script.parse_variant("C=dpp_head_quality_scale=null", options)[1] == InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5, dpp_share=0.25)
    with pytest.raises(ValueError, match=r"--variant E: unknown key\(s\) \['head'\]"):
        script.parse_variant("E=head=2", saved)
    with pytest.raises(ValueError, match="--variant E.dpp_share: expected float, got 'wide'"):
        script.parse_variant("E=dpp_share=wide", saved)
    with pytest.raises(ValueError, match="expected NAME=KEY=VALUE"):
        script.parse_variant("E2", saved)
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert script.coverage(tokens, torch.tensor([[0, 2]])).tolist() == [1.0]  # every token has a copy kept
    assert script.coverage(tokens, torch.tensor([[0, 1]])).tolist() == [0.5]  # the two orthogonal ones are not covered


def test_reach_is_the_mean_grid_distance_to_the_nearest_kept_patch():
    reach = load("decode_sets").reach
    assert reach(torch.tensor([[0, 1, 2, 3]]), side=2).tolist() == [0.0]  # all kept
    assert reach(torch.tensor([[0], [3]]), side=2).tolist() == pytest.approx([(0 + 1 + 1 + 2 ** 0.5) / 4] * 2)  # one corner


def test_dark_patches_are_the_near_black_cells_of_the_patch_grid():
    import numpy as np
    from PIL import Image
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[8:24, 8:24] = 200  # a centered bright square on black: the inner 2 x 2 of a 4 x 4 grid
    dark = load("decode_sets").dark_patches(Image.fromarray(pixels).convert("RGB"), side=4)
    assert dark.reshape(4, 4).tolist() == [[True] * 4, [True, False, False, True], [True, False, False, True], [True] * 4]


def test_decode_sets_measures_a_tiny_models_batches_as_one_pass_would():
    """`scorer_tasks.scored_batches` gives every example once, in batches, with the scorer's logits
    on the vision tower's tokens; `measure` over it finds the saved decode unchanged against itself
    and a plain top-K variant changed where the decodes differ, and reads boxes where examples have them."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from autoselect.config import AutoSelectConfig, InferenceOptions
    from autoselect.model import AutoSelectModel
    from autoselect.testing import build_tiny_llava

    script, tasks = load("decode_sets"), load("scorer_tasks")
    vlm, processor = build_tiny_llava(seed=0)
    torch.manual_seed(0)
    saved = InferenceOptions(decode="dpp", dpp_quality_scale=0.5)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=saved)).eval()
    rng = np.random.default_rng(0)
    examples = [SimpleNamespace(image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                                boxes=[[0.0, 0.0, 0.5, 0.5]] if i % 2 else []) for i in range(5)]
    batches = list(tasks.scored_batches(model, processor, examples, batch_size=2))
    assert [len(b) for b, _, _ in batches] == [2, 2, 1]
    tokens, logits = torch.cat([t for _, t, _ in batches]), torch.cat([s for _, _, s in batches])
    with torch.no_grad():
        pixels = processor.image_processor([e.image for e in examples], return_tensors="pt")["pixel_values"]
        alone = model.visual_tokens(pixel_values=pixels)
    assert torch.allclose(tokens, alone, atol=1e-5) and torch.allclose(logits, model.scorer(alone), atol=1e-5)
    cells = script.measure(model, processor, examples, {"saved": saved, "topk": InferenceOptions()}, k=4, batch_size=2)
    assert cells["saved"]["changed"]["mean"] == 0.0 and cells["saved"]["swapped"]["mean"] == 0.0
    differ = [not torch.equal(a, b) for a, b in zip(script.kept_indices(logits, tokens, 4, saved), script.kept_indices(logits, tokens, 4, InferenceOptions()))]
    assert cells["topk"]["changed"]["mean"] == round(sum(differ) / 5, 4) and any(differ)
    assert set(cells["saved"]) == {"changed", "swapped", "coverage", "reach", "dark_kept", "box_kept"}  # two of the five carry a box
    assert cells["uniform"]["dark_kept"]["mean"] == 0.0  # random pixels: no near-black patch
    assert 0 < cells["saved"]["coverage"]["mean"] <= 1
    # another scorer over the same tokens, read with its own saved decode
    torch.manual_seed(1)
    other = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=saved)).eval()
    compared = script.measure(model, processor, examples, {"saved": saved}, k=4, batch_size=2, others={"itself": model, "other": other})
    assert compared["itself"]["changed"]["mean"] == 0.0 and compared["itself"]["box_kept"] == compared["saved"]["box_kept"]
    with torch.no_grad():
        moved = [not torch.equal(a, b) for a, b in zip(model.decode(logits, tokens, 4), other.decode(other.scorer(tokens), tokens, 4))]
    assert compared["other"]["changed"]["mean"] == round(sum(moved) / 5, 4) and any(moved)


def test_fixed_selections_outline_rule_finds_the_edge_and_the_lattice_rule_keeps_uniforms_patches():
    fixed = load_script("experiments/fixed_selections.py")
    pixels = torch.zeros(1, 3, 8, 8)
    pixels[..., :, 3:] = 1.0  # a vertical edge inside the 2nd column of 2x2-pixel patches (a 4x4 grid)
    tokens, generator = torch.zeros(1, 16, 4), torch.Generator()
    sharp = fixed.patch_sharpness(tokens, {"pixel_values": pixels}, generator).view(4, 4)
    assert torch.allclose(sharp[:, 1], torch.full((4,), 0.5)) and sharp[:, [0, 2, 3]].abs().max() < 1e-6
    kept = fixed.lattice(4)(tokens, {"pixel_values": pixels}, generator)
    assert torch.equal(kept.nonzero()[:, 1], grid_indices(4, 4, 4))


def test_set_level_heads_are_plackett_luce_draws_with_their_exact_log_probability():
    """`set_level_finetune.sample_heads`: distinct tokens per draw, each draw's log-probability the
    Plackett-Luce product (checked by hand), differentiable in the logits; the leave-one-out
    baseline is the mean of the other samples."""
    script = load("set_level_finetune")
    z = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]], requires_grad=True)
    heads, log_prob = script.sample_heads(z, 2, 6, torch.Generator().manual_seed(0))
    assert heads.shape == (1, 6, 2) and log_prob.shape == (1, 6)
    weights = z.detach()[0].exp()
    for (a, b), value in zip(heads[0].tolist(), log_prob[0].tolist()):
        assert a != b
        by_hand = math.log(weights[a] / weights.sum()) + math.log(weights[b] / (weights.sum() - weights[a]))
        assert value == pytest.approx(by_hand, abs=1e-5)
    log_prob.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # the most likely token leads most draws of many
    many, _ = script.sample_heads(z.detach(), 1, 2000, torch.Generator().manual_seed(1))
    share = float((many[0, :, 0] == 4).float().mean())
    assert share == pytest.approx(float(weights[4] / weights.sum()), abs=0.04)
    costs = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(script.leave_one_out(costs), torch.tensor([[-1.5, 0.0, 1.5]]))


def test_set_level_costs_read_each_sampled_set_as_the_evaluation_does():
    """`set_costs` reuses the batch's visual tokens for every sampled set: each set's cost equals
    the evaluation's reading of that set with the vision tower run on the images, and a set
    completed by `complete_sets` keeps its head and K distinct tokens."""
    from autoselect.data import collate, encode_example
    from autoselect.testing import build_tiny_llava
    from autoselect.testing.synthetic import COLOURS, marker_image, messages
    from pipelines.evaluation.methods import PreLLM

    import numpy as np

    script, signal = load("set_level_finetune"), load("training_signal")
    vlm, processor = build_tiny_llava(seed=0)
    rng = np.random.default_rng(0)
    colours = list(COLOURS)[:2]
    batch = collate([encode_example(processor, messages(c), [marker_image(rng, c)[0]]) for c in colours],
                    processor.tokenizer.pad_token_id, padding_side="right")
    pruner = script.SetPruner(vlm, 6, position_policy="repack")
    with torch.no_grad():
        tokens = pruner.adapter.visual_tokens(pixel_values=batch["pixel_values"])
    tokens = torch.stack(tokens) if isinstance(tokens, list) else tokens
    scores = torch.randn(tokens.shape[:2], generator=torch.Generator().manual_seed(0))
    heads, _ = script.sample_heads(scores, 3, 2, torch.Generator().manual_seed(0))
    kept = script.complete_sets(scores, tokens, heads, 6, 0.5)
    assert kept.shape == (4, 6) and all(len(set(row)) == 6 for row in kept.tolist())
    assert all(set(h) <= set(row) for h, row in zip(heads.reshape(4, 3).tolist(), kept.tolist()))
    costs = script.set_costs(PreLLM("set", None, 6, pruner), pruner, batch, tokens, kept, 2, pruner.adapter.image_token_id)
    reference = signal.RankPruner(vlm, 6, position_policy="repack")  # runs the vision tower itself
    for sample in range(2):
        rows = kept.view(2, 2, 6)[:, sample]
        reference.scores = torch.zeros(tokens.shape[:2]).scatter_(1, rows, 1.0)
        sums, counts = signal.row_nll(PreLLM("ref", None, 6, reference), dict(batch), pruner.adapter.image_token_id)
        assert torch.allclose(costs[:, sample], (sums / counts).float(), atol=1e-5)
