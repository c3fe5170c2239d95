"""utils.io_utils and the writers built on it: shareable modes, real OSErrors naming the file,
checkpoints that hold pickled code, crafted clip-embedding caches."""
from __future__ import annotations

import errno
import os
import pickle
import stat
import time
import zipfile

import h5py
import numpy as np
import pytest
import torch

from utils import evaluation, scores_db
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import save_config
from utils.demo_data import wav_bytes
from utils.errors import UserError
from utils.io_utils import atomic_open, atomic_path, atomic_write_text, load_pickle, save_pickle
from utils.locks import exclusive
from models.core import read_torch_file


@pytest.fixture
def umask():
    """Set the process umask for the test, then restore it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def write_every_kind(d) -> dict:
    """One file of every kind the pipeline writes, each through its real writer: {name: mode}."""
    d.mkdir(parents=True, exist_ok=True)
    with atomic_open(d / "clip.wav", "wb") as f:                      # wavs (demo data)
        f.write(wav_bytes(np.zeros(100, dtype="<i2")))
    with atomic_open(d / "x_text.csv", "w", newline="") as f:        # CSVs
        f.write("tid,fid\n")
    with atomic_path(d / "x_audio_logmels.hdf5") as tmp:              # HDF5 (step 02's way)
        with h5py.File(tmp, "w") as h5:
            h5["fid"] = np.zeros((3, 64), np.float32)
    save_pickle({"a": 1}, d / "sbert_embeds.pkl")                     # pickles
    save_checkpoint(d / "checkpoints" / "last.pt", {"model": {}})    # checkpoints
    save_config({"seed": 0}, d)                                        # configs
    atomic_write_text(d / "metrics.jsonl", "{}\n")
    meta = {"schema_version": scores_db.SCHEMA_VERSION, "checkpoint_sha1": "k"}
    with scores_db.writing(d / "scores.db", meta):                    # scores.db (new)
        pass
    with scores_db.writing(d / "over.db", meta, overwrite=True):       # scores.db (--overwrite)
        pass
    evaluation.save_clip_cache(d, "evaluation", ["a.wav"], ["f"], np.ones((1, 2)), "k")
    with exclusive(d / ".lock", "run"):  # removed on release: looked at while held
        return {p.name: mode(p) for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain", "w"):
        pass
    expected = mode(tmp_path / "plain")
    assert expected == 0o666 & ~mask
    modes = write_every_kind(tmp_path / "out")
    assert len(modes) >= 11 and ".lock" in modes
    assert modes == {name: expected for name in modes}
    assert not [name for name in modes if name.endswith(".tmp")]  # no temporaries left behind


def test_existing_file_replaced_gets_the_umask_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "config.yaml"
    target.write_text("old")
    target.chmod(0o600)  # written by an older version (mkstemp)
    atomic_write_text(target, "new")
    assert mode(target) == 0o644 and target.read_text() == "new"


# --------------------------------------------------------------------------- OSErrors

def test_full_disk_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as e:
        atomic_write_text(target, "{}")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert not target.exists() and not list(tmp_path.iterdir())  # temporary removed


def test_the_rename_itself_is_made_durable(tmp_path, monkeypatch):
    """fsync of the file alone leaves its new name in the page cache: after a power cut the
    folder can still list the old file. The folder is fsynced after the rename."""
    synced, real_fsync = [], os.fsync
    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), os.listdir(tmp_path) if stat.S_ISDIR(
            os.fstat(fd).st_mode) else None))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", record)
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert [d for d, _ in synced] == [False, True]  # the data, then the folder holding the name
    assert synced[1][1] == ["metrics.json"]  # after the rename, not before


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EBADF])
def test_a_folder_that_cannot_be_fsynced_is_no_error(tmp_path, monkeypatch, err):
    """Some network file systems refuse fsync on a directory; the file is written all the same."""
    real_fsync = os.fsync
    def refuse_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", refuse_folders)
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"


FULL_PART_WAY = """
import resource, signal, sys, torch
from utils.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(1_000_000)}})
except OSError as e:
    print("OSError", e.errno, e.filename)
"""


def test_checkpoint_that_stops_fitting_part_way_is_an_oserror_naming_it(tmp_path):
    """torch.save reports a write that fails part-way (a disk filling up, a quota, a file-size
    limit) as RuntimeError('unexpected pos ...'), which the one-line handler does not know; the
    write's own OSError comes out instead, naming the checkpoint, and no temporary is left."""
    import subprocess
    import sys
    target = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", FULL_PART_WAY, str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["OSError", str(errno.EFBIG), str(target)], proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("below", ["", "run"])
def test_path_under_a_regular_file(tmp_path, below):
    """mkdir says EEXIST when the file is the folder itself: reported as ENOTDIR, as deeper."""
    (tmp_path / "outputs").write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError) as e:
        atomic_write_text(tmp_path / "outputs" / below / "config.yaml", "x")
    assert e.value.errno == errno.ENOTDIR
    assert str(tmp_path / "outputs") in str(e.value.filename)


