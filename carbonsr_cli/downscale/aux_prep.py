"""The aux stack of a model run prepared for the strip readers, in a background thread.

What the strip readers need before the first tile (vector indexes, source alignments, and with
reader processes the pre-warp of layers in another CRS onto the child grid: ~2-3 s at 1,000 km,
and the reader processes themselves: ~1-1.5 s of imports) depends on the plan only, not on the
model. ``downscale()`` starts :class:`AuxPreparation` while
:class:`~carbonsr_cli.downscale.model_job.ModelJob` imports torch and loads the model (runs
that read in processes, :func:`prepare_early`); otherwise the engine starts it when it opens the
strip feed.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carbonsr_cli.background import in_background
from carbonsr_cli.downscale import readers
from carbonsr_cli.downscale.plan import plan_stack

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.plan import Plan

__all__ = ["AuxPreparation", "prepare_aux", "prepare_early"]


def prepare_early(plan: Plan) -> bool:
    """Whether a model run should prepare its aux stack in the background: when it reads in
    processes (large rasters on machines with 6 or more cores, see
    :func:`~carbonsr_cli.downscale.readers.reader_config`). With fewer cores the preparation's
    Python work would slow the model's load (one interpreter lock) more than it hides."""
    return readers.reader_config(plan.child.width * plan.child.height)[1]


def prepare_aux(plan: Plan, work_dir: Path, warp: bool) -> tuple[Any, Path | None]:
    """The plan's aux stack, prepared, and with ``warp`` the folder of its pre-warped layers
    (a hidden folder of ``work_dir``, see :func:`~carbonsr_cli.downscale.readers.materialize_warps`;
    None when nothing needed a warp): reader processes read those instead of warping per strip.

    With ``warp`` the pre-warp runs in a thread of its own, on a copy of the stack (its own
    dataset handles), while this thread builds the vector indexes: the warp is GDAL's work
    (the interpreter lock released), the indexes are Python's, so the two overlap (one after
    the other they took ~1.4 + 2.6 s at 1,000 km on the GPU host, and the first tile row
    waited for both).
    """
    aux = plan_stack(plan)
    if not warp or not aux.warp_targets():
        aux.prepare()
        return aux, None
    warper = aux.copy()
    future, thread = in_background(readers.materialize_warps, warper, work_dir, name="carbonsr-prewarp")
    try:
        aux.prepare()
    except BaseException:
        thread.join()
        if future.exception() is None:
            readers.remove_dir(future.result())
        raise
    finally:
        thread.join()
        warper.close()
    return aux, future.result()


class AuxPreparation:
    """:func:`prepare_aux` in a background thread, and the reader processes (when the run reads
    in processes, :func:`~carbonsr_cli.downscale.readers.reader_config`) spawned at once;
    :meth:`result` hands them over."""

    def __init__(self, plan: Plan, work_dir: Path) -> None:
        self._taken = False
        n_procs, use_procs = readers.reader_config(plan.child.width * plan.child.height)
        self._pool: cf.ProcessPoolExecutor | None = readers.start_reader_pool(n_procs) if use_procs else None
        self._future, self._thread = in_background(prepare_aux, plan, work_dir, use_procs, name="carbonsr-prepare-aux")

    def result(self) -> tuple[Any, Path | None, cf.ProcessPoolExecutor | None]:
        """The prepared stack, the pre-warp folder and the reader processes (None: read in
        threads); the caller removes the folder and shuts the processes down from now on."""
        self._taken = True
        try:
            aux, folder = self._future.result()
        except BaseException:
            self._shut_pool()
            raise
        return aux, folder, self._pool

    def discard(self) -> None:
        """Wait for the thread; remove its pre-warp folder and stop the reader processes unless
        :meth:`result` handed them over."""
        self._thread.join()
        if not self._taken:
            self._shut_pool()
            if self._future.exception() is None:
                readers.remove_dir(self._future.result()[1])

    def _shut_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
