"""Registers, spills and (on CUDA) times of the Triton routing kernels for each choice of TritonBlocks, on the
routed layers of a preset network.

    python benchmarks/triton_blocks.py [--presets paper,small] [--arch 90] [--time] [--batch 256] [--json]
                                       [--votes 128,256,512] [--warps 4,8] [--backward-votes 64,128,256]
                                       [--backward-warps 4,8] [--problems 16,64] [--calls mstep,...]
                                       [--default-only] [--no-registers]

Why: the kernels hold blocks of (children x parent types x 4 x 4) values in registers; too large a block
spills them to local memory, too small a one spends its instructions on sums across threads. Triton compiles
for a named GPU architecture without one (its bundled ptxas does the last step), so the registers, spills and
instruction counts come from any machine with the triton package; `--time` (CUDA) adds each kernel's time at
`--batch` images, best of `--repeat` calls. Each kernel is compiled from the very launch `TritonKernels` makes
(same arguments, blocks and warps).
Forward choices (votes per block, warps) apply to mstep, estep_backward and estep_assign (which takes four
times the votes); backward choices (votes, warps, problems per program) to mstep_backward's main kernel,
reported as training calls it by default (`mstep_backward`: constant assignments, the last iteration only)
and through the E-step (`mstep_backward+estep`, with `detach_assignments = false`); a choice of votes holds
in float32 and float64 layers alike (the defaults differ: TritonBlocks). `i/vote` is a static estimate of the
work: the thread-instructions of one iteration of the kernel's main loop over the votes it handles. One row
per kernel launch; `ms` is the whole call (all its launches and its PyTorch glue), on the call's first row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")      # Triton's own default, without its warning

import torch  # noqa: E402

from emcaps.kernels import triton_kernels as tk  # noqa: E402
from emcaps.layers import ClassCaps  # noqa: E402
from emcaps.models import CAPSULE_PRESETS  # noqa: E402


def layers(preset: str) -> list[tuple[str, int, int, int, bool, torch.dtype]]:
    """(name, children I, parent types J, routing problems per image, offsets?, dtype) of each routed layer of a
    preset on 32x32 inputs: ConvCaps1 (14x14 -> 6x6), ConvCaps2 (6x6 -> 4x4), class capsules (which route in
    ClassCaps.route_dtype, float64)."""
    c = CAPSULE_PRESETS[preset]
    return [(f"{preset}/conv1", 9 * c.B, c.C, 36, False, torch.float32),
            (f"{preset}/conv2", 9 * c.C, c.D, 16, False, torch.float32),
            (f"{preset}/class", 16 * c.D, c.classes, 1, True, ClassCaps.route_dtype)]


def arguments(n_in: int, n_out: int, m: int, offsets: bool, dtype: torch.dtype, device: str) -> dict:
    """Plausible inputs of every kernel (routing state after a few iterations) for M=m problems."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, lo=0.0, hi=1.0):
        if device == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta")
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)).to(device)

    D = 16
    t = dict(P=rand(m, n_in, D, lo=-1), W=rand(n_in, n_out, D, lo=-1), O=rand(n_in, D) if offsets else None,
             r=rand(m, n_out, n_in), act=rand(m, n_in), mean=rand(m, n_out, D, lo=-1),
             var=rand(m, n_out, D, lo=0.5, hi=2.0), S=rand(m, n_out, lo=1.0, hi=9.0), const=rand(m, n_out),
             g_maha=rand(m, n_out, n_in, lo=-1), g_mean=rand(m, n_out, D, lo=-1), g_var=rand(m, n_out, D, lo=-1),
             g_S=rand(m, n_out, lo=-1))
    t["WT"] = t["W"].view(n_in, n_out, 4, 4).transpose(-1, -2).reshape(n_in, n_out, D)
    t["inv_var"] = 1.0 / t["var"]
    return t


