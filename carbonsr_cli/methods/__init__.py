"""Every way of filling a parent cell (uniform, dasymetric, point-source aware, fitted, model,
auto) behind one interface, in one registry that downscaling and validation iterate over.

A new method is one module here that defines a :class:`~carbonsr_cli.methods.base.Method`
subclass and registers it; its tests iterate with the others (``tests/methods``).
"""

from carbonsr_cli.methods import auto, dasymetric, model, points, uniform  # noqa: F401  (register)
from carbonsr_cli.methods.base import REGISTRY, Method, MethodSpec, get_method, parse_method

__all__ = ["REGISTRY", "Method", "MethodSpec", "get_method", "parse_method"]
