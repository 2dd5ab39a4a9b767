"""The benchmark's reference network must compute what emcaps computes, or its timings compare nothing.

emcaps is configured to match the reference (assignments normalised per position), the weights are
copied across, and outputs and input gradients are compared in float64.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from emcaps.capsules import Capsules
from emcaps.models import create_model
from emcaps.routing import RoutingConfig

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"emcaps_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reference = _load("reference")

MATCHING = RoutingConfig.named("paper", compete_positions=False)


def _matched_pair(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(preset, routing=MATCHING).double()
    # Non-zero betas so the cost and activation terms are exercised, not only their defaults.
    with torch.no_grad():
        for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
            layer.beta_u.normal_(0, 0.5)
            layer.beta_a.normal_(0, 0.5)
    return model, reference.load_from_emcaps(model)


# Inputs smaller than 32x32 keep the test fast; 28 gives grids 12 -> 5 -> 3 (odd, with a stride
# remainder) and 24 gives 10 -> 4 -> 2, so coordinate addition still sees several positions.
@pytest.mark.parametrize("preset, size", [("small", 28), ("paper", 24)])
def test_reference_matches_emcaps(preset, size):
    model, ref = _matched_pair(preset)
    x = torch.randn(2, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_emc = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)

    caps = model.capsules(x_emc)
    pose_ref, act_ref = ref.capsules(x_ref)
    torch.testing.assert_close(act_ref, caps.activation, rtol=0, atol=1e-6)
    torch.testing.assert_close(pose_ref, caps.pose, rtol=0, atol=1e-6)
    # The activations sit near 0.5 at init; make sure they are not all equal, or the check is weak.
    assert caps.activation.std() > 1e-4

    # One scalar that depends on poses and activations, back to the input image.
    weights = torch.randn(caps.pose.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (caps.activation.sum() + (caps.pose * weights).sum()).backward()
    (act_ref.sum() + (pose_ref * weights).sum()).backward()
    scale = x_emc.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(x_ref.grad, x_emc.grad, rtol=1e-6, atol=1e-6 * max(1.0, scale))


def test_reference_conv_caps_matches_emcaps_layer():
    torch.manual_seed(3)
    model = create_model("small", routing=MATCHING).double()
    layer = model.conv_caps1
    ref = reference.reference_conv_caps(layer)
    g = torch.Generator().manual_seed(4)
    pose = torch.randn(2, 7, 7, layer.in_types, 4, 4, dtype=torch.float64, generator=g)
    act = torch.rand(2, 7, 7, layer.in_types, dtype=torch.float64, generator=g)
    out = layer(Capsules(pose, act))
    pose_ref, act_ref = reference.unpack_capsules(ref(reference.pack_capsules(pose, act)), layer.out_types)
    torch.testing.assert_close(act_ref, out.activation, rtol=0, atol=1e-6)
    torch.testing.assert_close(pose_ref, out.pose, rtol=0, atol=1e-6)


def test_reference_refuses_a_config_it_cannot_match():
    with pytest.raises(ValueError, match="compete_positions"):
        reference.load_from_emcaps(create_model("tiny"))
    with pytest.raises(ValueError, match="normalise_cost"):
        reference.load_from_emcaps(create_model("tiny", routing=RoutingConfig(compete_positions=False,
                                                                            normalise_cost=True)))
    with pytest.raises(ValueError, match="paper's activation"):        # the library default is not the paper's
        reference.load_from_emcaps(create_model("tiny", routing=RoutingConfig(compete_positions=False)))


def test_parameter_counts_agree():
    model = create_model("paper", routing=MATCHING)
    ref = reference.load_from_emcaps(model)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())


def test_learning_sweep_gradient_norms_reach_every_layer():
    sweep = _load("learning_sweep")
    torch.manual_seed(0)
    model = create_model("tiny", routing=RoutingConfig(iterations=2))
    images, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    norms = sweep.gradient_norms(model, images, labels)
    assert set(norms) == {"conv1", "primary.pose", "conv_caps1", "conv_caps2", "class_caps"}
    assert all(0 < g < float("inf") for g in norms.values())
    assert all(p.grad is None for p in model.parameters())          # leaves the model as it found it
    stats = sweep.activation_stats(model, images)
    assert set(stats) == {"primary", "conv_caps1", "conv_caps2", "class_caps"}
    assert all(0 <= m <= 1 and sd >= 0 for m, sd in stats.values())


def test_convergence_curve_comes_from_eval_and_epoch_events(tmp_path):
    """train.eval_steps logs a test between epochs; the convergence benchmark reads those and the epochs'."""
    from emcaps import config
    from emcaps.training import loop

    convergence = _load("convergence")
    overrides = ["data.dataset=toy", "data.resize=36", "data.crop=32", "data.train_limit=64", "data.test_limit=16",
                 "model.name=tiny", "train.epochs=2", "train.batch_size=16", "train.threads=1",
                 "train.eval_steps=3"]
    loop.train(config.load(None, overrides), tmp_path / "run", quiet=True)
    points = convergence.curve(tmp_path / "run")
    # 4 steps an epoch: tests at step 3 (eval), 4 (epoch), 6 (eval), 8 (epoch; step 8 ends the run)
    assert [p["step"] for p in points] == [3, 4, 6, 8]
    assert all(0 <= p["test_error"] <= 1 and p["elapsed"] > 0 for p in points)
    assert [p["elapsed"] for p in points] == sorted(p["elapsed"] for p in points)
    assert convergence.curve(tmp_path / "missing") == []


