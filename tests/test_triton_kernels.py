"""The Triton routing kernels (backend 'triton') against the C++ kernels and PyTorch ops: values and every
gradient, in float64 and float32, with and without competition across positions, offsets (the class
capsules) and parent counts that are not powers of two. Without CUDA they run in Triton's interpreter
(tests/conftest.py); without the triton package the module is skipped."""

import pytest
import torch
from test_native_routing import assert_same, problem, run_both

from emcaps.kernels.triton_kernels import TritonBlocks, TritonKernels, interpreted, triton_available, triton_kernels
from emcaps.models import create_model
from emcaps.routing import RoutingConfig, Runtime
from emcaps.routing.native import conv_routing

pytestmark = [pytest.mark.skipif(triton_kernels() is None, reason="needs the triton package"),
              pytest.mark.skipif(not interpreted(), reason="on CUDA, tests/test_cuda.py holds backend 'triton' to "
                                                           "the float64 reference")]


def triton_routing(*args, **kwargs):
    return conv_routing(*args, kernels=triton_kernels(), **kwargs)


@pytest.mark.parametrize("fields", [{}, {"detach_assignments": False},
                                    {"activation": "paper", "estep_temperature": 1.0, "centre_damping": 0.2,
                                     "detach_assignments": False}])
@pytest.mark.parametrize("compete", [True, False])
def test_triton_matches_torch_values_and_gradients(fields, compete, monkeypatch):
    import test_native_routing
    monkeypatch.setattr(test_native_routing, "conv_routing", triton_routing)
    config = RoutingConfig(iterations=3, final_lambda=1.0, **fields)
    assert_same(run_both(problem(n=1, h=4, c=5), config, compete, scale=0.5), atol=1e-10, rtol=1e-9)


def test_triton_whole_blocks_and_parent_groups_match_torch(monkeypatch):
    """288 children and 32 parent types, as the paper's capsule convolutions: every kernel's blocks lie inside
    the tensors (their unmasked path), and mstep_backward's parents fall in four groups of eight."""
    import test_native_routing
    monkeypatch.setattr(test_native_routing, "conv_routing", triton_routing)
    inputs = problem(n=1, h=3, b=32, c=32, seed=5)
    assert_same(run_both(inputs, RoutingConfig(iterations=2, final_lambda=1.0), True), atol=1e-10, rtol=1e-9)


def test_triton_reversed_axes_give_the_same_gradients():
    """mstep_backward loading its float32 blocks with the first four axes reversed (TritonBlocks.reverse_axes,
    the default under triton 3.6) computes exactly what it computes with them in order, through the E-step
    too, with four parent groups."""
    poses, weight, act, bu, ba, comp, _ = problem(n=1, h=3, b=4, c=32, seed=7, dtype=torch.float32)
    config = RoutingConfig(iterations=2, final_lambda=1.0, detach_assignments=False)
    initial = torch.full((1, 1, 1), 1 / 32)
    results = []
    for reverse in (False, True):
        kernels = TritonKernels(TritonBlocks(reverse_axes=reverse))
        leaves = [t.detach().clone().requires_grad_(True) for t in (poses, weight, act, bu, ba)]
        mean, a = conv_routing(*leaves, config, initial, comp, 1.0, kernels=kernels)
        (mean.square().sum() + (a * torch.arange(32.0)).sum()).backward()
        results.append([mean, a] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def test_triton_float32_and_offsets_match_the_cpp_kernels():
    """float32 as training runs it, with a per-child offset (coordinate addition) and J = 5."""
    poses, weight, act, bu, ba, _, _ = problem(n=1, h=4, c=5, seed=3, dtype=torch.float32)
    offsets = torch.randn(weight.shape[0], 16)
    initial = torch.full((1, 1, 1), 0.2)
    config = RoutingConfig(final_lambda=1.0)
    results = []
    for kernels in (None, triton_kernels()):
        leaves = [t.detach().clone().requires_grad_(True) for t in (poses, weight, act, bu, ba)]
        mean, a = conv_routing(*leaves, config, initial, None, 1.0, offsets, kernels=kernels)
        (mean.sum() + (a * torch.arange(5.0)).sum()).backward()
        results.append((mean.detach(), a.detach(), [t.grad for t in leaves]))
    assert_same(results, atol=2e-4, rtol=2e-4)


def test_layers_route_with_triton_as_with_torch():
    """A tiny network, forward and backward, in float64: backend 'triton' against PyTorch ops."""
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = create_model("tiny", classes=5, in_channels=1, runtime=Runtime(backend=backend)).double()
        assert model.class_caps.uses_native(torch.zeros(1, dtype=torch.float64)) == (backend == "triton")
        a = model(x)
        (a * torch.arange(5.0, dtype=torch.float64)).sum().backward()
        outs.append((a.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-9, rtol=1e-8)
    for g, w in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    model = create_model("tiny", classes=5, in_channels=1, runtime=Runtime(backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available(torch.device("cpu")) and not interpreted()
    with pytest.raises(RuntimeError, match="routing backend 'triton' needs a CUDA tensor.*TRITON_INTERPRET=1"):
        model(torch.randn(1, 1, 32, 32))


def test_triton_degenerate_inputs_stay_finite_and_agree(monkeypatch):
    """Every child inactive: each parent's weight sum is below eps (the S < eps branches of both passes)."""
    import test_native_routing
    monkeypatch.setattr(test_native_routing, "conv_routing", triton_routing)
    results = run_both(problem(n=1, h=4, c=3, zero_act=True), RoutingConfig(final_lambda=1.0), True)
    for mean, act, grads in results:
        assert torch.isfinite(mean).all() and torch.isfinite(act).all()
        assert all(torch.isfinite(g).all() for g in grads)
    assert_same(results, atol=1e-10, rtol=1e-9)
