"""emcaps: matrix capsule networks with EM routing."""

__version__ = "0.1.0"
