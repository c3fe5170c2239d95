"""main.py and utils.train_utils on tiny data: a run, its files, and every bad input."""
from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import train_utils as tu
from utils.checkpoint import load_checkpoint, rng_state, set_rng_state
from utils.config import load_config, save_config
from utils.dist_utils import DistContext
from utils.runs import new_run_dir
from utils.errors import UserError
from utils.tracking import read_jsonl
from tests.cli_helpers import drop_a_signal, error_line, run_in_process

RECORD_KEYS = {"epoch", "train_loss", "val_loss", "val_t2a_mAP@10", "val_t2a_R@1", "val_t2a_R@5",
               "val_t2a_R@10", "lr", "seconds", "train_seconds", "data_wait_seconds"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "best_metric",
                   "best_epoch", "config", "rng", "text_embed_dim", "caption_probe"}


# --------------------------------------------------------------------------- helpers (also used
# by test_resume.py and test_ddp.py)

def script_env() -> dict:
    """One thread per process: tests share few cores, and OpenMP oversubscription is slow."""
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def run_main(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def one_thread():
    """Like the subprocesses (OMP_NUM_THREADS=1), then back to the suite's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main_in_process(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """Run main.py's __main__ inside pytest (no interpreter start-up): exit code and output."""
    with one_thread():
        return run_in_process(monkeypatch, "main.py", *args)


def run_dirs(tmp_path: Path) -> list[Path]:
    out = tmp_path / "outputs"
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def train_in_process(conf: Path, name: str, overrides=()) -> tu.FitResult:
    """What main.py does for a new run, without a subprocess's import time."""
    cfg = load_config(conf, overrides)
    tu.check_training_config(cfg)
    data = tu.load_training_data(cfg)
    run_dir = new_run_dir(cfg, name)
    save_config(cfg, run_dir)
    with one_thread():
        return tu.fit(cfg, run_dir, data, DistContext(), torch.device("cpu"))


@pytest.fixture
def tiny(tmp_path):
    make_tiny_features(tmp_path / "data")
    return tmp_path


# --------------------------------------------------------------------------- a run

def test_tiny_run_with_sweep_overrides_and_two_workers(tiny):
    """What a wandb sweep agent runs: `main.py --set key=value key=value`."""
    conf = tiny_config(tiny, {"training": {"epochs": 2, "num_workers": 2, "max_frames": 48}})
    sweep = yaml.safe_load((REPO / "sweep.yaml").read_text())
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "--set", "${args_no_hyphens}"]
    assert sweep["metric"] == {"name": "val_t2a_mAP@10", "goal": "maximize"}
    cfg = load_config(conf)
    for key in sweep["parameters"]:  # every swept key exists in the schema
        section, name = key.split(".")
        assert name in cfg[section]
    proc = run_main("--conf", conf, "--name", "sweep1", "--set", "training.lr=0.0005",
                    "criterion.temperature=0.05")
    assert proc.returncode == 0, proc.stderr
    run = tiny / "outputs" / "sweep1"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["lr"] == 0.0005 and saved["criterion"]["temperature"] == 0.05
    assert saved["training"]["num_workers"] == 2
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_t2a_mAP@10"] <= 1 for r in records)
    assert records[0]["lr"] == 0.0005
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert set(last) == CHECKPOINT_KEYS and last["epoch"] == 2 and last["text_embed_dim"] == 16
    assert not any("table" in k for k in last["model"])  # the caption table is not saved
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == last["best_epoch"]
    assert f"wrote {run / 'checkpoints' / 'last.pt'}" in proc.stdout
    model, cfg2, tid2row = tu.load_trained_model(run, "last")
    assert not model.training and cfg2["training"]["lr"] == 0.0005 and len(tid2row) == 120
    torch.testing.assert_close(model.state_dict()["text_enc.fc.weight"], last["model"]["text_enc.fc.weight"])


