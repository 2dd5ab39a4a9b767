#!/usr/bin/env bash
# The checks that need a CUDA GPU (about 16 minutes on one H200 in all; each torch.compile'd routing config
# compiles for 20-60 s on its first step):
#   tests:    tests/test_cuda.py (every backend against the CPU float64 reference, training, bf16,
#             deterministic runs, torchrun on NCCL), up to 400 s;
#   converge: the converge-gpu recipe on the full SynthNORB, then its test error on all 24,300 test pairs;
#   bench:    bench.py --device cuda with the defaults alone: the paper network (train with the public-style
#             reference beside it, and infer, batch 256), the small network (train, batch 256), the paper
#             network at batch 32;
#   profile:  one paper training step (benchmarks/profile_routing.py), by CUDA time;
#   triton:   the Triton kernels (routing backend 'triton'), about 9 minutes: tests/test_cuda.py -k triton, then
#             against the default in the same runs (paper train, small train, paper infer, batch 256), each
#             kernel's time per block choice (benchmarks/triton_blocks.py --time), and a profile of one paper
#             training step with them.
# Usage: bash benchmarks/cuda_check.sh [DIR [TARBALL [STEPS]]]
#   logs and JSON records land in DIR (default ./cuda-check); with TARBALL, DIR is packed into it after each
#   step, so that a run cut short still hands back what it measured. STEPS: a comma-separated subset of
#   tests,converge,bench,profile,triton (default all, in that order), e.g. two calls of under 10 minutes each:
#   'tests,converge' then 'bench,profile'.
# Each step has its own time limit, so one that hangs leaves the others their time.
set -u
OUT=${1:-cuda-check}
TARBALL=${2:-}
STEPS=${3:-tests,converge,bench,profile,triton}
wants() { case ",$STEPS," in *",$1,"*) return 0;; *) return 1;; esac; }
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
started=$(date +%s)
stamp() {
    echo "[cuda_check] $(( $(date +%s) - started )) s: $*" | tee -a "$OUT/steps.txt"
    if [ -n "$TARBALL" ]; then tar czf "$TARBALL" -C "$OUT" . 2>/dev/null; fi
}

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
$PY -c "import triton; from emcaps.kernels.triton_kernels import TritonBlocks; print('triton', triton.__version__, TritonBlocks())" 2>&1 | tail -1 | tee -a "$OUT/device.txt"

if wants converge; then
    stamp "render SynthNORB (full, 48 px) into the cache"
    timeout 120 $PY -m emcaps data synth --subset full --size 48 --quiet
fi

bench() {   # NAME ARGS...: one bench.py invocation, its JSON records in $OUT/bench-NAME.json
    local name=$1; shift
    stamp "bench $name"
    timeout 200 $PY benchmarks/bench.py --device cuda --json --warmup 3 --steps 10 --timeout 180 "$@" \
        > "$OUT/bench-$name.json" 2> >(tee "$OUT/bench-$name.log" >&2)
}
if wants tests; then
    stamp "tests/test_cuda.py"
    timeout 400 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -15
fi

if wants converge; then
    stamp "converge-gpu"
    timeout 300 $PY -m emcaps train --config converge-gpu --run-dir "$OUT/converge-gpu" --quiet \
        > "$OUT/converge-gpu.txt" 2>&1
    tail -3 "$OUT/converge-gpu.txt"
    stamp "converge-gpu: all 24,300 test pairs"
    timeout 60 $PY -m emcaps eval "$OUT/converge-gpu" --set data.test_limit=0 --batch-size 500 --quiet \
        --out "$OUT/converge-gpu-eval" > "$OUT/converge-gpu-eval.txt" 2>&1
    tail -2 "$OUT/converge-gpu-eval.txt"
fi

if wants bench; then
    bench paper256 --presets paper --modes train --batch 256 --impl emcaps,reference --ref-mem-budget-gb 130
    bench paper256-infer --presets paper --modes infer --batch 256 --impl emcaps
    bench small256 --presets small --modes train --batch 256 --impl emcaps
    bench paper32 --presets paper --modes train --batch 32 --impl emcaps
fi

if wants profile; then
    stamp "profile: one paper training step at batch 256"
    timeout 45 $PY benchmarks/profile_routing.py --device cuda --preset paper --batch 256 --warmup 3 --rows 25 \
        > "$OUT/profile-paper256.txt" 2>&1
fi

if wants triton; then   # about 9 minutes: the most telling first, each step bounded
    stamp "tests/test_cuda.py, the triton backend"
    timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k triton 2>&1 \
        | tee "$OUT/test_cuda_triton.txt" | tail -5
    bench triton-paper256 --presets paper --modes train --batch 256 --impl emcaps-triton,emcaps
    stamp "triton blocks: each kernel of the paper network's layers, per block choice (batch 256)"
    timeout 150 $PY benchmarks/triton_blocks.py --presets paper --time --batch 256 --no-registers \
        --votes 128,256,512 --warps 4,8 --backward-votes 64,128,256 --backward-warps 4,8 --problems 64 \
        --calls mstep,estep_assign,estep_backward,mstep_backward \
        > "$OUT/triton-blocks.txt" 2>&1
    tail -40 "$OUT/triton-blocks.txt"
    bench triton-small256 --presets small --modes train --batch 256 --impl emcaps-triton,emcaps
    bench triton-paper256-infer --presets paper --modes infer --batch 256 --impl emcaps-triton,emcaps
    stamp "profile: one paper training step at batch 256, routing backend triton"
    timeout 60 $PY benchmarks/profile_routing.py --device cuda --preset paper --batch 256 --warmup 3 --rows 25 \
        --impl emcaps-triton > "$OUT/profile-triton-paper256.txt" 2>&1
fi

stamp "summary"
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("bench-*.json")):
    try:
        records = json.loads(f.read_text())
    except ValueError:
        print(f.name, "no records"); continue
    for r in records:
        ips, mb = r.get("images_per_s"), r.get("peak_mb")
        print(f"{r['preset']:6} {r['mode']:5} {r['impl']:9} b{r['batch']:<4} "
              f"{'-' if ips is None else f'{ips:9,.0f}'} img/s  peak {'-' if mb is None else f'{mb / 1024:6.2f}'} GB  "
              f"x ref {r.get('ratio_images_per_s', 0):5.1f}  {r['status'][:80]}")
log = out / "converge-gpu" / "log.jsonl"
if log.exists():
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [e for e in events if e.get("event") == "eval"]
    print("converge-gpu evals:", [(e.get("step"), round(e.get("test_error", -1), 4)) for e in evals][-8:])
    print("converge-gpu last event:", {k: v for k, v in events[-1].items() if not isinstance(v, (dict, list))})
EOF
stamp "done"
