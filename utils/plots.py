"""Figures of a run: training curves from `metrics.jsonl`, recall@k curves from evaluation.

Each figure is written three times, atomically, with the same stem: PNG (200 dpi, for screens,
the README and wandb), PDF and SVG (vector, for papers). Fonts are sized for a figure printed
at text width; epochs get integer ticks; the chance level is drawn as a dashed line; the run's
name is the subtitle. Rendered with matplotlib's Agg backend (no display needed), unless the
process chose a backend first (pyplot imported, or MPLBACKEND set): a notebook keeps its inline
figures.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # headless servers and CI; never switch a backend a notebook chose
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.errors import UserError  # noqa: E402
from utils.io_utils import atomic_path, ensure_dir, remove_stale_temps  # noqa: E402
from utils.tracking import read_jsonl  # noqa: E402

PNG_DPI = 200
VECTOR_FORMATS = ("pdf", "svg")
CHANCE_GID = "chance"   # SVG id / artist gid prefix of every chance-level line
BEST_GID = "best-epoch"  # ... and of the best-epoch marker
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 11,
    "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in the PDF: journals reject Type 3 fonts
    "svg.hashsalt": "dcase-retrieval",  # deterministic ids: the same run gives the same SVG
}
DIRECTIONS = {"t2a": "text → audio", "a2t": "audio → text"}
RECALL_PANELS = (  # (curve key, panel title, y label)
    ("t2a", "text → audio", "R@k"),
    ("a2t", "audio → text (baseline R@k)", "R@k: share of the clip's captions in the top k"),
    ("a2t_any", "audio → text (CLAP-style R@k_any)", "R@k_any: any own caption in the top k"),
)
CHANCE_STYLE = {"linestyle": (0, (4, 3)), "linewidth": 1.0, "alpha": 0.8}


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl (a truncated last line is skipped)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: no epoch records to plot (is the run's first epoch finished?)")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that have a finite number under `key`."""
    xs, ys = [], []
    for i, r in enumerate(records):
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            epoch = r.get("epoch", i + 1)
            xs.append(int(epoch) if isinstance(epoch, (int, float)) else i + 1)
            ys.append(float(value))
    return xs, ys


def figure_paths(out_png: str | Path) -> list[Path]:
    """The files one figure is written to: the PNG, then its vector copies beside it."""
    out_png = Path(out_png)
    return [out_png] + [out_png.with_suffix(f".{fmt}") for fmt in VECTOR_FORMATS]


def _save(fig, out_png: str | Path) -> Path:
    """Write `fig` as PNG (PNG_DPI) plus PDF and SVG beside it; returns the PNG path."""
    out_png = Path(out_png)
    ensure_dir(out_png.parent)
    try:
        for path in figure_paths(out_png):
            fmt = path.suffix[1:] or "png"
            with atomic_path(path) as tmp:  # format given: the temp name ends in .tmp
                fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.05,
                            metadata={"Date": None} if fmt == "svg" else None)
    finally:
        plt.close(fig)
    return out_png


def _titles(fig, title: str, subtitle: str | None, shown: bool = True) -> None:
    """The figure's title and subtitle (the run, the checkpoint), unless not `shown`: a paper
    says those in its caption (eval.figure_titles)."""
    if not shown:
        return
    if subtitle:
        fig.get_layout_engine().set(rect=(0, 0, 1, 0.9))  # room for the subtitle above the panels
    fig.suptitle(title, fontweight="bold", y=1.0)
    if subtitle:
        fig.text(0.5, 0.935, subtitle, ha="center", va="top", fontsize=9, color="0.35")


def _finish_axes(ax, legend: bool = True) -> None:
    """Grid, and a legend (unless the figure has one), or "no data" on an empty panel."""
    ax.grid(alpha=0.3, linewidth=0.6)
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        ax.legend(frameon=False)


