"""EM routing: the dense reference against an independent NumPy transcription of the paper, the
fused form against the dense one, and the properties the paper's procedure must have."""

import numpy as np
import pytest
import torch

from emcaps.routing import (
    EPS,
    PositionCompetition,
    RoutingConfig,
    Runtime,
    em_routing,
    em_routing_fused,
    inverse_temperatures,
)

FLOOR = RoutingConfig().var_floor
PAPER = {"activation": "paper", "estep_temperature": 1.0}     # the paper's formula, as numpy_em transcribes it


# The true gradient of EM (through every E-step): what gradcheck and the dense reference compute.
FULL = {"detach_assignments": False}
COMPILE = Runtime(backend="compile").on(torch.device("cpu"))


def numpy_em(votes, act, beta_u, beta_a, iterations, final_lambda=0.01, floor=FLOOR, scale=1.0,
             activation="paper", tau=1.0, damping=0.0):
    """The paper's Procedure 1, one sample at a time, float64. votes (N, I, J, D), act (N, I).
    activation='standardised' standardises the costs over the parents; tau multiplies the E-step's log-posterior;
    damping: each centre is (1 - damping) * the weighted mean + damping * the previous centre (first: 0)."""
    n, n_in, n_out, d = votes.shape
    poses, acts = np.zeros((n, n_out, d)), np.zeros((n, n_out))
    for s in range(n):
        V, a = votes[s], act[s]
        R = np.full((n_in, n_out), 1.0 / n_out)
        mu = np.zeros((n_out, d))
        for t in range(iterations):
            lam = final_lambda * (1 - 0.95 ** (t + 1))
            # M-step
            Ra = R * a[:, None]
            Rsum = Ra.sum(axis=0)
            mu = (1 - damping) * np.einsum("ij,ijh->jh", Ra, V) / np.maximum(Rsum[:, None], EPS) + damping * mu
            sigma2 = np.einsum("ij,ijh->jh", Ra, (V - mu[None]) ** 2) / np.maximum(Rsum[:, None], EPS) + floor
            cost = ((beta_u[:, None] + np.log(np.sqrt(sigma2))) * Rsum[:, None] * scale).sum(axis=1)
            if activation == "standardised":
                cost = (cost - cost.mean()) / np.sqrt(cost.var() + 1e-6)
            a_out = 1 / (1 + np.exp(-lam * (beta_a - cost)))
            if t < iterations - 1:
                # E-step: p_ij = prod_h N(V_ijh; mu_jh, sigma2_jh), R_ij = a_j p_ij / sum_k a_k p_ik
                log_p = (-(V - mu[None]) ** 2 / (2 * sigma2[None]) - 0.5 * np.log(2 * np.pi * sigma2[None])).sum(-1)
                z = tau * (np.log(a_out)[None] + log_p)
                z -= z.max(axis=1, keepdims=True)
                R = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        poses[s], acts[s] = mu, a_out
    return poses, acts


