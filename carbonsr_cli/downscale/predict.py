"""The model side of the engine: batches of tiles, the predictor (bf16 copy, CUDA graphs),
dihedral test-time transforms and the water-fill of blended bands.

Used by :mod:`carbonsr_cli.downscale.engine` for methods that run a network; baselines skip it.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.devices import HostResult, to_device
from carbonsr_cli.downscale.progress import _advance

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.plan import Plan
    from carbonsr_cli.downscale.summary import DownscaleSummary

__all__ = ["BF16_TOL", "BandData", "dihedral", "dihedral_inverse", "unique_windows"]


def dihedral(x: Any, d: int) -> Any:
    """Apply dihedral transform ``d`` (0..7) to the last two dims of a square tensor.

    ``d % 4`` quarter turns (``torch.rot90``), preceded by a horizontal flip when ``d >= 4``.
    """
    import torch

    if d >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, d % 4, dims=(-2, -1)) if d % 4 else x



def dihedral_inverse(x: Any, d: int) -> Any:
    """Inverse of :func:`dihedral`."""
    import torch

    if d % 4:
        x = torch.rot90(x, -(d % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if d >= 4 else x



class _Predictor:
    """Runs the model on batches of tiles.

    On CUDA the first batch decides the precision: a bfloat16 copy of the model
    (:func:`models.inference.low_precision_copy`) is used when its raw output stays within
    :data:`BF16_TOL` of float32, else float32. Full batches then replay one CUDA graph
    (:class:`models.inference.GraphedForward`; ``CARBONSR_CUDA_GRAPHS=0`` turns that off).
    On CPU the model runs as is (float32, eager).

    With ``extra_devices`` (several GPUs in one process, ``--device cuda:0,cuda:1``) the model
    is copied to each of them and the calls go round-robin over ``device`` and the extra
    devices; every result is moved to ``device`` (NVLink or PCIe peer copy), where blending and
    water-filling stay. The primary's first call decides the precision for all copies, so every
    device runs the same arithmetic.
    """

    def __init__(self, model: Any, normalizer: Any, device: Any, batch_size: int, summary: DownscaleSummary,
                 block: int = 10, extra_devices: Sequence[Any] = ()) -> None:
        import torch

        self.model = model
        #: Parent block edge in child cells: a dasymetric model's log-weights become log1p
        #: children per tile (``models.dasymetric.log_children``) before blending.
        self.block = int(block)
        self.normalizer = normalizer
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.summary = summary
        self.low_precision = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.use_graphs = device.type == "cuda" and os.environ.get("CARBONSR_CUDA_GRAPHS", "1") != "0"
        #: Keep predictions on the device (CUDA): blending and water-filling run there.
        self.on_device = device.type == "cuda"
        self._run: Any = None  # (raw aux, main) -> raw predictions [B, 1, T, H, W] float32
        self._low: Any = None  # the bf16 copy, once built
        self.graphed: Any = None
        summary.precision = "bf16" if self.low_precision else "fp32"
        #: One predictor per extra device (a copy of the model there); :attr:`_calls` picks the device.
        self.replicas = [
            _Predictor(copy.deepcopy(model).to(d), normalizer, d, batch_size, summary, block) for d in extra_devices
        ]
        self._calls = 0
        self._decided = False  # a replica takes the primary's precision instead of deciding

    def __call__(self, aux: np.ndarray, main: np.ndarray, n_views: int = 1) -> np.ndarray:
        """Raw log-domain predictions, optionally for the 8 dihedral views of every sample.

        Args:
            aux: ``[B, C_aux, T, H, W]`` float32 raw aux (numpy or a tensor; normalised here, on the device).
            main: ``[B, 1, T, H, W]`` float32 main input.
            n_views: 1, or 8 for test-time augmentation: view ``d`` applies :func:`dihedral`
                ``d`` to the inputs and undoes it on the outputs. All views of a sample go
                through the model in the same forward pass.

        Returns:
            ``[n_views, B, T, H, W]`` float32 raw predictions (log1p of child totals): numpy,
            or a tensor on the device for CUDA (blending and water-filling stay there).
        """
        import torch

        k = self._calls % (1 + len(self.replicas))
        self._calls += 1
        if k > 0 and self._run is not None:  # the primary has decided the precision: a copy takes this call
            rep = self.replicas[k - 1]
            if rep._run is None:
                rep.low_precision, rep._decided = self.low_precision, True
            with _current(rep.device):
                raw = rep(aux, main, n_views)
            self._note_graph_error(rep)
            # On CUDA a peer copy (ordered after the copy's work on both devices); numpy elsewhere.
            return raw.to(self.device) if self.on_device else raw
        outs = []
        step = max(1, self.batch_size // n_views)
        with torch.inference_mode():
            for s in range(0, aux.shape[0], step):
                a = torch.as_tensor(_writable(aux[s : s + step])).to(self.device, non_blocking=True)  # raw: normalised in _run
                m = torch.as_tensor(_writable(main[s : s + step])).to(self.device, non_blocking=True)
                if n_views > 1:
                    a = torch.cat([dihedral(a, d) for d in range(n_views)]).contiguous()
                    m = torch.cat([dihedral(m, d) for d in range(n_views)]).contiguous()
                raw = self._forward(a, m)[:, 0]  # [n_views * b, T, H, W]
                raw = raw.reshape(n_views, -1, *raw.shape[1:])
                if n_views > 1:
                    raw = torch.stack([dihedral_inverse(raw[d], d) for d in range(n_views)])
                outs.append(raw.float() if self.on_device else raw.float().cpu().numpy())
        self._note_graph_error(self)
        if self.on_device:
            if not outs:
                return torch.zeros((n_views, 0, *main.shape[2:]), dtype=torch.float32, device=self.device)
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if not outs:
            return np.zeros((n_views, 0, *main.shape[2:]), np.float32)
        return np.concatenate(outs, axis=1)

    def _note_graph_error(self, pred: _Predictor) -> None:
        if pred.graphed is not None and pred.graphed.error and not any("CUDA graph" in n for n in self.summary.notes):
            self.summary.notes.append(f"CUDA graph capture failed ({pred.graphed.error}); ran eagerly")

    def warm_up(self, batch: int, channels: int, years: int, tile: int) -> None:
        """Load the CUDA kernels and build the bf16 copy on zeros of the batch shape.

        The first forward pass on a device loads kernels and picks algorithms (about 1 s for
        ``base``); :func:`run_pipeline` runs this in a thread while the aux readers start, so
        that the first real batch (which decides the precision) does not pay for it. Any error
        is left for the real batches to raise.
        """
        if not self.on_device:
            return
        import torch

        from models.inference import low_precision_copy

        try:
            with torch.inference_mode(), _current(self.device):  # runs in its own thread
                a = torch.zeros((batch, channels, years, tile, tile), device=self.device)
                m = torch.zeros((batch, 1, years, tile, tile), device=self.device)
                self.model(self.normalizer.apply(a), m)
                if self.low_precision:
                    self._low = self._low or low_precision_copy(self.model)
                    self._low(self.normalizer.apply(a), m)
                torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - the real batches report problems
            pass
        for rep in self.replicas:
            with _current(rep.device):
                rep.warm_up(batch, channels, years, tile)

    def _forward(self, a: Any, m: Any) -> Any:
        if self._run is None:
            self._run = self._choose(a, m)
        return self._run(a, m)

    def _choose(self, a_raw: Any, m: Any) -> Any:
        """The forward function for all batches (normalisation included), decided on the first one."""
        from models.dasymetric import log_children
        from models.inference import GraphedForward, low_precision_copy

        model = self.model
        normalize = self.normalizer.apply
        if self.low_precision and self._decided:
            model = self._low or low_precision_copy(model)
        elif self.low_precision:
            a = normalize(a_raw)
            ref = model(a, m)[0]
            low = self._low or low_precision_copy(model)
            diff = float((low(a, m)[0].float() - ref.float()).abs().max())
            if math.isfinite(diff) and diff <= BF16_TOL:
                model = low
            else:
                self.low_precision = False
                self.summary.precision = "fp32"
                self.summary.notes.append(f"bf16 differed from fp32 by {diff:.3g} (> {BF16_TOL}); ran in fp32")

        dasymetric = getattr(model.config, "allocation", "water_fill") == "dasymetric"
        block = self.block

        def run(a_: Any, m_: Any) -> Any:
            raw = model(normalize(a_), m_)[0].float()
            return log_children(raw, m_, block) if dasymetric else raw

        if self.use_graphs:
            self.graphed = GraphedForward(run)
            return self.graphed
        return run



def _current(device: Any) -> Any:
    """``device`` as the current CUDA device (CUDA graphs capture on the current device's
    streams); nothing for other devices."""
    import contextlib

    import torch

    return torch.cuda.device(device) if getattr(device, "type", "") == "cuda" else contextlib.nullcontext()


def unique_windows(windows: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Distinct temporal windows and, per output year, ``(window number, position)``.

    Output years whose windows coincide (e.g. every year when the raster has ``<= T`` years)
    share one model evaluation: the model predicts all ``T`` years of its window at once.
    """
    uniq: list[list[int]] = []
    src: list[tuple[int, int]] = []
    for idx, pos in windows:
        if idx not in uniq:
            uniq.append(list(idx))
        src.append((uniq.index(idx), pos))
    return uniq, src



