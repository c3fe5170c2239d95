"""Step 02 (utils.audio_utils, utils.features, preprocessing/02_audio_logmel.py): wavs -> log-mels."""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import h5py
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from utils import audio_utils
from utils import features as features_mod
from utils.audio_utils import AudioError, load_audio, log_mel, log_mel_torch, n_frames, stft_params
from utils.clotho import make_fid, prepare_clotho, read_skipped, resolve_wav
from utils.config import load_config
from utils.errors import UserError
from utils.features import (Clip, _gpu_chunks, _init_worker, compute_logmels, in_order, logmel_path,
                            make_chunks, parts_dir, worker_params)
from tests.cli_helpers import run_in_process
from wav_fixtures import (make_clotho, signal as make_signal, write_captions_csv, write_header_only,
                          write_text_as_wav, write_truncated, write_wav, write_zero_length)


def run_step(repo, dataset_dir, *overrides, popen=False):
    cmd = [sys.executable, "preprocessing/02_audio_logmel.py", "--conf", str(repo / "conf.yaml"),
           "--set", f"paths.dataset_dir={dataset_dir}", *overrides]
    if popen:
        # own process group, so a test can Ctrl-C it (and its workers) as a terminal would
        return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)


def start_step_until_a_shard_exists(repo, dataset_dir, *overrides):
    """Start step 02 (development split) and return its Popen once a first shard is on disk."""
    parts = parts_dir(dataset_dir, "development")
    proc = run_step(repo, dataset_dir, *overrides, popen=True)
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(parts.glob("shard-*.h5"))):
        assert proc.poll() is None, f"finished before a shard was written: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def config(repo, dataset_dir, *overrides):
    return load_config(repo / "conf.yaml", [f"paths.dataset_dir={dataset_dir}", *overrides])


def dataset(tmp_path, clips, seconds=0.3, sr=44100):
    """A Clotho-layout dataset that went through step 01."""
    rows = make_clotho(tmp_path, clips, seconds=seconds, sr=sr)
    prepare_clotho(tmp_path, list(clips))
    return rows


def assert_hdf5_matches_wavs(dataset_dir, split, fnames):
    with h5py.File(logmel_path(dataset_dir, split), "r") as f:
        assert set(f.keys()) == {make_fid(split, n) for n in fnames}
        for fname in fnames:
            y, sr = load_audio(dataset_dir / split / fname.lstrip(" "))
            stored = f[make_fid(split, fname)]
            assert stored.dtype == np.float32 and stored.attrs["fname"] == fname and stored.attrs["sr"] == sr
            np.testing.assert_array_equal(stored[()], log_mel(y, sr))


# ---------------------------------------------------------------------------------------------
# log_mel

def test_log_mel_defaults_are_conf_yaml(repo):
    features = load_config(repo / "conf.yaml")["features"]
    assert (audio_utils.WINDOW_S, audio_utils.HOP_S, audio_utils.N_MELS) == \
        (features["window_s"], features["hop_s"], features["n_mels"])


@pytest.mark.parametrize("sr, win, hop, n_fft", [(44100, 1764, 882, 2048), (48000, 1920, 960, 2048),
                                                  (16000, 640, 320, 1024), (22050, 882, 441, 1024)])
def test_stft_params(sr, win, hop, n_fft):
    assert stft_params(sr) == (win, hop, n_fft)


@pytest.mark.parametrize("sr, seconds", [(44100, 1.0), (44100, 0.23), (48000, 0.5), (16000, 0.7)])
def test_log_mel_is_librosa_and_has_the_expected_shape(sr, seconds):
    y = make_signal(seconds, sr, seed=sr)
    out = log_mel(y, sr)
    win, hop, n_fft = stft_params(sr)
    assert out.dtype == np.float32 and out.shape == (1 + len(y) // hop, 64) == (n_frames(len(y), sr), 64)
    mel = librosa.feature.melspectrogram(y=y.astype(np.float64), sr=sr, n_fft=n_fft, hop_length=hop,
                                         win_length=win, n_mels=64)
    np.testing.assert_allclose(out, np.log(mel + np.spacing(1)).T, rtol=1e-6, atol=1e-5)
    # the float32 computation the baseline ran agrees closely on noise
    mel32 = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=hop, win_length=win, n_mels=64)
    assert np.abs(out - np.log(mel32 + np.spacing(1)).T).max() < 1e-3