def test_iteration_order_counts_checks_after_the_first_steps(tmp_path, monkeypatch, capsys):
    """Counts, per later curve, the shared checks where it is at least as good as an earlier one."""
    order = _load("iteration_order")

    def write(name, errors, config="converge"):
        curve = [{"step": 250 * (i + 1), "elapsed": 1.0, "test_error": e} for i, e in enumerate(errors)]
        other = {"config": "converge-cnn", "curve": [{"step": 250, "elapsed": 1.0, "test_error": 0.0}]}
        (tmp_path / name).write_text(json.dumps([other, {"config": config, "curve": curve}]))
        return str(tmp_path / name)

    # checks after step 500: 750, 1000, 1250 (it2 has no 1500, so 1500 is not shared)
    it1 = write("it1.json", [0.5, 0.4, 0.30, 0.20, 0.10, 0.05])
    it2 = write("it2.json", [0.5, 0.4, 0.25, 0.20, 0.15])
    monkeypatch.setattr(sys, "argv", ["iteration_order.py", it1, it2, "--after", "500"])
    order.main()
    out = capsys.readouterr().out
    assert "3 shared checks from step 750 to 1250" in out
    assert "it2 <= it1: 2 of 3" in out                     # better at 750, level at 1000, worse at 1250
    assert "it1: mean 20.00% over the checks, 10.00% at step 1250" in out
    # two seeds of a setting average check by check: 0.25, 0.15, 0.10 at 750, 1000, 1250
    it1b = write("it1b.json", [0.5, 0.4, 0.20, 0.10, 0.10])
    monkeypatch.setattr(sys, "argv", ["iteration_order.py", f"{it1},{it1b}", it2, "--after", "500"])
    order.main()
    out = capsys.readouterr().out
    assert "it2 <= mean(it1, it1b): 1 of 3" in out         # level at 750, worse at 1000 and 1250
    assert "mean(it1, it1b): mean 16.67% over the checks, 10.00% at step 1250" in out
    monkeypatch.setattr(sys, "argv", ["iteration_order.py", it1, "--config", "absent"])
    with pytest.raises(SystemExit, match="no curve of config 'absent'"):
        order.main()


