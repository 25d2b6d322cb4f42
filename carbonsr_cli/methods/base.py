"""The method interface, the parsed ``--method`` value and the registry."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from carbonsr_cli.errors import UsageError

__all__ = ["REGISTRY", "Method", "MethodSpec", "get_method", "needs_torch", "parse_method", "register"]


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``--method`` value.

    Attributes:
        kind: A registry name (``model``, ``fitted``, ``auto``, ``uniform``, ``dasymetric``,
            ``points``).
        layer: The aux layer after the colon (``dasymetric:LAYER``, ``points:SURFACE``), or None.
    """

    kind: str
    layer: str | None = None

    @property
    def label(self) -> str:
        """Text stored in the METHOD tag (``dasymetric:<layer>`` with the layer used)."""
        return f"{self.kind}:{self.layer}" if self.layer else self.kind

    @property
    def method(self) -> Method:
        """The registered :class:`Method`."""
        return REGISTRY[self.kind]


class Method(ABC):
    """One way of filling parent cells with children (a stateless strategy object).

    Baseline methods (``runs_model`` False) give children from the block totals and the raw
    aux layers they name (:meth:`layers`, :meth:`fill`), on the host in float64. Model methods
    (``runs_model`` True) run a network from a checkpoint through the tile engine.
    """

    #: Registry name (the ``--method`` word).
    name: ClassVar[str]
    #: One line for ``--help`` and tables.
    summary: ClassVar[str]
    #: Needs ``--model CKPT``.
    needs_checkpoint: ClassVar[bool] = False
    #: Runs a network through the tile engine.
    runs_model: ClassVar[bool] = False
    #: Reads aux layers.
    needs_aux: ClassVar[bool] = False
    #: Accepts ``NAME:LAYER``.
    takes_layer: ClassVar[bool] = False
    #: Has :meth:`fill_array` (numpy): a downscale run of it never imports torch.
    numpy_fill: ClassVar[bool] = False

    def layers(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> list[str]:
        """Raw aux layers (names, in order) that :meth:`fill` needs, given the user's layers.

        Raises:
            UsageError: a named layer is not among ``available``.
        """
        return []

    def resolve(self, spec: MethodSpec, available: Sequence[str], point_layers: Sequence[str]) -> MethodSpec:
        """The spec with its defaults filled in (e.g. the layer used), as written in tags."""
        return spec

    def fill(self, totals: Any, layers: Any, block: int) -> Any:
        """Children ``[..., h * block, w * block]`` (float64 tensor, >= 0, block sums = totals).

        Args:
            totals: Block totals ``[..., h, w]`` (float64 tensor; NaN = nodata).
            layers: Raw aux values ``[L, ..., h * block, w * block]`` of :meth:`layers` (or None).
            block: Block edge in child cells.
        """
        raise NotImplementedError(f"method {self.name!r} runs a model; it has no host fill")

    def fill_array(self, totals: np.ndarray, layers: np.ndarray | None, block: int) -> np.ndarray:
        """:meth:`fill` in numpy, bit for bit on the CPU (methods with :attr:`numpy_fill` only).

        Args:
            totals: Block totals ``[..., h, w]`` (float64; NaN = nodata).
            layers: Raw aux values ``[L, ..., h * block, w * block]`` of :meth:`layers` (any float
                dtype, NaN and negative values as read: cleaned here), or None.
            block: Block edge in child cells.

        Returns:
            ``[..., h * block, w * block]`` float64 children (NaN where the total is NaN).
        """
        raise NotImplementedError(f"method {self.name!r} has no numpy fill")

    def variants(self, available: Sequence[str], point_layers: Sequence[str]) -> list[MethodSpec]:
        """Every spec of this method that validation scores (e.g. one per aux layer)."""
        return [MethodSpec(self.name)]


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add an instance of ``cls`` to :data:`REGISTRY` under ``cls.name``."""
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(sorted(REGISTRY))}") from None


def needs_torch(method: str | None) -> bool:
    """Whether a downscale run with this ``--method`` text imports torch (False only for a method
    with a numpy fill; an unknown method counts as needing it: the run fails on it anyway)."""
    kind = (method or "").partition(":")[0].strip().lower()
    m = REGISTRY.get(kind)
    return m is None or not m.numpy_fill


def parse_method(method: str | None, checkpoint: Any) -> MethodSpec:
    """Parse ``--method``; ``None`` means ``model`` when a checkpoint is given.

    Raises:
        UsageError: unknown method, a method that needs a checkpoint without one, a checkpoint
            with a method that does not use it, a layer where none is taken.
    """
    if method is None or not str(method).strip():
        if checkpoint is None:
            raise UsageError("give a model with --model CKPT, or a baseline with --method uniform|dasymetric[:LAYER]")
        return MethodSpec("model")
    kind, _, layer = str(method).strip().partition(":")
    kind = kind.strip().lower()
    layer_name = layer.strip() or None
    if kind not in REGISTRY:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(sorted(REGISTRY))}")
    m = REGISTRY[kind]
    if layer_name and not m.takes_layer:
        raise UsageError(f"method {kind!r} takes no layer, got {method!r}")
    if m.needs_checkpoint and checkpoint is None:
        raise UsageError(f"--method {kind} needs a checkpoint: --model runs/<run>/best_model.pth")
    if not m.needs_checkpoint and checkpoint is not None:
        raise UsageError(f"--model is only used with --method model, fitted or auto (got --method {method})")
    return MethodSpec(kind, layer_name)