@pytest.mark.parametrize("kind, sr, seconds", [("noise", 44100, 0.6), ("tone", 44100, 0.5), ("quiet", 44100, 0.4),
                                               ("tone", 48000, 0.3), ("noise", 16000, 0.8), ("tone", 22050, 0.25)])
def test_torch_path_matches_librosa_on_cpu(kind, sr, seconds):
    y = make_signal(seconds, sr, kind=kind, seed=1, freq=997.0)
    ref = log_mel(y, sr)
    out = log_mel_torch(y, sr, "cpu")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == ref.shape
    assert np.abs(out.numpy() - ref).max() <= 1e-3


def test_a_clip_shorter_than_one_fft_frame_is_padded_quietly_and_alike_on_both_paths():
    """45 ms at 44.1 kHz is shorter than n_fft (2048): centring pads it with zeros, on the
    librosa path and the torch path alike, without librosa's warning reaching the user."""
    import warnings

    y = make_signal(0.045, 44100, kind="noise", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = log_mel(y, 44100)
    assert ref.shape == (3, 64)
    assert np.abs(log_mel_torch(y, 44100, "cpu").numpy() - ref).max() <= 1e-3


def test_torch_path_batch_and_silence():
    sr = 44100
    batch = np.stack([make_signal(0.3, sr, seed=s) for s in range(3)] + [np.zeros(int(0.3 * sr), np.float32)])
    out = log_mel_torch(torch.from_numpy(batch), sr, "cpu")
    assert tuple(out.shape) == (4, n_frames(batch.shape[1], sr), 64)
    for row, y in zip(out, batch):
        assert np.abs(row.numpy() - log_mel(y, sr)).max() <= 1e-3
    assert np.allclose(out[3].numpy(), np.log(np.spacing(1)))  # digital silence is log(eps)


PAGE_FAULTS_PER_CLIP = """
import resource, sys
import numpy as np
from utils.audio_utils import log_mel
from utils.features import _init_worker, set_up_process
if sys.argv[1] == "tuned":  # as a pool worker is set up
    set_up_process()
    _init_worker({"window_s": 0.04, "hop_s": 0.02, "n_mels": 64, "load_only": False})
y = (np.random.default_rng(3).standard_normal(20 * 44100) * 0.1).astype(np.float32)
log_mel(y, 44100)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    log_mel(y, 44100)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="tunes glibc's malloc")
def test_worker_reuses_freed_buffers_instead_of_faulting_pages_in(repo):
    # step 02's workers used to hand each clip's ~50 MB of buffers back to the kernel and fault
    # them in again for the next clip (thousands of page faults, 12 ms of system time per clip).
    # A fresh interpreter each, so this process's own malloc settings play no part.
    faults = {}
    for mode in ("untuned", "tuned"):
        proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_CLIP, mode], cwd=repo,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = float(proc.stdout.split()[-1])
    assert faults["tuned"] < 50, faults  # untuned ~150 in a bare process, ~2,500 in the pool
    assert faults["tuned"] < faults["untuned"] / 3, faults


# ---------------------------------------------------------------------------------------------
# load_audio

def test_load_16bit(tmp_path):
    path = write_wav(tmp_path / "a.wav", seconds=0.3, sr=44100, subtype="PCM_16")
    y, sr = load_audio(path)
    assert sr == 44100 and y.dtype == np.float32 and y.shape == (13230,)
    np.testing.assert_allclose(y, make_signal(0.3, 44100), atol=1 / 2 ** 15)


def test_load_stereo_is_downmixed_by_mean(tmp_path):
    path = write_wav(tmp_path / "s.wav", seconds=0.2, sr=22050, channels=2, kind="tone", subtype="FLOAT")
    y, sr = load_audio(path)
    stereo = make_signal(0.2, 22050, channels=2, kind="tone")
    assert sr == 22050 and y.ndim == 1
    np.testing.assert_allclose(y, stereo.mean(axis=1), atol=1e-7)


def test_load_48k_stereo_24bit_keeps_native_rate(tmp_path):
    path = write_wav(tmp_path / "s.wav", seconds=0.25, sr=48000, channels=2, subtype="PCM_24")
    y, sr = load_audio(path)
    assert sr == 48000 and y.shape == (12000,) and y.dtype == np.float32
    np.testing.assert_allclose(y, make_signal(0.25, 48000, channels=2).mean(axis=1), atol=1 / 2 ** 22)
    assert log_mel(y, sr).shape == (1 + 12000 // 960, 64)


def test_load_float_wav(tmp_path):
    path = write_wav(tmp_path / "f.wav", seconds=0.2, sr=16000, subtype="FLOAT")
    y, sr = load_audio(path)
    assert sr == 16000 and sf.info(str(path)).subtype == "FLOAT"
    np.testing.assert_array_equal(y, make_signal(0.2, 16000))


@pytest.mark.parametrize("maker, reason", [
    (lambda p: p, "missing"),
    (write_zero_length, "empty"),
    (write_truncated, "unreadable"),
    (write_header_only, "unreadable"),
    (write_text_as_wav, "unreadable"),
])
def test_load_bad_audio_raises_audio_error(tmp_path, maker, reason):
    path = tmp_path / "bad.wav"
    maker(path)
    with pytest.raises(AudioError) as e:
        load_audio(path)
    assert e.value.reason == reason and "bad.wav" in str(e.value)
    assert isinstance(e.value, UserError)


# ---------------------------------------------------------------------------------------------
# The step

def test_step_writes_every_clip_and_skips_a_complete_split(repo, tmp_path):
    rows = dataset(tmp_path, {"development": 4, "validation": 2})
    cfg = config(repo, tmp_path, "data.splits=[development, validation]", "features.workers=2",
                 "features.flush_every=1")
    results = compute_logmels(cfg, log=lambda *a: None)
    assert [(r.split, r.computed, r.skipped_existing) for r in results] == \
        [("development", 4, False), ("validation", 2, False)]
    for split in ("development", "validation"):
        assert_hdf5_matches_wavs(tmp_path, split, list(rows[split]))
        assert not parts_dir(tmp_path, split).exists()
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert f.attrs["window_s"] == 0.04 and f.attrs["hop_s"] == 0.02 and f.attrs["n_mels"] == 64
        assert f.attrs["eps"] == np.spacing(1) and json.loads(f.attrs["skipped_fids"]) == []
    assert all(r.skipped_existing for r in compute_logmels(cfg, log=lambda *a: None))


def test_mixed_sample_rates_get_a_note_per_split(repo, tmp_path, monkeypatch):
    """Log-mels are taken at each wav's own rate (the baseline's): a mel band then spans other
    frequencies per rate. A split mixing rates, or at a rate the training split has none at, is
    a note on stderr (not an error), also when the file was already complete."""
    make_clotho(tmp_path, {"development": 3, "validation": 2, "evaluation": 1}, seconds=0.3)
    write_wav(tmp_path / "development" / "development_clip_002.wav", seconds=0.3, sr=48000)
    for i in range(2):
        write_wav(tmp_path / "validation" / f"validation_clip_{i:03d}.wav", seconds=0.3, sr=22050)
    prepare_clotho(tmp_path, ["development", "validation", "evaluation"])
    for _ in range(2):  # computed, then already complete
        proc = run_in_process(monkeypatch, "preprocessing/02_audio_logmel.py", "--conf", repo / "conf.yaml",
                              "--set", f"paths.dataset_dir={tmp_path}", "features.workers=1")
        assert proc.returncode == 0, proc.stderr
        notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
        assert notes == [
            "note: development mixes sample rates: 44100 Hz (2 clips), 48000 Hz (1 clip) — the log-mels "
            "of a mel band then cover other frequencies per rate; resample the wavs to one rate first",
            "note: validation is at 22050 Hz (2 clips), the training split development at 44100 Hz "
            "(2 clips), 48000 Hz (1 clip) — the log-mels of a mel band then cover other frequencies "
            "per rate; resample the wavs to one rate first"], proc.stderr
        assert "note:" not in proc.stdout


def test_one_sample_rate_gets_no_note(repo, tmp_path, monkeypatch):
    dataset(tmp_path, {"development": 2, "validation": 1}, sr=22050)
    proc = run_in_process(monkeypatch, "preprocessing/02_audio_logmel.py", "--conf", repo / "conf.yaml",
                          "--set", f"paths.dataset_dir={tmp_path}", "data.splits=[development, validation]",
                          "features.workers=1")
    assert proc.returncode == 0 and "note:" not in proc.stdout + proc.stderr, proc.stderr
    # only the evaluation split this time: compared with the training split's file on disk
    write_wav(tmp_path / "evaluation" / "e.wav", seconds=0.3, sr=44100)
    write_captions_csv(tmp_path / "clotho_captions_evaluation.csv", {"e.wav": ["a b c"] * 5})
    prepare_clotho(tmp_path, ["development", "validation", "evaluation"])
    proc = run_in_process(monkeypatch, "preprocessing/02_audio_logmel.py", "--conf", repo / "conf.yaml",
                          "--set", f"paths.dataset_dir={tmp_path}", "data.splits=[evaluation]",
                          "features.workers=1")
    assert proc.returncode == 0, proc.stderr
    assert "note: evaluation is at 44100 Hz (1 clip), the training split development at 22050 Hz (2 clips)" \
        in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_the_callers_threads_are_its_own_again_after_the_step(repo, tmp_path, workers):
    """Computing log-mels limits this process to one BLAS/OpenMP thread (the workers fill the
    cores); a caller in the same process (a notebook, training next) gets its threads back."""
    dataset(tmp_path, {"development": 2})
    cfg = config(repo, tmp_path, "data.splits=[development]", f"features.workers={workers}")
    torch.set_num_threads(2)
    compute_logmels(cfg, log=lambda *a: None)
    assert torch.get_num_threads() == 2
    features_mod.compute_split(tmp_path, "development", {}, cfg["features"], log=lambda *a: None)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_the_callers_exception_hooks_and_malloc_settings_are_left_alone(repo, tmp_path, monkeypatch, workers):
    """compute_logmels / compute_split in a caller's own process (a notebook) used to replace
    sys.excepthook and sys.unraisablehook for good (a hook the user set later was dropped) and
    tune glibc's malloc, which cannot be undone; now the hooks are the caller's again after
    the block, forwarding to them within it, and malloc is tuned only in the step's own
    processes (its script, the pool workers)."""
    dataset(tmp_path, {"development": 2})
    cfg = config(repo, tmp_path, "data.splits=[development]", f"features.workers={workers}")
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: seen.append(str(e)))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    mine = sys.excepthook, sys.unraisablehook
    tuned = []
    monkeypatch.setattr(features_mod, "keep_freed_memory", lambda *a: tuned.append(os.getpid()))
    compute_logmels(cfg, log=lambda *a: None)
    features_mod.compute_split(tmp_path, "development", {}, cfg["features"], log=lambda *a: None)
    assert (sys.excepthook, sys.unraisablehook) == mine and tuned == []
    full_disk = RuntimeError("Can't decrement id ref count (file write failed: errno = 28, ...)")
    with features_mod._as_worker(worker_params(cfg["features"], "cpu")):
        sys.excepthook(RuntimeError, full_disk, None)  # the HDF5 noise of a full disk: dropped
        sys.excepthook(ValueError, ValueError("the caller's"), None)  # passed on to the caller's hook
    assert seen == ["the caller's"] and (sys.excepthook, sys.unraisablehook) == mine


def test_changed_parameters_or_clips_update_the_file(repo, tmp_path):
    rows = dataset(tmp_path, {"development": 3})
    cfg = config(repo, tmp_path, "data.splits=[development]", "features.workers=1")
    compute_logmels(cfg, log=lambda *a: None)
    # a new clip after a rerun of step 01: only it is computed
    write_wav(tmp_path / "development" / "new.wav", seconds=0.2, seed=9)
    with open(tmp_path / "clotho_captions_development.csv", "a", encoding="utf-8") as f:
        f.write("new.wav,a,b,c,d,e\n")
    prepare_clotho(tmp_path, ["development"])
    messages = []
    [r] = compute_logmels(cfg, log=messages.append)
    assert (r.computed, r.reused) == (1, 3) and r.updated and "outdated" in messages[0]
    assert not any("resuming" in m for m in messages)  # nothing was interrupted
    assert_hdf5_matches_wavs(tmp_path, "development", [*rows["development"], "new.wav"])
    # other feature parameters: everything is recomputed
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        frames = {fid: ds.shape[0] for fid, ds in f.items()}
    [r] = compute_logmels(config(repo, tmp_path, "data.splits=[development]", "features.hop_s=0.01"),
                          log=messages.append)
    assert (r.computed, r.reused) == (4, 0)
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert f.attrs["hop_s"] == 0.01
        assert all(ds.shape[0] >= 2 * frames[fid] - 1 for fid, ds in f.items())


def test_leftover_temporaries_are_never_taken_for_output(repo, tmp_path):
    rows = dataset(tmp_path, {"development": 2})
    final = logmel_path(tmp_path, "development")
    leftover = final.parent / f".{final.name}.abc123.tmp"  # what a kill during the merge leaves
    leftover.write_bytes(b"partial")
    parts = parts_dir(tmp_path, "development")
    parts.mkdir()
    (parts / ".shard-00000.h5.xyz.tmp").write_bytes(b"partial")
    (parts / "shard-00001.h5").write_bytes(b"not hdf5")  # e.g. a disk error
    compute_logmels(config(repo, tmp_path, "data.splits=[development]"), log=lambda *a: None)
    assert not leftover.exists() and not parts.exists()
    assert_hdf5_matches_wavs(tmp_path, "development", list(rows["development"]))


@pytest.mark.parametrize("maker, reason", [
    (lambda p: p.unlink(), "missing"),
    (write_zero_length, "empty"),
    (write_truncated, "unreadable"),
    (write_text_as_wav, "unreadable"),
])
def test_bad_audio_at_step_02(repo, tmp_path, maker, reason):
    rows = dataset(tmp_path, {"development": 3})
    bad = list(rows["development"])[1]
    maker(tmp_path / "development" / bad)  # broken after step 01 ran
    cfg = config(repo, tmp_path, "data.splits=[development]", "features.flush_every=1")
    with pytest.raises(UserError, match=rf"development: 1 unusable audio file \({reason}: {bad}\).*skip_bad_audio"):
        compute_logmels(cfg, log=lambda *a: None)
    assert not logmel_path(tmp_path, "development").exists()
    assert len(list(parts_dir(tmp_path, "development").glob("shard-*.h5"))) == 2  # the good clips are kept

    cfg = config(repo, tmp_path, "data.splits=[development]", "data.skip_bad_audio=true")
    [r] = compute_logmels(cfg, log=lambda *a: None)
    assert (r.computed, r.reused) == (0, 2) and [b[0] for b in r.bad] == [bad]
    assert [r[::2] for r in read_skipped(tmp_path / "development_skipped_audio.csv")] == [(bad, "02")]
    good = [n for n in rows["development"] if n != bad]
    assert_hdf5_matches_wavs(tmp_path, "development", good)
    with h5py.File(logmel_path(tmp_path, "development"), "r") as f:
        assert json.loads(f.attrs["skipped_fids"]) == [make_fid("development", bad)]
    # skipping again is a no-op; without skipping, the skipped clip is retried (and still fails)
    [r] = compute_logmels(cfg, log=lambda *a: None)
    assert r.skipped_existing
    with pytest.raises(UserError, match="unusable audio"):
        compute_logmels(config(repo, tmp_path, "data.splits=[development]"), log=lambda *a: None)


@pytest.mark.parametrize("n, flush_every, workers", [(120, 64, 2), (3839, 64, 2), (7, 64, 4), (50, 5, 1), (0, 64, 2)])
def test_chunks_cover_every_clip_in_order_and_shrink_towards_the_end(tmp_path, n, flush_every, workers):
    clips = [Clip(str(i), f"{i}.wav", f"{i}.wav", 1) for i in range(n)]
    chunks = make_chunks(clips, tmp_path, 7, flush_every, workers)
    assert [c for chunk in chunks for c in chunk.clips] == clips
    assert [chunk.index for chunk in chunks] == list(range(7, 7 + len(chunks)))
    sizes = [len(chunk.clips) for chunk in chunks]
    assert all(1 <= size <= flush_every for size in sizes) and sizes == sorted(sizes, reverse=True)
    if n >= 2 * workers:
        assert sizes[-1] == 1  # the last chunks keep no worker waiting


def test_clips_are_read_ahead_in_order_a_bounded_number_at_a_time():
    """features.device cuda: the readers may run only `ahead` clips before the GPU side."""
    from concurrent.futures import ThreadPoolExecutor

    submitted, taken = [], []
    with ThreadPoolExecutor(3) as pool:
        def read(i):
            submitted.append(i)
            return i * i

        for value in in_order(pool, read, list(range(50)), ahead=5):
            taken.append(value)
            assert len(submitted) - len(taken) < 5
    assert taken == [i * i for i in range(50)]


@pytest.mark.parametrize("threads", [0, 2])
def test_parent_transform_route_writes_the_same_features(repo, tmp_path, threads):
    """features.device cuda: the workers only read the wavs and the parent runs log_mel_torch;
    the same route on the CPU must give librosa's features and report unusable clips."""
    from concurrent.futures import ThreadPoolExecutor

    rows = dataset(tmp_path, {"development": 3})
    fnames = list(rows["development"])
    write_text_as_wav(tmp_path / "development" / fnames[1].lstrip(" "))
    folder = parts_dir(tmp_path, "development")
    clips = [Clip(make_fid("development", f), f, str(resolve_wav(tmp_path / "development", f)), 1) for f in fnames]
    _init_worker(worker_params(load_config(repo / "conf.yaml")["features"], "cuda"))  # load_only
    try:
        with ThreadPoolExecutor(threads or 1) as pool:  # threads share the worker parameters
            finished = list(_gpu_chunks(make_chunks(clips, folder, 0, 2, 1), pool if threads else None, "cpu"))
    finally:
        _init_worker(worker_params(load_config(repo / "conf.yaml")["features"], "cpu"))
    assert sum(c.clips for c in finished) == 3
    assert [b[0] for c in finished for b in c.bad] == [fnames[1]]
    shards = {fid: c.shard for c in finished for fid in c.sigs}
    assert set(shards) == {clips[0].fid, clips[2].fid}
    for clip in (clips[0], clips[2]):
        with h5py.File(shards[clip.fid], "r") as f:
            y, sr = load_audio(clip.path)
            assert np.abs(f[clip.fid][()] - log_mel(y, sr)).max() <= 1e-3


