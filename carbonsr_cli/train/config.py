"""Training configuration (:class:`TrainConfig`) and its presets (``demo``...).

``TrainConfig`` is a JSON-safe dataclass: it is written to ``<run>/config.json`` and into
every checkpoint (``train_config``), and ``carbonsr resume`` rebuilds the run from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from carbonsr_cli.errors import UsageError

#: The mass prior's per-pixel correction is kept in full when the initial state with it
#: validates below the first ratio x the fitted mix alone (both scored on the held-out windows,
#: 1 km), dropped above the second, and scaled linearly in between (see
#: ``validation.mass_strength``); the default of ``TrainConfig.mass_gate_ramp``.
MASS_GATE_RAMP = (0.80, 0.90)

__all__ = ["MASS_GATE_RAMP", "TrainConfig", "RESUME_MUTABLE", "TRAIN_PRESETS", "default_years_window"]

#: Fields a resumed run may change without breaking exact continuation (the rest come from
#: the checkpoint). ``epochs`` may grow (the cosine schedule keeps its original length).
RESUME_MUTABLE = frozenset(
    {"epochs", "max_steps", "max_time_s", "device", "workers", "progress", "patience", "threads", "main", "aux", "resume", "cache_ram_gb", "compile"}
)


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Attributes:
        main: Main raster(s): one file with a band per year, or one file per year
            (t CO2 / cell / yr, totals per parent cell).
        aux: Aux layer paths, globs or directories (see ``carbonsr_cli.auxlayers.discover_aux``).
        preset: Model preset (``tiny``, ``base``, ``large``).
        model_overrides: ``ModelConfig`` field overrides (e.g. ``{"widths": [4, 8, 8, 8]}``).
        epochs: Epochs to train.
        steps_per_epoch: Optimisation steps per epoch.
        batch_size: Patches per step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        grad_clip: Gradient-norm clipping (0 disables).
        moe_weight: Weight of the mixture-of-experts load-balancing term.
        mass_weight: Weight of the mass term ``sum |parent pred - parent truth| / sum truth``
            (linear domain) added to the log-domain loss: it makes the cells that hold the mass
            count as they do in Nonzero-MAE. 0 switches it off.
        log_loss_weight: Weight of the log-domain ``DualLayerWeightedLoss`` (0: the mass term only).
        select_margin: A trained state replaces the fitted prior as ``best_model.pth`` only when
            its validation score is this fraction below the prior's (noise guard).
        mass_gate_ramp: ``[lo, hi]``: the mass prior's correction is kept in full when it validates
            below ``lo`` x the mix alone at 1 km, dropped above ``hi``, scaled in between
            (``validation.mass_strength``).
        mass_fit_steps: Full-batch Adam steps of the mass prior's per-pixel correction (None:
            ``models.mass_prior.MASS_FIT_STEPS``, 600; 0: no correction, the mix alone). The fit
            takes most of a CPU run's time on small regions; fewer steps fit less closely.
        mass_trend: Degree of the smooth polynomial of block coordinates fitted beside the mass
            prior's correction and then dropped (``models.mass_prior.fit_mass_prior``; 0: none).
        years_window: T, years per patch (None: 1 for ``tiny``, 3 otherwise, capped by the
            number of years).
        scales: Coarse-scale schedule, e.g. ``"12:0.5,4:0.25,2:0.25"`` (divisors of ``patch``).
        val_scales: Coarse scales of the validation (s = 12 and the finest ones, which weigh most).
        val_fraction: Share of valid parent cells used for validation (block split).
        val_region: ``minx,miny,maxx,maxy`` (parent CRS) or a polygon file; overrides the
            block split.
        block_patches: Block edge of the block split, in patches.
        max_nodata: Largest nodata share of a training patch or validation window.
        fit_buffer: Gap in parent cells between the validation region and the parent cells that
            the per-cell fits (layer mix, mass correction, point sites) use. 0 (default): every
            parent cell outside the validation region; the fits see aux and parent totals cell by
            cell, so no validation total reaches them. None: the split's buffer (one patch, as for
            training patches; the default before session 13).
        factor: Child cells per parent cell along an axis (10: 1 km -> 100 m).
        patch: Patch edge in parent cells (``patch * factor`` child cells; 12 -> 120).
        augment: Random quarter turns and flips of patches.
        runs_dir: Parent directory of run directories.
        name: Run directory name (default ``run_YYYYmmdd_HHMMSS``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        seed: Seed of the split, the sampler, and the weights.
        split_seed: Seed of the validation split alone (None: ``seed``); with several runs of
            different ``seed`` it keeps the held-out blocks the same, so their scores compare.
        autosave_every: Steps between autosaves.
        keep_autosaves: Rotating ``autosave_step_<n>.pth`` files kept.
        snapshot_every: Epochs between permanent ``epoch_<nnn>.pth`` snapshots.
        patience: Epochs without validation improvement before stopping (0 disables).
        max_steps: Stop after this many steps in total (an autosave is written; resumable).
        max_time_s: Stop after this many seconds of training (autosave; resumable).
        resume: ``latest``, ``auto`` or a checkpoint path.
        stats: Existing stats.json to use (computed and stored in the run when None).
        fill_missing: Allow aux layers that do not cover the whole extent (filled).
        categorical: Aux raster file stems or names read as categorical (``--categorical``).
        workers: Threads preparing batches ahead (0: in the training thread).
        max_val_windows: Largest number of validation (window, year) items.
        val_batch_size: Batch size of validation.
        threads: ``torch.set_num_threads`` on the CPU (None: leave as is).
        cache_ram_gb: Largest in-memory aux cache; larger caches go to a memmap in the run.
        progress: Show progress and per-epoch tables.
        compile: ``torch.compile`` the network's U-Net for the training steps: ``on``, ``off``
            or ``auto`` (CUDA, a preset with a U-Net, at least 4,000 planned steps: the first
            compile takes one to two minutes). ``CARBONSR_COMPILE=0|1`` overrides.
    """

    main: list[str]
    aux: list[str]
    preset: str = "mass"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    moe_weight: float = 0.01
    mass_weight: float = 0.0
    log_loss_weight: float = 1.0
    years_window: int | None = None
    scales: str = "12:0.5,4:0.25,2:0.25"
    val_scales: list[int] = field(default_factory=lambda: [12, 3, 2])
    select_margin: float = 0.03
    mass_gate_ramp: list[float] = field(default_factory=lambda: list(MASS_GATE_RAMP))
    mass_fit_steps: int | None = None
    mass_trend: int = 0
    val_fraction: float = 0.2
    val_region: str | None = None
    block_patches: int = 3
    max_nodata: float = 0.5
    fit_buffer: int | None = 0
    factor: int = 10
    patch: int = 12
    augment: bool = True
    runs_dir: str = "runs"
    name: str | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    split_seed: int | None = None
    autosave_every: int = 200
    keep_autosaves: int = 3
    snapshot_every: int = 10
    patience: int = 10
    max_steps: int | None = None
    max_time_s: float | None = None
    resume: str | None = None
    stats: str | None = None
    fill_missing: bool = False
    categorical: list[str] = field(default_factory=list)
    workers: int = 2
    max_val_windows: int = 256
    val_batch_size: int = 8
    threads: int | None = None
    cache_ram_gb: float = 8.0
    progress: bool = True
    compile: str = "auto"

    def __post_init__(self) -> None:
        self.main = [str(p) for p in ([self.main] if isinstance(self.main, str) else self.main)]
        self.aux = [str(p) for p in ([self.aux] if isinstance(self.aux, str) else self.aux)]
        self.val_scales = [int(s) for s in self.val_scales]
        self.mass_gate_ramp = [float(v) for v in self.mass_gate_ramp]
        self.model_overrides = dict(self.model_overrides)

    def validate(self) -> None:
        """Raise ``UsageError`` for values that cannot work."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.steps_per_epoch >= 1, "--steps-per-epoch must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.autosave_every >= 1, "--autosave-every must be >= 1"),
            (self.keep_autosaves >= 1, "--keep-autosaves must be >= 1"),
            (self.snapshot_every >= 1, "snapshot_every must be >= 1"),
            (self.patience >= 0, "--patience must be >= 0"),
            (self.factor >= 2, "factor must be >= 2"),
            (self.patch >= 2, "patch must be >= 2"),
            (self.years_window is None or self.years_window >= 1, "--years-window must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32"),
            (self.compile in ("auto", "on", "off"), "compile must be auto, on or off"),
            (0.0 <= self.max_nodata < 1.0, "max_nodata must be in [0, 1)"),
            (all(s >= 1 and self.patch % s == 0 for s in self.val_scales), f"val scales must divide the patch ({self.patch})"),
            (self.fit_buffer is None or self.fit_buffer >= 0, "--fit-buffer must be >= 0"),
            (self.mass_fit_steps is None or self.mass_fit_steps >= 0, "--mass-fit-steps must be >= 0"),
            (0 <= self.mass_trend <= 4, "mass_trend must be between 0 and 4"),
            (len(self.mass_gate_ramp) == 2 and 0.0 < self.mass_gate_ramp[0] < self.mass_gate_ramp[1],
             "mass_gate_ramp must be [lo, hi] with 0 < lo < hi"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if not self.aux:
            raise UsageError("no aux layers given (--aux); the model needs at least one")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def default_years_window(preset: str, n_years: int) -> int:
    """T when not given: 1 for ``prior``, ``mass`` and ``tiny``, else 3; never more than the number of years."""
    return max(1, min(1 if preset in ("prior", "mass", "tiny") else 3, n_years))


#: A slimmer ``tiny`` (about 19 k parameters, one 3x3 branch, three levels) that learns the
#: sample data in a few minutes on a CPU; used by the ``demo`` set-up.
TINY_CPU_MODEL: dict[str, Any] = dict(
    widths=[8, 16, 16], depths=[1, 1, 1], kernel_sizes=[3], dilations=[1], n_experts=2, top_k=1,
    attn_heads=2, attn_pool=4, state_size=4,
)

#: Named training set-ups: field overrides for :class:`TrainConfig`. ``demo`` is what
#: ``carbonsr demo`` trains on the default sample data (CPU, 240 steps of 4 patches, the
#: ``mass`` model: the fitted layer mix with trainable coefficients and, as far as it validates
#: better than the mix alone, a per-pixel correction; see ``validation.mass_strength``).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        preset="mass",
        epochs=6,
        steps_per_epoch=40,
        batch_size=4,
        lr=3e-3,
        warmup_steps=20,
        scales="12:0.3,6:0.2,4:0.2,3:0.15,2:0.15",
        autosave_every=40,
        patience=0,
        max_val_windows=16,
        device="cpu",
    ),
}
