"""Downscaling: 1 km totals -> 100 m children whose blocks sum to the totals.
``downscale()`` = plan (``plan``) -> row-band engine (``engine``, ``predict``, ``strips``; or ``distributed``) -> check of the written file (``check``)."""

from carbonsr_cli.downscale.api import downscale
from carbonsr_cli.downscale.options import DownscaleOptions
from carbonsr_cli.downscale.summary import DownscaleSummary

__all__ = ["DownscaleOptions", "DownscaleSummary", "downscale"]
