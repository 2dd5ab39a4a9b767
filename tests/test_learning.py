"""The network really learns: a short run on a small generated task drives the loss down and the
accuracy far above chance. (Training itself lives in emcaps.train; this only checks the model.)"""

import torch

from emcaps.losses import linear_margin, spread_loss
from emcaps.models import create_model


def shapes_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of strokes at random positions in noise: horizontal, vertical, two diagonals.

    -> images (n, 1, 32, 32), labels (n,)
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = torch.randint(10, 22, (n, 1, 1), generator=g).float()
    cx = torch.randint(10, 22, (n, 1, 1), generator=g).float()
    dy, dx = yy - cy, xx - cx
    dist = torch.stack((dy.abs(), dx.abs(), (dy - dx).abs() / 1.41, (dy + dx).abs() / 1.41), 1)  # (n, 4, 32, 32)
    along = torch.stack((dx.abs(), dy.abs(), (dy + dx).abs() / 1.41, (dy - dx).abs() / 1.41), 1)
    stroke = ((dist < 1.5) & (along < 8)).float()
    img = stroke[torch.arange(n), labels] + 0.3 * torch.randn(n, 32, 32, generator=g)
    return img.unsqueeze(1), labels


def test_small_capsule_net_learns_a_generated_task():
    """The default routing on the tiny preset (at lr 3e-3 it needs more than these 150 steps to leave chance)."""
    torch.manual_seed(0)
    x, y = shapes_task(1024, seed=1)
    xt, yt = shapes_task(256, seed=2)
    model = create_model("tiny", classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            scores = model(xt)
        return spread_loss(scores, yt, 0.5).item(), (scores.argmax(1) == yt).float().mean().item()

    loss_before, _ = held_out()
    steps = 150
    for step in range(steps):
        idx = torch.randint(0, 1024, (32,))
        loss = spread_loss(model(x[idx]), y[idx], linear_margin(step, steps, end=0.5))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after, acc = held_out()
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert acc > 0.5, acc  # chance is 0.25