def test_early_stopping(tiny):
    # R@10 over 6 validation clips is always 1.0: it can never improve after epoch 1
    conf = tiny_config(tiny, {"training": {"epochs": 5, "early_stopping": 1, "monitor": "val_t2a_R@10"},
                              "data": {"train_split": "validation"}})
    result = train_in_process(conf, "es")
    assert result.stopped_early and result.epochs_done == 2 and result.best_epoch == 1
    assert [r["epoch"] for r in read_jsonl(tiny / "outputs" / "es" / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(tiny / "outputs" / "es" / "checkpoints" / "best.pt")["epoch"] == 1


def test_a_last_batch_of_one_caption_is_a_note_at_training_start(tiny, capsys):
    """A batch of one caption has an InfoNCE loss of exactly 0 and still counts as a batch in the
    mean of the batch losses: 30 validation captions at batch 29 end on one (val_loss drops
    to about half); the note says which split, and which batch size avoids it."""
    conf = tiny_config(tiny, {"training": {"epochs": 1}})
    train_in_process(conf, "b29", ["training.batch_size=29"])
    err = capsys.readouterr().err
    assert ("note: with training.batch_size 29, the validation split validation ends on a batch of "
            "1 caption, whose InfoNCE loss is exactly 0 but counts as a whole batch in val_loss") in err
    fix = int(err.split("training.batch_size ")[-1].split()[0])
    assert fix != 29
    train_in_process(conf, "fixed", [f"training.batch_size={fix}"])
    assert "note:" not in capsys.readouterr().err
    # 60 training captions at batch 59 (drop_last is not used): the training split
    train_in_process(conf, "b59", ["training.batch_size=59"])
    assert ("the training split development ends on a batch of 1 caption, whose InfoNCE loss is "
            "exactly 0 but counts as a whole batch in train_loss (") in capsys.readouterr().err


def test_a_split_of_one_clip_is_refused_for_training_or_validation(tmp_path, monkeypatch, capsys):
    """With one clip every batch's InfoNCE loss is 0: val_loss would be 0 every epoch and
    best.pt would stay at epoch 1. Refused, naming the key, before a run folder is made."""
    make_tiny_features(tmp_path / "data", n_clips=(12, 1, 6))
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tmp_path))
    assert ("data.val_split: split 'validation' has 1 clip(s); InfoNCE contrasts each caption with "
            "other clips, so its loss is 0 with fewer than two") in error_line(proc)
    assert run_dirs(tmp_path) == []


