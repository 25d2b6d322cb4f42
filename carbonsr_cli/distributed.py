"""Multi-process execution under ``torchrun``: process group, rank roles, collectives.

``carbonsr train`` and ``carbonsr downscale`` run unchanged in one process; started by
``torchrun --nproc-per-node N`` (or multi-node torchrun) they split the work:

- **Training** (:mod:`carbonsr_cli.train.loop`): every rank draws the same deterministic
  global batch of ``(epoch, step)`` and keeps its contiguous share (:meth:`DistContext.shard_spec`);
  the model is wrapped in ``DistributedDataParallel``; the loss is rescaled so that the
  averaged gradient equals the gradient of the single-process loss on the whole global batch
  (:class:`ShardedLoss`); checkpoints, logs, metrics.csv and plots come from rank 0 only.
- **Downscaling** (:mod:`carbonsr_cli.downscale.distributed`): ranks split the rows of tiles.

The context is built from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Without them (a plain ``carbonsr`` call) it is a no-op
single-process context: every helper returns its input and nothing is initialised.

Backends: gloo for CPU tensors and objects, plus NCCL for CUDA tensors when CUDA is used
(``"cpu:gloo,cuda:nccl"``). Before the process group starts, ``NCCL_NVLS_ENABLE=0`` and
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set (unless already set): NVLink multicast must
stay off on the GPU machines this project runs on (they require it).

Every collective goes through :meth:`DistContext.all_reduce_sum` (objects are pickled into
byte tensors), which on the CPU returns only once gloo's worker thread has let go of the
tensor (:func:`_wait_released`). Otherwise the worker may drop the last reference to a tensor
that Python already dropped; freeing its Python object then needs the GIL, and if the process
is exiting at that moment, Python ends the thread inside a C++ destructor: ``terminate called
without an active exception`` (SIGABRT) after a run that had finished.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from carbonsr_cli.errors import CarbonSRError, UsageError
from carbonsr_cli import console

__all__ = [
    "DistContext",
    "DistributedAbort",
    "ShardedLoss",
    "context",
    "get_context",
    "halt_agreement_due",
    "in_torchrun",
    "share_bounds",
]

T = TypeVar("T")

log = logging.getLogger("carbonsr.distributed")

#: Environment set before ``init_process_group`` (NVLink multicast off; required by the GPU machines).
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
#: Longest wait (s) for gloo's worker thread to drop a finished collective's tensor (it takes
#: microseconds; the bound only keeps a broken backend from hanging the run).
RELEASE_TIMEOUT_S = 30.0


class DistributedAbort(CarbonSRError):
    """Another rank failed; this rank stops too (the failing rank reports the cause)."""


def in_torchrun() -> bool:
    """True when started by torchrun with more than one process (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share ``[a, b)`` of ``n`` items for ``rank`` of ``world``.

    The first ``n % world`` ranks get one item more; the shares of ranks ``0..world-1``
    concatenate to ``0..n-1`` in order.
    """
    q, r = divmod(n, world)
    a = rank * q + min(rank, r)
    return a, a + q + (1 if rank < r else 0)


@dataclass
class DistContext:
    """Rank, world size and collectives of this process (single process: all no-ops).

    Attributes:
        rank: Global rank (0 = main).
        world_size: Number of processes.
        local_rank: Rank on this node (selects ``cuda:<local_rank>``).
        active: True when a process group is running (``world_size > 1``).
        cuda: True when the process group has an NCCL backend for CUDA tensors.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    cuda: bool = False
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes run files and outputs)."""
        return self.rank == 0

    # ------------------------------------------------------------------ devices
    def device(self, dev: Any) -> Any:
        """Map a resolved torch device to this rank's: ``cuda`` -> ``cuda:<local_rank>``."""
        import torch

        if not self.active or dev.type != "cuda":
            return dev
        d = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(d)
        return d

    def rank_name(self, name: str) -> str:
        """``name`` on rank 0, ``name_rank<k>`` on the others (per-rank scratch files)."""
        return name if self.is_main else f"{name}_rank{self.rank}"

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum a tensor over ranks in place and return it (no-op in one process).

        A CPU tensor (gloo) is returned only once the backend holds no reference to it any
        more (see the module docstring); CUDA tensors (NCCL) return at once, as before: NCCL's
        watchdog thread, which holds them, is joined by :meth:`cleanup`.
        """
        if self.active:
            import torch.distributed as dist

            refs = _use_count(tensor)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if tensor.device.type == "cpu":
                _wait_released(tensor, refs)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum a list of floats over ranks (float64, on the CPU through gloo)."""
        if not self.active:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_sum(t)
        return [float(v) for v in t]

    def mean_float(self, value: float) -> float:
        """Mean of a float over ranks."""
        if not self.active:
            return value
        return self.sum_floats([value])[0] / self.world_size

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank."""
        if not self.active:
            return bool(flag)
        return self.sum_floats([1.0 if flag else 0.0])[0] > 0

    def agree_halt(self, halt: str | None) -> str | None:
        """One stop decision for every rank: ``interrupted`` > ``max_steps`` > ``max_time``.

        ``max_time`` and Ctrl-C are seen at different steps on different ranks; this makes
        all ranks stop together after the same step. Every rank must call it at the same
        steps (see :func:`halt_agreement_due`).
        """
        if not self.active:
            return halt
        reasons = ("interrupted", "max_steps", "max_time")
        votes = self.sum_floats([1.0 if halt == r else 0.0 for r in reasons])
        for reason, v in zip(reasons, votes):
            if v > 0:
                return reason
        return halt

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        data = pickle.dumps(obj) if self.is_main else b""
        got = self._gather_bytes(data)[0]
        return obj if self.is_main else pickle.loads(got)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        return [pickle.loads(b) for b in self._gather_bytes(pickle.dumps(obj))]

    def _gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order: two sums of byte tensors in which each rank
        fills its own row (so that every collective goes through :meth:`all_reduce_sum`)."""
        import torch

        sizes = torch.zeros(self.world_size, dtype=torch.int64)
        sizes[self.rank] = len(data)
        lengths = [int(n) for n in self.all_reduce_sum(sizes)]
        rows = torch.zeros((self.world_size, max(lengths)), dtype=torch.uint8)
        if data:
            rows[self.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        table = self.all_reduce_sum(rows).numpy()
        return [table[k, :n].tobytes() for k, n in enumerate(lengths)]

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        An exception on rank 0 is re-raised there; the other ranks raise
        :class:`DistributedAbort` (so no rank waits forever).
        """
        if not self.active:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after telling the others
                error = exc
        status = self.broadcast(("ok", result) if error is None else ("error", f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if status[0] != "ok":
            raise DistributedAbort(f"rank 0 failed: {status[1]}")
        return status[1]

    def check_all(self, error: BaseException | None) -> None:
        """Collective error check: re-raise ``error`` here, or abort if another rank failed."""
        if not self.active:
            if error is not None:
                raise error
            return
        msgs = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        bad = [(k, m) for k, m in enumerate(msgs) if m is not None]
        if bad:
            k, m = bad[0]
            raise DistributedAbort(f"rank {k} failed: {m}")

    # ------------------------------------------------------------------ training
    def shard_spec(self, spec: Any) -> Any:
        """This rank's contiguous share of a ``BatchSpec`` (the global batch of one step).

        Raises:
            UsageError: the global batch has fewer patches than there are ranks.
        """
        if not self.active:
            return spec
        import dataclasses

        n = len(spec.rows)
        if n < self.world_size:
            raise UsageError(f"--batch-size {n} is smaller than the number of processes ({self.world_size}); every rank needs a patch")
        a, b = share_bounds(n, self.rank, self.world_size)
        return dataclasses.replace(
            spec, rows=spec.rows[a:b], cols=spec.cols[a:b], year0=spec.year0[a:b], rot=spec.rot[a:b], flip=spec.flip[a:b]
        )

    def wrap_model(self, model: Any, find_unused_parameters: bool = False) -> Any:
        """``DistributedDataParallel`` around ``model`` (the model itself in one process).

        The wrapper forwards unknown attributes (``config``, ``aux_loss``) to the model, so
        the training step can use it in place of the model.
        """
        if not self.active:
            return model
        return _DDP(
            model,
            device_ids=[self.local_rank] if next(model.parameters()).is_cuda else None,
            find_unused_parameters=find_unused_parameters,
            # Gradients are written straight into the all-reduce buckets (no copy per step for
            # every gradient whose strides match its bucket's: on CUDA the convolution weights
            # are channels-last for that, ``train.step.match_conv_layout``).
            gradient_as_bucket_view=True,
        )

    def shard_loss(self, loss_fn: Any) -> Any:
        """:class:`ShardedLoss` around a ``DualLayerWeightedLoss`` (the loss itself in one process)."""
        return ShardedLoss(loss_fn, self) if self.active else loss_fn

    # ------------------------------------------------------------------ lifetime
    def cleanup(self) -> None:
        """Destroy the process group this context started (safe to call twice)."""
        global _CONTEXT
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
            self.active = False
        if _CONTEXT is self:
            _CONTEXT = None


def _use_count(tensor: Any) -> int:
    """References to ``tensor``'s C++ object (0 where torch does not tell)."""
    count = getattr(tensor, "_use_count", None)
    return int(count()) if count is not None else 0


def _wait_released(tensor: Any, refs: int) -> None:
    """Wait until ``tensor`` has no more than ``refs`` references: gloo's worker thread has
    dropped the finished collective that held it.

    ``dist.all_reduce`` returns when the work is done, but the worker thread drops its copy
    of the work a moment later. A tensor whose Python object dies first keeps that object
    alive from C++, and the worker then frees it, which takes the GIL; at interpreter exit
    that is fatal (the thread is ended inside a ``noexcept`` destructor: SIGABRT).
    """
    if refs <= 0:
        return
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    pause = 1e-5
    while _use_count(tensor) > refs:
        if time.monotonic() > deadline:
            log.warning("the process group still holds a tensor %.0f s after its collective ended", RELEASE_TIMEOUT_S)
            return
        time.sleep(pause)  # a sleep, not a spin: the worker may need this core
        pause = min(2 * pause, 1e-3)


def _ddp_class() -> type:
    from torch.nn.parallel import DistributedDataParallel

    class DDPWithAttributes(DistributedDataParallel):  # type: ignore[misc]
        """DDP whose unknown attributes come from the wrapped module (``config``, ``aux_loss``)."""

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return DDPWithAttributes


def _DDP(model: Any, **kwargs: Any) -> Any:  # noqa: N802 - constructor-like
    return _ddp_class()(model, **kwargs)


class ShardedLoss:
    """Rank share of ``DualLayerWeightedLoss`` whose DDP-averaged gradient is the global one.

    The loss is a weighted mean ``sum(w * rho) / sum(w)`` over the valid pixels of the whole
    batch. A rank holds part of the batch: with its local ``S_r = sum(w * rho)`` and the
    weight sum ``W = sum_r W_r`` over all ranks (an all-reduce of one number per step), this
    returns ``world * S_r / W``; DDP averages gradients over ranks, giving
    ``d/dtheta (sum_r S_r / W)``: exactly the single-process loss on the global batch (up to
    float rounding). Requires per-pixel weights that do not depend on the batch
    (``mean_log`` set, as it is when the run has statistics); with ``mean_log=None`` the
    per-batch reference value is per rank.

    The value returned is rank-local; :meth:`DistContext.mean_float` of it over ranks is the
    global loss.
    """

    def __init__(self, loss_fn: Any, ctx: DistContext) -> None:
        self.loss_fn = loss_fn
        self.ctx = ctx

    def __call__(self, pred_log: Any, target_log: Any, mask: Any = None) -> Any:
        """Scaled rank-local loss (scalar tensor); arguments as ``DualLayerWeightedLoss``."""
        import torch

        local = self.loss_fn(pred_log, target_log, mask)
        with torch.no_grad():
            valid = torch.isfinite(target_log)
            if mask is not None:
                valid = valid & mask.to(torch.bool).expand_as(target_log)
            w = self.loss_fn.weights(target_log, valid)
            w = torch.where(valid, w, torch.zeros_like(w))
            dt = torch.promote_types(torch.promote_types(pred_log.dtype, target_log.dtype), w.dtype)
            w_local = w.to(dt).sum()
            w_total = self.ctx.all_reduce_sum(w_local.clone())
            tiny = torch.finfo(dt).tiny
            scale = w_local.clamp(min=tiny) / w_total.clamp(min=tiny) * self.ctx.world_size
        return local * scale.to(local.dtype)


#: Under torchrun the ranks agree on a stop (Ctrl-C, ``max_time``) every this many steps, not
#: after every step: each agreement is a host round trip that makes the faster rank wait for
#: the slower one's host (the training step is host-bound on an H200, so every step paid for
#: the other rank's jitter). A stop is at most this many steps late.
HALT_AGREE_EVERY = 25


def halt_agreement_due(global_step: int, halt: str | None, last_of_epoch: bool = False) -> bool:
    """Whether the ranks agree on stopping after ``global_step``: every
    :data:`HALT_AGREE_EVERY` steps, after an epoch's last step (before its validation), and at
    ``max_steps`` (each the same step on every rank, since every rank counts the same steps).
    The other reasons (Ctrl-C, ``max_time``) stay true once seen, so they are agreed on at the
    next due step."""
    return global_step % HALT_AGREE_EVERY == 0 or last_of_epoch or halt == "max_steps"


_CONTEXT: DistContext | None = None


def get_context() -> DistContext:
    """The current context (single-process until :func:`context` started a group)."""
    return _CONTEXT if _CONTEXT is not None else DistContext()


def context(use_cuda: bool | None = None) -> DistContext:
    """Start (once per process) or return the process-group context from torchrun's environment.

    Args:
        use_cuda: Whether CUDA tensors will be communicated (adds the NCCL backend); None:
            when CUDA is available.

    Returns:
        :class:`DistContext`; the single-process no-op context when not under torchrun.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not in_torchrun():
        return DistContext()
    import torch
    import torch.distributed as dist

    for k, v in NCCL_SAFE_ENV.items():
        os.environ.setdefault(k, v)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend="gloo")
        owns = True
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, active=True, cuda=bool(use_cuda), _owns_group=owns)
    if not ctx.is_main:

        console.out.quiet = True  # results (tables) from rank 0 only; errors still show
    _CONTEXT = ctx
    atexit.register(ctx.cleanup)
    return ctx
