"""A reference matrix capsule network written the way public EM-routing implementations write it.

Why it exists: the benchmarks compare emcaps against the usual way of coding the algorithm, so that a
speed-up is measured against something people actually run. The style is deliberately the common one:

- the KxK windows of a capsule grid are gathered with index tensors, then the poses are tiled over the
  output types with `.repeat` and the transforms tiled over the batch, and the votes come from one
  broadcast `matmul` of the two tiled tensors;
- the M- and E-steps broadcast over the full (N, positions, K*K*B, C, 16) votes tensor and materialise
  (votes - mean)^2 every time they need it;
- a child's assignments are a softmax over the output types at one position (no competition between
  positions), as public code does.

Unlike most public code it computes exactly what emcaps computes when emcaps is configured to match
(`RoutingConfig.named('paper', compete_positions=False)`): the same variance floor, inverse-temperature
schedule, cost, log-space E-step and coordinate addition. `load_from_emcaps` copies an emcaps `MatrixCapsNet`'s weights
in, so the two can be compared number for number (see tests/test_benchmarks.py).

Layout between layers, as in public code: one tensor (N, H, W, B*16 + B) holding every pose (types
major, then the 16 pose entries) followed by every activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8          # added to the sum of weighted assignments, as emcaps does
LN_2PI = math.log(2 * math.pi)
POSE = 16           # entries of a 4x4 pose matrix


def inverse_temperatures(iterations: int, final_lambda: float, schedule: str) -> list[float]:
    """Lambda for each routing iteration (same three schedules as emcaps)."""
    if schedule == "authors":
        return [final_lambda * (1 - 0.95 ** (i + 1)) for i in range(iterations)]
    if schedule == "linear":
        return [final_lambda * (i + 1) / iterations for i in range(iterations)]
    if schedule == "constant":
        return [final_lambda] * iterations
    raise ValueError(f"unknown inverse-temperature schedule {schedule!r}")


class EMRouting(nn.Module):
    """EM routing over votes (N, L, I, J, 16): L independent positions, I children, J parent types.

    Holds no parameters; the layer passes its beta_u and beta_a in.
    """

    def __init__(self, iterations: int = 3, final_lambda: float = 0.01, var_floor: float = 5e-4,
                 schedule: str = "authors") -> None:
        super().__init__()
        self.lambdas = inverse_temperatures(iterations, final_lambda, schedule)
        self.var_floor = var_floor

    def m_step(self, a_in: Tensor, r: Tensor, v: Tensor, beta_u: Tensor, beta_a: Tensor,
               lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """a_in (N, L, I, 1, 1), r (N, L, I, J, 1), v (N, L, I, J, 16)
        -> mu, sigma_sq (N, L, 1, J, 16), a_out and its logit (N, L, 1, J, 1)."""
        r = r * a_in                                                   # (N, L, I, J, 1)
        r_sum = r.sum(dim=2, keepdim=True)                             # (N, L, 1, J, 1)
        coeff = r / (r_sum + EPS)                                      # (N, L, I, J, 1)
        mu = torch.sum(coeff * v, dim=2, keepdim=True)                 # (N, L, 1, J, 16)
        sigma_sq = torch.sum(coeff * (v - mu) ** 2, dim=2, keepdim=True) + self.var_floor
        cost_h = (beta_u.view(-1, 1) + 0.5 * torch.log(sigma_sq)) * r_sum   # (N, L, 1, J, 16)
        logit = lam * (beta_a.view(-1, 1) - cost_h.sum(dim=-1, keepdim=True))   # (N, L, 1, J, 1)
        return mu, sigma_sq, torch.sigmoid(logit), logit

    def e_step(self, mu: Tensor, sigma_sq: Tensor, logit: Tensor, v: Tensor) -> Tensor:
        """New assignments (N, L, I, J, 1): softmax over the parent types J at each position."""
        ln_p_j_h = -(v - mu) ** 2 / (2 * sigma_sq) - 0.5 * torch.log(sigma_sq) - 0.5 * LN_2PI  # (N, L, I, J, 16)
        ln_ap = ln_p_j_h.sum(dim=-1, keepdim=True) + F.logsigmoid(logit)                     # (N, L, I, J, 1)
        return torch.softmax(ln_ap, dim=3)

    def forward(self, v: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor) -> tuple[Tensor, Tensor]:
        """v (N, L, I, J, 16), a_in (N, L, I) -> pose (N, L, J, 16), activation (N, L, J)."""
        n, positions, i, j, _ = v.shape
        a_in = a_in.view(n, positions, i, 1, 1)
        r = torch.full((n, positions, i, j, 1), 1.0 / j, dtype=v.dtype, device=v.device)
        for it, lam in enumerate(self.lambdas):
            mu, sigma_sq, a_out, logit = self.m_step(a_in, r, v, beta_u, beta_a, lam)
            if it < len(self.lambdas) - 1:
                r = self.e_step(mu, sigma_sq, logit, v)
        return mu.view(n, positions, j, POSE), a_out.view(n, positions, j)


class RefPrimaryCaps(nn.Module):
    """1x1 convolutions to B pose matrices and B activations: (N, A, H, W) -> (N, H, W, B*16 + B)."""

    def __init__(self, A: int, B: int) -> None:
        super().__init__()
        self.pose = nn.Conv2d(A, B * POSE, kernel_size=1)
        self.a = nn.Conv2d(A, B, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        p = self.pose(x)                                               # (N, B*16, H, W)
        a = torch.sigmoid(self.a(x))                                   # (N, B, H, W)
        return torch.cat([p, a], dim=1).permute(0, 2, 3, 1)            # (N, H, W, B*16 + B)


class RefConvCaps(nn.Module):
    """Capsule convolution with EM routing: (N, H, W, B*17) -> (N, H', W', C*17), or, for the class
    layer (`class_caps=True`, transforms shared over positions, coordinate addition), -> (N, C*17).
    """

    def __init__(self, B: int, C: int, K: int, stride: int, routing: EMRouting, class_caps: bool = False,
                 coord_add: bool = False) -> None:
        super().__init__()
        self.B, self.C, self.K, self.stride = B, C, K, stride
        self.class_caps, self.coord_add = class_caps, coord_add
        # One transform per (kernel offset, input type) and output type; the class layer has K = 1.
        self.weight = nn.Parameter(torch.randn(1, K * K * B, C, 4, 4))
        self.beta_u = nn.Parameter(torch.zeros(C))
        self.beta_a = nn.Parameter(torch.zeros(C))
        self.routing = routing

    def add_patches(self, x: Tensor) -> tuple[Tensor, int, int]:
        """(N, H, W, ch) -> KxK windows (N, H', W', K, K, ch) gathered by index tensors."""
        n, h, w, ch = x.shape
        oh, ow = (h - self.K) // self.stride + 1, (w - self.K) // self.stride + 1
        offsets = torch.arange(self.K, device=x.device)
        rows = (torch.arange(oh, device=x.device) * self.stride).view(-1, 1) + offsets   # (H', K)
        cols = (torch.arange(ow, device=x.device) * self.stride).view(-1, 1) + offsets   # (W', K)
        x = x[:, rows]                                                 # (N, H', K, W, ch)
        x = x[:, :, :, cols]                                           # (N, H', K, W', K, ch)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous(), oh, ow       # (N, H', W', K, K, ch)

    def transform_view(self, p: Tensor, w: Tensor) -> Tensor:
        """Tiled votes: poses p (b, I, 16), transforms w (1, I, C, 4, 4) -> (b, I, C, 16)."""
        b, i, _ = p.shape
        p = p.view(b, i, 1, 4, 4).repeat(1, 1, self.C, 1, 1)          # (b, I, C, 4, 4)
        w = w.repeat(b, 1, 1, 1, 1)                                    # (b, I, C, 4, 4)
        return torch.matmul(p, w).view(b, i, self.C, POSE)

    def add_coord(self, v: Tensor, h: int, w: int) -> Tensor:
        """Scaled receptive-field centre ((y+0.5)/H, (x+0.5)/W) added to pose entries (0,3), (1,3).

        v: (N, H, W, D, C, 16) -> the same.
        """
        coord_h = torch.zeros(1, h, 1, 1, 1, POSE, dtype=v.dtype, device=v.device)
        coord_w = torch.zeros(1, 1, w, 1, 1, POSE, dtype=v.dtype, device=v.device)
        coord_h[0, :, 0, 0, 0, 3] = (torch.arange(h, dtype=v.dtype, device=v.device) + 0.5) / h
        coord_w[0, 0, :, 0, 0, 7] = (torch.arange(w, dtype=v.dtype, device=v.device) + 0.5) / w
        return v + coord_h + coord_w

    def forward(self, x: Tensor) -> Tensor:
        B, C = self.B, self.C
        n, h, w, _ = x.shape
        if self.class_caps:
            p = x[..., :B * POSE].reshape(n, h * w * B, POSE)          # (N, H*W*D, 16)
            a_in = x[..., B * POSE:].reshape(n, 1, h * w * B)          # (N, 1, H*W*D)
            wt = self.weight.repeat(1, h * w, 1, 1, 1)                 # (1, H*W*D, E, 4, 4), shared over positions
            v = self.transform_view(p, wt)                             # (N, H*W*D, E, 16)
            if self.coord_add:
                v = self.add_coord(v.view(n, h, w, B, C, POSE), h, w)
            v = v.reshape(n, 1, h * w * B, C, POSE)                    # (N, 1, H*W*D, E, 16)
            mu, a_out = self.routing(v, a_in, self.beta_u, self.beta_a)
            return torch.cat([mu.view(n, C * POSE), a_out.view(n, C)], dim=1)       # (N, E*17)
        x, oh, ow = self.add_patches(x)                                # (N, H', W', K, K, B*17)
        kk = self.K * self.K
        p = x[..., :B * POSE].reshape(n * oh * ow, kk * B, POSE)      # (N*L, K*K*B, 16), (ky, kx, b)
        a_in = x[..., B * POSE:].reshape(n, oh * ow, kk * B)           # (N, L, K*K*B)
        v = self.transform_view(p, self.weight)                        # (N*L, K*K*B, C, 16)
        v = v.view(n, oh * ow, kk * B, C, POSE)                        # (N, L, K*K*B, C, 16)
        mu, a_out = self.routing(v, a_in, self.beta_u, self.beta_a)    # (N, L, C, 16), (N, L, C)
        return torch.cat([mu.reshape(n, oh, ow, C * POSE), a_out.view(n, oh, ow, C)], dim=-1)


class ReferenceCapsNet(nn.Module):
    """ReLU Conv1 -> PrimaryCaps -> ConvCaps1 -> ConvCaps2 -> Class capsules, as in the paper.

    (N, in_channels, 32, 32) -> class activations (N, E)
    """

    def __init__(self, A: int = 32, B: int = 32, C: int = 32, D: int = 32, E: int = 5, in_channels: int = 1,
                 iterations: int = 3, final_lambda: float = 0.01, var_floor: float = 5e-4,
                 schedule: str = "authors", coord_add: bool = True) -> None:
        super().__init__()
        routing = EMRouting(iterations, final_lambda, var_floor, schedule)
        self.E = E
        self.conv1 = nn.Conv2d(in_channels, A, kernel_size=5, stride=2)
        self.primary_caps = RefPrimaryCaps(A, B)
        self.conv_caps1 = RefConvCaps(B, C, K=3, stride=2, routing=routing)
        self.conv_caps2 = RefConvCaps(C, D, K=3, stride=1, routing=routing)
        self.class_caps = RefConvCaps(D, E, K=1, stride=1, routing=routing, class_caps=True, coord_add=coord_add)

    def capsules(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class pose (N, E, 4, 4) and activation (N, E)."""
        x = F.relu(self.conv1(x))
        x = self.primary_caps(x)
        x = self.conv_caps1(x)
        x = self.conv_caps2(x)
        x = self.class_caps(x)                                         # (N, E*17)
        n = x.shape[0]
        return x[:, :self.E * POSE].view(n, self.E, 4, 4), x[:, self.E * POSE:]

    def forward(self, x: Tensor) -> Tensor:
        return self.capsules(x)[1]