def test_convergence_time_limit_stops_and_checkpoints_the_model_it_reached(tmp_path):
    """--minutes ends a run through the loop's callback (so every torchrun rank stops together) and the
    checkpoint holds the step it stopped at."""
    from emcaps.training.checkpoint import load_checkpoint

    convergence = _load("convergence")
    overrides = ["data.dataset=toy", "data.resize=36", "data.crop=32", "data.train_limit=64", "data.test_limit=16",
                 "model.name=tiny", "train.epochs=2", "train.batch_size=16", "train.threads=1"]
    config_file = tmp_path / "c.toml"
    config_file.write_text('name = "limited"\n')
    result = convergence.run(str(config_file), overrides, tmp_path, minutes=0)
    assert result["summary"]["stopped"] == "after 0 minutes"
    assert result["summary"]["steps"] == 1
    assert load_checkpoint(tmp_path / "c" / "checkpoint.pt")["step"] == 1


def test_bench_table_gives_smallnorb_epoch_time_for_training_rows():
    """What a user plans by: 24,300 pairs at the measured training speed, only where that means an epoch."""
    bench = _load("bench")
    assert bench.epoch_time({"mode": "train", "preset": "small", "images_per_s": 24300 / 3723}) == "1:02:03"
    assert bench.epoch_time({"mode": "infer", "preset": "small", "images_per_s": 100.0}) == "-"
    assert bench.epoch_time({"mode": "train", "preset": "routing", "images_per_s": 100.0}) == "-"
    assert bench.epoch_time({"mode": "train", "preset": "paper", "images_per_s": None}) == "-"


def test_bench_routing_overrides_reach_the_emcaps_model_and_are_checked(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))                 # the child imports reference.py by name
    bench = _load("bench")
    args = bench.parse_args(["--routing", "detach_assignments=true", "--routing", "iterations=2"])
    assert args.routing == ["detach_assignments=true", "iterations=2"]
    routing, runtime = bench.routing_config(False, "emcaps-torch", tuple(args.routing))
    assert routing.detach_assignments and routing.iterations == 2 and runtime.backend == "torch"
    matched, _ = bench.routing_config(True, "emcaps", ("iterations=1",))
    assert matched == RoutingConfig.named("paper", compete_positions=False, iterations=1)
    _, runtime = bench.routing_config(False, "emcaps", ("native_chunk_mb=48",))
    assert runtime.native_chunk_mb == 48 and runtime.backend == "auto"
    with pytest.raises(ValueError, match="routing.iterations"):
        bench.routing_config(False, "emcaps", ("iterations=0",))
    spec = bench.Spec(preset="small", mode="train", impl="emcaps-torch", batch=2, routing=("iterations=1",))
    step, alive = bench.build_step(spec)
    step()
    assert alive[0].conv_caps1.routing.iterations == 1