def test_a_global_batch_torchrun_cannot_share_is_refused_before_anything(tiny, monkeypatch, capsys):
    """Under torchrun with 3 processes, batch 8: one line, before the run folder is made
    (it was said by every rank after "starting: <run>", the folder made and removed again)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tiny), "--set", "training.batch_size=8")
    assert ("config key 'training.batch_size' (8) must be divisible by the number of processes (3): "
            "it is the global batch") in error_line(proc)
    assert "starting" not in proc.stdout and run_dirs(tiny) == []


def test_clothos_batch_32_leaves_no_last_batch_of_one(shared_captions):
    """The baseline's definition (the unweighted mean of the batch losses) is kept: at batch 32
    Clotho's last batches hold 27 development and 9 validation captions (of 9 clips)."""
    import csv

    counts = {}
    for split in ("development", "validation"):
        with open(shared_captions / f"clotho_captions_{split}.csv", encoding="utf-8", newline="") as f:
            counts[split] = 5 * (sum(1 for _ in csv.reader(f)) - 1)
    assert counts == {"development": 19195, "validation": 5225}
    cfg = load_config(REPO / "conf.yaml")
    order = torch.randperm(counts["validation"], generator=torch.Generator().manual_seed(cfg["seed"]))
    val_clips = (np.arange(counts["validation"]) // 5)[order.numpy()]
    assert tu.last_batch_size(counts["development"], 32) == 27
    assert tu.zero_loss_batch_note(cfg, counts["development"], val_clips) is None
    assert tu.last_batch_size(counts["development"], 32, world_size=4) == 28  # padded per process
    assert tu.zero_loss_batch_note(cfg, 33, val_clips[:65]) is not None  # 33 = 32 + 1


def test_improved_direction():
    assert tu.improved("val_loss", 1.0, None) and tu.improved("val_loss", 1.0, 2.0)
    assert not tu.improved("val_loss", 2.0, 1.0)
    assert tu.improved("val_t2a_mAP@10", 0.3, 0.2) and not tu.improved("val_t2a_R@1", 0.2, 0.2)


# --------------------------------------------------------------------------- bad inputs

def test_unknown_config_key_fails_before_data(tmp_path):
    # the dataset directory does not even exist: the config error must come first
    proc = run_main("--conf", tiny_config(tmp_path), "--set", "training.epoch=3")
    assert "unknown config key 'training.epoch'" in error_line(proc)
    assert run_dirs(tmp_path) == []


@pytest.mark.parametrize("override,needle", [
    ("training.lr=fast", "config key 'training.lr': expected float"),
    ("training.monitor=accuracy", "config key 'training.monitor'"),
    ("training.epochs=0", "config key 'training.epochs' must be > 0"),
    ("training.device=tpu", "config key 'training.device'"),
])
def test_bad_config_values(tmp_path, override, needle):
    with pytest.raises(UserError, match=needle):
        tu.check_training_config(load_config(tiny_config(tmp_path), [override]))


@pytest.mark.parametrize("victim,step", [
    ("development_audio_logmels.hdf5", "02_audio_logmel"),
    ("sbert_embeds.pkl", "03_sbert_embeddings"),
    ("validation_text.csv", "01_clotho_dataset"),
])
def test_missing_feature_file_names_the_step(tiny, victim, step):
    (tiny / "data" / victim).unlink()
    with pytest.raises(UserError, match=f"{victim}: not found — run preprocessing/{step}"):
        tu.load_training_data(load_config(tiny_config(tiny)))


@pytest.mark.parametrize("key", ["data.train_split", "data.val_split"])
def test_a_split_no_step_prepares_is_named_as_a_config_key(tiny, key):
    """A typo in a split name: "run step 01" would not help (01 prepares data.splits only)."""
    with pytest.raises(UserError, match=f"config key '{key}': split 'developmnet' is not one of "
                                        "data.splits .* correct the name"):
        tu.load_training_data(load_config(tiny_config(tiny), [f"{key}=developmnet"]))


def test_a_split_outside_data_splits_that_exists_is_used(tiny):
    """Files prepared for a split by an earlier config are used: data.splits says what steps
    01-03 prepare, not what may be read."""
    cfg = load_config(tiny_config(tiny), ["data.splits=[evaluation]"])
    assert len(tu.load_training_data(cfg).train_set) > 0


def test_features_dir_of_the_wrong_kind_is_named(tiny, monkeypatch, capsys):
    """paths.features_dir at a file, text_encoder.embeddings at a folder, --conf a folder: the
    line says what is wrong with the path, not "not found — run step 03"."""
    (tiny / "notes.txt").write_text("x")
    (tiny / "data" / "embeds_dir").mkdir()
    conf = tiny_config(tiny)
    for overrides, needle in [([f"paths.features_dir={tiny / 'notes.txt'}"],
                               f"{tiny / 'notes.txt'}: a file where a folder is expected"),
                              (["text_encoder.embeddings=embeds_dir"],
                               f"{tiny / 'data' / 'embeds_dir'}: a folder where a file is expected")]:
        line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf, "--set", *overrides))
        assert needle in line and "03_sbert" not in line
    line = error_line(main_in_process(monkeypatch, capsys, "--conf", tiny))
    assert f"{tiny}: a folder, not a config file" in line
    assert run_dirs(tiny) == []


