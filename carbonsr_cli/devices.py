"""Torch device selection shared by training, downscaling and evaluation."""

from __future__ import annotations

import threading
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


def split_device_list(device: str | None) -> tuple[str, list[str]]:
    """``--device`` as ``(primary, extra devices)``, without importing torch.

    One name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) gives no extra devices. Several GPUs in
    one process are named as a comma-separated list of distinct ``cuda:N`` (``cuda:0,cuda:1``)
    or as ``cuda:all`` (every visible GPU; resolved by :func:`resolve_extra_devices`): the model
    then runs on each of them and the first one blends and water-fills.

    Raises:
        UsageError: a list with something other than distinct ``cuda:N`` names.
    """
    name = (device or "auto").strip().lower()
    if name == "cuda:all":
        return "cuda:0", ["all"]
    if "," not in name:
        return device or "auto", []
    parts = [p.strip() for p in name.split(",")]
    bad = [p for p in parts if not (p.startswith("cuda:") and p[5:].isdigit())]
    if bad:
        raise UsageError(f"--device {device!r}: a list of devices takes cuda:N names only (not {bad[0]!r}), "
                         "e.g. cuda:0,cuda:1, or cuda:all")
    if len(set(parts)) != len(parts):
        raise UsageError(f"--device {device!r} names a GPU twice")
    return parts[0], parts[1:]


def resolve_extra_devices(extra: list[str], primary: Any) -> list[Any]:
    """The extra devices of :func:`split_device_list` as ``torch.device`` objects (``["all"]``:
    every visible GPU other than ``primary``).

    Raises:
        UsageError: CUDA not available, or no such GPU.
    """
    import torch

    if extra == ["all"]:
        if primary.type != "cuda":
            raise UsageError("--device cuda:all needs CUDA; use --device cpu")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != primary.index]
    return [resolve_device(name) for name in extra]


_COPY_STREAMS: dict[Any, Any] = {}
_COPY_LOCK = threading.Lock()


def _copy_stream(device: Any) -> Any:
    """The side stream host-to-device copies of ``device`` run on (one per device, made once)."""
    import torch

    key = torch.device(device)
    with _COPY_LOCK:
        stream = _COPY_STREAMS.get(key)
        if stream is None:
            stream = _COPY_STREAMS[key] = torch.cuda.Stream(device=key)
    return stream


def to_device(array: Any, device: Any) -> Any:
    """A numpy array as a tensor on ``device``, without making the host wait for the GPU.

    CUDA copies from ordinary (pageable) host memory first wait for every kernel already
    queued on the stream, which stalls the thread that feeds the GPU; this copies the array into
    page-locked memory (PyTorch's caching host allocator) and transfers it with
    ``non_blocking=True`` on a side stream of its own, which the current stream then waits for
    (work queued after this call sees the values). On the side stream the copy does not queue
    behind the model's kernels, so it is done, and its page-locked buffer free for reuse, sooner.
    Measured at 1,000 km (session 15, 20 tile rows under the profiler): GPU busy 85 -> 92 %,
    host 0.696 -> 0.644 s; the page-locked allocations of the window went from 13 to 10 (most
    come from elsewhere). Elsewhere a plain ``.to``.
    """
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    if getattr(device, "type", str(device)) == "cuda":
        return _side_stream_copy(t.pin_memory(), device)[0]
    return t.to(device)


def _side_stream_copy(host: Any, device: Any, event: bool = False) -> tuple[Any, Any]:
    """Copy a page-locked host tensor to a CUDA ``device`` on its side stream, without waiting.

    The current stream waits for the copy (work queued after this call sees the values).
    Returns ``(tensor, event)``: ``event`` (when asked for) completes once ``host`` has been read.
    """
    import torch

    current = torch.cuda.current_stream(device)
    stream = _copy_stream(device)
    done = None
    with torch.cuda.stream(stream):  # allocated from the side stream's own memory pool
        out = host.to(device, non_blocking=True)
        if event:
            done = torch.cuda.Event()
            done.record(stream)
    current.wait_stream(stream)
    out.record_stream(current)  # used on the current stream: not reused before that work is done
    return out, done


def page_lock(address: int, size: int, device: Any = None) -> bool:
    """Page-lock ``size`` bytes of existing host memory at ``address`` for copies to ``device``.

    ``cudaHostRegister`` (``hipHostRegister`` on ROCm) lets copies from that memory run
    asynchronously without a staging copy. It runs in a thread of its own, with ``device``
    (default: the current one) as that thread's device: a failed CUDA runtime call leaves an
    error behind in its host thread, which the next kernel launch of that thread would report
    as its own. Returns False when the memory could not be locked (the caller then copies
    through page-locked staging memory); undo with :func:`page_unlock`.
    """
    import torch

    result: list[int] = []
    index = torch.cuda.current_device() if device is None else torch.device(device).index

    def register() -> None:
        try:
            if index is not None:
                torch.cuda.set_device(index)
            result.append(int(torch.cuda.cudart().cudaHostRegister(address, size, 0)))
        except Exception:  # no CUDA runtime bindings
            result.append(-1)

    worker = threading.Thread(target=register, name="carbonsr-page-lock")
    worker.start()
    worker.join()
    return result == [0]


def page_unlock(address: int) -> None:
    """Undo :func:`page_lock` (before the memory is unmapped); errors are ignored."""
    import contextlib

    import torch

    def unregister() -> None:
        with contextlib.suppress(Exception):
            torch.cuda.cudart().cudaHostUnregister(address)

    worker = threading.Thread(target=unregister, name="carbonsr-page-unlock")
    worker.start()
    worker.join()


def copy_page_locked(array: Any, device: Any) -> tuple[Any, Any]:
    """A numpy array in page-locked memory (see :func:`page_lock`) as a tensor on a CUDA ``device``.

    Like :func:`to_device` without the staging copy: the transfer reads ``array`` itself, on
    the side stream, after this returns. Returns ``(tensor, event)``: ``array`` must not be
    changed before ``event`` completes (``event.synchronize()``).
    """
    import torch

    return _side_stream_copy(torch.from_numpy(array), device, event=True)


class HostResult:
    """A device tensor on its way to host memory; :meth:`numpy` waits for the copy only.

    On CUDA the copy goes into page-locked memory with ``non_blocking=True`` and an event
    marks its end, so the thread that queued it can go on queuing GPU work while another
    thread (e.g. the writer) waits. Elsewhere the copy is made at once.

    Shapes:
        Any; :meth:`numpy` returns the same shape and dtype as the tensor.
    """

    def __init__(self, tensor: Any) -> None:
        import torch

        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().cpu()

    def numpy(self) -> Any:
        """The values as a numpy array (waits for the transfer)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()
