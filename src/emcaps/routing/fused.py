"""EM routing in the layout the layers use, (M, J, I, D), as batched matrix products; and the E-step
normalisation of a capsule convolution in which parents at different positions compete for a child.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from emcaps.routing.config import _LOG_2PI, EPS, RoutingConfig
from emcaps.routing.reference import Normaliser, RoutingStep, _compiled_kernel, _compute_dtype, parent_logit
from emcaps.routing.runtime import Settings, note_compile_failure


def em_routing_fused(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
                     config: RoutingConfig, *, cost_scale: float = 1.0,
                     initial: Tensor | None = None, normalise: Normaliser | None = None,
                     trace: list[RoutingStep] | None = None, settings: Settings | None = None
                     ) -> tuple[Tensor, Tensor]:
    """EM routing in the layout the layers use; computes what `em_routing` computes.

    votes:       (M, J, I, D)   M independent routing problems (images, or image-positions)
    activations: (M, I)
    cost_scale:  the layer's factor on the cost (the layers pass `config.layer_cost_scale(...)`, which holds
                 config.cost_scale; this function reads no cost factor from `config` itself)
    initial:     initial assignments, broadcastable to (M, J, I); default uniform 1/J
    normalise:   maps unnormalised log-assignments (M, J, I) to normalised ones; default log-softmax
                 over J. Convolutional layers pass one that normalises across positions.
    returns pose (M, J, D) and activation (M, J).

    The votes are centred per parent once and stored beside their squares, (M, J, I, 2D); each M-step is
    then one batched product (weights @ [v, v^2]) and each E-step one more ([v, v^2] @ coefficients),
    with no (votes - mean)^2 temporary. Centring keeps the moment formula exact for large votes.
    With `settings.backend == "compile"` (emcaps.routing.runtime), a compiled kernel (`_em_direct`) runs
    instead: it fuses the broadcasts into loops and needs neither the stored squares nor the batched products.
    Where the runtime chose compile itself and compiling fails, this says so once and uses PyTorch ops.
    """
    with torch.autocast(votes.device.type, enabled=False):     # the statistics stay in float32 (or float64)
        if settings is not None and settings.backend == "compile" and trace is None:
            try:
                return _compiled(votes, activations, beta_u, beta_a, config, cost_scale, initial, normalise)
            except Exception as error:                           # noqa: BLE001 - any compiler failure
                if not settings.compile_fallback:
                    raise
                note_compile_failure(error)
        return _fused(votes, activations, beta_u, beta_a, config, cost_scale, initial, normalise, trace)


def _compiled(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, config: RoutingConfig,
              cost_scale: float, initial: Tensor | None, normalise: Normaliser | None) -> tuple[Tensor, Tensor]:
    """em_routing_fused with the torch.compile'd kernel: votes (M, J, I, D) -> pose (M, J, D), activation (M, J)."""
    n_out = votes.shape[1]
    out_dtype = votes.dtype
    cd = _compute_dtype(out_dtype)
    r = initial if initial is not None else votes.new_full((1, 1, 1), 1.0 / n_out, dtype=cd)
    v, a = votes.to(cd), activations.to(cd)
    # One graph per layer and grad mode whatever the batch: M (images x positions) is symbolic, the layer's
    # (J, I, D) stay static. Without this, every new batch size (a last partial batch, an eval batch)
    # compiled anew, and past dynamo's recompile limit (raised here: a batch of 1 specialises M=1) the
    # routing silently ran uncompiled.
    for t in (v, a, r):
        if t.dim() > 0 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, **{limit: 64}):
        mean, act = _compiled_kernel()(v, a, beta_u.to(cd), beta_a.to(cd), tuple(config.inverse_temperatures),
                                       config.var_floor, cost_scale, r, normalise, config.activation,
                                       config.estep_temperature, config.centre_damping, config.detach_assignments)
    return mean.to(out_dtype), act.to(out_dtype)


