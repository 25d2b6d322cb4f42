"""What a training run writes besides checkpoints: ``train.log``, ``metrics.csv``, the epoch
table on the console, ``training_curves.png`` and the JSON files of the run directory."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carbonsr_cli.train.validation import METRIC_KEYS

log = logging.getLogger("carbonsr.train")


def _write_json(path: Path, obj: Any) -> None:
    from carbonsr_cli.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # train.log gets INFO; the console only with -v (root logger at INFO or below)
    log.propagate = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return handler

def _history_row(epoch: int, global_step: int, train_loss: float, lr: float, elapsed: float, model_s: dict, base: dict, scales: Sequence[int], score: float, best: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "train_loss": train_loss, "lr": lr, "time_s": round(elapsed, 2)}
    for s in scales:
        for k in METRIC_KEYS:
            row[f"s{s}_model_{k}"] = model_s[s][k]
            row[f"s{s}_uniform_{k}"] = base[s]["uniform"][k]
            row[f"s{s}_dasy_{k}"] = base[s]["dasymetric"][k]
            row[f"s{s}_best_{k}"] = base[s]["best"][k]
        row[f"s{s}_dasy_layer"] = base[s]["dasy_layer"]
        row[f"s{s}_best_label"] = base[s]["best_label"]
        if "fitted" in base[s]:
            row[f"s{s}_fitted_nonzero_mae"] = base[s]["fitted"]["nonzero_mae"]
        row[f"s{s}_ratio_model_dasy"] = model_s[s]["nonzero_mae"] / max(base[s]["dasymetric"]["nonzero_mae"], 1e-12)
        row[f"s{s}_ratio_model_best"] = model_s[s]["nonzero_mae"] / max(base[s]["best"]["nonzero_mae"], 1e-12)
    row["val_score"] = score
    row["is_best"] = int(best)
    return row


def _write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from carbonsr_cli.atomic import atomic_write_bytes

    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


def _epoch_table(row: dict[str, Any], scales: Sequence[int], epochs: int) -> Any:
    from rich.table import Table

    table = Table(title=f"epoch {row['epoch']}/{epochs}  step {row['global_step']}  train loss {row['train_loss']:.4f}", title_justify="left")
    table.add_column("scale")
    table.add_column("method")
    for k, label in zip(METRIC_KEYS, ("Nonzero-MAE", "Balanced MAE", "Top-1% NZ-MAE", "Top-5% NZ-MAE")):
        table.add_column(label, justify="right")
    for s in scales:
        for method, key in (("model", "model"), (f"best baseline ({row[f's{s}_best_label']})", "best"), ("uniform", "uniform"), (f"dasymetric ({row[f's{s}_dasy_layer']})", "dasy")):
            table.add_row(f"s={s}", method, *(f"{row[f's{s}_{key}_{k}']:.4g}" for k in METRIC_KEYS))
    return table


def _plot(path: Path, history: list[dict[str, Any]], scales: Sequence[int]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from carbonsr_cli.atomic import atomic_path

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 1 + len(scales), figsize=(4.5 * (1 + len(scales)), 3.6))
    axes[0].plot(ep, [h["train_loss"] for h in history], marker="o")
    axes[0].set_title("training loss")
    axes[0].set_xlabel("epoch")
    for ax, s in zip(axes[1:], scales):
        for key, label in (("model", "model"), ("uniform", "uniform"), ("dasy", "best dasymetric")):
            ax.plot(ep, [h[f"s{s}_{key}_nonzero_mae"] for h in history], marker="o", label=label)
        ax.set_title(f"validation Nonzero-MAE, s={s}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("t CO2 / parent cell / yr")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
