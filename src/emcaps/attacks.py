"""White-box adversarial attacks (FGSM, BIM) and the robustness measures of the paper's section 5.

Objective. The attacks climb (or, targeted, descend) a loss on the model's scores:
- logit models (the CNN): softmax cross-entropy, the loss they were trained with;
- capsule networks: the spread loss at its final margin 0.9. Activations lie in [0, 1], so a softmax
  over them is nearly flat and its gradient small; the spread loss is the capsule net's own training
  objective and its gradient stays alive until the target beats every other class by 0.9.
Only the sign of the input gradient is used, so the scale of either loss does not matter.

Every attack is batched, runs the model in eval mode (restoring its mode afterwards) and takes the
gradient with respect to the input only (`torch.autograd.grad`), so model parameters never collect
gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emcaps.losses import spread_loss
from emcaps.predict import predict

ATTACK_MARGIN = 0.9
Attack = Callable[..., Tensor]


def attack_loss(model: nn.Module, scores: Tensor, labels: Tensor) -> Tensor:
    """Summed loss of scores (N, E) for labels (N,): cross-entropy on logits, spread loss on activations."""
    if getattr(model, "score_kind", "logit") == "logit":
        return F.cross_entropy(scores, labels, reduction="sum")
    return spread_loss(scores, labels, ATTACK_MARGIN) * len(labels)


def _input_gradient_sign(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """sign(d loss / d x) for images x (N, C, H, W), labels (N,) -> (N, C, H, W)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = attack_loss(model, model(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def _targets(y: Tensor, targeted: bool, target: Tensor | None) -> Tensor:
    if not targeted:
        return y
    if target is None:
        raise ValueError("a targeted attack needs target labels (N,)")
    return torch.as_tensor(target, device=y.device).long().expand_as(y)


def _step(model: nn.Module, x: Tensor, labels: Tensor, size: float, targeted: bool) -> Tensor:
    """One signed-gradient step: up the loss of the true labels, or down the loss of the targets."""
    direction = -1.0 if targeted else 1.0
    return x + direction * size * _input_gradient_sign(model, x, labels)


def _clamp(x: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    return x if clamp is None else x.clamp(*clamp)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, targeted: bool = False,
         target: Tensor | None = None, clamp: tuple[float, float] | None = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): x (N, C, H, W), y (N,) -> x_adv (N, C, H, W).

    Untargeted: x + eps * sign(grad loss(y)). Targeted: x - eps * sign(grad loss(target)).
    `clamp` = (lo, hi) keeps pixels in range; |x_adv - x|_inf <= eps always.
    """
    if eps == 0:
        return x.detach().clone()
    was_training = model.training
    model.eval()
    try:
        x_adv = _step(model, x.detach(), _targets(y, targeted, target), eps, targeted)
    finally:
        model.train(was_training)
    return _clamp(x_adv, clamp).detach()


def bim(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10, step_size: float | None = None,
        targeted: bool = False, target: Tensor | None = None,
        clamp: tuple[float, float] | None = None) -> Tensor:
    """Basic iterative method (Kurakin et al. 2017): `steps` FGSM steps of `step_size`, each projected back
    into the eps-ball around x. x (N, C, H, W), y (N,) -> x_adv (N, C, H, W).

    step_size defaults to 2.5 * eps / steps, so the iterate can reach the ball's faces and still turn.
    """
    if steps < 1:
        raise ValueError(f"BIM needs steps >= 1, got {steps}")
    if eps == 0:
        return x.detach().clone()
    size = 2.5 * eps / steps if step_size is None else step_size
    labels = _targets(y, targeted, target)
    x0 = x.detach()
    x_adv = x0.clone()
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            x_adv = _step(model, x_adv, labels, size, targeted)
            x_adv = _clamp(torch.min(torch.max(x_adv, x0 - eps), x0 + eps), clamp).detach()
    finally:
        model.train(was_training)
    return x_adv


def _batches(data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
             batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(images (N, C, H, W), labels (N,)) cut into batches, or an iterable of batches as it is."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
    return data


def _classes(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The classes (N,) the model gives images x (N, C, H, W) (labels y (N,)), on y's device."""
    return predict(model, [(x, y)])[0].argmax(1).to(y.device)


def accuracy_under_attack(model: nn.Module, data, attack: Attack, eps_list: Sequence[float],
                          batch_size: int = 64) -> list[float]:
    """Accuracy on adversarial versions of `data` ((images, labels) tensors or an iterable of batches),
    one value per eps. `attack(model, x, y, eps)` is e.g. `fgsm` or `functools.partial(bim, steps=5)`."""
    device = next(model.parameters()).device
    batches = list(_batches(data, batch_size))
    out = []
    for eps in eps_list:
        right = total = 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            right += int((_classes(model, attack(model, x, y, eps), y) == y).sum())
            total += len(y)
        out.append(right / max(total, 1))
    return out


def random_targets(labels: Tensor, classes: int, seed: int = 0) -> Tensor:
    """A wrong class for every label (N,), uniformly among the other classes -> (N,)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, classes, labels.shape, generator=g).to(labels.device)
    return (labels + shift) % classes


def targeted_success_rate(model: nn.Module, data, attack: Attack, eps_list: Sequence[float], classes: int,
                          batch_size: int = 64, seed: int = 0) -> list[float]:
    """Fraction of images that the targeted attack makes the model classify as a random wrong class,
    one value per eps. The targets are fixed by `seed`, so every eps attacks the same targets."""
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device), random_targets(y, classes, seed + i))
               for i, (x, y) in enumerate(_batches(data, batch_size))]
    out = []
    for eps in eps_list:
        hit = total = 0
        for x, y, t in batches:
            x_adv = attack(model, x, y, eps, targeted=True, target=t)
            hit += int((_classes(model, x_adv, y) == t).sum())
            total += len(y)
        out.append(hit / max(total, 1))
    return out