def _iter_batches(data: BandData, row: list[Any], uniq: list[list[int]], batch_size: int, device: Any = None) -> Any:
    """Yield ``(aux [B, C, T, H, W], main [B, 1, T, H, W])`` over every (tile, window) of a row.

    Samples are ordered tile-major (``k * U + u`` for ``U`` distinct windows); at most
    ``batch_size`` per batch, so the stacked copy never exceeds one batch. With a CUDA
    ``device`` the chunk's inputs are copied to the device once (one large transfer instead of
    a host-side stack and a transfer per batch) and batches are torch tensors made there.
    Tiles at a regular column step (every row of a :class:`~carbonsr_cli.tiling.TileLayout`)
    are cut out of the chunk by one strided view per batch instead of one slice per tile.
    """
    assert data.aux is not None and data.main is not None
    src_aux: Any = data.aux
    src_main: Any = data.main
    on_cuda = device is not None and getattr(device, "type", "cpu") == "cuda"
    if on_cuda:
        import torch

        if isinstance(src_aux, np.ndarray):
            src_aux = to_device(src_aux, device)
        if isinstance(src_main, np.ndarray):  # else uploaded by the preparing thread
            src_main = to_device(src_main, device)
    slices = [slice(idx[0], idx[-1] + 1) if list(idx) == list(range(idx[0], idx[-1] + 1)) else list(idx) for idx in uniq]
    views = _tile_views(src_aux, src_main, row, slices, data.origin)
    if views is not None:
        aux_v, main_v = views  # [N, C, T, th, tw] and [N, 1, T, th, tw] strided views
        for s in range(0, aux_v.shape[0], batch_size):
            a, m = aux_v[s : s + batch_size], main_v[s : s + batch_size]
            if isinstance(a, np.ndarray):
                yield np.ascontiguousarray(a), np.ascontiguousarray(m)
            else:
                yield a.contiguous(), m.contiguous()
        return
    stack: Any = torch.stack if on_cuda else np.stack
    oy, ox = data.origin
    auxs: list[Any] = []
    mains: list[Any] = []
    for tile in row:
        cw = tile.child_window
        rs = slice(int(cw.row_off) - oy, int(cw.row_off + cw.height) - oy)
        cs = slice(int(cw.col_off) - ox, int(cw.col_off + cw.width) - ox)
        a_t = src_aux[:, :, rs, cs]
        m_t = src_main[:, rs, cs]
        for sl in slices:
            auxs.append(a_t[:, sl])  # a view when the window is a run of years
            mains.append(m_t[sl][None])
            if len(auxs) == batch_size:
                yield stack(auxs), stack(mains)
                auxs, mains = [], []
    if auxs:
        yield stack(auxs), stack(mains)



