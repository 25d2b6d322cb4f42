"""``uniform``: every block total spread evenly over its children."""

from __future__ import annotations

from typing import Any

import numpy as np

from carbonsr_cli.methods.base import Method, register


@register
class Uniform(Method):
    """Each child gets ``S / block**2``."""

    name = "uniform"
    summary = "spread each 1 km total evenly over its children"
    numpy_fill = True

    def fill(self, totals: Any, layers: Any, block: int) -> Any:
        from models.baselines import uniform_fill

        return uniform_fill(totals, block)

    def fill_array(self, totals: np.ndarray, layers: np.ndarray | None, block: int) -> np.ndarray:
        from models.host_baselines import uniform_children

        return uniform_children(totals, block)
