"""Native CPU kernels for EM routing (em_kernels.cpp), built with the system C++ compiler on first use.

Why native code: every pass of EM routing reads the votes, and a capsule convolution's votes are about
30 MB per image. The kernels recompute each vote from its 4x4 pose and transform inside the pass, in
registers, so no votes tensor is ever written or read; PyTorch cannot express that without materialising it.

The shared library is cached under the user's cache (`$EMCAPS_KERNEL_DIR`, else `kernels/` in the emcaps
cache that emcaps.data also uses: `$EMCAPS_DATA_DIR`, `$XDG_CACHE_HOME/emcaps` or `~/.cache/emcaps`),
one file per (source, compiler, flags, instruction set), built atomically, so a second process reuses it.
The instruction set is what `-march=native` resolves to on this CPU (the compiler's predefined target
macros: __AVX2__, __AVX512F__, ...), so a cache in a home directory shared by machines with different CPUs
never hands one machine a build with instructions it lacks. Where PyTorch's threads are GNU OpenMP's, the
library is built with -fopenmp and joins that runtime, so the kernels run on PyTorch's own threads
(`torch.set_num_threads`); elsewhere a small thread pool of ours splits their work. Without a compiler, or with
`EMCAPS_NATIVE=0`, `library()` returns None and emcaps routes with PyTorch ops instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("em_kernels.cpp")
# Reassociation lets the compiler vectorise sums over the 16 pose entries and over children; it keeps
# infinities and NaNs (no -ffinite-math-only).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-math-errno",
         "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
# Tuned for the machine that builds it: the library lives in a per-user cache, never in a wheel. Each is
# used only where the compiler accepts it (some ARM toolchains lack -march=native; the second is x86 only).
NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512")
# The C signature of every exported kernel, in order: P a pointer, i an int64, d a double. (m0, m1, slot0,
# threads), the range of problems, the first per-thread slot and the thread count, are the four i's at the
# `range_at` position of `Library.call`. em_kernels.cpp's EMCAPS_INSTANTIATE must match; tests/test_kernels.py
# parses it to check.
SIGNATURES = {
    "mstep": "PPPPiiPiii" "iiii" "dPPP",
    "estep_assign": "PPPPPPiii" "iiii" "dPP",
    "estep_backward": "PPPPPPiii" "iiii" "PP",
    "mstep_backward": "PPPPPiiPPPPPPPPPiii" "iiii" "dPPPP",
}
_C_TYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int64, "d": ctypes.c_double}
VERSION = 6


class KernelBuildError(RuntimeError):
    """The C++ compiler failed on em_kernels.cpp; the message holds its output."""


def kernel_dir() -> Path:
    """Where built kernels are cached. Resolved here, not through emcaps.data: routing needs no data code."""
    explicit = os.environ.get("EMCAPS_KERNEL_DIR")
    if explicit:
        return Path(explicit).expanduser()
    data = os.environ.get("EMCAPS_DATA_DIR")
    if data:
        return Path(data).expanduser() / "kernels"
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "emcaps" / "kernels"


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else the first of c++, g++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _accepts(cxx: str, flag: str) -> bool:
    """Whether the compiler builds a one-line translation unit with `flag` (warnings count as refusal)."""
    probe = subprocess.run([cxx, flag, "-Werror", "-x", "c++", "-c", "-", "-o", os.devnull], input=b"int x;\n",
                           capture_output=True)
    return probe.returncode == 0


def _flags(cxx: str) -> tuple[str, ...]:
    flags = FLAGS + tuple(flag for flag in NATIVE_FLAGS if _accepts(cxx, flag))
    return flags + ("-fopenmp",) if torch_openmp() and _links_openmp(cxx) else flags


def openmp_runtimes() -> set[str]:
    """The GNU OpenMP runtimes (libgomp files) mapped into this process; empty where that cannot be read."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines()
            if "/" in line and Path(line.split()[-1]).name.startswith("libgomp")}


def torch_openmp() -> bool:
    """Whether a library built with -fopenmp would share PyTorch's OpenMP runtime, and so its threads.

    PyTorch's threads are GNU OpenMP's where its parallel backend is OpenMP and a libgomp is loaded (its
    wheels ship one with the soname libgomp.so.1, which the dynamic loader then hands to our library too).
    With its threads, a kernel's work goes to the threads that would otherwise spin-wait for PyTorch's next
    operation; with a thread pool of our own, both sets of threads compete for the cores (on 2 cores the
    kernels ran up to 1.5x slower in a network than alone). `EMCAPS_OPENMP=0` builds without it.
    """
    if os.environ.get("EMCAPS_OPENMP", "1") == "0":
        return False
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and len(openmp_runtimes()) == 1


def _links_openmp(cxx: str) -> bool:
    """Whether the compiler builds and links a shared library with -fopenmp (it needs libgomp's files)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([cxx, "-fopenmp", "-shared", "-fPIC", "-x", "c++", "-", "-o", f"{tmp}/probe.so"],
                               input=b"#include <omp.h>\nint f() { return omp_get_thread_num(); }\n",
                               capture_output=True, check=False)
    return probe.returncode == 0


def isa_key(cxx: str, flags: tuple[str, ...]) -> str:
    """What the build may assume of the CPU: the compiler's predefined macros under `flags`.

    `-march=native` resolves to this CPU's extensions, and the macros (__AVX2__, __AVX512F__, __znver3__,
    ...) spell out exactly what the compiler was told it may use; two CPUs that differ in any extension get
    different cache entries. (platform.processor() is empty on Linux and says nothing about extensions.)
    """
    done = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", "-", "-o", "-"], input="",
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelBuildError(f"{cxx} could not list its target macros:\n{done.stderr[-2000:]}")
    return "\n".join(sorted(done.stdout.splitlines()))


def cache_path(directory: Path, cxx: str, flags: tuple[str, ...]) -> Path:
    """Where the build of em_kernels.cpp by `cxx` with `flags` for this CPU's instruction set lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *flags, platform.machine(),
                                    isa_key(cxx, flags)]).encode()).hexdigest()[:16]
    return Path(directory) / f"em_kernels-{key}.so"