def _fused(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, config: RoutingConfig,
           cost_scale: float, initial: Tensor | None, normalise: Normaliser | None,
           trace: list[RoutingStep] | None) -> tuple[Tensor, Tensor]:
    """em_routing_fused's body, outside autocast: votes (M, J, I, D) -> pose (M, J, D), activation (M, J)."""
    m, n_out, n_in, d = votes.shape
    out_dtype = votes.dtype
    cd = _compute_dtype(out_dtype)
    r = initial if initial is not None else votes.new_full((1, 1, 1), 1.0 / n_out, dtype=cd)
    v = votes.to(cd)
    a = activations.to(cd).unsqueeze(1)                                 # (M, 1, I)
    bu, ba = beta_u.to(cd), beta_a.to(cd)
    centre = v.mean(2)                                                  # (M, J, D)
    vc = v - centre.unsqueeze(2)
    moments = torch.cat((vc, vc * vc), dim=-1).view(m * n_out, n_in, 2 * d)   # (MJ, I, 2D)
    del v, vc

    lambdas = config.inverse_temperatures
    damping = config.centre_damping
    previous = -centre                                                  # the centres 0, relative to `centre`
    for it, lam in enumerate(lambdas):
        ra = (r * a).expand(m, n_out, n_in)                             # (M, J, I)
        r_sum = ra.sum(-1)                                              # (M, J)
        w = ra / r_sum.clamp_min(EPS).unsqueeze(-1)
        mom = torch.bmm(w.reshape(m * n_out, 1, n_in), moments).view(m, n_out, 2 * d)
        m1, ex2 = mom[..., :d], mom[..., d:]                            # (M, J, D) each, centred
        # mean - centre, and var = sum_i w (vc - that)^2, exactly as the dense form also where the
        # weights sum to less than one (r_sum < EPS): there the mean shrinks towards 0, not the centre.
        w_sum = (r_sum / r_sum.clamp_min(EPS)).unsqueeze(-1)            # (M, J, 1)
        mean = m1 + centre * (w_sum - 1)
        if damping:
            # sum_i w (vc - mean)^2 below holds for any mean, so the damped centre needs nothing else.
            mean = (1 - damping) * mean + damping * previous
            previous = mean
        excess = (ex2 - 2 * mean * m1 + mean * mean * w_sum).clamp_min(0)       # (M, J, D)
        var = excess + config.var_floor
        log_var = torch.log(var)
        logit = parent_logit(bu, ba, excess, config.var_floor, r_sum, lam, cost_scale, config.activation)
        act = torch.sigmoid(logit)
        if trace is not None:
            trace.append(RoutingStep(r.expand(m, n_out, n_in), mean + centre, var, act, lam, logit))
        if it == len(lambdas) - 1:
            break
        # sum_d (v - mean)^2 / var  =  sum_d v^2/var - 2 v mean/var + mean^2/var, as one product.
        inv = 1.0 / var
        coef = torch.cat((-2 * mean * inv, inv), dim=-1).view(m * n_out, 2 * d, 1)
        maha = torch.bmm(moments, coef).view(m, n_out, n_in) + (mean * mean * inv).sum(-1, keepdim=True)
        log_p = -0.5 * (maha.clamp_min(0) + (log_var.sum(-1, keepdim=True) + d * _LOG_2PI))
        log_r = config.estep_temperature * (F.logsigmoid(logit).unsqueeze(-1) + log_p)   # (M, J, I)
        log_r = normalise(log_r) if normalise is not None else torch.log_softmax(log_r, dim=1)
        r = log_r.exp().detach() if config.detach_assignments else log_r.exp()
    return (mean + centre).to(out_dtype), act.to(out_dtype)