def random_problem(n=3, n_in=7, n_out=4, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(n, n_in, n_out, d, generator=g, dtype=dtype)
    act = torch.rand(n, n_in, generator=g, dtype=dtype)
    beta_u = torch.randn(n_out, generator=g, dtype=dtype)
    beta_a = torch.randn(n_out, generator=g, dtype=dtype)
    return votes, act, beta_u, beta_a


def dense_to_fused(votes):
    """(N, I, J, D) -> (N, J, I, D)"""
    return votes.transpose(1, 2).contiguous()


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("final_lambda", [0.01, 1.0])
def test_dense_matches_independent_numpy(iterations, final_lambda):
    votes, act, bu, ba = random_problem(seed=iterations)
    pose, a = em_routing(votes, act, bu, ba, iterations, final_lambda=final_lambda, **PAPER)
    np_pose, np_a = numpy_em(votes.numpy(), act.numpy(), bu.numpy(), ba.numpy(), iterations, final_lambda)
    np.testing.assert_allclose(pose.numpy(), np_pose, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.numpy(), np_a, atol=1e-6, rtol=0)


def test_dense_matches_numpy_with_cost_normalisation():
    votes, act, bu, ba = random_problem(n_in=9, n_out=3, seed=5)
    pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=1.0, normalise_cost=True, **PAPER)
    np_pose, np_a = numpy_em(votes.numpy(), act.numpy(), bu.numpy(), ba.numpy(), 3, 1.0, scale=3 / 9)
    np.testing.assert_allclose(pose.numpy(), np_pose, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.numpy(), np_a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("normalise_cost", [False, True])
def test_fused_matches_dense(iterations, normalise_cost):
    votes, act, bu, ba = random_problem(n=4, n_in=11, n_out=5, seed=10 + iterations)
    votes = votes * 3 + 50  # an offset far from zero exercises the centred moments
    cfg = RoutingConfig(iterations=iterations, final_lambda=1.0, normalise_cost=normalise_cost)
    pose, a = em_routing(votes, act, bu, ba, iterations, final_lambda=1.0, normalise_cost=normalise_cost)
    scale = 5 / 11 if normalise_cost else 1.0
    fpose, fa = em_routing_fused(dense_to_fused(votes), act, bu, ba, cfg, cost_scale=scale)
    torch.testing.assert_close(fpose, pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fa, a, atol=1e-9, rtol=1e-9)


def test_one_iteration_pose_is_activation_weighted_mean():
    votes, act, bu, ba = random_problem(n=2, n_in=6, n_out=3)
    act[:, 0] = 0.95
    act[:, 1] = 0.01
    pose, _ = em_routing(votes, act, bu, ba, 1)
    expected = (act[:, :, None, None] * votes).sum(1) / act.sum(1)[:, None, None]
    torch.testing.assert_close(pose, expected, atol=1e-7, rtol=1e-6)
    plain_mean = votes.mean(1)  # what renormalising r * a over the parents would give
    assert (pose - plain_mean).abs().max() > 1e-2


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_inactive_child_has_no_influence(iterations):
    votes, act, bu, ba = random_problem(n=2, n_in=8, n_out=4, seed=3)
    act[:, 2] = 0.0
    pose, a = em_routing(votes, act, bu, ba, iterations, final_lambda=1.0)
    changed = votes.clone()
    changed[:, 2] = torch.randn_like(changed[:, 2]) * 100
    pose2, a2 = em_routing(changed, act, bu, ba, iterations, final_lambda=1.0)
    torch.testing.assert_close(pose2, pose, atol=1e-12, rtol=0)
    torch.testing.assert_close(a2, a, atol=1e-12, rtol=0)
    fpose, fa = em_routing_fused(dense_to_fused(changed), act, bu, ba,
                                 RoutingConfig(iterations=iterations, final_lambda=1.0))
    torch.testing.assert_close(fpose, pose, atol=1e-9, rtol=0)


def test_child_permutation_invariance_and_assignments_sum_to_one():
    votes, act, bu, ba = random_problem(n=2, n_in=9, n_out=4, seed=4)
    trace = []
    pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=1.0, trace=trace)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    pose_p, a_p = em_routing(votes[:, perm], act[:, perm], bu, ba, 3, final_lambda=1.0)
    torch.testing.assert_close(pose_p, pose, atol=1e-10, rtol=0)
    torch.testing.assert_close(a_p, a, atol=1e-10, rtol=0)
    assert len(trace) == 3
    for step in trace:
        torch.testing.assert_close(step.assignments.sum(-1), torch.ones(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("fields", [dict(final_lambda=1.0, **PAPER), {}])
def test_agreeing_parent_is_more_active_than_scattered_one(fields):
    g = torch.Generator().manual_seed(0)
    n_in, d = 10, 16
    centre = torch.randn(d, generator=g, dtype=torch.float64)
    agree = centre + 0.01 * torch.randn(n_in, d, generator=g, dtype=torch.float64)
    scatter = centre + 1.0 * torch.randn(n_in, d, generator=g, dtype=torch.float64)
    votes = torch.stack((agree, scatter), dim=1).unsqueeze(0)  # (1, I, 2, D)
    act = torch.ones(1, n_in, dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    for iterations in (1, 3):
        _, a = em_routing(votes, act, zeros, zeros, iterations, **fields)
        assert a[0, 0] > a[0, 1] + 0.1


def test_inverse_temperature_schedules():
    lam = inverse_temperatures(3, 0.01)
    assert lam == pytest.approx([0.01 * (1 - 0.95 ** k) for k in (1, 2, 3)])
    assert inverse_temperatures(3) == pytest.approx([10 * (1 - 0.95 ** k) for k in (1, 2, 3)])
    assert all(b > a for a, b in zip(lam, lam[1:]))
    assert inverse_temperatures(4, 2.0, "linear") == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert inverse_temperatures(2, 0.3, "constant") == [0.3, 0.3]
    with pytest.raises(ValueError, match="schedule"):
        inverse_temperatures(3, 0.01, "cubic")


@pytest.mark.parametrize("case", ["single_child", "identical_votes", "all_inactive", "huge_votes"])
@pytest.mark.parametrize("form", ["dense", "fused"])
def test_degenerate_inputs_stay_finite(case, form):
    votes, act, bu, ba = random_problem(n=2, n_in=6, n_out=3, dtype=torch.float32)
    if case == "single_child":
        votes, act = votes[:, :1], act[:, :1]
    elif case == "identical_votes":
        votes = votes[:, :1].expand_as(votes).clone()
    elif case == "all_inactive":
        act = torch.zeros_like(act)
    elif case == "huge_votes":
        votes = votes * 1e4
    votes.requires_grad_(True)
    act.requires_grad_(True)
    bu.requires_grad_(True)
    ba.requires_grad_(True)
    if form == "dense":
        pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=1.0)
    else:
        pose, a = em_routing_fused(dense_to_fused(votes), act, bu, ba, RoutingConfig(final_lambda=1.0))
    (pose.sum() + a.sum()).backward()
    for t in (pose, a, votes.grad, act.grad, bu.grad, ba.grad):
        assert torch.isfinite(t).all(), case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    votes, act, bu, ba = random_problem(n=2, n_in=6, n_out=3, dtype=torch.float32)
    ref_pose, ref_a = em_routing(votes, act, bu, ba, 3, final_lambda=1.0)
    pose, a = em_routing(votes.to(dtype), act.to(dtype), bu.to(dtype), ba.to(dtype), 3, final_lambda=1.0)
    assert pose.dtype == dtype and a.dtype == dtype
    assert torch.isfinite(pose).all() and torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), ref_a, atol=0.05, rtol=0)
    fpose, fa = em_routing_fused(dense_to_fused(votes).to(dtype), act.to(dtype), bu.to(dtype), ba.to(dtype),
                                 RoutingConfig(final_lambda=1.0))
    assert fpose.dtype == dtype and torch.isfinite(fpose).all() and torch.isfinite(fa).all()


