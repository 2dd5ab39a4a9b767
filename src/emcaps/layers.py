"""Capsule layers: PrimaryCaps, ConvCaps (capsule convolution with EM routing), ClassCaps.

Each layer takes and returns `Capsules`; the pose grid is channels-last, (N, H, W, types, 4, 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from emcaps.capsules import Capsules, conv_output_size, gather_windows
from emcaps.kernels import library
from emcaps.routing import PositionCompetition, RoutingConfig, RoutingStep, em_routing_fused
from emcaps.routing.native import check_device, conv_routing, native_available
from emcaps.routing.runtime import Runtime, Settings

if TYPE_CHECKING:
    from emcaps.routing.native import Kernels


def _trunc_normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
    w = torch.empty(shape)
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
    return nn.Parameter(w)


BIAS_INITS = ("zeros", "authors", "ibm")


def _biases(types: int, bias_init: str, layer: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The learned (beta_u, beta_a) parameters of a routed layer, (types,) each, as `bias_init` names them.

    'zeros'; 'authors': the google-research code's sigma_b and act_b, 0.5 and 0.5 in capsule convolutions,
    2.0 and 1.0 in the class layer (RoutingConfig.beta_u_scale / beta_a_scale turn them into costs);
    'ibm': beta_a from N(-1000, 500) truncated at 2 std, beta_u Glorot-uniform over (1, types) as TF's
    xavier initializer draws it for IBM's (1, 1, 1, 1, types, 1) variable.
    """
    if bias_init not in BIAS_INITS:
        raise ValueError(f"unknown bias initialisation {bias_init!r}; expected one of {BIAS_INITS}")
    beta_u, beta_a = torch.zeros(types), torch.zeros(types)
    if bias_init == "authors":
        beta_u.fill_(2.0 if layer == "class" else 0.5)
        beta_a.fill_(1.0 if layer == "class" else 0.5)
    elif bias_init == "ibm":
        limit = (6.0 / (types + 1)) ** 0.5
        nn.init.uniform_(beta_u, -limit, limit)
        nn.init.trunc_normal_(beta_a, mean=-1000.0, std=500.0, a=-2000.0, b=0.0)
    return nn.Parameter(beta_u), nn.Parameter(beta_a)


def _transform(poses: Tensor, weight: Tensor) -> Tensor:
    """Multiply each child's pose by its transforms to every parent type.

    poses:  (I, M, 4, 4)   child pose i of routing problem m
    weight: (I, J, 4, 4)   transform from child i to parent type j
    ->      (M, J, I, 16)  votes, in the layout `em_routing_fused` wants
    """
    n_in, m = poses.shape[:2]
    n_out = weight.shape[1]
    # One batched product over children: (I, M*4, 4) @ (I, 4, J*4) -> (I, M*4, J*4)
    votes = torch.bmm(poses.reshape(n_in, m * 4, 4), weight.permute(0, 2, 1, 3).reshape(n_in, 4, n_out * 4))
    return votes.view(n_in, m, 4, n_out, 4).permute(1, 3, 0, 2, 4).reshape(m, n_out, n_in, 16)


def _route_kernels(settings: Settings, pose: Tensor, trace: list[RoutingStep] | None) -> Kernels | None:
    """The kernels that route this call without storing votes (C++ on a CPU, Triton on CUDA; see
    `Runtime.backend`), or None: PyTorch ops."""
    if trace is not None:
        return None                       # a trace records every iteration's tensors: PyTorch ops
    if settings.backend == "native":
        if not native_available(pose.device):
            raise RuntimeError(f"routing backend 'native' needs a CPU tensor and the emcaps kernels "
                               f"(got a {pose.device.type} tensor; see emcaps.kernels)")
        return library()
    if settings.backend == "triton":
        from emcaps.kernels.triton_kernels import triton_available, triton_kernels  # imports triton: only here

        if not triton_available(pose.device):
            raise RuntimeError(f"routing backend 'triton' needs a CUDA tensor and the triton package (got a "
                               f"{pose.device.type} tensor{'' if triton_kernels() else ', and no triton'}; on a "
                               f"CPU, TRITON_INTERPRET=1 runs its kernels in Triton's interpreter)")
        return triton_kernels()
    return library() if settings.backend == "auto" and native_available(pose.device) else None


