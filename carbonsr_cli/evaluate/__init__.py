"""Evaluation of downscaled rasters: conservation (``carbonsr_cli.conservation``), comparison with a
reference (``compare``), scale-shift self-validation (``selfval``) and the figures (``plots``)."""

from carbonsr_cli.conservation import ConservationReport, check_conservation
from carbonsr_cli.evaluate.compare import METRICS, METRIC_LABELS, compare_to_reference
from carbonsr_cli.evaluate.selfval import SelfValidationResult, self_validate, split_cell_mask

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "ConservationReport",
    "SelfValidationResult",
    "check_conservation",
    "compare_to_reference",
    "self_validate",
    "split_cell_mask",
]