def test_gradcheck_dense_and_fused():
    votes, act, bu, ba = random_problem(n=1, n_in=4, n_out=3, d=4, seed=2)
    for t in (votes, act, bu, ba):
        t.requires_grad_(True)

    def dense(v, a_, u, b):
        return em_routing(v, a_, u, b, 3, final_lambda=1.0, **FULL)

    def fused(v, a_, u, b):
        return em_routing_fused(v.transpose(1, 2), a_, u, b, RoutingConfig(final_lambda=1.0, **FULL))

    assert torch.autograd.gradcheck(dense, (votes, act, bu, ba))
    assert torch.autograd.gradcheck(fused, (votes, act, bu, ba))


def test_bad_arguments():
    votes, act, bu, ba = random_problem()
    with pytest.raises(ValueError, match=r"votes must have shape \(N, I, J, D\)"):
        em_routing(votes[0], act, bu, ba)
    with pytest.raises(ValueError, match="activations must have shape"):
        em_routing(votes, act[:, :-1], bu, ba)
    with pytest.raises(ValueError, match="beta_u"):
        em_routing(votes, act, torch.zeros(7, dtype=votes.dtype), ba)
    with pytest.raises(ValueError, match="iterations"):
        em_routing(votes, act, bu, ba, 0)
    with pytest.raises(ValueError, match="iterations"):
        RoutingConfig(iterations=0)
    with pytest.raises(ValueError, match="schedule"):
        RoutingConfig(schedule="fast")


