"""``inference.decode="dpp"``: greedy DPP-MAP over the scorer's logits (quality) and the visual
features' cosine kernel (diversity), against the top-K and a naive log-det reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from autoselect import AutoSelectConfig, AutoSelectModel, ConfigError, InferenceOptions, OptionDependencyError, ScoreMass
from autoselect.model import load_scorer
from autoselect.selection import DPP_EPS, dpp_indices, dpp_ranking, standardized_logits, topk_dpp_indices, topk_indices
from autoselect.testing import build_tiny_llava


def naive_greedy(scores: torch.Tensor, features: torch.Tensor, k: int, scale: float,
                 start: tuple[int, ...] = (), skip: tuple[int, ...] = ()) -> list[int]:
    """Greedy log-det maximiser of ``L = diag(q) S diag(q)`` for one image, by brute force: each step
    adds the token whose inclusion gives the largest ``logdet(L_Y)`` (in pick order), from the
    picks ``start`` on, never picking ``skip``."""
    z = (scores.double() - scores.double().mean()) / scores.double().std(unbiased=False)
    unit = F.normalize(features.double(), dim=-1)
    q = torch.exp(scale * z)
    kernel = q[:, None] * (unit @ unit.T) * q[None, :]
    chosen: list[int] = list(start)
    for _ in range(k - len(start)):
        gains = {i: torch.logdet(kernel[chosen + [i]][:, chosen + [i]]) for i in range(len(scores)) if i not in chosen + list(skip)}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    return chosen


def test_exactly_k_unique_sorted_and_deterministic():
    torch.manual_seed(0)
    scores, features = torch.randn(3, 40), torch.randn(3, 40, 16)
    first = dpp_indices(scores, features, 10)
    assert first.shape == (3, 10) and first.dtype == torch.long
    assert torch.all(first[:, 1:] > first[:, :-1])  # unique and ascending
    assert torch.equal(dpp_indices(scores.clone(), features.clone(), 10), first)


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_orthogonal_features_give_the_top_k(scale):
    torch.manual_seed(1)
    scores = torch.randn(2, 12)
    features = torch.eye(12).expand(2, 12, 12) * 3.0  # S = identity, whatever the norms
    for k in (1, 5, 11):
        assert torch.equal(dpp_indices(scores, features, k, scale), topk_indices(scores, k))


def test_a_duplicate_of_the_best_token_is_skipped_for_the_next_distinct_one():
    scores = torch.tensor([[5.0, 4.9, 3.0, 1.0, 0.5, 0.0]])
    features = torch.eye(6)[None].clone()
    features[0, 1] = features[0, 0]  # tokens 0 and 1 (the two highest logits) are the same vector
    assert topk_indices(scores, 2).tolist() == [[0, 1]]
    assert dpp_indices(scores, features, 2).tolist() == [[0, 2]]
    assert dpp_indices(scores, features, 3).tolist() == [[0, 2, 3]]


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_matches_a_naive_log_det_greedy(scale):
    generator = torch.Generator().manual_seed(2)
    scores, features = torch.randn(12, generator=generator), torch.randn(12, 16, generator=generator)
    reference = naive_greedy(scores, features, 6, scale)
    assert dpp_indices(scores[None], features[None], 6, scale)[0].tolist() == sorted(reference)


def test_breakdown_fills_with_the_highest_logits_left():
    """Features of rank 2: after two picks every other token lies in their span, so the remaining
    K - 2 are the highest-scored tokens not yet kept."""
    generator = torch.Generator().manual_seed(3)
    scores, features = torch.randn(10, generator=generator), torch.randn(10, 2, generator=generator)
    first_two = naive_greedy(scores, features, 2, 1.0)
    rest = [i for i in scores.argsort(descending=True).tolist() if i not in first_two][:3]
    assert dpp_indices(scores[None], features[None], 5)[0].tolist() == sorted(first_two + rest)
    assert DPP_EPS < 1e-6


def test_k_equal_to_n_keeps_all_and_bad_k_is_refused():
    scores, features = torch.randn(2, 7), torch.randn(2, 7, 3)
    assert torch.equal(dpp_indices(scores, features, 7), torch.arange(7).expand(2, 7))
    for k in (0, 8):
        with pytest.raises(ValueError, match="between 1 and the 7 visual tokens"):
            dpp_indices(scores, features, k)
    with pytest.raises(ValueError, match="do not match"):
        dpp_indices(scores, features[:, :6], 3)


def test_a_batch_decodes_each_image_as_alone():
    torch.manual_seed(4)
    scores, features = torch.randn(4, 30), torch.randn(4, 30, 6)  # rank 6 < K = 9: every row breaks down
    batched = dpp_indices(scores, features, 9, 0.7)
    for b in range(4):
        assert torch.equal(batched[b], dpp_indices(scores[b:b + 1], features[b:b + 1], 9, 0.7)[0])


def test_decode_options_are_validated_and_round_trip():
    with pytest.raises(ConfigError, match=r"inference.decode must be one of \('topk', 'dpp', 'topk_dpp'\), got 'beam'"):
        InferenceOptions(decode="beam")
    with pytest.raises(OptionDependencyError, match="inference.noise=1.0 needs inference.decode='topk'"):
        InferenceOptions(decode="dpp", noise=1.0)
    with pytest.raises(OptionDependencyError, match=r"dpp_quality_scale=2.0 needs inference.decode in \('dpp', 'topk_dpp'\)"):
        InferenceOptions(dpp_quality_scale=2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="dpp_quality_scale must be a finite number > 0"):
            InferenceOptions(decode="dpp", dpp_quality_scale=bad)
    for decode in ("dpp", "topk_dpp"):
        with pytest.raises(OptionDependencyError, match=f"inference.noise=1.0 needs inference.decode='topk' \\(the {decode} decode"):
            InferenceOptions(decode=decode, noise=1.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="inference.dpp_share must be in"):
            InferenceOptions(decode="topk_dpp", dpp_share=bad)
    with pytest.raises(OptionDependencyError, match="inference.dpp_share=0.25 needs inference.decode='topk_dpp'"):
        InferenceOptions(decode="dpp", dpp_share=0.25)
    for bad in (0.0, -1.0, float("inf"), "2"):
        with pytest.raises(ConfigError, match="inference.dpp_head_quality_scale must be a finite number > 0 or None"):
            InferenceOptions(decode="topk_dpp", dpp_head_quality_scale=bad)
    with pytest.raises(OptionDependencyError, match="inference.dpp_head_quality_scale=2.0 needs inference.decode='topk_dpp'"):
        InferenceOptions(decode="dpp", dpp_head_quality_scale=2.0)
    for options in (InferenceOptions(decode="dpp", dpp_quality_scale=2.5), InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5, dpp_share=0.25),
                    InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5, dpp_head_quality_scale=2.0)):
        config = AutoSelectConfig(inference=options)
        assert AutoSelectConfig.from_json_string(config.to_json_string()) == config
    assert AutoSelectConfig.from_dict({"inference": {"noise": 0.5}}).inference.decode == "topk"  # older saves: top-K


@pytest.mark.parametrize("options, decode", [
    (InferenceOptions(decode="dpp", dpp_quality_scale=0.5), lambda s, t, k: dpp_indices(s, t, k, 0.5)),
    (InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5, dpp_share=0.5), lambda s, t, k: topk_dpp_indices(s, t, k, 0.5, 0.5)),
    (InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5, dpp_head_quality_scale=2.0),
     lambda s, t, k: topk_dpp_indices(s, t, k, 0.5, 0.5, head_quality_scale=2.0))])
def test_the_model_decodes_with_dpp_when_configured_and_saves_the_choice(options, decode, tmp_path):
    vlm, processor = build_tiny_llava(seed=0)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(images=pictures, text=["USER: <image>\nWhat is it? ASSISTANT:"] * 2, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=options)).eval()
    with torch.no_grad():
        tokens = model.visual_tokens(pixel_values=batch["pixel_values"])
        scores = model.scorer(tokens)
        model(**batch)
        expected = decode(scores, tokens, 16)
        assert torch.equal(model.last_selection.indices, expected)
        assert not torch.equal(expected, topk_indices(scores, 16))  # the decode matters here
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert torch.equal(model.last_selection.indices, expected)
        model.generate(**batch, budget=ScoreMass(0.5), max_new_tokens=1, do_sample=False)  # per image, same decode
        for b, kept in enumerate(model.last_selection.indices):
            assert torch.equal(kept, decode(scores[b:b + 1], tokens[b:b + 1], len(kept))[0])
    model.save_pretrained(tmp_path / "s")
    assert AutoSelectModel.from_pretrained(tmp_path / "s", vlm).config.inference == options
    assert load_scorer(tmp_path / "s")[1].inference == options


def test_the_dpp_ranking_has_the_dpp_choice_as_its_top_k_for_every_k():
    """The greedy is prefix-consistent, so one ranking serves every budget (the registry's pyfunc)."""
    torch.manual_seed(5)
    scores, features = torch.randn(2, 14), torch.randn(2, 14, 5)  # rank 5: breaks down after 5 picks
    ranking = dpp_ranking(scores, features, 1.5)
    for k in range(1, 15):
        assert torch.equal(topk_indices(ranking, k), dpp_indices(scores, features, k, 1.5)), k


def test_the_registered_pyfunc_ranks_a_dpp_scorer_as_the_model_decodes(tmp_path):
    from types import SimpleNamespace

    from mlops.registry import ARTIFACT_KEY, AutoSelectScorerModel

    vlm, _ = build_tiny_llava(seed=0)
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=InferenceOptions(decode="dpp"))).eval()
    model.save_pretrained(tmp_path / "s")
    pyfunc = AutoSelectScorerModel()
    pyfunc.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(tmp_path / "s")}))
    tokens = torch.randn(2, 64, model.config.vision_width)
    ranked = torch.from_numpy(pyfunc.predict(None, {"visual_tokens": tokens.numpy()}))
    with torch.no_grad():
        assert torch.equal(topk_indices(ranked, 16), model.choose(tokens, 16, {}).indices)