def _figure_legend(fig, axes=None, handles=None) -> None:
    """One legend for the figure, under the panels, where it covers no curve."""
    if handles is None:
        handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3),
                   frameon=False)


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Integer epoch ticks only (a 2-epoch run gets 1 and 2), a little room at both ends."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8, min_n_ticks=1))
    if epochs:
        lo, hi = min(epochs), max(epochs)
        pad = max(0.3, 0.03 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("epoch")


def _chance_line(ax, y: float, label: str = "chance (random ranking)", color: str = "0.4") -> None:
    line = ax.axhline(y, color=color, label=label, zorder=1, **CHANCE_STYLE)
    line.set_gid(f"{CHANCE_GID}-validation-mAP")


RING_GID = "ring-at-best-epoch"


def _mark_best(ax, xs: list[int], ys: list[float], best_epoch: int | None, color: str,
               label: str | None, ring: bool) -> None:
    """A vertical line at the best checkpoint's epoch, and a ring on the curve's point there
    when `ring` (the monitored curve only: a ring elsewhere reads as that curve's best)."""
    if best_epoch is None:
        return
    vline = ax.axvline(best_epoch, color="0.55", linewidth=0.9, linestyle=":", zorder=1, label=label)
    vline.set_gid(BEST_GID)
    if ring and best_epoch in xs:
        ax.plot([best_epoch], [ys[xs.index(best_epoch)]], marker="o", markersize=9,
                markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.6, zorder=4,
                clip_on=False, gid=RING_GID)  # a ring at the axis' edge stays whole


def training_figure(records: list[dict], run_name: str | None = None, best_epoch: int | None = None,
                    monitor: str | None = None, chance_map: float | None = None,
                    epochs_note: str | None = None, titles: bool = True):
    """Two panels from a run's per-epoch records: train/validation loss, and validation
    text -> audio mAP@10 with its chance level; the best checkpoint's epoch marked on both.
    `titles`: the figure's title and subtitle (the panels keep theirs)."""
    with plt.rc_context(STYLE):
        fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(7.4, 3.1), constrained_layout=True)
        best_label = f"best checkpoint: epoch {best_epoch}" + (f" (by {monitor})" if monitor else "")
        epochs: list[int] = []
        for key, label, color in (("train_loss", "train loss", "tab:blue"),
                                  ("val_loss", "validation loss", "tab:orange")):
            xs, ys = _series(records, key)
            epochs += xs
            if xs:
                ax_loss.plot(xs, ys, marker="o", markersize=3.5, color=color, label=label)
                if key == "val_loss":
                    _mark_best(ax_loss, xs, ys, best_epoch, color, None, ring=monitor == "val_loss")
        ax_loss.set(title="InfoNCE loss", ylabel="loss")
        xs, ys = _series(records, "val_t2a_mAP@10")
        epochs += xs
        top = max(ys + [chance_map or 0.0], default=1.0)
        if xs:
            ax_map.plot(xs, ys, marker="o", markersize=3.5, color="tab:green",
                        label="validation mAP@10")
            by_map = monitor in (None, "val_t2a_mAP@10")  # R@k monitors have no curve here
            _mark_best(ax_map, xs, ys, best_epoch, "tab:green", best_label, ring=by_map)
            if by_map and best_epoch in xs:
                value = ys[xs.index(best_epoch)]
                ax_map.annotate(f"{value:.3f}", (best_epoch, value), textcoords="offset points",
                                xytext=(0, 8), ha="center", fontsize=9, color="tab:green")
        if chance_map is not None:
            _chance_line(ax_map, chance_map)
        ax_map.set(title="Validation text → audio mAP@10", ylabel="mAP@10")
        ax_map.set_ylim(0.0, min(1.0, max(0.05, top * 1.2)))
        for ax in (ax_loss, ax_map):
            _epoch_axis(ax, sorted(set(epochs)))
            _finish_axes(ax, legend=False)
        handles = [h for ax in (ax_loss, ax_map) for h in ax.get_legend_handles_labels()[0]]
        # the long best-checkpoint entry last, in a column of its own: above or below a short
        # entry it widens that column and leaves a wide gap before the next
        handles.sort(key=lambda h: h.get_gid() == BEST_GID)
        _figure_legend(fig, handles=handles)
        subtitle = " · ".join(t for t in (f"run {run_name}" if run_name else None, epochs_note) if t)
        _titles(fig, "Training", subtitle or None, titles)
    return fig


def epochs_note(records: list[dict], cfg: dict | None, best_epoch: int | None) -> str | None:
    """"5 of 30 epochs (stopped early: ...)": how far the run got, under the curves."""
    t = (cfg or {}).get("training", {})
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), int)]
    if not epochs or not t.get("epochs"):
        return None
    last, planned, patience = max(epochs), t["epochs"], t.get("early_stopping", 0)
    note = f"{last} of {planned} epochs"
    if last < planned and patience > 0 and best_epoch is not None and last - best_epoch >= patience:
        note += f" (stopped early: no better {t.get('monitor', 'monitor')} for {patience})"
    return note


