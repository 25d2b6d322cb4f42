"""Small, fast training configurations shared by the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The smallest model the presets allow to be built quickly on a CPU (about 7.5 k parameters).
SMALL_MODEL: dict[str, Any] = dict(
    widths=[8, 8, 8], depths=[1, 1, 1], kernel_sizes=[3], dilations=[1], n_experts=2, top_k=1,
    attn_heads=2, attn_pool=2, state_size=4,
)

#: Three aux rasters of the sample data (fewer layers: faster set-up and baselines in tests).
AUX_SUBSET = ("builtup_100m.tif", "lights_500m.tif", "population_100m.tif")


def small_config(sample: Path, runs: Path, **changes: Any) -> Any:
    """A TrainConfig on the sample data with 6x6-parent-cell patches (60x60 children) and a tiny model."""
    from carbonsr_cli.train.config import TrainConfig

    base: dict[str, Any] = dict(
        main=[str(sample / "emissions_1km.tif")],
        aux=[str(sample / "aux" / n) for n in AUX_SUBSET],
        preset="tiny",
        model_overrides=SMALL_MODEL,
        patch=6,
        scales="6,3,2",
        val_scales=[6, 3],
        block_patches=2,
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        warmup_steps=2,
        autosave_every=2,
        keep_autosaves=2,
        snapshot_every=1,
        max_val_windows=4,
        val_batch_size=4,
        runs_dir=str(runs),
        device="cpu",
        workers=1,
        threads=2,
        progress=False,
    )
    base.update(changes)
    return TrainConfig(**base)
