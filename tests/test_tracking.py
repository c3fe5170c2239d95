"""Tracking without an account: metrics.jsonl always, wandb offline into the run directory."""

import pytest

from tests.tiny_data import REPO
from utils.config import load_config
from utils.errors import UserError
from utils.tracking import Tracker, read_jsonl, wandb_mode


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
