"""The native routing kernels against the PyTorch routing they replace: values and every gradient, with
and without competition across positions, the class capsules, degenerate inputs, dtypes, threads, and the
fallback."""

import gc
import warnings

import pytest
import torch

import emcaps.layers
from emcaps.capsules import Capsules
from emcaps.layers import ClassCaps, ConvCaps
from emcaps.routing import PositionCompetition, RoutingConfig, Runtime, em_routing_fused
from emcaps.routing.native import conv_routing, native_available

pytestmark = pytest.mark.skipif(not native_available(torch.device("cpu")),
                                reason="no C++ compiler for the native kernels")


def problem(n=2, h=5, k=3, s=1, b=3, c=4, seed=0, dtype=torch.float64, zero_act=False):
    """Child poses (M, I, 16) of a capsule convolution, transforms (I, J, 16), activations, betas."""
    g = torch.Generator().manual_seed(seed)
    oh = (h - k) // s + 1
    m, n_in = n * oh * oh, k * k * b
    poses = torch.randn(m, n_in, 16, generator=g, dtype=dtype)
    weight = 0.5 * torch.randn(n_in, c, 16, generator=g, dtype=dtype)
    act = torch.zeros(m, n_in, dtype=dtype) if zero_act else torch.rand(m, n_in, generator=g, dtype=dtype)
    beta_u = torch.randn(c, generator=g, dtype=dtype)
    beta_a = torch.randn(c, generator=g, dtype=dtype)
    comp = PositionCompetition(h, h, k, s, b)
    return poses, weight, act, beta_u, beta_a, comp, n


def torch_routing(poses, weight, act, beta_u, beta_a, config, initial, comp, scale):
    """What ConvCaps computes with PyTorch ops: votes materialised, em_routing_fused."""
    m, n_in, _ = poses.shape
    n_out = weight.shape[1]
    votes = torch.einsum("mirk,ijkc->mjirc", poses.view(m, n_in, 4, 4), weight.view(n_in, n_out, 4, 4))
    return em_routing_fused(votes.reshape(m, n_out, n_in, 16), act, beta_u, beta_a, config, cost_scale=scale,
                            initial=initial, normalise=comp)


def run_both(inputs, config, compete=True, scale=1.0):
    """Outputs and gradients (poses, weight, act, beta_u, beta_a) of the native and the torch routing."""
    poses, weight, act, beta_u, beta_a, comp, n = inputs
    n_out = weight.shape[1]
    if compete:
        initial = comp.initial(n, n_out, poses.dtype)
    else:
        comp, initial = None, torch.full((1, 1, 1), 1.0 / n_out, dtype=poses.dtype)
    results = []
    for route in (conv_routing, torch_routing):
        leaves = [t.detach().clone().requires_grad_(True) for t in (poses, weight, act, beta_u, beta_a)]
        mean, a = route(*leaves, config, initial, comp, scale)
        g = torch.Generator().manual_seed(7)        # the same upstream gradients in every dtype
        (mean * torch.randn(mean.shape, generator=g, dtype=torch.float64).to(mean.dtype)).sum().backward(
            retain_graph=True)
        (a * torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype)).sum().backward()
        results.append((mean.detach(), a.detach(), [t.grad for t in leaves]))
    return results


def assert_same(results, **tol):
    (m1, a1, g1), (m2, a2, g2) = results
    torch.testing.assert_close(m1, m2, **tol)
    torch.testing.assert_close(a1, a2, **tol)
    for name, x, y in zip(("poses", "weight", "act", "beta_u", "beta_a"), g1, g2):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("compete", [True, False])
def test_native_matches_torch_values_and_gradients(iterations, compete):
    config = RoutingConfig(iterations=iterations, final_lambda=1.0)
    assert_same(run_both(problem(), config, compete), atol=1e-10, rtol=1e-9)


FULL = {"detach_assignments": False}          # gradients through every E-step (the paper's)


