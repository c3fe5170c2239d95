"""--resume: a run killed with SIGKILL mid-epoch ends exactly as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.cli_helpers import error_line, signal_after_first_checkpoint
from tests.test_training import main_in_process, script_env, train_in_process
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import train_utils
from utils.checkpoint import load_checkpoint
from utils.config import load_config, save_config
from utils.runs import new_run_dir
from utils.tracking import read_jsonl

EPOCHS = 3


@pytest.fixture
def conf(tmp_path):
    # 32 training clips x 5 captions / batch 8 = 20 steps an epoch: long enough to kill mid-epoch
    make_tiny_features(tmp_path / "data", n_clips=(32, 6, 6))
    return tiny_config(tmp_path, {"training": {"epochs": EPOCHS, "num_workers": 0, "max_frames": 80}})


@pytest.fixture(params=[0, 2], ids=["no-workers", "2-workers"])
def conf_workers(request, tmp_path):
    """`conf`, with the DataLoaders in the main process or in worker processes (whose seeds,
    drawn as each epoch's loaders start, must follow the same streams after a resume)."""
    # 64 clips: 40 steps an epoch. Epoch 1's checkpoint is written in the background and may
    # appear only as epoch 2 ends; epoch 3 must then still outlast the kill's delay below
    make_tiny_features(tmp_path / "data", n_clips=(64, 6, 6))
    return tiny_config(tmp_path, {"training": {"epochs": EPOCHS, "num_workers": request.param,
                                               "max_frames": 80}})


def _epoch_of(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(conf_workers, tmp_path, monkeypatch, capsys):
    conf = conf_workers
    out = tmp_path / "outputs"
    # far more epochs than it is given time for: however fast the machine, the kill lands mid-run
    victim = subprocess.Popen([sys.executable, "main.py", "--conf", str(conf), "--name", "killed",
                               "--set", "training.epochs=50"],
                              cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    last = out / "killed" / "checkpoints" / "last.pt"
    started = time.time()
    try:
        while not last.exists():
            assert victim.poll() is None, "the run ended before its first checkpoint"
            assert time.time() - started < 120, "no checkpoint after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # a checkpoint is saved; a later epoch (40 steps, ~0.8 s) is under way
        assert victim.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_at = _epoch_of(last)
    assert killed_at >= 1
    epochs = killed_at + 2  # the resumed run trains on past the kill, and past one more epoch end
    # the reference: the same run, never interrupted (training.epochs steers nothing else)
    reference = subprocess.Popen([sys.executable, "main.py", "--conf", str(conf), "--name", "ref",
                                  "--set", f"training.epochs={epochs}"],
                                 cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)

    stale = out / "killed" / "checkpoints" / ".last.pt.k1ll3d.tmp"  # a save cut by the kill
    stale.write_bytes(b"half a checkpoint")
    resumed = main_in_process(monkeypatch, capsys, "--resume", out / "killed", "--set", f"training.epochs={epochs}")
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists()
    assert f"resuming after epoch {killed_at}" in resumed.stdout
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    records = read_jsonl(out / "killed" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))  # each epoch exactly once
    state = load_checkpoint(last)
    ref = load_checkpoint(out / "ref" / "checkpoints" / "last.pt")
    assert state["epoch"] == ref["epoch"] == epochs
    # Same seed, CPU: the resumed run is the uninterrupted run, bit for bit.
    for key, value in ref["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=1e-5, msg=key)
    ref_records = read_jsonl(out / "ref" / "metrics.jsonl")
    for a, b in zip(records, ref_records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert state["best_epoch"] == ref["best_epoch"]
    assert state["best_metric"] == pytest.approx(ref["best_metric"], abs=1e-6)


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(tmp_path):
    """A cluster's time limit sends SIGTERM (SIGKILL follows): the run stops at once, with the
    checkpoint under way finished, and prints the --resume command."""
    make_tiny_features(tmp_path / "data", n_clips=(96, 6, 6))  # 60 steps an epoch, as test_cli's
    # loader workers, all signalled with the run (as a cluster does): torch's handler in a
    # worker would end it, and the run would fail on "worker killed by signal"
    conf = tiny_config(tmp_path, {"training": {"epochs": EPOCHS, "num_workers": 2}})
    run = tmp_path / "outputs" / "term"
    proc = subprocess.Popen([sys.executable, "main.py", "--conf", str(conf), "--name", "term"],
                            cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = signal_after_first_checkpoint(proc, run, signal.SIGTERM, group=True)
    assert proc.returncode == 143, err
    kept = _epoch_of(run / "checkpoints" / "last.pt")
    assert 1 <= kept < EPOCHS
    # the epoch whose checkpoint a stop finished writing is named: its log line may not be there
    assert f"terminated (SIGTERM): epochs 1-{kept} are kept in {run}; resume with:" in err and "--resume" in err
    assert "Traceback" not in err


def test_resume_before_the_first_checkpoint_starts_over(conf, tmp_path, monkeypatch, capsys):
    cfg = load_config(conf, ["training.epochs=1"])
    run = new_run_dir(cfg, "early")  # what a run killed during epoch 1 leaves behind
    save_config(cfg, run)
    proc = main_in_process(monkeypatch, capsys, "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert _epoch_of(run / "checkpoints" / "last.pt") == 1
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]


def test_resume_of_a_finished_run_trains_nothing_more(conf, tmp_path, monkeypatch, capsys):
    run = train_in_process(conf, "done", ["training.epochs=1"]).run_dir
    before = (run / "checkpoints" / "last.pt").read_bytes()
    proc = main_in_process(monkeypatch, capsys, "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert f"nothing to train: {run} has finished 1 epochs of training.epochs=1" in proc.stdout
    assert "wrote" not in proc.stdout and "trained" not in proc.stdout
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    # the run's own config.yaml rules, not --conf (run.sh passes it to every stage): the keys
    # it sets otherwise are named, so that they do not look applied
    other = tmp_path / "more.yaml"
    other.write_text(f"base: {conf}\ntraining:\n  epochs: 3\ndemo:\n  sizes:\n    development: 5\n")
    proc = main_in_process(monkeypatch, capsys, "--conf", other, "--resume", run)
    assert proc.returncode == 0 and "nothing to train" in proc.stdout
    assert (f"note: --resume reads {run / 'config.yaml'}, not {other}, which gives training.epochs "
            "(3 from more.yaml, 1 in the run); change keys with --set") in proc.stderr
    assert "demo." not in proc.stderr  # training does not read it: no news
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--resume", run, "--set", "training.epochs=1")
    assert "note:" not in proc.stderr  # the same keys: nothing to say
    # ... and more epochs may be asked for; the saved config follows. An epoch that does not
    # beat the best leaves best.pt as it was: "wrote" names only what was written
    best_before = (run / "checkpoints" / "best.pt").stat().st_mtime_ns
    monkeypatch.setattr(train_utils, "improved", lambda *args: False)
    proc = main_in_process(monkeypatch, capsys, "--resume", run, "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {run / 'checkpoints' / 'last.pt'}" in proc.stdout and "best.pt" not in proc.stdout
    assert f"wrote {run / 'config.yaml'}" in proc.stdout
    assert (run / "checkpoints" / "best.pt").stat().st_mtime_ns == best_before
    assert _epoch_of(run / "checkpoints" / "last.pt") == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 2
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_ctrl_c_in_the_first_epoch_leaves_no_folder_and_says_so(conf, tmp_path, monkeypatch, capsys):

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_utils, "fit", interrupted)
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "cc")
    assert proc.returncode == 130
    assert "no epoch had finished, so nothing is kept" in proc.stderr and "--resume" not in proc.stderr
    assert not (tmp_path / "outputs" / "cc").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(conf, monkeypatch):
    from utils import runs

    cfg = load_config(conf)
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261126-120000")
    made = [new_run_dir(cfg) for _ in range(3)]
    assert [p.name for p in made] == [f"{cfg['experiment']}-20261126-120000{s}" for s in ("", "-2", "-3")]
    assert all(p.is_dir() for p in made)


@pytest.mark.parametrize("corruption", ["truncated", "text"])
def test_corrupt_checkpoint_is_refused_and_kept(conf, tmp_path, monkeypatch, capsys, corruption):
    run = train_in_process(conf, "c", ["training.epochs=1"]).run_dir
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    bad = data[: len(data) // 2] if corruption == "truncated" else b"not a checkpoint\n"
    last.write_bytes(bad)
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = main_in_process(monkeypatch, capsys, "--resume", run)
    assert f"{last}: not a readable checkpoint" in error_line(proc)
    assert last.read_bytes() == bad  # nothing deleted or rewritten
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files


def test_a_last_pt_from_another_run_is_refused_before_training(conf, tmp_path, monkeypatch, capsys):
    """A last.pt copied in from a run of the same width but other settings (here Adam's lr, which
    the restored optimizer would silently keep) is named as not this run's; nothing is trained,
    and no "resuming after epoch N" is printed first."""
    ours = train_in_process(conf, "ours", ["training.epochs=1"]).run_dir
    theirs = train_in_process(conf, "theirs", ["training.epochs=1", "training.lr=0.002"]).run_dir
    mine = (ours / "checkpoints" / "last.pt").read_bytes()
    (ours / "checkpoints" / "last.pt").write_bytes((theirs / "checkpoints" / "last.pt").read_bytes())
    proc = main_in_process(monkeypatch, capsys, "--resume", ours, "--set", "training.epochs=2")
    line = error_line(proc)
    assert f"{ours / 'checkpoints' / 'last.pt'}: written by a run with training.lr 0.002 (the run: 0.001)" in line
    assert "not this run's checkpoint" in line and "resuming" not in proc.stdout
    assert [r["epoch"] for r in read_jsonl(ours / "metrics.jsonl")] == [1]
    # the advice works: with its own last.pt back, the run goes on
    (ours / "checkpoints" / "last.pt").write_bytes(mine)
    proc = main_in_process(monkeypatch, capsys, "--resume", ours, "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert _epoch_of(ours / "checkpoints" / "last.pt") == 2


_FAILING_WORKER = """
import os, runpy, signal, sys
from utils import data_utils
read, failure = data_utils.CaptionDataset.__getitem__, sys.argv[1]
def failing(self, i):
    if self.train and i % 7 == 3:  # in a loader worker, a few batches in
        if failure == "bug":
            raise ValueError("a bug in a loader worker")
        if failure == "sigterm":  # a cluster's SIGTERM to the group, as a worker starts
            import torch
            if torch.utils.data.get_worker_info().id == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # its init function not run yet
                os.kill(os.getppid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return read(self, i)
        os.kill(os.getpid(), signal.SIGKILL)  # the out-of-memory killer
    return read(self, i)
data_utils.CaptionDataset.__getitem__ = failing
sys.argv = ["main.py"] + sys.argv[2:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.parametrize("failure", ["bug", "worker killed"])
def test_an_unexpected_failure_with_loader_workers_exits_at_once(conf, tmp_path, failure):
    """The failed frames held the DataLoaders, and at exit multiprocessing waited for workers
    that leave SIGTERM to the parent: the process never ended (under torchrun the other ranks
    waited in a collective for an hour). Now it ends in seconds: a bug with its traceback, a
    killed worker in one line, both with how to resume."""
    make_tiny_features(tmp_path / "data", n_clips=(32, 6, 6))
    driver = tmp_path / "driver.py"
    driver.write_text(_FAILING_WORKER)
    args = [sys.executable, str(driver), failure.split()[0], "--conf", str(conf), "--name", "w",
            "--set", "training.num_workers=2"]
    try:
        proc = subprocess.run(args, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end after the failure (it waits for its loader workers)")
    if failure == "bug":
        assert proc.returncode == 1 and "a bug in a loader worker" in proc.stderr, proc.stderr
        assert "error: stopped by the unexpected error above; no epoch had finished" in proc.stderr
    else:
        line = error_line(proc)
        assert "DataLoader worker (pid" in line and "is killed by signal: Killed (out of memory?)" in line
        assert "(training.num_workers when training)" in line and "Traceback" not in proc.stderr


def test_a_worker_the_sigterm_ended_first_is_the_stop_not_a_machine_out_of_memory(conf, tmp_path):
    """SIGTERM to the process group can end a loader worker before it ignores SIGTERM (it
    starts with torch's handler); the parent heard of the dead worker first or while stopping,
    and said "worker killed (out of memory?)", exit 2, or printed a traceback at exit (2 of
    ~40 stops)."""
    make_tiny_features(tmp_path / "data", n_clips=(32, 6, 6))
    driver = tmp_path / "driver.py"
    driver.write_text(_FAILING_WORKER)
    proc = subprocess.run([sys.executable, str(driver), "sigterm", "--conf", str(conf), "--name", "w",
                           "--set", "training.num_workers=2"],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 143, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM): "), proc.stderr
    assert "Traceback" not in proc.stderr and "out of memory" not in proc.stderr


def test_a_failure_that_cannot_even_be_reported_still_ends_the_workers(conf, tmp_path):
    """stderr whose reader is gone (a closed pipe, a log on a full disk): printing the
    traceback fails too, and the workers must be stopped all the same, or exit waits for them."""
    make_tiny_features(tmp_path / "data", n_clips=(32, 6, 6))
    driver = tmp_path / "driver.py"
    driver.write_text(_FAILING_WORKER)
    read, write = os.pipe()
    os.close(read)  # nobody reads stderr
    proc = subprocess.Popen([sys.executable, str(driver), "bug", "--conf", str(conf), "--name", "w",
                             "--set", "training.num_workers=2"],
                            cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=write)
    os.close(write)
    try:
        assert proc.wait(timeout=90) != 0
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not end after the failure (it waits for its loader workers)")
