"""EM routing between two layers of matrix capsules (Hinton, Sabour, Frosst, ICLR 2018).

Each parent capsule is a Gaussian over the votes of its children; routing fits a mixture of these
Gaussians by EM, where a child's data are weighted by the child's activation and a parent's activation
is a logistic function of how cheaply its Gaussian explains the data assigned to it.

Two forms live here and compute the same thing:
- `em_routing`: the dense reference, written to read like the paper. Votes (N, I, J, D).
- `em_routing_fused`: the form the layers use. Votes are laid out (M, J, I, D) so that every M-step and
  E-step is one batched matrix product over the votes and their squares, and the E-step normalisation
  is pluggable (convolutional layers normalise a child over every position it feeds).

Numerical choices, shared by both forms so that they agree:
- variances get a floor `var_floor` and the log-likelihood uses log(variance), never sqrt, so a parent
  with one child or identical votes has finite cost and finite gradients;
- log(parent activation) is logsigmoid(logit), exact where sigmoid underflows;
- sums of weighted assignments are clamped at `EPS` in the denominator, so all-zero activations give
  zero means and weights otherwise sum to exactly one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8
STD_FLOOR = 1e-6        # added to the variance of the costs before standardising them
DEFAULT_VAR_FLOOR = 5e-4
# The default parameterisation (README, "Three routing iterations that learn"): costs standardised over the
# parent types, inverse temperature 10 * (1 - 0.95**(i+1)), and an E-step at a tenth of its log-posterior.
DEFAULT_ACTIVATION = "standardised"
DEFAULT_FINAL_LAMBDA = 10.0
DEFAULT_ESTEP_TEMPERATURE = 0.1
SCHEDULES = ("authors", "linear", "constant")
ACTIVATIONS = ("paper", "standardised")
DEFAULT_PARAMETERISATION = "emcaps"
BACKENDS = ("auto", "native", "torch", "compile")
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class RoutingConfig:
    """Everything that decides how a layer routes; one value shared by a model's layers.

    iterations:       EM iterations (the paper uses 3).
    final_lambda:     scale of the inverse temperature schedule.
    schedule:         'authors' (lambda_i = final * (1 - 0.95**(i+1))), 'linear' (final * (i+1)/T),
                      or 'constant' (final every iteration).
    var_floor:        added to every variance.
    normalize_cost:   scale each parent's share of the data by n_parents / n_children (Gritzman 2019),
                      so the cost has the same size in layers with very different fan-in.
    compete_positions: in convolutional layers, a child's assignments are normalised over every parent
                      it feeds (all positions and types), not over the types at each position.
    activation:       how a parent's activation follows from its cost (see `parent_logit`): 'paper',
                      lambda * (beta_a - cost); 'standardised', lambda * (beta_a - z) with z the cost
                      standardised over the parent types of one routing problem, so activations spread
                      whatever the scale of poses and fan-in.
    estep_temperature: the E-step's log-posterior is multiplied by this before normalising (deterministic
                      annealing EM): 1 is plain EM, below 1 softer assignments, so a parent whose variance
                      sits near the floor does not take a child outright.
    centre_damping:   each M-step moves a parent's centre only part of the way: centre = (1 - damping) *
                      weighted mean + damping * previous centre (0 before the first iteration), and the
                      variance is taken around that centre (the authors' code: 0.1).
    cost_scale:       a fixed factor on every layer's cost (the authors' logit has twice ours: 2).
    fan_in_cost_scale: when > 0, each layer's cost is also multiplied by this * J / I, J the parent types and
                      I the children of one routing problem (IBM's 100 * C / (K*K*B): 22, 11, 2 in 'small').
    class_lambda_scale: the class capsules route at this fraction of the inverse temperature (authors: 1/4).
    beta_u_scale, beta_a_scale: the layers' learned biases enter the cost as these multiples of the
                      parameters (the authors learn sigma_b and act_b with beta_u = sigma_b (ln 2 pi + 1) / 2
                      and beta_a = -5000 act_b); the factor also sets Adam's effective step on the bias.
    parameterisation: the name (a key of PARAMETERISATIONS) this config was built from; run configs fill
                      every field the name sets, and the model's initialisation, from it (emcaps.config).

    How it runs (the result does not depend on these):
    chunk:            route this many images at a time; 0 (default) picks as many as keep one chunk's
                      votes under `chunk_mb`. Small chunks keep the working set in cache and below
                      glibc's mmap threshold (32 MB at most), so the allocator reuses the same blocks
                      instead of mapping and zero-filling fresh pages every step.
    chunk_mb:         the votes budget of an automatic chunk, in MB.
    recompute:        when training, keep only each layer's inputs and recompute votes and routing in
                      the backward pass, chunk by chunk, instead of storing every iteration's tensors.
    backend:          how capsule convolutions route. 'native': C++ kernels that recompute the votes
                      in every pass and never store them, with a hand-written backward (CPU only; built
                      with the system compiler on first use, see emcaps.kernels); 'torch': PyTorch ops
                      (the fused form below); 'compile': a torch.compile'd kernel (fused loops, no
                      votes-sized temporaries; the first call of each shape pays the compile time);
                      'auto' (default): native where it is available, else torch. Class capsules,
                      whose votes are small, and traced calls always route with PyTorch ops.
    """

    iterations: int = 3
    final_lambda: float = DEFAULT_FINAL_LAMBDA
    schedule: str = "authors"
    var_floor: float = DEFAULT_VAR_FLOOR
    normalize_cost: bool = False
    compete_positions: bool = True
    activation: str = DEFAULT_ACTIVATION
    estep_temperature: float = DEFAULT_ESTEP_TEMPERATURE
    centre_damping: float = 0.0
    cost_scale: float = 1.0
    fan_in_cost_scale: float = 0.0
    class_lambda_scale: float = 1.0
    beta_u_scale: float = 1.0
    beta_a_scale: float = 1.0
    parameterisation: str = DEFAULT_PARAMETERISATION
    chunk: int = 0
    chunk_mb: float = 12.0
    recompute: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"routing chunk must be an integer >= 0, got {self.chunk!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"routing iterations must be an integer >= 1, got {self.iterations!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown inverse-temperature schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown routing backend {self.backend!r}; expected one of {BACKENDS}")
        if not self.final_lambda > 0:
            raise ValueError(f"final_lambda must be > 0, got {self.final_lambda}")
        if not self.var_floor > 0:
            raise ValueError(f"var_floor must be > 0, got {self.var_floor}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if not self.estep_temperature > 0:
            raise ValueError(f"estep_temperature must be > 0, got {self.estep_temperature}")
        if not 0 <= self.centre_damping < 1:
            raise ValueError(f"centre_damping must be in [0, 1), got {self.centre_damping}")
        for name in ("cost_scale", "class_lambda_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (self.fan_in_cost_scale >= 0 and math.isfinite(self.fan_in_cost_scale)):
            raise ValueError(f"fan_in_cost_scale must be a finite number >= 0, got {self.fan_in_cost_scale}")
        for name in ("beta_u_scale", "beta_a_scale"):
            if not (getattr(self, name) != 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite non-zero number, got {getattr(self, name)}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown routing parameterisation {self.parameterisation!r}; expected one of "
                             f"{', '.join(PARAMETERISATIONS)}")

    @classmethod
    def named(cls, name: str, **fields: Any) -> RoutingConfig:
        """A named parameterisation (see PARAMETERISATIONS), with `fields` overriding any of its settings."""
        if name not in PARAMETERISATIONS:
            raise ValueError(f"unknown routing parameterisation {name!r}; expected one of "
                             f"{', '.join(PARAMETERISATIONS)}")
        return cls(**{**PARAMETERISATIONS[name], "parameterisation": name, **fields})

    def layer_cost_scale(self, parents: int, children: int, layer_ratio: float) -> float:
        """The factor on one layer's cost: `cost_scale`, times `layer_ratio` (parents / children over the
        whole layer) with `normalize_cost`, times `fan_in_cost_scale` * parents / children of one routing
        problem when that is set."""
        scale = self.cost_scale * (layer_ratio if self.normalize_cost else 1.0)
        if self.fan_in_cost_scale > 0:
            scale *= self.fan_in_cost_scale * parents / children
        return scale

    def class_layer(self) -> RoutingConfig:
        """The config the class capsules route with: the inverse temperature times `class_lambda_scale`."""
        if self.class_lambda_scale == 1.0:
            return self
        return dataclasses.replace(self, final_lambda=self.final_lambda * self.class_lambda_scale,
                                   class_lambda_scale=1.0)

    def images_per_chunk(self, batch: int, votes_bytes_per_image: int) -> int:
        """How many images of a batch to route at once."""
        if self.chunk > 0:
            return self.chunk
        return max(1, min(batch, int(self.chunk_mb * 2**20 // max(votes_bytes_per_image, 1))))

    @property
    def inverse_temperatures(self) -> list[float]:
        return inverse_temperatures(self.iterations, self.final_lambda, self.schedule)


# Named parameterisations: how the activation follows from the cost, how sharp the E-step is, and how the
# M-step moves the centres. The model's initialisation that goes with each is emcaps.models.INITIALISATIONS.
# Every name sets every one of these fields, so that switching names leaves nothing of the previous one.
_EMCAPS = {"activation": DEFAULT_ACTIVATION, "final_lambda": DEFAULT_FINAL_LAMBDA, "schedule": "authors",
           "estep_temperature": DEFAULT_ESTEP_TEMPERATURE, "var_floor": DEFAULT_VAR_FLOOR, "normalize_cost": False,
           "centre_damping": 0.0, "cost_scale": 1.0, "fan_in_cost_scale": 0.0, "class_lambda_scale": 1.0,
           "beta_u_scale": 1.0, "beta_a_scale": 1.0}
_PAPER_LOGIT = {**_EMCAPS, "activation": "paper", "final_lambda": 0.01, "schedule": "authors",
                "estep_temperature": 1.0}
PARAMETERISATIONS: dict[str, dict[str, Any]] = {
    # emcaps' own (README, "Three routing iterations that learn"): the RoutingConfig defaults.
    "emcaps": _EMCAPS,
    # The paper's formula as written, with the authors' inverse temperature 0.01 * (1 - 0.95**(i+1)).
    "paper": _PAPER_LOGIT,
    # google-research capsule_em (em_layers.py): logit = lambda * (S * (-sum_h log var_h - sigma_b * D *
    # (ln 2pi + 1)) - 5000 act_b) = lambda * (beta_a - 2 (D beta_u + 0.5 sum_h log var_h) S) with
    # beta_u = sigma_b (ln 2pi + 1) / 2 and beta_a = -5000 act_b; class layer at lambda / 4; centres damped.
    "authors": {**_PAPER_LOGIT, "var_floor": 5e-4, "cost_scale": 2.0, "centre_damping": 0.1,
                "class_lambda_scale": 0.25, "beta_u_scale": (_LOG_2PI + 1) / 2, "beta_a_scale": -5000.0},
    # IBM/matrix-capsules-with-em-routing (Gritzman 2019): cost times 100 * J / I per layer, floor 1e-9.
    "ibm": {**_PAPER_LOGIT, "var_floor": 1e-9, "fan_in_cost_scale": 100.0},
}


def inverse_temperatures(iterations: int, final_lambda: float = DEFAULT_FINAL_LAMBDA,
                         schedule: str = "authors") -> list[float]:
    """The inverse temperature lambda for each iteration; it rises each iteration."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"routing iterations must be an integer >= 1, got {iterations!r}")
    if schedule == "authors":
        return [final_lambda * (1 - 0.95 ** (i + 1)) for i in range(iterations)]
    if schedule == "linear":
        return [final_lambda * (i + 1) / iterations for i in range(iterations)]
    if schedule == "constant":
        return [final_lambda] * iterations
    raise ValueError(f"unknown inverse-temperature schedule {schedule!r}; expected one of {SCHEDULES}")


