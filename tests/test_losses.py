import pytest
import torch

from emcaps.losses import cross_entropy, linear_margin, margin_loss, sigmoid_margin, spread_loss


def spread_loop(a, t, m):
    total = 0.0
    for n in range(a.shape[0]):
        for i in range(a.shape[1]):
            if i != t[n]:
                total += max(0.0, m - (a[n, t[n]] - a[n, i]).item()) ** 2
    return total / a.shape[0]


def test_spread_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (6,), generator=g)
    for m in (0.2, 0.5, 0.9):
        assert spread_loss(a, t, m).item() == pytest.approx(spread_loop(a, t, m))


def test_spread_loss_is_zero_when_margin_is_met_and_has_gradients_otherwise():
    a = torch.tensor([[0.95, 0.0, 0.01]], requires_grad=True)
    assert spread_loss(a, torch.tensor([0]), 0.9).item() == 0.0
    loss = spread_loss(a, torch.tensor([1]), 0.9)
    loss.backward()
    assert loss.item() > 0 and a.grad[0, 1] < 0 and a.grad[0, 0] > 0


def test_margin_and_cross_entropy():
    a = torch.tensor([[0.95, 0.05], [0.2, 0.7]])
    t = torch.tensor([0, 1])
    assert margin_loss(a, t).item() == pytest.approx(((0.9 - 0.7) ** 2 + 0.5 * (0.2 - 0.1) ** 2) / 2)
    assert cross_entropy(a, t).item() == pytest.approx(torch.nn.functional.cross_entropy(a, t).item())
    with pytest.raises(ValueError, match="target must have shape"):
        spread_loss(a, torch.tensor([0]), 0.2)
    with pytest.raises(ValueError, match=r"scores must be a floating-point tensor of shape \(N, E\), "
                                         r"got torch.float32 \(2,\)"):
        margin_loss(a[0], t)


def test_margin_schedules():
    assert linear_margin(0, 101) == pytest.approx(0.2)
    assert linear_margin(50, 101) == pytest.approx(0.55)
    assert linear_margin(100, 101) == pytest.approx(0.9)
    assert linear_margin(500, 101) == pytest.approx(0.9)
    assert sigmoid_margin(0) == pytest.approx(0.2 + 0.79 / (1 + 2.718281828 ** 4), rel=1e-6)
    assert sigmoid_margin(200000) == pytest.approx(0.2 + 0.79 / 2)
    assert sigmoid_margin(10 ** 9) == pytest.approx(0.2 + 0.79 / (1 + 2.718281828 ** -10), rel=1e-6)


@pytest.mark.parametrize("loss", [spread_loss, margin_loss, cross_entropy])
def test_wrong_labels_and_scores_are_named_before_torch_sees_them(loss):
    a = torch.rand(3, 5)
    args = (0.2,) if loss is spread_loss else ()
    with pytest.raises(ValueError, match=r"target must hold integer class indices, got torch.float32: convert it "
                                         r"with target.long\(\)"):
        loss(a, torch.tensor([0.0, 1.0, 2.0]), *args)
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 5\), got values from 0 to 7"):
        loss(a, torch.tensor([0, 1, 7]), *args)
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 5\), got values from -1 to 1"):
        loss(a, torch.tensor([0, 1, -1]), *args)
    with pytest.raises(ValueError, match=r"target must have shape \(3,\), got \(2,\)"):
        loss(a, torch.tensor([0, 1]), *args)
    with pytest.raises(ValueError, match=r"scores must be a floating-point tensor of shape \(N, E\), got torch.int64"):
        loss(torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]), *args)
    target = torch.tensor([0, 4, 2])
    assert loss(a, target.int(), *args) == loss(a, target, *args)        # any integer type is class indices