def calls(kernels: tk.TritonKernels, t: dict, m: int, n_out: int, n_in: int) -> dict:
    """Each kernel called as emcaps.routing.native calls it: name -> a function of no arguments. mstep_backward
    as training calls it by default (constant assignments: the last iteration only), and through the E-step
    as with `detach_assignments = false`."""
    P, W, off, r = t["P"], t["W"], t["O"], t["r"]
    D = 16

    def mstep():
        kernels.mstep(P, W, off, r, r.stride(0), r.stride(1), t["act"], m, n_out, n_in, 1e-8,
                      P.new_empty(m, n_out, D), P.new_empty(m, n_out, D), P.new_empty(m, n_out))

    def estep_assign():
        kernels.estep_assign(P, W, off, t["mean"], t["inv_var"], t["const"], m, n_out, n_in, 0.5,
                             P.new_empty(m, n_out, n_in), P.new_empty(m, n_in))

    def estep_backward():
        kernels.estep_backward(P, W, off, t["mean"], t["inv_var"], t["g_maha"], m, n_out, n_in,
                               P.new_empty(m, n_out, D), P.new_empty(m, n_out, D))

    gP, gW, g_r, g_a = torch.zeros_like(P), W.new_zeros(1, n_in, n_out, D), torch.empty_like(r), t["act"] * 0

    def mstep_backward(through_estep: bool = False):
        e = (t["inv_var"], t["g_maha"], t["mean"]) if through_estep else (None, None, None)
        kernels.mstep_backward(P, W, off, t["WT"], r, r.stride(0), r.stride(1), t["act"], t["mean"], t["S"],
                               t["g_mean"], t["g_var"], t["g_S"], *e, m, n_out, n_in, 1e-8, gP, gW,
                               g_r if through_estep else None, g_a)

    return {"mstep": mstep, "estep_assign": estep_assign, "estep_backward": estep_backward,
            "mstep_backward": mstep_backward, "mstep_backward+estep": lambda: mstep_backward(True)}


class _Recorder(tk.TritonKernels):
    """Records each launch instead of running it."""

    def __init__(self, blocks: tk.TritonBlocks):
        super().__init__(blocks)
        self.launches = []

    def launch(self, kernel, grid, *args, **meta):
        self.launches.append((kernel, args, meta))


def _signature(kernel, args: tuple, meta: dict) -> tuple[dict, dict, dict, dict]:
    """Triton's signature, constexprs, attributes and options for a launch, as its JIT specialises them:
    float32/float64 pointers (16-byte aligned), 32-bit ints (divisible by 16 where they are), float scalars."""
    consts = {k: v for k, v in meta.items() if k in kernel.arg_names}
    options = {k: v for k, v in meta.items() if k not in kernel.arg_names}
    names = [n for n in kernel.arg_names if n not in consts]
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*fp32" if value.dtype == torch.float32 else "*fp64"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{kernel.__name__}: cannot describe argument {name}={value!r}")
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in consts})
    return signature, consts, attrs, options


# per SM: registers, threads, shared memory (bytes usable by programs), programs; by compute capability
SM_LIMITS = {80: (65536, 2048, 164 * 1024, 32), 86: (65536, 1536, 100 * 1024, 16), 89: (65536, 1536, 100 * 1024, 24),
             90: (65536, 2048, 228 * 1024, 32), 100: (65536, 2048, 228 * 1024, 32)}


