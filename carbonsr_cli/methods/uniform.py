"""``uniform``: every block total spread evenly over its children."""

from __future__ import annotations

from typing import Any

from carbonsr_cli.methods.base import Method, register


@register
class Uniform(Method):
    """Each child gets ``S / block**2``."""

    name = "uniform"
    summary = "spread each 1 km total evenly over its children"

    def fill(self, totals: Any, layers: Any, block: int) -> Any:
        from models.baselines import uniform_fill

        return uniform_fill(totals, block)
