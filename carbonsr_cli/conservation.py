"""Conservation reports: do the children of every parent cell sum to its total?

One module for every conservation check of the package: :class:`ConservationCheck` (the check of
a written ``carbonsr downscale`` output against its plan, ``ok`` a plain bool) and
:func:`check_conservation` / :class:`ConservationReport` (any child raster against any totals
raster: ``carbonsr evaluate --conservation``, the demo and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Block-sum tolerance (relative) of the conservation check.
CONSERVATION_RTOL = 1e-6



@dataclass
class ConservationCheck:
    """Conservation of the written output against the parent totals.

    Attributes:
        max_rel_error: Largest ``|sum(children) - S| / S`` over valid blocks with ``S > 0``.
        max_abs_error: Largest ``|sum(children) - S|`` (t CO2 / parent cell / yr).
        blocks: Valid parent cells checked (over all bands).
        zero_blocks_violated: Blocks with ``S == 0`` holding a nonzero child.
        negatives: Child cells < 0.
        nans: NaN/inf child cells inside valid blocks (not nodata).
        nodata_mismatch: Blocks where child nodata does not match parent nodata.
        ok: Every check passed (relative error <= 1e-6, all counts zero).
    """

    max_rel_error: float = 0.0
    max_abs_error: float = 0.0
    blocks: int = 0
    zero_blocks_violated: int = 0
    negatives: int = 0
    nans: int = 0
    nodata_mismatch: int = 0
    ok: bool = True

    def merge(self, other: ConservationCheck) -> None:
        """Add the counts and take the largest errors of ``other`` (a check of other rows)."""
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.blocks += other.blocks
        self.zero_blocks_violated += other.zero_blocks_violated
        self.negatives += other.negatives
        self.nans += other.nans
        self.nodata_mismatch += other.nodata_mismatch

    def finish(self) -> ConservationCheck:
        """Set :attr:`ok` from the other fields and return self."""
        self.ok = bool(
            self.max_rel_error <= CONSERVATION_RTOL
            and self.zero_blocks_violated == 0
            and self.negatives == 0
            and self.nans == 0
            and self.nodata_mismatch == 0
        )
        return self
