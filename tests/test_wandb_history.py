"""wandb history across kill -9 and --resume: every epoch exactly once, steps always increasing.

An offline run is killed twice and resumed to the end; the offline `.wandb` transaction logs of
its three segments are decoded with wandb's own protobuf classes (utils.tracking's reader).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_tracking import offline_env
from tests.test_training import main_in_process, script_env
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils.tracking import history_rows, read_finished_segment, read_jsonl, wandb_segments

EPOCHS = 3
CAPTIONS = 12 * 5  # training captions of the tiny data: the steps of one epoch

# main.py with a kill -9 at a chosen moment (argv: when, epoch, main.py's arguments):
#   after-checkpoint  right after checkpoints/last.pt of that epoch is written, together with
#                     the wandb service (a job killed as a whole): what the service had not yet
#                     written to the segment's log is lost, as in a real kill;
#   after-wandb       right after the epoch's row reached the segment's log, before its
#                     checkpoint: the resumed run redoes an epoch that wandb already holds.
HARNESS = """
import os, runpy, signal, sys
import psutil
import wandb
import utils.tracking, utils.train_utils as tu

when, at = sys.argv[1], int(sys.argv[2])

def die():
    for child in psutil.Process().children(recursive=True):  # the wandb service
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)

save = tu.save_checkpoint
def save_then_die(path, state, **kwargs):  # runs in the checkpoint writer's thread
    save(path, state, **kwargs)
    if when == "after-checkpoint" and path.name == "last.pt" and int(state["epoch"]) == at:
        die()
tu.save_checkpoint = save_then_die

log_epoch = utils.tracking.Tracker.log_epoch
def log_then_die(self, record):
    log_epoch(self, record)
    if when == "after-wandb" and record["epoch"] == at:
        self.finish()
        wandb.teardown()  # waits for the service: the row is in the segment's log for sure
        die()
utils.tracking.Tracker.log_epoch = log_then_die

sys.argv = ["main.py", *sys.argv[3:]]
runpy.run_path("main.py", run_name="__main__")
"""


def run(tmp_path, *args, kill: tuple[str, int]) -> subprocess.CompletedProcess:
    """main.py `args` in a subprocess, killed as `kill` = (when, epoch) says (see HARNESS)."""
    env = dict(script_env(), **offline_env(tmp_path))
    # its own wandb service: not the one an earlier test started in this process (the killed
    # segment's stream would stay open there)
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-c", HARNESS, *map(str, kill), *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def conf(tmp_path):
    make_tiny_features(tmp_path / "data")  # 12 training clips x 5 captions, batch 8: 8 steps an epoch
    return tiny_config(tmp_path, {"training": {"epochs": EPOCHS, "log_every": 3}})


def test_epochs_once_each_with_increasing_steps_after_kill_9_and_resume(tmp_path, conf, monkeypatch, capsys):
    run_dir = tmp_path / "outputs" / "r"
    first = run(tmp_path, "--conf", conf, "--name", "r", kill=("after-checkpoint", 1))
    assert first.returncode == -9, first.stderr
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    second = run(tmp_path, "--resume", run_dir, kill=("after-wandb", 2))
    assert second.returncode == -9, second.stderr
    for var, value in offline_env(tmp_path).items():  # the last segment runs in this process
        monkeypatch.setenv(var, value)
    third = main_in_process(monkeypatch, capsys, "--resume", run_dir)
    assert third.returncode == 0, third.stderr
    assert "resuming after epoch 1" in third.stdout  # epoch 2 was redone
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, EPOCHS + 1))

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    segments = wandb_segments(run_dir, run_id)
    assert len(segments) == 3
    logs = [read_finished_segment(path) for path in segments]
    runs = [[r.run for r in records if r.WhichOneof("record_type") == "run"] for records in logs]
    # (the killed first segment may have lost even its run record)
    assert [r.resumed for r in runs[0]] in ([], [False])
    assert [r.resumed for r in runs[1] + runs[2]] == [True, True]
    assert {(r.run_group, r.job_type) for rs in runs for r in rs} == {(run_id, "train")}

    rows = [(k, step, row) for k, records in enumerate(logs) for step, row in history_rows(records)]
    steps = [step for _, step, _ in rows]
    assert steps == sorted(set(steps)), "steps must keep increasing across segments"
    epochs = [(k, row["epoch"]) for k, _, row in rows if "epoch" in row]
    assert sorted(e for _, e in epochs) == list(range(1, EPOCHS + 1)), epochs
    # segment 1 was killed before wandb wrote epoch 1's row (the pinned wandb holds a row until
    # the next step and writes its log in buffered blocks): segment 2 logged it from metrics.jsonl
    assert (1, 1) in epochs
    # epoch 2 reached wandb in segment 2; segment 3 redid it without logging it again
    assert (1, 2) in epochs and (2, 3) in epochs
    for _, step, row in rows:
        if "epoch" in row:
            assert step == row["epoch"] * CAPTIONS
            assert {"train_loss", "val_loss", "val_t2a_mAP@10", "lr"} <= row.keys()
    # the training-loss points: each step once, never behind the epoch rows (checked above)
    points = [step for _, step, row in rows if "train/loss" in row]
    assert points and all(0 < s <= EPOCHS * CAPTIONS for s in points)

    # the documented upload command accepts the run's wandb folder and finds every segment
    dry = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run_dir / "wandb")],
                         cwd=tmp_path, env=dict(script_env(), WANDB_CONFIG_DIR=str(tmp_path / "cfg")),
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"Would sync {len(segments)} run(s)" in dry.stdout + dry.stderr


def test_a_run_stopped_early_keeps_the_best_epochs_summary(tmp_path, conf, monkeypatch, capsys):
    """Ctrl-C (or a time limit) after epoch 2, whose numbers did not beat epoch 1's: the
    summary a sweep ranks runs by is still epoch 1's, not the last epoch's."""
    import utils.train_utils as tu
    from tests.test_tracking import segment_records, summary_updates

    for var, value in offline_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tu, "improved", lambda monitor, value, best: best is None)  # epoch 1 best
    train = tu.train_one_epoch

    def stop_at_3(tr, loader, epoch, *args, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt
        return train(tr, loader, epoch, *args, **kwargs)
    monkeypatch.setattr(tu, "train_one_epoch", stop_at_3)
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "r")
    assert proc.returncode == 130, proc.stderr
    run_dir = tmp_path / "outputs" / "r"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (log,) = segment_records(run_dir, run_id)
    summary = summary_updates(log)
    epoch1 = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert (summary["epoch"], summary["best_epoch"], summary["epochs_trained"]) == (1, 1, 2)
    assert summary["val_loss"] == epoch1["val_loss"]