def conv_connectivity(h, w, k, s, b, c):
    """(H*W*B, H'*W'*C) bool: which child capsule feeds which parent in a KxK, stride-S capsule conv."""
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    conn = torch.zeros(h, w, b, oh, ow, c, dtype=torch.bool)
    for y in range(oh):
        for x in range(ow):
            conn[y * s:y * s + k, x * s:x * s + k, :, y, x, :] = True
    return conn.reshape(h * w * b, oh * ow * c)


@pytest.mark.parametrize("h,k,s", [(5, 3, 1), (7, 3, 2), (6, 2, 2)])
def test_position_competition_matches_dense_masked(h, k, s):
    """The fused conv routing with competing positions equals dense routing over the whole grid with the
    convolution's connectivity (children that no window covers dropped: they feed no parent)."""
    b, c, d, n = 2, 3, 16, 2
    oh = (h - k) // s + 1
    g = torch.Generator().manual_seed(h * 10 + k)
    # votes for every (output position, kernel offset, child type, parent type)
    fv = torch.randn(n, oh, oh, c, k, k, b, d, generator=g, dtype=torch.float64)
    act = torch.rand(n, h, h, b, generator=g, dtype=torch.float64)
    bu, ba = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    a_edges = act.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3)   # (N, H', W', K, K, B)

    comp = PositionCompetition(h, h, k, s, b)
    fpose, fa = em_routing_fused(fv.reshape(n * oh * oh, c, k * k * b, d), a_edges.reshape(n * oh * oh, -1),
                                 bu, ba, RoutingConfig(final_lambda=1.0, activation="paper"),
                                 initial=comp.initial(n, c, torch.float64), normalise=comp)

    # dense: children (H, W, B), parents (H', W', C)
    dense = torch.zeros(n, h, h, b, oh, oh, c, d, dtype=torch.float64)
    for y in range(oh):
        for x in range(oh):
            for ky in range(k):
                for kx in range(k):
                    dense[:, y * s + ky, x * s + kx, :, y, x, :] = fv[:, y, x, :, ky, kx].transpose(1, 2)
    conn = conv_connectivity(h, h, k, s, b, c)
    dense = dense.reshape(n, h * h * b, oh * oh * c, d)
    covered = conn.any(1)
    pose, a = em_routing(dense[:, covered], act.reshape(n, -1)[:, covered], bu.repeat(oh * oh),
                         ba.repeat(oh * oh), 3, final_lambda=1.0, connectivity=conn[covered], activation="paper")
    torch.testing.assert_close(fpose.reshape(n, -1, d), pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fa.reshape(n, -1), a, atol=1e-9, rtol=1e-9)


def test_competition_assignments_sum_to_one_per_child():
    h, k, s, b, c, n = 6, 3, 1, 2, 3, 2
    comp = PositionCompetition(h, h, k, s, b)
    oh = h - k + 1
    log_r = torch.randn(n * oh * oh, c, k * k * b, dtype=torch.float64) * 5
    r = comp(log_r).exp().view(n, oh * oh, c, k * k, b).sum(2)            # (N, L, KK, B)
    per_child = torch.zeros(n, h * h, b, dtype=torch.float64).index_add(
        1, comp.index, r.reshape(n, oh * oh * k * k, b))
    torch.testing.assert_close(per_child, torch.ones_like(per_child))
    r0 = comp.initial(n, c, torch.float64).expand(-1, c, -1).reshape(n, oh * oh, c, k * k, b).sum(2)
    per_child0 = torch.zeros(n, h * h, b, dtype=torch.float64).index_add(
        1, comp.index, r0.reshape(n, oh * oh * k * k, b))
    torch.testing.assert_close(per_child0, torch.ones_like(per_child0))