def warps_per_sm(arch: int, registers: int, warps: int, shared: int) -> int | None:
    """Warps of one kernel an SM holds at once (the CUDA occupancy calculation): registers are given to a warp
    in units of 256, each program also takes 1 KB of shared memory."""
    if arch not in SM_LIMITS:
        return None
    regs, threads, smem, programs = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    fit = min(regs // per_warp // warps, threads // (32 * warps), smem // (shared + 1024), programs)
    return fit * warps


ZERO = re.compile(r"(?<!-)\bRZ\b")       # the zero register as an operand (-RZ, -0.0, is a copy or |x|)


def compile_report(kernel, args: tuple, meta: dict, arch: int) -> dict:
    """Compiles one launch for sm_`arch` and reads ptxas's resource report (registers, spills, shared memory)
    and the machine code: its instructions and global loads (LDG), counted in the code (a loop body once),
    `zero_adds`, additions of the zero register in the main loop (x + 0.0, where a sum from -0.0 folds away),
    and `per_vote`, the thread-instructions each vote costs: the main loop's instructions (main_loop) times the
    threads of a program, over the votes of one iteration."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    signature, consts, attrs, options = _signature(kernel, args, meta)
    source = triton.compiler.ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        try:
            ptxas = get_ptxas(arch)               # triton >= 3.6 (a ptxas per architecture)
        except TypeError:
            ptxas = get_ptxas()
        log = subprocess.run([ptxas.path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ops = machine_code(sass)
    body = main_loop(ops)
    threads = 32 * meta["num_warps"]
    registers = int(regs.group(1)) if regs else None
    return dict(registers=registers,
                spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else 0,
                shared=compiled.metadata.shared, instructions=len(ops), loads=sum(op == "LDG" for _, op, _ in ops),
                zero_adds=sum(op in ("FADD", "DADD") and ZERO.search(rest) is not None for _, op, rest in body),
                per_vote=round(len(body) * threads / (meta["BI"] * meta["BJ"]), 1),
                warps_per_sm=warps_per_sm(arch, registers, meta["num_warps"], compiled.metadata.shared)
                if registers else None)


def machine_code(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction in cuobjdump's listing."""
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.A-Z0-9_]*\s*([^;]*);", sass)
    return [(int(a, 16), op, rest) for a, op, rest in found]