class PositionCompetition:
    """E-step normalisation for a capsule convolution in which parents at different positions compete.

    A child at input position p feeds every (output position, kernel offset) whose window covers p; its
    assignments are normalised over all those parents and all output types. Log-assignments arrive as
    (N*L, C, K*K*B), L = H'*W' output positions, ordered (ky, kx, b) along the last axis.
    """

    def __init__(self, height: int, width: int, kernel: int, stride: int, types_in: int,
                 device: torch.device | None = None) -> None:
        from emcaps.capsules import child_index_on

        self.index = child_index_on(height, width, kernel, stride, torch.device(device or "cpu"))  # (L*K*K,)
        self.n_children = height * width
        self.kk = kernel * kernel
        self.types_in = types_in
        count = torch.zeros(self.n_children, device=device).index_add_(
            0, self.index, torch.ones_like(self.index, dtype=torch.float32))
        self.uncovered = (count == 0).float()                                   # (H*W,)
        self.edge_fan_out = count[self.index]                                    # parents per child, / types

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def of(height: int, width: int, kernel: int, stride: int, types_in: int,
           device: torch.device) -> PositionCompetition:
        """The competition of one grid on `device`, made once: a layer asks for it at every forward, and building
        it costs a few small kernels and a copy from the CPU. Shared, so its tensors are never written to."""
        with torch.inference_mode(False):
            return PositionCompetition(height, width, kernel, stride, types_in, device)

    def initial(self, batch: int, types_out: int, dtype: torch.dtype) -> Tensor:
        """Uniform assignments over all parents a child feeds: (N*L, 1, K*K*B)."""
        r0 = 1.0 / (self.edge_fan_out * types_out)                               # (L*K*K,)
        n_pos = r0.shape[0] // self.kk
        r0 = r0.to(dtype).view(1, n_pos, self.kk, 1).expand(batch, -1, -1, self.types_in)
        return r0.reshape(batch * n_pos, 1, self.kk * self.types_in)

    def child_sums(self, x: Tensor) -> Tensor:
        """(N*L, K*K*B) -> the same: for each child, the sum of x over every (position, offset) it feeds."""
        n_pos = self.index.shape[0] // self.kk
        per_edge = x.reshape(x.shape[0] // n_pos, n_pos * self.kk, self.types_in)     # (N, L*KK, B)
        total = per_edge.new_zeros(per_edge.shape[0], self.n_children, self.types_in)
        return total.index_add_(1, self.index, per_edge)[:, self.index].reshape(x.shape)

    def child_log_normaliser(self, per_edge: Tensor) -> Tensor:
        """(N*L, K*K*B) -> the same: for each edge, the log-sum over every parent its child feeds, from each
        edge's log-normaliser over the output types."""
        ml, i = per_edge.shape
        n_pos = self.index.shape[0] // self.kk
        pe = per_edge.reshape(ml // n_pos, n_pos * self.kk, self.types_in)              # (N, L*KK, B)
        # A detached per-child shift keeps exp() in range; it cancels exactly, so gradients are unchanged.
        shift = pe.new_zeros(pe.shape[0], self.n_children, self.types_in).scatter_reduce(
            1, self.index.view(1, -1, 1).expand_as(pe), pe.detach(), "amax", include_self=False)
        total = pe.new_zeros(pe.shape[0], self.n_children, self.types_in).index_add(
            1, self.index, torch.exp(pe - shift[:, self.index]))
        lse = torch.log(total + self.uncovered.view(1, -1, 1)) + shift                  # (N, H*W, B)
        return lse[:, self.index].reshape(ml, i)

    def __call__(self, log_r: Tensor) -> Tensor:
        """(N*L, C, K*K*B) -> the same, normalised per child over positions and types."""
        return log_r - self.child_log_normaliser(torch.logsumexp(log_r, dim=1)).unsqueeze(1)

    @torch.no_grad()
    def edge_scale(self, per_edge: Tensor) -> Tensor:
        """(N*L, K*K*B) -> the same: exp(per_edge - the child's log-normaliser over every parent it feeds).

        per_edge is each (position, offset, type) edge's log-normaliser over the output types (the native
        E-step kernel normalises over types and returns it); the assignments across positions are then the
        per-edge ones times this factor, one multiplication per assignment.
        """
        return torch.exp(per_edge - self.child_log_normaliser(per_edge))