def test_missing_features_via_main_create_no_run_dir(tiny, monkeypatch, capsys):
    (tiny / "data" / "validation_audio_logmels.hdf5").unlink()
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tiny))
    assert "02_audio_logmel" in error_line(proc)
    assert run_dirs(tiny) == []  # no half-made run for postprocessing to pick up


def test_caption_fid_not_in_hdf5(tiny):
    with h5py.File(tiny / "data" / "validation_audio_logmels.hdf5", "a") as h5:
        fid = sorted(h5.keys())[0]
        del h5[fid]
    with pytest.raises(UserError, match=f"fid {fid} has no log-mels in .*validation_audio_logmels.hdf5"):
        tu.load_training_data(load_config(tiny_config(tiny)))


def test_existing_run_directory_is_refused(tiny, monkeypatch, capsys):
    run = tiny / "outputs" / "taken"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("mine")
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tiny), "--name", "taken")
    assert "already exists" in error_line(proc)
    assert (run / "keep.txt").read_text() == "mine" and list(run.iterdir()) == [run / "keep.txt"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, monkeypatch, capsys):
    train_in_process(tiny_config(tiny, {"training": {"epochs": 1}}), "nan")
    last = tiny / "outputs" / "nan" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with h5py.File(tiny / "data" / "development_audio_logmels.hdf5", "a") as h5:
        fid = sorted(h5.keys())[3]
        x = h5[fid][()]
        x[5, 7] = np.nan
        h5[fid][...] = x
    proc = main_in_process(monkeypatch, capsys, "--resume", tiny / "outputs" / "nan",
                           "--set", "training.epochs=3")
    line = error_line(proc)
    assert "epoch 2, step" in line and "training loss is nan" in line
    assert fid in line and "02_audio_logmel" in line
    assert last.read_bytes() == before  # the last good checkpoint is untouched
    assert [r["epoch"] for r in read_jsonl(tiny / "outputs" / "nan" / "metrics.jsonl")] == [1]


def test_resume_refuses_model_changes(tiny):
    conf = tiny_config(tiny)
    run = tiny / "outputs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(conf)))
    assert tu.resume_config(run, ["training.epochs=5"])["training"]["epochs"] == 5
    with pytest.raises(UserError, match="criterion.temperature.*cannot change"):
        tu.resume_config(run, ["criterion.temperature=0.1"])
    # the restored Adam and ReduceLROnPlateau would keep their own values, while config.yaml
    # recorded the new one; a new monitor would be compared with the old one's best value
    for override in ("training.lr=5e-4", "training.weight_decay=0.01", "training.scheduler.patience=2",
                     "training.monitor=val_t2a_mAP@10"):
        with pytest.raises(UserError, match=f"--set {override.split('=')[0]}: .* restored from checkpoints/last.pt"):
            tu.resume_config(run, [override])
    assert tu.resume_config(run, ["training.lr=0.001"])["training"]["lr"] == 0.001  # the same value
    with pytest.raises(UserError, match="--set features.hop_s: .* trained on log-mels with 0.02"):
        tu.resume_config(run, ["features.hop_s=0.01"])
    with pytest.raises(UserError, match="--set sbert.model: .* model and loss keys cannot change"):
        tu.resume_config(run, ["sbert.model=bundled:all-MiniLM-L6-v2"])
    with pytest.raises(UserError, match="not a run directory"):
        tu.resume_config(tiny / "data")


def test_a_last_pt_of_another_width_names_the_tensor_that_differs(tiny):
    """A checkpoint copied in from a run of another width: the line says which tensor and which
    shapes, not only torch's "Error(s) in loading state_dict for DualEncoderModel:"."""
    cfg = load_config(tiny_config(tiny))
    data = tu.load_training_data(cfg)
    wide = tu.build_trainer(load_config(tiny_config(tiny), ["audio_encoder.channels=[8,8,8,16,16,32]"]),
                            data.table, torch.device("cpu"))
    state = tu.checkpoint_dict(wide, cfg, [])
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    with pytest.raises(UserError, match=r"last.pt: does not fit the model of this run's config "
                                        r"\('audio_enc\..*' has shape \[.*\], expected \["):
        tu.restore(tr, state, tiny / "last.pt")


