"""emcaps: matrix capsule networks with EM routing (Hinton, Sabour, Frosst, ICLR 2018).

    import emcaps
    model = emcaps.create_model("small")                 # emcaps.list_models() names the others
    scores = model(images)                               # (N, 1, 32, 32) -> class activations (N, 5)
    loss = emcaps.spread_loss(scores, labels, margin=0.2)

The routing itself is `emcaps.em_routing(votes (N, I, J, D), activations (N, I), beta_u, beta_a)`; its
mathematics is a `RoutingConfig`, and how it runs on a device (backend, chunks) a `Runtime`.
"""

from emcaps.capsules import Capsules
from emcaps.layers import ClassCaps, ConvCaps, PrimaryCaps
from emcaps.losses import cross_entropy, margin_loss, spread_loss
from emcaps.models import BaselineCNN, CapsNetConfig, MatrixCapsNet, create_model, list_models, register_model
from emcaps.routing import PARAMETERISATIONS, RoutingConfig, Runtime, em_routing

__version__ = "0.2.0"

__all__ = [
    "BaselineCNN", "CapsNetConfig", "Capsules", "ClassCaps", "ConvCaps", "MatrixCapsNet", "PARAMETERISATIONS",
    "PrimaryCaps", "RoutingConfig", "Runtime", "__version__", "create_model", "cross_entropy",
    "em_routing", "list_models", "margin_loss", "register_model", "spread_loss",
]
