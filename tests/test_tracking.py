"""Tracking without an account: metrics.jsonl always, wandb offline into the run directory."""
import json

import numpy as np
import pytest
import soundfile as sf

from tests.tiny_data import REPO
from utils.config import load_config
from utils.errors import UserError
from utils.tracking import Tracker, history_rows, read_jsonl, read_wandb_file, wandb_mode, wandb_segments


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, with its data, cache and config directories inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return load_config(REPO / "conf.yaml")


def segment_records(run_dir, run_id):
    return [read_wandb_file(path) for path in wandb_segments(run_dir, run_id)]


def test_offline_wandb_run_writes_locally_and_resumes_the_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(REPO / "conf.yaml")
    tracker = Tracker(cfg, tmp_path)
    tracker.log_epoch({"epoch": 1, "train_loss": 2.0, "val_loss": 1.5})
    tracker.finish()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5}]

    again = Tracker(cfg, tmp_path, job_type="eval")  # postprocessing adds to the same run
    again.finish()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id


def test_mode_from_environment_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"  # not logged in
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_rewind_drops_records_after_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(REPO / "conf.yaml"), tmp_path)
    for epoch in (1, 2, 3):
        tracker.log_epoch({"epoch": epoch})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "trunc')  # killed while writing
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    tracker.rewind(2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl(tmp_path / "m.jsonl")
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_tables_audio_histogram_and_images_land_in_the_offline_run(tmp_path, offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    clip = tmp_path / "clip.ogg"
    sf.write(clip, np.sin(np.arange(8000) / 5).astype(np.float32), 16000, format="OGG", subtype="VORBIS")
    png = tmp_path / "plot.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure()
    plt.plot([0, 1])
    plt.savefig(png)
    plt.close()

    tracker = Tracker(offline, run_dir, job_type="eval")
    tracker.log_table("retrieval", ["caption", "rank", "top1"], [["a dog", 1, "d.wav"], ["rain", 7, "r.wav"]])
    tracker.log_audio_table("listen", ["caption", "clip", "true_clip"],
                            [["a dog", str(clip), None], ["rain", None, clip]], ["clip", "true_clip"])
    tracker.log_histogram("rank_hist", [1, 2, 2, 5, 9], num_bins=4)
    tracker.log_images({"plots/recall": png})
    tracker.finish()

    (records,) = segment_records(run_dir, tracker.run_id)
    row = {}
    for _, r in history_rows(records):
        row.update(r)
    assert row["retrieval._type"] == "table-file" and row["retrieval.nrows"] == 2
    assert row["listen._type"] == "table-file" and row["listen.ncols"] == 3
    assert row["rank_hist._type"] == "histogram" and sum(row["rank_hist.values"]) == 5
    assert len(row["rank_hist.bins"]) == 5
    assert row["plots/recall._type"] == "image-file"
    # the audio table is a run artifact: the table's json and the clip it plays
    (listen,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.name.endswith("-listen")]
    entries = {e.path: e.local_path for e in listen.manifest.contents}
    table = json.loads(open(entries["listen.table.json"]).read())
    assert table["columns"] == ["caption", "clip", "true_clip"]
    (first, second) = table["data"]
    assert first[1]["_type"] == "audio-file" and first[1]["path"] in entries and first[2] is None
    assert second[1] is None and second[2]["path"] == first[1]["path"]


def test_media_are_no_ops_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(REPO / "conf.yaml"), tmp_path)
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_audio_table("a", ["clip"], [["/nonexistent.ogg"]], ["clip"])
    tracker.log_histogram("h", [1, 2])
    tracker.log_images({"p": "/nonexistent.png"})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