def main_loop(ops: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the largest loop (a backward branch's range), each run once per iteration: one block
    of votes (the gather kernels: a block of children; mstep_backward: one problem). The whole kernel where it
    has no loop (estep_assign: one block per program)."""
    loops = []
    for addr, op, rest in ops:
        # sm_90: `BRA 0x40`, `BRA `(.L_x_1) 0x40`; sm_100 puts a uniform predicate first: `BRA.U !UP0, 0x40`
        target = re.match(r"\s*(?:!?U?P\w+,\s*)?(?:`\(.*?\)\s*)?0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return ops
    start, end = max(loops, key=lambda r: r[1] - r[0])
    return [x for x in ops if start <= x[0] <= end]


def time_call(fn, repeat: int) -> float:
    """Best of `repeat` calls in ms (CUDA events), after one that compiles."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def row(r: dict) -> str:
    """One line of the table; `*` marks the default blocks."""
    def f(key, width, fmt="d"):
        return f"{r[key]:{width}{fmt}}" if r[key] is not None else f"{'-':>{width}}"

    return (f"{r['layer']:14} {r['dtype']:7} {r['call']:20} {r['kernel']:17} {r['votes']:5d} {r['warps']:5d} "
            f"{f('problems', 5)} {f('registers', 4)} {f('spill_bytes', 7)} {f('shared', 6)} "
            f"{f('instructions', 5)} {f('loads', 5)} {f('per_vote', 7, '.1f')} {f('warps_per_sm', 5)} "
            f"{f('ms', 8, '.3f')}"
            + (" *" if r["default"] else ""))


def choices(args) -> list[tuple[str, tk.TritonBlocks]]:
    """(kernel group, blocks): the forward choices vary the forward fields, the backward ones the others."""
    base = tk.TritonBlocks()
    if args.default_only:
        return [("forward", base), ("backward", base)]
    out = [("forward", replace(base, votes=v, votes_float64=v, warps=w))
           for v, w in itertools.product(args.votes, args.warps)]
    out += [("backward", replace(base, backward_votes=v, backward_votes_float64=v, backward_warps=w,
                                 backward_warps_float64=w, problems=p))
            for v, w, p in itertools.product(args.backward_votes, args.backward_warps, args.problems)]
    return out


GROUPS = {"forward": ("mstep", "estep_assign", "estep_backward"),
          "backward": ("mstep_backward", "mstep_backward+estep")}
CALLS = GROUPS["forward"] + GROUPS["backward"]


def reports(name: str, dtype: torch.dtype, group: str, blocks: tk.TritonBlocks, meta_t: dict, real_t: dict | None,
            m: int, n_out: int, n_in: int, args) -> list[dict]:
    """One record per kernel launch of the group's calls on one layer: its blocks, the compile report (unless
    --no-registers) and, on the call's first launch, the call's time (with --time)."""
    recorder = _Recorder(blocks)
    fns = calls(recorder, meta_t, m, n_out, n_in)
    timed = calls(tk.TritonKernels(blocks), real_t, m, n_out, n_in) if args.time else None
    empty = dict(registers=None, spill_bytes=None, shared=None, instructions=None, loads=None, zero_adds=None,
                 per_vote=None, warps_per_sm=None)
    out = []
    for call in [c for c in GROUPS[group] if c in args.calls]:
        recorder.launches.clear()
        fns[call]()
        ms = time_call(timed[call], args.repeat) if args.time else None
        for n, (fn, launch_args, meta) in enumerate(recorder.launches):
            out.append(dict(layer=name, dtype=str(dtype).removeprefix("torch."), call=call,
                            kernel=fn.__name__.strip("_").removesuffix("_kernel"),
                            votes=meta["BI"] * meta["BJ"], warps=meta["num_warps"], problems=meta.get("BM"),
                            default=(blocks == tk.TritonBlocks()),
                            **(compile_report(fn, launch_args, meta, args.arch) if args.registers else empty),
                            ms=ms if n == 0 else None))
    return out


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]    # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="paper,small")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 to compile for (90: H100/H200)")
    p.add_argument("--time", action="store_true", help="also time each kernel on CUDA")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--votes", type=ints, default=[128, 256, 512])
    p.add_argument("--warps", type=ints, default=[4, 8])
    p.add_argument("--backward-votes", type=ints, default=[64, 128, 256])
    p.add_argument("--backward-warps", type=ints, default=[4, 8])
    p.add_argument("--problems", type=ints, default=[16, 64])
    p.add_argument("--no-registers", dest="registers", action="store_false",
                   help="skip the compile report (registers, spills): only the times")
    p.add_argument("--calls", type=lambda x: x.split(","), default=list(CALLS),
                   help="which calls to report (default: all; mstep_backward+estep runs only where "
                        "detach_assignments = false)")
    p.add_argument("--default-only", action="store_true", help="only TritonBlocks() (ignores the lists above)")
    p.add_argument("--json", action="store_true", help="one JSON record per line instead of the table")
    args = p.parse_args(argv)
    unknown = sorted(set(args.calls) - set(CALLS))
    if unknown:
        print(f"triton_blocks: unknown call(s) {', '.join(unknown)}; known: {', '.join(CALLS)}", file=sys.stderr)
        return 2
    if tk.triton is None:
        print("triton_blocks: the triton package is missing (pip install 'emcaps[triton]')", file=sys.stderr)
        return 2
    if tk.interpreted():
        print("triton_blocks: unset TRITON_INTERPRET (the report compiles for a GPU)", file=sys.stderr)
        return 2
    if args.time and not torch.cuda.is_available():
        print("triton_blocks: --time needs a CUDA device (the compile report runs anywhere)", file=sys.stderr)
        return 2
    default = tk.TritonBlocks()
    head = [f"# default {default}"] + ([f"registers for sm_{args.arch}"] if args.registers else []) + \
        ([f"ms at batch {args.batch} on {torch.cuda.get_device_name()}"] if args.time else [])
    print("; ".join(head), flush=True)
    if not args.json:
        print(f"{'layer':14} {'dtype':7} {'call':20} {'kernel':17} {'votes':>5} {'warps':>5} {'probs':>5} {'regs':>4} "
              f"{'spill B':>7} {'smem':>6} {'instr':>5} {'LDG':>5} {'i/vote':>7} {'w/SM':>5} {'ms':>8}")
    for preset in args.presets.split(","):
        for name, n_in, n_out, per_image, offsets, dtype in layers(preset):
            m = args.batch * per_image
            meta_t = arguments(n_in, n_out, m, offsets, dtype, "meta")
            real_t = arguments(n_in, n_out, m, offsets, dtype, "cuda") if args.time else None
            for group, blocks in choices(args):
                for record in reports(name, dtype, group, blocks, meta_t, real_t, m, n_out, n_in, args):
                    print(json.dumps(record) if args.json else row(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
