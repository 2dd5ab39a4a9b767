"""Capsule layers: votes against explicit products, the fast routing path against the dense reference,
the structure each layer promises (translation equivariance, shared transforms), and bad inputs."""

import pytest
import torch

from emcaps.capsules import Capsules
from emcaps.layers import ClassCaps, ConvCaps, PrimaryCaps, coordinate_offsets
from emcaps.routing import RoutingConfig, Runtime, em_routing
from emcaps.routing.native import native_available

R = RoutingConfig(final_lambda=1.0)
# Capsule convolutions route with PyTorch ops or with the native kernels; both must compute the same thing.
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native_available(torch.device("cpu")), reason="no C++ compiler for the native kernels"))]


def random_caps(n=2, h=5, w=5, types=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Capsules(torch.randn(n, h, w, types, 4, 4, generator=g, dtype=dtype),
                    torch.rand(n, h, w, types, generator=g, dtype=dtype))


def conv_layer(b, c, k, s, backend="auto", **routing):
    torch.manual_seed(1)
    layer = ConvCaps(b, c, kernel=k, stride=s, routing=RoutingConfig(final_lambda=1.0, **routing)).double()
    layer.runtime = Runtime(backend=backend)
    with torch.no_grad():
        layer.beta_u.normal_()
        layer.beta_a.normal_()
    return layer


def test_primary_caps_shapes_and_range():
    layer = PrimaryCaps(6, 3)
    caps = layer(torch.randn(2, 6, 7, 5))
    assert caps.pose.shape == (2, 7, 5, 3, 4, 4) and caps.activation.shape == (2, 7, 5, 3)
    assert ((caps.activation >= 0) & (caps.activation <= 1)).all()
    with pytest.raises(ValueError, match=r"feature map \(N, C, H, W\)"):
        layer(torch.randn(6, 7, 5))


def test_conv_caps_votes_are_pose_times_transform():
    b, c, k, s = 3, 2, 3, 2
    layer = conv_layer(b, c, k, s)
    caps = random_caps(h=7, w=7, types=b)
    votes, a_in = layer.votes(caps)                                     # (N*L, C, K*K*B, 16)
    votes = votes.view(2, 3, 3, c, k, k, b, 4, 4)
    a_in = a_in.view(2, 3, 3, k, k, b)
    weight = layer.weight.view(k, k, b, c, 4, 4)
    for y, x, ky, kx, bi, ci in [(0, 0, 0, 0, 0, 0), (2, 1, 2, 0, 1, 1), (1, 2, 1, 2, 2, 0)]:
        expected = caps.pose[:, y * s + ky, x * s + kx, bi] @ weight[ky, kx, bi, ci]
        torch.testing.assert_close(votes[:, y, x, ci, ky, kx, bi], expected)
        torch.testing.assert_close(a_in[:, y, x, ky, kx, bi], caps.activation[:, y * s + ky, x * s + kx, bi])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_caps_without_competition_is_dense_routing_per_position(backend):
    layer = conv_layer(3, 4, 3, 1, compete_positions=False, backend=backend)
    caps = random_caps(h=5, w=5, types=3)
    out = layer(caps)
    votes, a_in = layer.votes(caps)
    pose, act = em_routing(votes.transpose(1, 2), a_in, layer.beta_u, layer.beta_a, 3, final_lambda=1.0)
    torch.testing.assert_close(out.pose.reshape(pose.shape), pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.activation.reshape(act.shape), act, atol=1e-9, rtol=1e-9)


# Fields of the named parameterisations that the layers apply (cost factors, bias scales, damped centres).
AUTHORS_LIKE = {"centre_damping": 0.1, "cost_scale": 2.0, "fan_in_cost_scale": 3.0, "beta_u_scale": 1.4,
                "beta_a_scale": -3.0}


@pytest.mark.parametrize("fields", [{}, AUTHORS_LIKE, {**AUTHORS_LIKE, "initial_assignments": "per_window"}])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,s,h", [(3, 1, 5), (3, 2, 7), (2, 1, 4)])
def test_conv_caps_with_competition_is_dense_routing_over_the_grid(k, s, h, backend, fields):
    b, c, n = 2, 3, 2
    # The paper's activation: the standardised one normalises over the types at one position, which the
    # dense form (one problem over the whole grid) does not group; the E-step is the default's.
    layer = conv_layer(b, c, k, s, backend=backend, activation="paper", **fields)
    cfg = layer.routing
    caps = random_caps(n=n, h=h, w=h, types=b, seed=4)
    out = layer(caps)
    oh = (h - k) // s + 1
    votes, _ = layer.votes(caps)
    votes = votes.view(n, oh, oh, c, k, k, b, 16)
    dense = torch.zeros(n, h, h, b, oh, oh, c, 16, dtype=torch.float64)
    conn = torch.zeros(h, h, b, oh, oh, c, dtype=torch.bool)
    for y in range(oh):
        for x in range(oh):
            for ky in range(k):
                for kx in range(k):
                    dense[:, y * s + ky, x * s + kx, :, y, x] = votes[:, y, x, :, ky, kx].transpose(1, 2)
                    conn[y * s + ky, x * s + kx, :, y, x] = True
    dense = dense.view(n, h * h * b, oh * oh * c, 16)
    conn = conn.view(h * h * b, oh * oh * c)
    pose, act = em_routing(dense, caps.activation.reshape(n, -1), cfg.beta_u_scale * layer.beta_u.repeat(oh * oh),
                           cfg.beta_a_scale * layer.beta_a.repeat(oh * oh), 3, final_lambda=1.0, connectivity=conn,
                           activation="paper", centre_damping=cfg.centre_damping,
                           cost_scale=cfg.layer_cost_scale(c, k * k * b, 0.0),
                           initial=conn / c if cfg.initial_assignments == "per_window" else None)
    torch.testing.assert_close(out.pose.reshape(pose.shape), pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.activation.reshape(act.shape), act, atol=1e-9, rtol=1e-9)


def test_conv_caps_is_translation_equivariant():
    """Shifting the input by one stride shifts the output by one position (per-position routing)."""
    layer = conv_layer(2, 3, 3, 2, compete_positions=False)
    caps = random_caps(h=9, w=9, types=2)
    out = layer(caps)
    shifted = layer(Capsules(caps.pose[:, 2:, 2:], caps.activation[:, 2:, 2:]))
    torch.testing.assert_close(shifted.pose, out.pose[:, 1:, 1:])
    torch.testing.assert_close(shifted.activation, out.activation[:, 1:, 1:])


def test_class_caps_coordinate_addition_and_dense_agreement():
    torch.manual_seed(0)
    layer = ClassCaps(3, 4, coord_add=True, routing=R).double()
    with torch.no_grad():
        layer.weight.normal_()
    caps = random_caps(h=3, w=2, types=3)
    votes, a_in = layer.votes(caps)                                     # (N, E, H*W*D, 16)
    layer.coord_add = False
    plain, _ = layer.votes(caps)
    layer.coord_add = True
    offsets = (votes - plain).view(2, 4, 3, 2, 3, 4, 4)
    assert offsets[..., 0, 3].round(decimals=9).unique().numel() == 3                    # one per row
    torch.testing.assert_close(offsets[0, 0, 2, 1, 0, 0, 3].item(), 2.5 / 3)
    torch.testing.assert_close(offsets[0, 0, 2, 1, 0, 1, 3].item(), 1.5 / 2)
    offsets[..., 0, 3] = 0
    offsets[..., 1, 3] = 0
    assert offsets.abs().max() == 0
    out = layer(caps)
    pose, act = em_routing(votes.transpose(1, 2), a_in, layer.beta_u, layer.beta_a, 3, final_lambda=1.0,
                           var_floor=layer.routing.class_layer().var_floor)       # the class capsules' floor
    torch.testing.assert_close(out.pose.view(2, 4, 16), pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.activation, act, atol=1e-9, rtol=1e-9)


def test_class_caps_route_at_their_share_of_the_inverse_temperature_with_scaled_biases():
    """class_lambda_scale, the bias scales, the cost factors and damped centres, as the dense reference has them."""
    torch.manual_seed(0)
    cfg = RoutingConfig(final_lambda=4.0, activation="paper", estep_temperature=1.0, class_lambda_scale=0.25,
                        **AUTHORS_LIKE)
    layer = ClassCaps(3, 4, routing=cfg).double()
    with torch.no_grad():
        layer.beta_u.normal_()
        layer.beta_a.normal_()
    caps = random_caps(h=3, w=2, types=3)
    trace = []
    out = layer(caps, trace=trace)
    assert trace[-1].inverse_temperature == pytest.approx(1.0 * (1 - 0.95 ** 3))
    votes, a_in = layer.votes(caps)
    pose, act = em_routing(votes.transpose(1, 2), a_in, 1.4 * layer.beta_u, -3.0 * layer.beta_a, 3,
                           final_lambda=1.0, activation="paper", estep_temperature=1.0, centre_damping=0.1,
                           cost_scale=2.0, fan_in_cost_scale=3.0, var_floor=cfg.class_layer().var_floor)
    torch.testing.assert_close(out.pose.view(2, 4, 16), pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.activation, act, atol=1e-9, rtol=1e-9)
    untraced = layer(caps)
    torch.testing.assert_close(untraced.activation, out.activation, atol=1e-12, rtol=1e-12)


def test_class_caps_without_coordinates_is_invariant_to_position_permutation():
    layer = ClassCaps(3, 4, coord_add=False, routing=R).double()
    caps = random_caps(h=3, w=3, types=3)
    perm = torch.randperm(9)
    def flat(t):
        return t.reshape(2, 9, *t.shape[3:])

    permuted = Capsules(flat(caps.pose)[:, perm].view(caps.pose.shape),
                        flat(caps.activation)[:, perm].view(caps.activation.shape))
    torch.testing.assert_close(layer(permuted).pose, layer(caps).pose)
    torch.testing.assert_close(layer(permuted).activation, layer(caps).activation)


def test_coordinate_offsets():
    off = coordinate_offsets(2, 4).view(2, 4, 4, 4)
    assert off[1, 3, 0, 3].item() == pytest.approx(0.75) and off[1, 3, 1, 3].item() == pytest.approx(0.875)
    assert off[..., 2:, :].abs().sum() == 0 and off[..., :2, :3].abs().sum() == 0


def test_layer_bad_inputs():
    layer = ConvCaps(3, 2, kernel=5, stride=1)
    with pytest.raises(ValueError, match="kernel 5 is larger than the input grid 4"):
        layer(random_caps(h=4, w=4, types=3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"pose \(N, H, W, 3, 4, 4\)"):
        layer(random_caps(h=6, w=6, types=2, dtype=torch.float32))
    with pytest.raises(ValueError, match="kernel and stride"):
        ConvCaps(3, 2, kernel=0, stride=1)
    with pytest.raises(ValueError, match=r"ClassCaps expects pose \(N, H, W, 5, 4, 4\)"):
        ClassCaps(5, 3)(random_caps(types=3, dtype=torch.float32))


# Layers on the 'meta' device fed CPU inputs: every backend, each layer, the whole network and the kernels'
# entry point. Run in a child process: were a check missing, the C++ kernels would read the meta weights' pointers
# and crash the process, which must fail this test rather than end the test run.
_DEVICE_SCRIPT = """
import torch
from emcaps.capsules import Capsules
from emcaps.layers import ClassCaps, ConvCaps, PrimaryCaps
from emcaps.models import create_model
from emcaps.routing import RoutingConfig, Runtime
from emcaps.routing.native import conv_routing


def caps(side, types):
    return Capsules(torch.randn(2, side, side, types, 4, 4), torch.rand(2, side, side, types))


def refused(call):
    try:
        call()
        print("ran")
    except RuntimeError as err:
        print(err)


for backend in ("auto", "native", "triton", "torch"):
    for layer, x in ((ConvCaps(2, 3, kernel=3, stride=1), caps(5, 2)), (ClassCaps(2, 3), caps(3, 2))):
        layer.runtime = Runtime(backend=backend)
        refused(lambda: layer.to("meta")(x))
refused(lambda: PrimaryCaps(4, 2).to("meta")(torch.randn(1, 4, 5, 5)))
refused(lambda: create_model("tiny").to("meta")(torch.randn(1, 1, 32, 32)))
refused(lambda: conv_routing(torch.randn(4, 6, 16), torch.randn(6, 3, 16, device="meta"), torch.rand(4, 6),
                             torch.zeros(3), torch.zeros(3), RoutingConfig(), torch.full((1, 1, 1), 1 / 3), None))
"""


def test_parameters_on_another_device_than_the_input_are_refused_not_a_crash():
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    mismatch = "Expected all tensors to be on the same device, but found at least two devices, cpu and meta: "
    fix = " on meta and its input on cpu; move both to one device (module.to(device))"
    assert done.stdout.splitlines() == [
        *[f"{mismatch}{layer} has weight{fix}" for _ in range(4) for layer in ("ConvCaps", "ClassCaps")],
        f"{mismatch}PrimaryCaps has pose.weight{fix}", f"{mismatch}MatrixCapsNet has parameters{fix}",
        f"{mismatch}conv_routing has weight{fix}"]


@pytest.mark.parametrize("compete", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_gradcheck(backend, compete):
    layer = conv_layer(2, 2, 2, 1, backend=backend, compete_positions=compete, detach_assignments=False)
    layer.weight.data.mul_(0.5)
    caps = random_caps(n=1, h=3, w=3, types=2)
    pose = caps.pose.clone().requires_grad_(True)
    act = caps.activation.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, a: tuple(layer(Capsules(p, a))), (pose, act))
    # ... and with respect to the parameters (transforms, beta_u, beta_a), through every iteration.
    names = ("weight", "beta_u", "beta_a")

    def with_params(*params):
        return tuple(torch.func.functional_call(layer, dict(zip(names, params)), (caps,)))
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(with_params, params)


def test_chunked_recomputed_routing_equals_whole_batch():
    """Chunking the batch and recomputing routing in the backward pass change nothing but memory."""
    from emcaps.models import create_model

    x = torch.randn(5, 1, 32, 32, dtype=torch.float64)
    results = []
    for chunk, recompute in [(100, "no"), (2, "yes"), (3, "no"), (0, "yes")]:
        torch.manual_seed(0)
        model = create_model("tiny", routing=RoutingConfig(final_lambda=1.0),
                             runtime=Runtime(backend="torch", chunk=chunk, recompute=recompute))
        model = model.double()
        out = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0)


@pytest.mark.parametrize("name", ["emcaps", "authors"])
@pytest.mark.parametrize("backend", ["compile", *BACKENDS[1:]])
def test_routing_backends_in_layers_match_torch(backend, name):
    """ConvCaps (positions competing) and ClassCaps give the same outputs and gradients on every backend,
    with emcaps' parameterisation and with the authors' (damped centres, bias scales, class lambda / 4)."""
    from emcaps.models import create_model

    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    results = []
    for be in ("torch", backend):
        torch.manual_seed(0)
        routing = RoutingConfig.named(name, final_lambda=1.0)
        model = create_model("tiny", routing=routing, runtime=Runtime(backend=be)).double()
        with torch.no_grad():                 # beta_a = -5000 * 0.5 would switch every capsule off
            for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
                layer.beta_a.mul_(1e-3 if name == "authors" else 1.0)
        out = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g, g0 in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, g0)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_layer_first_run_in_inference_mode_still_trains(backend):
    """The window index and the position competition are made once per grid and device and then shared: made
    inside inference mode, a later training step could not save them for its backward pass."""
    if backend == "native" and not native_available(torch.device("cpu")):
        pytest.skip("no native kernels")
    layer = ConvCaps(3, 2, kernel=3, stride=1, routing=RoutingConfig(iterations=2))
    layer.runtime = Runtime(backend=backend)
    caps = random_caps(h=7, w=9, types=3, seed=4, dtype=torch.float32)       # a grid no other test routes
    with torch.inference_mode():
        first = layer(caps).activation
    out = layer(caps)
    out.activation.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(out.activation.detach(), first)
