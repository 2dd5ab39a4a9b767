"""Pictures of what a trained capsule network does: routing histograms, parse maps, reconstructions from
class capsule poses and their pose perturbations.

Figures are drawn with matplotlib (see `emcaps.plots`) and each picture has a `*_figure` function that
returns the matplotlib Figure; `plots.save` writes it as a PNG. `routing_histograms` and `parse_map` also
return their raw arrays, so tests and reports can use the numbers without reading pictures; the
reconstruction figures draw arrays their caller computed (`emcaps.experiments.reconstruct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from emcaps import plots
from emcaps.capsules import extract_patches
from emcaps.models import MatrixCapsNet
from emcaps.routing import RoutingStep


def _one_image(x: Tensor) -> Tensor:
    """(C, H, W) or (1, C, H, W) -> (1, C, H, W)."""
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    return x


def _check_capsnet(model: nn.Module) -> MatrixCapsNet:
    if not isinstance(model, MatrixCapsNet):
        raise ValueError(f"this picture needs a capsule network (MatrixCapsNet), got {type(model).__name__}")
    return model


class _Eval:
    """Run a model in eval mode without gradients, restoring its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _layers(model: MatrixCapsNet, x: Tensor, trace_conv: bool = False) -> dict:
    """Every layer's capsules for images x (N, C, H, W), and (optionally) the routing traces of ConvCaps1/2
    and always of the class layer: {'primary', 'caps1', 'caps2', 'out': Capsules; 'trace1', 'trace2',
    'trace_class': list[RoutingStep]}."""
    t1, t2, tc = ([] if trace_conv else None), ([] if trace_conv else None), []
    primary = model.primary(F.relu(model.conv1(x)))
    caps1 = model.conv_caps1(primary, trace=t1)
    caps2 = model.conv_caps2(caps1, trace=t2)
    out = model.class_caps(caps2, trace=tc)
    return {"primary": primary, "caps1": caps1, "caps2": caps2, "out": out, "trace1": t1, "trace2": t2,
            "trace_class": tc}


# ---------------------------------------------------------------------------------------------------------
# Routing histograms

