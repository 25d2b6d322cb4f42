"""One optimisation step and what keeps the device busy around it.

- :func:`training_step`: forward (autocast), the float64 share of the block totals, loss,
  backward, clipping, optimiser and scheduler steps.
- On CUDA the loop never waits for the GPU inside an epoch: batches come in page-locked
  memory (float16 aux, converted exactly to float32 on the device), the step returns the
  loss as a device tensor and :class:`LossTracker` copies the losses to the host in groups
  (a ``float(loss)`` per step made the host wait for every step to finish before it could
  queue the next one).
- :class:`CompiledUNet`: ``torch.compile`` of the network's U-Net for the training steps
  (validation stays eager; on CUDA replayed from CUDA graphs, :func:`compile_mode`);
  :func:`compile_wanted` decides.
- :class:`Throughput`: patches/s after a warm-up and the share of that time spent waiting
  for a batch, logged at the end of a run.

On the CPU every step is still synchronous and uses float32 batches in ordinary memory:
results there are bitwise those of the synchronous step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any

from carbonsr_cli.errors import UsageError
from carbonsr_cli.train.dataset import Batch

__all__ = [
    "CompiledUNet", "LossTracker", "Throughput", "autocast_factory", "compile_mode", "compile_wanted", "contiguous_state",
    "match_conv_layout", "training_step",
]

log = logging.getLogger("carbonsr.train")

#: CUDA: losses are copied to the host (and checked for divergence) every this many steps.
LOSS_FLUSH_EVERY = 25
#: ``compile="auto"`` compiles the U-Net on CUDA when the invocation plans at least this many
#: steps. Measured on an H200 (``base``, batch 32): 85 ms per eager step, 49 ms compiled, and a
#: cold compile of ~130 s (later runs reuse the on-disk caches): it pays from ~3,700 steps.
COMPILE_MIN_STEPS = 4000


def autocast_factory(device: Any, precision: str) -> Any:
    """A zero-argument context factory: bf16 autocast (``bf16``, or ``auto`` on CUDA) or none."""
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def match_conv_layout(model: Any) -> int:
    """Store the model's 4-D and 5-D parameters (convolution weights) channels-last, as its
    activations are (``model.channels_last``); returns how many were converted (0 when the
    model runs channels-first).

    For CUDA training. cuDNN returns a weight's gradient in the activations' layout; with the
    weights channels-first, DDP copied every such gradient into its all-reduce bucket ("Grad
    strides do not match bucket view strides": about 270 extra copies per step of ``base``)
    and cuDNN converted the weights at every call. Values are unchanged; checkpoints store
    contiguous tensors (:func:`contiguous_state`).
    """
    import torch

    if not getattr(model, "channels_last", False):
        return 0
    n = 0
    for p in model.parameters():
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(p.ndim)
        if fmt is None:
            continue
        # The canonical channels-last strides, also where a size-1 dimension makes the layout
        # ambiguous (a depthwise weight [C, 1, k, k] counts as channels-last either way, but
        # its gradient comes with the canonical strides and DDP compares strides exactly).
        want = torch.empty_like(p.data, memory_format=fmt)
        if want.stride() != p.stride():
            p.data = want.copy_(p.data)
            n += 1
    return n


def contiguous_state(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` with every tensor contiguous (checkpoints keep one layout; the
    state dict's own type and metadata are kept)."""
    state = model.state_dict()
    for k, v in state.items():
        if not v.is_contiguous():
            state[k] = v.contiguous()
    return state


def _children(model: Any, raw: Any, totals: Any, block: int) -> Any:
    """Linear child totals (float64) from the model's raw output, by its allocation (see
    :func:`models.dasymetric.children_from_raw`)."""
    from models.dasymetric import children_from_raw

    cfg = model.config
    return children_from_raw(raw, totals, block, getattr(cfg, "allocation", "water_fill"), getattr(cfg, "use_physics", True))


def _to_device(x: Any, device: Any) -> Any:
    """numpy array or (pinned) host tensor -> tensor on ``device`` (asynchronous from pinned memory)."""
    import torch

    t = x if torch.is_tensor(x) else torch.from_numpy(x)
    return t.to(device, non_blocking=True)


def training_step(
    model: Any,
    batch: Batch,
    loss_fn: Any,
    optimizer: Any,
    scheduler: Any,
    *,
    device: Any,
    autocast: Any,
    factor: int,
    moe_weight: float,
    grad_clip: float,
    mass_weight: float = 0.0,
    log_loss_weight: float = 1.0,
    sync: bool = True,
) -> Any:
    """One optimisation step on a batch; returns the loss (a float, or with ``sync=False`` the
    detached loss tensor on the device, so that the host need not wait for the step).

    The model predicts log1p child totals from ``batch.aux [B, C, T, P, P]`` (float32, or
    float16 converted on the device) and ``batch.main``; children are shared onto
    ``batch.totals`` (``block = s * factor``), sum-pooled to parent cells and compared with
    ``batch.truth`` in the log domain (a :class:`CompiledUNet` installed on the model is used by
    its forward).
    """
    import torch

    from models.physics import block_sum

    cudnn = torch.backends.cudnn
    prev_benchmark = cudnn.benchmark
    if device.type == "cuda":
        # Shapes are fixed within a run: let cuDNN time its algorithms once per shape (without it,
        # the backward of the stride-2 downsampling convs took a 6 ms grouped kernel, ~10 % of a step).
        cudnn.benchmark = True
    try:
        return _step(model, batch, loss_fn, optimizer, scheduler, device=device, autocast=autocast, factor=factor,
                     moe_weight=moe_weight, grad_clip=grad_clip, mass_weight=mass_weight,
                     log_loss_weight=log_loss_weight, sync=sync)
    finally:
        cudnn.benchmark = prev_benchmark


def _step(model: Any, batch: Batch, loss_fn: Any, optimizer: Any, scheduler: Any, *, device: Any, autocast: Any,
          factor: int, moe_weight: float, grad_clip: float, mass_weight: float, log_loss_weight: float, sync: bool) -> Any:
    import torch

    from models.physics import block_sum

    aux = _to_device(batch.aux, device)
    if aux.dtype != torch.float32:
        aux = aux.float()  # float16 -> float32 is exact: the same input as a float32 batch
    mi = _to_device(batch.main, device)
    totals = _to_device(batch.totals, device)
    truth = _to_device(batch.truth, device)
    mask = _to_device(batch.mask, device)
    with autocast():
        raw, _ = model(aux, mi, context_block=batch.scale * factor)
    children = _children(model, raw, totals, batch.scale * factor)
    parent = block_sum(children, factor)
    loss = loss_fn(torch.log1p(parent.clamp(min=0)), torch.log1p(truth.double()), mask)
    if log_loss_weight != 1.0:
        loss = loss * log_loss_weight
    if mass_weight:
        m = mask.to(parent.dtype)
        t = torch.nan_to_num(truth.double(), nan=0.0)
        err = (torch.nan_to_num(parent, nan=0.0) - t).abs()
        loss = loss + mass_weight * (err * m).sum() / (t * m).sum().clamp(min=1e-12)
    aux_loss = getattr(model, "aux_loss", None)
    if moe_weight and aux_loss is not None and torch.is_tensor(aux_loss) and aux_loss.requires_grad:
        loss = loss + moe_weight * aux_loss.double()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()) if sync else loss.detach()