@pytest.mark.parametrize("dtype,spread", [(torch.float64, 5.0), (torch.float64, 300.0), (torch.float32, 40.0)])
def test_competition_edge_scale_turns_per_edge_assignments_into_the_normalisation(dtype, spread):
    """The native forward's form (assignments normalised over types per edge, then one factor per edge) gives
    exp of the log form, also where log-assignments span hundreds of nats (a child far from every parent)."""
    h, k, s, b, c, n = 7, 3, 2, 2, 3, 2
    comp = PositionCompetition(h, h, k, s, b)
    oh = (h - k) // s + 1
    log_r = torch.randn(n * oh * oh, c, k * k * b, dtype=dtype, generator=torch.Generator().manual_seed(3))
    log_r = log_r * spread
    want = comp(log_r).exp()
    got = torch.softmax(log_r, dim=1) * comp.edge_scale(torch.logsumexp(log_r, dim=1)).unsqueeze(1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_compiled_kernel_matches_dense():
    """The torch.compile path (Runtime(backend="compile")) computes what the dense reference does."""
    votes, act, bu, ba = random_problem(n=3, n_in=10, n_out=4, seed=8)
    for t in (votes, act, bu, ba):
        t.requires_grad_(True)
    pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=1.0, **FULL)
    compiled = RoutingConfig(final_lambda=1.0, **FULL)
    cpose, ca = em_routing_fused(dense_to_fused(votes), act, bu, ba, compiled, settings=COMPILE)
    torch.testing.assert_close(cpose, pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ca, a, atol=1e-9, rtol=1e-9)
    g = torch.autograd.grad((pose.sum() + a.sum()), (votes, act, bu, ba))
    cg = torch.autograd.grad((cpose.sum() + ca.sum()), (votes, act, bu, ba))
    for x, y in zip(cg, g):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-7)


def test_images_per_chunk():
    cpu = torch.device("cpu")
    assert Runtime(chunk_mb=1).on(cpu).images_per_chunk(32, 300_000) == 3
    assert Runtime(chunk_mb=1).on(cpu).images_per_chunk(2, 300_000) == 2
    assert Runtime(chunk_mb=1).on(cpu).images_per_chunk(32, 5_000_000) == 1
    assert Runtime(chunk=5).on(cpu).images_per_chunk(32, 5_000_000) == 5
    assert Runtime(chunk_mb=1, native_chunk_mb=4).on(cpu).images_per_chunk(32, 300_000, native=True) == 13
    with pytest.raises(ValueError, match="chunk"):
        Runtime(chunk=-1)
    assert Runtime().on(cpu).native_chunk_mb == 12.0                          # 0: chosen for the device
    with pytest.raises(ValueError, match=r"native_chunk_mb must be >= 0 \(MB; 0 = chosen for the device\), got -1"):
        Runtime(native_chunk_mb=-1)
    with pytest.raises(ValueError, match="chunk_mb must be >= 0"):
        Runtime(chunk_mb=float("nan"))


PARAMETERISATIONS = [{"activation": "standardised", "estep_temperature": 1.0, **FULL},
                     {"activation": "paper", "estep_temperature": 0.3, **FULL},
                     {"activation": "standardised", "estep_temperature": 0.5, "normalise_cost": True, **FULL},
                     {"activation": "paper", "estep_temperature": 1.0, "centre_damping": 0.1, "cost_scale": 2.0,
                      **FULL},
                     {"activation": "standardised", "estep_temperature": 0.5, "centre_damping": 0.4, **FULL},
                     {"activation": "paper", "estep_temperature": 1.0, "fan_in_cost_scale": 3.0, **FULL},
                     {"activation": "standardised", "estep_temperature": 0.5, "detach_assignments": True},
                     {"activation": "paper", "estep_temperature": 1.0, "centre_damping": 0.3,
                      "detach_assignments": True}]


def dense_cost_scale(fields, n_out, n_in):
    """The factor em_routing puts on the cost for these fields (RoutingConfig.layer_cost_scale)."""
    return RoutingConfig(**fields).layer_cost_scale(n_out, n_in, n_out / n_in)


@pytest.mark.parametrize("fields", PARAMETERISATIONS)
def test_dense_matches_numpy_for_each_parameterisation(fields):
    votes, act, bu, ba = random_problem(n=3, n_in=9, n_out=5, seed=21)
    ref_pose, ref_a = numpy_em(votes.numpy(), act.numpy(), bu.numpy(), ba.numpy(), 3, final_lambda=2.0,
                               scale=dense_cost_scale(fields, 5, 9), activation=fields["activation"],
                               tau=fields["estep_temperature"], damping=fields.get("centre_damping", 0.0))
    pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=2.0, **fields)
    np.testing.assert_allclose(pose.numpy(), ref_pose, atol=1e-10, rtol=1e-9)
    np.testing.assert_allclose(a.numpy(), ref_a, atol=1e-10, rtol=1e-9)
    _, plain_a = em_routing(votes, act, bu, ba, 3, final_lambda=2.0, **PAPER)
    assert (plain_a - a).abs().max() > 1e-3, "the parameterisation changed nothing"


