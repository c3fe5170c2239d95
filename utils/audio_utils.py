"""Reading wav files and turning them into the baseline's log-mel features.

Log-mel, as the DCASE 2023 Task 6B baseline (SPEC "Log-mel"): mono at the file's native rate,
window 40 ms, hop 20 ms, FFT size = next power of two >= window, 64 mel bands (librosa's Slaney
mel filters on the power spectrogram, centred frames, zero padding), `log(mel + np.spacing(1))`,
stored as float32 `[frames, 64]` with `frames = 1 + len(y) // hop`.

Precision: the spectrogram is computed in float64 and only the result is cast to float32. In
float32, bands that hold almost no energy (far from a pure tone, digital silence) sit at the
FFT's round-off floor, and the log of round-off differs between FFT implementations by whole
units; in float64 the librosa path (`log_mel`) and the torch path (`log_mel_torch`, CPU or GPU)
agree to ~1e-6. On real recordings the difference to a float32 computation is far below 1e-3.

A sample rate so low that the 40 ms window's FFT leaves some mel band without a single frequency
bin (below ~1.6 kHz for 64 bands) has no log-mel: `log_mel` raises ValueError instead of
returning bands that hold only log(eps); step 02 reports such a clip as unusable ("no log-mel").

The default window/hop/band values below are conf.yaml's `features.*` (a test checks that they
agree); scripts pass the config's values explicitly.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf

from utils.errors import UserError

WINDOW_S = 0.040  # = conf.yaml features.window_s
HOP_S = 0.020  # = conf.yaml features.hop_s
N_MELS = 64  # = conf.yaml features.n_mels, which may only be this: CNN14 takes 64 bands
EPS = float(np.spacing(1))  # added before the log, as the baseline (~2.2e-16)


class AudioError(UserError):
    """A wav that cannot be used. `reason` is one of "missing", "empty", "unreadable",
    "non-finite" (it reads, but holds NaN/inf samples)."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = Path(path), reason, detail
        super().__init__(f"{path}: {reason} audio file" + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------------------------
# Reading

def _wav_truncation(path: Path) -> str:
    """'' if the RIFF/WAVE container is whole, else why not.

    libsndfile opens a wav whose data chunk was cut short (an interrupted copy or download) and
    silently returns fewer samples; the header still says how many bytes there should be, so
    compare. Non-RIFF files (flac, ...) and streamed wavs with an unknown size are not checked.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return ""
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            ck_id, ck_size = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if ck_id == b"data":
                if ck_size in (0, 0xFFFFFFFF):  # written while streaming: length unknown
                    return ""
                if pos + 8 + ck_size > size:
                    return f"truncated: {size - pos - 8} of {ck_size} data bytes present"
                return ""
            pos += 8 + ck_size + (ck_size & 1)  # chunks are word-aligned
    return ""


def probe_audio(path: str | Path) -> tuple[int, int]:
    """(frames, sample_rate) of a usable audio file, from its header only.

    Raises AudioError("missing" | "empty" | "unreadable") otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing")
    if path.stat().st_size == 0:  # libsndfile would only say "Format not recognised"
        raise AudioError(path, "empty", "0 bytes")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError, OSError) as e:  # not audio, corrupt header
        raise AudioError(path, "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "empty", "0 frames")
    why = _wav_truncation(path)
    if why:
        raise AudioError(path, "unreadable", why)
    return int(info.frames), int(info.samplerate)


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a sound file: (y float32 [samples] mono, native sample rate).

    16/24/32-bit PCM and float wavs (anything libsndfile reads); several channels are averaged.
    Raises AudioError("missing" | "empty" | "unreadable" | "non-finite").
    """
    path = Path(path)
    probe_audio(path)  # header checks, including a cut-off data chunk
    try:
        y, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise AudioError(path, "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if y.shape[0] == 0:
        raise AudioError(path, "empty", "0 frames")
    y = y.mean(axis=1, dtype=np.float32) if y.shape[1] > 1 else y[:, 0]
    if not np.isfinite(y).all():  # a float wav can hold NaN/inf, which would poison the model
        raise AudioError(path, "non-finite", "NaN or inf samples")
    return np.ascontiguousarray(y), int(sr)


# ---------------------------------------------------------------------------------------------
# Log-mel

def stft_params(sr: int, window_s: float = WINDOW_S, hop_s: float = HOP_S) -> tuple[int, int, int]:
    """(win_length, hop_length, n_fft) in samples for a sample rate: 40 ms, 20 ms, next pow2."""
    win = int(round(window_s * sr))
    hop = int(round(hop_s * sr))
    if win < 1 or hop < 1:
        raise ValueError(f"sample rate {sr} Hz is too low for the {window_s * 1000:g} ms window "
                         f"and {hop_s * 1000:g} ms hop (less than one sample)")
    n_fft = 1 << (win - 1).bit_length()
    return win, hop, n_fft


def _librosa():
    """librosa, imported so that its numba functions can be cached. They are compiled with
    cache=True, and numba refuses to import them ("cannot cache function …: no locator
    available") when neither their package folder (a shared, read-only venv) nor the user's
    cache folder (HOME missing or read-only, as on some cluster nodes and containers) is
    writable: numba's cache then goes to the temp folder."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        try:
            user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"
            user_cache.mkdir(parents=True, exist_ok=True)
            writable = os.access(user_cache, os.W_OK)
        except (OSError, RuntimeError):  # RuntimeError: no HOME, and a user id /etc/passwd lacks
            writable = False
        if not writable:
            os.environ["NUMBA_CACHE_DIR"] = str(_private_temp_dir(f"numba-cache-{os.getuid()}"))
            if "numba" in sys.modules:  # imported already: its config read the environment then
                sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    import librosa  # heavy import (numba): only where needed

    return librosa


def _private_temp_dir(name: str) -> Path:
    """`name` in the temp folder, reused across runs if this user owns it and nobody else can
    write to it; else a fresh folder. numba loads its cache files as pickles: a folder of that
    predictable name made first by another user of a shared /tmp could run their code as ours."""
    path = Path(tempfile.gettempdir()) / name
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix=f"{name}-"))