def _route_in_chunks(route: Callable[..., tuple[Tensor, Tensor]], caps: Capsules, settings: Settings,
                     trace: list[RoutingStep] | None, votes_per_image: int, native: bool) -> tuple[Tensor, Tensor]:
    """Run `route(pose, activation)` on chunks of images and concatenate the results, outside autocast.

    Images route independently, so chunking changes nothing but the working set. The native kernels never
    store votes: their largest tensors are the assignments (1/16 of the votes), budgeted by
    `native_chunk_mb`, and checkpointing would only repeat the forward pass. With PyTorch ops, when training
    with `recompute`, each chunk is checkpointed: only the layer's inputs are kept, and the chunk's votes and
    EM iterations are recomputed in the backward pass. A trace needs the whole batch in one piece.
    """
    with torch.autocast(caps.pose.device.type, enabled=False):
        caps = _at_least_float32(caps)
        n = caps.pose.shape[0]
        if trace is not None:
            return route(caps.pose, caps.activation, trace)
        per_image = (votes_per_image // 16 if native else votes_per_image) * caps.pose.element_size()
        step = settings.images_per_chunk(n, per_image, native=native)
        recompute = settings.recompute or (settings.recompute_if_chunked and step < n)
        save_all = native or not (recompute and torch.is_grad_enabled())
        parts = [route(caps.pose[s:s + step], caps.activation[s:s + step]) if save_all
                 else checkpoint(route, caps.pose[s:s + step], caps.activation[s:s + step], use_reentrant=False)
                 for s in range(0, n, step)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts])


def _at_least_float32(caps: Capsules) -> Capsules:
    """Half-precision capsules (from layers run under autocast) in float32: votes and routing statistics lose
    the differences between parent types in 8 bits of mantissa, so capsule layers never route in them."""
    if caps.pose.dtype in (torch.float16, torch.bfloat16):
        return caps.to(torch.float32)
    return caps


class _Routed(nn.Module):
    """What ConvCaps and ClassCaps share: the routing's mathematics (`routing`, saved with a model's config)
    and how it runs (`runtime`, chosen per device and never saved: set it with `MatrixCapsNet.set_runtime`)."""

    routing: RoutingConfig
    runtime: Runtime = Runtime()

    def settings(self, device: torch.device) -> Settings:
        """The runtime's settings on `device` (emcaps.routing.runtime)."""
        return self.runtime.on(device)

    def uses_native(self, pose: Tensor, trace: list[RoutingStep] | None = None) -> bool:
        """Whether this call routes with kernels that never store votes, C++ or Triton (`Runtime.backend`)."""
        return self.route_kernels(pose, trace) is not None

    def route_kernels(self, pose: Tensor, trace: list[RoutingStep] | None = None) -> Kernels | None:
        """The kernels this call routes with (C++ or Triton), or None for PyTorch ops."""
        return _route_kernels(self.settings(pose.device), pose, trace)

    def _check_device(self, caps: Capsules) -> None:
        """Parameters and capsules must share a device: the kernels would read another device's pointers."""
        check_device(caps.pose.device, type(self).__name__, activation=caps.activation,
                     **dict(self.named_parameters()))


class PrimaryCaps(nn.Module):
    """1x1 convolution from a feature map to capsules: a linear 4x4 pose and a logistic activation per type.

    (N, A, H, W) -> Capsules(pose (N, H, W, B, 4, 4), activation (N, H, W, B))
    """

    def __init__(self, in_channels: int, types: int, activation_offset: float = 0.0) -> None:
        super().__init__()
        self.types = types
        self.activation_offset = activation_offset        # activation = sigmoid(x - offset) (authors: 1)
        self.pose = nn.Conv2d(in_channels, types * 16, kernel_size=1)
        self.activation = nn.Conv2d(in_channels, types, kernel_size=1)
        nn.init.trunc_normal_(self.pose.weight, std=0.5, a=-1.0, b=1.0)
        nn.init.trunc_normal_(self.activation.weight, std=3.0, a=-6.0, b=6.0)
        nn.init.zeros_(self.pose.bias)
        nn.init.zeros_(self.activation.bias)

    def forward(self, x: Tensor) -> Capsules:
        """(N, A, H, W) -> Capsules (N, H, W, B, 4, 4), (N, H, W, B)."""
        if x.dim() != 4:
            raise ValueError(f"PrimaryCaps expects a feature map (N, C, H, W), got {tuple(x.shape)}")
        check_device(x.device, "PrimaryCaps", **dict(self.named_parameters()))    # a meta conv returns garbage
        n, _, h, w = x.shape
        pose = self.pose(x).permute(0, 2, 3, 1).reshape(n, h, w, self.types, 4, 4)
        act = torch.sigmoid(self.activation(x) - self.activation_offset).permute(0, 2, 3, 1)
        return Capsules(pose, act)