def test_features_of_another_definition_than_the_config_are_refused(tiny, monkeypatch, capsys):
    """The run's config would record hop 0.01 for features computed at 0.02: query.py and the
    submission would then compute their log-mels differently from the training clips'."""
    for split in ("development", "validation"):
        with h5py.File(tiny / "data" / f"{split}_audio_logmels.hdf5", "a") as h5:
            h5.attrs.update({"window_s": 0.04, "hop_s": 0.02, "n_mels": 64})
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tiny), "--set", "features.hop_s=0.01")
    line = error_line(proc)
    assert "development_audio_logmels.hdf5: log-mels computed with hop_s 0.02, but the config says hop_s 0.01" in line
    assert "--set features.hop_s=0.02" in line
    assert run_dirs(tiny) == []


def test_embedding_size_mismatch_on_resume_and_load(tiny, monkeypatch, capsys):
    run = train_in_process(tiny_config(tiny, {"training": {"epochs": 1}}), "dim").run_dir
    pkl = tiny / "data" / "sbert_embeds.pkl"
    with open(pkl, "rb") as f:
        embeds = pickle.load(f)
    with open(pkl, "wb") as f:
        pickle.dump({t: np.zeros(12, np.float32) for t in embeds}, f)
    proc = main_in_process(monkeypatch, capsys, "--resume", run, "--set", "training.epochs=2")
    line = error_line(proc)
    assert "sbert_embeds.pkl" in line and "12-d" in line and "16-d" in line and "last.pt" in line
    with pytest.raises(UserError, match="sbert_embeds.pkl: sentence embeddings are 12-d .* 16-d"):
        tu.load_trained_model(run, "best")


def test_load_trained_model_without_checkpoint(tiny):
    run = tiny / "outputs" / "empty"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(tiny_config(tiny))))
    with pytest.raises(UserError, match="no checkpoint — train with main.py"):
        tu.load_trained_model(run)


def test_an_epochs_random_crops_do_not_depend_on_earlier_epochs(tmp_path):
    """--resume restarts at an epoch boundary in a new process: with DataLoader workers, epoch 2
    must crop and shuffle as it would have after epoch 1 in the same process."""
    make_tiny_features(tmp_path / "data", frames=(64, 100))
    cfg = load_config(tiny_config(tmp_path, {"training": {"num_workers": 2, "max_frames": 40}}))
    data = tu.load_training_data(cfg)

    def epoch_batches(loader, seeding, epoch):
        seeding.set_epoch(epoch)
        return [(audio, rows) for audio, rows, _ in loader]

    loader, seeding = tu.make_train_loader(data.train_set, cfg, torch.device("cpu"), DistContext())
    epoch_batches(loader, seeding, 1)
    continued = epoch_batches(loader, seeding, 2)
    loader, seeding = tu.make_train_loader(data.train_set, cfg, torch.device("cpu"), DistContext())
    resumed = epoch_batches(loader, seeding, 2)  # as after --resume: a new loader, epoch 2 first
    assert len(continued) == len(resumed) > 1
    for (a_audio, a_rows), (b_audio, b_rows) in zip(continued, resumed):
        assert torch.equal(a_rows, b_rows)
        assert torch.equal(a_audio, b_audio)
    data.train_set.close()


