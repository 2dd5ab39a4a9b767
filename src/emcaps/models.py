"""Models: the matrix capsule network of the paper, its baseline CNN, and a registry of named models.

Every model maps images (N, C, 32, 32) to class scores (N, E). `score_kind` tells losses and attacks
what the scores are: "activation" (capsule activations in [0, 1]) or "logit".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emcaps.capsules import Capsules
from emcaps.checks import choice, positive
from emcaps.layers import BIAS_INITS, ClassCaps, ConvCaps, PrimaryCaps
from emcaps.routing import RoutingConfig, RoutingStep, Runtime, parameterisation
from emcaps.routing.native import check_device


@dataclass(frozen=True)
class CapsuleOptions:
    """What a user sets on a capsule network beyond its size: coordinate addition, the initialisation (which a
    routing parameterisation names, emcaps.routing.PARAMETERISATIONS) and the decoder. A run config's `model`
    section is these and the model's name."""

    coord_add: bool = True
    conv_transform_std: float = 0.3       # initial std of the ConvCaps transforms (truncated at 2 std)
    class_transform_std: float = 0.3      # initial std of the class capsules' shared transforms (the authors'
                                          # 0.01 leaves votes that are mostly coordinate offsets: docs/research.md)
    transform_gain: float = 1.0           # routed layers' votes use gain * transforms (a fixed factor)
    bias_init: str = "zeros"              # the routed layers' beta_u, beta_a: 'zeros', 'authors', 'ibm' (layers)
    primary_activation_offset: float = 0.0  # primary activations sigmoid(x - offset) (the authors': 1)
    conv1_bias: float = 0.0               # initial bias of ReLU Conv1 (the authors': 0.1)
    decoder: bool = False                 # a ReconstructionDecoder from class poses to images

    def __post_init__(self) -> None:
        for name in ("conv_transform_std", "class_transform_std"):
            positive(f"model.{name}", getattr(self, name))
        choice("model.bias_init", self.bias_init, BIAS_INITS)

    def capsule_options(self) -> dict[str, Any]:
        """These fields alone, as keyword arguments of create_model."""
        return {f.name: getattr(self, f.name) for f in fields(CapsuleOptions)}


@dataclass(frozen=True)
class CapsNetConfig(CapsuleOptions):
    """A capsule network: its options, and A = conv1 channels, B = primary capsule types, C and D = ConvCaps1/2
    types, classes = E, the input channels, the routing, and the side of the input images (what the decoder
    draws)."""

    A: int = 32
    B: int = 32
    C: int = 32
    D: int = 32
    classes: int = 5
    in_channels: int = 1
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    image_size: int = 32


