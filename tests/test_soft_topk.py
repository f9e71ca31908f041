import pytest
import torch

from autoselect import soft_topk, topk_indices


@pytest.mark.parametrize("n,k", [(16, 1), (64, 16), (576, 64), (576, 575)])
@pytest.mark.parametrize("temperature", [2.0, 0.5, 0.1])
def test_sums_to_k_and_in_unit_interval(n, k, temperature):
    scores = torch.randn(4, n) * 3
    alpha = soft_topk(scores, k, temperature)
    assert alpha.shape == scores.shape
    assert torch.allclose(alpha.sum(-1), torch.full((4,), float(k)), atol=1e-4)
    assert alpha.min() >= 0 and alpha.max() <= 1


def test_gradient_finite_and_nonzero_for_every_token():
    scores = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    alpha = soft_topk(scores, 8, temperature=2.0)
    weights = torch.randn(3, 64, dtype=torch.float64)
    (alpha * weights).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad != 0).all()


def test_backward_matches_finite_differences():
    scores = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 5, temperature=0.7), (scores,), atol=1e-6)


def test_tends_to_hard_topk_mask_at_low_temperature():
    scores = torch.randn(5, 100)  # continuous: no ties at the K-th score (almost surely)
    hard = torch.zeros_like(scores).scatter_(1, topk_indices(scores, 10), 1.0)
    gaps = []
    for temperature in (1.0, 0.1, 1e-3, 1e-5):
        gaps.append((soft_topk(scores, 10, temperature) - hard).abs().max().item())
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3


def test_padding_gets_zero_weight_and_budget_checked():
    scores = torch.randn(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    alpha = soft_topk(scores, 3, 1.0, valid=valid)
    assert torch.all(alpha[1, 6:] == 0)
    assert torch.allclose(alpha.sum(-1), torch.tensor([3.0, 3.0]), atol=1e-4)
    with pytest.raises(ValueError, match="budget"):
        soft_topk(scores, 7, 1.0, valid=valid)  # row 1 has only 6 real tokens
    with pytest.raises(ValueError, match="budget"):
        soft_topk(scores, 0, 1.0)


def test_k_equal_n_keeps_everything():
    alpha = soft_topk(torch.randn(2, 9), 9, 0.5)
    assert torch.equal(alpha, torch.ones(2, 9))


def test_hard_topk_is_sorted_and_exact():
    scores = torch.randn(4, 50)
    idx = topk_indices(scores, 7)
    assert idx.shape == (4, 7)
    assert torch.all(idx[:, 1:] > idx[:, :-1])
    expected = torch.topk(scores, 7).indices.sort(-1).values
    assert torch.equal(idx, expected)
    tied = torch.zeros(1, 6)
    assert topk_indices(tied, 3).tolist() == [[0, 1, 2]]  # ties resolve to the earlier tokens