def test_epoch_orders_are_those_of_a_shuffling_dataloader_seeded_each_epoch():
    """EpochPermutation keeps the batches of earlier versions (DataLoader(shuffle=True) with a
    generator seeded from (seed, epoch)), so a seed trains as it did before."""
    data = list(range(50))
    sampler = tu.EpochPermutation(len(data), seed=7)
    for epoch in (1, 2, 5):
        g = torch.Generator().manual_seed(tu.epoch_seed(7, epoch))
        before = [int(i) for b in DataLoader(data, batch_size=8, shuffle=True, generator=g) for i in b]
        sampler.set_epoch(epoch)
        assert list(sampler) == before
    assert sorted(sampler) == data and len(sampler) == 50


def _epoch_rows(cfg, data, epochs):
    loader, seeding = tu.make_train_loader(data.train_set, cfg, torch.device("cpu"), DistContext())
    out = []
    for epoch in epochs:
        seeding.set_epoch(epoch)
        out.append([(audio, rows) for audio, rows, _ in loader])
    return loader, out


def test_whole_clip_workers_live_across_epochs_and_give_the_batches_of_fresh_ones(tmp_path):
    """Whole clips: the workers are forked once for the run (each fork of a GPU process idles
    the GPU); every epoch's batches are still those of a loader made for that epoch alone."""
    make_tiny_features(tmp_path / "data", frames=(64, 100))
    cfg = load_config(tiny_config(tmp_path, {"training": {"num_workers": 2}}))
    data = tu.load_training_data(cfg)
    loader, (one, two, three) = _epoch_rows(cfg, data, (1, 2, 3))
    assert loader.persistent_workers
    for epoch, continued in ((2, two), (3, three)):
        _, (alone,) = _epoch_rows(cfg, data, (epoch,))  # as after --resume
        assert len(alone) == len(continued) > 1
        for (a_audio, a_rows), (b_audio, b_rows) in zip(continued, alone):
            assert torch.equal(a_rows, b_rows) and torch.equal(a_audio, b_audio)
    assert [r.tolist() for _, r in one] != [r.tolist() for _, r in two]  # reshuffled every epoch
    cropped = load_config(tiny_config(tmp_path, {"training": {"num_workers": 2, "max_frames": 40}}))
    assert not tu.make_train_loader(data.train_set, cropped, torch.device("cpu"), DistContext())[0].persistent_workers
    data.train_set.close()