@functools.lru_cache(maxsize=64)
def _empty_mel_bands(sr: int, n_fft: int, n_mels: int) -> int:
    librosa = _librosa()

    with warnings.catch_warnings():  # librosa warns about the very thing counted here
        warnings.simplefilter("ignore")
        basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)  # [n_mels, n_fft//2+1]
    return int((basis.max(axis=1) <= 0).sum())


def check_sample_rate(sr: int, window_s: float = WINDOW_S, hop_s: float = HOP_S, n_mels: int = N_MELS) -> None:
    """ValueError when `sr` is too low for the window to give every mel band a frequency bin."""
    _, _, n_fft = stft_params(sr, window_s, hop_s)
    empty = _empty_mel_bands(int(sr), n_fft, int(n_mels))
    if empty:
        raise ValueError(f"sample rate {sr} Hz is too low for the {window_s * 1000:g} ms window: "
                         f"{empty} of the {n_mels} mel bands would be empty")


def n_frames(n_samples: int, sr: int, hop_s: float = HOP_S) -> int:
    """Frames log_mel returns for `n_samples` (centred frames): 1 + n_samples // hop."""
    return 1 + n_samples // int(round(hop_s * sr))


def log_mel(y: np.ndarray, sr: int, window_s: float = WINDOW_S, hop_s: float = HOP_S,
            n_mels: int = N_MELS) -> np.ndarray:
    """Mono waveform [samples] at rate `sr` -> float32 log-mel [frames, n_mels] (librosa)."""
    librosa = _librosa()
    win, hop, n_fft = stft_params(sr, window_s, hop_s)
    check_sample_rate(sr, window_s, hop_s, n_mels)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"log_mel expects a mono waveform [samples], got shape {y.shape}")
    with warnings.catch_warnings():
        # a clip shorter than n_fft: centring zero-pads it to a full frame, which is the defined
        # result (log_mel_torch pads the same); librosa's warning about it would only be noise
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large for input signal")
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=hop,
                                             win_length=win, n_mels=n_mels)  # power=2, hann, centred
    return np.log(mel + EPS).T.astype(np.float32)


_MEL_CACHE: dict = {}


def _torch_mel_basis(sr: int, n_fft: int, n_mels: int, device):
    """librosa's mel filter matrix [n_mels, n_fft//2+1] as a float64 tensor (cached)."""
    import torch

    librosa = _librosa()

    key = (sr, n_fft, n_mels, str(device))
    if key not in _MEL_CACHE:
        basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, dtype=np.float64)
        _MEL_CACHE[key] = torch.from_numpy(basis).to(device)
    return _MEL_CACHE[key]


def log_mel_torch(y_or_batch, sr: int, device: str = "cpu", window_s: float = WINDOW_S,
                  hop_s: float = HOP_S, n_mels: int = N_MELS):
    """The same log-mel as `log_mel`, with torch.stft (GPU-capable).

    y_or_batch: [samples] or [batch, samples] (numpy or torch; one rate, equal lengths).
    Returns a float32 torch tensor [frames, n_mels] or [batch, frames, n_mels] on `device`.
    Matches librosa: periodic Hann of win_length centred in n_fft, centred frames padded with
    zeros (librosa's default pad_mode 'constant'), |STFT|^2, Slaney mel filters, log(x + eps).
    """
    import torch

    win, hop, n_fft = stft_params(sr, window_s, hop_s)
    check_sample_rate(sr, window_s, hop_s, n_mels)
    y = torch.as_tensor(np.asarray(y_or_batch) if not torch.is_tensor(y_or_batch) else y_or_batch)
    y = y.to(device=device, dtype=torch.float64)
    single = y.ndim == 1
    if single:
        y = y[None]
    window = torch.hann_window(win, periodic=True, dtype=torch.float64, device=device)
    # torch centres a window shorter than n_fft the same way librosa.util.pad_center does
    spec = torch.stft(y, n_fft=n_fft, hop_length=hop, win_length=win, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [B, n_fft//2+1, frames]
    mel = torch.matmul(_torch_mel_basis(sr, n_fft, n_mels, device), power)  # [B, n_mels, frames]
    out = torch.log(mel + EPS).transpose(1, 2).to(torch.float32).contiguous()
    return out[0] if single else out


def limit_threads():
    """One BLAS/OpenMP thread per process (torch's included): worker processes already use
    every core. Returns what undoes it (`.restore_original_limits()`), or None."""
    try:
        from threadpoolctl import threadpool_limits  # installed with librosa (scikit-learn)
    except ImportError:
        return None
    return threadpool_limits(1)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest value glibc accepts on 64-bit systems


def keep_freed_memory(trim_bytes: int = 256 << 20) -> bool:
    """Make glibc keep freed buffers for reuse instead of handing them back to the kernel.

    Why: one 20-s clip allocates ~50 MB of short-lived float64 buffers (padded signal, STFT,
    power). In a forked worker process glibc returned that memory to the kernel after each
    clip and asked for it again for the next, and the kernel zero-filled every page again:
    ~2,500 page faults and ~12 ms of system time per clip, about a third of the transform,
    which held two workers to 1.24x one. Buffers up to 32 MB (a 30-s clip's STFT is 25 MB)
    now come from the heap, and up to `trim_bytes` of free heap is kept.

    Returns False, changing nothing, where the C library is not glibc.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