def test_a_grid_reserve_keeps_the_uniform_lattice_and_decodes_the_rest_among_the_others():
    """``inference.grid_reserve``: round(share x K) tokens on the uniform baseline's lattice, then the
    decode (top-K or DPP) over the remaining tokens only; 1.0 is the uniform baseline itself."""
    from autoselect.pruners.uniform import grid_indices

    vlm, _ = build_tiny_llava(seed=0)
    torch.manual_seed(3)
    tokens = torch.randn(2, 64, vlm.config.vision_config.hidden_size)
    for decode, scale in (("topk", 1.0), ("dpp", 0.5)):
        options = InferenceOptions(decode=decode, dpp_quality_scale=scale, grid_reserve=0.5)
        model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=options)).eval()
        with torch.no_grad():
            scores = model.scorer(tokens)
            kept = model.choose(tokens, 10, {}).indices
        grid = grid_indices(5, 8, 8)  # round(0.5 x 10) on the 8 x 8 patch grid
        others = torch.tensor([i for i in range(64) if i not in set(grid.tolist())])
        rest = (topk_indices(scores[:, others], 5) if decode == "topk" else dpp_indices(scores[:, others], tokens[:, others], 5, 0.5))
        assert kept.shape == (2, 10) and torch.equal(kept, torch.cat([grid.expand(2, -1), others[rest]], 1).sort(-1).values), decode
        assert all(len(set(row.tolist())) == 10 for row in kept)
    uniform = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=InferenceOptions(grid_reserve=1.0))).eval()
    with torch.no_grad():
        assert torch.equal(uniform.choose(tokens, 16, {}).indices, grid_indices(16, 8, 8).expand(2, -1))
        with pytest.raises(ValueError, match="inference.grid_reserve needs a square patch grid; 60 visual tokens are not one"):
            uniform.choose(tokens[:, :60], 16, {})
    with pytest.raises(ConfigError, match=r"inference.grid_reserve must be in \[0, 1\], got 1.5"):
        InferenceOptions(grid_reserve=1.5)
    config = AutoSelectConfig(inference=InferenceOptions(grid_reserve=0.25))
    assert AutoSelectConfig.from_json_string(config.to_json_string()) == config


