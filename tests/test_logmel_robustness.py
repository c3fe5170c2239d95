"""Step 02 and the readers of its output when things go wrong: skipped clips end to end, wavs
replaced under the same name, a full disk, a parent killed with SIGKILL, two runs at once, and a
damaged HDF5 file."""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

from cli_helpers import error_line
from tests.tiny_data import REPO
from utils import data_utils as du
from utils import features as features_mod
from utils.audio_utils import load_audio, log_mel
from utils.clotho import make_fid, prepare_clotho, read_skipped
from utils.config import load_config
from utils.errors import UserError
from utils.features import compute_logmels, logmel_path, parts_dir
from utils.io_utils import save_pickle
from utils.train_utils import nonfinite_clips, nonfinite_loss_error
from wav_fixtures import make_clotho, write_wav

SKIP_CSV = "development_skipped_audio.csv"
quiet = {"log": lambda *a: None}


def config(root, *overrides):
    return load_config(REPO / "conf.yaml", [f"paths.dataset_dir={root}", "data.splits=[development]",
                                            "features.workers=1", *overrides])


# a script run with every file it writes limited to `limit` bytes (RLIMIT_FSIZE): a write past
# it fails with EFBIG, as one fails on a full disk, without needing a small file system
FILE_SIZE_LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_step(step, root, *overrides, popen=False, limit=None):
    script = {"01": "preprocessing/01_clotho_dataset.py", "02": "preprocessing/02_audio_logmel.py"}[step]
    start = [script] if limit is None else ["-c", FILE_SIZE_LIMITED, str(limit), script]
    cmd = [sys.executable, *start, "--conf", str(REPO / "conf.yaml"), "--set",
           f"paths.dataset_dir={root}", "data.splits=[development]", *overrides]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def dataset(root, n=4, seconds=0.3, skip=False):
    rows = make_clotho(root, {"development": n}, seconds=seconds)
    prepare_clotho(root, ["development"], skip_bad_audio=skip)
    return list(rows["development"])


def write_fake_embeddings(root):
    """sbert_embeds.pkl for every caption of the text CSV (random vectors; no model needed)."""
    df = du.read_text_csv(root, "development")
    rng = np.random.default_rng(0)
    save_pickle({tid: rng.normal(size=8).astype(np.float32) for tid in df["tid"]}, root / "sbert_embeds.pkl")


def wait_for_a_shard(proc, root):
    parts = parts_dir(root, "development")
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(parts.glob("shard-*.h5"))):
        assert proc.poll() is None, f"finished before a shard was written: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def stop(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


# ---------------------------------------------------------------------------------------------
# Clips only step 02 finds unusable

def low_rate(path):
    """A wav that reads fine (step 01 probes it) but at 1 kHz has no 64-band log-mel."""
    return write_wav(path, seconds=0.3, sr=1000)


def nan_samples(path):
    y = np.zeros(4410, np.float32)
    y[100] = np.nan
    sf.write(str(path), y, 44100, subtype="FLOAT", format="WAV")
    return path


@pytest.mark.parametrize("maker, reason", [(low_rate, "no log-mel: sample rate 1000 Hz is too low"),
                                           (nan_samples, "non-finite: NaN or inf samples")])
def test_without_skipping_step_02_is_one_line_listing_the_file_never_a_worker_traceback(tmp_path, maker, reason):
    names = dataset(tmp_path)
    maker(tmp_path / "development" / names[1])
    prepare_clotho(tmp_path, ["development"])  # step 01 probes the header only: it passes
    line = error_line(run_step("02", tmp_path, "features.workers=2", "features.flush_every=1"))
    assert "development: 1 unusable audio file" in line and names[1] in line
    assert "data.skip_bad_audio: true" in line
    # listed under its reason, the one the skip list gives: a wav of NaN/inf reads fine
    assert f"({reason.partition(':')[0]}: {names[1]}" in line and "unreadable" not in line
    if reason.startswith("no log-mel"):
        assert "sample rate 1000 Hz is too low for the 40 ms window" in line


def test_a_wav_of_nan_samples_is_listed_as_non_finite_not_unreadable(tmp_path):
    """The skip list and the line refusing the file name the same reason."""
    names = dataset(tmp_path, n=3)
    nan_samples(tmp_path / "development" / names[1])
    prepare_clotho(tmp_path, ["development"])
    with pytest.raises(UserError, match=rf"\(non-finite: {names[1]}\)"):
        compute_logmels(config(tmp_path), **quiet)
    [r] = compute_logmels(config(tmp_path, "data.skip_bad_audio=true"), **quiet)
    assert r.bad == [(names[1], "non-finite: NaN or inf samples")]
    listed = read_skipped(tmp_path / SKIP_CSV)
    assert [row[:2] for row in listed] == [(names[1], "non-finite: NaN or inf samples")]