def plot_training_curves(metrics_jsonl_path: str | Path, out_png: str | Path,
                         run_name: str | None = None, best_epoch: int | None = None,
                         monitor: str | None = None, chance_map: float | None = None,
                         cfg: dict | None = None, titles: bool = True) -> Path:
    """training_figure from a run's metrics.jsonl (missing keys leave gaps), written as PNG, PDF
    and SVG. `chance_map`: the validation split's chance-level t2a mAP@10; `cfg`: the run's
    config, for how many epochs were planned. Returns the PNG path."""
    records = read_metrics_jsonl(metrics_jsonl_path)
    return _save(training_figure(records, run_name, best_epoch, monitor, chance_map,
                                 epochs_note(records, cfg, best_epoch), titles), out_png)


def recall_figure(curves: Mapping[str, Mapping[str, Sequence[float]]],
                  chance: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                  run_name: str | None = None, subtitle: str | None = None, titles: bool = True):
    """Recall@k against k: text -> audio, audio -> text as the baseline defines R@k, and
    audio -> text R@k_any (panels for which some split has a curve); one line per split, its
    chance level dashed in the same colour. `titles`: as training_figure's.

    curves, chance: {split: {"t2a" | "a2t" | "a2t_any": [value at k = 1..K]}}, values in [0, 1]."""
    if not curves:
        raise UserError("plot_recall_curves: no splits to plot")
    panels = [p for p in RECALL_PANELS if any(c.get(p[0]) for c in curves.values())] or \
        list(RECALL_PANELS[:2])
    colors = {split: f"C{i}" for i, split in enumerate(curves)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels) + 0.3, 3.2),
                                 sharey=True, constrained_layout=True, squeeze=False)
        for ax, (key, title, ylabel) in zip(axes[0], panels):
            k_max = 1
            for split, by_key in curves.items():
                recalls = list(by_key.get(key, []))
                if recalls:
                    ks = range(1, len(recalls) + 1)
                    k_max = max(k_max, len(recalls))
                    ax.plot(ks, recalls, marker="o", markersize=3.5, color=colors[split],
                            label=split, clip_on=False)  # points at exactly 0 or 1 stay whole
                level = list((chance or {}).get(split, {}).get(key, []))
                if level:
                    line, = ax.plot(range(1, len(level) + 1), level, color=colors[split],
                                    **CHANCE_STYLE)
                    line.set_gid(f"{CHANCE_GID}-{split}-{key}")  # SVG ids must be unique
            ax.set(title=title, xlabel="k")
            ax.set_ylabel(ylabel if ax is axes[0][0] else ylabel.split(":")[0])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10, min_n_ticks=1))
            ax.set_xlim(0.6, k_max + 0.4)
            ax.set_ylim(0.0, 1.0)
            ax.grid(alpha=0.3, linewidth=0.6)
        handles = [plt.Line2D([], [], color=colors[split], marker="o", markersize=3.5, label=split)
                   for split in curves]
        if chance:
            handles.append(plt.Line2D([], [], color="0.4", label="chance (random ranking)",
                                      **CHANCE_STYLE))
        _figure_legend(fig, handles=handles)
        sub = " · ".join(x for x in (f"run {run_name}" if run_name else None, subtitle) if x)
        _titles(fig, "Recall@k", sub or None, titles)
    return fig


def plot_recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], out_png: str | Path,
                       chance: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                       run_name: str | None = None, subtitle: str | None = None,
                       titles: bool = True) -> Path:
    """recall_figure written as PNG, PDF and SVG. Returns the PNG path."""
    return _save(recall_figure(curves, chance, run_name, subtitle, titles), out_png)