def parent_logit(beta_u: Tensor, beta_a: Tensor, log_var_sum: Tensor, r_sum: Tensor, lam: float,
                 cost_scale: float, d: int, activation: str = "paper") -> Tensor:
    """The logit of each parent's activation; every routing form calls this one function.

    log_var_sum: (.., J)  sum over the D pose entries of log(variance)
    r_sum:       (.., J)  the data assigned to each parent, sum_i r_ij a_i
    -> (.., J). The cost of explaining the data is (D beta_u + 0.5 log_var_sum) * cost_scale * r_sum.
    """
    cost = (d * beta_u + 0.5 * log_var_sum) * (cost_scale * r_sum)
    if activation == "standardised":
        centred = cost - cost.mean(-1, keepdim=True)
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


def em_routing(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int = 3, *,
               final_lambda: float = DEFAULT_FINAL_LAMBDA, schedule: str = "authors",
               var_floor: float = DEFAULT_VAR_FLOOR, normalize_cost: bool = False,
               activation: str = DEFAULT_ACTIVATION, estep_temperature: float = DEFAULT_ESTEP_TEMPERATURE,
               centre_damping: float = 0.0, cost_scale: float = 1.0, fan_in_cost_scale: float = 0.0,
               connectivity: Tensor | None = None,
               trace: list[RoutingStep] | None = None) -> tuple[Tensor, Tensor]:
    """EM routing, dense reference form.

    votes:        (N, I, J, D)  vote of child i for parent j
    activations:  (N, I)        child activations
    beta_u, beta_a: (J,)        learned cost offsets (scalars broadcast)
    connectivity: optional (I, J) bool; child i feeds parent j only where True. A child's assignments
                  start uniform over, and are normalised over, the parents it feeds.
    centre_damping, cost_scale, fan_in_cost_scale: as in RoutingConfig (the cost's factor is
                  cost_scale * (J / I if normalize_cost) * (fan_in_cost_scale * J / I if that is > 0)).
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
    scale = cost_scale * (n_out / n_in if normalize_cost else 1.0)
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
        var = (w.unsqueeze(-1) * sq).sum(1) + var_floor                 # (N, J, D)
        logit = parent_logit(bu, ba, torch.log(var).sum(-1), r_sum, lam, scale, v.shape[-1], activation)
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
    return mean.to(out_dtype), act.to(out_dtype)


Normaliser = Callable[[Tensor], Tensor]


def em_routing_fused(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
                     config: RoutingConfig, *, cost_scale: float = 1.0,
                     initial: Tensor | None = None, normalise: Normaliser | None = None,
                     trace: list[RoutingStep] | None = None) -> tuple[Tensor, Tensor]:
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
    With `config.backend == "compile"`, a compiled kernel (`_em_direct`) runs instead: it fuses the
    broadcasts into loops and needs neither the stored squares nor the batched products.
    """
    m, n_out, n_in, d = votes.shape
    out_dtype = votes.dtype
    cd = _compute_dtype(out_dtype)
    r = initial if initial is not None else votes.new_full((1, 1, 1), 1.0 / n_out, dtype=cd)
    if config.backend == "compile" and trace is None:
        mean, act = _compiled_kernel()(votes.to(cd), activations.to(cd), beta_u.to(cd), beta_a.to(cd),
                                       tuple(config.inverse_temperatures), config.var_floor, cost_scale,
                                       r, normalise, config.activation, config.estep_temperature,
                                       config.centre_damping)
        return mean.to(out_dtype), act.to(out_dtype)
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
        var = (ex2 - 2 * mean * m1 + mean * mean * w_sum).clamp_min(0) + config.var_floor
        log_var = torch.log(var)
        logit = parent_logit(bu, ba, log_var.sum(-1), r_sum, lam, cost_scale, d, config.activation)  # (M, J)
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
        r = log_r.exp()
    return (mean + centre).to(out_dtype), act.to(out_dtype)


