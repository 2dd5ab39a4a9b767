"""ConfigError and the value checks every config section shares.

It sits below everything else, so that a section defined next to the code it configures (emcaps.data.config)
checks its values the way the run config does, without importing the models.
"""

from __future__ import annotations

import argparse
import math
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value a user supplied is wrong."""


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")


def device_name(name: str) -> str:
    """A --device value (auto, cpu, cuda or cuda:N), checked while parsing: a typo is a usage error, not
    torch's traceback."""
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {name!r}")