def _tile_views(src_aux: Any, src_main: Any, row: list[Any], slices: list[Any], origin: tuple[int, int]) -> Any:
    """All samples of ``row`` as strided views ``([N, C, T, th, tw], [N, 1, T, th, tw])``.

    Works for numpy arrays and torch tensors. Returns None unless there is one window of
    consecutive years (one sample per tile) and the tiles share their rows and size and sit at
    a constant column step; then the caller slices tile by tile.
    """
    if not row or len(slices) != 1 or isinstance(slices[0], list):
        return None
    wins = [t.child_window for t in row]
    oy, ox = origin
    th, tw = int(wins[0].height), int(wins[0].width)
    r0, c0 = int(wins[0].row_off) - oy, int(wins[0].col_off) - ox
    step = int(wins[1].col_off - wins[0].col_off) if len(wins) > 1 else tw
    if step <= 0 or any(
        int(w.height) != th or int(w.width) != tw or int(w.row_off) - oy != r0 or int(w.col_off) - ox != c0 + k * step
        for k, w in enumerate(wins)
    ):
        return None
    n = len(wins)
    width = (n - 1) * step + tw
    a = src_aux[:, :, r0 : r0 + th, c0 : c0 + width]  # [C, T_all, th, width]
    m = src_main[:, r0 : r0 + th, c0 : c0 + width][None]  # [1, T_all, th, width]
    if a.shape[-1] != width or m.shape[-1] != width:
        return None
    if isinstance(a, np.ndarray):
        from numpy.lib.stride_tricks import sliding_window_view

        def tiles(x: Any) -> Any:  # [c, t, th, width] -> [n, c, t, th, tw]
            return np.moveaxis(sliding_window_view(x, tw, axis=-1)[..., ::step, :], -2, 0)

    else:

        def tiles(x: Any) -> Any:
            return x.unfold(-1, tw, step).movedim(-2, 0)

    (sl,) = slices
    return tiles(a[:, sl]), tiles(m[:, sl])



