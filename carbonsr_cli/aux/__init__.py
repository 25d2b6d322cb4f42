"""Aux layers (lights, population, land cover, roads, plants, ...) aligned onto the child grid:
discovery, one reader per source kind, coverage, warp and the stack that reads any window of them."""

from carbonsr_cli.aux.discovery import categorical_kinds, discover_aux, expand_aux_paths
from carbonsr_cli.aux.sources import (
    AUX_EXTENSIONS,
    AuxEntry,
    AuxSource,
    LayerCoverage,
    MAX_CLASSES,
    layer_names,
    split_year,
)
from carbonsr_cli.aux.stack import AuxStack

__all__ = [
    "AUX_EXTENSIONS",
    "MAX_CLASSES",
    "AuxEntry",
    "AuxSource",
    "AuxStack",
    "LayerCoverage",
    "categorical_kinds",
    "discover_aux",
    "expand_aux_paths",
    "layer_names",
    "split_year",
]