@pytest.mark.parametrize("backend", ["torch", "compile"])
@pytest.mark.parametrize("fields", PARAMETERISATIONS)
def test_fused_and_compiled_match_dense_values_and_gradients(fields, backend):
    votes, act, bu, ba = random_problem(n=3, n_in=10, n_out=4, seed=22)
    leaves = [t.requires_grad_(True) for t in (votes, act, bu, ba)]
    pose, a = em_routing(votes, act, bu, ba, 3, final_lambda=2.0, **fields)
    cfg = RoutingConfig(final_lambda=2.0, **fields)
    scale = dense_cost_scale(fields, 4, 10)
    fpose, fa = em_routing_fused(dense_to_fused(votes), act, bu, ba, cfg, cost_scale=scale,
                                 settings=Runtime(backend=backend).on(torch.device("cpu")))
    torch.testing.assert_close(fpose, pose, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fa, a, atol=1e-9, rtol=1e-9)
    g = torch.Generator().manual_seed(3)
    wp, wa = torch.randn(pose.shape, generator=g, dtype=pose.dtype), torch.randn(a.shape, generator=g, dtype=a.dtype)
    grads = torch.autograd.grad((pose * wp).sum() + (a * wa).sum(), leaves)
    fgrads = torch.autograd.grad((fpose * wp).sum() + (fa * wa).sum(), leaves)
    for name, x, y in zip(("votes", "act", "beta_u", "beta_a"), fgrads, grads):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-7, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_detached_assignments_change_gradients_not_values():
    """With detach_assignments the gradient is that of the last M-step with the final assignments as
    constants: the same as one iteration started from those assignments (a constant schedule, so it runs at
    the same inverse temperature)."""
    votes, act, bu, ba = random_problem(n=3, n_in=10, n_out=4, seed=26)
    kwargs = {"final_lambda": 2.0, "schedule": "constant", "activation": "standardised", "estep_temperature": 0.5}
    leaves = [t.requires_grad_(True) for t in (votes, act, bu, ba)]
    trace = []
    pose, a = em_routing(votes, act, bu, ba, 3, trace=trace, detach_assignments=False, **kwargs)
    dpose, da = em_routing(votes, act, bu, ba, 3, detach_assignments=True, **kwargs)
    torch.testing.assert_close(dpose, pose, atol=0, rtol=0)
    torch.testing.assert_close(da, a, atol=0, rtol=0)
    last_r = trace[-1].assignments.detach()
    opose, oa = em_routing(votes, act, bu, ba, 1, initial=last_r, **kwargs)

    def grads(p, q):
        return torch.autograd.grad((p * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view(p.shape)).sum()
                                   + (q * torch.linspace(1, 2, q.numel(), dtype=q.dtype).view(q.shape)).sum(),
                                   leaves)

    full, detached, one_step = grads(pose, a), grads(dpose, da), grads(opose, oa)
    for name, x, y in zip(("votes", "act", "beta_u", "beta_a"), detached, one_step):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    assert (full[0] - detached[0]).abs().max() > 1e-4, "detaching changed no gradient"


def test_parameterisation_fields_are_checked():
    with pytest.raises(ValueError, match="activation"):
        RoutingConfig(activation="softmax")
    with pytest.raises(ValueError, match="estep_temperature"):
        RoutingConfig(estep_temperature=0.0)
    for field, bad in [("centre_damping", 1.0), ("centre_damping", -0.1), ("cost_scale", 0.0),
                       ("fan_in_cost_scale", -1.0), ("class_lambda_scale", 0.0), ("beta_a_scale", 0.0),
                       ("initial_assignments", "ones")]:
        with pytest.raises(ValueError, match=field):
            RoutingConfig(**{field: bad})
    with pytest.raises(ValueError, match="unknown routing parameterisation 'google'"):
        RoutingConfig(parameterisation="google")
    with pytest.raises(ValueError, match="unknown routing parameterisation 'google'"):
        RoutingConfig.named("google")