class LossTracker:
    """Per-step global-batch losses, checked for divergence.

    ``add`` takes a float (checked at once, as before) or a device tensor (kept on the device
    and copied to the host with the others every ``every`` steps or at :meth:`flush`). Under
    torchrun every rank must flush at the same steps (they do: the schedule depends on the
    step count only); the rank shares are summed in one collective per flush.

    Raises (from ``add``/``flush``): :class:`UsageError` naming the first step whose loss is
    not finite.
    """

    def __init__(self, dist_ctx: Any, lr: float, every: int = LOSS_FLUSH_EVERY) -> None:
        self.dist_ctx = dist_ctx
        self.lr = lr
        self.every = max(1, int(every))
        self.values: list[float] = []
        self._pending: list[tuple[Any, int, int]] = []

    def add(self, loss: Any, epoch: int, step: int) -> None:
        self._pending.append((loss, epoch, step))
        if isinstance(loss, float) or len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        import torch

        pending, self._pending = self._pending, []
        tensors = [v for v, _, _ in pending if torch.is_tensor(v)]
        host = iter(torch.stack(tensors).double().cpu().tolist()) if tensors else iter(())
        local = [next(host) if torch.is_tensor(v) else float(v) for v, _, _ in pending]
        if self.dist_ctx.active:  # global-batch loss = mean of the rank shares
            local = [v / self.dist_ctx.world_size for v in self.dist_ctx.sum_floats(local)]
        for lv, (_, epoch, step) in zip(local, pending):
            if not math.isfinite(lv):
                raise UsageError(
                    f"training diverged (loss {lv}) at epoch {epoch} step {step}; try a smaller --lr "
                    f"(now {self.lr}) or --precision fp32"
                )
        self.values.extend(local)

    def take(self) -> list[float]:
        """The flushed losses since the last call (call :meth:`flush` first)."""
        out, self.values = self.values, []
        return out


