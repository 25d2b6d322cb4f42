"""--device parsing shared by train, downscale and evaluate."""

from __future__ import annotations

import pytest
import torch

from carbonsr_cli.devices import resolve_device
from carbonsr_cli.errors import UsageError


def test_auto_and_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type in ("cuda", "cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "tpu", "cuda:x"])
def test_unknown_device_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_transfers_round_trip(device: str) -> None:
    """to_device (page-locked, non-blocking on CUDA) and HostResult give back the same values."""
    import numpy as np

    from carbonsr_cli.devices import HostResult, to_device

    arr = np.arange(24, dtype=np.float64).reshape(2, 3, 4)[:, ::-1]  # not contiguous
    t = to_device(arr, torch.device(device))
    assert t.device.type == device and t.dtype == torch.float64
    back = HostResult(t * 2).numpy()
    np.testing.assert_array_equal(back, arr * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_side_stream_copies_are_seen_by_work_queued_after_them() -> None:
    """to_device copies on a side stream: work queued on the current stream after the call (even
    behind a long queue of kernels) sees the copied values, and buffers freed while the current
    stream still uses them are not overwritten by later copies."""
    import numpy as np

    from carbonsr_cli.devices import to_device

    dev = torch.device("cuda")
    big = torch.randn(4096, 4096, device=dev)
    for _ in range(20):  # a queue of work ahead of the copies
        big = (big @ big).clamp(-1, 1)
    sums = []
    for i in range(40):
        arr = np.full((256, 1024), float(i), dtype=np.float32)
        t = to_device(arr, dev)
        sums.append(t.double().sum())
        del t  # freed while the sum may still be queued
    expected = [float(i) * 256 * 1024 for i in range(40)]
    assert [float(s) for s in sums] == expected


def test_host_to_device_copies_run_on_the_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of the CUDA calls of ``to_device`` and ``copy_page_locked``, with the CUDA
    objects replaced (CI has no GPU): the copy is queued on the side stream, the event that
    frees a page-locked slot is recorded there after it, the current stream waits for the side
    stream, and the result is marked as used on the current stream."""
    import contextlib

    import numpy as np

    from carbonsr_cli import devices

    calls: list[tuple] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            calls.append(("wait", self.name, other.name))

    class Event:
        def record(self, stream: Stream) -> None:
            calls.append(("event", stream.name))

    class Result:
        def record_stream(self, stream: Stream) -> None:
            calls.append(("used on", stream.name))

    class Host:
        def __init__(self, pinned: bool = False) -> None:
            self.pinned = pinned

        def pin_memory(self) -> "Host":
            calls.append(("pin",))
            return Host(pinned=True)

        def to(self, device: str, non_blocking: bool) -> Result:
            calls.append(("copy", active[-1], self.pinned, non_blocking))
            return Result()

    active = ["current"]

    @contextlib.contextmanager
    def on(stream: Stream):  # type: ignore[no-untyped-def]
        active.append(stream.name)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream("current"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(devices, "_copy_stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch, "from_numpy", lambda array: Host())
    cuda = torch.device("cuda", 0)

    _, event = devices.copy_page_locked(np.zeros(4, np.float32), cuda)
    assert isinstance(event, Event)
    assert calls == [("copy", "side", False, True), ("event", "side"), ("wait", "current", "side"),
                     ("used on", "current")]
    calls.clear()
    devices.to_device(np.zeros(4, np.float32), cuda)
    assert calls == [("pin",), ("copy", "side", True, True), ("wait", "current", "side"), ("used on", "current")]
