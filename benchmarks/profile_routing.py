"""Profile one training (or inference) step and print the top ops by self CPU time (self CUDA time on a GPU).

    python benchmarks/profile_routing.py [--preset paper|small|routing] [--impl emcaps|reference]
                                         [--mode train|infer] [--batch 8] [--threads N] [--rows 25]
                                         [--routing FIELD=VALUE ...] [--memory] [--device cpu|cuda]

Why: throughput alone does not say what bounds it. The table shows whether time goes to the batched
products, to elementwise temporaries, or to allocation (the perf notes point at page faults: compare the
step's system CPU time, printed last, with its user time). The step is run once untimed first, so the
profile excludes one-off costs.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from bench import IMPLS, MODES, PRESETS, Spec, build_step
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=PRESETS)
    p.add_argument("--impl", default="emcaps", choices=IMPLS)
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25, help="ops to list")
    p.add_argument("--match-reference", action="store_true",
                   help="route emcaps per position (compete_positions=False), as the reference does")
    p.add_argument("--routing", action="append", default=[], metavar="FIELD=VALUE",
                   help="a RoutingConfig field of emcaps, as in bench.py (repeatable)")
    p.add_argument("--memory", action="store_true", help="also record and sort by allocated memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the profiled one")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = Spec(preset=args.preset, mode=args.mode, impl=args.impl, batch=args.batch, threads=args.threads,
                match_reference=args.match_reference, routing=tuple(args.routing), device=args.device)
    step, _alive = build_step(spec)
    for _ in range(args.warmup):    # first-call allocations, compiling and lazy optimizer state stay out
        step()
    if cuda:
        torch.cuda.synchronize()

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, profile_memory=args.memory) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)

    averages = prof.key_averages()
    print(f"{args.preset} {args.mode} {args.impl}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows))
    if args.memory:
        print(averages.table(sort_by="self_cpu_memory_usage", row_limit=args.rows))
    print(f"profiled step: {wall:.3f} s wall (with profiler overhead), "
          f"user {after.ru_utime - before.ru_utime:.2f} s, sys {after.ru_stime - before.ru_stime:.2f} s, "
          f"{after.ru_minflt - before.ru_minflt:,} minor page faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
