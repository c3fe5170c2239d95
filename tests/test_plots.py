"""utils.plots: training curves from metrics.jsonl and recall@k curves, as PNG (>= 150 dpi) plus
PDF and SVG; integer epoch ticks, chance level, best epoch and run name on the figures."""
import json
import os
import subprocess
import sys

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from utils import evaluation, scores_db
from utils.errors import UserError
from utils.plots import (BEST_GID, CHANCE_GID, RING_GID, figure_paths, plot_recall_curves, plot_run_figures,
                         plot_training_curves, read_metrics_jsonl, recall_figure, training_figure)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n=6):
    return [{"epoch": e, "train_loss": 4.0 / e, "val_loss": 4.2 / e + 0.1, "val_t2a_mAP@10": 0.1 * e,
             "val_t2a_R@1": 0.05 * e, "val_t2a_R@5": 0.1 * e, "val_t2a_R@10": 0.12 * e,
             "lr": 0.001, "seconds": 12.5} for e in range(1, n + 1)]


def _write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100  # [height, width, RGBA]
    assert min(Image.open(path).info["dpi"]) >= 150
    pdf, svg = figure_paths(path)[1:]  # the vector copies beside it
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert not list(path.parent.glob(".*.tmp"))  # the atomic writes left no temp file


def _visible_ticks(ax, axis="x"):
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t in ticks if lo <= t <= hi]


def _lines(ax, prefix):
    return [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith(prefix)]


def test_training_curves_png(tmp_path):
    jsonl = _write_jsonl(tmp_path / "metrics.jsonl", _records())
    out = plot_training_curves(jsonl, tmp_path / "plots" / "training.png")  # parent created
    assert out == tmp_path / "plots" / "training.png"
    _assert_png(out)


def test_truncated_last_line_is_tolerated(tmp_path):
    jsonl = _write_jsonl(tmp_path / "metrics.jsonl", _records(3), tail='{"epoch": 4, "train_lo')
    assert [r["epoch"] for r in read_metrics_jsonl(jsonl)] == [1, 2, 3]
    _assert_png(plot_training_curves(jsonl, tmp_path / "training.png"))


def test_missing_keys_are_tolerated(tmp_path):
    records = [{"epoch": 1, "train_loss": 3.0}, {"epoch": 2, "train_loss": 2.5, "val_loss": 2.7},
               {"epoch": 3, "val_t2a_mAP@10": 0.2, "val_loss": None}]
    jsonl = _write_jsonl(tmp_path / "metrics.jsonl", records)
    _assert_png(plot_training_curves(jsonl, tmp_path / "training.png"))


def test_empty_jsonl_is_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="metrics.jsonl: no epoch records"):
        plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "training.png")
    assert not (tmp_path / "training.png").exists()


def test_only_a_truncated_line_is_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "tr', encoding="utf-8")
    with pytest.raises(UserError, match="no epoch records"):
        plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "training.png")


def test_corrupt_middle_line_names_the_line(tmp_path):
    text = json.dumps(_records(1)[0]) + "\nnot json\n" + json.dumps(_records(2)[1]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "training.png")


def test_missing_jsonl_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plot_training_curves(tmp_path / "absent.jsonl", tmp_path / "training.png")


def test_recall_curves_png(tmp_path):
    curves = {"validation": {"t2a": [0.1, 0.2, 0.3, 0.4, 0.5], "a2t": [0.15, 0.25, 0.35, 0.45, 0.55]},
              "evaluation": {"t2a": [0.12, 0.22, 0.32, 0.42, 0.52], "a2t": [0.1, 0.3, 0.4, 0.5, 0.6]}}
    out = plot_recall_curves(curves, tmp_path / "deep" / "recall.png")
    assert out == tmp_path / "deep" / "recall.png"
    _assert_png(out)


def test_recall_curves_one_direction_missing(tmp_path):
    _assert_png(plot_recall_curves({"evaluation": {"t2a": [0.5, 0.7, 0.9]}}, tmp_path / "recall.png"))


