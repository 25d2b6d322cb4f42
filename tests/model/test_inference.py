"""Tests for models.inference: the bf16 model copy and CUDA-graph replay (GPU part skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from models.config import preset
from models.inference import GraphedForward, low_precision_copy
from models.network import DSTCarbonFormer

C_AUX = 3


def _inputs(b: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(b, C_AUX, 1, 40, 40, generator=g)
    main = torch.rand(b, 1, 1, 40, 40, generator=g) * 8.0
    return aux.to(device), main.to(device)


@pytest.fixture(scope="module")
def tiny() -> DSTCarbonFormer:
    """The seed's water-filling network (raw = log1p children, float32 residual)."""
    torch.manual_seed(0)
    return DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill")).eval()


def test_low_precision_copy_keeps_the_dasymetric_prior_and_head_in_float32() -> None:
    torch.manual_seed(0)
    net = DSTCarbonFormer(preset("tiny", C_AUX)).eval()
    net.prior.basis.set_normalisation([True] * C_AUX, [1.2345] * C_AUX, [2.3456] * C_AUX, [0.0] * C_AUX, [0.777] * C_AUX)
    low = low_precision_copy(net)
    for name, p in low.named_parameters():
        want = torch.float32 if name.startswith(("prior.", "pointwise.", "sites.")) else torch.bfloat16
        assert p.dtype == want, name
    aux, main = _inputs(2)
    with torch.inference_mode():
        assert low(aux, main)[0].dtype == torch.float32
        torch.testing.assert_close(low.prior(aux), net.prior(aux), rtol=0, atol=0)  # no bf16 round trip


def test_low_precision_copy_leaves_the_model_and_keeps_the_residual_in_float32(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(2)
    low = low_precision_copy(tiny)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in low.parameters())
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    with torch.inference_mode():
        ref = tiny(aux, main)[0]
        out = low(aux, main)[0]
    assert out.dtype == torch.float32
    # main is up to 8 (log1p domain); a bf16 residual would be off by up to 8 * 2**-8 = 0.03.
    # The float32 residual leaves only the (small, near-identity) bf16 correction's error.
    assert float((out - ref).abs().max()) < 0.01
    assert float((out - ref).abs().max()) > 0.0  # it really ran in bf16


def test_graphed_forward_runs_cpu_tensors_eagerly(tiny: DSTCarbonFormer) -> None:
    calls = []

    def fn(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape[0])
        return tiny(a, m)[0]

    run = GraphedForward(fn)
    aux, main = _inputs(2)
    with torch.inference_mode():
        outs = [run(aux, main) for _ in range(3)]
        ref = tiny(aux, main)[0]
    assert calls == [2, 2, 2] and run.replays == 0 and run.error is None
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_forward_replays_equal_eager_on_cuda(tiny: DSTCarbonFormer) -> None:
    net = tiny.to("cuda")
    try:
        run = GraphedForward(lambda a, m: net(a, m)[0].float())
        with torch.inference_mode():
            batches = [_inputs(4, seed=s, device="cuda") for s in range(4)]
            outs = [run(a, m) for a, m in batches]  # eager, capture + replay, replay, replay
            tail = run(*_inputs(3, seed=9, device="cuda"))  # a partial batch: eager
            refs = [net(a, m)[0].float() for a, m in batches]
        assert run.error is None, run.error
        assert run.replays == 3
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert outs[1].data_ptr() != outs[2].data_ptr()  # results are copies, not the graph's buffer
        assert tail.shape[0] == 3
    finally:
        tiny.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dasymetric_model_is_captured_in_a_cuda_graph() -> None:
    """The prior's index tensors live on the device: capture must not fall back to eager."""
    import numpy as np

    torch.manual_seed(0)
    net = DSTCarbonFormer(preset("prior", C_AUX)).eval()
    coef = np.zeros(net.prior.basis.size)
    coef[::4] = 1.0
    net.prior.set_coefficients(coef, 0.1)
    net = low_precision_copy(net.to("cuda"))
    run = GraphedForward(lambda a, m: net(a, m)[0].float())
    with torch.inference_mode():
        batches = [_inputs(4, seed=s, device="cuda") for s in range(3)]
        outs = [run(a, m) for a, m in batches]
        refs = [net(a, m)[0].float() for a, m in batches]
    assert run.error is None, run.error
    assert run.replays == 2
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_while_another_thread_uses_the_gpu(tiny: DSTCarbonFormer) -> None:
    """The downscaling pipeline captures while its preparing thread uploads (pageable copies
    synchronise): the capture must neither fail nor break the other thread."""
    import threading

    net = tiny.to("cuda")
    stop = threading.Event()
    errors: list[BaseException] = []

    def uploads() -> None:
        try:
            host = torch.arange(4096, dtype=torch.float32)
            while not stop.is_set():
                (host.to("cuda") * 2).sum().item()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=uploads)
    worker.start()
    try:
        run = GraphedForward(lambda a, m: net(a, m)[0].float())
        with torch.inference_mode():
            batches = [_inputs(4, seed=s, device="cuda") for s in range(6)]
            outs = [run(a, m) for a, m in batches]
            refs = [net(a, m)[0].float() for a, m in batches]
    finally:
        stop.set()
        worker.join()
        tiny.to("cpu")
    assert not errors, errors
    assert run.error is None, run.error
    assert run.replays == 5
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
