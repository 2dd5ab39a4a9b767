"""EM routing of a capsule convolution with the native CPU kernels, forward and backward written by hand.

Computes what `em_routing_fused` computes for a `ConvCaps` layer, but the votes v[m, j, i] = P[m, i] @ W[i, j]
are never stored: the kernels (emcaps/kernels/em_kernels.cpp) recompute them in every pass over them. The
backward pass is written out rather than recorded by autograd, so training keeps only what is small: per EM
iteration the assignments (M, J, I) and the parents' Gaussians (M, J, 16). Vote gradients from every iteration
go straight into pose and transform gradients inside the kernel that recomputes them.

Notation, per routing problem m (an image position), child i, parent j, pose entry d (D = 16), iteration t:
    S_j = sum_i r_ji a_i,   w_ji = r_ji a_i / max(S_j, EPS)
    mean_jd = sum_i w_ji v_jid,   var_jd = sum_i w_ji (v_jid - mean_jd)^2 + var_floor
    with centre_damping d > 0, mean_t = (1 - d) mean_t + d mean_{t-1} (mean_{-1} = 0) and var around it:
    var_d = var + (wm - mean_t) (2 wm (1 - sum_i w_i) + sum_i w_i (wm - mean_t)), wm the weighted mean
    cost_j = (D beta_u_j + 0.5 sum_d log var_jd) * cost_scale * S_j,   logit_j = lambda_t (beta_a_j - cost_j)
    log_r_ji = logsigmoid(logit_j) - 0.5 (sum_d log var_jd + D log 2 pi) - 0.5 maha_ji,
    maha_ji = sum_d (v_jid - mean_jd)^2 / var_jd,   r <- exp(normalise(log_r))
The E-step kernel normalises over the parent types of each window (a softmax over j per (m, i) edge) and returns
each edge's log-normaliser; where parents at other positions compete, one factor per edge finishes the
normalisation over every parent a child feeds (PositionCompetition.edge_scale).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from emcaps.kernels import Library, PerThread, library
from emcaps.routing.config import EPS, RoutingConfig
from emcaps.routing.fused import PositionCompetition
from emcaps.routing.reference import parent_logit

_LOG_2PI = math.log(2 * math.pi)
D = 16
if TYPE_CHECKING:                           # importing triton takes a tenth of a second: only where used
    from emcaps.kernels.triton_kernels import TritonKernels

    Kernels = Library | TritonKernels       # the four passes over the votes, C++ (CPU) or Triton (CUDA)


def native_available(device: torch.device) -> bool:
    """Whether the native kernels can route tensors on `device` (CPU, with a working C++ compiler)."""
    return device.type == "cpu" and library() is not None


def check_device(device: torch.device, where: str, **tensors: Tensor | None) -> None:
    """Raise torch's kind of device-mismatch error unless every tensor given is on `device`: the C++ and Triton
    kernels read raw pointers, and one from another device (a layer left on CUDA or 'meta') crashes the process.
    """
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{device} and {t.device}: {where} has {name} on {t.device} and its input on "
                               f"{device}; move both to one device (module.to(device))")


def conv_routing(poses: Tensor, weight: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
                 config: RoutingConfig, initial: Tensor, competition: PositionCompetition | None,
                 cost_scale: float = 1.0, offsets: Tensor | None = None, *, kernels: Kernels | None = None
                 ) -> tuple[Tensor, Tensor]:
    """EM routing of a capsule convolution (or of the class capsules) from child poses and transforms.

    poses:       (M, I, 16)   pose of child i of problem m (its window's capsules, flattened row-major)
    weight:      (I, J, 16)   transform from child i to parent type j
    activations: (M, I)
    beta_u, beta_a: (J,)
    initial:     initial assignments, broadcastable to (M, J, I)
    competition: normalises the E-step over every parent a child feeds (positions too); None: over J
    offsets:     (I, 16) or None, a constant added to every vote of child i (coordinate addition)
    kernels:     the kernels to run (default: the C++ ones, `emcaps.kernels.library()`)
    returns pose (M, J, 16) and activation (M, J).
    """
    check_device(poses.device, "conv_routing", weight=weight, activations=activations, beta_u=beta_u,
                 beta_a=beta_a, initial=initial, offsets=offsets)
    lib = kernels if kernels is not None else library()
    if lib is None:
        raise RuntimeError("the native routing kernels are not available (see emcaps.kernels)")
    m, n_in, _ = poses.shape
    n_out = weight.shape[1]
    if tuple(weight.shape) != (n_in, n_out, D) or tuple(activations.shape) != (m, n_in):
        raise ValueError(f"poses (M, I, 16), weight (I, J, 16) and activations (M, I) do not match: "
                         f"{tuple(poses.shape)}, {tuple(weight.shape)}, {tuple(activations.shape)}")
    if offsets is not None and tuple(offsets.shape) != (n_in, D):
        raise ValueError(f"offsets must be (I, 16) = {(n_in, D)}, got {tuple(offsets.shape)}")
    out_dtype = poses.dtype
    cd = torch.float64 if out_dtype == torch.float64 else torch.float32
    offsets = None if offsets is None else offsets.detach().to(cd).contiguous()
    mean, act = _ConvRouting.apply(poses.to(cd).contiguous(), weight.to(cd).contiguous(),
                                   activations.to(cd).contiguous(), beta_u.to(cd), beta_a.to(cd),
                                   initial.to(cd), config, competition, cost_scale, lib, offsets)
    return mean.to(out_dtype), act.to(out_dtype)


def _damp(mean: Tensor, var: Tensor, s: Tensor, previous: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The damped centre and the variance around it from the M-step's weighted mean and variance.

    mean, var, previous: (M, J, 16);  s: (M, J), the weight sums -> centre (M, J, 16), variance (M, J, 16).
    sum_i w_i (v_i - c)^2 = var + (mean - c) (2 mean (1 - sum_i w_i) + sum_i w_i (mean - c)), exact also where
    the weights sum to less than one (S < EPS).
    """
    centre = (1 - damping) * mean + damping * previous
    w_sum = (s / s.clamp_min(EPS)).unsqueeze(-1)
    diff = mean - centre
    return centre, var + diff * (2 * mean * (1 - w_sum) + w_sum * diff)


def _group_sums(x: Tensor, competition: PositionCompetition | None) -> Tensor:
    """(M, I) -> (M, I): for each child, the sum of x over every parent position it feeds."""
    if competition is None:
        return x
    return competition.child_sums(x)


class _ConvRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, W, a, beta_u, beta_a, initial, config: RoutingConfig,
                competition: PositionCompetition | None, cost_scale: float, lib: Kernels, off: Tensor | None):
        m, n_in, _ = P.shape
        n_out = W.shape[1]
        lambdas = config.inverse_temperatures
        r = initial.expand(m, n_out, n_in)
        if r.stride(2) != 1:
            r = r.contiguous()
        steps = []
        damping = config.centre_damping
        centre = P.new_zeros(m, n_out, D)
        for t, lam in enumerate(lambdas):
            mean, var, s = P.new_empty(m, n_out, D), P.new_empty(m, n_out, D), P.new_empty(m, n_out)
            lib.call("mstep", P.dtype,
                     [P, W, off, r, r.stride(0), r.stride(1), a, m, n_out, n_in, EPS, mean, var, s], m, range_at=10)
            excess, var = var, var + config.var_floor                               # the kernel's var: no floor
            if damping:
                centre, var = _damp(mean, var, s, centre, damping)
                excess = var - config.var_floor
            else:
                centre = mean
            log_var_sum = torch.log(var).sum(-1)                                     # (M, J)
            logit = parent_logit(beta_u, beta_a, excess, config.var_floor, s, lam, cost_scale, config.activation)
            if config.detach_assignments and not damping and steps:
                steps[-1] = None              # constant assignments: the backward pass needs the last step only
            steps.append([r, mean, centre, var, excess, s, logit])
            if t == len(lambdas) - 1:
                break
            # E-step and its normalisation over types in one kernel pass; then, where parents at other
            # positions compete, one factor per (problem, child) edge
            tau = config.estep_temperature
            const = tau * (F.logsigmoid(logit) - 0.5 * (log_var_sum + D * _LOG_2PI))  # (M, J)
            r, lse = P.new_empty(m, n_out, n_in), P.new_empty(m, n_in)
            lib.call("estep_assign", P.dtype, [P, W, off, centre, 1.0 / var, const.contiguous(), m, n_out, n_in,
                                               0.5 * tau, r, lse], m, range_at=9)
            if competition is not None:
                r.mul_(competition.edge_scale(lse).unsqueeze(1))
        # `centre` is an output: keeping it on ctx would make a reference cycle (output -> node -> ctx ->
        # output) that leaks every step's graph, so it goes through save_for_backward (and so does the last
        # weighted mean where, undamped, it is the same tensor).
        steps[-1][2] = None
        if not damping:
            steps[-1][1] = None
        ctx.save_for_backward(P, W, a, beta_u, beta_a, centre)
        ctx.steps, ctx.lambdas, ctx.config = steps, lambdas, config
        ctx.competition, ctx.cost_scale, ctx.lib, ctx.offsets = competition, cost_scale, lib, off
        return centre, torch.sigmoid(logit)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean_out, g_act_out):
        P, W, a, beta_u, beta_a, mean_out = ctx.saved_tensors
        steps, lambdas, lib, cs, config = ctx.steps, ctx.lambdas, ctx.lib, ctx.cost_scale, ctx.config
        off = ctx.offsets
        m, n_in, _ = P.shape
        n_out = W.shape[1]
        g_P = torch.zeros_like(P)
        threads = lib.threads(m)
        g_W = W.new_zeros(threads, n_in, n_out, D)                # one slot per thread, summed at the end
        W_t = W.view(n_in, n_out, 4, 4).transpose(-1, -2).reshape(n_in, n_out, D)
        g_a = P.new_zeros(m, n_in)
        g_bu, g_ba = torch.zeros_like(beta_u), torch.zeros_like(beta_a)
        g_r_next = None
        g_previous = None                     # gradient wrt this iteration's centre from the next one's damping
        damping = config.centre_damping
        detach = config.detach_assignments
        last = len(lambdas) - 1
        for t in range(last, -1, -1):
            if detach and t < last and not damping:
                break                         # constant assignments: earlier iterations reach nothing
            r, mean, centre, var, excess, s, logit = steps[t]
            centre = mean_out if centre is None else centre
            mean = centre if mean is None else mean
            lam = lambdas[t]
            inv_var = 1.0 / var
            if t == last:
                act = torch.sigmoid(logit)
                g_logit = (g_act_out if g_act_out is not None else torch.zeros_like(act)) * act * (1 - act)
                g_mean = g_mean_out if g_mean_out is not None else torch.zeros_like(mean)
                g_log_var = torch.zeros_like(logit)                   # per (m, j): log var enters as its sum
                g_var = torch.zeros_like(var)
                g_maha = None
            elif detach:
                # only the next iteration's damped centre (g_previous, below) reaches this one
                g_logit, g_log_var = torch.zeros_like(logit), torch.zeros_like(logit)
                g_mean, g_var, g_maha = torch.zeros_like(mean), torch.zeros_like(var), None
            else:
                # E-step: r_next = exp(tau * log_r - logsumexp over the parents each child feeds)
                r_next = steps[t + 1][0]
                q = r_next * g_r_next                                  # gradient wrt normalised log r
                g_log_r = q - r_next * _group_sums(q.sum(1), ctx.competition).unsqueeze(1)
                if config.estep_temperature != 1.0:
                    g_log_r.mul_(config.estep_temperature)
                g_const = g_log_r.sum(-1)                              # (M, J)
                g_logit = g_const * torch.sigmoid(-logit)              # d logsigmoid(x) / dx
                g_log_var = -0.5 * g_const
                g_maha = g_log_r.mul_(-0.5)
                g_mean, g_inv_var = torch.empty_like(mean), torch.empty_like(var)
                lib.call("estep_backward", P.dtype, [P, W, off, centre, inv_var, g_maha, m, n_out, n_in,
                                                     g_mean, g_inv_var], m, range_at=9)
                g_var = -g_inv_var * inv_var * inv_var
            # activation and cost: the logit is small, (M, J), so autograd differentiates the shared formula
            with torch.enable_grad():
                bu, ba, ex, s_in = [x.detach().requires_grad_() for x in (beta_u, beta_a, excess, s)]
                out = parent_logit(bu, ba, ex, config.var_floor, s_in, lam, cs, config.activation)
                g_bu_t, g_ba_t, g_excess, g_s = torch.autograd.grad(out, (bu, ba, ex, s_in), g_logit)
            g_bu += g_bu_t
            g_ba += g_ba_t
            g_var += g_log_var.unsqueeze(-1) * inv_var + g_excess       # d excess = d var
            if damping:
                # g_mean and g_var so far are with respect to the damped centre and the variance around it
                if g_previous is not None:
                    g_mean = g_mean + g_previous
                previous = steps[t - 1][2] if t > 0 else torch.zeros_like(mean)
                with torch.enable_grad():
                    inputs = [x.detach().requires_grad_() for x in (mean, s, previous)]
                    out = _damp(inputs[0], var, inputs[1], inputs[2], damping)
                    g_mean, g_s_damp, g_previous = torch.autograd.grad(out, inputs, (g_mean, g_var),
                                                                       allow_unused=True)
                if g_s_damp is not None:
                    g_s = g_s + g_s_damp
            # M-step (and the E-step's share of the vote gradients)
            g_r = P.new_empty(m, n_out, n_in) if t > 0 and not detach else None
            lib.call("mstep_backward", P.dtype,
                     [P, W, off, W_t, r, r.stride(0), r.stride(1), a, mean, s, g_mean.contiguous(),
                      g_var.contiguous(), g_s.contiguous(), inv_var if g_maha is not None else None, g_maha,
                      centre if g_maha is not None else None, m, n_out, n_in, EPS, g_P, PerThread(g_W), g_r,
                      g_a], m, range_at=19)
            g_r_next = g_r
        return g_P, g_W.sum(0), g_a, g_bu, g_ba, None, None, None, None, None, None
