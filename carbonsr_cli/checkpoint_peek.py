"""A checkpoint's plain data (configurations, aux names, statistics) read without torch.

``carbonsr downscale`` needs the model's factor, temporal window, aux layer names and
statistics to plan a run (open and check the inputs, warp aux layers) while ``import torch``
(1.5-5 s) still runs in a background thread. :func:`peek_checkpoint` reads the ``data.pkl``
record of a ``torch.save`` zip with a restricted unpickler: plain builtins and ``OrderedDict``
are built, every torch object (tensors, storages, dtypes) becomes a :class:`TorchPlaceholder`,
and any other global refuses the file. A file it cannot read this way gives None; the caller
then loads it the usual way (``torch.load(weights_only=True)``, which reports the problem).
Nothing read here is trusted on its own: the caller loads the same bytes with torch afterwards.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointPeek", "TorchPlaceholder", "peek_checkpoint"]

#: Builtins a checkpoint's pickle may name (containers and scalars; the same spirit as
#: torch's ``weights_only`` allow-list).
_SAFE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                            "bytes", "bytearray", "bool", "slice"})


class TorchPlaceholder:
    """Stands for a torch object (tensor, storage, dtype, size) of a peeked checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _placeholder(*args: Any, **kwargs: Any) -> TorchPlaceholder:
    return TorchPlaceholder()


class _PeekUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _placeholder
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not plain data")

    def persistent_load(self, pid: Any) -> Any:  # tensor storages: not read
        return TorchPlaceholder()


@dataclass(frozen=True)
class CheckpointPeek:
    """The plain data of a checkpoint and the bytes it was read from.

    Attributes:
        meta: The checkpoint dict, tensors replaced by :class:`TorchPlaceholder`.
        data: The file's bytes (for ``torch.load`` of exactly what was peeked at).
    """

    meta: dict
    data: bytes


def peek_checkpoint(path: str | os.PathLike[str], fmt: str, required: tuple[str, ...]) -> CheckpointPeek | None:
    """The plain data of a carbonsr checkpoint, or None when it cannot be read without torch.

    Args:
        path: A ``.pth`` file.
        fmt: The value of the ``format`` key a checkpoint must hold.
        required: Keys it must hold.

    Returns:
        None for anything but a readable ``torch.save`` zip whose dict has ``format == fmt``
        and every key of ``required`` (the caller's torch load then names the problem).
    """
    try:
        data = Path(path).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                return None
            meta = _PeekUnpickler(io.BytesIO(zf.read(names[0]))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, MemoryError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != fmt or any(k not in meta for k in required):
        return None
    return CheckpointPeek(meta, data)