def _check_images(model: str, x: Tensor, weight: Tensor, channels: int, side: int, exact: bool) -> None:
    """Raise unless `x` is a non-empty batch of images (N, channels, H, W), H and W `side` (exact) or at least
    `side`, in the dtype and on the device of the model's first `weight`: torch's own errors come from deep
    inside a layer and name neither the model nor what it expects."""
    shape = f"(N, {channels}, {side}, {side})" if exact else f"(N, {channels}, H, W) with H, W >= {side}"
    expects = f"{model} expects a non-empty batch of floating-point images {shape}"
    if not isinstance(x, Tensor):
        raise TypeError(f"{expects}; got a {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{expects}; got {x.dtype}: convert them first, e.g. x.float()")
    if (x.dim() != 4 or x.shape[0] == 0 or x.shape[1] != channels
            or not all(s == side if exact else s >= side for s in x.shape[2:])):
        raise ValueError(f"{expects}; got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype and not _autocast_on(x.device.type):
        raise ValueError(f"{model} has {weight.dtype} weights and was given {x.dtype} images: convert the images "
                         f"(x.to({weight.dtype})) or the model (model.to({x.dtype}))")
    check_device(x.device, model, parameters=weight)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this kind of device (torch < 2.4 asks CPU and CUDA separately)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _as_runtime(runtime: Runtime | str) -> Runtime:
    """A Runtime, or a backend name (emcaps.routing.BACKENDS) standing for Runtime(backend=name)."""
    if isinstance(runtime, str):
        return Runtime(backend=runtime)
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a Runtime or a backend name, got {type(runtime).__name__}")
    return runtime


class Reconstruction(NamedTuple):
    """What a capsule network with a decoder makes of a batch of N images (N, C, S, S)."""

    scores: Tensor    # class activations (N, E)
    pose: Tensor      # class capsule poses (N, E, 4, 4)
    images: Tensor    # each image redrawn from one class capsule's pose (N, C, S, S)


class ReconstructionDecoder(nn.Module):
    """The capsule papers' decoder: class poses (N, E, 16) with all but one class zeroed -> FC 512 -> FC 1024
    -> an image (N, C, S, S) with linear output, since the images it redraws are standardised.

    Trained with the network, it asks the chosen class capsule's 16 pose entries to describe the image
    (position, slant, thickness...), which the spread loss alone never does. The chosen pose is first
    batch-normalised entry by entry: routed poses differ between images by as little as 1e-2 (each layer
    averages its children's disagreeing votes), and at that scale neither the decoder (Adam moves each
    weight by about lr, whatever the input's scale) nor the gradient it sends back would see them.
    """

    def __init__(self, classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.classes, self.image_shape = classes, tuple(image_shape)
        self.norm = nn.BatchNorm1d(16, eps=1e-8)          # poses may vary by 1e-3: keep eps below that squared
        self.net = nn.Sequential(nn.Linear(16 * classes, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(),
                                 nn.Linear(1024, math.prod(image_shape)))

    def forward(self, pose: Tensor, chosen: Tensor) -> Tensor:
        """pose (N, E, 4, 4) or (N, E, 16), chosen classes (N,) -> images (N, C, S, S)."""
        n = len(pose)
        picked = pose.reshape(n, self.classes, 16)[torch.arange(n, device=pose.device), chosen]    # (N, 16)
        batch_stats = self.training and n > 1          # one image has no batch statistics: use the running ones
        picked = F.batch_norm(picked, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                              self.norm.bias, batch_stats, self.norm.momentum, self.norm.eps)
        mask = F.one_hot(chosen, self.classes).to(pose.dtype).unsqueeze(-1)                # (N, E, 1)
        masked = picked.unsqueeze(1) * mask                                                # (N, E, 16)
        return self.net(masked.flatten(1)).view(-1, *self.image_shape)


class MatrixCapsNet(nn.Module):
    """The smallNORB network: ReLU Conv1 -> PrimaryCaps -> ConvCaps1 -> ConvCaps2 -> ClassCaps.

    (N, in_channels, 32, 32) -> 14x14xA -> 14x14xB caps -> 6x6xC caps -> 4x4xD caps -> E caps
    """

    score_kind = "activation"

    def __init__(self, config: CapsNetConfig = CapsNetConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv1 = nn.Conv2d(c.in_channels, c.A, kernel_size=5, stride=2)
        nn.init.trunc_normal_(self.conv1.weight, std=0.05, a=-0.1, b=0.1)
        nn.init.constant_(self.conv1.bias, c.conv1_bias)
        self.primary = PrimaryCaps(c.A, c.B, activation_offset=c.primary_activation_offset)
        self.conv_caps1 = ConvCaps(c.B, c.C, kernel=3, stride=2, routing=c.routing, std=c.conv_transform_std,
                                   bias_init=c.bias_init, gain=c.transform_gain)
        self.conv_caps2 = ConvCaps(c.C, c.D, kernel=3, stride=1, routing=c.routing, std=c.conv_transform_std,
                                   bias_init=c.bias_init, gain=c.transform_gain)
        self.class_caps = ClassCaps(c.D, c.classes, coord_add=c.coord_add, routing=c.routing,
                                    std=c.class_transform_std, bias_init=c.bias_init, gain=c.transform_gain)
        self.decoder = (ReconstructionDecoder(c.classes, (c.in_channels, c.image_size, c.image_size))
                        if c.decoder else None)

    @property
    def min_image_size(self) -> int:
        """The smallest image side every kernel fits in: one class-capsule position needs a ConvCaps2 window,
        which needs ConvCaps1 windows, which need Conv1's."""
        side = 1
        for kernel, stride in ((self.conv_caps2.kernel, self.conv_caps2.stride),
                               (self.conv_caps1.kernel, self.conv_caps1.stride),
                               (self.conv1.kernel_size[0], self.conv1.stride[0])):
            side = (side - 1) * stride + kernel
        return side

    def set_runtime(self, runtime: Runtime | str) -> MatrixCapsNet:
        """Route with `runtime` (backend, chunks, recomputation; emcaps.routing.runtime; a backend name for
        Runtime(backend=name)) from now on: how the routing runs, not what it computes, so it is not part of
        the config and not saved. Returns self."""
        runtime = _as_runtime(runtime)
        for layer in (self.conv_caps1, self.conv_caps2, self.class_caps):
            layer.runtime = runtime
        return self

    def set_class_floor(self, floor: float | None) -> MatrixCapsNet:
        """Route the class capsules with this variance floor until set again (None: the config's). The training
        loop anneals it (RoutingConfig.class_floor_start); it is not part of the config and not saved. Returns
        self."""
        self.class_caps.floor = floor
        return self

    def capsules(self, x: Tensor, trace: list[RoutingStep] | None = None) -> Capsules:
        """Class capsules for images (N, C, H, W): pose (N, E, 4, 4), activation (N, E).

        `trace`, if given, collects the class layer's routing iterations.
        """
        _check_images("MatrixCapsNet", x, self.conv1.weight, self.config.in_channels, self.min_image_size, False)
        caps = self.primary(F.relu(self.conv1(x)))
        caps = self.conv_caps2(self.conv_caps1(caps))
        return self.class_caps(caps, trace=trace)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> class activations (N, E)."""
        return self.capsules(x).activation

    def reconstruct(self, x: Tensor, target: Tensor | None = None) -> Reconstruction:
        """Images (N, C, S, S) -> scores, poses, and each image redrawn by the decoder from the pose of its
        `target` class (N,) (training), or of the class the network predicts (testing)."""
        if self.decoder is None:
            raise ValueError("this capsule network has no decoder (CapsNetConfig.decoder / model.decoder)")
        caps = self.capsules(x)
        chosen = caps.activation.argmax(1) if target is None else target
        return Reconstruction(caps.activation, caps.pose, self.decoder(caps.pose, chosen))


class Reconstructing(nn.Module):
    """A capsule network with a decoder whose forward is `reconstruct(x, target)`: training's one call,
    so that DistributedDataParallel sees it (a plain method call would bypass its gradient averaging).
    It adds no parameters; the wrapped network's state_dict is the one to save."""

    def __init__(self, net: MatrixCapsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, target: Tensor) -> Reconstruction:
        """(N, C, S, S), (N,) -> Reconstruction."""
        return self.net.reconstruct(x, target)


class BaselineCNN(nn.Module):
    """The paper's baseline: conv 5x5x32 + pool, conv 5x5x64 + pool, FC 1024 + dropout, FC E.

    (N, in_channels, S, S) -> logits (N, E), S = image_size (its classifier is sized for it); about 4.2M
    parameters at 32x32.
    """

    score_kind = "logit"

    def __init__(self, classes: int = 5, in_channels: int = 1, image_size: int = 32, dropout: float = 0.5) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"BaselineCNN needs images of side >= 4 (two 2x2 poolings), got image_size={image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 1024), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(1024, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, S, S), S = image_size -> logits (N, E)."""
        _check_images(f"BaselineCNN(image_size={self.image_size})", x, self.features[0].weight, self.in_channels,
                      self.image_size, True)
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder (register_model says what it is called with) and whether it is a
    capsule network."""

    build: Callable[..., nn.Module]
    capsules: bool
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, capsules: bool = True, description: str = "") -> Callable:
    """Decorator: register a builder `build(**keywords) -> nn.Module` under `name`, for create_model,
    list_models and run configs (`model.name`) in the Python process that registers it (the `emcaps` command
    cannot import your code: train such a model from a script, with emcaps.training.loop.train).

    The builder is called with keywords only: `classes` and `in_channels` always; by create_model, whatever
    else its caller passes; by a run config (emcaps.training.build.build_model), `image_size` (data.crop, the
    side of the images it sees) and, where `capsules` is true, `routing` (a RoutingConfig), `runtime` (a
    Runtime) and the `model.*` options (CapsuleOptions' fields), so a builder takes `**options` for those it
    does not use. The model maps images (N, in_channels, S, S) to scores (N, classes); its `score_kind`
    ('activation' or 'logit', the default) picks the loss a run config's `loss.name = "auto"` trains it with.
    """
    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(build, capsules, description or (build.__doc__ or "").strip().split("\n")[0])
        return build
    return register


def list_models(capsules: bool | None = None) -> list[str]:
    """The registered model names (only capsule networks, or only the others, if `capsules` says so)."""
    return [n for n, e in _REGISTRY.items() if capsules is None or e.capsules == capsules]


def is_capsule_model(name: str) -> bool:
    return _entry(name).capsules


def _entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


_CAPSULE_OPTIONS = tuple(f.name for f in fields(CapsNetConfig) if f.name not in ("classes", "in_channels", "routing"))
_ROUTING_FIELDS = {f.name for f in fields(RoutingConfig)}
_RUNTIME_FIELDS = {f.name for f in fields(Runtime)}


def _check_capsule_options(options: dict[str, Any]) -> None:
    """A TypeError for keywords a capsule network does not take, sending routing and runtime settings to their
    own arguments: create_model("small", iterations=2) means routing=RoutingConfig(iterations=2)."""
    unknown = sorted(set(options) - set(_CAPSULE_OPTIONS))
    if not unknown:
        return
    routing = [k for k in unknown if k in _ROUTING_FIELDS]
    runtime = [k for k in unknown if k in _RUNTIME_FIELDS]
    hint = (f"; routing settings go in routing=RoutingConfig({routing[0]}=...) or "
            f"routing=RoutingConfig.named(NAME, {routing[0]}=...)" if routing else "")
    hint += f"; how the routing runs goes in runtime=Runtime({runtime[0]}=...)" if runtime else ""
    raise TypeError(f"a capsule network takes classes, in_channels, routing, runtime, pretrained and "
                    f"{', '.join(_CAPSULE_OPTIONS)}; got {', '.join(unknown)}{hint}")


def _capsule_preset(preset: CapsNetConfig) -> Callable[..., nn.Module]:
    def build(classes: int = 5, in_channels: int = 1, routing: RoutingConfig | str | None = None,
              coord_add: bool | None = None, runtime: Runtime | str | None = None, **fields) -> MatrixCapsNet:
        _check_capsule_options(fields)
        config = replace(preset, classes=classes, in_channels=in_channels)
        if isinstance(routing, str):
            routing = RoutingConfig.named(routing)
        if routing is not None:
            if not isinstance(routing, RoutingConfig):
                raise TypeError(f"routing must be a RoutingConfig or a parameterisation's name "
                                f"(emcaps.PARAMETERISATIONS), got {type(routing).__name__}")
            # The initialisation goes with the routing's parameterisation, as `--set routing.parameterisation`
            # gives it: fields passed here override it.
            named = parameterisation(routing.parameterisation)
            fields = {**(named.init if named else {}), **fields}
            config = replace(config, routing=routing)
        if coord_add is not None:
            config = replace(config, coord_add=coord_add)
        model = MatrixCapsNet(replace(config, **fields))
        return model.set_runtime(runtime) if runtime is not None else model
    return build


CAPSULE_PRESETS: dict[str, CapsNetConfig] = {
    "paper": CapsNetConfig(A=32, B=32, C=32, D=32),
    "small": CapsNetConfig(A=64, B=8, C=16, D=16),
    "tiny": CapsNetConfig(A=16, B=4, C=4, D=4),
}
_ABOUT = {"paper": "the paper's smallNORB network, A=B=C=D=32 (about 310K parameters)",
          "small": "the paper's small network, A=64, B=8, C=D=16 (about 68K parameters)",
          "tiny": "A=16, B=C=D=4: for tests and quick runs"}
for _name, _preset in CAPSULE_PRESETS.items():
    register_model(_name, description=_ABOUT[_name])(_capsule_preset(_preset))


@register_model("cnn", capsules=False, description="the paper's baseline CNN (about 4.2M parameters)")
def _baseline_cnn(classes: int = 5, in_channels: int = 1, image_size: int = 32, dropout: float = 0.5) -> BaselineCNN:
    return BaselineCNN(classes=classes, in_channels=in_channels, image_size=image_size, dropout=dropout)


def create_model(name: str, classes: int | None = None, in_channels: int | None = None,
                 pretrained: str | None = None, **options) -> nn.Module:
    """A registered model by name (list_models()): a capsule preset ('paper', 'small', 'tiny') or 'cnn', for
    `classes` classes (default 5) and images of `in_channels` channels (default 1).

    Capsule networks take `routing` (a RoutingConfig, or a parameterisation's name for RoutingConfig.named(name);
    the initialisation is then the one its parameterisation names, emcaps.routing.PARAMETERISATIONS, as in a run
    config), `runtime` (how the routing runs, a Runtime or a backend name; default: chosen per device, see
    MatrixCapsNet.set_runtime), `coord_add`, and CapsNetConfig fields (e.g. class_transform_std, decoder) that
    override the preset's. The CNN takes `image_size` (its images' side, default 32) and `dropout`.
    (N, in_channels, 32, 32) -> scores (N, classes).
    `pretrained` names weights shipped with emcaps (emcaps.pretrained.list_pretrained()): the trained network,
    in eval mode, with the classes, channels and settings it was trained with (asking for others is an error).
    """
    entry = _entry(name)
    if pretrained is not None:
        from emcaps import pretrained as shipped

        if options:
            raise ValueError(f"pretrained weights come with the settings they were trained with; got {sorted(options)}")
        return shipped.load(pretrained, model=name, classes=classes, in_channels=in_channels)
    keywords = {"classes": 5 if classes is None else classes, "in_channels": 1 if in_channels is None else in_channels,
                **options}
    signature = inspect.signature(entry.build)
    try:
        signature.bind(**keywords)
    except TypeError as err:       # say which model, and what its builder takes, rather than only what it refused
        takes = ", ".join(("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in signature.parameters.values())
        raise TypeError(f"model {name!r} takes {takes}; {err} (register_model lists what run configs pass a "
                        f"builder)") from None
    return entry.build(**keywords)


def count_parameters(model: nn.Module) -> int:
    """The trainable parameters' count: what the paper's model sizes (310K, 68K, 4.2M) count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