@pytest.mark.parametrize("options, refusal", [
    (InferenceOptions(decode="dpp", dpp_quality_scale=0.5, grid_reserve=0.5), "a different grid at every K"),
    (InferenceOptions(decode="topk_dpp", dpp_quality_scale=0.5), "a different split at every K")])
def test_the_registered_pyfunc_keeps_what_the_model_keeps_given_k_and_refuses_a_split_ranking(options, refusal, tmp_path):
    """``params={"k": K}``: the pyfunc's K indices are the model's choice (grid reserve + DPP, or
    top-K then DPP); without K such a scorer has no single ranking, and says so."""
    from types import SimpleNamespace

    from mlops.registry import ARTIFACT_KEY, AutoSelectScorerModel

    vlm, _ = build_tiny_llava(seed=0)
    torch.manual_seed(1)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, inference=options)).eval()
    model.save_pretrained(tmp_path / "s")
    pyfunc = AutoSelectScorerModel()
    pyfunc.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(tmp_path / "s")}))
    tokens = torch.randn(2, 64, model.config.vision_width)
    for k in (5, 10, 16):
        kept = torch.from_numpy(pyfunc.predict(None, {"visual_tokens": tokens.numpy()}, params={"k": k}))
        with torch.no_grad():
            assert torch.equal(kept, model.choose(tokens, k, {}).indices), k
    with pytest.raises(ValueError, match=refusal):
        pyfunc.predict(None, {"visual_tokens": tokens.numpy()})
    with pytest.raises(ValueError, match="params k=65 must be between 1 and the 64 visual tokens"):
        pyfunc.predict(None, {"visual_tokens": tokens.numpy()}, params={"k": 65})

