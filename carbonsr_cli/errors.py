"""Errors and warnings a user can cause, printed by the CLI as one line.

Domain code raises :class:`CarbonSRError` (or a subclass) with the offending
path; the CLI prints ``error: <path>: <problem>`` on stderr and exits with the
error's ``exit_code``:

- 1: a problem with a file or the data, whatever the command line says: an input is missing,
  unreadable or invalid, an output exists (without ``--overwrite``) or names an input, a
  conservation check failed;
- 2: the command line itself is wrong: unknown option, a missing or invalid option value,
  options that cannot be combined (click's own usage errors exit 2 as well);
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

from os import PathLike


class CarbonSRError(Exception):
    """A problem the user can fix; printed as one line without a traceback.

    Args:
        message: What is wrong, and where possible how to fix it.
        path: The file or directory concerned (printed before the message).
        exit_code: Process exit code (1 runtime/data problem, 2 usage problem).
    """

    exit_code: int = 1

    def __init__(self, message: str, path: str | PathLike[str] | None = None, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class UsageError(CarbonSRError):
    """Bad command-line usage: invalid option values, conflicting options (exit 2)."""

    exit_code = 2


class MissingInputError(CarbonSRError):
    """An input file, directory, glob or run the command needs does not exist (exit 1)."""


class InputDataError(CarbonSRError):
    """An input file exists but its content is unusable (not a GeoTIFF, no CRS, ...)."""


class OutputError(CarbonSRError):
    """The output cannot be written (exists without --overwrite, unwritable, disk full)."""


class CheckpointError(CarbonSRError):
    """A model checkpoint is missing, not a carbonsr checkpoint, or does not match the inputs."""


class ConservationError(CarbonSRError):
    """A result breaks the physics contract (block sums, negatives, NaN)."""


class CarbonSRWarning(UserWarning):
    """Base class of carbonsr's non-fatal warnings."""


class GeographicCRSWarning(CarbonSRWarning):
    """The parent grid is geographic: cell areas vary with latitude; "100 m" is nominal."""


class NoNodataWarning(CarbonSRWarning):
    """An input raster has no nodata value set."""


class AuxFillWarning(CarbonSRWarning):
    """Auxiliary data had nodata or did not cover the extent and was filled."""