def build(directory: Path | None = None, cxx: str | None = None) -> Path:
    """Compile em_kernels.cpp into `directory` (default `kernel_dir()`) unless it is there; its path."""
    cxx = cxx or compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    flags = _flags(cxx)
    directory = Path(directory) if directory is not None else kernel_dir()
    target = cache_path(directory, cxx, flags)
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".em_kernels-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"{cxx} failed to build {SOURCE.name}:\n{done.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Library:
    """The loaded kernels, with ctypes signatures; `call` splits the problems m across threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        runtimes = openmp_runtimes()
        self._lib = ctypes.CDLL(str(path))
        self._lib.emcaps_kernels_version.argtypes = []
        self._lib.emcaps_kernels_version.restype = ctypes.c_int
        if self._lib.emcaps_kernels_version() != VERSION:
            raise KernelBuildError(f"{path} is not a compatible emcaps kernel library")
        for name, signature in SIGNATURES.items():
            for suffix in ("f32", "f64"):
                fn = getattr(self._lib, f"emcaps_{name}_{suffix}")
                fn.argtypes = [_C_TYPES[code] for code in signature]
                fn.restype = None
        self._lib.emcaps_kernels_openmp.restype = ctypes.c_int
        # Built with OpenMP, the kernels split their work on PyTorch's threads, unless loading them brought in
        # an OpenMP runtime of their own (a PyTorch whose libgomp has another soname): then a pool of ours
        # splits it, one thread per range, and that second runtime never starts any thread.
        self.openmp = bool(self._lib.emcaps_kernels_openmp()) and openmp_runtimes() <= runtimes
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def threads(self, n_problems: int) -> int:
        """How many threads `call` splits n_problems across: torch's thread count, at most one per problem."""
        return max(1, min(torch.get_num_threads(), n_problems))

    def call(self, name: str, dtype: torch.dtype, args: list, n_problems: int, range_at: int) -> None:
        """Run kernel `name` on problems [0, n_problems), split across `threads(n_problems)` threads.

        `args` are tensors (passed as pointers; None for a null pointer), ints, floats and `PerThread`
        tensors (thread t writes slot t); (m0, m1, slot0, threads) is inserted at position `range_at`. Built
        with OpenMP, the kernel splits the work itself; else each thread of a pool of ours gets a range.
        """
        fn = getattr(self._lib, f"emcaps_{name}_{'f64' if dtype == torch.float64 else 'f32'}")
        if len(args) + 4 != len(fn.argtypes):          # ctypes would pass surplus arguments on as varargs
            raise TypeError(f"kernel {name} takes {len(fn.argtypes) - 4} arguments besides "
                            f"(m0, m1, slot0, threads), got {len(args)}")
        threads = self.threads(n_problems)
        c_args = [_c_arg(a) for a in args]
        with torch.profiler.record_function(f"emcaps::{name}"):    # each kernel its own row in a profile
            if threads == 1 or self.openmp:
                fn(*c_args[:range_at], *map(ctypes.c_int64, (0, n_problems, 0, threads)), *c_args[range_at:])
            else:
                self._run_in_pool(fn, c_args, n_problems, range_at, threads)

    def _run_in_pool(self, fn, c_args: list, n_problems: int, range_at: int, threads: int) -> None:
        """Without OpenMP: one range of problems per thread of a pool of ours."""
        bounds = [n_problems * t // threads for t in range(threads + 1)]
        calls = [[*c_args[:range_at], *map(ctypes.c_int64, (bounds[t], bounds[t + 1], t, 1)), *c_args[range_at:]]
                 for t in range(threads)]
        if self._pool is None or self._pool_size != threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_size = ThreadPoolExecutor(threads, thread_name_prefix="emcaps"), threads
        # ctypes releases the GIL for the duration of each foreign call, so the ranges run in parallel.
        for f in [self._pool.submit(fn, *c) for c in calls]:
            f.result()


class PerThread:
    """A kernel argument with one slot per thread, (threads, ...): each thread writes its own slot (the kernel
    offsets the pointer to the first slot by its thread's slot index)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _c_arg(a):
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, PerThread):
        return ctypes.c_void_p(a.tensor.data_ptr())
    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise TypeError(f"unsupported kernel argument {a!r}")
    return ctypes.c_int64(a) if isinstance(a, int) else ctypes.c_double(a)


@functools.cache
def library() -> Library | None:
    """The kernels, built if needed; None (with one warning) where they cannot be built or loaded."""
    if os.environ.get("EMCAPS_NATIVE", "1") == "0":
        return None
    try:
        return Library(build())
    except (KernelBuildError, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"emcaps: native routing kernels unavailable, routing with PyTorch ops instead ({err})",
                      RuntimeWarning, stacklevel=2)
        return None