def test_recall_curves_empty_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        plot_recall_curves({}, tmp_path / "recall.png")


# --------------------------------------------------------------------------- paper-ready figures

@pytest.mark.parametrize("n_epochs, want", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3])])
def test_epoch_ticks_are_integers(n_epochs, want):
    fig = training_figure(_records(n_epochs), run_name="r", best_epoch=1)
    for ax in fig.axes:
        assert _visible_ticks(ax) == want
    plt.close(fig)


def test_long_run_ticks_are_integers():
    fig = training_figure(_records(80))
    ticks = _visible_ticks(fig.axes[0])
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


def test_training_figure_marks_chance_best_epoch_and_run(tmp_path):
    fig = training_figure(_records(6), run_name="demo-20260101-000000", best_epoch=4,
                          monitor="val_loss", chance_map=0.029)
    ax_loss, ax_map = fig.axes
    [chance] = _lines(ax_map, CHANCE_GID)
    assert set(chance.get_ydata()) == {0.029}
    for ax in (ax_loss, ax_map):
        [best] = _lines(ax, BEST_GID)
        assert set(best.get_xdata()) == {4}
    texts = [t.get_text() for t in fig.texts]
    assert "run demo-20260101-000000" in texts
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "best checkpoint: epoch 4 (by val_loss)" in labels and "chance (random ranking)" in labels
    # the ring marks the monitored curve's point only
    assert [len(_lines(ax, RING_GID)) for ax in fig.axes] == [1, 0]
    plt.close(fig)
    fig = training_figure(_records(6), best_epoch=4, monitor="val_t2a_mAP@10")
    assert [len(_lines(ax, RING_GID)) for ax in fig.axes] == [0, 1]
    plt.close(fig)
    fig = training_figure(_records(6), best_epoch=4, monitor="val_t2a_R@1")  # not drawn: no ring
    assert [len(_lines(ax, RING_GID)) for ax in fig.axes] == [0, 0]
    assert [len(_lines(ax, BEST_GID)) for ax in fig.axes] == [1, 1]
    plt.close(fig)


def test_chance_line_is_in_the_svg(tmp_path):
    jsonl = _write_jsonl(tmp_path / "metrics.jsonl", _records(2))
    out = plot_training_curves(jsonl, tmp_path / "t.png", run_name="r", best_epoch=2, chance_map=0.05)
    _assert_png(out)
    svg = out.with_suffix(".svg").read_text(encoding="utf-8")
    assert f'id="{CHANCE_GID}-validation-mAP"' in svg and f'id="{BEST_GID}"' in svg


def test_recall_figure_has_a_chance_line_per_split_and_panel(tmp_path):
    curves = {"validation": {"t2a": [0.2, 0.4, 0.5], "a2t": [0.1, 0.2, 0.3], "a2t_any": [0.4, 0.6, 0.7]},
              "evaluation": {"t2a": [0.1, 0.3, 0.4], "a2t": [0.1, 0.1, 0.2], "a2t_any": [0.3, 0.5, 0.6]}}
    chance = {split: {"t2a": [0.1, 0.2, 0.3], "a2t": [0.02, 0.04, 0.06], "a2t_any": [0.1, 0.19, 0.27]}
              for split in curves}
    fig = recall_figure(curves, chance, run_name="my-run", subtitle="checkpoint best (epoch 3)")
    assert [ax.get_title() for ax in fig.axes] == ["text → audio", "audio → text (baseline R@k)",
                                                  "audio → text (CLAP-style R@k_any)"]
    for ax, key in zip(fig.axes, ("t2a", "a2t", "a2t_any")):
        lines = _lines(ax, CHANCE_GID)
        assert sorted(ln.get_gid() for ln in lines) == [f"chance-evaluation-{key}",
                                                        f"chance-validation-{key}"]
        assert list(lines[0].get_ydata()) == chance["validation"][key]
        assert _visible_ticks(ax) == [1, 2, 3]
    assert "run my-run · checkpoint best (epoch 3)" in [t.get_text() for t in fig.texts]
    plt.close(fig)
    out = plot_recall_curves(curves, tmp_path / "recall.png", chance=chance, run_name="my-run")
    _assert_png(out)
    assert out.with_suffix(".svg").read_text().count(f'id="{CHANCE_GID}-') == 6


