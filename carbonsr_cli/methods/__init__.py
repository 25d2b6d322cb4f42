"""Every way of filling a parent cell (uniform, dasymetric, points, fitted, model, auto) behind one
interface and registry; a new method is one module here plus its tests (``tests/methods``)."""

from carbonsr_cli.methods import auto, dasymetric, model, points, uniform  # noqa: F401  (register)
from carbonsr_cli.methods.base import REGISTRY, Method, MethodSpec, get_method, needs_torch, parse_method

__all__ = ["REGISTRY", "Method", "MethodSpec", "get_method", "needs_torch", "parse_method"]
