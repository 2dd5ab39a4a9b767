"""What decides how a layer routes: RoutingConfig, the named parameterisations, the inverse temperatures.

Numerical constants shared by every routing form live here too, so that the forms agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

EPS = 1e-8
STD_FLOOR = 1e-6        # added to the variance of the costs before standardising them
# The variance floor of emcaps' parameterisation: far below any vote spread, so that it keeps one-child parents
# finite without setting the costs. A floor above the spread of the votes (the authors' 5e-4) is where, at
# initialisation, the class capsules' votes sit after three averaging layers: every class's variances are then
# the floor's, their costs differ in the fifth digit, and standardising the costs amplifies float32 rounding
# into the activations (docs: "Conditioning").
DEFAULT_VAR_FLOOR = 1e-9
AUTHORS_VAR_FLOOR = 5e-4
# Training starts the class capsules at the authors' floor, above their votes' spread, and anneals it to
# DEFAULT_VAR_FLOOR over the first half of the steps (RoutingConfig.class_floor_start; docs/research.md).
DEFAULT_CLASS_FLOOR_START = AUTHORS_VAR_FLOOR
# The default parameterisation (docs/research.md, "The default parameterisation"): costs standardised over the
# parent types, inverse temperature 10 * (1 - 0.95**(i+1)), and an E-step at a tenth of its log-posterior.
DEFAULT_ACTIVATION = "standardised"
DEFAULT_FINAL_LAMBDA = 10.0
DEFAULT_ESTEP_TEMPERATURE = 0.1
SCHEDULES = ("authors", "linear", "constant")
ACTIVATIONS = ("paper", "standardised")
DEFAULT_PARAMETERISATION = "emcaps"
CUSTOM = "custom"         # the label of routing fields that no named parameterisation sets all of
INITIAL_ASSIGNMENTS = ("uniform", "per_window")
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class RoutingConfig:
    """Everything that decides how a layer routes; one value shared by a model's layers.

    iterations:       EM iterations (the paper uses 3).
    final_lambda:     scale of the inverse temperature schedule.
    schedule:         'authors' (lambda_i = final * (1 - 0.95**(i+1))), 'linear' (final * (i+1)/T),
                      or 'constant' (final every iteration).
    var_floor:        added to every variance.
    class_var_floor:  the class capsules' floor instead, where > 0 (0: var_floor). A floor above the spread of
                      a fresh network's class votes (5e-4) makes a class's activation follow the data routed to
                      it rather than the width of its votes: shorter runs learn faster, the `converge` recipe
                      ends worse (docs/research.md). Those costs differ in digits float32 drops, so the class
                      capsules always route in float64.
    class_floor_start: where > 0, training starts the class capsules at this floor and anneals it
                      geometrically to their own (class_var_floor, else var_floor) over the first
                      `class_floor_anneal` of its steps; the training loop does this, and a model routes with its
                      own floor everywhere else. A floor above a fresh network's class votes' spread makes the
                      class activations follow the data routed to each class, which short runs learn from fast;
                      the small floor the anneal ends at keeps how well each class's votes agree
                      (docs/research.md). 0: no annealing.
    class_floor_anneal: the fraction of the training steps the anneal takes (0 < f <= 1).
    class_floor_steps: where > 0, the anneal takes at most this many steps: the phase it serves is a fresh
                      network's, which a longer run does not lengthen. 0: no cap.
    normalise_cost:   scale each parent's share of the data by n_parents / n_children (Gritzman 2019),
                      so the cost has the same size in layers with very different fan-in.
    compete_positions: in convolutional layers, a child's assignments are normalised over every parent
                      it feeds (all positions and types), not over the types at each position.
    initial_assignments: with compete_positions, how the first M-step's assignments start: 'uniform' over
                      every parent a child feeds (1 / (C * windows)), or 'per_window', 1/C to the parents of
                      each window, as the authors' code starts (a child in k windows carries k times the data).
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
    detach_assignments: the assignments each E-step computes are constants to the backward pass: the loss
                      reaches poses, transforms and activations only through the M-steps that weight the
                      votes by them, not through how the E-steps chose them (as k-means' gradient ignores
                      how the clusters were picked). The forward pass is unchanged; the native backward then
                      differentiates only the last M-step (the damped centres' chain where damping is on).
                      On by default (emcaps' parameterisation): the backward pass keeps and differentiates one
                      M-step instead of every iteration, so a training step costs less time and memory
                      (docs/performance.md, docs/research.md); the paper, the authors' and IBM's code
                      differentiate through every E-step ('paper', 'authors', 'ibm').
    parameterisation: which named parameterisation (a key of PARAMETERISATIONS) the fields are, or 'custom'.
                      Left empty it is derived from the fields; given, every field the name sets must have
                      its value (a ValueError names those that do not), so the label never lies. Run
                      configs fill the fields a name sets, and the model's initialisation, from it
                      (emcaps.config); so does `create_model` for the initialisation.

    How it runs (backend, chunking, recomputation) is not part of it: see emcaps.routing.runtime.Runtime.
    """

    iterations: int = 3
    final_lambda: float = DEFAULT_FINAL_LAMBDA
    schedule: str = "authors"
    var_floor: float = DEFAULT_VAR_FLOOR
    class_var_floor: float = 0.0
    class_floor_start: float = DEFAULT_CLASS_FLOOR_START
    class_floor_anneal: float = 0.5
    class_floor_steps: int = 0
    normalise_cost: bool = False
    compete_positions: bool = True
    initial_assignments: str = "uniform"
    activation: str = DEFAULT_ACTIVATION
    estep_temperature: float = DEFAULT_ESTEP_TEMPERATURE
    centre_damping: float = 0.0
    cost_scale: float = 1.0
    fan_in_cost_scale: float = 0.0
    class_lambda_scale: float = 1.0
    beta_u_scale: float = 1.0
    beta_a_scale: float = 1.0
    detach_assignments: bool = True
    parameterisation: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"routing iterations must be an integer >= 1, got {self.iterations!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown inverse-temperature schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not self.final_lambda > 0:
            raise ValueError(f"final_lambda must be > 0, got {self.final_lambda}")
        if not self.var_floor > 0:
            raise ValueError(f"var_floor must be > 0, got {self.var_floor}")
        if not self.class_var_floor >= 0:
            raise ValueError(f"class_var_floor must be >= 0 (0 = var_floor), got {self.class_var_floor}")
        if not self.class_floor_start >= 0:
            raise ValueError(f"class_floor_start must be >= 0 (0 = no annealing), got {self.class_floor_start}")
        if not 0 < self.class_floor_anneal <= 1:
            raise ValueError(f"class_floor_anneal must be in (0, 1], got {self.class_floor_anneal}")
        if not isinstance(self.class_floor_steps, int) or self.class_floor_steps < 0:
            raise ValueError(f"class_floor_steps must be an integer >= 0 (0 = no cap), got {self.class_floor_steps!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if not self.estep_temperature > 0:
            raise ValueError(f"estep_temperature must be > 0, got {self.estep_temperature}")
        if self.initial_assignments not in INITIAL_ASSIGNMENTS:
            raise ValueError(f"unknown initial_assignments {self.initial_assignments!r}; expected one of "
                             f"{INITIAL_ASSIGNMENTS}")
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
        self._check_label()

    def _check_label(self) -> None:
        """Derive `parameterisation` from the fields where it is empty; where it names one, hold the fields to it."""
        def matches(named: dict[str, Any]) -> bool:
            return all(getattr(self, k) == v for k, v in named.items())

        if self.parameterisation == "":
            label = next((name for name, named in _LABELS.items() if matches(named.routing)), CUSTOM)
            object.__setattr__(self, "parameterisation", label)
        elif self.parameterisation != CUSTOM:
            if self.parameterisation not in _LABELS:
                raise ValueError(f"unknown routing parameterisation {self.parameterisation!r}; expected one of "
                                 f"{', '.join((*PARAMETERISATIONS, CUSTOM))}")
            named = _LABELS[self.parameterisation].routing
            earlier = EARLIER_PARAMETERISATIONS.get(self.parameterisation)
            if not matches(named) and earlier and matches(earlier.routing):
                object.__setattr__(self, "parameterisation", earlier.name)   # a config saved before the change
                return
            wrong = [f"{k} = {getattr(self, k)!r} (it sets {v!r})" for k, v in named.items() if getattr(self, k) != v]
            if wrong:
                raise ValueError(f"routing parameterisation {self.parameterisation!r} contradicts "
                                 f"{', '.join(wrong)}: drop the name (it is then derived from the fields) or "
                                 f"the fields")

    @classmethod
    def named(cls, name: str, **fields: Any) -> RoutingConfig:
        """A named parameterisation's routing (see PARAMETERISATIONS), with `fields` overriding any of its settings.

        `create_model(..., routing=RoutingConfig.named(NAME))` gives the initialisation that goes with the name
        too. A field the name sets, changed here, labels the routing 'custom' (the label never lies), and
        `create_model` then initialises as emcaps does: pass the name's initialisation as well,
        `create_model(..., routing=RoutingConfig.named(NAME, var_floor=...), **PARAMETERISATIONS[NAME].init)`,
        as a run config does for an override of a field its parameterisation sets."""
        if name not in PARAMETERISATIONS:
            raise ValueError(f"unknown routing parameterisation {name!r}; expected one of "
                             f"{', '.join(PARAMETERISATIONS)}")
        return PARAMETERISATIONS[name].config(**fields)

    def layer_cost_scale(self, parents: int, children: int, layer_ratio: float) -> float:
        """The factor on one layer's cost: `cost_scale`, times `layer_ratio` (parents / children over the
        whole layer) with `normalise_cost`, times `fan_in_cost_scale` * parents / children of one routing
        problem when that is set."""
        scale = self.cost_scale * (layer_ratio if self.normalise_cost else 1.0)
        if self.fan_in_cost_scale > 0:
            scale *= self.fan_in_cost_scale * parents / children
        return scale

    def class_layer(self, floor: float | None = None) -> RoutingConfig:
        """The config the class capsules route with: the inverse temperature times `class_lambda_scale`, and
        as the floor `floor` where given (the training loop's anneal, `class_floor_at`), else
        `class_var_floor` where set, else `var_floor`."""
        floor = floor or self.class_var_floor or self.var_floor
        if self.class_lambda_scale == 1.0 and floor == self.var_floor:
            return self
        return dataclasses.replace(self, final_lambda=self.final_lambda * self.class_lambda_scale,
                                   class_lambda_scale=1.0, var_floor=floor, class_var_floor=0.0,
                                   class_floor_start=0.0, parameterisation=CUSTOM)

    def class_floor_at(self, step: int, total_steps: int) -> float | None:
        """The class capsules' floor at training step `step` of `total_steps` while the anneal lasts; None
        after it (and without one): the class capsules' own floor."""
        if not self.class_floor_start:
            return None
        steps = self.class_floor_anneal * total_steps
        if self.class_floor_steps and self.class_floor_steps < steps:
            t = step / self.class_floor_steps
        else:
            t = step / total_steps / self.class_floor_anneal
        if t >= 1:
            return None
        end = self.class_var_floor or self.var_floor
        t = max(t, 0.0)
        return math.exp((1 - t) * math.log(self.class_floor_start) + t * math.log(end))

    @property
    def inverse_temperatures(self) -> list[float]:
        return inverse_temperatures(self.iterations, self.final_lambda, self.schedule)


@dataclass(frozen=True)
class Parameterisation:
    """A named way to parameterise EM routing, kept whole: the routing fields it sets and the initialisation of
    the capsule network that goes with it, so that naming it anywhere (a run config's `routing.parameterisation`,
    `RoutingConfig.named` passed to `create_model`) gives the same model.

    routing: RoutingConfig fields; every name sets every one of them, so switching names leaves nothing behind.
    init:    CapsNetConfig fields (the run config's `model.*`): transform stds, bias initialisation, offsets.
    """

    name: str
    about: str
    routing: dict[str, Any]
    init: dict[str, Any]

    def config(self, **fields: Any) -> RoutingConfig:
        """Its RoutingConfig, with `fields` overriding any of its settings."""
        return RoutingConfig(**{**self.routing, "parameterisation": "", **fields})


# How the activation follows from the cost, how sharp the E-step is, and how the M-step moves the centres.
_EMCAPS = {"activation": DEFAULT_ACTIVATION, "final_lambda": DEFAULT_FINAL_LAMBDA, "schedule": "authors",
           "estep_temperature": DEFAULT_ESTEP_TEMPERATURE, "var_floor": DEFAULT_VAR_FLOOR,
           "class_var_floor": 0.0, "class_floor_start": DEFAULT_CLASS_FLOOR_START, "class_floor_anneal": 0.5,
           "class_floor_steps": 0, "normalise_cost": False,
           "centre_damping": 0.0, "cost_scale": 1.0, "fan_in_cost_scale": 0.0, "class_lambda_scale": 1.0,
           "beta_u_scale": 1.0, "beta_a_scale": 1.0, "initial_assignments": "uniform",
           "detach_assignments": True}
# The paper, the authors' and IBM's code all differentiate through every E-step.
_PAPER_LOGIT = {**_EMCAPS, "activation": "paper", "final_lambda": 0.01, "schedule": "authors",
                "estep_temperature": 1.0, "detach_assignments": False, "var_floor": AUTHORS_VAR_FLOOR,
                "class_floor_start": 0.0}
_EMCAPS_INIT = {"conv_transform_std": 0.3, "class_transform_std": 0.3, "bias_init": "zeros",
                "primary_activation_offset": 0.0, "conv1_bias": 0.0}
PARAMETERISATIONS: dict[str, Parameterisation] = {p.name: p for p in (
    # emcaps' own (docs/research.md, "The default parameterisation"): the RoutingConfig defaults.
    Parameterisation("emcaps", "costs standardised over the parent types, softened E-step (the default)",
                     _EMCAPS, _EMCAPS_INIT),
    # The paper's formula as written, with the authors' inverse temperature 0.01 * (1 - 0.95**(i+1)).
    Parameterisation("paper", "the paper's activation formula and the authors' inverse temperatures",
                     _PAPER_LOGIT, _EMCAPS_INIT),
    # google-research capsule_em (em_layers.py): logit = lambda * (S * (-sum_h log var_h - sigma_b * D *
    # (ln 2pi + 1)) - 5000 act_b) = lambda * (beta_a - 2 (D beta_u + 0.5 sum_h log var_h) S) with
    # beta_u = sigma_b (ln 2pi + 1) / 2 and beta_a = -5000 act_b; class layer at lambda / 4; centres damped;
    # a capsule convolution's first assignments 1/C in every window (softmax of zeros per window).
    # Initialisation: conv caps 0.3, class caps 0.01, biases 0.5 / 0.5 and 2.0 / 1.0, sigmoid(x - 1), conv1 bias 0.1.
    Parameterisation("authors", "the authors' code (google-research capsule_em)",
                     {**_PAPER_LOGIT, "var_floor": AUTHORS_VAR_FLOOR, "cost_scale": 2.0, "centre_damping": 0.1,
                      "class_lambda_scale": 0.25, "beta_u_scale": (_LOG_2PI + 1) / 2, "beta_a_scale": -5000.0,
                      "initial_assignments": "per_window"},
                     {"conv_transform_std": 0.3, "class_transform_std": 0.01, "bias_init": "authors",
                      "primary_activation_offset": 1.0, "conv1_bias": 0.1}),
    # IBM/matrix-capsules-with-em-routing (Gritzman 2019): cost times 100 * J / I per layer, floor 1e-9; every
    # transform std 1.0, beta_a far negative.
    Parameterisation("ibm", "IBM's code (Gritzman 2019)",
                     {**_PAPER_LOGIT, "var_floor": 1e-9, "fan_in_cost_scale": 100.0},
                     {"conv_transform_std": 1.0, "class_transform_std": 1.0, "bias_init": "ibm",
                      "primary_activation_offset": 0.0, "conv1_bias": 0.0}),
)}


# Earlier definitions of a name, under the label their saved configs get when they load: a run saved as
# 'emcaps' before its floor changed is 'emcaps-0.1' (its fields are kept; only the label moves).
EARLIER_PARAMETERISATIONS: dict[str, Parameterisation] = {
    "emcaps": Parameterisation("emcaps-0.1", "emcaps' parameterisation before its floor fell to 1e-9",
                               {**_EMCAPS, "var_floor": AUTHORS_VAR_FLOOR, "class_floor_start": 0.0}, _EMCAPS_INIT),
}
_LABELS = {p.name: p for p in (*PARAMETERISATIONS.values(), *EARLIER_PARAMETERISATIONS.values())}


def parameterisation(label: str) -> Parameterisation | None:
    """The parameterisation a label names, a current or an earlier one; None for 'custom' and unknown labels."""
    return _LABELS.get(label)


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