def _predict_row(
    predictor: _Predictor, data: BandData, row: list[Any], plan: Plan, n_views: int, prog: Any
) -> list[list[np.ndarray]]:
    """Raw predictions of a tile row: ``[view][tile] -> [Y, H, W]`` (log domain, output years)."""
    uniq, src = unique_windows(plan.windows)
    n_u = len(uniq)
    flat: list[list[np.ndarray]] = [[] for _ in range(n_views)]
    for aux_b, main_b in _iter_batches(data, row, uniq, max(1, predictor.batch_size // n_views), predictor.device):
        raw = predictor(aux_b, main_b, n_views)  # [n_views, b, T, H, W]
        for d in range(n_views):
            flat[d].extend(raw[d])  # [T, H, W] each
        _advance(prog, aux_b.shape[0] * n_views)
    stack: Any = np.stack
    if predictor.on_device:
        import torch

        stack = torch.stack
    if len(src) == 1:  # one output year: views, no per-tile copy
        ((u, pos),) = src
        return [[v[k * n_u + u][pos : pos + 1] for k in range(len(row))] for v in flat]
    return [
        [stack([v[k * n_u + u][pos] for u, pos in src]) for k in range(len(row))]
        for v in flat
    ]



def _water_fill(
    values_log: Any, totals: np.ndarray, f: int, device: Any, out_dtype: Any, graphs: dict | None = None
) -> Any:
    """Water-fill a band: ``values_log [Y, h, w]`` (log1p domain), ``totals [Y, h/f, w/f]`` -> children.

    Returns a :class:`~carbonsr_cli.devices.HostResult` (``.numpy()`` gives ``[Y, h, w]``). On
    CUDA nothing here waits for the GPU: the totals' counts of inf/negative/NaN are taken on
    the host, the totals go up and the children come back through page-locked memory. With a
    ``graphs`` dict (CUDA), bands of a repeated shape replay a captured CUDA graph (one per
    shape and kind of totals: with or without negative / NaN totals).
    """
    import torch

    from models.physics import water_fill

    if isinstance(values_log, np.ndarray):
        values_log = to_device(values_log, device)
    tot = np.ascontiguousarray(totals, dtype=np.float64)
    counts = (int(np.isinf(tot).sum()), int((tot < 0).sum()), int(np.isnan(tot).sum()))
    t = to_device(tot, device)[None, None]

    def fill(v_log: Any, t_: Any, c: tuple[int, int, int] = counts) -> Any:
        v = torch.expm1(v_log.to(dtype=torch.float64))[None, None]  # no copy when blended on the device
        return water_fill(v, t_, f, out_dtype=out_dtype, totals_counts=c)[0, 0]

    if graphs is not None and getattr(device, "type", "") == "cuda" and counts[0] == 0:
        from models.inference import GraphedForward

        kind = (0, int(counts[1] > 0), int(counts[2] > 0))  # water_fill only tests the counts for > 0
        run = graphs.get(kind)
        if run is None:  # ``fill`` closes over f and out_dtype only, which are fixed for a run
            run = graphs[kind] = GraphedForward(functools.partial(fill, c=kind), max_graphs=2)
        return HostResult(run(values_log.to(device=device), t))
    return HostResult(fill(values_log.to(device=device), t))


def _writable(a: Any) -> Any:
    """``a``, or a copy of it where it is a read-only NumPy array (torch refuses to share those)."""
    return a.copy() if isinstance(a, np.ndarray) and not a.flags.writeable else a



#: Largest tolerated |bf16 - fp32| difference of raw log-domain predictions on the first batch;
#: above it the run falls back to fp32 (the result is always water-filled in float64).
BF16_TOL = 0.05



@dataclass
class BandData:
    """Inputs of one chunk of a tile row (a run of consecutive tiles; baselines: the whole row).

    Attributes:
        i: Tile-row index.
        out_rows: ``(r0, r1)`` child rows finished by this tile row (multiples of factor).
        totals: ``[Y, (r1 - r0) / factor, parent_cols]`` float64 parent totals, NaN = nodata
            (first chunk of a row only, else None).
        main: Model only: ``[N_in, eh, ew]`` float32 ``log1p(total / factor**2)`` on the
            children of the padded extent of the chunk's tiles (nodata -> 0).
        aux: Model only: ``[C_aux, N_in, eh, ew]`` float32 raw aux values (model channel order).
        weights: Baselines with aux layers only: ``[L, Y, r1 - r0, child_cols]`` layer values: raw
            (float32, as read) for a method with a numpy fill, else float64 with NaN and negatives 0.
        origin: ``(row, col)`` child coordinates of ``main[..., 0, 0]``.
    """

    i: int
    out_rows: tuple[int, int]
    totals: np.ndarray | None
    main: np.ndarray | None = None
    aux: np.ndarray | None = None
    weights: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)
    #: The tiles of tile-row ``i`` (first chunk of a row only; built here, off the main thread).
    row: list[Any] | None = None