def test_cuda_rng_state_is_this_gpus_alone(monkeypatch):
    """A checkpoint keeps the training GPU's CUDA stream only, and a resume sets that GPU's;
    a checkpoint of an older version (one state per GPU visible then) still resumes when fewer
    GPUs are visible now. torch.cuda is faked: CI has no GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, str(device))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every GPU's state read"))
    gpu1 = torch.device("cuda", 1)
    state = rng_state(gpu1)
    assert state["cuda"] == "state of cuda:1"
    assert "cuda" not in rng_state(torch.device("cpu")) and "cuda" not in rng_state()
    set_rng_state(state, gpu1)
    assert calls == [("state of cuda:1", "cuda:1")]
    old = {**state, "cuda": ["gpu0", "gpu1", "gpu2"]}  # saved with three GPUs visible
    set_rng_state(old, gpu1)
    set_rng_state(old, torch.device("cuda", 5))  # resumed where that GPU's index is not saved
    set_rng_state(old, torch.device("cpu"))
    assert calls[1:] == [("gpu1", "cuda:1")]


def test_each_rank_continues_its_own_saved_rng_streams(tmp_path):
    cfg = {"seed": 7}
    saved = []
    for rank in range(2):  # two ranks' states at the end of an epoch, and what each drew next
        torch.manual_seed(100 + rank)
        saved.append(rng_state())
    expected = []
    for state in saved:
        set_rng_state(state)
        expected.append(torch.rand(3))
    assert not torch.equal(expected[0], expected[1])

    state = {"rng": saved, "epoch": 4}
    for rank in range(2):
        tu.restore_rng_of_rank(state, DistContext(rank, 2, rank), cfg, torch.device("cpu"))
        assert torch.equal(torch.rand(3), expected[rank])
    # a checkpoint of rank 0 only (older version, or fewer processes): rank 0 goes on, rank 1
    # gets a fresh stream of its own
    for old in ({"rng": saved[0], "epoch": 4}, {"rng": saved[:1], "epoch": 4}):
        tu.restore_rng_of_rank(old, DistContext(0, 2, 0), cfg, torch.device("cpu"))
        assert torch.equal(torch.rand(3), expected[0])
        tu.restore_rng_of_rank(old, DistContext(1, 2, 1), cfg, torch.device("cpu"))
        fresh = torch.rand(3)
        assert not torch.equal(fresh, expected[0]) and not torch.equal(fresh, expected[1])


class _FakeSentenceModel:
    """A sentence model of 16-d vectors that depend on the text and a seed: `seed` picks the model."""

    def __init__(self, seed: int):
        self.seed = seed

    def get_sentence_embedding_dimension(self) -> int:
        return 16

    def encode(self, texts, **kwargs) -> np.ndarray:
        import zlib
        return np.stack([np.random.default_rng([self.seed, zlib.crc32(t.encode())]).normal(size=16)
                         for t in texts]).astype(np.float32)


SPLITS = ["development", "validation", "evaluation"]


def _run_on_model_a(tiny: Path, monkeypatch) -> tuple[Path, list[str], Path]:
    """(data folder, splits, run) of a run trained on captions embedded by _FakeSentenceModel(0),
    which step 03 recorded as "model-a"."""
    import utils.sbert

    monkeypatch.setattr(utils.sbert, "load_sentence_model", lambda name, device: _FakeSentenceModel(0))
    utils.sbert.compute_sbert_embeddings(tiny / "data", SPLITS, "model-a", device="cpu")
    run = train_in_process(tiny_config(tiny, {"sbert": {"model": "model-a"}, "training": {"epochs": 1}}),
                           "a").run_dir
    return tiny / "data", SPLITS, run


def test_scoring_with_captions_of_another_sentence_model_is_refused(tiny, monkeypatch, capsys):
    """Step 03 rerun with another model of the same size after training: the run's scores would
    be near chance. Neither the advice of the model-name check (`--set sbert.model=` to the new
    name) nor resuming may lead there: the caption vectors are compared with those the
    checkpoint was trained on, whatever the model is called."""
    import utils.sbert
    from utils.data_utils import texts_path

    data, splits, run = _run_on_model_a(tiny, monkeypatch)
    tu.load_trained_model(run)  # as trained: fine
    same = data / "same.pkl"  # the same model elsewhere (a local copy, say), other file
    utils.sbert.compute_sbert_embeddings(data, splits, "/local/copy/of/model-a", device="cpu", filename="same.pkl")
    tu.load_trained_model(run, overrides=["sbert.model=/local/copy/of/model-a", "text_encoder.embeddings=same.pkl"])
    assert same.is_file()

    monkeypatch.setattr(utils.sbert, "load_sentence_model", lambda name, device: _FakeSentenceModel(1))
    utils.sbert.compute_sbert_embeddings(data, splits, "model-b", device="cpu")
    with pytest.raises(UserError, match=rf"computed with sentence model 'model-b', but the config says "
                                        rf"sbert.model='model-a' — rerun preprocessing/03_sbert_embeddings.py "
                                        rf"--conf {run / 'config.yaml'}, which embeds"):
        tu.load_trained_model(run)
    with pytest.raises(UserError, match=r"sbert_embeds.pkl: caption \S+ is not the vector .*best.pt was "
                                        r"trained on \(cosine -?0\.\d+\): step 03 was rerun with another "
                                        r"sentence model \('model-b'\) — rerun preprocessing/03"):
        tu.load_trained_model(run, overrides=["sbert.model=model-b"])
    # the same for training on: --resume (sbert.model cannot change there) names the run's config
    proc = main_in_process(monkeypatch, capsys, "--resume", run, "--set", "training.epochs=2")
    assert f"rerun preprocessing/03_sbert_embeddings.py --conf {run / 'config.yaml'}" in error_line(proc)
    texts_path(data / "sbert_embeds.pkl").unlink()  # no record (older step 03): the vectors still tell
    proc = main_in_process(monkeypatch, capsys, "--resume", run, "--set", "training.epochs=2")
    assert "is not the vector" in error_line(proc) and "resuming" not in proc.stdout
    # the advice works: step 03 with the run's config gives back the vectors it was trained on
    monkeypatch.setattr(utils.sbert, "load_sentence_model", lambda name, device: _FakeSentenceModel(0))
    proc = run_in_process(monkeypatch, "preprocessing/03_sbert_embeddings.py", "--conf", run / "config.yaml")
    assert proc.returncode == 0, proc.stderr
    tu.load_trained_model(run)


def test_a_caption_edited_since_training_is_not_taken_for_another_model(tiny, monkeypatch, tmp_path):
    """A typo fixed in a caption (its tid kept), then step 03 rerun with the run's own model:
    that caption's vector changed, the model did not. Only captions whose text is unchanged are
    compared; the advice for a run found elsewhere carries the paths it was found at."""
    import pandas as pd
    import shlex

    import utils.sbert
    from tests.cli_helpers import run_in_process

    data, splits, run = _run_on_model_a(tiny, monkeypatch)
    probe = load_checkpoint(run / "checkpoints" / "best.pt")["caption_probe"]
    assert len(probe["tids"]) == len(probe["texts"]) == 8 and all(probe["texts"])
    for split in splits:  # every probed caption edited
        csv = data / f"{split}_text.csv"
        df = pd.read_csv(csv, keep_default_na=False)
        edited = df["tid"].isin(probe["tids"])
        df.loc[edited, "raw_text"] = df.loc[edited, "raw_text"] + " (typo fixed)"
        df.to_csv(csv, index=False)
    utils.sbert.compute_sbert_embeddings(data, splits, "model-a", device="cpu")
    tu.load_trained_model(run)  # the same model: not refused

    # the data found elsewhere than the run's config says (a relative path, another directory)
    cfg = load_config(run / "config.yaml")
    moved = load_config(run / "config.yaml", [f"paths.dataset_dir={tmp_path / 'elsewhere'}"])
    command = tu.step_03_for_run(run, moved)
    assert command == (f"preprocessing/03_sbert_embeddings.py --conf {run / 'config.yaml'} "
                       f"--set paths.dataset_dir={tmp_path / 'elsewhere'}")
    assert tu.step_03_for_run(run, cfg) == f"preprocessing/03_sbert_embeddings.py --conf {run / 'config.yaml'}"
    (data / "sbert_embeds.pkl").unlink()
    data.rename(tmp_path / "elsewhere")
    proc = run_in_process(monkeypatch, *shlex.split(command))  # following it
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "elsewhere" / "sbert_embeds.pkl").is_file()


def test_a_ctrl_c_dropped_in_the_last_validation_still_stops_the_run(tiny, monkeypatch, capsys):
    """Python drops a Ctrl-C that lands in a weakref callback; in the last epoch's validation
    no step follows to raise it again: the run stops after the epoch's checkpoint, as it would
    have had the Ctrl-C not been dropped, and says so."""
    real, calls = tu.validate, []

    def validate(*args, **kwargs):
        record = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            drop_a_signal()
        return record

    monkeypatch.setattr(tu, "validate", validate)
    proc = main_in_process(monkeypatch, capsys, "--conf", tiny_config(tiny), "--set", "training.epochs=2")
    assert proc.returncode == 130, proc.stderr
    assert "interrupted: epochs 1-2 are kept" in proc.stderr and "Exception ignored" not in proc.stderr
    (run,) = run_dirs(tiny)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
