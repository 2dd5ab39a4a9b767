"""Processes and devices: joining torchrun's process group (one shard of every epoch per rank) and
choosing this process's device."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from emcaps.config import ConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the torchrun process group if launched by torchrun (also with one process): nccl with one GPU per
    rank where the run's device is CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Distributed()
    global _OWN_GROUP
    if not dist.is_initialized():
        # Imported for its side effect, before the group exists: see end_distributed.
        import torch.distributed.nn.functional
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _OWN_GROUP = True
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# The default process group is process-wide; this records whether emcaps created it (and so ends it), so a
# caller's own group is left alone.
_OWN_GROUP = False


def backend_name() -> str:
    """The process group's backend ('nccl', 'gloo'), or 'none' outside torchrun."""
    return dist.get_backend() if dist.is_initialized() else "none"


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
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} was asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device