def numpy_authors(votes, act, sigma_b, act_b, iterations, final_beta=0.01, floor=FLOOR):
    """The update_em_routing body of google-research capsule_em/em_layers.py, transcribed: damped centres,
    logit = beta * (masses * (-sum_h log var_h - sigma_b * D * (ln 2pi + 1)) - 5000 act_b), float64.
    (Their masses add 1e-5 where ours clamp at EPS; nothing here comes near either.)"""
    n, n_in, n_out, d = votes.shape
    poses, acts = np.zeros((n, n_out, d)), np.zeros((n, n_out))
    for s in range(n):
        V, a = votes[s], act[s]
        update = np.zeros((n_in, n_out))
        center = np.zeros((n_out, d))
        for i in range(iterations):
            beta = final_beta * (1 - 0.95 ** (i + 1))
            post = np.exp(update - update.max(1, keepdims=True))
            post /= post.sum(1, keepdims=True)
            conf = post * a[:, None]
            masses = np.maximum(conf.sum(0), EPS)                                        # (J,)
            center = 0.9 * np.einsum("ij,ijh->jh", conf, V) / masses[:, None] + 0.1 * center
            noise = (V - center[None]) ** 2
            variance = floor + np.einsum("ij,ijh->jh", conf, noise) / masses[:, None]
            p_i = -np.log(variance).sum(-1)
            logit = beta * (masses * (p_i - sigma_b * d * (np.log(2 * np.pi) + 1)) - act_b * 5000)
            log_act = np.minimum(0, logit) - np.log1p(np.exp(-np.abs(logit)))
            sigma_update = (d * np.log(2 * np.pi) - p_i) / 2
            update = log_act[None] - sigma_update[None] - (noise / (2 * variance[None])).sum(-1)
        poses[s], acts[s] = center, 1 / (1 + np.exp(-logit))
    return poses, acts


def test_authors_parameterisation_is_their_code():
    """RoutingConfig.named('authors') with the layers' bias scales computes the authors' routing exactly."""
    votes, act, _, _ = random_problem(n=3, n_in=20, n_out=4, seed=24)
    votes = votes * 0.3
    g = torch.Generator().manual_seed(25)
    sigma_b = 0.5 + 0.1 * torch.rand(4, generator=g, dtype=torch.float64)
    act_b = 0.01 * torch.rand(4, generator=g, dtype=torch.float64)        # beta_a = -5000 act_b in (-50, 0)
    cfg = RoutingConfig.named("authors")
    assert cfg.parameterisation == "authors"
    ref_pose, ref_a = numpy_authors(votes.numpy(), act.numpy(), sigma_b.numpy(), act_b.numpy(), 3,
                                    floor=cfg.var_floor)
    kwargs = dict(final_lambda=cfg.final_lambda, var_floor=cfg.var_floor, activation=cfg.activation,
                  estep_temperature=cfg.estep_temperature, centre_damping=cfg.centre_damping,
                  cost_scale=cfg.layer_cost_scale(4, 20, 4 / 20))
    pose, a = em_routing(votes, act, sigma_b * cfg.beta_u_scale, act_b * cfg.beta_a_scale, 3, **kwargs)
    np.testing.assert_allclose(pose.numpy(), ref_pose, atol=1e-10, rtol=1e-9)
    np.testing.assert_allclose(a.numpy(), ref_a, atol=1e-10, rtol=1e-9)
    assert 0.01 < float(a.mean()) < 0.99, "a test whose activations saturate checks little"