@pytest.mark.parametrize("k", [1, 4, 9, 20])
def test_topk_dpp_share_0_is_the_top_k_and_share_1_the_dpp(k):
    torch.manual_seed(6)
    scores, features = torch.randn(3, 20), torch.randn(3, 20, 8)
    assert torch.equal(topk_dpp_indices(scores, features, k, 0.0, 0.5), topk_indices(scores, k))
    assert torch.equal(topk_dpp_indices(scores, features, k, 1.0, 0.5), dpp_indices(scores, features, k, 0.5))


@pytest.mark.parametrize("k, share, head", [(9, 0.5, 5), (10, 0.5, 5), (10, 0.3, 7), (8, 0.75, 2)])
def test_topk_dpp_keeps_the_top_tokens_then_the_dpp_conditioned_on_them(k, share, head):
    """The first K - floor(share K) are the highest logits; the rest is the greedy log-det (brute
    force) started from them, so it picks what they do not cover (the data is chosen so that this
    differs from both the top-K and the DPP at every case)."""
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(2, 3, 12, generator=generator)  # three clusters of tokens: diversity matters
    scores = torch.randn(2, 16, generator=generator)
    features = centres[:, torch.arange(16) % 3] + 0.3 * torch.randn(2, 16, 12, generator=generator)
    kept = topk_dpp_indices(scores, features, k, share, 0.5)
    for b in range(2):
        top = scores[b].argsort(descending=True)[:head].tolist()
        assert kept[b].tolist() == sorted(naive_greedy(scores[b], features[b], k, 0.5, start=tuple(top))), b
        assert torch.equal(kept[b], topk_dpp_indices(scores[b:b + 1], features[b:b + 1], k, share, 0.5)[0])  # as alone
    assert not torch.equal(kept, topk_indices(scores, k)) and not torch.equal(kept, dpp_indices(scores, features, k, 0.5))
    with pytest.raises(ValueError, match="between 1 and the 16 visual tokens"):
        topk_dpp_indices(scores, features, 17, share)


