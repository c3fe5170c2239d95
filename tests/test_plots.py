"""utils.plots: training curves from metrics.jsonl and recall@k curves, as valid PNG files."""
import json

import matplotlib.image
import pytest

from utils.errors import UserError
from utils.plots import plot_recall_curves, plot_training_curves, read_metrics_jsonl

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
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file


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