def routing_histograms(model: nn.Module, x: Tensor, out_png: str | Path | None = None, bins: int = 24,
                       class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """For one image, after each EM iteration of the class layer: the histogram of the distances from each
    vote to its class capsule's mean, each vote weighted by its assignment to that class.

    x (C, H, W) -> {'counts': (T, E, bins), 'edges': (bins + 1,), 'mass': (T, E) total assignment per
    class, 'activation': (T, E)}. The bins span [0, largest distance], so counts sum to mass exactly.
    A class that explains its votes well has its mass piled up near zero.
    """
    model = _check_capsnet(model)
    x = _one_image(x)
    with _Eval(model):
        layers = _layers(model, x)
        votes, _ = model.class_caps.votes(layers["caps2"])                  # (1, E, I, 16)
    steps: list[RoutingStep] = layers["trace_class"]
    mean = torch.stack([s.mean.reshape(1, votes.shape[1], 16) for s in steps])[:, 0]      # (T, E, 16)
    weight = torch.stack([s.assignments.reshape(votes.shape[:3]) for s in steps])[:, 0]   # (T, E, I)
    dist = (votes[0].unsqueeze(0) - mean.unsqueeze(2)).norm(dim=-1)        # (T, E, I)
    d, w = dist.double().cpu().numpy(), weight.double().cpu().numpy()
    edges = np.linspace(0.0, max(float(d.max()), 1e-12) * (1 + 1e-9), bins + 1)
    counts = np.stack([np.stack([np.histogram(d[t, e], edges, weights=w[t, e])[0] for e in range(d.shape[1])])
                       for t in range(d.shape[0])])                         # (T, E, bins)
    act = torch.stack([s.activation.reshape(-1) for s in steps]).double().cpu().numpy()
    result = {"counts": counts, "edges": edges, "mass": w.sum(-1), "activation": act}
    if out_png is not None:
        plots.save(histograms_figure(result, class_names), out_png)
    return result


def histograms_figure(result: dict[str, np.ndarray], class_names: Sequence[str] | None = None) -> Figure:
    """Panels of `routing_histograms(...)`'s result: a row per EM iteration (T), a column per class (E),
    each the assignment mass (y) against the vote-to-mean distance (x), with the class's activation."""
    counts, edges, act = result["counts"], result["edges"], result["activation"]
    t_n, e_n, _ = counts.shape
    names = list(class_names) if class_names is not None else [f"class {e}" for e in range(e_n)]
    fig = Figure(figsize=(1.9 * e_n + 1.0, 1.5 * t_n + 1.0), dpi=plots.DPI, layout="constrained")
    axes = fig.subplots(t_n, e_n, sharex=True, sharey="row", squeeze=False)
    for t in range(t_n):
        for e in range(e_n):
            ax = axes[t, e]
            ax.stairs(counts[t, e], edges, fill=True, color=f"C{e % 10}")
            ax.text(0.97, 0.93, f"a = {act[t, e]:.2f}", transform=ax.transAxes, ha="right", va="top", fontsize=8)
            if t == 0:
                ax.set_title(str(names[e]), fontsize=10)
            if t == t_n - 1:
                ax.set_xlabel("distance")
        axes[t, 0].set_ylabel(f"iteration {t + 1}\nassignment mass")
    fig.suptitle("class-layer votes: distance to the class capsule's mean, weighted by assignment")
    return fig


# ---------------------------------------------------------------------------------------------------------
# Reconstructions from class capsule poses (the decoder trained with the network; `emcaps experiment
# reconstruct` computes them)

def _show(ax, image: np.ndarray, vmin: float, vmax: float) -> None:
    """Grey image (H, W) on a value range shared by the whole figure, without ticks or frame."""
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def reconstructions_figure(inputs: np.ndarray, redrawn: np.ndarray, labels: Sequence[int],
                           predicted: Sequence[int]) -> Figure:
    """Digits (N, H, W) above their reconstructions (N, H, W) from the predicted class's pose, both on the
    inputs' value range so a faint reconstruction looks faint. Each column is titled with its label, or
    'a->b' for a digit of class a taken for b."""
    n = len(inputs)
    low, high = float(inputs.min()), float(inputs.max())
    fig = Figure(figsize=(0.9 * n, 2.1), dpi=plots.DPI)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        _show(axes[0, i], inputs[i], low, high)
        _show(axes[1, i], redrawn[i], low, high)
        axes[0, i].set_title(f"{labels[i]}" if labels[i] == predicted[i] else f"{labels[i]}->{predicted[i]}",
                             fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("redrawn", fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig


def pose_perturbation_figure(originals: np.ndarray, grids: np.ndarray, offsets: np.ndarray,
                             labels: Sequence[int]) -> Figure:
    """One panel per digit: the digit (originals (D, H, W)) on top, then a row per pose entry k (row k // 4,
    column k % 4 of the 4x4 pose) of its reconstructions as that entry moves through offsets (S,) (in
    standard deviations): grids (D, 16, S, H, W). One value range for all, so rows compare; a blank
    column between panels."""
    digits, _, steps = grids.shape[:3]
    low, high = float(min(originals.min(), grids.min())), float(max(originals.max(), grids.max()))
    cols = digits * (steps + 1) - 1
    fig = Figure(figsize=(0.42 * cols + 0.5, 0.42 * 17 + 0.4), dpi=90)
    axes = fig.subplots(17, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for d in range(digits):
        left = d * (steps + 1)
        middle = left + steps // 2
        axes[0, middle].axis("on")
        _show(axes[0, middle], originals[d], low, high)
        axes[0, middle].set_title(f"digit {labels[d]}", fontsize=8)
        for k in range(16):
            for s in range(steps):
                ax = axes[k + 1, left + s]
                ax.axis("on")
                _show(ax, grids[d, k, s], low, high)
                if d == 0 and s == 0:
                    ax.set_ylabel(f"({k // 4},{k % 4})", fontsize=7, rotation=0, labelpad=12, va="center")
                if k == 15 and s in (0, steps // 2, steps - 1):
                    ax.set_xlabel(f"{offsets[s]:+.1f} sd" if s != steps // 2 else "0", fontsize=7)
    fig.subplots_adjust(left=0.03, right=0.995, top=0.97, bottom=0.03, wspace=0.05, hspace=0.05)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Parse map

def _conv_credit(parent_mass: Tensor, step: RoutingStep, child_act: Tensor, kernel: int, stride: int,
                 grid: tuple[int, int, int]) -> Tensor:
    """Hand a ConvCaps layer's per-capsule credit down to its children, for one image.

    parent_mass (H', W', C); step.assignments (H'*W', C, K*K*B); child_act (1, H, W, B) -> (H, W, B).
    A child's share of a parent is its assignment times its activation, normalised over the parent's
    window: the weight of its vote in the parent's mean.
    """
    oh, ow, c = parent_mass.shape
    a_in = extract_patches(child_act, kernel, stride).reshape(oh * ow, 1, -1)   # (H'*W', 1, K*K*B)
    w = step.assignments.reshape(oh * ow, c, -1) * a_in
    share = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    child = (parent_mass.reshape(oh * ow, c, 1) * share).sum(1)              # (H'*W', K*K*B)
    child = child.view(oh, ow, kernel, kernel, -1)
    out = torch.zeros(grid, dtype=child.dtype, device=child.device)
    for ky in range(kernel):
        for kx in range(kernel):
            rows = slice(ky, ky + stride * (oh - 1) + 1, stride)
            cols = slice(kx, kx + stride * (ow - 1) + 1, stride)
            out[rows, cols] += child[:, :, ky, kx]
    return out


def parse_map(model: nn.Module, x: Tensor, out_png: str | Path | None = None, scale: int = 6) -> dict:
    """Where in the image the evidence for the winning class comes from.

    Approximation: credit 1 starts at the winning class capsule and flows down through the last EM
    iteration of every capsule layer; a parent hands each child the child's share of its mean (assignment
    times activation, normalised over the parent's inputs), so credit is conserved. The primary capsules'
    credit, summed over types, is spread evenly over each one's 5x5 receptive field in the input.

    x (C, H, W) -> {'winner': int, 'primary': (H1, W1) credit per primary position, 'heat': (H, W) credit
    per pixel (sums to 1)}; the PNG overlays the heat in red on the first input channel.
    """
    model = _check_capsnet(model)
    x = _one_image(x)
    with _Eval(model):
        layers = _layers(model, x, trace_conv=True)
        winner = int(layers["out"].activation[0].argmax())
        caps2 = layers["caps2"]
        step = layers["trace_class"][-1]
        w = step.assignments.reshape(model.config.classes, -1)[winner]
        w = w * caps2.activation.reshape(-1)
        mass2 = (w / w.sum().clamp_min(1e-12)).view(caps2.activation.shape[1:])       # (4, 4, D)
        cc1, cc2 = model.conv_caps1, model.conv_caps2
        mass1 = _conv_credit(mass2, layers["trace2"][-1], layers["caps1"].activation, cc2.kernel, cc2.stride,
                             tuple(layers["caps1"].activation.shape[1:]))             # (6, 6, C)
        mass0 = _conv_credit(mass1, layers["trace1"][-1], layers["primary"].activation, cc1.kernel,
                             cc1.stride,
                             tuple(layers["primary"].activation.shape[1:]))           # (14, 14, B)
    primary = mass0.sum(-1)                                                 # (H1, W1)
    k, s = model.conv1.kernel_size[0], model.conv1.stride[0]
    heat = torch.zeros(x.shape[-2:], dtype=primary.dtype, device=primary.device)
    for ky in range(k):
        for kx in range(k):
            rows = slice(ky, ky + s * (primary.shape[0] - 1) + 1, s)
            cols = slice(kx, kx + s * (primary.shape[1] - 1) + 1, s)
            heat[rows, cols] += primary / (k * k)
    result = {"winner": winner, "primary": primary.double().cpu().numpy(),
              "heat": heat.double().cpu().numpy()}
    if out_png is not None:
        plots.save(parse_map_figure(x[0, 0].double().cpu().numpy(), result["heat"], winner, scale), out_png)
    return result


def parse_map_figure(image: np.ndarray, heat: np.ndarray, winner: int, scale: int = 6) -> Figure:
    """Grey image (H, W) with the parse map's heat (H, W) over it in red (opacity rising with the heat),
    `scale` screen pixels per image pixel, and a colour bar of the share of the evidence per pixel."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = image.shape
    fig = Figure(figsize=(w * scale / plots.DPI + 1.9, h * scale / plots.DPI + 0.9), dpi=plots.DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", interpolation="nearest")
    norm = Normalize(0.0, max(float(heat.max()), 1e-12))
    overlay = colormaps["Reds"](norm(heat))
    overlay[..., 3] = 0.75 * norm(heat)
    ax.imshow(overlay, interpolation="nearest")
    ax.set(title=f"evidence for class {winner}", xlabel="x (pixels)", ylabel="y (pixels)")
    fig.colorbar(ScalarMappable(norm, "Reds"), ax=ax, label="share of the evidence per pixel")
    return fig
