"""Running a model over batches: scores, labels, reconstruction errors, and multi-crop testing.

Below both the training loop (which tests as it trains) and evaluation (emcaps.evaluate), so neither imports
the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from emcaps.data.transforms import MULTI_CROP_OFFSETS, multi_crop


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]],
            device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Scores (N, E) float and labels (N,) long, on the cpu, for every batch (images (B, C, H, W), labels (B,))."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, labels = [], []
    for x, y in loader:
        scores.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    model.train(was_training)
    if not scores:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(scores), torch.cat(labels).long()


@torch.no_grad()
def predict_reconstructing(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]],
                           device: str | torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`predict` for a capsule network with a decoder: scores (N, E), labels (N,), and the mean squared
    error per pixel (N,) of each image redrawn from the pose of the class the network predicts."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, labels, errors = [], [], []
    for x, y in loader:
        x = x.to(device)
        out = model.reconstruct(x)
        scores.append(out.scores.float().cpu())
        labels.append(torch.as_tensor(y).cpu())
        errors.append((out.images - x).pow(2).flatten(1).mean(1).float().cpu())
    model.train(was_training)
    if not scores:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(scores), torch.cat(labels).long(), torch.cat(errors)


def to_probabilities(scores: Tensor, score_kind: str) -> Tensor:
    """Scores (N, E) in a form that can be averaged over crops: softmax of logits, activations as they are."""
    return torch.softmax(scores, dim=1) if score_kind == "logit" else scores


def multi_crop_predict(model: nn.Module, images: Tensor, labels: Tensor, crop: int,
                       offsets: Sequence[tuple[int, int]] = MULTI_CROP_OFFSETS, batch_size: int = 64,
                       device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Scores (N, E) averaged over K crops of images (N, C, H, W): the centre crop moved by each offset
    (the authors' 13 by default). Logits are averaged as probabilities; capsule activations directly."""
    kind = getattr(model, "score_kind", "logit")
    k = len(offsets)
    chunk = max(1, batch_size // k)

    def batches():
        for i in range(0, len(labels), chunk):
            crops = multi_crop(images[i:i + chunk], crop, tuple(offsets))          # (n, K, C, crop, crop)
            yield crops.flatten(0, 1), labels[i:i + chunk].repeat_interleave(k)

    scores, _ = predict(model, batches(), device)                                   # (N*K, E)
    scores = to_probabilities(scores, kind)
    return scores.view(len(labels), k, -1).mean(1), labels.long()
