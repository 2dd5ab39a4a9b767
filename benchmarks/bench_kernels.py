"""Time of each native routing kernel per vote and pass, on ConvCaps1-shaped problems of the paper network.

    python benchmarks/bench_kernels.py [--threads 1] [--images 4] [--repeat 5] [--compare OTHER.cpp]

Why: a step's throughput mixes the kernels with the PyTorch glue between them; this isolates the kernels
(best of `--repeat` calls each) and prints how long building the library took, for a fresh kernel cache.
`--compare` builds another version of em_kernels.cpp (e.g. `git show HEAD~1:src/emcaps/kernels/em_kernels.cpp
> /tmp/old.cpp`) and times both in turns, call by call, so that a machine whose speed drifts (a shared VM)
affects both alike; it also prints how far apart their outputs are.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from emcaps import kernels
from emcaps.kernels import PerThread


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=4, help="images of 6x6 ConvCaps1 positions each")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--compare", type=Path, help="another em_kernels.cpp to time against this one, in turns")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as fresh:
        t0 = time.perf_counter()
        kernels.build(fresh)
        print(f"build from a fresh cache: {time.perf_counter() - t0:.1f} s")
    lib = kernels.library()
    if lib is None:
        print("native kernels unavailable", file=sys.stderr)
        return 1

    m, j, i = 36 * args.images, 32, 288                     # positions, parent types, children (3*3*32)
    g = torch.Generator().manual_seed(0)
    P, W = torch.randn(m, i, 16, generator=g), 0.3 * torch.randn(i, j, 16, generator=g)
    a, r = torch.rand(m, i, generator=g), torch.rand(m, j, i, generator=g)
    mean, var, s = torch.empty(m, j, 16), torch.empty(m, j, 16), torch.empty(m, j)
    assign, g_mean, g_iv = torch.empty(m, j, i), torch.empty(m, j, 16), torch.empty(m, j, 16)
    const, lse = torch.randn(m, j, generator=g), torch.empty(m, i)
    lib.call("mstep", torch.float32, [P, W, None, r, r.stride(0), r.stride(1), a, m, j, i, 1e-8, mean, var, s], m,
             10)
    inv_var = 1 / (var + 1e-2)
    g_maha, g_var, g_s = torch.randn(m, j, i, generator=g), torch.randn(m, j, 16, generator=g), torch.randn(m, j)
    W_t = W.view(i, j, 4, 4).transpose(-1, -2).reshape(i, j, 16).contiguous()
    g_P, g_W = torch.zeros(m, i, 16), torch.zeros(lib.threads(m), i, j, 16)
    g_r, g_a = torch.empty(m, j, i), torch.zeros(m, i)
    calls = {
        "mstep": ([P, W, None, r, r.stride(0), r.stride(1), a, m, j, i, 1e-8, mean, var, s], 10),
        "estep_assign": ([P, W, None, mean, inv_var, const, m, j, i, 0.5, assign, lse], 9),
        "estep_backward": ([P, W, None, mean, inv_var, g_maha, m, j, i, g_mean, g_iv], 9),
        "mstep_backward": ([P, W, None, W_t, r, r.stride(0), r.stride(1), a, mean, s, g_mean, g_var, g_s,
                            inv_var, g_maha, mean, m, j, i, 1e-8, g_P, PerThread(g_W), g_r, g_a], 19),
    }
    written = {name: {x.data_ptr() for x in outs} for name, outs in (
        ("mstep", (mean, var, s)), ("estep_assign", (assign, lse)),
        ("estep_backward", (g_mean, g_iv)),
        ("mstep_backward", (g_P, g_W, g_r, g_a)))}
    votes = m * j * i
    print(f"{votes:,} votes per call, {lib.threads(m)} thread(s)")
    if args.compare is None:
        for name, (call_args, at) in calls.items():
            t = best_of(lambda: lib.call(name, torch.float32, call_args, m, at), args.repeat)
            print(f"{name:15s} {t * 1e3:7.2f} ms  {t / votes * 1e9:5.2f} ns per vote")
        return 0
    other = load_other(args.compare)
    print(f"{'kernel':15s} {'this':>14s} {'--compare':>14s}  speed-up  max |difference|")
    for name, (call_args, at) in calls.items():
        outputs = [x for x in call_args if isinstance(x, torch.Tensor) and x.data_ptr() in written[name]]
        runs = {}
        for label, which in (("this", lib), ("other", other)):
            for x in outputs:
                x.zero_()
            which.call(name, torch.float32, call_args, m, at)
            runs[label] = [x.clone() for x in outputs]
        diff = max(float((a - b).abs().max()) for a, b in zip(runs["this"], runs["other"]))
        times = {"this": [], "other": []}
        for _ in range(args.repeat):
            for label, which in (("this", lib), ("other", other)):
                t0 = time.perf_counter()
                which.call(name, torch.float32, call_args, m, at)
                times[label].append(time.perf_counter() - t0)
        t, u = min(times["this"]), min(times["other"])
        print(f"{name:15s} {t / votes * 1e9:8.2f} ns/vote {u / votes * 1e9:8.2f} ns/vote  {u / t:6.2f}x  {diff:.2e}")
    return 0


def load_other(source: Path) -> kernels.Library:
    """The library built from another em_kernels.cpp, in a temporary cache."""
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory())
        original = kernels.SOURCE
        kernels.SOURCE = source.resolve()
        try:
            return kernels.Library(kernels.build(Path(directory)))
        finally:
            kernels.SOURCE = original


if __name__ == "__main__":
    sys.exit(main())
