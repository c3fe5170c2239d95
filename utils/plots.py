"""Plots of a run: training curves from `metrics.jsonl`, recall@k curves from evaluation.

Rendered with matplotlib's Agg backend (no display needed), written atomically as PNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from utils.errors import UserError  # noqa: E402
from utils.io_utils import atomic_path  # noqa: E402
from utils.tracking import read_jsonl  # noqa: E402

DIRECTIONS = {"t2a": "text → audio", "a2t": "audio → text"}


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl (a truncated last line is skipped)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: no epoch records to plot (is the run's first epoch finished?)")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that have a finite number under `key`."""
    xs, ys = [], []
    for i, r in enumerate(records):
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            epoch = r.get("epoch", i + 1)
            xs.append(epoch if isinstance(epoch, (int, float)) else i + 1)
            ys.append(float(value))
    return xs, ys


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # format given: the temp name ends in .tmp
    finally:
        plt.close(fig)
    return out_png


def _finish_axes(ax) -> None:
    """Grid, and a legend, or "no data" on a panel with nothing drawn."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_training_curves(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Two panels from a run's metrics.jsonl: train/val loss per epoch, and validation
    text -> audio mAP@10 per epoch. Missing keys leave gaps. Returns the PNG path."""
    records = read_metrics_jsonl(metrics_jsonl_path)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        xs, ys = _series(records, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_loss.set(title="InfoNCE loss", xlabel="epoch", ylabel="loss")
    xs, ys = _series(records, "val_t2a_mAP@10")
    if xs:
        ax_map.plot(xs, ys, marker="o", markersize=3, color="tab:green", label="validation mAP@10")
        best = max(range(len(ys)), key=ys.__getitem__)
        ax_map.annotate(f"best {ys[best]:.3f} (epoch {xs[best]:g})", (xs[best], ys[best]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax_map.set(title="Validation text → audio mAP@10", xlabel="epoch", ylabel="mAP@10")
    ax_map.set_ylim(0.0, 1.0)
    for ax in (ax_loss, ax_map):
        _finish_axes(ax)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], out_png: str | Path) -> Path:
    """Recall@k against k, one panel per direction (t2a, a2t), one line per split.

    curves: {split: {"t2a": [R@1, ..., R@K], "a2t": [R@1, ..., R@K]}}, values in [0, 1].
    Returns the PNG path."""
    if not curves:
        raise UserError("plot_recall_curves: no splits to plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (direction, title) in zip(axes, DIRECTIONS.items()):
        for split, by_direction in curves.items():
            recalls = list(by_direction.get(direction, []))
            if recalls:
                ax.plot(range(1, len(recalls) + 1), recalls, marker="o", markersize=3, label=split,
                        clip_on=False)  # points at exactly 0 or 1 stay whole
        ax.set(title=f"{title}: recall@k", xlabel="k", ylabel="recall@k")
        ax.set_ylim(0.0, 1.0)
        _finish_axes(ax)
    fig.tight_layout()
    return _save(fig, out_png)