def test_plot_run_figures_from_evaluated_splits(tmp_path):
    """What postprocessing/02 draws: both figures, chance from the validation split, best epoch
    from checkpoints/best.pt."""
    import torch

    run = tmp_path / "outputs" / "demo-1"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 2}, run / "checkpoints" / "best.pt")
    _write_jsonl(run / "metrics.jsonl", _records(3))
    rng = np.random.default_rng(0)
    results = []
    for split in ("validation", "evaluation"):
        s = scores_db.ScoredSplit(split, [f"f{i}" for i in range(8)], [f"{i}.wav" for i in range(8)],
                                  [f"t{i}" for i in range(40)], ["c"] * 40, np.repeat(np.arange(8), 5),
                                  rng.standard_normal((40, 8)).astype(np.float32))
        results.append(evaluation.evaluate_split(s))
    cfg = {"data": {"val_split": "validation"}, "training": {"monitor": "val_loss"},
           "eval": {"checkpoint": "best"}}
    (run / "plots").mkdir()
    stale = run / "plots" / ".recall_at_k.svg.0badf00d.tmp"  # of a killed earlier run
    stale.write_text("half a figure")
    written = plot_run_figures(run, results, cfg=cfg)
    assert not stale.exists()
    splits = [r.split for r in results]
    assert [p.name for p in written] == ["training_curves.png", "recall_at_k.png"] + \
        [f"{s}_t2a_rank_histogram.png" for s in splits]
    for path in written:
        _assert_png(path)
        assert path.with_suffix(".pdf").is_file() and path.with_suffix(".svg").is_file()  # for papers
    svg = written[0].with_suffix(".svg").read_text()
    assert f'id="{CHANCE_GID}-validation-mAP"' in svg and f'id="{BEST_GID}"' in svg


def test_the_training_figure_says_how_far_the_run_got():
    from utils.plots import epochs_note

    cfg = {"training": {"epochs": 30, "early_stopping": 1, "monitor": "val_t2a_mAP@10"}}
    assert epochs_note(_records(5), cfg, best_epoch=4) == \
        "5 of 30 epochs (stopped early: no better val_t2a_mAP@10 for 1)"
    assert epochs_note(_records(5), cfg, best_epoch=5) == "5 of 30 epochs"  # still going
    assert epochs_note(_records(6), {"training": {"epochs": 6, "early_stopping": 0}}, 6) == "6 of 6 epochs"
    assert epochs_note([], cfg, None) is None and epochs_note(_records(2), None, 1) is None
    fig = training_figure(_records(5), run_name="r", best_epoch=4,
                          epochs_note=epochs_note(_records(5), cfg, 4))
    assert "run r · 5 of 30 epochs (stopped early: no better val_t2a_mAP@10 for 1)" in \
        [t.get_text() for t in fig.texts]
    plt.close(fig)


def test_figures_without_titles_for_a_paper(tmp_path):
    """eval.figure_titles: false leaves the title and the run/checkpoint subtitle to the paper's
    caption; the panels keep their own titles."""
    from utils.plots import draw_rank_histogram

    curves = {"evaluation": {"t2a": [0.1, 0.3, 0.4], "a2t": [0.1, 0.1, 0.2]}}
    figs = [training_figure(_records(3), run_name="r", best_epoch=2, titles=False),
            recall_figure(curves, run_name="r", subtitle="checkpoint best (epoch 2)", titles=False),
            draw_rank_histogram(np.array([1, 2, 3, 9]), 10, "evaluation", titles=False)]
    for fig in figs:
        assert fig.get_suptitle() == "" and not fig.texts
        plt.close(fig)
    titled = draw_rank_histogram(np.array([1, 2, 3, 9]), 10, "evaluation")
    assert "evaluation: text → audio, 4 captions, 10 clips (median rank 2.5)" in \
        [t.get_text() for t in titled.texts]
    plt.close(titled)


