"""What one downscaling run did: :class:`DownscaleSummary` (the CLI's table and ``--json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from carbonsr_cli.conservation import ConservationCheck

__all__ = ["DownscaleSummary"]


@dataclass
class DownscaleSummary:
    """What :func:`downscale` did (printed as a table by the CLI, or as JSON).

    Attributes:
        output: Written file.
        method: Method label (``model``, ``uniform``, ``dasymetric:<layer>``).
        factor: Child cells per parent cell along an axis.
        years: Output band names (one band each).
        units: Unit of the written values.
        dtype: Output dtype.
        nodata: Output nodata value.
        device: Torch device used.
        precision: ``fp32``, ``bf16`` (a bfloat16 copy of the model, CUDA) or ``float64`` (baselines compute in float64).
        batch_size: Tiles per model batch.
        parent_shape: ``(rows, cols)`` of the processed parent window.
        child_shape: ``(rows, cols)`` of the output.
        parent_cells_valid: Non-nodata parent cells (all output bands).
        child_cells: Output cells per band.
        area_km2: Area of the processed extent (geodesic for geographic grids).
        tiles: Tile evaluations (tiles x years; x8 with uncertainty).
        seconds: Wall time of the pipeline (reading to closing the file; without the check).
        check_seconds: Wall time of the conservation check.
        km2_per_s: ``area_km2 * years / seconds``.
        aux_layers: Aux layer names in model order (model/dasymetric) or empty.
        model_sha256: SHA-256 of the checkpoint file, if any.
        uncertainty: Uncertainty output written, if any.
        conservation: Result of the check on the written file.
        notes: Non-fatal remarks (bf16 fallback, nodata choice, ...).
    """

    output: str
    method: str
    factor: int
    years: list[str]
    units: str
    dtype: str
    nodata: float
    device: str
    precision: str
    batch_size: int
    parent_shape: tuple[int, int]
    child_shape: tuple[int, int]
    parent_cells_valid: int
    child_cells: int
    area_km2: float
    tiles: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0
    km2_per_s: float = 0.0
    aux_layers: list[str] = field(default_factory=list)
    model_sha256: str | None = None
    uncertainty: str | None = None
    conservation: ConservationCheck = field(default_factory=ConservationCheck)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (NaN nodata as the string ``"nan"``)."""
        d = asdict(self)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            d["nodata"] = "nan"
        d["parent_shape"] = list(self.parent_shape)
        d["child_shape"] = list(self.child_shape)
        return d
