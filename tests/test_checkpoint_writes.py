"""Checkpoints written once an epoch, in the background: best.pt shares last.pt's file, training
goes on meanwhile, and nothing about safety changes (atomic files, a failed write is one line
and stops the run, a write under way is finished before the process ends)."""
from __future__ import annotations

import errno
import os
import time

import pytest
import torch

from tests.cli_helpers import error_line
from tests.test_training import main_in_process, run_dirs
from tests.tiny_data import make_tiny_features, tiny_config
from utils import train_utils as tu
from utils.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint, snapshot
from utils.tracking import read_jsonl


def test_best_is_a_second_name_of_last_and_keeps_its_content(tmp_path):
    last, best = tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "best.pt"
    save_checkpoint(last, {"model": {"w": torch.ones(3)}, "epoch": 1}, copies=[best])
    assert os.stat(last).st_ino == os.stat(best).st_ino  # written once
    assert load_checkpoint(best)["epoch"] == 1
    save_checkpoint(last, {"model": {"w": torch.zeros(3)}, "epoch": 2})  # not the best
    assert load_checkpoint(last)["epoch"] == 2
    assert load_checkpoint(best)["epoch"] == 1 and torch.equal(load_checkpoint(best)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp files


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV, errno.ENOTSUP])
def test_without_hard_links_best_is_a_copy(tmp_path, monkeypatch, code):
    def no_links(src, dst):
        raise OSError(code, os.strerror(code), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", no_links)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint(last, {"model": {"w": torch.arange(4.0)}, "epoch": 3}, copies=[best])
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_snapshot_does_not_follow_later_training():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    live = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": [(1, (2, 3), None)],
            "config": {"training": {"lr": 0.1, "list": [1, 2]}}}
    frozen = snapshot(live)
    before = {k: v.clone() for k, v in frozen["model"].items()}
    exp_avg = frozen["optimizer"]["state"][0]["exp_avg"].clone()
    opt.step()  # training goes on: parameters and Adam's moments change in place
    live["config"]["training"]["list"].append(3)
    assert all(torch.equal(frozen["model"][k], before[k]) for k in before)
    assert not torch.equal(frozen["model"]["weight"], model.weight.detach())
    assert torch.equal(frozen["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert frozen["config"]["training"]["list"] == [1, 2] and frozen["rng"] == [(1, (2, 3), None)]


def test_the_next_snapshot_reuses_the_buffers_of_the_finished_write(tmp_path):
    """No ~1 GB allocation at every epoch's end: epoch 2's copy goes into epoch 1's buffers,
    once epoch 1's file is written (and holds epoch 1's values)."""
    model = torch.nn.Linear(3, 2)
    writer = CheckpointWriter()
    first = writer.snapshot({"model": model.state_dict(), "epoch": 1})
    writer.submit("epoch 1", save_checkpoint, tmp_path / "last.pt", first)
    epoch1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    second = writer.snapshot({"model": model.state_dict(), "epoch": 2})
    assert second["model"]["weight"].data_ptr() == first["model"]["weight"].data_ptr()
    assert torch.equal(second["model"]["weight"], model.weight.detach()) and second["epoch"] == 2
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["epoch"] == 1 and torch.equal(saved["model"]["weight"], epoch1)
    bigger = writer.snapshot({"model": torch.nn.Linear(4, 2).state_dict()})  # a new shape: new buffer
    assert bigger["model"]["weight"].shape == (2, 4)


def test_snapshot_keeps_channels_last_strides_as_torch_save_does():
    """channels_last conv weights (and their Adam moments) come back in the layout they were
    trained in, as they did when checkpoints were torch.save'd straight from the model."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    frozen = snapshot({"w": conv.weight, "t": conv.weight.detach().transpose(0, 3)})  # and a view
    assert frozen["w"].stride() == conv.weight.stride()
    assert torch.equal(frozen["t"], conv.weight.detach().transpose(0, 3))
    again = snapshot({"w": conv.weight.detach().contiguous()}, into=frozen)  # another layout: new buffer
    assert again["w"].is_contiguous() and torch.equal(again["w"], conv.weight.detach())


def test_a_failed_background_write_is_raised_once_as_what_it_was():
    writer = CheckpointWriter()

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoints/last.pt")

    writer.submit("the checkpoint", disk_full)
    time.sleep(0.05)
    with pytest.raises(OSError) as e:
        writer.wait()
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("last.pt")
    writer.check()  # reported once
    writer.wait()


def test_close_finishes_a_write_under_way_and_warns_of_a_failed_one(tmp_path, capsys):
    writer = CheckpointWriter()
    target = tmp_path / "last.pt"

    def slow_write():
        time.sleep(0.3)
        save_checkpoint(target, {"model": {}, "epoch": 7})

    writer.submit(f"the checkpoint of epoch 7 ({target})", slow_write)
    writer.close()  # as fit's `finally:` does when an error (or Ctrl-C) stops the run
    assert load_checkpoint(target)["epoch"] == 7
    assert "waiting for the checkpoint of epoch 7" in capsys.readouterr().err

    writer.submit("the checkpoint of epoch 8", lambda: 1 / 0)
    writer.close()  # does not raise: the error already on its way out wins
    assert "warning: the checkpoint of epoch 8 was not written (ZeroDivisionError" in capsys.readouterr().err


def test_a_run_stops_at_the_step_after_its_checkpoint_failed(tmp_path, monkeypatch, capsys):
    """Disk full while epoch 2's checkpoint is written: the run stops during epoch 3 (not after
    it) with the one-line message naming last.pt; epoch 1's checkpoint is intact."""
    make_tiny_features(tmp_path / "data")
    conf = tiny_config(tmp_path, {"training": {"epochs": 4}})
    real = tu.save_checkpoint
    steps = []

    def full_at_epoch_2(path, state, **kwargs):
        if state["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state, **kwargs)

    def counting_step(*args):
        steps.append(1)
        return real_step(*args)

    real_step = tu.train_step
    monkeypatch.setattr(tu, "save_checkpoint", full_at_epoch_2)
    monkeypatch.setattr(tu, "train_step", counting_step)
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "full")
    line = error_line(proc)
    assert proc.returncode == 2 and "no space left" in line and "last.pt" in line, proc.stderr
    steps_per_epoch = 8  # 12 clips x 5 captions, batch 8
    assert len(steps) < 3 * steps_per_epoch  # epoch 3 did not run to its end
    run = run_dirs(tmp_path)[0]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
