"""Inference helpers: a low-precision copy of a model and CUDA-graph replay of its forward.

Both are plain PyTorch (``torch.cuda.CUDAGraph`` also exists on ROCm as HIP graphs). On CPU
neither is used: :class:`GraphedForward` only captures CUDA tensors and falls back to eager
calls for anything else, or when capturing fails.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GraphedForward", "low_precision_copy"]


def low_precision_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An eval-mode copy of ``model`` with parameters and buffers in ``dtype``.

    Unlike autocast, no weight or activation is cast on every call (autocast runs GroupNorm in
    float32, so each norm converts its input and output). ``DSTCarbonFormer`` casts its inputs
    to the weights' dtype and adds the float32 ``main`` to the float32 head output, so the
    residual keeps float32 precision. The original model is not changed.
    """
    low = copy.deepcopy(model).to(dtype).eval()
    for name in ("prior", "pointwise", "sites"):  # the dasymetric prior, head and sites stay float32 (few flops),
        part = getattr(model, name, None)  # copied from the original: a round trip through bf16
        if isinstance(part, nn.Module):  # would round its normalisation constants
            setattr(low, name, copy.deepcopy(part).float().eval())
    for p in low.parameters():
        p.requires_grad_(False)
    return low


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


class GraphedForward:
    """Call ``fn(*tensors) -> Tensor`` through one captured CUDA graph per input signature.

    A fixed-shape forward pass launches hundreds of small kernels; replaying a graph launches
    them in one call, so the GPU no longer waits for the Python thread (which the downscaling
    pipeline shares with its reader and writer threads).

    The first call with a new signature (shapes, dtypes, device) runs eagerly; the second
    captures the graph (after a warm-up on a side stream; capture errors are checked for this
    thread only, so other threads may use the GPU meanwhile) and every later call copies its
    inputs into the graph's static inputs and replays it. Signatures seen once (a partial last
    batch) therefore never pay for a capture. The result is a copy of the graph's output buffer,
    so it stays valid after the next call.

    Args:
        fn: The function to capture; must only launch CUDA work on tensors (no host syncs,
            no data-dependent shapes).
        max_graphs: Signatures captured at most; others run eagerly.

    Attributes:
        error: The message of a failed capture (then every call runs eagerly), else None.
        replays: Number of calls served by a graph.
    """

    def __init__(self, fn: Callable[..., Tensor], max_graphs: int = 2) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.error: str | None = None
        self.replays = 0
        self._graphs: dict[tuple, _Captured] = {}
        self._seen: set[tuple] = set()

    @staticmethod
    def _signature(xs: tuple[Tensor, ...]) -> tuple:
        return tuple((tuple(x.shape), x.dtype, str(x.device)) for x in xs)

    def __call__(self, *xs: Tensor) -> Tensor:
        """``fn(*xs)``, replayed from a graph when this signature was seen before."""
        key = self._signature(xs)
        cap = self._graphs.get(key)
        if cap is None:
            eager = (
                self.error is not None
                or not all(x.is_cuda for x in xs)
                or key not in self._seen
                or len(self._graphs) >= self.max_graphs
            )
            if eager:
                self._seen.add(key)
                return self.fn(*xs)
            try:
                cap = self._capture(xs)
            except Exception as exc:  # any capture problem: stay correct, run eagerly
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                torch.cuda.synchronize()
                return self.fn(*xs)
            self._graphs[key] = cap
        for static, x in zip(cap.inputs, xs):
            static.copy_(x, non_blocking=True)
        cap.graph.replay()
        self.replays += 1
        return cap.output.clone()

    def _capture(self, xs: tuple[Tensor, ...]) -> _Captured:
        static = tuple(x.clone() for x in xs)
        side = torch.cuda.Stream(device=xs[0].device)
        side.wait_stream(torch.cuda.current_stream(xs[0].device))
        with torch.cuda.stream(side):  # warm-up: lazy handles and workspaces outside the capture
            for _ in range(2):
                self.fn(*static)
        torch.cuda.current_stream(xs[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the downscaling pipeline's reader and writer) may keep
        # uploading and synchronising on their own streams while this thread captures; the
        # default "global" mode would make their calls fail during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(*static)
        return _Captured(graph, static, out)
