"""On a machine with CUDA: every routing backend against the CPU float64 reference, a short training run,
bf16 precision and deterministic runs. Skipped where CUDA is missing (the suite never needs a GPU)."""

import pytest
import torch

from emcaps import config
from emcaps.kernels.triton_kernels import triton_kernels
from emcaps.models import create_model
from emcaps.routing import RoutingConfig, Runtime
from emcaps.training import checkpoint, loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOY = ["name=toy", "data.dataset=toy", "data.resize=36", "data.crop=32", "data.train_limit=64",
       "data.test_limit=32", "model.name=tiny", "train.batch_size=16", "train.device=cuda", "train.max_steps=20"]


def _outputs_and_grads(model, x):
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach().cpu().double(), [p.grad.detach().cpu().double() for p in model.parameters()]


TRITON = pytest.param("triton", marks=pytest.mark.skipif(triton_kernels() is None, reason="no triton"))


@pytest.mark.parametrize("backend", ["auto", "torch", "compile", TRITON])
@pytest.mark.parametrize("name", ["emcaps", "authors"])
def test_cuda_backends_match_the_cpu_float64_reference(backend, name):
    routing = RoutingConfig.named(name, final_lambda=1.0)
    torch.manual_seed(0)
    reference = create_model("tiny", routing=routing, runtime=Runtime(backend="torch")).double()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    want, want_grads = _outputs_and_grads(reference, x)
    torch.manual_seed(0)
    model = create_model("tiny", routing=routing, runtime=Runtime(backend=backend)).cuda()
    got, grads = _outputs_and_grads(model, x.float().cuda())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4 * max(1.0, float(w.abs().max())), rtol=1e-2)


@pytest.mark.skipif(triton_kernels() is None, reason="no triton")
def test_triton_on_the_paper_network_matches_the_cpu_float64_reference():
    """Paper-sized layers: several blocks of children, of parent types and (72 problems) of backward problems."""
    torch.manual_seed(0)
    reference = create_model("paper", runtime=Runtime(backend="torch")).double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    want, want_grads = _outputs_and_grads(reference, x)
    torch.manual_seed(0)
    model = create_model("paper", runtime=Runtime(backend="triton")).cuda()
    got, grads = _outputs_and_grads(model, x.float().cuda())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4 * max(1.0, float(w.abs().max())), rtol=1e-2)


@pytest.mark.skipif(triton_kernels() is None or torch.cuda.device_count() < 2, reason="needs triton and 2 GPUs")
def test_triton_routes_a_model_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the kernels switch to the tensors' GPU (cuda:1 while cuda:0 is
    current), and a model there gives what it gives on cuda:0."""
    torch.manual_seed(0)
    model = create_model("tiny", runtime=Runtime(backend="triton"))
    x = torch.randn(4, 1, 32, 32)
    assert torch.cuda.current_device() == 0
    want, want_grads = _outputs_and_grads(model.to("cuda:0"), x.to("cuda:0"))
    model.zero_grad()
    got, grads = _outputs_and_grads(model.to("cuda:1"), x.to("cuda:1"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)      # float32, with atomics in PyTorch's ops
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, float(w.abs().max())), rtol=1e-4)


def test_cuda_chooses_whole_batches_and_stored_tensors():
    s = Runtime().on(torch.device("cuda"))
    assert s.chunk_mb > 1024 and not s.recompute


def test_a_short_training_run_on_cuda(tmp_path):
    summary = loop.train(config.load(None, TOY), tmp_path / "run", quiet=True)
    assert summary["finished"] and summary["steps"] == 20 and 0 <= summary["test_error"] <= 1
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in state["model"].values())


def test_bf16_precision_on_cuda(tmp_path):
    summary = loop.train(config.load(None, TOY + ["train.precision=bf16"]), tmp_path / "run", quiet=True)
    assert summary["finished"] and summary["final_loss"] == summary["final_loss"]


@pytest.mark.parametrize("backend", ["auto", TRITON])
def test_deterministic_cuda_runs_repeat_bit_for_bit(tmp_path, backend):
    cfg = config.load(None, TOY + ["train.deterministic=true", f"runtime.backend={backend}"])
    loop.train(cfg, tmp_path / "a", quiet=True)
    loop.train(cfg, tmp_path / "b", quiet=True)
    a, b = checkpoint.load_checkpoint(tmp_path / "a")["model"], checkpoint.load_checkpoint(tmp_path / "b")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_deterministic_cuda_resume_is_exact(tmp_path):
    cfg = config.load(None, TOY + ["train.deterministic=true"])
    loop.train(cfg, tmp_path / "straight", quiet=True)
    loop.train(cfg, tmp_path / "split", quiet=True, stop_at_step=7)
    loop.resume(tmp_path / "split", quiet=True)
    a = checkpoint.load_checkpoint(tmp_path / "straight")["model"]
    b = checkpoint.load_checkpoint(tmp_path / "split")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_on_cuda_uses_nccl_with_one_gpu_per_rank(tmp_path):
    """One rank where one GPU exists (the most this test can ask for): nccl, cuda:0, one summary line."""
    import json
    import subprocess
    import sys

    ranks = min(torch.cuda.device_count(), 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
           "emcaps", "train", *[a for s in TOY for a in ("--set", s)], "--run-dir", str(tmp_path / "run"),
           "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 1
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["process_group"] == "nccl" and start["device"] == "cuda:0" and start["world"] == ranks
