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