def compile_wanted(setting: str, device: Any, model: Any, planned_steps: int) -> bool:
    """Whether to compile the U-Net: ``on``/``off``; ``auto`` = CUDA, a network with a U-Net,
    and at least :data:`COMPILE_MIN_STEPS` planned steps. ``CARBONSR_COMPILE=0|1`` overrides."""
    env = os.environ.get("CARBONSR_COMPILE", "").strip().lower()
    if env in ("0", "1", "off", "on", "false", "true"):
        setting = "on" if env in ("1", "on", "true") else "off"
    has_unet = hasattr(model, "enc_blocks")
    if setting == "off" or not has_unet:
        return False
    if setting == "on":
        return True
    return device.type == "cuda" and planned_steps >= COMPILE_MIN_STEPS


def compile_mode(device: Any) -> str | None:
    """``torch.compile``'s mode for the U-Net: ``reduce-overhead`` (CUDA graphs) on CUDA, the
    default elsewhere; ``CARBONSR_COMPILE_MODE`` overrides (``default`` for the plain mode).

    Measured on an H200 (``base``, T = 3, batch 32, bf16; benchmarks/README.md, issue 21 session
    14): the default mode left the step host-bound (~55-60 ms of host time for ~30 ms of GPU
    work: the Inductor wrapper launches each kernel); replaying CUDA graphs took the step to
    ~32 ms (995 patches/s against 531), and under DDP (one rank) to ~34 ms (943 patches/s).
    """
    env = os.environ.get("CARBONSR_COMPILE_MODE", "").strip()
    if env:
        return None if env == "default" else env
    return "reduce-overhead" if getattr(device, "type", None) == "cuda" else None


class CompiledUNet:
    """``torch.compile`` of ``model._features`` (the encoder, bottleneck and decoder) for the
    training steps: installed once as an instance attribute that calls the compiled function
    when gradients are enabled (training) and the plain method otherwise (validation runs under
    ``no_grad`` and stays eager; checkpoints hold the same state dict). :meth:`remove` undoes it.

    The U-Net's input shapes are fixed for a run (batch share, T, patch), so it compiles once;
    the parts that depend on the coarse scale (context averaging, prior, local head) stay eager.
    If the first compiled step fails (no compiler or Triton), :meth:`failed` turns it off.
    """

    def __init__(self, model: Any, device: Any = None) -> None:
        import torch

        self.model = model
        self.eager = model._features
        self.mode = compile_mode(device)
        self.fn = torch.compile(self.eager, dynamic=False, mode=self.mode)
        self.proven = False
        self.enabled = True
        model.__dict__["_features"] = self  # instance attribute shadows the method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.enabled and torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        return self.eager(*args, **kwargs)

    def remove(self) -> None:
        if self.model.__dict__.get("_features") is self:
            del self.model.__dict__["_features"]

    def failed(self, exc: BaseException) -> None:
        log.warning("torch.compile of the U-Net failed (%s: %s); training continues without it",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.enabled = False


class Throughput:
    """Patches/s of the training steps after ``warmup`` steps of this invocation (validation and
    checkpoints excluded) and the share of that time the loop waited for a batch.

    CUDA: the device is synchronised only where a timed span starts and ends (epoch loops).
    """

    def __init__(self, device: Any, global_batch: int, warmup: int = 5) -> None:
        self.device = device
        self.global_batch = global_batch
        self.warmup = warmup
        self.steps_seen = 0
        self.steps = 0
        self.seconds = 0.0
        self.wait = 0.0
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def after_step(self) -> None:
        self.steps_seen += 1
        if self._t0 is not None:
            self.steps += 1
        elif self.steps_seen == self.warmup:
            self._sync()
            self._t0 = time.perf_counter()

    def waited(self, seconds: float) -> None:
        if self._t0 is not None:
            self.wait += seconds

    def pause(self) -> None:
        """End of an epoch's steps: close the timed span."""
        if self._t0 is not None:
            self._sync()
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            self.warmup = self.steps_seen + 1  # the next span starts after the next step

    def result(self) -> dict[str, float] | None:
        if self.steps == 0 or self.seconds <= 0:
            return None
        return {"patches_per_s": self.global_batch * self.steps / self.seconds, "steps": self.steps,
                "seconds": self.seconds, "data_wait_share": self.wait / self.seconds,
                "global_batch": self.global_batch}