@pytest.mark.parametrize("fields", [{"activation": "standardised", **FULL}, {"estep_temperature": 0.4, **FULL},
                                    {"activation": "standardised", "estep_temperature": 0.6, **FULL},
                                    {"activation": "paper", "estep_temperature": 1.0, "centre_damping": 0.1,
                                     **FULL},
                                    {"activation": "standardised", "estep_temperature": 0.5,
                                     "centre_damping": 0.5, **FULL},
                                    {"estep_temperature": 0.5, "detach_assignments": True},
                                    {"activation": "paper", "estep_temperature": 1.0, "centre_damping": 0.2,
                                     "detach_assignments": True}])
@pytest.mark.parametrize("compete", [True, False])
def test_native_matches_torch_for_each_parameterisation(fields, compete):
    config = RoutingConfig(final_lambda=2.0, **fields)
    assert_same(run_both(problem(seed=11), config, compete, scale=0.5), atol=1e-10, rtol=1e-9)


def test_native_float32_gradients_are_close_to_float64():
    """The float32 kernels that training runs (AVX2 / AVX-512 where the CPU has them), backward included."""
    poses, weight, act, bu, ba, comp, n = problem(seed=12, n=3)
    exact = [t.float().double() for t in (poses, weight, act, bu, ba)]     # inputs float32 can hold
    config = RoutingConfig(final_lambda=2.0, activation="standardised", estep_temperature=0.5, centre_damping=0.1)
    (m64, a64, g64), _ = run_both((*exact, comp, n), config)
    (m32, a32, g32), _ = run_both((*[t.float() for t in exact], comp, n), config)
    torch.testing.assert_close(m32.double(), m64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a32.double(), a64, atol=1e-4, rtol=1e-4)
    for name, x, y in zip(("poses", "weight", "act", "beta_u", "beta_a"), g32, g64):
        scale = float(y.abs().max())
        torch.testing.assert_close(x.double(), y, atol=2e-4 * scale, rtol=1e-3,
                                   msg=lambda m, name=name: f"float32 gradient of {name}: {m}")


