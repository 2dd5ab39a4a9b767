"""FGSM and BIM on models whose input gradient is known, and on a tiny capsule network."""

import functools

import pytest
import torch
from torch import nn

from emcaps import attacks
from emcaps.models import create_model


class Logistic(nn.Module):
    """Two-class linear model on flattened images: logits (N, 2) = [0, w.x + b]."""

    score_kind = "logit"

    def __init__(self, shape=(1, 4, 4), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=g))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1) + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_fgsm_is_the_sign_of_the_weight():
    model = Logistic()
    x, y = _data()
    adv = attacks.fgsm(model, x, y, eps=0.1)
    # Raising the loss of class 1 lowers w.x: the step is -eps sign(w); for class 0 it is +eps sign(w).
    direction = torch.where(y == 1, -1.0, 1.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(adv - x, 0.1 * direction * model.w.detach().sign().expand_as(x))
    assert model.w.grad is None and model.b.grad is None


def test_eps_zero_changes_nothing():
    model = Logistic()
    x, y = _data()
    for attack in (attacks.fgsm, functools.partial(attacks.bim, steps=3)):
        torch.testing.assert_close(attack(model, x, y, 0.0), x)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_perturbation_stays_in_the_ball_and_clamp(eps):
    model = Logistic()
    x, y = _data()
    for adv in (attacks.fgsm(model, x, y, eps), attacks.bim(model, x, y, eps, steps=5)):
        assert (adv - x).abs().max() <= eps + 1e-6
    adv = attacks.bim(model, x, y, eps, steps=5, clamp=(-0.5, 0.5))
    assert adv.min() >= -0.5 and adv.max() <= 0.5


def test_bim_at_least_as_strong_as_fgsm():
    model = Logistic(seed=3)
    x, y = _data(64, seed=4)
    for eps in (0.05, 0.1, 0.2):
        f = attacks.accuracy_under_attack(model, (x, y), attacks.fgsm, [eps])[0]
        b = attacks.accuracy_under_attack(model, (x, y), functools.partial(attacks.bim, steps=5), [eps])[0]
        assert b <= f
    clean = attacks.accuracy_under_attack(model, (x, y), attacks.fgsm, [0.0])[0]
    strong = attacks.accuracy_under_attack(model, (x, y), attacks.fgsm, [5.0])[0]
    assert strong < clean and strong == 0.0


def test_targeted_attack_pushes_toward_the_target():
    model = Logistic()
    x, _ = _data()
    target = torch.ones(len(x), dtype=torch.long)
    before = model(x)[:, 1]
    after = model(attacks.fgsm(model, x, torch.zeros_like(target), 0.1, targeted=True, target=target))[:, 1]
    assert (after > before).all()
    rate = attacks.targeted_success_rate(model, _data(32)[0:2], attacks.fgsm, [0.0, 10.0], classes=2)
    assert rate[1] == 1.0 and rate[0] <= rate[1]
    with pytest.raises(ValueError, match="target"):
        attacks.fgsm(model, x, target, 0.1, targeted=True)


def test_attacks_on_a_capsule_net_restore_mode_and_leave_params_alone():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 2])
    adv = attacks.bim(model, x, y, 0.1, steps=2)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.1 + 1e-6 and (adv != x).any()
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    loss = attacks.attack_loss(model, model(adv), y)
    assert torch.isfinite(loss)