def pack_capsules(pose: Tensor, activation: Tensor) -> Tensor:
    """emcaps' (pose (N, H, W, B, 4, 4), activation (N, H, W, B)) -> the reference's (N, H, W, B*17)."""
    return torch.cat([pose.flatten(-3), activation], dim=-1)


def unpack_capsules(x: Tensor, types: int) -> tuple[Tensor, Tensor]:
    """The reference's (..., B*17) -> pose (..., B, 4, 4) and activation (..., B)."""
    lead = x.shape[:-1]
    return x[..., :types * POSE].reshape(*lead, types, 4, 4), x[..., types * POSE:]


def routing_kwargs(routing, strict: bool = True) -> dict:
    """The reference's routing arguments for an emcaps RoutingConfig.

    strict: refuse a config the reference cannot match. Benchmarks pass False to compare against the
    library's default (position competition), which the reference leaves out as public code does.
    """
    if strict and routing.compete_positions:
        raise ValueError("the reference normalises assignments per position: use "
                         "RoutingConfig(compete_positions=False) for an emcaps model it should match")
    if strict and routing.normalise_cost:
        raise ValueError("the reference has no cost normalisation: use RoutingConfig(normalise_cost=False)")
    paper = routing.activation == "paper" and routing.estep_temperature == 1.0
    if strict and not paper:
        raise ValueError("the reference computes the paper's activation and E-step: use "
                         "RoutingConfig.named('paper', compete_positions=False)")
    # Not strict: the reference keeps the paper's formula, with the paper's inverse temperature.
    return dict(iterations=routing.iterations, final_lambda=routing.final_lambda if paper else 0.01,
                var_floor=routing.var_floor, schedule=routing.schedule)


