"""EM routing between two layers of matrix capsules (Hinton, Sabour, Frosst, ICLR 2018).

Each parent capsule is a Gaussian over the votes of its children; routing fits a mixture of these
Gaussians by EM, where a child's data are weighted by the child's activation and a parent's activation
is a logistic function of how cheaply its Gaussian explains the data assigned to it.

The forms that compute it, one module each, all held to the same float64 values and gradients by the tests:
- `reference.em_routing`: the dense reference, written to read like the paper. Votes (N, I, J, D). Its loop
  form over the layers' layout is what Runtime(backend='compile') hands to torch.compile.
- `fused.em_routing_fused`: PyTorch ops in the layers' layout (M, J, I, D): every M-step and E-step is one
  batched matrix product over the votes and their squares, and the E-step normalisation is pluggable
  (`fused.PositionCompetition`: convolutional layers normalise a child over every position it feeds).
- `native.conv_routing`: capsule convolutions with the C++ kernels of emcaps.kernels, which recompute the
  votes in every pass and never store them, with a hand-written backward.
`config` holds RoutingConfig and the named parameterisations ('emcaps', 'paper', 'authors', 'ibm'): the
mathematics. `runtime` holds how it runs on a device (backend, chunks, recomputation), chosen per device.

Numerical choices, shared by every form so that they agree:
- variances get a floor `var_floor` and the log-likelihood uses log(variance), never sqrt, so a parent
  with one child or identical votes has finite cost and finite gradients;
- log(parent activation) is logsigmoid(logit), exact where sigmoid underflows;
- sums of weighted assignments are clamped at `EPS` in the denominator, so all-zero activations give
  zero means and weights otherwise sum to exactly one.
"""

from emcaps.routing.config import (
    ACTIVATIONS,
    DEFAULT_ACTIVATION,
    DEFAULT_ESTEP_TEMPERATURE,
    DEFAULT_FINAL_LAMBDA,
    DEFAULT_PARAMETERISATION,
    DEFAULT_VAR_FLOOR,
    EPS,
    INITIAL_ASSIGNMENTS,
    PARAMETERISATIONS,
    SCHEDULES,
    STD_FLOOR,
    Parameterisation,
    RoutingConfig,
    inverse_temperatures,
    parameterisation,
)
from emcaps.routing.fused import PositionCompetition, em_routing_fused
from emcaps.routing.reference import Normaliser, RoutingStep, em_routing, parent_logit
from emcaps.routing.runtime import BACKENDS, Runtime, Settings

__all__ = [
    "ACTIVATIONS", "BACKENDS", "DEFAULT_ACTIVATION", "DEFAULT_ESTEP_TEMPERATURE", "DEFAULT_FINAL_LAMBDA",
    "DEFAULT_PARAMETERISATION", "DEFAULT_VAR_FLOOR", "EPS", "INITIAL_ASSIGNMENTS", "PARAMETERISATIONS",
    "SCHEDULES", "STD_FLOOR", "Normaliser", "Parameterisation", "PositionCompetition", "RoutingConfig",
    "RoutingStep", "Runtime", "Settings", "em_routing", "em_routing_fused", "inverse_temperatures",
    "parameterisation", "parent_logit",
]