class PositionCompetition:
    """E-step normalisation for a capsule convolution in which parents at different positions compete.

    A child at input position p feeds every (output position, kernel offset) whose window covers p; its
    assignments are normalised over all those parents and all output types. Log-assignments arrive as
    (N*L, C, K*K*B), L = H'*W' output positions, ordered (ky, kx, b) along the last axis.
    """

    def __init__(self, height: int, width: int, kernel: int, stride: int, types_in: int,
                 device: torch.device | None = None) -> None:
        from emcaps.capsules import child_index

        self.index = child_index(height, width, kernel, stride).to(device)   # (L*K*K,)
        self.n_children = height * width
        self.kk = kernel * kernel
        self.types_in = types_in
        count = torch.zeros(self.n_children, device=device).index_add_(
            0, self.index, torch.ones_like(self.index, dtype=torch.float32))
        self.uncovered = (count == 0).float()                                   # (H*W,)
        self.edge_fan_out = count[self.index]                                    # parents per child, / types

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

    def __call__(self, log_r: Tensor) -> Tensor:
        """(N*L, C, K*K*B) -> the same, normalised per child over positions and types."""
        ml, c, i = log_r.shape
        n_pos = self.index.shape[0] // self.kk
        n = ml // n_pos
        per_edge = torch.logsumexp(log_r, dim=1).view(n, n_pos * self.kk, self.types_in)   # (N, L*KK, B)
        # A detached per-child shift keeps exp() in range; it cancels exactly, so gradients are unchanged.
        shift = per_edge.new_zeros(n, self.n_children, self.types_in).scatter_reduce(
            1, self.index.view(1, -1, 1).expand_as(per_edge), per_edge.detach(), "amax", include_self=False)
        total = per_edge.new_zeros(n, self.n_children, self.types_in).index_add(
            1, self.index, torch.exp(per_edge - shift[:, self.index]))
        lse = torch.log(total + self.uncovered.view(1, -1, 1)) + shift        # (N, H*W, B)
        return log_r - lse[:, self.index].reshape(ml, 1, i)


def _em_direct(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, lambdas: tuple[float, ...],
               var_floor: float, cost_scale: float, initial: Tensor, normalise: Normaliser | None,
               activation: str, estep_temperature: float, centre_damping: float) -> tuple[Tensor, Tensor]:
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
        var = (w * sq).sum(2) + var_floor
        log_var = torch.log(var)
        logit = parent_logit(beta_u, beta_a, log_var.sum(-1), r_sum, lam, cost_scale, d, activation)
        act = torch.sigmoid(logit)
        if it == len(lambdas) - 1:
            break
        log_p = -0.5 * ((sq / var.unsqueeze(2)).sum(-1) + (log_var.sum(-1, keepdim=True) + d * _LOG_2PI))
        log_r = estep_temperature * (F.logsigmoid(logit).unsqueeze(-1) + log_p)
        log_r = normalise(log_r) if normalise is not None else torch.log_softmax(log_r, dim=1)
        r = log_r.exp()
    return mean, act


@functools.cache
def _compiled_kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    """torch.compile(_em_direct), built once per process on first use."""
    return torch.compile(_em_direct, dynamic=False)