def test_skip_list_is_kept_by_both_steps_and_every_reader_leaves_the_clips_out(tmp_path):
    names = dataset(tmp_path, n=5, skip=True)
    low_rate(tmp_path / "development" / names[1])
    (tmp_path / "development" / names[3]).unlink()  # step 01 finds this one
    cfg = config(tmp_path, "data.skip_bad_audio=true")
    prepare_clotho(tmp_path, ["development"], skip_bad_audio=True)
    [r] = compute_logmels(cfg, **quiet)
    assert [b[0] for b in r.bad] == [names[1]]
    listed = read_skipped(tmp_path / SKIP_CSV)
    assert [(f, step) for f, _, step in listed] == [(names[3], "01"), (names[1], "02")]

    # step 01 again: its own rows are redone, step 02's stay
    proc = run_step("01", tmp_path, "data.skip_bad_audio=true")
    assert proc.returncode == 0, proc.stderr
    assert read_skipped(tmp_path / SKIP_CSV) == listed
    assert "1 clip(s) that step 02 could not use stay listed" in proc.stdout
    # step 02 again: nothing changed, so it is complete, and says what it skipped
    proc = run_step("02", tmp_path, "data.skip_bad_audio=true")
    assert proc.returncode == 0, proc.stderr
    assert "already complete (3 clips; 1 unusable audio file(s) skipped" in proc.stdout
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert set(f) == {make_fid("development", n) for n in (names[0], names[2], names[4])}
        assert json.loads(f.attrs["skipped_fids"]) == [make_fid("development", names[1])]

    # training, validation and postprocessing read through these: the clips and captions are out
    write_fake_embeddings(tmp_path)
    _, tid2row = du.load_text_table(tmp_path)
    ds = du.CaptionDataset(tmp_path, "development", tid2row)
    assert len(ds) == 15 and ds.fids == [make_fid("development", n) for n in (names[0], names[2], names[4])]
    assert (ds.skipped.clips, ds.skipped.captions) == (2, 10)
    assert "2 skipped clip(s) and their 10 caption(s) left out" in ds.skipped.describe("development")
    assert du.skipped_counts(tmp_path, ["development"]) == {"development": {"clips": 2, "captions": 10}}
    model = torch.nn.Module()
    model.audio_branch = lambda x, lengths: x.mean(dim=1)  # [B, T, 64] -> [B, 64]
    model.text_branch = lambda rows: torch.zeros(len(rows), 64)
    emb = du.encode_split(model, tmp_path, "development", tid2row, batch_size=2, device="cpu")
    assert emb.fids == ds.fids and len(emb.tids) == 15 and emb.skipped == ds.skipped
    ds.close()


def test_training_prints_what_it_leaves_out(tmp_path, capsys):
    from utils.train_utils import load_training_data

    names = dataset(tmp_path, n=4, skip=True)
    low_rate(tmp_path / "development" / names[0])
    compute_logmels(config(tmp_path, "data.skip_bad_audio=true"), **quiet)
    write_fake_embeddings(tmp_path)
    cfg = config(tmp_path, "data.skip_bad_audio=true", "data.val_split=development")
    data = load_training_data(cfg)
    assert len(data.train_set) == 15
    assert "development: 1 skipped clip(s) and their 5 caption(s) left out" in capsys.readouterr().out


def test_a_fixed_wav_is_retried_and_leaves_the_list(tmp_path):
    names = dataset(tmp_path, n=3)
    good = (tmp_path / "development" / names[2]).read_bytes()
    low_rate(tmp_path / "development" / names[2])
    cfg = config(tmp_path, "data.skip_bad_audio=true")
    compute_logmels(cfg, **quiet)
    assert [f for f, _, _ in read_skipped(tmp_path / SKIP_CSV)] == [names[2]]
    (tmp_path / "development" / names[2]).write_bytes(good)
    [r] = compute_logmels(cfg, **quiet)
    assert not r.skipped_existing and r.computed == 1 and not r.bad
    assert not (tmp_path / SKIP_CSV).exists()
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert len(f) == 3 and json.loads(f.attrs["skipped_fids"]) == []


