"""How a capsule layer runs its routing on a device: backend, chunking, recomputation. None of it changes the
result (the tests hold every backend and chunking to the same values), so none of it is stored with the
mathematics (RoutingConfig): a model trained on a CPU runs with the GPU's settings on a GPU, and back.

`Runtime` holds what a user asked for; its zero / 'auto' fields are chosen per device by `Runtime.on(device)`:
- CPU: the native kernels where they build, else PyTorch ops; chunks whose votes stay within 12 MB (in cache,
  below glibc's mmap threshold, so the allocator reuses blocks instead of zero-filling fresh pages); with
  PyTorch ops, training recomputes each chunk's routing in the backward pass instead of storing it.
- CUDA: whole batches within a budget taken from the device's free memory (a quarter of it, as votes, which
  leaves room for the moments and the tensors kept for the backward pass); what the backward pass needs is
  stored; the backend is torch.compile's fused kernel, or PyTorch ops where compiling fails (said once, in
  one line, and remembered for the process).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "native", "triton", "torch", "compile")
RECOMPUTE = ("auto", "yes", "no")
DEVICE_OF_BACKEND = {"native": "cpu", "triton": "cuda"}     # backends that run on one kind of device only
CPU_CHUNK_MB = 12.0
CUDA_MEMORY_SHARE = 0.25           # of the free device memory, as votes of one chunk

log = logging.getLogger("emcaps")


@dataclass(frozen=True)
class Runtime:
    """How routing runs (RunConfig section [runtime]); 0 and 'auto' are chosen for the device (module doc).

    backend:          'native' (C++ kernels that recompute the votes in every pass and never store them, with
                      a hand-written backward; CPU only, built with the system compiler on first use), 'triton'
                      (the same kernels in Triton, on CUDA, with the same backward; needs the triton package),
                      'torch' (PyTorch ops), 'compile' (a torch.compile'd kernel: fused loops, no votes-sized
                      temporaries; the first call of each shape pays the compile time), or 'auto'. Class
                      capsules on the native path use the same kernels; traced calls always use PyTorch ops.
    chunk:            route this many images at a time (0: as many as fit the budget below).
    chunk_mb:         the votes budget of a chunk, in MB (0: 12 on a CPU, a share of free memory on CUDA).
    native_chunk_mb:  the same on the native and triton paths, for their largest tensors, the assignments
                      (1/16 of the votes they never store) (0: 12 on a CPU, a quarter of chunk_mb on CUDA).
    recompute:        'yes': when training, keep only each layer's inputs and recompute votes and routing in the
                      backward pass, chunk by chunk; 'no': store what the backward pass needs; 'auto': yes on
                      a CPU, no on CUDA.
    """

    backend: str = "auto"
    chunk: int = 0
    chunk_mb: float = 0.0
    native_chunk_mb: float = 0.0
    recompute: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown routing backend {self.backend!r}; expected one of {BACKENDS}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"runtime recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"routing chunk must be an integer >= 0, got {self.chunk!r}")
        if not self.chunk_mb >= 0:
            raise ValueError(f"chunk_mb must be >= 0 (MB; 0 = chosen for the device), got {self.chunk_mb}")
        if not self.native_chunk_mb >= 0:
            raise ValueError(f"native_chunk_mb must be >= 0 (MB; 0 = chosen for the device), "
                             f"got {self.native_chunk_mb}")

    def for_device(self, device: torch.device | str) -> Runtime:
        """This runtime for a model moved to `device`: a backend made for another kind of device becomes 'auto'.
        A saved run's runtime says how it ran, never what it computed, so its model still loads elsewhere."""
        only = DEVICE_OF_BACKEND.get(self.backend)
        if only is None or torch.device(device).type == only:
            return self
        return dataclasses.replace(self, backend="auto")

    def on(self, device: torch.device, free_bytes: int | None = None) -> Settings:
        """The settings a layer uses on `device`. `free_bytes` stands in for the device's free memory (tests)."""
        return _settings(self, device, free_bytes)


@dataclass(frozen=True)
class Settings:
    """Concrete routing settings on one device: what `Runtime.on` chose."""

    backend: str                     # 'native', 'triton', 'torch' or 'compile' ('auto' resolved, bar native's check)
    chunk: int
    chunk_mb: float
    native_chunk_mb: float
    recompute: bool
    recompute_if_chunked: bool = False    # CUDA's 'auto': store everything unless the batch needs chunks
    compile_fallback: bool = False        # 'compile' chosen by 'auto': PyTorch ops where compiling fails

    def images_per_chunk(self, batch: int, bytes_per_image: int, native: bool = False) -> int:
        """How many images of a batch to route at once: `bytes_per_image` of votes (native: of assignments)."""
        if self.chunk > 0:
            return self.chunk
        budget = self.native_chunk_mb if native else self.chunk_mb
        return max(1, min(batch, int(budget * 2**20 // max(bytes_per_image, 1))))

    def describe(self) -> str:
        """How the batch is cut and what the backward pass keeps, for the run's log."""
        chunk = f"{self.chunk} images" if self.chunk else f"{self.chunk_mb:,.0f} MB of votes"
        kept = "recomputed" if self.recompute else "recomputed if chunked" if self.recompute_if_chunked else "stored"
        return f"chunks of {chunk}, {kept} for the backward pass"




@functools.cache
def _settings(runtime: Runtime, device: torch.device, free_bytes: int | None) -> Settings:
    if device.type == "cuda":
        if free_bytes is None:        # the layer's own GPU, which need not be the current one (cuda:1 on a shared box)
            free_bytes, _ = torch.cuda.mem_get_info(device)
        chunk_mb = runtime.chunk_mb or max(CPU_CHUNK_MB, CUDA_MEMORY_SHARE * free_bytes / 2**20)
        backend = runtime.backend
        if backend == "auto":
            backend = "torch" if compile_failed() else "compile"
        native_mb = runtime.native_chunk_mb or chunk_mb / 4
        return Settings(backend, runtime.chunk, chunk_mb, native_mb, runtime.recompute == "yes",
                        recompute_if_chunked=runtime.recompute == "auto",
                        compile_fallback=runtime.backend == "auto" and backend == "compile")
    return Settings(runtime.backend, runtime.chunk, runtime.chunk_mb or CPU_CHUNK_MB,
                    runtime.native_chunk_mb or CPU_CHUNK_MB, runtime.recompute != "no")


_COMPILE_FAILED: list[str] = []


def compile_failed() -> bool:
    """Whether torch.compile failed once in this process (`auto` then routes with PyTorch ops)."""
    return bool(_COMPILE_FAILED)


def note_compile_failure(error: BaseException) -> None:
    """Remember that compiling the routing failed, say so in one line, and clear the cached settings."""
    if not _COMPILE_FAILED:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("emcaps: torch.compile failed for the routing (%s: %s); routing with PyTorch ops",
                    type(error).__name__, first[:200])
    _COMPILE_FAILED.append(type(error).__name__)
    _settings.cache_clear()
