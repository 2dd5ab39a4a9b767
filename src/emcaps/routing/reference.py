"""The dense reference form of EM routing, written to read like the paper, and its loop form for torch.compile.

`em_routing` takes votes (N, I, J, D) and is what the tests hold every other form to; `_em_direct` is the same
maths over the layers' (M, J, I, D) layout, written as plain broadcasts so that torch.compile fuses it into loops
(Runtime.backend == 'compile'). `parent_logit` is the one activation formula every form calls.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from emcaps.routing.config import _LOG_2PI, EPS, STD_FLOOR, RoutingConfig, inverse_temperatures

Normaliser = Callable[[Tensor], Tensor]


def parent_logit(beta_u: Tensor, beta_a: Tensor, var_excess: Tensor, var_floor: float, r_sum: Tensor, lam: float,
                 cost_scale: float, activation: str = "paper") -> Tensor:
    """The logit of each parent's activation; every routing form calls this one function.

    var_excess: (.., J, D)  the parents' variances without the floor (variance = var_excess + var_floor)
    r_sum:      (.., J)     the data assigned to each parent, sum_i r_ij a_i
    -> (.., J). The cost of explaining the data is (D beta_u + 0.5 sum_d log(variance)) * cost_scale * r_sum.

    Why the variance comes without its floor: where the floor dominates the votes' spread (a fresh network's
    class capsules), every parent's sum of log-variances is D log(floor) plus differences a million times
    smaller, which float32 cannot hold beside it. So the log-variances are D log(floor) + log1p(excess/floor),
    and the standardised activation, which only sees differences between parents, takes every cost relative
    to the first parent's before adding up: no term that is common to all parents is ever rounded.
    """
    d = var_excess.shape[-1]
    # (J,) or scalar: the cost per unit of data, less the part of the log-variances above the floor
    per_unit = d * beta_u + 0.5 * d * math.log(var_floor)
    if activation != "standardised":
        rel = torch.log1p(var_excess / var_floor).sum(-1)              # (.., J) sum_d log(variance / floor)
        return lam * (beta_a - (per_unit + 0.5 * rel) * (cost_scale * r_sum))
    # cost_j - cost_0, every difference formed before anything common to the parents is added to it: the
    # entries that carry coordinate offsets have a large variance that is the same for every class.
    x0 = var_excess[..., :1, :]                                         # (.., 1, D)
    rel0 = torch.log1p(x0 / var_floor).sum(-1)                          # (.., 1)
    # log((floor + x_j) / (floor + x_0)) per entry: log1p of the quotient less one keeps its digits near 1; far
    # below 1 (a parent much tighter than the first: the quotient is about floor / x_0), 1 + that loses them,
    # and even rounds to 0, so there the quotient's own log is taken. Both branches stay finite for the
    # backward pass of torch.where.
    base = var_floor + x0
    ratio = (var_excess - x0) / base
    near = ratio > -0.5
    rel_diff = torch.where(near, torch.log1p(ratio.clamp_min(-0.5)),
                           torch.log((var_floor + var_excess) / base)).sum(-1)   # (.., J) rel_j - rel_0
    per_unit = torch.as_tensor(per_unit, dtype=rel_diff.dtype, device=rel_diff.device).expand_as(rel_diff)
    r0, k0 = r_sum[..., :1], per_unit[..., :1]
    r_diff = r_sum - r0
    diff = (per_unit * r_diff + (per_unit - k0) * r0 + 0.5 * (r_sum * rel_diff + rel0 * r_diff)) * cost_scale
    centred = diff - diff.mean(-1, keepdim=True)
    cost = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + STD_FLOOR)
    return lam * (beta_a - cost)


@dataclass
class RoutingStep:
    """What one EM iteration computed, kept when a caller passes `trace=[]` (for pictures and tests).

    assignments: the assignments the M-step used, in the caller's layout ((N, I, J) dense, (M, J, I) fused)
    mean, var:   the parents' Gaussians, (.., J, D)
    activation:  the parents' activations, (.., J), and their logits
    """

    assignments: Tensor
    mean: Tensor
    var: Tensor
    activation: Tensor
    inverse_temperature: float
    logit: Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision routing loses the variance floor and the log-likelihoods; route in at least fp32.
    return torch.promote_types(dtype, torch.float32)


def _check_betas(beta_u: Tensor, beta_a: Tensor, n_out: int) -> None:
    for name, b in (("beta_u", beta_u), ("beta_a", beta_a)):
        if b.dim() > 1 or (b.dim() == 1 and b.shape[0] not in (1, n_out)):
            raise ValueError(f"{name} must be a scalar or have shape ({n_out},), got {tuple(b.shape)}")


_DEFAULT = RoutingConfig()     # em_routing's defaults are the library's


def em_routing(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
               iterations: int = _DEFAULT.iterations, *,
               final_lambda: float = _DEFAULT.final_lambda, schedule: str = _DEFAULT.schedule,
               var_floor: float = _DEFAULT.var_floor, normalise_cost: bool = _DEFAULT.normalise_cost,
               activation: str = _DEFAULT.activation, estep_temperature: float = _DEFAULT.estep_temperature,
               centre_damping: float = _DEFAULT.centre_damping, cost_scale: float = _DEFAULT.cost_scale,
               fan_in_cost_scale: float = _DEFAULT.fan_in_cost_scale,
               detach_assignments: bool = _DEFAULT.detach_assignments, connectivity: Tensor | None = None,
               initial: Tensor | None = None, trace: list[RoutingStep] | None = None) -> tuple[Tensor, Tensor]:
    """EM routing, dense reference form.

    votes:        (N, I, J, D)  vote of child i for parent j
    activations:  (N, I)        child activations
    beta_u, beta_a: (J,)        learned cost offsets (scalars broadcast)
    connectivity: optional (I, J) bool; child i feeds parent j only where True. A child's assignments
                  start uniform over, and are normalised over, the parents it feeds.
    initial:      optional (I, J) or (N, I, J) assignments for the first M-step instead of that uniform start
                  (RoutingConfig.initial_assignments = 'per_window' gives 1/C in every window of a child).
    centre_damping, cost_scale, fan_in_cost_scale, detach_assignments: as in RoutingConfig, whose defaults
                  every keyword takes (the cost's factor is cost_scale * (J / I if normalise_cost) *
                  (fan_in_cost_scale * J / I if that is > 0)).
    returns pose (N, J, D) (the Gaussian means, or damped centres) and activation (N, J).
    """
    if votes.dim() != 4:
        raise ValueError(f"votes must have shape (N, I, J, D), got {tuple(votes.shape)}")
    n, n_in, n_out, _ = votes.shape
    if tuple(activations.shape) != (n, n_in):
        raise ValueError(f"activations must have shape ({n}, {n_in}) to match votes, got {tuple(activations.shape)}")
    _check_betas(beta_u, beta_a, n_out)
    lambdas = inverse_temperatures(iterations, final_lambda, schedule)
    out_dtype = votes.dtype
    cd = _compute_dtype(out_dtype)
    v, a = votes.to(cd), activations.to(cd)
    bu, ba = beta_u.to(cd), beta_a.to(cd)

    if connectivity is None:
        r = torch.full((1, n_in, n_out), 1.0 / n_out, dtype=cd, device=v.device)
    else:
        if tuple(connectivity.shape) != (n_in, n_out) or connectivity.dtype != torch.bool:
            raise ValueError(f"connectivity must be a bool tensor of shape ({n_in}, {n_out})")
        fan_out = connectivity.sum(1, keepdim=True)
        if (fan_out == 0).any():
            raise ValueError("connectivity leaves a child with no parent")
        r = (connectivity / fan_out).to(cd).unsqueeze(0)
    if initial is not None:
        r = initial.to(cd).expand(n, n_in, n_out)
    scale = cost_scale * (n_out / n_in if normalise_cost else 1.0)
    if fan_in_cost_scale > 0:
        scale *= fan_in_cost_scale * n_out / n_in
    mean = v.new_zeros(n, n_out, v.shape[-1])                           # the centres before the first M-step

    for it, lam in enumerate(lambdas):
        # M-step: assignments weighted by the children's activations.
        ra = r * a.unsqueeze(-1)                                        # (N, I, J)
        r_sum = ra.sum(1)                                               # (N, J)
        w = ra / r_sum.clamp_min(EPS).unsqueeze(1)                             # (N, I, J)
        mean = (1 - centre_damping) * (w.unsqueeze(-1) * v).sum(1) + centre_damping * mean   # (N, J, D)
        sq = (v - mean.unsqueeze(1)) ** 2                               # (N, I, J, D)
        excess = (w.unsqueeze(-1) * sq).sum(1)                          # (N, J, D)
        var = excess + var_floor
        logit = parent_logit(bu, ba, excess, var_floor, r_sum, lam, scale, activation)
        act = torch.sigmoid(logit)                                      # (N, J)
        if trace is not None:
            trace.append(RoutingStep(r.expand(n, -1, -1), mean, var, act, lam, logit))
        if it == len(lambdas) - 1:
            break
        # E-step: log-likelihood of each vote under each parent, weighted by the parent's activation.
        log_p = -0.5 * (sq / var.unsqueeze(1) + torch.log(var).unsqueeze(1) + _LOG_2PI).sum(-1)  # (N, I, J)
        log_r = estep_temperature * (F.logsigmoid(logit).unsqueeze(1) + log_p)
        if connectivity is not None:
            log_r = log_r.masked_fill(~connectivity, float("-inf"))
        r = torch.softmax(log_r, dim=2)
        if detach_assignments:
            r = r.detach()
    return mean.to(out_dtype), act.to(out_dtype)


def _em_direct(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, lambdas: tuple[float, ...],
               var_floor: float, cost_scale: float, initial: Tensor, normalise: Normaliser | None,
               activation: str, estep_temperature: float, centre_damping: float,
               detach_assignments: bool = False) -> tuple[Tensor, Tensor]:
    """EM routing written as plain broadcasts over (M, J, I, D), for torch.compile to fuse into loops.

    Eager, each line would allocate a votes-sized temporary; compiled, none does, and (v - mean)^2 is
    recomputed in registers rather than stored. Same maths and numerical choices as `em_routing`.
    """
    d = votes.shape[-1]
    a = activations.unsqueeze(1)                                        # (M, 1, I)
    r = initial
    mean = votes.new_zeros(votes.shape[0], votes.shape[1], d)
    for it, lam in enumerate(lambdas):
        ra = r * a                                                      # (M, J, I)
        r_sum = ra.sum(-1)                                              # (M, J)
        w = (ra / r_sum.clamp_min(EPS).unsqueeze(-1)).unsqueeze(-1)     # (M, J, I, 1)
        mean = (1 - centre_damping) * (w * votes).sum(2) + centre_damping * mean   # (M, J, D)
        sq = (votes - mean.unsqueeze(2)) ** 2                           # (M, J, I, D), fused away
        excess = (w * sq).sum(2)                                        # (M, J, D)
        var = excess + var_floor
        log_var = torch.log(var)
        logit = parent_logit(beta_u, beta_a, excess, var_floor, r_sum, lam, cost_scale, activation)
        act = torch.sigmoid(logit)
        if it == len(lambdas) - 1:
            break
        log_p = -0.5 * ((sq / var.unsqueeze(2)).sum(-1) + (log_var.sum(-1, keepdim=True) + d * _LOG_2PI))
        log_r = estep_temperature * (F.logsigmoid(logit).unsqueeze(-1) + log_p)
        log_r = normalise(log_r) if normalise is not None else torch.log_softmax(log_r, dim=1)
        r = log_r.exp().detach() if detach_assignments else log_r.exp()
    return mean, act


@functools.cache
def _compiled_kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    """torch.compile(_em_direct), built once per process on first use."""
    return torch.compile(_em_direct)