def test_ctrl_c_stops_the_workers_keeps_their_shards_and_the_rerun_resumes(repo, tmp_path):
    rows = dataset(tmp_path, {"development": 40}, seconds=4.0)
    parts = parts_dir(tmp_path, "development")
    args = ("data.splits=[development]", "features.workers=2", "features.flush_every=2")
    proc = start_step_until_a_shard_exists(repo, tmp_path, *args)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    assert not logmel_path(tmp_path, "development").exists()
    assert any(parts.glob("shard-*.h5"))

    proc = run_step(repo, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout + proc.stderr
    assert_hdf5_matches_wavs(tmp_path, "development", list(rows["development"]))


def test_a_worker_killed_midway_is_a_clear_error_and_the_rerun_resumes(repo, tmp_path, monkeypatch):
    rows = dataset(tmp_path, {"development": 6})
    victim = list(rows["development"])[-1]
    real_compute = features_mod._compute

    def dying(clip):  # the forked workers inherit this: the one given the last clip is killed
        if clip.fname == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_compute(clip)

    monkeypatch.setattr(features_mod, "_compute", dying)
    cfg = config(repo, tmp_path, "data.splits=[development]", "features.workers=2", "features.flush_every=1")
    parts = parts_dir(tmp_path, "development")
    with pytest.raises(UserError, match=rf"^development: a features.workers process died .* kept in {re.escape(str(parts))}, rerun"):
        compute_logmels(cfg, log=lambda *a: None)
    assert not logmel_path(tmp_path, "development").exists()
    assert len(list(parts.glob("shard-*.h5"))) >= 4  # chunks 1-4 finished before the last one started

    monkeypatch.setattr(features_mod, "_compute", real_compute)
    [r] = compute_logmels(cfg, log=lambda *a: None)
    assert r.reused >= 4 and r.reused + r.computed == 6
    assert_hdf5_matches_wavs(tmp_path, "development", list(rows["development"]))


def test_missing_dataset_dir(repo, tmp_path):
    proc = run_step(repo, tmp_path / "nowhere")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'paths.dataset_dir'")


def test_missing_audio_info(repo, tmp_path):
    with pytest.raises(UserError, match=r"audio_info.pkl: not found \(run preprocessing/01"):
        compute_logmels(config(repo, tmp_path), log=lambda *a: None)


def test_kill_midway_then_resume(repo, tmp_path):
    """SIGKILL a real run once some shards are on disk: nothing looks complete; a rerun finishes
    with every clip, recomputing only the unfinished ones."""
    rows = dataset(tmp_path, {"development": 60}, seconds=4.0, sr=44100)
    final, parts = logmel_path(tmp_path, "development"), parts_dir(tmp_path, "development")
    args = ("data.splits=[development]", "features.workers=1", "features.flush_every=2")
    proc = start_step_until_a_shard_exists(repo, tmp_path, *args)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists() and not any(final.parent.glob("*.hdf5"))
    shards = list(parts.glob("shard-*.h5"))
    with h5py.File(shards[0], "r") as f:
        assert len(f) == 2

    proc = run_step(repo, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    reused = int(proc.stdout.split("resuming, ")[1].split(" of 60")[0])
    assert 2 <= reused < 60 and f"{60 - reused} computed, {reused} reused" in proc.stdout
    assert final.exists() and not parts.exists()
    assert_hdf5_matches_wavs(tmp_path, "development", list(rows["development"]))
    assert (tmp_path / "config.02_audio_logmel.yaml").is_file()
