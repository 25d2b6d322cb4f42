"""``points[:SURFACE]``: listed point sources first, the remainder by a surface layer (ODIAC)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from carbonsr_cli.errors import UsageError
from carbonsr_cli.methods.base import Method, MethodSpec, register
from carbonsr_cli.methods.dasymetric import match_layer


def mass_layers(point_layers: Sequence[str]) -> list[str]:
    """Point layers that carry an emission attribute (``plants:co2_t_yr``; counts do not)."""
    return [n for n in point_layers if not n.endswith(":count")]


def listed_point_channels(names: Sequence[str], point_layers: Sequence[str]) -> list[int]:
    """Indices in ``names`` of the point layers that carry an emission attribute."""
    mass = set(mass_layers(point_layers))
    return [i for i, n in enumerate(names) if n in mass]


@register
class PointsFirst(Method):
    """In each block, the listed point mass (all point-attribute layers, summed) is placed at the
    points first, capped by the block total; the rest is shared by ``SURFACE`` (default: the
    first other layer)."""

    name = "points"
    summary = "place listed point sources (--aux plants.gpkg:co2_t_yr) first, the rest by one layer"
    needs_aux = True
    takes_layer = True

    def resolve(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> MethodSpec:
        mass = mass_layers(point_layers)
        if not mass:
            raise UsageError("--method points needs a point layer with an emission attribute (--aux plants.gpkg:co2_t_yr)")
        others = [n for n in available if n not in mass]
        if spec.layer:
            return MethodSpec(self.name, match_layer(spec.layer, available))
        if not others:
            raise UsageError("--method points needs a surface layer besides the point layers")
        return MethodSpec(self.name, others[0])

    def layers(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> list[str]:
        surface = self.resolve(spec, available, point_layers).layer
        return [surface, *mass_layers(point_layers)]  # type: ignore[list-item]

    def fill(self, totals: Any, layers: Any, block: int) -> Any:
        from models.baselines import point_first_fill

        return point_first_fill(totals, layers[1:].sum(dim=0), layers[0], block)

    def variants(self, available: Sequence[str], point_layers: Sequence[str]) -> list[MethodSpec]:
        mass = mass_layers(point_layers)
        return [MethodSpec(self.name, n) for n in available if n not in mass] if mass else []