def test_named_parameterisations():
    assert RoutingConfig.named("emcaps") == RoutingConfig()
    ibm = RoutingConfig.named("ibm", iterations=2)
    assert (ibm.var_floor, ibm.fan_in_cost_scale, ibm.iterations, ibm.activation) == (1e-9, 100.0, 2, "paper")
    # IBM's 100 * C / (K*K*B) for the 'small' network's three routed layers
    assert ibm.layer_cost_scale(16, 9 * 8, 0.3) == pytest.approx(22.22, abs=0.01)
    assert ibm.layer_cost_scale(16, 9 * 16, 0.3) == pytest.approx(11.11, abs=0.01)
    assert ibm.layer_cost_scale(5, 4 * 4 * 16, 0.3) == pytest.approx(1.95, abs=0.01)
    authors = RoutingConfig.named("authors")
    assert authors.class_layer().final_lambda == pytest.approx(0.0025)
    assert authors.class_layer().class_lambda_scale == 1.0
    assert RoutingConfig().class_layer() == RoutingConfig()
    assert RoutingConfig(class_var_floor=5e-4).class_layer() == RoutingConfig(var_floor=5e-4, class_floor_start=0.0,
                                                                                parameterisation="custom")
    # emcaps detaches the E-steps' assignments; the paper and both public codes differentiate through them
    assert RoutingConfig().detach_assignments
    assert not any(RoutingConfig.named(name).detach_assignments for name in ("paper", "authors", "ibm"))


def test_a_named_routing_with_a_field_it_sets_changed_builds_the_names_model_with_its_init():
    """RoutingConfig.named(NAME, field=...) changing a field NAME sets is 'custom', which create_model
    initialises as emcaps does; passing PARAMETERISATIONS[NAME].init too (the docstring's recipe) gives
    NAME's initialisation with that routing."""
    from emcaps.models import create_model
    from emcaps.routing import PARAMETERISATIONS

    routing = RoutingConfig.named("authors", var_floor=1e-9)
    assert routing.parameterisation == "custom" and routing.centre_damping == 0.1
    init = PARAMETERISATIONS["authors"].init
    model = create_model("tiny", routing=routing, **init)
    assert model.config.routing == routing and {k: getattr(model.config, k) for k in init} == init
    plain = create_model("tiny", routing=routing).config
    assert {k: getattr(plain, k) for k in init} == PARAMETERISATIONS["emcaps"].init


def test_standardised_logits_have_zero_mean_and_lambda_spread_over_the_parents():
    """Whatever the scale of votes and fan-in, the standardised costs put each problem's logits (beta_a = 0)
    at mean 0 and standard deviation lambda across its parents; the paper's are lambda * cost, tiny here."""
    votes, act, bu, ba = random_problem(n=2, n_in=12, n_out=6, seed=23)
    for scale in (1.0, 1e-2):
        trace = []
        em_routing(votes * scale, act, bu, ba * 0, 3, final_lambda=2.0, activation="standardised", trace=trace)
        for step in trace:
            torch.testing.assert_close(step.logit.mean(-1), torch.zeros(2, dtype=votes.dtype), atol=1e-9, rtol=0)
            torch.testing.assert_close(step.logit.std(-1, unbiased=False),
                                       torch.full((2,), step.inverse_temperature, dtype=votes.dtype),
                                       atol=1e-6, rtol=1e-5)
    trace = []
    em_routing(votes * 1e-2, act, bu, ba * 0, 3, final_lambda=0.01, trace=trace, **PAPER)
    assert float(trace[-1].logit.std(-1).max()) < 0.1


@pytest.mark.parametrize("tight", [0.0, 1e-12, 1e-7])
def test_standardised_logits_stay_finite_when_a_parent_is_far_tighter_than_the_first(tight):
    """A parent whose variance sits at a 1e-9 floor while the first parent's is 0.1: the quotient of their
    variances, 1e-8, is below float32's resolution near 1, so 1 + (quotient - 1) rounds it to 0 (a log of
    0: the run's loss turned NaN); the logits must match float64, with finite gradients."""
    from emcaps.routing import parent_logit

    excess = torch.tensor([[[0.1] * 16, [tight] * 16, [0.2] * 16, [0.05] * 16]], dtype=torch.float64)
    r_sum = torch.tensor([[3.0, 0.0, 1.5, 2.0]], dtype=torch.float64)
    bu, ba = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    want = parent_logit(bu, ba, excess, 1e-9, r_sum, 1.0, 1.0, "standardised")
    x32 = excess.float().requires_grad_()
    got = parent_logit(bu.float(), ba.float(), x32, 1e-9, r_sum.float(), 1.0, 1.0, "standardised")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    got.sum().backward()
    assert torch.isfinite(x32.grad).all()