def test_a_clip_newly_listed_by_step_01_makes_step_02_update_its_file(tmp_path):
    names = dataset(tmp_path, n=3)
    cfg = config(tmp_path, "data.skip_bad_audio=true")
    compute_logmels(cfg, **quiet)
    (tmp_path / "development" / names[0]).unlink()
    prepare_clotho(tmp_path, ["development"], skip_bad_audio=True)
    [r] = compute_logmels(cfg, **quiet)
    assert not r.skipped_existing and r.reused == 2
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert set(f) == {make_fid("development", n) for n in names[1:]}


def test_a_deleted_skip_list_is_written_again(tmp_path):
    names = dataset(tmp_path, n=3)
    low_rate(tmp_path / "development" / names[0])
    cfg = config(tmp_path, "data.skip_bad_audio=true")
    compute_logmels(cfg, **quiet)
    (tmp_path / SKIP_CSV).unlink()
    [r] = compute_logmels(cfg, **quiet)
    assert not r.skipped_existing
    assert [f for f, _, _ in read_skipped(tmp_path / SKIP_CSV)] == [names[0]]


# ---------------------------------------------------------------------------------------------
# A wav replaced under the same name

@pytest.mark.parametrize("same_size", [True, False])
def test_a_replaced_wav_is_recomputed(tmp_path, same_size):
    names = dataset(tmp_path, n=3)
    cfg = config(tmp_path)
    compute_logmels(cfg, **quiet)
    wav = tmp_path / "development" / names[1]
    before = os.stat(wav)
    write_wav(wav, seconds=0.3 if same_size else 0.5, seed=99)  # other content, same name
    if same_size:
        assert os.stat(wav).st_size == before.st_size
        os.utime(wav, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    [r] = compute_logmels(cfg, **quiet)
    assert not r.skipped_existing and (r.computed, r.reused) == (1, 2)
    y, sr = load_audio(wav)
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        ds = f[make_fid("development", names[1])]
        np.testing.assert_array_equal(ds[()], log_mel(y, sr))
        assert (ds.attrs["size"], ds.attrs["mtime_ns"]) == (os.stat(wav).st_size, os.stat(wav).st_mtime_ns)
    assert compute_logmels(cfg, **quiet)[0].skipped_existing


# ---------------------------------------------------------------------------------------------
# A full disk

@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 kB tmpfs (root with CAP_SYS_ADMIN only); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("workers, size, fails_in", [(2, "300k", "shards"), (1, "300k", "shards"),
                                                     (1, "720k", "merge")])
def test_a_really_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, tiny_disk, workers, size, fails_in):
    """20 clips of ~20 kB, in shards of 2 and then merged: 300 kB fills up while the shards are
    written, 720 kB holds the shards but not the merged file as well (anything from 560 to 960 kB
    does). workers=1 writes in this process, where HDF5 writing to the full disk itself crashed
    it (exit 139)."""
    root = tmp_path / "clotho"
    make_clotho(root, {"development": 20}, seconds=1.5)
    feats = [f"paths.features_dir={tiny_disk}"]
    subprocess.run(["mount", "-o", f"remount,size={size}", str(tiny_disk)], check=True)
    assert run_step("01", root, *feats).returncode == 0
    line = error_line(run_step("02", root, *feats, f"features.workers={workers}", "features.flush_every=2"))
    assert line.startswith(f"error: no space left on {tiny_disk}") and "out of memory" not in line
    assert "rerun preprocessing/02_audio_logmel.py to resume" in line
    if fails_in == "merge":
        assert "the 20 clips finished are kept" in line
    assert not logmel_path(tiny_disk, "development").exists()
    assert not list(tiny_disk.glob(".*.tmp")) and not list(parts_dir(tiny_disk, "development").glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=20m", str(tiny_disk)], check=True)
    proc = run_step("02", root, *feats, f"features.workers={workers}")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout + proc.stderr


def limit_dataset(root):
    """Four 0.3 s clips (shards of ~10 kB each), then a 2 s one (~32 kB); merged ~51 kB."""
    names = dataset(root, n=5)
    write_wav(root / "development" / names[-1], seconds=2.0, seed=4)
    prepare_clotho(root, ["development"])
    return names


def assert_same_logmels(path, reference):
    """The same clips, in the same order, with the same data and attrs, file attrs included."""
    with h5py.File(path, "r") as f, h5py.File(reference, "r") as ref:
        assert list(f) == list(ref) and dict(f.attrs) == dict(ref.attrs)
        for fid in ref:
            np.testing.assert_array_equal(f[fid][()], ref[fid][()])
            assert dict(f[fid].attrs) == dict(ref[fid].attrs)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("limit, fails_in", [(20_000, "shards"), (40_000, "merge")])
def test_a_write_that_does_not_fit_is_one_line_and_the_rerun_resumes(tmp_path, workers, limit, fails_in):
    """A file-size limit hit while the 2 s clip's shard is written, or while the merged file is:
    one line (workers=1 writes in this process, where HDF5 hitting the limit itself crashed it
    with SIGSEGV, and a failed merge was an h5py traceback), the finished shards are kept, and
    the rerun finishes them into the file that a run which never failed writes."""
    root, clean = tmp_path / "a", tmp_path / "b"
    limit_dataset(root)
    shutil.copytree(root, clean)  # keeps mtimes: the same clip signatures
    line = error_line(run_step("02", root, f"features.workers={workers}", "features.flush_every=1", limit=limit))
    assert "grew past a file-size limit" in line and "rerun preprocessing/02_audio_logmel.py to resume" in line
    parts = parts_dir(root, "development")
    shards = sorted(parts.glob("shard-*.h5"))
    if fails_in == "merge" or workers == 1:  # one worker takes the clips in order: 4 fit
        kept = 5 if fails_in == "merge" else 4
        assert f"the {kept} clips finished are kept in {parts}" in line and len(shards) == kept
    assert shards and not logmel_path(root, "development").exists()
    assert not list(root.glob(".*.tmp")) and not list(parts.glob(".*.tmp"))
    proc = run_step("02", root, f"features.workers={workers}")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout + proc.stderr
    compute_logmels(config(clean), **quiet)
    assert_same_logmels(logmel_path(root, "development"), logmel_path(clean, "development"))


def test_a_shard_written_by_hdf5_on_disk_is_still_reused(tmp_path):
    """Shards used to be written by HDF5 straight to their file, now from memory: the old ones
    are read back the same (same datasets and attrs)."""
    names = dataset(tmp_path, n=3)
    cfg = config(tmp_path, "features.flush_every=1")
    compute_logmels(cfg, **quiet)
    final = logmel_path(tmp_path, "development")
    reference = final.with_name("reference.hdf5")
    final.rename(reference)
    parts = parts_dir(tmp_path, "development")
    parts.mkdir()
    fid = make_fid("development", names[0])
    with h5py.File(reference, "r") as ref, h5py.File(parts / "shard-00000.h5", "w") as old:
        old.attrs.update({k: v for k, v in ref.attrs.items() if not k.startswith("skipped_")})
        ref.copy(fid, old, name=fid)
    r = compute_logmels(cfg, **quiet)[0]
    assert (r.computed, r.reused) == (2, 1)
    assert_same_logmels(final, reference)


def test_a_disk_error_in_a_worker_is_reported_as_such(tmp_path, monkeypatch):
    """HDF5 raises ENOSPC without a useful path; the message names the features folder."""
    dataset(tmp_path, n=4)
    real = features_mod.write_shard

    def full(folder, index, results, params):  # the forked workers inherit this
        if index >= 2:
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28)")
        return real(folder, index, results, params)

    monkeypatch.setattr(features_mod, "write_shard", full)
    with pytest.raises(UserError, match=rf"^no space left on {tmp_path}: the \d clips finished are kept"):
        compute_logmels(config(tmp_path, "features.workers=2", "features.flush_every=1"), **quiet)


def test_a_worker_that_died_on_a_full_disk_is_not_blamed_on_memory(tmp_path, monkeypatch):
    names = dataset(tmp_path, n=4)
    real = features_mod._compute

    def dying(clip):
        if clip.fname == names[-1]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(clip)

    monkeypatch.setattr(features_mod, "_compute", dying)
    cfg = config(tmp_path, "features.workers=2", "features.flush_every=1")
    with pytest.raises(UserError, match="out of memory"):
        compute_logmels(cfg, **quiet)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(features_mod.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(UserError, match=rf"^no space left on {tmp_path}") as e:
        compute_logmels(cfg, **quiet)
    assert "memory" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# A parent killed with SIGKILL; two runs at once

def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped: only its exit status is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_do_not_outlive_a_parent_killed_with_sigkill(tmp_path):
    dataset(tmp_path, n=40, seconds=3.0)
    proc = run_step("02", tmp_path, "features.workers=2", "features.flush_every=2", popen=True)
    try:
        wait_for_a_shard(proc, tmp_path)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: as the OOM killer would
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)
    finally:
        stop(proc)


def test_a_second_run_on_the_same_features_folder_is_refused_naming_the_holder(tmp_path):
    dataset(tmp_path, n=80, seconds=4.0)
    first = run_step("02", tmp_path, "features.workers=1", "features.flush_every=2", popen=True)
    try:
        wait_for_a_shard(first, tmp_path)
        for step in ("02", "01"):  # step 01 would rewrite what step 02 reads
            line = error_line(run_step(step, tmp_path))
            assert f"features folder {tmp_path}" in line and f"in use by pid {first.pid}" in line
            assert "02_audio_logmel.py" in line
        assert first.poll() is None  # the holder was still at work all along
    finally:
        stop(first)
    assert run_step("01", tmp_path).returncode == 0  # the kernel dropped the lock with the holder


def test_the_features_folder_must_be_writable(tmp_path, monkeypatch):
    from utils.clotho import features_lock

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"not writable — set paths.features_dir"):
        features_lock(tmp_path, "01")


# ---------------------------------------------------------------------------------------------
# A damaged HDF5 file

def zero_headers(path, which):
    """Overwrite internal HDF5 headers with zeros: the root group's, or one clip's."""
    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f["/"].id if which == "root" else f[which].id).addr
    with open(path, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\0" * 64)


@pytest.mark.parametrize("which", ["root", "clip"])
def test_a_damaged_hdf5_is_named_by_every_reader_and_rebuilt_by_step_02(tmp_path, which):
    names = dataset(tmp_path, n=3)
    cfg = config(tmp_path)
    compute_logmels(cfg, **quiet)
    write_fake_embeddings(tmp_path)
    path = logmel_path(tmp_path, "development")
    zero_headers(path, "root" if which == "root" else make_fid("development", names[1]))
    _, tid2row = du.load_text_table(tmp_path)
    readers = [lambda: du.CaptionDataset(tmp_path, "development", tid2row),
               lambda: du.ClipDataset(tmp_path, "development", [make_fid("development", n) for n in names]),
               lambda: du.logmel_lengths(tmp_path, "development", [make_fid("development", names[0])]
                                         if which == "root" else [make_fid("development", names[1])])]
    for reader in readers:
        with pytest.raises(UserError) as e:
            reader()
        message = str(e.value)
        assert message.startswith(f"{path}: damaged HDF5 file") and "\n" not in message
        assert message.endswith("rerun preprocessing/02_audio_logmel.py, which rebuilds it")
    # following the advice
    proc = run_step("02", tmp_path, "features.workers=1")
    assert proc.returncode == 0, proc.stderr
    assert "is damaged" in proc.stdout + proc.stderr and "already complete" not in proc.stdout
    ds = du.CaptionDataset(tmp_path, "development", tid2row)
    assert len(ds) == 15 and torch.isfinite(ds[7][0]).all()
    ds.close()


def test_nan_log_mels_advice_works(tmp_path):
    """Step 02 never writes NaN: log-mels holding them come from a damaged file, which it would
    call complete (it does not read every value); the training message says to delete it first."""
    names = dataset(tmp_path, n=2)
    cfg = config(tmp_path)
    compute_logmels(cfg, **quiet)
    write_fake_embeddings(tmp_path)
    path = logmel_path(tmp_path, "development")
    with h5py.File(path, "r+") as f:
        f[make_fid("development", names[1])][3, :] = np.nan
    _, tid2row = du.load_text_table(tmp_path)
    ds = du.CaptionDataset(tmp_path, "development", tid2row)
    audio, _, clips = du.collate_pad([ds[i] for i in range(10)])
    message = str(nonfinite_loss_error(1, 3, float("nan"), nonfinite_clips(audio, clips, ds), ds))
    ds.close()
    assert f"delete {path} and rerun preprocessing/02_audio_logmel.py" in message
    assert compute_logmels(cfg, **quiet)[0].skipped_existing  # why the delete is needed
    path.unlink()
    compute_logmels(cfg, **quiet)
    with h5py.File(path, "r") as f:
        assert all(np.isfinite(f[fid][()]).all() for fid in f)


# ---------------------------------------------------------------------------------------------
# Clips without log-mels: the advice names the step that fixes it

def test_missing_log_mels_advice_works_after_a_new_step_01(tmp_path):
    dataset(tmp_path, n=2)
    compute_logmels(config(tmp_path), **quiet)
    write_wav(tmp_path / "development" / "new.wav", seconds=0.2, seed=7)
    with open(tmp_path / "clotho_captions_development.csv", "a", encoding="utf-8") as f:
        f.write("new.wav,a,b,c,d,e\n")
    prepare_clotho(tmp_path, ["development"])
    write_fake_embeddings(tmp_path)
    _, tid2row = du.load_text_table(tmp_path)
    with pytest.raises(UserError, match=r"has no log-mels .* — rerun preprocessing/02_audio_logmel.py$"):
        du.CaptionDataset(tmp_path, "development", tid2row)
    compute_logmels(config(tmp_path), **quiet)
    assert len(du.CaptionDataset(tmp_path, "development", tid2row)) == 15


def test_captions_that_the_index_lacks_need_step_01_first(tmp_path):
    """Step 01 killed between writing the text CSV and audio_info.pkl: step 02 alone would call
    the log-mels complete, so the advice names step 01 too."""
    dataset(tmp_path, n=2)
    compute_logmels(config(tmp_path), **quiet)
    info = (tmp_path / "audio_info.pkl").read_bytes()
    write_wav(tmp_path / "development" / "new.wav", seconds=0.2, seed=7)
    with open(tmp_path / "clotho_captions_development.csv", "a", encoding="utf-8") as f:
        f.write("new.wav,a,b,c,d,e\n")
    prepare_clotho(tmp_path, ["development"])
    (tmp_path / "audio_info.pkl").write_bytes(info)  # the index from before
    write_fake_embeddings(tmp_path)
    _, tid2row = du.load_text_table(tmp_path)
    with pytest.raises(UserError, match="rerun preprocessing/01_clotho_dataset.py, then preprocessing/02"):
        du.CaptionDataset(tmp_path, "development", tid2row)
    assert compute_logmels(config(tmp_path), **quiet)[0].skipped_existing  # 02 alone does not help
    prepare_clotho(tmp_path, ["development"])
    compute_logmels(config(tmp_path), **quiet)
    assert len(du.CaptionDataset(tmp_path, "development", tid2row)) == 15


def test_a_malformed_index_is_one_line(tmp_path):
    dataset(tmp_path, n=1)
    save_pickle({"audio_fid2fname": {"development": ["not", "a", "mapping"]}}, tmp_path / "audio_info.pkl")
    with pytest.raises(UserError, match=r"audio_info.pkl: split 'development' is not a \{fid: file name\} mapping"):
        compute_logmels(config(tmp_path), **quiet)


def test_an_index_whose_fids_do_not_name_their_clips_is_refused(tmp_path):
    """Two file names swapped in audio_info.pkl would store one clip's log-mels under the
    other's fid, and training would pair them with the other clip's captions."""
    from utils.io_utils import load_pickle

    dataset(tmp_path, n=2)
    info = load_pickle(tmp_path / "audio_info.pkl")
    (a, fa), (b, fb) = list(info["audio_fid2fname"]["development"].items())[:2]
    info["audio_fid2fname"]["development"].update({a: fb, b: fa})
    save_pickle(info, tmp_path / "audio_info.pkl")
    with pytest.raises(UserError, match=rf"audio_info.pkl: split 'development': fid {a} is not the "
                                        rf"id of '{fb}' .* rerun preprocessing/01_clotho_dataset.py"):
        compute_logmels(config(tmp_path), **quiet)


def test_the_parent_transform_route_reports_a_clip_without_log_mel(tmp_path):
    """features.device cuda: the parent computes log_mel_torch; a clip it cannot transform is a
    bad clip there too (run here on the CPU, the same code)."""
    from utils.clotho import resolve_wav
    from utils.features import Clip, _gpu_chunks, _init_worker, make_chunks, worker_params

    names = dataset(tmp_path, n=2)
    low_rate(tmp_path / "development" / names[0])
    clips = [Clip(make_fid("development", n), n, str(resolve_wav(tmp_path / "development", n)), 1) for n in names]
    features = load_config(REPO / "conf.yaml")["features"]
    _init_worker(worker_params(features, "cuda"))  # load_only, as with a GPU
    try:
        done = list(_gpu_chunks(make_chunks(clips, parts_dir(tmp_path, "development"), 0, 4, 1), None, "cpu"))
    finally:
        _init_worker(worker_params(features, "cpu"))
    assert [fid for d in done for fid in d.sigs] == [clips[1].fid]
    assert [(f, r.split(":")[0]) for d in done for f, r in d.bad] == [(names[0], "no log-mel")]
