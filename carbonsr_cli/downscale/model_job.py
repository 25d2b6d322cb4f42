"""The model of a downscaling run, loaded in a background thread while the run is planned.

``import torch`` (1.5-5 s), the device's start-up and the checkpoint's model take seconds
that need none of the inputs. :class:`ModelJob` starts them in a thread as soon as the
checkpoint's plain data has been read without torch
(:func:`carbonsr_cli.checkpoint_peek.peek_checkpoint`), so that planning (the main raster, aux
discovery, coverage checks) and the aux layers' preparation run meanwhile;
:meth:`ModelJob.result` waits for it and raises what the load raised (``CheckpointError``,
``UsageError``), as the load on the main thread would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carbonsr_cli.background import in_background
from carbonsr_cli.checkpoint_peek import CheckpointPeek

__all__ = ["BACKGROUND_MIN_CPUS", "ModelInfo", "ModelJob", "load_in_background"]


#: CPUs from which the model loads in the background. On fewer, the planning thread and the
#: torch import only take turns at the interpreter lock (measured on 2 cores, 50 km, ``tiny``:
#: aux discovery 0.03 -> 0.27 s, ``import torch`` 1.0 -> 1.5 s, the command 4 % slower); on the
#: 16-core GPU host the overlap saves ~1.2 s of a 16 s command (issue 20, session 12).
BACKGROUND_MIN_CPUS = 6


def load_in_background() -> bool:
    """Whether this machine has the CPUs for :class:`ModelJob` to pay off."""
    from carbonsr_cli import cpus

    return cpus.available_cpus(respect_omp=False) >= BACKGROUND_MIN_CPUS


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs of a checkpoint's model (no weights, no torch).

    Attributes:
        factor: Child cells per parent cell along an axis.
        years_window: T, the years the model sees at once.
        max_years: The model configuration's largest T.
        downsample_factor: Tiles must be multiples of it (child cells, with ``factor``).
        aux_names: Aux layer names in the order of the model's channels.
        stats: The stats dict of its aux normalisation.
        path: The checkpoint file.
    """

    factor: int
    years_window: int
    max_years: int
    downsample_factor: int
    aux_names: list[str]
    stats: dict
    path: Path

    @classmethod
    def from_loaded(cls, loaded: Any) -> ModelInfo:
        """From a ``LoadedModel``."""
        return cls(int(loaded.factor), int(loaded.years_window), int(loaded.config.max_years),
                   int(loaded.config.downsample_factor), list(loaded.aux_names), dict(loaded.stats), loaded.path)

    @classmethod
    def of(cls, config: Any, ckpt: dict, path: Path) -> ModelInfo:
        """From a ``ModelConfig`` and the checkpoint dict (loaded or peeked at)."""
        return cls(int(ckpt["factor"]), int(ckpt["years_window"]), int(config.max_years),
                   int(config.downsample_factor), list(ckpt["aux_names"]), dict(ckpt["stats"]), path)


def _load(checkpoint: Path, peek: CheckpointPeek, device: str) -> tuple[Any, Any]:
    """``(torch.device, LoadedModel)`` of the checkpoint, from the bytes ``peek`` read."""
    from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
    from carbonsr_cli.devices import resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, data=peek.data)  # the bytes planning read
    return dev, load_model_for_inference(checkpoint, dev, checkpoint=ckpt)


class ModelJob:
    """The checkpoint's model loading onto ``device`` (``auto``, ``cpu``, ``cuda[:N]``) in a
    background thread, from the bytes ``peek`` read; :meth:`result` gives ``(device, LoadedModel)``."""

    def __init__(self, checkpoint: Path, peek: CheckpointPeek, device: str) -> None:
        self._future, _ = in_background(_load, checkpoint, peek, device, name="carbonsr-load-model")

    def result(self) -> tuple[Any, Any]:
        """``(torch.device, LoadedModel)``, once loaded; raises what the load raised."""
        return self._future.result()