def test_rename_onto_a_folder_names_the_folder(tmp_path):
    (tmp_path / "submission.csv").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(tmp_path / "submission.csv", "x")
    assert e.value.filename == str(tmp_path / "submission.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_unwritable_folder_names_the_target(tmp_path, monkeypatch):
    """EROFS/EACCES when creating the temporary: reported for the file asked for (chmod does
    not stop root, so the refusal is simulated at os.open)."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as e:
        save_pickle({}, tmp_path / "audio_info.pkl")
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "audio_info.pkl")


# --------------------------------------------------------------------------- checkpoints

class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _torch_file_with_code(path):
    torch.save({"model": {}, "extra": _Payload()}, path)


def _plain_pickle_with_code(path):
    path.write_bytes(pickle.dumps({"model": _Payload()}))


def _torch_file_with_a_module(path):
    torch.save({"model": torch.nn.Linear(2, 2)}, path)


@pytest.mark.parametrize("make, name", [(_torch_file_with_code, "system"),
                                        (_plain_pickle_with_code, "system"),
                                        (_torch_file_with_a_module, "torch.nn.modules.linear.Linear")])
@pytest.mark.parametrize("loader", [load_checkpoint, read_torch_file])
def test_pickled_code_is_named_and_refused_without_torchs_advice(tmp_path, make, name, loader):
    path = tmp_path / "last.pt"
    make(path)
    with pytest.raises(UserError) as e:
        loader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: holds Python objects besides tensors (")
    assert name in msg and "refused for safety" in msg and "weights_only=True" in msg
    assert "\n" not in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert "not a PyTorch file" not in msg


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"", b"\x80\x04K\x01.", b"PK\x03\x04junk"])
def test_foreign_bytes_are_one_line_without_torchs_advice(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a readable checkpoint") and "\n" not in msg
    assert "weights_only" not in msg


def test_a_checkpoint_of_plain_data_still_loads(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "epoch": 3, "rng": [(1, 2)]})
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3


# --------------------------------------------------------------------------- cache/*.npz

def _cache(run, **arrays):
    path = evaluation.cache_path(run, "evaluation")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


GOOD = dict(fnames=np.array(["a.wav", "b.wav"]), fids=np.array(["f1", "f2"]),
            embeds=np.ones((2, 4), np.float32), checkpoint_sha1=np.array("k"))


@pytest.mark.parametrize("change", [
    {"embeds": np.ones((3, 4), np.float32)},          # rows != clips
    {"embeds": np.ones(8, np.float32)},               # not 2-D
    {"embeds": np.full((2, 4), np.nan, np.float32)},  # NaN
    {"embeds": np.array([["x"] * 4] * 2)},            # not numbers
    {"fids": np.array(["f1"])},                       # fids != fnames
    {"fnames": np.array([1, 2])},                     # not strings
    {"checkpoint_sha1": np.array(["k", "k"])},        # not one key
    {"checkpoint_sha1": np.array("other")},           # another checkpoint's
    {"embeds": None},                                 # key missing
])
def test_crafted_or_stale_cache_is_recomputed(tmp_path, change):
    arrays = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    _cache(tmp_path, **arrays)
    assert evaluation.load_clip_cache(tmp_path, "evaluation", "k") is None


def test_cache_of_another_width_is_recomputed(tmp_path):
    _cache(tmp_path, **GOOD)
    assert evaluation.load_clip_cache(tmp_path, "evaluation", "k", dim=4) is not None
    assert evaluation.load_clip_cache(tmp_path, "evaluation", "k", dim=300) is None


@pytest.mark.parametrize("content", ["npy", "text", "zip", "truncated", "pickle"])
def test_cache_that_is_not_an_npz_is_recomputed(tmp_path, content):
    path = _cache(tmp_path, **GOOD)
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones((2, 4)))
    elif content == "text":
        path.write_text("hello")
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("embeds.npy", b"not an array")
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(pickle.dumps({"embeds": [1, 2]}))
    assert evaluation.load_clip_cache(tmp_path, "evaluation", "k") is None


def test_valid_cache_round_trips(tmp_path):
    evaluation.save_clip_cache(tmp_path, "evaluation", ["a.wav", "b.wav"], ["f1", "f2"],
                               np.arange(8, dtype=np.float32).reshape(2, 4), "k")
    fnames, fids, embeds = evaluation.load_clip_cache(tmp_path, "evaluation", "k", dim=4)
    assert fnames == ["a.wav", "b.wav"] and fids == ["f1", "f2"]
    np.testing.assert_array_equal(embeds, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_load_pickle_is_unchanged_by_the_new_writer(tmp_path):
    save_pickle({"x": np.ones(2, np.float32)}, tmp_path / "p.pkl")
    np.testing.assert_array_equal(load_pickle(tmp_path / "p.pkl")["x"], np.ones(2))


def test_cache_writes_remove_what_killed_writers_left_long_ago_only(tmp_path):
    """query.py and the API write caches without a lock: a temporary abandoned by a kill over
    an hour ago goes with the next write; a recent one may be another writer's, under way."""
    cache = evaluation.cache_path(tmp_path, "validation")
    cache.parent.mkdir()
    old, recent = cache.parent / f".{cache.name}.0badf00d.tmp", cache.parent / f".{cache.name}.1234abcd.tmp"
    other = cache.parent / ".evaluation_clip_embeds.npz.0badf00d.tmp"  # another file's
    for path in (old, recent, other):
        path.write_bytes(b"half a cache")
    an_hour_ago = time.time() - 3700
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    evaluation.save_clip_cache(tmp_path, "validation", ["a.wav"], ["a"], np.ones((1, 4)), "key")
    assert not old.exists() and recent.exists() and other.exists()
    assert evaluation.load_clip_cache(tmp_path, "validation", "key")[0] == ["a.wav"]
