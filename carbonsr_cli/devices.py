"""Torch device selection shared by training, downscaling and evaluation."""

from __future__ import annotations

from typing import Any

from carbonsr_cli.errors import UsageError


def resolve_device(device: str | None) -> Any:
    """Turn ``--device`` into a ``torch.device``.

    Args:
        device: ``auto`` (CUDA/ROCm if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``torch.device``.

    Raises:
        UsageError: unknown name, CUDA requested but not available, or no such CUDA index.
    """
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev
