"""``dasymetric[:LAYER]``: block totals shared in proportion to one aux layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from carbonsr_cli.errors import UsageError
from carbonsr_cli.methods.base import Method, MethodSpec, register

__all__ = ["Dasymetric", "match_layer"]


def match_layer(name: str, available: Sequence[str]) -> str:
    """The layer ``name`` names: an exact name, or the one layer whose name starts with ``name:``
    (``roads`` for ``roads:length``) or whose file stem is ``name``.

    Raises:
        UsageError: no layer, or several, match.
    """
    if name in available:
        return name
    hits = [n for n in available if n.startswith(f"{name}:") and n.count(":") == name.count(":") + 1]
    if len(hits) > 1:  # prefer the total of a family (``roads:length`` over ``roads:length:motorway``)
        short = min(hits, key=len)
        if all(h == short or h.startswith(f"{short}:") for h in hits):
            hits = [short]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UsageError(f"layer {name!r} is ambiguous: {', '.join(hits)}")
    raise UsageError(f"layer {name!r} not among the aux layers: {', '.join(available)}")


@register
class Dasymetric(Method):
    """Children ``S * v / sum_block(v)`` for one raw aux layer ``v`` (uniform where ``v`` sums to 0)."""

    name = "dasymetric"
    summary = "share each 1 km total in proportion to one aux layer (default: the first)"
    needs_aux = True
    takes_layer = True
    numpy_fill = True

    def resolve(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> MethodSpec:
        if not available:
            raise UsageError("--method dasymetric needs aux layers (--aux aux/*.tif)")
        return MethodSpec(self.name, match_layer(spec.layer, available) if spec.layer else available[0])

    def layers(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> list[str]:
        return [self.resolve(spec, available, point_layers).layer]  # type: ignore[list-item]

    def fill(self, totals: Any, layers: Any, block: int) -> Any:
        from models.baselines import dasymetric_fill

        return dasymetric_fill(totals, layers[0], block)

    def fill_array(self, totals: np.ndarray, layers: np.ndarray | None, block: int) -> np.ndarray:
        from models.host_baselines import dasymetric_children

        assert layers is not None
        return dasymetric_children(totals, layers[0], block)

    def variants(self, available: Sequence[str], point_layers: Sequence[str]) -> list[MethodSpec]:
        return [MethodSpec(self.name, n) for n in available]
