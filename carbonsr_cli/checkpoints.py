"""Checkpoint files: atomic save, safe load (``weights_only=True``), compatibility checks.

A carbonsr checkpoint is a ``.pth`` file written by :func:`torch.save` holding a dict
of tensors, numbers, strings, lists and dicts only, so that
``torch.load(path, weights_only=True, map_location="cpu")`` loads it without
unpickling any code. Keys (see docs/design.md, "Checkpoint format"):

``format`` (``"carbonsr-checkpoint"``), ``format_version`` (1), ``software_version``,
``model_config`` (``ModelConfig.to_dict()``), ``model_state`` (state_dict),
``aux_names`` (list of aux layer names; order matters), ``stats`` (the stats.json dict),
``factor`` (child cells per parent cell along an axis), ``years_window`` (T),
``train_config`` (dict), ``epoch``, ``step`` (steps done in ``epoch``), ``global_step``,
``optimizer_state``, ``scheduler_state``, ``scaler_state``, ``rng_state``,
``sampler_state``, ``split`` (dict), ``metric_history`` (list of dicts).

Only :func:`save_checkpoint` writes checkpoints; it writes a temporary file in the
target directory, fsyncs it and renames it over the destination, so a crash at any
point leaves either the old file or the new one, never a truncated file.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import os
import pickle
import random
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carbonsr_cli import __version__
from carbonsr_cli.background import in_background
from carbonsr_cli.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Value of the ``format`` key of every carbonsr checkpoint.
FORMAT = "carbonsr-checkpoint"
#: Current checkpoint format version; files with a newer version are refused.
FORMAT_VERSION = 1
#: Keys a checkpoint must hold to be usable for inference.
REQUIRED_KEYS = ("format", "format_version", "model_config", "model_state", "aux_names", "stats", "factor", "years_window")

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedModel",
    "capture_rng_state",
    "check_compatible",
    "file_sha256",
    "load_checkpoint",
    "load_model_for_inference",
    "prefetch_sha256",
    "restore_rng_state",
    "save_checkpoint",
    "to_plain",
]


@dataclass
class LoadedModel:
    """A model ready for inference, with what the downscaler needs to feed it.

    Attributes:
        model: ``DSTCarbonFormer`` in eval mode on the requested device.
        config: The ``ModelConfig`` it was built from.
        aux_names: Aux layer names in the order of the model's aux channels.
        stats: The stats.json dict used for normalisation in training.
        factor: Child cells per parent cell along an axis (10 for 1 km -> 100 m).
        years_window: T, the number of years the model sees at once.
        sha256: Hex digest of the checkpoint file (recorded in output tags).
        path: The checkpoint file.
    """

    model: Any
    config: Any
    aux_names: list[str]
    stats: dict
    factor: int
    years_window: int
    sha256: str
    path: Path


def to_plain(obj: Any) -> Any:
    """Convert ``obj`` to types that ``torch.load(weights_only=True)`` accepts.

    Paths become strings, tuples and sets become lists, numpy scalars/arrays become
    Python numbers/lists; tensors, numbers, strings, None, lists and dicts pass through.

    Raises:
        TypeError: For anything else (e.g. a module or a function).
    """
    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k) if isinstance(k, Path) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in obj]
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    ``format``, ``format_version`` and ``software_version`` are filled in when missing.
    The payload is converted with :func:`to_plain` first, so the file always loads with
    ``weights_only=True``. A crash or exception at any point leaves the previous file at
    ``path`` (if any) untouched, and no temporary file behind (except after a hard kill,
    where a ``.<name>.*.tmp`` file may remain; it is never read).

    Args:
        path: Destination ``.pth`` file; its directory must exist.
        payload: Checkpoint dict (keys in the module docstring).

    Raises:
        CheckpointError: The directory does not exist or cannot be written.
    """
    import torch

    dest = Path(path)
    data = dict(payload)
    data.setdefault("format", FORMAT)
    data.setdefault("format_version", FORMAT_VERSION)
    data.setdefault("software_version", __version__)
    data = to_plain(data)
    directory = dest.parent
    if not directory.is_dir():
        raise CheckpointError("directory does not exist", directory)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def load_checkpoint(path: str | os.PathLike[str], data: bytes | None = None) -> dict:
    """Load a carbonsr checkpoint safely (``weights_only=True``, on the CPU).

    Never unpickles code: a file holding pickled objects other than tensors and
    plain containers is refused.

    Args:
        path: A ``.pth`` file written by :func:`save_checkpoint`.
        data: The file's bytes when the caller has read them already
            (:func:`carbonsr_cli.checkpoint_peek.peek_checkpoint`); ``path`` then only names it.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: Missing file, unreadable or truncated file, a pickle with code,
            a plain state_dict or any other file that is not a carbonsr checkpoint, or a
            newer format version.
    """
    import torch

    p = Path(path)
    if data is None and not p.exists():
        raise CheckpointError("checkpoint not found", p)
    if data is None and p.is_dir():
        raise CheckpointError("is a directory, not a checkpoint file (for a run directory use `carbonsr resume`)", p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we refuse such files anyway
            obj = torch.load(p if data is None else io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"not a carbonsr checkpoint: refused to load it because it holds objects other than "
            f"tensors and plain data ({first[:160]})",
            p,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"not a readable checkpoint (truncated or not a torch file): {type(exc).__name__}", p) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " (it looks like a plain state_dict; carbonsr needs the full checkpoint written by `carbonsr train`)"
        raise CheckpointError(f"not a carbonsr checkpoint{hint}", p)
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version!r} is newer than this carbonsr understands ({FORMAT_VERSION}); "
            "upgrade carbonsr",
            p,
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"incomplete carbonsr checkpoint: missing {', '.join(missing)}", p)
    return obj


def _hash_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(path: str | os.PathLike[str]) -> tuple:
    """What tells a file's versions apart: resolved path, device, inode, size, mtime, ctime."""
    p = Path(path)
    st = p.stat()
    return (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_SHA_LOCK = threading.Lock()
#: Hashes started by :func:`prefetch_sha256`: resolved path -> (file identity, future); taken by
#: :func:`file_sha256`.
_SHA_STARTED: dict[str, tuple[tuple, cf.Future]] = {}


def prefetch_sha256(path: str | os.PathLike[str]) -> None:
    """Start hashing a file in a background thread (hashlib releases the GIL; the read also
    brings the file into the page cache for the ``torch.load`` that follows): the next
    :func:`file_sha256` of the unchanged file takes that result. Does nothing if the file
    cannot be read now (the load reports it)."""
    try:
        key = _identity(path)
    except OSError:
        return
    with _SHA_LOCK:
        if key[0] in _SHA_STARTED and _SHA_STARTED[key[0]][0] == key:
            return
        fut, _ = in_background(_hash_file, path, name="carbonsr-sha256")  # an error: file_sha256 hashes again and reports
        _SHA_STARTED[key[0]] = (key, fut)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (or the hash :func:`prefetch_sha256` started,
    when the file is unchanged since)."""
    try:
        key: tuple | None = _identity(path)
    except OSError:
        key = None
    with _SHA_LOCK:
        started = _SHA_STARTED.pop(key[0], None) if key is not None else None
    if started is not None and started[0] == key:
        with contextlib.suppress(Exception):
            digest = started[1].result()
            if _identity(path) == key:
                return digest
    return _hash_file(path)


def _load_weights(model: Any, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state, strict=True)``, taking the loaded tensors as they are
    (``assign=True``: no copy of every weight) when each one matches the model's tensor in
    dtype, shape and strides, so that the values and layouts are those of a copy; else copying."""
    import torch

    own = model.state_dict(keep_vars=True)
    same = own.keys() == state.keys() and all(
        isinstance(v, torch.Tensor) and isinstance(own[k], torch.Tensor) and v.dtype == own[k].dtype
        and v.shape == own[k].shape and v.stride() == own[k].stride() and v.device == own[k].device
        for k, v in state.items()
    )
    model.load_state_dict(state, strict=True, assign=same)


def load_model_for_inference(path: str | os.PathLike[str], device: "str | torch.device" = "cpu",
                             checkpoint: dict | None = None) -> LoadedModel:
    """Load a checkpoint and build its model in eval mode on ``device``.

    Args:
        path: Checkpoint file (any kind: best_model.pth, latest.pth, autosave...).
        device: Torch device (``"cpu"``, ``"cuda"``, ``torch.device``).
        checkpoint: ``load_checkpoint(path)`` when the caller has it already (not read again).

    Returns:
        A :class:`LoadedModel`.

    Raises:
        CheckpointError: The file is not a carbonsr checkpoint or its weights do not fit
            its model configuration.
    """
    import torch

    from models.config import ModelConfig
    from models.network import DSTCarbonFormer

    p = Path(path)
    ckpt = load_checkpoint(p) if checkpoint is None else checkpoint
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
        model = DSTCarbonFormer(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"model configuration in the checkpoint is not usable: {exc}", p) from None
    try:
        _load_weights(model, ckpt["model_state"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"weights do not match the model configuration: {first[:200]}", p) from None
    model.to(torch.device(device) if not isinstance(device, torch.device) else device)
    model.eval()
    return LoadedModel(
        model=model,
        config=config,
        aux_names=list(ckpt["aux_names"]),
        stats=dict(ckpt["stats"]),
        factor=int(ckpt["factor"]),
        years_window=int(ckpt["years_window"]),
        sha256=file_sha256(p),
        path=p,
    )


def _fmt_list(names: Sequence[str]) -> str:
    return "[" + ", ".join(str(n) for n in names) + "]"


def check_compatible(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    aux_names: Sequence[str] | None = None,
    model_config: Mapping[str, Any] | None = None,
    factor: int | None = None,
    years_window: int | None = None,
) -> None:
    """Refuse a checkpoint that does not match the current inputs or configuration.

    Every argument that is not None is compared with the checkpoint; all mismatches
    are listed in one message as ``expected (checkpoint) ... given ...``.

    Raises:
        CheckpointError: On any mismatch.
    """
    problems: list[str] = []
    if aux_names is not None:
        want = list(ckpt.get("aux_names", []))
        got = list(aux_names)
        if want != got:
            if sorted(want) == sorted(got):
                problems.append(f"aux layers are in a different order: checkpoint {_fmt_list(want)}, given {_fmt_list(got)}")
            else:
                miss = [n for n in want if n not in got]
                extra = [n for n in got if n not in want]
                detail = []
                if miss:
                    detail.append(f"missing {_fmt_list(miss)}")
                if extra:
                    detail.append(f"unexpected {_fmt_list(extra)}")
                problems.append(
                    f"aux layers differ: checkpoint expects {_fmt_list(want)}, given {_fmt_list(got)} ({'; '.join(detail)})"
                )
    if factor is not None and int(ckpt.get("factor", -1)) != int(factor):
        problems.append(f"factor: checkpoint {ckpt.get('factor')}, given {factor}")
    if years_window is not None and int(ckpt.get("years_window", -1)) != int(years_window):
        problems.append(f"years_window: checkpoint {ckpt.get('years_window')}, given {years_window}")
    if model_config is not None:
        have = dict(ckpt.get("model_config", {}))
        given = dict(to_plain(dict(model_config)))
        diffs = [
            f"{k}: checkpoint {have.get(k)!r}, given {given.get(k)!r}"
            for k in sorted(set(have) | set(given))
            if have.get(k) != given.get(k)
        ]
        if diffs:
            problems.append("model configuration differs (" + "; ".join(diffs) + ")")
    if problems:
        raise CheckpointError("checkpoint does not match this run: " + " | ".join(problems), path)


def capture_rng_state() -> dict:
    """Snapshot the torch (CPU and CUDA), numpy and Python RNG states as plain data."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (missing parts are skipped)."""
    import numpy as np
    import torch

    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32) if hasattr(s["keys"], "numpy") else np.asarray(s["keys"], np.uint32)
        np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "python" in state:
        s = state["python"]
        random.setstate((int(s["version"]), tuple(int(v) for v in s["internal"]), s["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda_states])