def test_bench_kernels_compare_times_both_sources_and_their_outputs_agree(capsys):
    """--compare against the library's own source: every kernel timed twice, outputs identical."""
    from emcaps import kernels

    if kernels.library() is None:
        pytest.skip("native kernels unavailable")
    bench = _load("bench_kernels")
    assert bench.main(["--images", "1", "--repeat", "1", "--compare", str(kernels.SOURCE)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("mstep", "estep_assign", "estep_backward", "mstep_backward")]
    assert [row[0] for row in rows] == ["mstep", "estep_assign", "estep_backward", "mstep_backward"]
    assert all(row[-2].endswith("x") and float(row[-1]) == 0.0 for row in rows)


def test_bench_on_a_device_without_cuda_is_a_one_line_error(capsys):
    """`bench.py --device cuda` where CUDA is missing exits non-zero with one line, and runs nothing."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bench = _load("bench")
    assert bench.main(["--device", "cuda", "--presets", "small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench.py: --device cuda: CUDA is not available") and "\n" not in err
    assert bench.main(["--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
@pytest.mark.parametrize("arch", [80, 90, 100])
def test_triton_kernels_compile_and_the_default_blocks_spill_nothing(arch):
    """Triton compiles every kernel for an A100 (sm_80), an H100/H200 (sm_90) and a B200 (sm_100) without a GPU
    (ptxas included); the default TritonBlocks keep each routed layer of the paper, small and tiny networks
    within the registers, with no spills and no additions of zero."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR.parent / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(BENCH_DIR / "triton_blocks.py"), "--presets", "paper,small,tiny",
                           "--default-only", "--arch", str(arch), "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3 * 3 * 7                          # presets x routed layers x kernel launches
    assert {(r["call"], r["kernel"]) for r in records} == {
        ("mstep", "gather"), ("estep_assign", "estep"), ("estep_backward", "gather"),
        ("mstep_backward", "mstep_backward"), ("mstep_backward", "weights_backward"),
        ("mstep_backward+estep", "mstep_backward"), ("mstep_backward+estep", "weights_backward")}
    assert all(r["default"] for r in records)
    spilled = [(r["layer"], r["kernel"], r["spill_bytes"]) for r in records if r["spill_bytes"]]
    assert not spilled
    assert all(0 < r["registers"] <= 255 for r in records)
    # no x + 0.0 in a main loop: every pick and sum that starts from -0.0 folds away (a literal -0.0 would be
    # +0.0 in triton before 3.9, and cost an instruction per entry)
    assert not [(r["layer"], r["kernel"], r["zero_adds"]) for r in records if r["zero_adds"]]
    # i/vote counts the main loop, not the whole kernel (estep_assign and the weights' pass have no loop)
    assert all(r["per_vote"] * r["votes"] < r["instructions"] * 32 * r["warps"] for r in records
               if r["kernel"] not in ("estep", "weights_backward")), records


def test_triton_blocks_refuses_the_interpreter_and_time_without_cuda(monkeypatch, capsys):
    pytest.importorskip("triton")
    blocks = _load("triton_blocks")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert blocks.main(["--default-only"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
    assert blocks.main(["--calls", "mstep,estep"]) == 2
    assert "unknown call(s) estep" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert blocks.main(["--time"]) == 2
        assert "--time needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("branch", ["BRA 0x0020", "BRA `(.L_x_1) 0x0020", "BRA.U !UP0, 0x0020", "@P1 BRA 0x0020"])
def test_instruction_counts_find_the_main_loop_in_every_branch_syntax(branch):
    """i/vote counts the largest loop's body: its backward branch is found in sm_80/90 listings and in sm_100's,
    which put a uniform predicate after the opcode (missing it counted the whole kernel, 6x too many)."""
    blocks = _load("triton_blocks")
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;",
        "        /*0020*/                   FFMA R3, R4, R5, R3 ;",
        "        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;",
        f"        /*0040*/                   {branch} ;",
        "        /*0050*/                   STG.E [R6.64], R3 ;",
        "        /*0060*/                   EXIT ;",
        "        /*0070*/                   BRA 0x70;",
    ])
    ops = blocks.machine_code(sass)
    assert [op for _, op, _ in ops] == ["MOV", "ISETP", "FFMA", "IADD3", "BRA", "STG", "EXIT", "BRA"]
    assert [op for _, op, _ in blocks.main_loop(ops)] == ["FFMA", "IADD3", "BRA"]


def test_warps_per_sm_follow_registers_threads_and_shared_memory():
    """The occupancy column of triton_blocks.py: registers go to a warp in units of 256 per warp (234 registers
    -> 7,680 a warp, 8 warps of 65,536), threads cap it (2,048 on sm_90, 1,536 on sm_89), and so does shared
    memory (1 KB more a program)."""
    blocks = _load("triton_blocks")
    assert blocks.warps_per_sm(90, 234, 4, 2048) == 8           # two programs of 4 warps
    assert blocks.warps_per_sm(90, 103, 8, 4096) == 16          # 3,328 a warp: 19 warps fit, two programs of 8
    assert blocks.warps_per_sm(90, 132, 8, 4096) == 8           # 4,352 a warp: 15 warps, one program
    assert blocks.warps_per_sm(90, 32, 8, 2048) == 64           # threads: 2,048 / 256 = 8 programs
    assert blocks.warps_per_sm(89, 32, 8, 2048) == 48           # threads: 1,536 / 256 = 6 programs
    assert blocks.warps_per_sm(90, 32, 4, 100 * 1024) == 8      # shared memory: 2 programs of 101 KB
    assert blocks.warps_per_sm(75, 32, 4, 0) is None            # an architecture without a table row