def test_rank_histogram_has_the_shared_style_and_says_what_it_counts():
    from utils.plots import STYLE, draw_rank_histogram

    ranks = np.minimum(np.random.default_rng(0).geometric(0.05, 750), 150)
    fig = draw_rank_histogram(ranks, 150, "evaluation")
    [ax] = fig.axes
    assert not ax.spines["top"].get_visible() and not ax.spines["right"].get_visible()
    assert ax.xaxis.label.get_fontsize() == STYLE["axes.labelsize"]
    assert fig.legends and ax.get_legend() is None  # under the panel, as the other figures'
    # a rate (a bar's count over the ranks it spans), so fractions are real values; ticks in
    # 1-2-5 steps label more than the decades
    assert ax.get_ylabel().startswith("captions per rank")
    ticks = _visible_ticks(ax, "y")
    assert {0.1, 0.2, 0.5, 1, 2, 5, 10} <= {round(t, 6) for t in ticks}
    plt.close(fig)


def test_plot_run_figures_follows_eval_figure_titles(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", _records(2))
    s = scores_db.ScoredSplit("evaluation", [f"f{i}" for i in range(4)], [f"{i}.wav" for i in range(4)],
                              [f"t{i}" for i in range(8)], ["c"] * 8, np.repeat(np.arange(4), 2),
                              np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    results = [evaluation.evaluate_split(s)]
    for titles in (True, False):
        cfg = {"eval": {"checkpoint": "best", "figure_titles": titles}}
        written = plot_run_figures(run, results, plots_dir=tmp_path / str(titles), cfg=cfg)
        svgs = [p.with_suffix(".svg").read_text() for p in written]
        assert [("run run" in svg) == titles for svg in svgs[:2]] == [True, True]
        assert ("Rank of the true clip" in svgs[2]) == titles


def test_training_legend_gives_the_long_best_checkpoint_entry_its_own_column():
    """Filled column by column, the legend put the best-checkpoint entry under "validation
    mAP@10": that column took its width and left a wide gap before "chance"."""
    fig = training_figure(_records(6), best_epoch=4, monitor="val_loss", chance_map=0.03)
    [legend] = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["train loss", "validation loss", "validation mAP@10", "chance (random ranking)",
                      "best checkpoint: epoch 4 (by val_loss)"]
    plt.close(fig)



BACKEND_AFTER_IMPORT = """
import json, sys
from pathlib import Path
import matplotlib
if sys.argv[1] == "chosen":  # a notebook: its backend is chosen and pyplot imported first
    matplotlib.use("svg")
    import matplotlib.pyplot
from utils.plots import plot_training_curves, plt
out = Path(sys.argv[2])
records = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e} for e in (1, 2)]
(out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
plot_training_curves(out / "metrics.jsonl", out / "training_curves.png")
print(plt.get_fignums(), matplotlib.get_backend().lower())
"""


@pytest.mark.parametrize("before, env, want", [("chosen", {}, "svg"), ("none", {"MPLBACKEND": "svg"}, "svg"),
                                               ("none", {}, "agg")])
def test_importing_utils_plots_keeps_a_backend_the_process_chose(repo, tmp_path, before, env, want):
    """utils.plots selected Agg at import whatever was chosen before, which switched a notebook's
    inline backend (its figures stopped showing); now Agg only where nothing chose a backend (a
    script: pyplot not imported, MPLBACKEND unset). The figures are written either way, and
    none is left open for a notebook to show."""
    clean = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", BACKEND_AFTER_IMPORT, before, str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"[] {want}"
    _assert_png(tmp_path / "training_curves.png")