def rank_histogram(ranks: np.ndarray, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges [bins + 1], captions per rank [bins]) on log-spaced bins of whole ranks. Rank r
    spans [r - 0.5, r + 0.5): its tick sits in the middle of its bar, and the R@k line (ranks
    <= k) at k + 0.5, between the bars of k and k + 1."""
    edges = np.unique(np.round(np.geomspace(1, n_candidates + 1, num=min(40, n_candidates) + 1))) - 0.5
    counts, _ = np.histogram(np.asarray(ranks), bins=edges)
    return edges, counts / np.diff(edges)


def draw_rank_histogram(ranks: np.ndarray, n_candidates: int, split: str, titles: bool = True):
    """Histogram of the true clip's rank (t2a) on log-spaced bins, as captions per rank (a bin's
    count over the ranks it spans, so bins of 1 or 2 integer ranks compare), with the flat line a
    random ranking would give and the R@1/5/10 cut-offs -> the matplotlib figure.

    A rate, not a count: a bar of 3 captions over 10 ranks is 0.3, so the y ticks are 1-2-5
    steps of a log axis, fractions included, rather than integers."""
    import matplotlib.ticker

    ranks = np.asarray(ranks)
    edges, per_rank = rank_histogram(ranks, n_candidates)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.8, 3.3), constrained_layout=True)
        ax.stairs(per_rank, edges, fill=True, color="tab:blue", alpha=0.85, label="captions")
        ax.axhline(len(ranks) / n_candidates, color="0.4", label="chance (random ranking)",
                   **CHANCE_STYLE)
        for k in (1, 5, 10):
            if k < n_candidates:
                ax.axvline(k + 0.5, color="tab:red", linewidth=0.8, alpha=0.6)
                ax.text(k + 0.5, 0.99, f" R@{k}", transform=ax.get_xaxis_transform(), va="top",
                        fontsize=9, color="tab:red")
        ax.set_yscale("log")
        # 1-2-5 steps: a plain log axis labels only decades, often a single tick here
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        low = min([len(ranks) / n_candidates] + per_rank[per_rank > 0].tolist())
        ax.set_ylim(bottom=low / 3)
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
                 if t <= n_candidates]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(0.5, n_candidates + 0.5)
        ax.set(xlabel="rank of the true clip (log scale)",
               ylabel="captions per rank (log scale)")
        _finish_axes(ax, legend=False)
        _figure_legend(fig, [ax])
        _titles(fig, "Rank of the true clip", f"{split}: text → audio, {len(ranks)} captions, "
                f"{n_candidates} clips (median rank {np.median(ranks):g})", titles)
    return fig


def plot_rank_histogram(ranks: np.ndarray, n_candidates: int, split: str, out_png: str | Path,
                        titles: bool = True) -> Path:
    """`draw_rank_histogram` as PNG, PDF and SVG (`_save`)."""
    return _save(draw_rank_histogram(ranks, n_candidates, split, titles), out_png)


def plot_run_figures(run_dir: str | Path, results: Sequence, plots_dir: str | Path | None = None,
                     cfg: dict | None = None) -> list[Path]:
    """The standard figures of an evaluated run -> [PNG paths] (PDF and SVG beside each):
    `plots/training_curves.png` (when metrics.jsonl exists), `plots/recall_at_k.png` and
    `plots/{split}_t2a_rank_histogram.png`.

    results: utils.evaluation.SplitResult of each split. The best checkpoint's epoch and the
    training monitor come from `checkpoints/best.pt` and `cfg`; the validation chance level
    from the result of cfg's data.val_split, when it was evaluated."""
    from utils.evaluation import checkpoint_epoch
    from utils.runs import METRICS_JSONL, checkpoint_path

    run_dir = Path(run_dir)
    plots_dir = Path(plots_dir) if plots_dir else run_dir / "plots"
    remove_stale_temps(plots_dir)  # of a killed earlier run (postprocessing 02 holds the lock)
    titles = (cfg or {}).get("eval", {}).get("figure_titles", True)
    best = checkpoint_epoch(checkpoint_path(run_dir, "best"))
    val_split = (cfg or {}).get("data", {}).get("val_split")
    val = next((r for r in results if r.split == val_split), None)
    written = []
    if (run_dir / METRICS_JSONL).is_file():
        written.append(plot_training_curves(
            run_dir / METRICS_JSONL, plots_dir / "training_curves.png", run_name=run_dir.name,
            best_epoch=best, monitor=(cfg or {}).get("training", {}).get("monitor"),
            chance_map=val.chance["t2a"]["mAP@10"] if val is not None else None, cfg=cfg,
            titles=titles))
    which = (cfg or {}).get("eval", {}).get("checkpoint")
    epoch = checkpoint_epoch(checkpoint_path(run_dir, which)) if which else None
    written.append(plot_recall_curves(
        {r.split: r.curves for r in results}, plots_dir / "recall_at_k.png",
        chance={r.split: r.chance_curves for r in results}, run_name=run_dir.name,
        subtitle=f"checkpoint {which} (epoch {epoch})" if which else None, titles=titles))
    for r in results:
        written.append(plot_rank_histogram(r.ranks, r.n_clips, r.split,
                                           plots_dir / f"{r.split}_t2a_rank_histogram.png", titles))
    return written