class ConvCaps(_Routed):
    """Capsule convolution: each KxK window of child capsules votes for C parent types, routed by EM.

    Capsules(pose (N, H, W, B, 4, 4)) -> Capsules(pose (N, H', W', C, 4, 4)), H' = (H - K) // S + 1
    """

    def __init__(self, in_types: int, out_types: int, kernel: int, stride: int,
                 routing: RoutingConfig = RoutingConfig(), std: float = 0.3, bias_init: str = "zeros",
                 gain: float = 1.0) -> None:
        super().__init__()
        if kernel < 1 or stride < 1:
            raise ValueError(f"kernel and stride must be >= 1, got kernel={kernel}, stride={stride}")
        self.in_types, self.out_types = in_types, out_types
        self.kernel, self.stride = kernel, stride
        self.routing = routing
        self.gain = gain
        self.weight = _trunc_normal((kernel * kernel * in_types, out_types, 4, 4), std=std)  # (K*K*B, C, 4, 4)
        self.beta_u, self.beta_a = _biases(out_types, bias_init, "conv")

    def extra_repr(self) -> str:
        return f"{self.in_types}, {self.out_types}, kernel={self.kernel}, stride={self.stride}"

    def windows(self, caps: Capsules) -> tuple[Tensor, Tensor]:
        """The capsules in each window: poses (N*L, K*K*B, 4, 4) and activations (N*L, K*K*B), L = H'*W'."""
        pose, act = caps
        if pose.dim() != 6 or pose.shape[3] != self.in_types:
            raise ValueError(f"ConvCaps expects pose (N, H, W, {self.in_types}, 4, 4), got {tuple(pose.shape)}")
        n, h, w = pose.shape[:3]
        m = n * conv_output_size(h, self.kernel, self.stride) * conv_output_size(w, self.kernel, self.stride)
        n_in = self.kernel * self.kernel * self.in_types
        poses = gather_windows(pose, self.kernel, self.stride).view(m, n_in, 4, 4)
        return poses, gather_windows(act, self.kernel, self.stride).view(m, n_in)

    def votes(self, caps: Capsules) -> tuple[Tensor, Tensor]:
        """Votes (N*L, C, K*K*B, 16) and child activations (N*L, K*K*B), L = H'*W' output positions."""
        poses, a_in = self.windows(caps)
        return _transform(poses.transpose(0, 1), self.transforms()), a_in

    def transforms(self) -> Tensor:
        """The transforms the votes use, (K*K*B, C, 4, 4): the parameters times the fixed `gain`."""
        return self.weight * self.gain if self.gain != 1.0 else self.weight

    def _route(self, pose: Tensor, act: Tensor, trace: list[RoutingStep] | None = None) -> tuple[Tensor, Tensor]:
        """(N, H, W, B, 4, 4), (N, H, W, B) -> pose (N, H', W', C, 4, 4), activation (N, H', W', C)"""
        n, h, w = pose.shape[:3]
        oh, ow = conv_output_size(h, self.kernel, self.stride), conv_output_size(w, self.kernel, self.stride)
        n_in = self.kernel * self.kernel * self.in_types
        scale = self.routing.layer_cost_scale(self.out_types, n_in,
                                              (oh * ow * self.out_types) / (h * w * self.in_types))
        beta_u, beta_a = routed_biases(self, self.routing)
        cd = torch.promote_types(pose.dtype, torch.float32)
        comp = initial = None
        if self.routing.compete_positions:
            comp = PositionCompetition.of(h, w, self.kernel, self.stride, self.in_types, pose.device)
            if self.routing.initial_assignments == "uniform":
                initial = comp.initial(n, self.out_types, cd)
        kernels = self.route_kernels(pose, trace)
        if kernels is not None:
            poses, a_in = self.windows(Capsules(pose, act))
            if initial is None:
                initial = pose.new_full((1, 1, 1), 1.0 / self.out_types, dtype=cd)
            pose, act = conv_routing(poses.reshape(*a_in.shape, 16), self.transforms().view(a_in.shape[1], -1, 16),
                                     a_in, beta_u, beta_a, self.routing, initial, comp, scale, kernels=kernels)
        else:
            votes, a_in = self.votes(Capsules(pose, act))
            pose, act = em_routing_fused(votes, a_in, beta_u, beta_a, self.routing, cost_scale=scale,
                                         initial=initial, normalise=comp, trace=trace,
                                         settings=self.settings(pose.device))
        return pose.view(n, oh, ow, self.out_types, 4, 4), act.view(n, oh, ow, self.out_types)

    def forward(self, caps: Capsules, trace: list[RoutingStep] | None = None) -> Capsules:
        """(N, H, W, B, 4, 4), (N, H, W, B) capsules -> (N, H', W', C, 4, 4), (N, H', W', C).

        `trace`, if a list, receives a RoutingStep per EM iteration (diagnostics): the whole batch then routes at
        once with PyTorch ops, whatever the runtime says, since the kernels keep no per-iteration tensors.
        """
        self._check_device(caps)
        h, w = caps.pose.shape[1:3]
        positions = ((h - self.kernel) // self.stride + 1) * ((w - self.kernel) // self.stride + 1)
        per_image = max(positions, 1) * self.out_types * self.kernel ** 2 * self.in_types * 16
        return Capsules(*_route_in_chunks(self._route, caps, self.settings(caps.pose.device), trace,
                                          per_image, self.uses_native(caps.pose, trace)))


class ClassCaps(_Routed):
    """Class capsules: one transform per (input type, class) shared across positions, with coordinate
    addition, routed by EM over every input capsule of the grid.

    Capsules(pose (N, H, W, D, 4, 4)) -> Capsules(pose (N, E, 4, 4), activation (N, E))
    """

    # The precision the routing runs in, at least (a float64 model routes in float64 whatever this says);
    # benchmarks/conditioning.py --class-routing float32 sets float32 to show what float64 keeps.
    route_dtype: torch.dtype = torch.float64

    def __init__(self, in_types: int, classes: int, coord_add: bool = True,
                 routing: RoutingConfig = RoutingConfig(), std: float = 0.3, bias_init: str = "zeros",
                 gain: float = 1.0) -> None:
        super().__init__()
        self.in_types, self.classes = in_types, classes
        self.gain = gain
        self.coord_add = coord_add
        self.routing = routing
        self.floor: float | None = None       # while training anneals it (RoutingConfig.class_floor_at); else None
        self.weight = _trunc_normal((in_types, classes, 4, 4), std=std)
        self.beta_u, self.beta_a = _biases(classes, bias_init, "class")

    def extra_repr(self) -> str:
        return f"{self.in_types}, {self.classes}, coord_add={self.coord_add}"

    def votes(self, caps: Capsules) -> tuple[Tensor, Tensor]:
        """Votes (N, E, H*W*D, 16) and child activations (N, H*W*D)."""
        pose, act = caps
        if pose.dim() != 6 or pose.shape[3] != self.in_types:
            raise ValueError(f"ClassCaps expects pose (N, H, W, {self.in_types}, 4, 4), got {tuple(pose.shape)}")
        n, h, w = pose.shape[:3]
        poses = pose.permute(3, 0, 1, 2, 4, 5).reshape(self.in_types, n * h * w, 4, 4)   # (D, N*H*W, 4, 4)
        votes = _transform(poses, self.transforms().to(pose.dtype))       # (N*H*W, E, D, 16)
        votes = votes.view(n, h * w, self.classes, self.in_types, 16).transpose(1, 2)  # (N, E, H*W, D, 16)
        if self.coord_add:
            votes = votes + coordinate_offsets(h, w, votes.dtype, votes.device).view(1, 1, h * w, 1, 16)
        return votes.reshape(n, self.classes, h * w * self.in_types, 16), act.reshape(n, h * w * self.in_types)

    def transforms(self) -> Tensor:
        """The shared transforms the votes use, (D, E, 4, 4): the parameters times the fixed `gain`."""
        return self.weight * self.gain if self.gain != 1.0 else self.weight

    def _route(self, pose: Tensor, act: Tensor, trace: list[RoutingStep] | None = None) -> tuple[Tensor, Tensor]:
        """(N, H, W, D, 4, 4), (N, H, W, D) -> pose (N, E, 4, 4), activation (N, E)"""
        if pose.dim() != 6 or pose.shape[3] != self.in_types:
            raise ValueError(f"ClassCaps expects pose (N, H, W, {self.in_types}, 4, 4), got {tuple(pose.shape)}")
        n, h, w = pose.shape[:3]
        n_in = h * w * self.in_types
        scale = self.routing.layer_cost_scale(self.classes, n_in, self.classes / n_in)
        beta_u, beta_a = routed_biases(self, self.routing)
        # In float64 (route_dtype): the classes' costs can differ in digits float32 drops, and this layer is a
        # small part of the network's work.
        dtype = pose.dtype
        route = torch.promote_types(dtype, self.route_dtype)
        pose, act, beta_u, beta_a = (t.to(route) for t in (pose, act, beta_u, beta_a))
        routing = self.routing.class_layer(self.floor)
        kernels = self.route_kernels(pose, trace)
        if kernels is not None:
            # One routing problem per image; child i = (position, type) uses its type's transform, and the
            # coordinate addition is a constant offset on each child's votes.
            weight = self.transforms().to(pose.dtype).view(1, self.in_types, self.classes, 16).expand(h * w, -1, -1, -1)
            offsets = None
            if self.coord_add:
                offsets = coordinate_offsets(h, w, pose.dtype, pose.device).view(h * w, 1, 16)
                offsets = offsets.expand(-1, self.in_types, -1).reshape(n_in, 16)
            initial = pose.new_full((1, 1, 1), 1.0 / self.classes)
            pose, act = conv_routing(pose.reshape(n, n_in, 16), weight.reshape(n_in, self.classes, 16),
                                     act.reshape(n, n_in), beta_u, beta_a, routing, initial, None, scale, offsets,
                                     kernels=kernels)
        else:
            votes, a_in = self.votes(Capsules(pose, act))
            settings = self.settings(pose.device)
            if self.floor is not None and settings.backend == "compile":
                settings = dataclasses.replace(settings, backend="torch")   # a new floor each step would recompile
            pose, act = em_routing_fused(votes, a_in, beta_u, beta_a, routing, cost_scale=scale, trace=trace,
                                         settings=settings)
        return pose.view(n, self.classes, 4, 4).to(dtype), act.to(dtype)

    def forward(self, caps: Capsules, trace: list[RoutingStep] | None = None) -> Capsules:
        """(N, H, W, D, 4, 4), (N, H, W, D) capsules -> class capsules (N, E, 4, 4), (N, E).

        `trace`, if a list, receives a RoutingStep per EM iteration (diagnostics): the whole batch then routes at
        once with PyTorch ops, whatever the runtime says, since the kernels keep no per-iteration tensors.
        """
        self._check_device(caps)
        per_image = caps.pose[0, ..., 0, 0].numel() * self.classes * 16 if caps.pose.shape[0] else 0
        return Capsules(*_route_in_chunks(self._route, caps, self.settings(caps.pose.device), trace,
                                          per_image, self.uses_native(caps.pose, trace)))


def routed_biases(layer: nn.Module, routing: RoutingConfig) -> tuple[Tensor, Tensor]:
    """The (beta_u, beta_a) a layer's routing uses, (J,) each: its parameters times the config's scales."""
    return layer.beta_u * routing.beta_u_scale, layer.beta_a * routing.beta_a_scale


def coordinate_offsets(height: int, width: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | None = None) -> Tensor:
    """Scaled (row, col) of each receptive-field centre, placed in the pose entries (0, 3) and (1, 3).

    -> (H*W, 16); row and column of position (y, x) are (y + 0.5) / H and (x + 0.5) / W.
    """
    rows = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    cols = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    off = torch.zeros(height, width, 4, 4, dtype=dtype, device=device)
    off[..., 0, 3] = rows.view(-1, 1)
    off[..., 1, 3] = cols.view(1, -1)
    return off.view(height * width, 16)
