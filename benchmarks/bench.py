"""Training and inference throughput and peak memory of emcaps next to a public-style reference.

    python benchmarks/bench.py [--quick] [--json] [--device cpu|cuda] [--presets paper,small,routing] [--batch 32]
                               [--threads N] [--steps K] [--impl emcaps,reference] [--compile]
                               [--glibc-keep-freed [both|only]] [--timeout 600]
                               [--routing FIELD=VALUE ...]

Every (preset, mode, impl, allocator) configuration runs in its own child process (this script with
`--child`), so that its peak RSS, page faults and user/system CPU time are its own. See README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PRESETS = ("paper", "small", "routing")
MODES = ("train", "infer")
# emcaps: its default (native kernels where they build); emcaps-torch: routing with PyTorch ops only;
# emcaps-compile: the torch.compile'd routing kernel; emcaps-triton: the Triton kernels that never store votes
# (CUDA); reference: the public-style network in reference.py.
IMPLS = ("emcaps", "emcaps-torch", "emcaps-compile", "emcaps-triton", "reference")
BACKEND = {"emcaps": "auto", "emcaps-torch": "torch", "emcaps-compile": "compile", "emcaps-triton": "triton"}
KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
# Peak RSS of the reference per byte of its votes tensors (all routed layers), measured at batch 4 and
# rounded up (see README.md); used to pick a batch that keeps the reference under the memory budget.
REFERENCE_PEAK_PER_VOTE_BYTE = {"train": 18.0, "infer": 5.0}


@dataclass(frozen=True)
class Spec:
    """One configuration, as handed to a child process."""

    preset: str
    mode: str
    impl: str
    batch: int
    threads: int | None = None
    warmup: int = 1
    steps: int = 5
    match_reference: bool = False
    routing: tuple[str, ...] = ()          # RoutingConfig / Runtime overrides of the emcaps impls, FIELD=VALUE
    seed: int = 0
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------------
# The workloads (built in the child; also used by profile_routing.py)


def routing_config(match_reference: bool, impl: str = "emcaps", overrides: tuple[str, ...] = ()):
    """emcaps' default routing (or the per-position routing the reference computes) and its runtime, with the
    backend of `impl` (see IMPLS) and `overrides` ('detach_assignments=true', 'native_chunk_mb=48', ...:
    RoutingConfig fields and the runtime fields that were once part of it, parsed and checked as
    `emcaps train --set routing.FIELD=VALUE` would) -> (RoutingConfig, Runtime)."""
    from emcaps import config as cfgmod

    named = ["routing.parameterisation=paper", "routing.compete_positions=false"] if match_reference else []
    config = cfgmod.load(None, [*named, *(f"routing.{text}" for text in overrides)])
    return config.routing, replace(config.runtime, backend=BACKEND.get(impl, "auto"))


def build_step(spec: Spec) -> tuple[Callable[[], None], list]:
    """A function running one step of `spec` (train: forward, loss, backward, Adam; infer: no_grad
    forward), and the tensors it keeps alive (so the caller's baseline RSS includes them).
    """
    import reference
    import torch

    from emcaps.capsules import Capsules
    from emcaps.losses import spread_loss
    from emcaps.models import create_model

    torch.manual_seed(spec.seed)
    routing, runtime = routing_config(spec.match_reference, spec.impl, tuple(spec.routing))
    model = create_model("paper" if spec.preset == "routing" else spec.preset, routing=routing, runtime=runtime)
    device = torch.device(spec.device)
    model = model.to(device)
    n = spec.batch

    if spec.preset == "routing":
        # ConvCaps1 of the paper network on random primary capsules (N, 14, 14, 32, 4, 4).
        layer = model.conv_caps1
        pose = torch.randn(n, 14, 14, layer.in_types, 4, 4, device=device)
        act = torch.rand(n, 14, 14, layer.in_types, device=device)
        if spec.impl == "reference":
            net = reference.reference_conv_caps(layer, strict=False).to(device)
            x = reference.pack_capsules(pose, act).requires_grad_(spec.mode == "train")   # (N, 14, 14, B*17)

            def forward():
                return reference.unpack_capsules(net(x), layer.out_types)
        else:
            net = layer
            pose.requires_grad_(spec.mode == "train")
            act.requires_grad_(spec.mode == "train")

            def forward():
                out = net(Capsules(pose, act))
                return out.pose, out.activation

        def loss_fn(out):
            # Any scalar that reaches both outputs; gradients flow back to the input capsules too.
            return out[0].mean() + out[1].mean()

        params = list(net.parameters()) if spec.impl == "reference" else list(layer.parameters())
        keep = [x] if spec.impl == "reference" else [pose, act]
    else:
        x = torch.randn(n, 1, 32, 32, device=device)
        target = torch.randint(0, model.config.classes, (n,), device=device)
        if spec.impl == "reference":
            net = reference.load_from_emcaps(model, strict=False).to(device)
            del model
        else:
            net = model

        def forward():
            return net(x)

        def loss_fn(out):
            return spread_loss(out, target, margin=0.2)

        params, keep = list(net.parameters()), [x, target]

    if spec.mode == "infer":
        def step() -> None:
            with torch.no_grad():
                forward()
        return step, [net, *keep]

    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for t in keep:
            t.grad = None
        loss_fn(forward()).backward()
        opt.step()

    return step, [net, opt, *keep]


def run_child(spec: Spec) -> dict:
    """Measure one configuration in this process: warm-up steps, then `steps` timed steps."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cuda = spec.device.startswith("cuda")
    step, _alive = build_step(spec)
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF)
    if cuda:
        torch.cuda.synchronize()
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def timed() -> float:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()                 # a CUDA step has ended when its kernels have
        return time.perf_counter() - t0

    warm_times = [timed() for _ in range(spec.warmup)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [timed() for _ in range(spec.steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)

    median = statistics.median(times)
    peak_mb = (after.ru_maxrss - base.ru_maxrss) / 1024          # ru_maxrss is in KiB on Linux
    if cuda:                                                     # on a GPU: device memory, as allocated
        peak_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    record = dict(
        preset=spec.preset, mode=spec.mode, impl=spec.impl, batch=spec.batch,
        threads=torch.get_num_threads(), images_per_s=spec.batch / median, peak_mb=peak_mb,
        peak_mb_per_image=peak_mb / spec.batch, baseline_mb=base.ru_maxrss / 1024,
        median_step_s=median, step_s=times, warmup_s=warm_times,
        # CPU time and page faults of the timed steps only (warm-up excluded).
        user_s=after.ru_utime - before.ru_utime, sys_s=after.ru_stime - before.ru_stime,
        minor_faults=after.ru_minflt - before.ru_minflt,
        compete_positions=spec.impl != "reference" and not spec.match_reference,
        routing=[] if spec.impl == "reference" else list(spec.routing),
        torch=torch.__version__, device=spec.device,
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
    )
    if spec.impl == "emcaps-compile" and warm_times:
        record["compile_s"] = max(warm_times[0] - median, 0.0)
    return record


# ----------------------------------------------------------------------------------------------------
# The parent: plans the configurations, runs each in a child, reports


def votes_bytes_per_image(preset: str) -> int:
    """float32 bytes of the votes of every routed layer for one image (the reference's big tensors)."""
    from emcaps.models import CAPSULE_PRESETS

    c = CAPSULE_PRESETS["paper" if preset == "routing" else preset]
    conv1 = 6 * 6 * (3 * 3 * c.B) * c.C            # 14x14 -> 6x6 positions, K*K*B children, C parents
    conv2 = 4 * 4 * (3 * 3 * c.C) * c.D            # 6x6 -> 4x4
    classes = 4 * 4 * c.D * c.classes
    elems = conv1 if preset == "routing" else conv1 + conv2 + classes
    return elems * 16 * 4


def reference_batch(preset: str, mode: str, batch: int, budget_gb: float) -> int:
    """The largest of batch, batch/2, batch/4, ... whose estimated reference peak fits the budget."""
    per_image = votes_bytes_per_image(preset) * REFERENCE_PEAK_PER_VOTE_BYTE[mode]
    b = batch
    while b > 1 and b * per_image > budget_gb * 2 ** 30:
        b = max(1, b // 2)
    return b


def launch(spec: Spec, keep_freed: bool, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter and return its record (or a failure record)."""
    env = dict(os.environ)
    if keep_freed:
        env["GLIBC_TUNABLES"] = KEEP_FREED
    else:
        env.pop("GLIBC_TUNABLES", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec))]
    failed = dict(preset=spec.preset, mode=spec.mode, impl=spec.impl, batch=spec.batch, threads=spec.threads,
                  images_per_s=None, peak_mb=None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record = dict(failed, status=f"timeout after {timeout:.0f} s")
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            record = dict(json.loads(lines[-1][len("RESULT "):]), status="ok")
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            record = dict(failed, status=f"failed (exit {proc.returncode}): " + " | ".join(tail))
    record["allocator"] = "keep-freed" if keep_freed else "default"
    record["wall_s"] = time.perf_counter() - t0
    return record


def add_ratios(records: list[dict]) -> None:
    """emcaps / reference ratios of images/s and peak memory, on each emcaps record."""
    refs = {(r["preset"], r["mode"], r["allocator"]): r for r in records
            if r["impl"] == "reference" and r["images_per_s"]}
    for r in records:
        ref = refs.get((r["preset"], r["mode"], r["allocator"]))
        if r["impl"] == "reference" or ref is None or not r["images_per_s"]:
            continue
        r["ratio_images_per_s"] = r["images_per_s"] / ref["images_per_s"]
        if r["peak_mb"] and ref["peak_mb"]:
            # Per image when the reference had to run at a smaller batch.
            same = r["batch"] == ref["batch"]
            r["ratio_peak_mb"] = (r["peak_mb"] / ref["peak_mb"] if same
                                  else r["peak_mb_per_image"] / ref["peak_mb_per_image"])
            r["ratio_peak_basis"] = "total" if same else "per image"


SMALLNORB_TRAIN = 24300      # training pairs of smallNORB (and of the full SynthNORB)


def epoch_time(record: dict) -> str:
    """How long one smallNORB training epoch takes at a train row's speed, as h:mm:ss ('-' otherwise)."""
    ips = record.get("images_per_s")
    if record.get("mode") != "train" or record.get("preset") == "routing" or not ips:
        return "-"
    seconds = round(SMALLNORB_TRAIN / ips)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_table(records: list[dict], requested_batch: int) -> str:
    """A plain-text table for people."""
    head = ["preset", "mode", "impl", "alloc", "batch", "thr", "img/s", "step s", "epoch", "peak MB",
            "user s", "sys s", "faults", "x ref img/s", "x ref mem"]
    rows, notes = [], []
    for r in records:
        def f(key, fmt):
            v = r.get(key)
            return "-" if v is None else format(v, fmt)
        batch = str(r["batch"])
        if r["batch"] != requested_batch:
            batch += "*"
        mem = f("ratio_peak_mb", ".2f")
        if r.get("ratio_peak_basis") == "per image":
            mem += "/img"
        rows.append([r["preset"], r["mode"], r["impl"], r["allocator"], batch, str(r.get("threads") or "-"),
                     f("images_per_s", ".2f"), f("median_step_s", ".3f"), epoch_time(r), f("peak_mb", ".0f"),
                     f("user_s", ".1f"), f("sys_s", ".1f"), f("minor_faults", ",d"),
                     f("ratio_images_per_s", ".2f"), mem])
        if r["status"] != "ok":
            notes.append(f"{r['preset']}/{r['mode']}/{r['impl']}/{r['allocator']}: {r['status']}")
        if "compile_s" in r:
            notes.append(f"{r['preset']}/{r['mode']}/emcaps-compile/{r['allocator']}: "
                         f"compile {r['compile_s']:.1f} s (first step minus median step)")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)] if rows else []
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    if any(r["batch"] != requested_batch for r in records):
        lines.append(f"* batch reduced from {requested_batch} to keep the reference under the memory budget; "
                     "its img/s is per image at that batch, its memory ratio is per image (/img).")
    gpu = sorted({r["device_name"] for r in records if r.get("device", "cpu") != "cpu" and r.get("device_name")})
    peak = ("peak MB: torch.cuda.max_memory_allocated of the steps minus what model and inputs hold, on "
            + ", ".join(gpu) if gpu else "peak MB: peak RSS of the child minus its RSS after building model and inputs")
    lines.append(f"img/s and step s: median of the timed steps (warm-up excluded). {peak}. "
                 "user/sys s, faults: CPU time and "
                 "minor page faults of the timed steps. x ref: emcaps / reference. epoch (train rows): "
                 f"one pass over smallNORB's {SMALLNORB_TRAIN:,} training pairs at that speed.")
    overrides = sorted({", ".join(r["routing"]) for r in records if r.get("routing")})
    if overrides:
        lines.append("emcaps routing overrides: " + "; ".join(overrides))
    return "\n".join(lines + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 4, 1 warm-up step, 2 timed steps")
    p.add_argument("--json", action="store_true", help="print one JSON list of records instead of a table")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of paper, small, routing")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of train, infer")
    p.add_argument("--impl", default="emcaps,reference",
                   help="comma list of emcaps, emcaps-torch, emcaps-compile, emcaps-triton, reference")
    p.add_argument("--compile", action="store_true",
                   help="add emcaps with its torch.compile'd routing kernel (impl emcaps-compile)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32; 4 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration")
    p.add_argument("--glibc-keep-freed", nargs="?", const="both", choices=("both", "only"), default=None,
                   help="also ('both') or only ('only') run with GLIBC_TUNABLES=" + KEEP_FREED)
    p.add_argument("--match-reference", action="store_true",
                   help="route emcaps per position (compete_positions=False), as the reference does")
    p.add_argument("--routing", action="append", default=[], metavar="FIELD=VALUE",
                   help="a RoutingConfig field of the emcaps impls, e.g. detach_assignments=true or "
                        "iterations=2 (repeatable; the reference is not affected)")
    p.add_argument("--ref-mem-budget-gb", type=float, default=16.0,
                   help="run the reference at a smaller batch if its estimated peak exceeds this")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N): where every configuration runs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 32)
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.presets = [s for s in args.presets.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.impl = [s for s in args.impl.split(",") if s]
    if args.compile and "emcaps-compile" not in args.impl:
        args.impl.insert(args.impl.index("emcaps") + 1 if "emcaps" in args.impl else 0, "emcaps-compile")
    for name, given, allowed in (("preset", args.presets, PRESETS), ("mode", args.modes, MODES),
                                 ("impl", args.impl, IMPLS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"unknown {name} {', '.join(bad)}; expected {', '.join(allowed)}")
    return args


def device_problem(device: str) -> str | None:
    """Why the configurations cannot run on `device` (one line), or None."""
    import torch

    if device == "cpu":
        return None
    if device != "cuda" and not device.startswith("cuda:"):
        return f"unknown device {device!r}; expected cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(Spec(**json.loads(args.child)))), flush=True)
        return 0
    problem = device_problem(args.device)
    if problem:
        print(f"bench.py: {problem}", file=sys.stderr)
        return 2

    allocators = {None: [False], "both": [False, True], "only": [True]}[args.glibc_keep_freed]
    base = Spec(preset="", mode="", impl="", batch=args.batch, threads=args.threads, warmup=args.warmup,
                steps=args.steps, match_reference=args.match_reference, routing=tuple(args.routing),
                device=args.device)
    records = []
    for preset in args.presets:
        for mode in args.modes:
            for keep_freed in allocators:
                for impl in args.impl:
                    batch = args.batch
                    if impl == "reference":
                        batch = reference_batch(preset, mode, args.batch, args.ref_mem_budget_gb)
                    spec = replace(base, preset=preset, mode=mode, impl=impl, batch=batch)
                    record = launch(spec, keep_freed, args.timeout)
                    if batch != args.batch:
                        record["batch_requested"] = args.batch
                    records.append(record)
                    ips = record["images_per_s"]
                    print(f"[bench] {preset} {mode} {impl} {record['allocator']} batch {batch}: "
                          f"{'-' if ips is None else f'{ips:.2f} img/s'} ({record['status']}, "
                          f"{record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    add_ratios(records)
    print(json.dumps(records, indent=1) if args.json else format_table(records, args.batch))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