@torch.no_grad()
def _copy_conv_caps(ref: RefConvCaps, layer) -> None:
    # emcaps ConvCaps.weight (K*K*B, C, 4, 4), ClassCaps.weight (D, E, 4, 4) -> (1, ..., C, 4, 4)
    ref.weight.copy_(layer.weight.unsqueeze(0))
    ref.beta_u.copy_(layer.beta_u)
    ref.beta_a.copy_(layer.beta_a)


def reference_conv_caps(layer, strict: bool = True) -> RefConvCaps:
    """A reference ConvCaps with the weights of an emcaps ConvCaps layer (`strict` as in routing_kwargs)."""
    ref = RefConvCaps(layer.in_types, layer.out_types, layer.kernel, layer.stride,
                      EMRouting(**routing_kwargs(layer.routing, strict)))
    _copy_conv_caps(ref, layer)
    return ref.to(layer.weight.dtype)


def load_from_emcaps(model, strict: bool = True) -> ReferenceCapsNet:
    """A reference network computing what the emcaps `MatrixCapsNet` `model` computes, weights copied.

    With `strict`, the model's routing must be configured to match (compete_positions=False,
    normalise_cost=False); without, the reference routes per position whatever the model does.
    """
    c = model.config
    ref = ReferenceCapsNet(c.A, c.B, c.C, c.D, c.classes, c.in_channels, coord_add=c.coord_add,
                           **routing_kwargs(c.routing, strict))
    ref = ref.to(model.conv1.weight.dtype)
    with torch.no_grad():
        ref.conv1.load_state_dict(model.conv1.state_dict())
        ref.primary_caps.pose.load_state_dict(model.primary.pose.state_dict())
        ref.primary_caps.a.load_state_dict(model.primary.activation.state_dict())
    _copy_conv_caps(ref.conv_caps1, model.conv_caps1)
    _copy_conv_caps(ref.conv_caps2, model.conv_caps2)
    _copy_conv_caps(ref.class_caps, model.class_caps)
    return ref