def test_a_dpp_head_spreads_over_a_plateau_and_takes_a_peak_whole():
    """The head at a DPP scale: tokens 0-5 are near copies of one vector. With near-equal logits on
    them (a plateau) the head at scale 1 takes one of them and spreads, as C's top-K head does not;
    with logits standing far above the rest (a peak) the head at scale 4 keeps the peak's tokens as
    the top-K does (the logit gap outweighs the copies' redundancy); the tail is the DPP conditioned on
    the head either way (brute force), and a very large head scale is C."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, 1, 10, generator=generator)
    features = torch.cat([base + 0.05 * torch.randn(1, 6, 10, generator=generator), torch.randn(1, 10, 10, generator=generator)], 1)
    plateau = torch.cat([torch.full((1, 6), 1.0) + 0.01 * torch.arange(6.0), torch.linspace(0.8, 0.5, 10)[None]], 1)
    k, head_scale = 8, 1.0
    spread = topk_dpp_indices(plateau, features, k, 0.5, 0.5, head_quality_scale=head_scale)
    assert set(topk_dpp_indices(plateau, features, k, 0.5, 0.5)[0].tolist()) >= {2, 3, 4, 5}  # C's head: the cluster
    head = naive_greedy(plateau[0], features[0], 4, head_scale)
    assert len(set(head) & set(range(6))) == 1  # one of the near copies, then other tokens
    assert spread[0].tolist() == sorted(naive_greedy(plateau[0], features[0], k, 0.5, start=tuple(head)))
    peak = plateau.clone()
    peak[0, :6] += 6.0
    peak_head = naive_greedy(peak[0], features[0], 4, 4.0)
    assert set(peak_head) <= set(range(6))  # all four from the peak, as the top-K head
    assert topk_dpp_indices(peak, features, k, 0.5, 0.5, head_quality_scale=4.0)[0].tolist() == sorted(
        naive_greedy(peak[0], features[0], k, 0.5, start=tuple(peak_head)))
    assert not torch.equal(topk_dpp_indices(peak, features, k, 0.5, 0.5, head_quality_scale=head_scale),
                           topk_dpp_indices(peak, features, k, 0.5, 0.5))  # at scale 1 the copies still cost more
    assert torch.equal(topk_dpp_indices(plateau, features, k, 0.5, 0.5, head_quality_scale=1e3), topk_dpp_indices(plateau, features, k, 0.5, 0.5))
    assert torch.equal(topk_dpp_indices(plateau, features, k, 0.0, 0.5, head_quality_scale=head_scale), dpp_indices(plateau, features, k, head_scale))


def test_topk_dpp_with_a_duplicate_among_the_top_tokens_conditions_on_their_span():
    """Tokens 0 and 1 are the same vector and the two highest logits: both are kept (the top part
    is the scorer's), and the DPP part is the greedy conditioned on token 0 and the third top token,
    the duplicate adding nothing."""
    generator = torch.Generator().manual_seed(8)
    scores, features = torch.randn(12, generator=generator), torch.randn(12, 10, generator=generator)
    scores[:2] = torch.tensor([5.0, 4.9])
    features[1] = features[0]
    third = int(scores[2:].argmax()) + 2
    kept = topk_dpp_indices(scores[None], features[None], 6, 0.5, 1.0)[0].tolist()
    rest = naive_greedy(scores, features, 5, 1.0, start=(0, third), skip=(1,))
    assert kept == sorted([1, *rest])


def test_standardized_logits_are_the_scale_free_z_the_dpp_quality_reads():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    z = standardized_logits(scores)
    assert z.dtype == torch.float64
    assert torch.allclose(z[0].mean(), torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z[0].std(unbiased=False), torch.ones((), dtype=torch.float64))  # population std
    assert torch.equal(z[1], torch.zeros(4, dtype=torch.float64))  # a constant row stays 0, no NaN
    assert torch.allclose(standardized_logits(7.0 * scores - 3.0), z)  # the logits' scale and shift do not matter