@pytest.mark.parametrize("c,b", [(16, 3), (37, 3), (20, 1)])
@pytest.mark.parametrize("detach,compete,offsets", [(False, True, False), (True, False, True), (False, False, True)])
def test_native_float32_wide_layers_are_close_to_float64(c, b, detach, compete, offsets):
    """16 or more parent types: the AVX-512 kernels take them sixteen at a time (37: two groups and five one by
    one), and children sixteen at a time (27 children: two overlapping blocks; 9: one by one), so these are the
    paths a real layer (32 types) trains on, E-step gradients and offsets included."""
    poses, weight, act, bu, ba, comp, n = problem(seed=13, c=c, b=b)
    off = 0.3 * torch.randn(poses.shape[1], 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = [t.float().double() for t in (poses, weight, act, bu, ba, off)]
    config = RoutingConfig(final_lambda=2.0, iterations=3, detach_assignments=detach)
    runs = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_(True) for t in exact[:5]]
        initial = comp.initial(n, c, dtype) if compete else torch.full((1, 1, 1), 1.0 / c, dtype=dtype)
        mean, a = conv_routing(*leaves, config, initial, comp if compete else None,
                               offsets=exact[5].to(dtype) if offsets else None)
        g = torch.Generator().manual_seed(7)
        loss = (mean * torch.randn(mean.shape, generator=g, dtype=torch.float64).to(dtype)).sum() + \
            (a * torch.randn(a.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
        runs.append((mean.double(), a.double(), [x.double() for x in torch.autograd.grad(loss, leaves)]))
    (m64, a64, g64), (m32, a32, g32) = runs
    torch.testing.assert_close(m32, m64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a32, a64, atol=1e-4, rtol=1e-4)
    for name, x, y in zip(("poses", "weight", "act", "beta_u", "beta_a"), g32, g64):
        scale = float(y.abs().max())
        torch.testing.assert_close(x, y, atol=2e-4 * scale, rtol=1e-3,
                                   msg=lambda m, name=name: f"float32 gradient of {name}: {m}")


@pytest.mark.parametrize("k,s,h", [(3, 2, 7), (2, 1, 4), (1, 1, 3)])
def test_native_matches_torch_other_geometries_and_cost_scale(k, s, h):
    config = RoutingConfig(final_lambda=0.3, schedule="linear")
    # A 1x1 kernel gives parents of one or two children, whose variances sit near the 1e-9 floor: there the
    # torch path's variance from centred moments keeps about 7 fewer digits than the kernels' two passes.
    assert_same(run_both(problem(h=h, k=k, s=s, seed=3), config, True, scale=0.37), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_native_degenerate_inputs_stay_finite_and_agree(damping):
    """All-zero activations (weight sums below EPS) and identical votes: finite, and as the torch path."""
    config = RoutingConfig(final_lambda=1.0, centre_damping=damping)
    results = run_both(problem(zero_act=True), config)
    assert_same(results, atol=1e-10, rtol=1e-9)
    poses, weight, act, bu, ba, comp, n = problem(seed=5)
    poses = poses[:, :1].expand_as(poses).contiguous()                  # every child has the same pose
    weight = weight[:1].expand_as(weight).contiguous()                  # ... and the same transforms
    results = run_both((poses, weight, act, bu, ba, comp, n), config)
    for mean, a, grads in results:
        assert torch.isfinite(mean).all() and torch.isfinite(a).all()
        assert all(torch.isfinite(g).all() for g in grads)
    assert_same(results, atol=1e-8, rtol=1e-7)


def test_native_float32_is_close_to_float64_and_half_routes_in_float32():
    poses, weight, act, bu, ba, comp, n = problem(seed=2)
    config = RoutingConfig(final_lambda=1.0)
    initial = comp.initial(n, weight.shape[1], torch.float64)
    m64, a64 = conv_routing(poses, weight, act, bu, ba, config, initial, comp)
    m32, a32 = conv_routing(poses.float(), weight.float(), act.float(), bu.float(), ba.float(), config,
                            initial, comp)
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a32.double(), a64, atol=1e-5, rtol=1e-4)
    mh, ah = conv_routing(poses.bfloat16(), weight.bfloat16(), act.bfloat16(), bu.bfloat16(), ba.bfloat16(),
                          config, initial, comp)
    assert mh.dtype == torch.bfloat16 and torch.isfinite(mh.float()).all()
    torch.testing.assert_close(ah.double(), a64, atol=0.05, rtol=0.05)


def test_native_results_do_not_depend_on_thread_count():
    inputs = problem(n=3, seed=9)
    config = RoutingConfig(final_lambda=1.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_both(inputs, config)[0]
        torch.set_num_threads(2)
        two = run_both(inputs, config)[0]
    finally:
        torch.set_num_threads(before)
    assert_same([one, two], atol=1e-12, rtol=1e-12)


def test_native_graph_is_freed_after_each_step():
    """Nothing the routing keeps for its backward may point back at its outputs: such a cycle runs through
    C++, the garbage collector cannot free it, and every training step's graph (tens of MB) would leak."""
    from emcaps.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", classes=5, in_channels=1, runtime=Runtime(backend="native"))
    x = torch.randn(2, 1, 32, 32)

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():          # touching torch.distributed's deprecated names warns
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    before = live_tensors()
    for _ in range(3):
        model(x).sum().backward()
    assert live_tensors() == before


def test_native_rejects_mismatched_shapes():
    poses, weight, act, bu, ba, comp, n = problem()
    initial = comp.initial(n, weight.shape[1], poses.dtype)
    with pytest.raises(ValueError, match=r"weight \(I, J, 16\)"):
        conv_routing(poses, weight[:-1], act, bu, ba, RoutingConfig(), initial, comp)
    with pytest.raises(ValueError, match=r"activations \(M, I\)"):
        conv_routing(poses, weight, act[:, :-1], bu, ba, RoutingConfig(), initial, comp)


def test_backend_choice_in_layers(monkeypatch):
    """'auto' falls back to PyTorch ops where the kernels are unavailable; 'native' says why it cannot run."""
    caps = Capsules(torch.randn(2, 5, 5, 2, 4, 4, dtype=torch.float64),
                    torch.rand(2, 5, 5, 2, dtype=torch.float64))
    torch.manual_seed(0)
    layer = ConvCaps(2, 3, kernel=3, stride=1).double()
    assert layer.uses_native(caps.pose)
    assert not layer.uses_native(caps.pose, trace=[])                    # pictures need every iteration
    native = layer(caps)
    monkeypatch.setattr(emcaps.layers, "native_available", lambda device: False)
    assert not layer.uses_native(caps.pose)
    fallback = layer(caps)
    torch.testing.assert_close(native.pose, fallback.pose)
    torch.testing.assert_close(native.activation, fallback.activation)
    layer.runtime = Runtime(backend="native")
    with pytest.raises(RuntimeError, match="backend 'native' needs a CPU tensor and the emcaps kernels"):
        layer(caps)
    with pytest.raises(ValueError, match="unknown routing backend 'gpu'"):
        Runtime(backend="gpu")


def class_caps_run(backend, dtype=torch.float64, coord_add=True, name="emcaps", **fields):
    """Outputs and gradients (poses, activations, transforms, beta_u, beta_a) of a ClassCaps layer."""
    routing = RoutingConfig.named(name, **fields)
    torch.manual_seed(1)
    layer = ClassCaps(3, 4, coord_add=coord_add, routing=routing).to(dtype)
    layer.runtime = Runtime(backend=backend)
    with torch.no_grad():
        layer.beta_u.normal_()
        layer.beta_a.normal_(0, 0.3 if name == "emcaps" else 3e-4)     # authors: beta_a = -5000 act_b
    g = torch.Generator().manual_seed(2)
    pose = torch.randn(3, 3, 2, 3, 4, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    act = torch.rand(3, 3, 2, 3, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    out = layer(Capsules(pose, act))
    up = torch.Generator().manual_seed(7)
    loss = ((out.pose * torch.randn(out.pose.shape, generator=up, dtype=torch.float64).to(dtype)).sum()
            + (out.activation * torch.randn(out.activation.shape, generator=up, dtype=torch.float64).to(dtype)).sum())
    grads = torch.autograd.grad(loss, [pose, act, layer.weight, layer.beta_u, layer.beta_a])
    return out.pose.detach(), out.activation.detach(), list(grads)


@pytest.mark.parametrize("coord_add", [True, False])
@pytest.mark.parametrize("fields", [{}, FULL, {"name": "authors"}, {"name": "authors", "detach_assignments": True},
                                    {"iterations": 1}, {"estep_temperature": 0.5, "class_lambda_scale": 0.25}])
def test_native_class_caps_match_torch(coord_add, fields):
    """The class capsules on the native kernels (transforms shared over positions, coordinate addition as an
    offset on each child's votes): the same values and every gradient as PyTorch ops, in float64."""
    native = class_caps_run("native", coord_add=coord_add, **fields)
    reference = class_caps_run("torch", coord_add=coord_add, **fields)
    assert_same([native, reference], atol=1e-10, rtol=1e-9)


def test_native_class_caps_float32_is_close_to_float64():
    """What training runs: the float32 kernels (AVX2 / AVX-512 where built) against float64, gradients too."""
    single, double = class_caps_run("native", torch.float32), class_caps_run("native", torch.float64)
    torch.testing.assert_close(single[0].double(), double[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single[1].double(), double[1], atol=1e-4, rtol=1e-4)
    for x, y in zip(single[2], double[2]):
        torch.testing.assert_close(x.double(), y, atol=2e-3, rtol=2e-3)


def test_native_offsets_must_match_the_children():
    poses, weight, act, bu, ba, comp, n = problem()
    initial = comp.initial(n, weight.shape[1], poses.dtype)
    with pytest.raises(ValueError, match=r"offsets must be \(I, 16\)"):
        conv_routing(poses, weight, act, bu, ba, RoutingConfig(), initial, comp, offsets=torch.zeros(5, 16))
